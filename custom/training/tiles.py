"""Training tiles of the self-supervised scale task: multi-magnification crops of prepared images,
the magnification-balanced batch sampler, and the Reinhard target of the training images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from skimage.transform import resize
from torch.utils.data import Dataset, Sampler

from custom.data.prepared import load_rgb
from custom.transforms import reinhard_stats

__all__ = ['BalancedMagnificationBatchSampler', 'MultiMagnificationDataset', 'crop_within_tile', 'downsample', 'reinhard_target']


def crop_within_tile(crop_size: int, tile_size: int) -> int:
    """``tile_size`` (px) after checking that a ``crop_size`` px training crop fits in it.

    Raises:
        ValueError: when the crop is larger than the tile, naming both settings.
    """
    if int(crop_size) > int(tile_size):
        raise ValueError(f"crop_size {crop_size} is larger than tile_size {tile_size}: set --crop_size <= --tile_size.")
    return int(tile_size)


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
    :class:`custom.wsi.datasets.WSITileDataset`) class ``m`` holds indices
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
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (0-based) whose order the next iteration yields. (A run resumed in the
        middle of an epoch draws the epoch's done batches again and drops them:
        :class:`custom.training.handlers.BatchSamplerEpochHandler`.)"""
        self.epoch = int(epoch)

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
        epoch = self.epoch
        self.epoch = epoch + 1
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
            yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


def reinhard_target(
    images: Sequence[np.ndarray], reference: str | Path | None = None, brightness_percentile: float | None = 90.0
) -> tuple[list, list]:
    """Reinhard colour-transfer target: LAB (means, stds) of one reference image file, or,
    when ``reference`` is None, the mean statistics of ``images`` ((H, W, 3) uint8 each)."""
    if reference:
        return reinhard_stats([load_rgb(reference)], brightness_percentile)
    return reinhard_stats(images, brightness_percentile)
