"""Datasets over whole slides: training tiles at several magnifications (the
paper's M_proposed setting) and overlapping inference windows.

Both open slides lazily in each worker process (slide handles are not shared
across processes) and read only the regions they need, so memory is bounded by
a tile or a window, never by a slide level.

Bad slides in a batch (:class:`SlideWindowDataset`): a slide that cannot be used
(missing, empty, damaged, unsupported, grayscale, no pixel size, ...: a
:class:`custom.wsi.slide.SlideError`) is logged as an ERROR when the windows are laid
out and left out, and the other slides are segmented; the writer
(:class:`custom.wsi.writer.SlideNucleiWriter`) raises after the run, listing
them, so a batch ends with a non-zero exit and the complete outputs of its good
slides (a rerun skips those and tries the failed ones again). When every slide
fails, the error is raised at once (the slide's own error for a single input).
A read error in the middle of a slide's windows (damage the checks at opening
cannot see) stops the run: the slides finished so far keep their outputs, the
unfinished one leaves none. A slide without tissue is not an error: it gets a
WARNING and empty but valid outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from custom.atomic_write import write_atomic
from custom.command_line import flag
from custom.transforms import reinhard_source_stats
from custom.wsi.slide import (
    MagnificationUnavailable,
    Slide,
    SlideError,
    SlideNotFoundError,
    list_slides,
    magnification_to_mpp,
)
from custom.wsi.tissue import TissueParams, tissue_mask

__all__ = ['SlideWindowDataset', 'WSITileDataset', 'slide_stain_stats', 'tile_coverage', 'tissue_core']


logger = logging.getLogger(__name__)


def tile_coverage(mask: np.ndarray, factor: float, boxes: np.ndarray) -> np.ndarray:
    """Tissue fraction of boxes, from a tissue mask.

    Args:
        mask: bool ``(h, w)`` tissue mask.
        factor: level-0 pixels per mask pixel.
        boxes: ``(N, 4)`` level-0 boxes ``(y0, x0, y1, x1)``.

    Returns:
        ``(N,)`` float in [0, 1]: the mean of the mask over each box (the mask pixels whose
        centres fall inside it; at least the one under the box centre).
    """
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / factor
    y0 = np.clip(np.round(b[:, 0]), 0, h - 1).astype(int)
    x0 = np.clip(np.round(b[:, 1]), 0, w - 1).astype(int)
    y1 = np.clip(np.maximum(np.round(b[:, 2]), y0 + 1), 1, h).astype(int)
    x1 = np.clip(np.maximum(np.round(b[:, 3]), x0 + 1), 1, w).astype(int)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return total / ((y1 - y0) * (x1 - x0))


def slide_stain_stats(slide: Slide, target_mpp: float, box: Sequence[int] | None = None, mask: np.ndarray | None = None,
                      factor: float | None = None, regions: int = 8, region_size: int = 512,
                      brightness_percentile: float | None = 90.0, allow_upsample: bool = True) -> np.ndarray:
    """Reinhard source statistics of a slide (:func:`custom.transforms.reinhard_source_stats`), pooled
    over up to ``regions`` regions of ``region_size`` analysis pixels.

    The regions lie on a fixed grid over ``box``; with a tissue ``mask``, only the most
    tissue-covered ones are candidates (at least 90 % of the best coverage: glass would skew the
    statistics), and ``regions`` of them are picked spread evenly. The choice depends neither on
    the window size nor on any requested region, so every window layout (and every MONAI Label
    tile, see :class:`custom.wsi.load_region.LoadRegiond`) normalises a slide alike; an image no larger
    than ``region_size`` is one region, which gives per-image normalisation exactly.

    Args:
        slide: an open :class:`custom.wsi.slide.Slide`.
        target_mpp: analysis pixel size (um/px).
        box: ``(y0, x0, y1, x1)`` analysis pixels to draw from (None: the whole slide).
        mask, factor: a tissue mask and its level-0 pixels per mask pixel (:func:`custom.wsi.tissue.tissue_mask`),
            or None for no tissue selection.
        regions: how many regions to pool (>= 1).
        region_size: their side in analysis pixels (>= 16).
        brightness_percentile: as in stain normalisation.
        allow_upsample: enlarge a slide coarser than ``target_mpp``.

    Returns:
        ``(7,)`` float64: white level, 3 LAB means, 3 LAB stds. Raises ValueError when the mask
        covers none of the grid's regions (a slide without tissue).
    """
    if int(regions) < 1 or int(region_size) < 16:
        raise ValueError(f"stain regions must be >= 1 and their size >= 16 pixels, got {regions!r} and {region_size!r}.")
    y0, x0, y1, x1 = (0, 0, *slide.size_at(target_mpp)) if box is None else (int(v) for v in box)
    size = int(region_size)
    grid = [(ry, rx, min(ry + size, y1), min(rx + size, x1)) for ry in range(y0, y1, size) for rx in range(x0, x1, size)]
    if mask is not None:
        cover = tile_coverage(mask, factor, np.asarray(grid, dtype=np.float64) * slide.scale_to_level0(target_mpp))
        grid = [r for r, v in zip(grid, cover) if v >= 0.9 * cover.max() and v > 0]
    if not grid:
        raise ValueError(f"{slide.path}: no tissue in the stain regions of {size} pixels: no colour statistics.")
    picks = np.unique(np.linspace(0, len(grid) - 1, min(int(regions), len(grid))).round().astype(int))
    pixels = []
    for i in picks:
        ry0, rx0, ry1, rx1 = grid[i]
        pixels.append(np.moveaxis(slide.read((ry0, rx0), (ry1 - ry0, rx1 - rx0), target_mpp, allow_upsample), 0, -1))
    return reinhard_source_stats(pixels, brightness_percentile)


class _SlideCache:
    """Slides opened on first use, once per process; at most ``max_open`` stay open (the least
    recently used is closed), so memory does not grow with the number of slides (a plain image
    holds its pixels, a TIFF read by regions its decoded-segment cache)."""

    def __init__(self, backend: str, mpp, base_magnification, max_open: int = 4):
        self.backend, self.mpp, self.base_magnification, self.max_open = backend, mpp, base_magnification, int(max_open)
        self._pid, self._open = None, OrderedDict()

    def __call__(self, path: Path) -> Slide:
        if self._pid != os.getpid():  # a fresh worker: handles of the parent are not usable here
            self._pid, self._open = os.getpid(), OrderedDict()
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        while len(self._open) >= self.max_open:
            self._open.popitem(last=False)[1].close()
        self._open[path] = Slide(path, self.backend, self.mpp, self.base_magnification)
        return self._open[path]

    def close(self, path: Path) -> None:
        """Close a slide opened in this process (a slide left out)."""
        slide = self._open.pop(path, None) if self._pid == os.getpid() else None
        if slide is not None:
            slide.close()

    def __getstate__(self):
        return {"backend": self.backend, "mpp": self.mpp, "base_magnification": self.base_magnification, "max_open": self.max_open}

    def __setstate__(self, state):
        self.__init__(**state)


class WSITileDataset(Dataset):
    """Tissue tiles of whole slides at several magnifications, labelled by magnification.

    For every slide and magnification, a grid of ``tile_size`` tiles (at that
    magnification) is laid over the slide and the tiles whose tissue coverage is
    >= ``tile_coverage`` are kept (paper: 70 %; the authors' code: 90 %). The index is
    cached in ``cache_dir`` (keyed by the slides' paths, sizes and modification times
    and the settings), so a second run does not rescan.

    Items: ``{"image": uint8 (3, tile_size, tile_size), "label": class index,
    "id": slide name, "magnification": float}``, then ``transform``. Index ``i`` is in
    class ``m`` when ``offsets[m] <= i < offsets[m] + class_sizes[m]`` (use
    ``class_sizes`` with :class:`custom.training.tiles.BalancedMagnificationBatchSampler`).

    Args:
        slides: slide files, a folder or a CSV (see :func:`custom.wsi.slide.list_slides`).
        magnifications: e.g. (10, 20, 40); class index = position in this list.
        tile_size: tile side in pixels at its magnification (paper: 224).
        tile_coverage: minimum tissue fraction of a tile, in (0, 1].
        tissue: :class:`custom.wsi.tissue.TissueParams` fields (dict) or None for the defaults.
        backend: "cucim" or "openslide".
        mpp, base_magnification: level-0 pixel size for slides without metadata (applies to all).
        missing_magnification: "skip" (a slide without a level fine enough for a
            magnification contributes no tiles to it, with a warning) or "error".
        cache_dir: folder for the tile index cache; None: no cache.
        transform: applied to each item.
    """

    def __init__(
        self,
        slides,
        magnifications: Sequence[float] = (10, 20, 40),
        tile_size: int = 224,
        tile_coverage: float = 0.7,
        tissue: dict | None = None,
        backend: str = "cucim",
        mpp: float | None = None,
        base_magnification: float | None = None,
        missing_magnification: str = "skip",
        cache_dir: str | None = None,
        transform: Callable | None = None,
    ):
        if not magnifications:
            raise ValueError("magnifications is empty.")
        if not 0 < float(tile_coverage) <= 1:
            raise ValueError(f"tile_coverage must be in (0, 1], got {tile_coverage!r}.")
        if int(tile_size) < 16:
            raise ValueError(f"tile_size must be >= 16 pixels, got {tile_size!r}.")
        if missing_magnification not in ("skip", "error"):
            raise ValueError(f"missing_magnification must be 'skip' or 'error', got {missing_magnification!r}.")
        self.paths = list_slides(slides)
        missing = [str(p) for p in self.paths if not p.is_file()]
        if missing:  # training needs every slide it was given
            raise SlideNotFoundError(f"{len(missing)} of the {len(self.paths)} training slides do not exist, e.g. {missing[:3]}.")
        self.magnifications = [float(m) for m in magnifications]
        self.tile_size, self.tile_coverage = int(tile_size), float(tile_coverage)
        self.tissue = TissueParams(**(tissue or {}))
        self.missing_magnification = missing_magnification
        self.transform = transform
        self._slides = _SlideCache(backend, mpp, base_magnification)
        key = self._cache_key(mpp, base_magnification)
        cache = Path(cache_dir) / f"tile_index_{key}.npz" if cache_dir else None
        if cache is not None and cache.is_file():
            with np.load(cache) as z:
                self.tiles = [z[f"m{i}"] for i in range(len(self.magnifications))]
            logger.info("tile index: %s (cached)", cache)
        else:
            self.tiles = self._scan()
            if cache is not None:
                arrays = {f"m{i}": t for i, t in enumerate(self.tiles)}
                write_atomic(cache, lambda tmp: _save_npz(tmp, arrays))
                logger.info("tile index: %s (written)", cache)
        empty = [f"{m:g}x" for m, t in zip(self.magnifications, self.tiles) if len(t) == 0]
        if empty:
            raise ValueError(
                f"no tissue tiles at {', '.join(empty)} in {len(self.paths)} slides (coverage >= {self.tile_coverage}); "
                "drop those magnifications, add slides that have them, or lower tile_coverage."
            )
        self.class_sizes = [len(t) for t in self.tiles]
        self.offsets = np.concatenate([[0], np.cumsum(self.class_sizes)[:-1]]).astype(int).tolist()

    def _cache_key(self, mpp, base_magnification) -> str:
        slides = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.paths]
        settings = [self.magnifications, self.tile_size, self.tile_coverage, vars(self.tissue), mpp, base_magnification, self.missing_magnification]
        return hashlib.sha1(json.dumps([slides, settings], default=str).encode()).hexdigest()[:16]

    def _scan(self) -> list[np.ndarray]:
        """Tiles per magnification: int64 ``(N, 3)`` rows ``(slide index, y, x)``, y/x in pixels at that magnification."""
        per_class: list[list[np.ndarray]] = [[] for _ in self.magnifications]
        for si, path in enumerate(self.paths):
            slide = self._slides(path)
            mask, factor = tissue_mask(slide, self.tissue)
            for mi, mag in enumerate(self.magnifications):
                target = magnification_to_mpp(mag)
                try:
                    slide.level_for(target)
                except MagnificationUnavailable as e:
                    if self.missing_magnification == "error":
                        raise
                    logger.warning("%s; skipping its %gx tiles.", e, mag)
                    continue
                h, w = slide.size_at(target)
                ys, xs = np.meshgrid(np.arange(0, h - self.tile_size + 1, self.tile_size),
                                     np.arange(0, w - self.tile_size + 1, self.tile_size), indexing="ij")
                ys, xs = ys.ravel(), xs.ravel()
                f = slide.scale_to_level0(target)
                boxes = np.stack([ys, xs, ys + self.tile_size, xs + self.tile_size], 1) * f
                keep = tile_coverage(mask, factor, boxes) >= self.tile_coverage
                per_class[mi].append(np.stack([np.full(keep.sum(), si), ys[keep], xs[keep]], 1).astype(np.int64))
                logger.info("%s: %d tissue tiles at %gx", path.name, int(keep.sum()), mag)
        return [np.concatenate(c) if c else np.zeros((0, 3), np.int64) for c in per_class]

    def __len__(self) -> int:
        return int(sum(self.class_sizes))

    def locate(self, index: int) -> tuple[int, int, int, int]:
        """``(class, slide index, y, x)`` of item ``index``."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"tile index {index} out of range (0..{len(self) - 1}).")
        m = int(np.searchsorted(self.offsets, index, side="right") - 1)
        si, y, x = (int(v) for v in self.tiles[m][index - self.offsets[m]])
        return m, si, y, x

    def read_tile(self, index: int) -> np.ndarray:
        """The tile of item ``index``: uint8 ``(3, tile_size, tile_size)``."""
        m, si, y, x = self.locate(index)
        slide = self._slides(self.paths[si])
        return slide.read((y, x), (self.tile_size, self.tile_size), magnification_to_mpp(self.magnifications[m]))

    def __getitem__(self, index: int) -> dict:
        m, si, _, _ = self.locate(index)
        item = {"image": self.read_tile(index), "label": m, "id": self.paths[si].stem, "magnification": self.magnifications[m]}
        return self.transform(item) if self.transform is not None else item

    def sample_tiles(self, n: int = 64, seed: int = 0) -> list[np.ndarray]:
        """``n`` tiles drawn evenly over the classes with a fixed seed, as ``(H, W, 3)`` uint8
        (e.g. for the Reinhard target: ``custom.training.tiles.reinhard_target(dataset.sample_tiles())``)."""
        rng = np.random.default_rng(seed)
        picks = [self.offsets[m] + int(rng.integers(self.class_sizes[m])) for m in np.arange(n) % len(self.class_sizes)]
        return [np.moveaxis(self.read_tile(i), 0, -1) for i in picks]

    def sample_items(self, n: int, seed: int = 0) -> list[dict]:
        """Up to ``n`` tissue tiles of the first magnification, spread over the slides (each slide's tiles
        in a seeded random order, taken in turn), read into memory as items of the prepared-image layout:
        ``{"image": uint8 (3, tile_size, tile_size), "id": "<slide>_y<y>_x<x>"}``. The unlabeled images
        of self-training on a user's own slides (``bundle/configs/adapt.json``)."""
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n!r}.")
        rng = np.random.default_rng(seed)
        tiles = self.tiles[0]
        per_slide = [rng.permutation(np.flatnonzero(tiles[:, 0] == si)) for si in range(len(self.paths))]
        turns = [int(rows[k]) for k in range(max(map(len, per_slide), default=0)) for rows in per_slide if k < len(rows)]
        items = []
        for row in turns[:int(n)]:
            si, y, x = (int(v) for v in tiles[row])
            items.append({"image": self.read_tile(self.offsets[0] + row), "id": f"{self.paths[si].stem}_y{y}_x{x}"})
        return items


