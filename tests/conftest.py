"""Shared test fixtures: repo root on sys.path, real data location, small generated datasets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MONUSEG = SHARED_DATA / "monuseg"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def require_monuseg() -> Path:
    """The real MoNuSeg copy, or skip the test where it is absent."""
    if not (MONUSEG / "images").is_dir():
        pytest.skip(f"real MoNuSeg data not found at {MONUSEG}")
    return MONUSEG


def make_prepared_dataset(root: Path, n_images: int = 4, size: int = 256, seed: int = 0, with_splits: bool = True) -> Path:
    """Write a small prepared dataset of synthetic H&E-like images (pink background,
    purple disks) with instance labels; returns its folder."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    ids = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n_images):
        img = np.empty((size, size, 3), np.uint8)
        img[...] = (235, 170, 200)
        label = np.zeros((size, size), np.uint16)
        for k in range(1, 25):
            cy, cx, r = rng.integers(8, size - 8), rng.integers(8, size - 8), rng.integers(3, 8)
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            img[disk] = (90, 50, 140)
            label[disk] = k
        img = np.clip(img.astype(int) + rng.integers(-10, 11, img.shape), 0, 255).astype(np.uint8)
        image_id = f"synthetic-{i}"
        Image.fromarray(img).save(root / "images" / f"{image_id}.png")
        Image.fromarray(label).save(root / "labels" / f"{image_id}.png")
        ids.append(image_id)
    if with_splits:
        half = max(1, n_images // 2)
        (root / "splits.json").write_text(json.dumps({"train": ids[:half], "val": ids[half:] or ids[:1]}))
    return root


@pytest.fixture
def prepared_dataset(tmp_path) -> Path:
    return make_prepared_dataset(tmp_path / "prepared")
