"""Data: the prepared dataset layout, multi-magnification tiles, balanced batches.

Prepared layout (what every dataset of the project is converted to)::

    dataset_dir/images/<id>.png   RGB H&E at the base magnification (40x for MoNuSeg)
    dataset_dir/labels/<id>.png   uint16 instance maps (never read for training)
    dataset_dir/splits.json       optional {"train": [ids], "val": [ids], ...}

Images are kept as uint8 ``(3, H, W)``; the tile transforms turn them into float.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.transform import resize
from torch.utils.data import Dataset, Sampler

from custom.config import flag
from custom.transforms import reinhard_stats

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BalancedMagnificationBatchSampler",
    "MultiMagnificationDataset",
    "PreparedImageDataset",
    "check_label_file",
    "crop_within_tile",
    "downsample",
    "list_ids",
    "load_label",
    "load_rgb",
    "reinhard_target",
    "stain_settings_of",
    "stain_target_of",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def crop_within_tile(crop_size: int, tile_size: int) -> int:
    """``tile_size`` (px) after checking that a ``crop_size`` px training crop fits in it.

    Raises:
        ValueError: when the crop is larger than the tile, naming both settings.
    """
    if int(crop_size) > int(tile_size):
        raise ValueError(f"crop_size {crop_size} is larger than tile_size {tile_size}: set --crop_size <= --tile_size.")
    return int(tile_size)


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


def downsample(image: np.ndarray, factor: float) -> np.ndarray:
    """Antialiased downsampling (Gaussian prefilter, then bilinear) of a uint8 image.

    Args:
        image: ``(C, H, W)`` uint8.
        factor: >= 1; the output is ``(C, round(H / factor), round(W / factor))`` uint8.
    """
    if factor < 1:
        raise ValueError(f"downsample factor must be >= 1, got {factor}.")
    if factor == 1:
        return image
    c, h, w = image.shape
    out = resize(image, (c, round(h / factor), round(w / factor)), order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class MultiMagnificationDataset(Dataset):
    """Tiles of a set of images at several magnifications, labelled by magnification.

    Every image at ``base_magnification`` yields one view per entry of
    ``magnifications`` by antialiased downsampling (40x -> 20x by 2, 10x by 4).
    Item ``i`` is view ``(magnification i // n_images, image i % n_images)``.

    Without ``fixed_crops`` an item is the whole view and the transform crops it
    (random crops, training). With ``fixed_crops=k`` each view gives ``k`` crops of
    ``crop_size`` at positions drawn once from ``seed`` (validation: the same tiles
    every epoch), and ``len = n_images * n_magnifications * k``.

    Args:
        dataset_dir: prepared dataset folder.
        ids: image ids to use (labels are never read).
        magnifications: e.g. (10, 20, 40); class index = position in this list.
        base_magnification: magnification of the stored images.
        transform: applied to ``{"image": uint8 (3, h, w), "label": int, "id", "magnification"}``.
        fixed_crops: None (whole views) or the number of fixed crops per view.
        crop_size: size of the crops in pixels (fixed crops, or the training transform's random
            crops): every view must be at least this large.
        seed: seed of the fixed crop positions.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        ids: Sequence[str],
        magnifications: Sequence[float] = (10, 20, 40),
        base_magnification: float = 40,
        transform: Callable | None = None,
        fixed_crops: int | None = None,
        crop_size: int = 160,
        seed: int = 0,
    ):
        if not magnifications:
            raise ValueError("magnifications is empty.")
        bad = [m for m in magnifications if not 0 < m <= base_magnification]
        if bad:
            raise ValueError(f"magnifications {bad} cannot be made from base magnification {base_magnification}x (only equal or lower).")
        self.ids = list(ids)
        self.magnifications = [float(m) for m in magnifications]
        self.transform = transform
        self.base_images: list[np.ndarray] = []  # (H, W, 3) uint8 at the base magnification
        self.views: list[list[np.ndarray]] = []  # views[m][i]: (3, h, w) uint8
        for image_id in self.ids:
            self.base_images.append(load_rgb(Path(dataset_dir) / "images" / f"{image_id}.png"))
        chw = [np.ascontiguousarray(np.moveaxis(img, -1, 0)) for img in self.base_images]
        for m in self.magnifications:
            self.views.append([downsample(img, base_magnification / m) for img in chw])
        for mi, views in enumerate(self.views):  # random training crops and fixed validation crops alike
            for ii, view in enumerate(views):
                h, w = view.shape[1:]
                if h < crop_size or w < crop_size:
                    raise ValueError(
                        f"image {self.ids[ii]} at {self.magnifications[mi]:g}x is {h}x{w}, smaller than crop_size {crop_size}: "
                        f"use images of at least {int(np.ceil(crop_size * base_magnification / min(self.magnifications)))} px "
                        "at the base magnification, or a smaller --crop_size."
                    )
        self.crops: list[tuple[int, int, int, int]] | None = None
        if fixed_crops is not None:
            rng = np.random.default_rng(seed)
            self.crops = []
            # ordered image by image, magnifications interleaved, so any batch mixes magnifications
            for ii in range(self.num_images):
                for _ in range(int(fixed_crops)):
                    for mi, views in enumerate(self.views):
                        h, w = views[ii].shape[1:]
                        y, x = int(rng.integers(0, h - crop_size + 1)), int(rng.integers(0, w - crop_size + 1))
                        self.crops.append((mi, ii, y, x))
            self.crop_size = int(crop_size)

    @property
    def num_images(self) -> int:
        return len(self.ids)

    def __len__(self) -> int:
        return len(self.crops) if self.crops is not None else self.num_images * len(self.magnifications)

    def __getitem__(self, index: int) -> dict:
        if self.crops is not None:
            mi, ii, y, x = self.crops[index]
            image = self.views[mi][ii][:, y : y + self.crop_size, x : x + self.crop_size]
        else:
            mi, ii = divmod(int(index), self.num_images)
            image = self.views[mi][ii]
        item = {"image": image, "label": mi, "id": self.ids[ii], "magnification": self.magnifications[mi]}
        return self.transform(item) if self.transform is not None else item