def tissue_core(mask: np.ndarray, factor: float, core: Sequence[int], scale: float, margin: float) -> tuple[int, int, int, int]:
    """A window's core shrunk to the tissue in it: the box of the tissue-mask pixels that overlap ``core``,
    grown by ``margin``, within ``core``.

    Args:
        mask, factor: a tissue mask and its level-0 pixels per mask pixel (:func:`custom.wsi.tissue.tissue_mask`).
        core: ``(y0, x0, y1, x1)`` in analysis pixels.
        scale: level-0 pixels per analysis pixel.
        margin: analysis pixels kept around the tissue.

    Returns:
        ``(y0, x0, y1, x1)`` inside ``core``; ``core`` itself when no mask pixel overlaps it.
    """
    y0, x0, y1, x1 = (int(v) for v in core)
    per = factor / scale  # analysis pixels per mask pixel
    my0, mx0 = max(0, math.floor(y0 / per)), max(0, math.floor(x0 / per))
    my1, mx1 = min(mask.shape[0], math.ceil(y1 / per)), min(mask.shape[1], math.ceil(x1 / per))
    ys, xs = np.nonzero(mask[my0:my1, mx0:mx1])
    if not len(ys):
        return y0, x0, y1, x1
    return (max(y0, math.floor((my0 + ys.min()) * per - margin)), max(x0, math.floor((mx0 + xs.min()) * per - margin)),
            min(y1, math.ceil((my0 + ys.max() + 1) * per + margin)), min(x1, math.ceil((mx0 + xs.max() + 1) * per + margin)))


