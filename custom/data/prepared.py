"""The prepared dataset layout (``images/<id>.png``, ``labels/<id>.png``, optional ``splits.json``):
listing ids by split, reading images and instance labels with checks, and a dataset of whole images."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from custom.command_line import flag

__all__ = ['PreparedImageDataset', 'check_label_file', 'list_ids', 'load_label', 'load_rgb']


def list_ids(dataset_dir: str | Path, split: str | None = None, ids: Sequence[str] | None = None) -> list[str]:
    """Image ids of a prepared dataset.

    Args:
        dataset_dir: folder with ``images/*.png``.
        split: a key of ``splits.json`` ("train", "val", ...); None: every image.
        ids: explicit ids (overrides ``split``).

    Without ``splits.json`` a split cannot be chosen: pass ``split=None`` for every image.

    Raises:
        FileNotFoundError / ValueError naming the folder, split or ids that are wrong.
    """
    root = Path(dataset_dir)
    image_dir = root / "images"
    available = sorted(p.stem for p in image_dir.glob("*.png"))
    if not available:
        raise FileNotFoundError(
            f"{image_dir}: no images (*.png). Point --dataset_dir at a prepared dataset "
            "(images/*.png, labels/*.png, optional splits.json)."
        )
    if ids is None and split is not None:
        split_file = root / "splits.json"
        if not split_file.is_file():
            raise FileNotFoundError(f"{split_file}: not found, but split={split!r} was asked for. Pass split=None to use every image.")
        try:
            splits = json.loads(split_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{split_file}: not valid JSON ({e}).") from e
        if split not in splits:
            raise ValueError(f"{split_file}: no split {split!r}; it has {sorted(splits)}.")
        ids = splits[split]
    if ids is None:
        return available
    missing = sorted(set(ids) - set(available))
    if missing:
        raise ValueError(f"{image_dir}: {len(missing)} requested ids have no image, e.g. {missing[:3]}.")
    if len(ids) == 0:
        raise ValueError(f"{root}: the requested id list (split={split!r}) is empty.")
    return list(ids)


# PIL modes of colour images that convert to RGB without losing the stain colours
_COLOUR_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "P", "YCbCr", "LAB", "HSV")


# PIL modes of single-channel integer images: the instance maps
_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N")


def load_rgb(path: str | Path) -> np.ndarray:
    """Read a colour image file as RGB uint8 ``(H, W, 3)`` (alpha dropped; palette and CMYK converted).

    Raises:
        ValueError: naming the file, when it cannot be decoded or is not a colour image
            (grayscale or binary: H&E needs its colours).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode not in _COLOUR_MODES or (im.mode == "P" and _palette_is_gray(im)):
                raise ValueError(
                    f"{path}: a {im.mode!r} image is not colour; H&E segmentation needs RGB. Use the original colour scan."
                )
            return np.asarray(im.convert("RGB"))
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot be read as an image ({e}). Check that the file is a complete PNG/JPEG/TIFF.") from e


def _palette_is_gray(im: Image.Image) -> bool:
    """Whether a palette image's colours are all gray levels."""
    palette = np.asarray(im.getpalette() or [], dtype=np.int32).reshape(-1, 3)
    return len(palette) > 0 and bool((palette.max(1) == palette.min(1)).all())


def check_label_file(label: Path, image: Path) -> None:
    """Check, from the file headers only, that ``label`` is a single-channel integer instance
    map of the same size as ``image``.

    Raises:
        ValueError: naming the label file, what is wrong and what it must be.
    """
    sizes = {}
    for path, what in ((image, "an image"), (label, "a label image")):
        try:
            with Image.open(path) as im:
                sizes[path], mode = im.size, im.mode
        except (OSError, Image.DecompressionBombError) as e:
            raise ValueError(f"{path}: cannot be read as {what} ({e}).") from e
    size, image_size = sizes[label], sizes[image]
    if mode not in _LABEL_MODES:
        what = "a binary mask" if mode == "1" else f"a {mode!r} image"
        raise ValueError(
            f"{label}: is {what}; a label must be a single-channel integer instance map (0 = background, one id per "
            "nucleus; 8/16/32-bit PNG). Number the nuclei of a binary mask with scipy.ndimage.label."
        )
    if size != image_size:
        raise ValueError(
            f"{label}: label is {size[1]}x{size[0]} but its image {image.name} is {image_size[1]}x{image_size[0]}; "
            "they must be the same size."
        )


def load_label(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read an instance map (0 = background, one id per nucleus) as int32 ``(H, W)``.

    Args:
        path: a single-channel integer PNG/TIFF (uint8/uint16/int32).
        shape: the ``(H, W)`` it must have (that of its image), or None.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot be read as a label image ({e}).") from e
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: a label must be a single-channel integer image, got {arr.dtype} of shape {arr.shape}.")
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{path}: label is {arr.shape[0]}x{arr.shape[1]} but its image is {shape[0]}x{shape[1]}.")
    return arr.astype(np.int32)


class PreparedImageDataset(Dataset):
    """Whole images of a prepared dataset, for inference and evaluation.

    Items are ``{"image": uint8 (3, H, W), "id": str}`` plus, with ``labels=True``,
    ``"label": int32 (1, H, W)`` (the instance map). ``transform`` is applied to each item.

    Args:
        dataset_dir: prepared layout (``images/<id>.png``, ``labels/<id>.png``).
        ids: image ids (see :func:`list_ids`).
        labels: also load the instance maps (a missing label is an error).
        transform: a callable on the item dict (e.g. a MONAI ``Compose``).
    """

    def __init__(self, dataset_dir: str | Path, ids: Sequence[str], labels: bool = True, transform: Callable | None = None):
        self.root, self.ids, self.labels, self.transform = Path(dataset_dir), list(ids), flag(labels, "labels"), transform
        if labels:
            missing = [i for i in self.ids if not (self.root / "labels" / f"{i}.png").is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{self.root / 'labels'}: {len(missing)} images have no label (e.g. {missing[:3]}); "
                    "evaluation needs labels/<id>.png for every image."
                )
            for i in self.ids:  # headers only: a wrong label stops here, not after an epoch of training
                check_label_file(self.root / "labels" / f"{i}.png", self.root / "images" / f"{i}.png")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        i = self.ids[index]
        image = np.ascontiguousarray(np.moveaxis(load_rgb(self.root / "images" / f"{i}.png"), -1, 0))
        item = {"image": image, "id": i}
        if self.labels:
            item["label"] = load_label(self.root / "labels" / f"{i}.png", image.shape[1:])[None]
        return self.transform(item) if self.transform is not None else item