class BalancedMagnificationBatchSampler(Sampler):
    """Batches with the same number of tiles per magnification (paper 4.2).

    With ``batch_size`` a multiple of the number of magnifications every batch is
    exactly balanced; otherwise counts differ by at most one and the classes that
    get the extra tile rotate, so every run of ``n_magnifications`` consecutive
    batches is exactly balanced. Within a magnification, images are drawn without
    replacement from a reshuffled list (every image once before any repeats).

    Indices follow :class:`MultiMagnificationDataset`: ``magnification * num_images + image``;
    with per-class counts (``num_images`` a list, e.g. whole-slide tiles,
    :class:`custom.wsi_data.WSITileDataset`) class ``m`` holds indices
    ``sum(num_images[:m]) .. sum(num_images[:m+1]) - 1``.

    Args:
        num_images: images per magnification, or a list of counts, one per magnification.
        num_magnifications: number of classes.
        batch_size: tiles per batch.
        num_batches: batches per epoch (paper: 100 iterations).
        seed: the epoch-``e`` order is drawn from ``(seed, e)``, so it is reproducible.
        rank, world_size: distributed training (torchrun): every rank draws the same global
            batch of ``batch_size * world_size`` balanced tiles and yields its own
            ``batch_size`` slice of it, so the ranks see disjoint tiles and the step that
            DistributedDataParallel averages is over one balanced global batch.
    """

    def __init__(
        self,
        num_images: int | Sequence[int],
        num_magnifications: int,
        batch_size: int,
        num_batches: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        sizes = [int(num_images)] * int(num_magnifications) if np.ndim(num_images) == 0 else [int(n) for n in num_images]
        if min(sizes, default=0) < 1 or num_magnifications < 1 or batch_size < 1 or num_batches < 1:
            raise ValueError(
                "BalancedMagnificationBatchSampler needs positive num_images, num_magnifications, batch_size, num_batches; "
                f"got {num_images}, {num_magnifications}, {batch_size}, {num_batches}."
            )
        if len(sizes) != num_magnifications:
            raise ValueError(f"num_images lists {len(sizes)} class sizes for {num_magnifications} magnifications.")
        self.class_sizes = sizes
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        self.num_images, self.num_magnifications = num_images, int(num_magnifications)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"BalancedMagnificationBatchSampler: rank must be in [0, world_size), got rank={rank}, world_size={world_size}.")
        self.batch_size, self.num_batches, self.seed = int(batch_size), int(num_batches), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the epoch (0-based) whose order the next iteration yields, from its batch
        ``start`` on (a run resumed in the middle of an epoch skips the batches it has done)."""
        if not 0 <= int(start) < self.num_batches:
            raise ValueError(f"start batch must be in [0, {self.num_batches}), got {start}.")
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        return self.num_batches

    def class_counts(self, batch_index: int) -> list[int]:
        """Tiles per magnification in global batch ``batch_index`` (all ranks together)."""
        base, extra = divmod(self.batch_size * self.world_size, self.num_magnifications)
        counts = [base] * self.num_magnifications
        for j in range(extra):
            counts[(batch_index * extra + j) % self.num_magnifications] += 1
        return counts

    def __iter__(self):
        # The epoch is read, and advanced for an iteration without set_epoch, when the first batch is
        # asked for. Not after the last one: a loader stopped after ``num_batches`` (Ignite's
        # epoch_length) finishes this generator only at the next epoch, after its set_epoch, which an
        # increment there would undo (the next epoch would then draw epoch e + 1's order, a resumed run e's).
        epoch, start = self.epoch, self.start
        self.epoch, self.start = epoch + 1, 0
        rng = np.random.default_rng((self.seed, epoch))
        pools: list[list[int]] = [[] for _ in range(self.num_magnifications)]
        for b in range(self.num_batches):
            batch = []
            for m, count in enumerate(self.class_counts(epoch * self.num_batches + b)):
                for _ in range(count):
                    if not pools[m]:
                        pools[m] = rng.permutation(self.class_sizes[m]).tolist()
                    batch.append(self.offsets[m] + pools[m].pop())
            batch = [batch[i] for i in rng.permutation(len(batch))]
            if b >= start:  # skipped batches are still drawn: the later ones stay those of the full epoch
                yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


def reinhard_target(
    images: Sequence[np.ndarray], reference: str | Path | None = None, brightness_percentile: float | None = 90.0
) -> tuple[list, list]:
    """Reinhard colour-transfer target: LAB (means, stds) of one reference image file, or,
    when ``reference`` is None, the mean statistics of ``images`` ((H, W, 3) uint8 each)."""
    if reference:
        return reinhard_stats([load_rgb(reference)], brightness_percentile)
    return reinhard_stats(images, brightness_percentile)



def stain_target_of(network, source: str = "the model") -> tuple[list, list]:
    """The Reinhard target ``(LAB means, LAB stds)`` stored in an attention network's
    state (``network.stain_target``), for normalising new images as in training.

    Raises:
        ValueError: naming ``source`` when the weights carry no stain target (exported
        before it was stored): re-export them with ``scripts/tune_postprocess.py``.
    """
    target = getattr(network, "stain_target", None)
    if not target or len(target) != 2:
        raise ValueError(
            f"{source}: the weights carry no Reinhard stain target; re-export them with scripts/tune_postprocess.py "
            "(which stores the training images' target) or train with this version of the bundle."
        )
    return target[0], target[1]


LEGACY_STAIN_SETTINGS = {"brightness_percentile": 90.0, "max_std_ratio": None}
"""What every model exported before bundle 0.5.0 (which stored no ``stain_settings``) was trained with."""


def stain_settings_of(network) -> dict:
    """The Reinhard settings an attention network was trained with, ``{"brightness_percentile":
    float or None, "max_std_ratio": float or None}``, from its state (``network.stain_settings``).
    Weights exported before bundle 0.5.0 store none; they were all trained with
    :data:`LEGACY_STAIN_SETTINGS` (brightness standardised at the 90th percentile, no contrast cap).

    Raises:
        ValueError: the stored settings lack a key or hold an unusable value.
    """
    stored = getattr(network, "stain_settings", None)
    settings = dict(LEGACY_STAIN_SETTINGS if stored is None else stored)
    missing = set(LEGACY_STAIN_SETTINGS) - set(settings)
    if missing:
        raise ValueError(f"the model's stain_settings lack {sorted(missing)}: got {stored!r}.")
    return {key: None if settings[key] is None else float(settings[key]) for key in LEGACY_STAIN_SETTINGS}
