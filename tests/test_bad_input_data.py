"""Bad input, family "data folders": what training (``train.json``) says about a
prepared dataset (``images/``, ``labels/``, ``splits.json``) that is wrong.

Every case is a row of ``DATA_CASES``: how to break a small generated dataset, and
the words the error must contain (the file or folder, and what is wrong). Each row
builds the training workflow and must fail while the workflow is being set up,
before any training step. One run through the command line checks the exit status.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from PIL import Image

from tests.conftest import REPO, error_messages, make_prepared_dataset

TRAIN = REPO / "bundle" / "configs" / "train.json"


def _first(root: Path, split: str = "val") -> str:
    return json.loads((root / "splits.json").read_text())[split][0]


def _save(array: np.ndarray, path: Path, mode: str | None = None) -> None:
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)


def _break(case: str, root: Path) -> str:
    """Apply ``case`` to the prepared dataset at ``root``; return the name the error must mention."""
    val = _first(root)
    label, image = root / "labels" / f"{val}.png", root / "images" / f"{val}.png"
    if case == "missing_folder":
        return str(root / "nowhere")
    if case == "no_images":
        for p in (root / "images").glob("*.png"):
            p.unlink()
        return "holds no prepared MoNuSeg data (images/*.png)"
    if case == "labels_missing":
        label.unlink()
        return "have no label"
    if case == "label_wrong_size":
        _save(np.zeros((100, 256), np.uint16), label)
        return f"{val}.png: label is 100x256"
    if case == "label_rgb":
        _save(np.zeros((256, 256, 3), np.uint8), label)
        return "'RGB' image; a label must be a single-channel integer"
    if case == "label_two_channels":
        _save(np.zeros((256, 256, 2), np.uint8), label, "LA")
        return "'LA' image"
    if case == "label_binary":
        Image.fromarray(np.zeros((256, 256), bool)).save(label)
        return "binary mask"
    if case == "label_not_an_image":
        label.write_text("not a png")
        return f"{val}.png: cannot be read as a label image"
    if case == "split_unknown_ids":
        (root / "splits.json").write_text(json.dumps({"train": ["synthetic-0", "synthetic-1"], "val": ["TCGA-nope"]}))
        return "requested ids have no image"
    if case == "split_invalid_json":
        (root / "splits.json").write_text("{'train': [")
        return "splits.json: not valid JSON"
    if case == "split_missing_key":
        (root / "splits.json").write_text(json.dumps({"train": ["synthetic-0"]}))
        return "no split 'val'"
    if case == "split_empty":
        (root / "splits.json").write_text(json.dumps({"train": ["synthetic-0"], "val": []}))
        return "id list (split='val') is empty"
    if case == "image_truncated":
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 3])
        return f"{val}.png: cannot be read as an image"
    if case == "image_text_named_png":
        image.write_text("hello")
        return f"{val}.png: cannot be read as an image"
    if case == "image_grayscale":
        _save(np.full((256, 256), 128, np.uint8), image)
        return "'L' image is not colour"
    if case == "image_smaller_than_crop":
        train = _first(root, "train")
        _save(np.full((200, 200, 3), 200, np.uint8), root / "images" / f"{train}.png")
        _save(np.zeros((200, 200), np.uint16), root / "labels" / f"{train}.png")
        return "smaller than crop_size 64"  # 200 px at 40x is 50 px at 10x
    raise KeyError(case)


DATA_CASES = [
    "missing_folder",
    "no_images",
    "labels_missing",
    "label_wrong_size",
    "label_rgb",
    "label_two_channels",
    "label_binary",
    "label_not_an_image",
    "split_unknown_ids",
    "split_invalid_json",
    "split_missing_key",
    "split_empty",
    "image_truncated",
    "image_text_named_png",
    "image_grayscale",
    "image_smaller_than_crop",
]


def _workflow(root: Path, out: Path) -> ConfigWorkflow:
    return ConfigWorkflow(config_file=str(TRAIN), workflow_type="train", dataset_dir=str(root), download=False,
                          output_dir=str(out), model_path=str(out / "model.pt"), width=4, crop_size=64, num_workers=0)


@pytest.mark.parametrize("case", DATA_CASES, ids=DATA_CASES)
def test_bad_dataset_is_refused_before_training(case, tmp_path):
    root = make_prepared_dataset(tmp_path / "data", n_images=4, size=256)
    expected = _break(case, root)
    if case == "missing_folder":
        root = Path(expected)
    workflow = _workflow(root, tmp_path / "run")
    with pytest.raises(Exception) as info:
        workflow.initialize()
    assert expected in error_messages(info.value), error_messages(info.value)
    assert not list((tmp_path / "run").rglob("*.pt"))  # nothing that looks like a result


def test_bad_dataset_exits_non_zero_from_the_command_line(tmp_path):
    root = make_prepared_dataset(tmp_path / "data", n_images=4, size=256)
    expected = _break("label_wrong_size", root)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN), "--dataset_dir", str(root),
           "--download", "False", "--output_dir", str(tmp_path / "run"), "--width", "4", "--crop_size", "64", "--num_workers", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert not list((tmp_path / "run").rglob("*.pt"))