class SlideWindowDataset(Dataset):
    """Overlapping windows over the tissue of slides, for whole-slide inference.

    The analysis grid is the slide at ``magnification`` (pixels of ``10 / magnification``
    um). It is cut into *cores* of ``window`` pixels; cores without tissue are skipped.
    With the tissue mask, each core is then shrunk to the tissue it holds plus ``tissue_margin_um``
    (:func:`tissue_core`): glass at the edge of the tissue is neither inferred nor post-processed, and
    nuclei centred outside the box of a core's tissue grown by that margin are not sought.
    Each item is the core grown by ``halo`` (post-processing context: nuclei cut by the
    core border are completed there) and by ``context`` (the attention network's
    receptive radius, so the attention of core + halo is exact), clipped to the slide.

    Items::

        image  uint8 (3, h, w)   the region, RGB at the analysis magnification
        stain  float64 (7,)      the slide's Reinhard source statistics (same for all its windows; absent
                                 with ``stain_regions`` 0, where each window is normalised by its own colours)
        box    int64 (4,)        region (y, x, h, w) in analysis pixels
        valid  int64 (4,)        core + halo inside the region (y0, x0, y1, x1): where the attention is exact
        core   int64 (4,)        the core inside the region (y0, x0, y1, x1): nuclei centred here belong to this window
        slide  int               index into ``slides_info``
        window int               window number within its slide, 0 .. num_windows - 1

    ``slides_info[i]`` describes slide ``i`` (name, path, pixel size, scale to level 0,
    tissue area, number of windows, ...); a slide that could not be used has only
    ``index``, ``name``, ``path``, ``error`` (the message) and ``num_windows`` = 0 (see the
    module docstring; :attr:`failed` lists them).

    Args:
        slides: slide files, a folder or a CSV (see :func:`custom.wsi.slide.list_slides`).
        magnification: analysis magnification (the model's: 40).
        window, halo, context: sizes in analysis pixels.
        backend, mpp, base_magnification: see :class:`custom.wsi.slide.Slide` (mpp/base_magnification apply to every slide).
        allow_upsample: enlarge slides coarser than ``magnification`` (with a warning) instead of stopping.
        tissue: :class:`custom.wsi.tissue.TissueParams` fields, or None.
        use_tissue_mask: False: every window of the slide (plain images, tissue microarrays).
        tissue_margin_um: glass kept around the tissue mask in each core, micrometres (>= 0), or None: whole cores.
        roi: None, or a level-0 box ``[y, x, h, w]`` to analyse instead of the whole slide.
        stain_regions: number of tissue regions pooled for each slide's colour statistics
            (:func:`slide_stain_stats`); 0: none, each window is normalised by its own colours.
        stain_region_size: their size in analysis pixels.
        brightness_percentile: as in stain normalisation.
        exclude: slide names to leave out (e.g. those whose outputs are complete).
        rank, world_size: shard of the slide list to take (slides ``rank::world_size``).
    """

    def __init__(
        self,
        slides,
        magnification: float = 40,
        window: int = 1024,
        halo: int = 64,
        context: int = 83,
        backend: str = "cucim",
        mpp: float | None = None,
        base_magnification: float | None = None,
        allow_upsample: bool = True,
        tissue: dict | None = None,
        use_tissue_mask: bool = True,
        tissue_margin_um: float | None = None,
        roi: Sequence[int] | None = None,
        stain_regions: int = 8,
        stain_region_size: int = 512,
        brightness_percentile: float | None = 90.0,
        exclude: Sequence[str] = (),
        rank: int = 0,
        world_size: int = 1,
        transform: Callable | None = None,
    ):
        for name, v, lo in (("window", window, 16), ("halo", halo, 0), ("context", context, 0), ("stain_region_size", stain_region_size, 16),
                            ("stain_regions", stain_regions, 0)):
            if int(v) < lo:
                raise ValueError(f"{name} must be >= {lo} pixels, got {v!r}.")
        self.target_mpp = magnification_to_mpp(magnification)
        self.magnification = float(magnification)
        self.window, self.halo, self.context = int(window), int(halo), int(context)
        self.allow_upsample = flag(allow_upsample, "allow_upsample")
        self.use_tissue_mask = flag(use_tissue_mask, "use_tissue_mask")
        self.tissue = TissueParams(**(tissue or {}))
        if tissue_margin_um is not None and (isinstance(tissue_margin_um, bool) or not isinstance(tissue_margin_um, (int, float))
                                             or not math.isfinite(tissue_margin_um) or tissue_margin_um < 0):
            raise ValueError(f"tissue_margin_um must be a number >= 0 (micrometres) or None (whole cores), got {tissue_margin_um!r}.")
        # the margin in effect (None: whole cores; it needs the tissue mask), as the run's summary records it
        self.tissue_margin_um = float(tissue_margin_um) if tissue_margin_um is not None and self.use_tissue_mask else None
        self.tissue_margin = None if self.tissue_margin_um is None else self.tissue_margin_um / self.target_mpp  # analysis pixels
        self.roi = None if roi is None else [int(v) for v in roi]
        if self.roi is not None and (len(self.roi) != 4 or self.roi[2] <= 0 or self.roi[3] <= 0 or min(self.roi[:2]) < 0):
            raise ValueError(f"roi must be a level-0 box [y, x, height, width] with positive size, got {roi!r}.")
        self.brightness_percentile = brightness_percentile
        self.transform = transform
        self._slides = _SlideCache(backend, mpp, base_magnification)
        paths = list_slides(slides)
        names = [p.stem for p in paths]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"several slides share the name {dupes[:3]}; outputs are named after slides, so names must be unique.")
        excluded = set(exclude or ())
        # shard first, then drop finished slides: every rank sees the same full list, so the
        # shards never depend on which slides another rank has already finished
        listed = len(paths)
        paths = [p for p in paths[int(rank) :: int(world_size)] if p.stem not in excluded]
        self.slides_info: list[dict] = []
        self.windows: list[tuple[int, int, int, int, int, int]] = []  # (slide, window, cy0, cx0, cy1, cx1)
        self.stain: list[np.ndarray] = []
        errors: list[SlideError] = []
        for path in paths:
            try:
                self._add_slide(path, int(stain_regions), int(stain_region_size))
            except SlideError as e:
                errors.append(e)
                self.slides_info.append({"index": len(self.slides_info), "name": path.stem, "path": str(path), "error": str(e), "num_windows": 0})
                self.stain.append(np.full(7, np.nan))
                self._slides.close(path)
                if len(paths) > 1:
                    logger.error("%s Skipping it; the other slides go on.", e)
        if errors and len(errors) == len(paths):
            if len(errors) == 1:
                raise errors[0]
            others = f" ({listed - len(paths)} other slides are done or in another shard)" if listed > len(paths) else ""
            raise SlideError(f"none of the {len(paths)} slides can be segmented{others}:\n" + "\n".join(f"  {e}" for e in errors))

    @property
    def failed(self) -> list[dict]:
        """``slides_info`` entries of the slides that could not be used (``error``: the message)."""
        return [info for info in self.slides_info if "error" in info]

    def _add_slide(self, path: Path, stain_regions: int, stain_size: int) -> None:
        slide = self._slides(path)
        si = len(self.slides_info)
        warnings = [f"{slide.conversion}."] if slide.conversion else []
        slide.require_mpp()
        try:
            slide.level_for(self.target_mpp)
        except MagnificationUnavailable as e:
            if not self.allow_upsample:
                raise
            warnings.append(f"{e} Enlarged to {self.magnification:g}x.")
            logger.warning("%s", warnings[-1])
        f = slide.scale_to_level0(self.target_mpp)
        h, w = slide.size_at(self.target_mpp)
        y0, x0, y1, x1 = 0, 0, h, w
        if self.roi is not None:
            ry, rx, rh, rw = self.roi
            y0, x0 = min(h, int(ry / f)), min(w, int(rx / f))
            y1, x1 = min(h, int((ry + rh) / f)), min(w, int((rx + rw) / f))
            if y1 <= y0 or x1 <= x0:
                raise ValueError(f"{path}: roi {self.roi} (level-0 y, x, h, w) lies outside the slide ({slide.shape[0]}x{slide.shape[1]}).")
        cores = [(cy, cx, min(cy + self.window, y1), min(cx + self.window, x1))
                 for cy in range(y0, y1, self.window) for cx in range(x0, x1, self.window)]
        mask = factor = None
        if self.use_tissue_mask:
            mask, factor = tissue_mask(slide, self.tissue)
            tissue_mm2 = float(mask.sum()) * (factor * slide.mpp) ** 2 / 1e6
            cover = tile_coverage(mask, factor, np.asarray(cores, dtype=np.float64) * f) if cores else np.zeros(0)
            cores = [c for c, v in zip(cores, cover) if v > 0]
            if self.tissue_margin is not None:
                cores = [tissue_core(mask, factor, c, f, self.tissue_margin) for c in cores]
        else:
            tissue_mm2 = (y1 - y0) * (x1 - x0) * (self.target_mpp**2) / 1e6
        if not cores:
            t = self.tissue
            where = "its region of interest" if self.roi is not None else "it"
            warnings.append(
                f"no tissue found in {where} (tissue: saturation >= {t.min_saturation:g}, brightness in [{t.min_value:g}, {t.max_value:g}], "
                f"pieces >= {t.min_area_um2:g} um^2): the outputs are empty. If it has tissue, lower the thresholds "
                "(e.g. --tissue#min_saturation 0.03) or pass --use_tissue_mask False.")
            logger.warning("%s: %s", path, warnings[-1])
        # everything that can fail is done: add the slide
        stain = None  # stain_regions 0: each window is normalised by its own colours
        if stain_regions:
            stain = slide_stain_stats(slide, self.target_mpp, (y0, x0, y1, x1), mask, factor, stain_regions, stain_size,
                                      self.brightness_percentile, self.allow_upsample) if cores else np.full(7, np.nan)
        for wi, c in enumerate(cores):
            self.windows.append((si, wi, *c))
        self.stain.append(stain)
        self.slides_info.append({
            "index": si, "name": path.stem, "path": str(path), "backend": slide.backend, "is_image": slide.is_image,
            "level0_shape": list(slide.shape), "mpp": slide.mpp, "mpp_source": slide.mpp_source,
            "magnification": self.magnification, "analysis_mpp": self.target_mpp, "scale_to_level0": f,
            "analysis_shape": [h, w], "roi": self.roi, "tissue_mm2": tissue_mm2, "num_windows": len(cores), "warnings": warnings,
        })

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        si, wi, cy0, cx0, cy1, cx1 = self.windows[index]
        info = self.slides_info[si]
        h, w = info["analysis_shape"]
        pad = self.halo + self.context
        ry0, rx0, ry1, rx1 = max(0, cy0 - pad), max(0, cx0 - pad), min(h, cy1 + pad), min(w, cx1 + pad)
        vy0, vx0 = max(0, cy0 - self.halo) - ry0, max(0, cx0 - self.halo) - rx0
        vy1, vx1 = min(h, cy1 + self.halo) - ry0, min(w, cx1 + self.halo) - rx0
        slide = self._slides(Path(info["path"]))
        image = slide.read((ry0, rx0), (ry1 - ry0, rx1 - rx0), self.target_mpp, self.allow_upsample)
        item = {
            "image": image,
            "box": np.array([ry0, rx0, ry1 - ry0, rx1 - rx0], np.int64),
            "valid": np.array([vy0, vx0, vy1, vx1], np.int64),
            "core": np.array([cy0 - ry0, cx0 - rx0, cy1 - ry0, cx1 - rx0], np.int64),
            "slide": si,
            "window": wi,
        }
        if self.stain[si] is not None:
            item["stain"] = self.stain[si]
        return self.transform(item) if self.transform is not None else item


def _save_npz(path: Path, arrays: dict) -> None:
    """``np.savez`` to exactly ``path`` (given a name, numpy would append ".npz" to the temporary name)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)
