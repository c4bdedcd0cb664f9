"""Shared test fixtures: real data location, small generated datasets.

``custom`` is the installed package (``pip install -e .``, the last line of requirements.txt);
``tests.slides`` and ``monailabel_app`` import from the repository root, which pytest puts on
``sys.path`` as the folder above the package ``tests/`` (its default prepend import mode)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MONUSEG = SHARED_DATA / "monuseg"


def error_messages(error: BaseException | None) -> str:
    """Every message along an exception's cause chain, one per line (MONAI's config
    workflow wraps the root cause in "Failed to instantiate/evaluate ..." errors)."""
    parts = []
    while error is not None:
        parts.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


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


WSI_DIR = SHARED_DATA / "wsi"
CMU_SLIDE = WSI_DIR / "cmu_small_region.svs"
TCGA_SLIDE = WSI_DIR / "tcga-cr-7395-01a-01-ts1.svs"


def require_slide(path: Path) -> Path:
    """A real slide of ``../shared/data/wsi``, or skip the test where it is absent."""
    if not path.is_file():
        pytest.skip(f"real slide not found at {path}")
    return path


def require_backend(backend: str) -> str:
    """Skip when the whole-slide backend's package is not installed."""
    pytest.importorskip("cucim" if backend == "cucim" else "openslide")
    return backend


def synthetic_he(height: int, width: int, tissue_fraction: float = 0.6, seed: int = 0, nuclei_per_mpx: int = 2500) -> np.ndarray:
    """A synthetic H&E-like picture ``(H, W, 3)`` uint8: the left ``tissue_fraction`` of the
    columns is pink stroma with purple round nuclei (radius 5-9 px), the rest white glass."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 245, np.uint8)
    tw = int(width * tissue_fraction)
    img[:, :tw] = (225, 150, 195)
    n = int(nuclei_per_mpx * height * tw / 1e6)
    yy, xx = np.mgrid[-9:10, -9:10]
    for _ in range(n):
        cy, cx, r = rng.integers(10, height - 10), rng.integers(10, max(11, tw - 10)), rng.integers(5, 10)
        disk = yy**2 + xx**2 <= r * r
        img[cy - 9 : cy + 10, cx - 9 : cx + 10][disk] = (80, 45, 135)
    return np.clip(img.astype(int) + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def pyramid_slide(tmp_path_factory) -> Path:
    """A generated 3-level pyramidal TIFF (0.25 um/px = 40x, 1536x1280, tissue on the left 60 %)."""
    from tests.slides import write_pyramidal_tiff

    path = tmp_path_factory.mktemp("slides") / "generated_pyramid.tiff"
    return write_pyramidal_tiff(path, synthetic_he(1536, 1280), mpp=0.25, levels=3)
