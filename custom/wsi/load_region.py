"""Regions requested by annotation tools (MONAI Label, hence QuPath and DSA), read at the model's magnification.

MONAI Label hands a bundle's ``preprocessing`` a dict whose ``image`` is a file path
(a plain image or a whole slide) and, for slides, a region: ``location`` ``(x, y)`` and
``size`` ``(width, height)`` in level-0 pixels (OpenSlide's order, x first), ``size`` in
pixels of ``level`` when a level is given. :class:`LoadRegiond` turns such a dict into the
``(3, h, w)`` uint8 RGB array at the analysis magnification that the rest of
``inference.json``'s preprocessing expects, and passes dicts whose ``image`` is already an
array (the whole-slide windows of :class:`custom.wsi.datasets.SlideWindowDataset`) through untouched.

With ``stain_regions`` > 0 it also writes the slide's colour statistics (``stain``, pooled over
tissue regions of the whole slide by :func:`custom.wsi.datasets.slide_stain_stats`, computed once
per file and kept), so that the stain normalisation of a requested tile is the one whole-slide
inference gives the same slide, not one of the tile's own colours: a tile that is mostly
nuclei, or mostly glass, is then normalised like the rest of its slide.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from custom.command_line import flag
from custom.wsi.datasets import slide_stain_stats
from custom.wsi.slide import Slide, magnification_to_mpp
from custom.wsi.tissue import TissueParams, tissue_mask

__all__ = ['LoadRegiond', 'region_box']


logger = logging.getLogger(__name__)


def region_box(shape: tuple[int, int], scale_to_level0: float, location=None, size=None, level_downsample: float = 1.0) -> tuple[int, int, int, int]:
    """The analysis-grid box ``(y0, x0, y1, x1)`` (end exclusive) covering a requested region.

    Args:
        shape: the slide's ``(height, width)`` in analysis pixels.
        scale_to_level0: level-0 pixels per analysis pixel.
        location: level-0 ``(x, y)`` of the region's top-left; None: ``(0, 0)``.
        size: ``(width, height)`` in pixels of the request's level; None or ``(0, 0)``: up to the slide's end.
        level_downsample: level-0 pixels per pixel of that level.

    The box is clipped to the slide (MONAI Label sends a 2048x2048 region by default even
    for a smaller image). Raises ValueError when nothing of the region lies inside.
    """
    h, w = (int(v) for v in shape)
    x, y = (float(v) for v in (location if location is not None else (0, 0)))
    sw, sh = (float(v) * level_downsample for v in (size if size is not None else (0, 0)))
    if sw < 0 or sh < 0:
        raise ValueError(f"region size must be >= 0, got {size!r}.")
    if sw == 0 or sh == 0:  # no size: from the location to the slide's end
        sw, sh = w * scale_to_level0 - x, h * scale_to_level0 - y
    y0, x0 = max(0, math.floor(y / scale_to_level0)), max(0, math.floor(x / scale_to_level0))
    y1, x1 = min(h, math.ceil((y + sh) / scale_to_level0)), min(w, math.ceil((x + sw) / scale_to_level0))
    if y1 <= y0 or x1 <= x0:
        raise ValueError(
            f"region at level-0 (x, y) = ({x:g}, {y:g}) of size {sw:g}x{sh:g} (width x height) lies outside the slide "
            f"({w * scale_to_level0:g}x{h * scale_to_level0:g} level-0 pixels)."
        )
    return y0, x0, y1, x1


class LoadRegiond(MapTransform):
    """Read the image (or the region of a slide) a request names, at the model's magnification.

    Where ``data[key]`` is not a path (an array or tensor, e.g. a whole-slide window) the
    dict is returned unchanged. Otherwise the file is opened with :class:`custom.wsi.slide.Slide`
    and the region read at ``magnification`` (resampled from the nearest finer level).

    Request keys read (all optional): ``location`` ``(x, y)`` level-0 pixels; ``size``
    ``(width, height)`` in pixels of ``level`` (default 0; absent or ``(0, 0)``: the whole
    image); ``mpp`` / ``base_magnification``: the level-0 pixel size when the file's metadata
    lacks it (a PNG has none), overriding the transform's; ``context``: pixels (analysis grid)
    of extra image read on each side of the region, clipped to the slide, so that the
    network sees what lies beyond the region's edge.

    Keys written::

        image            uint8 (3, h, w)  RGB of the region plus context, analysis magnification
        region_origin    int64 (2,)       (y, x) of ``image``'s top-left in analysis pixels of the slide
        region_core      int64 (4,)       (y0, x0, y1, x1) of the requested region inside ``image``
        scale_to_level0  float            level-0 pixels per analysis pixel
        analysis_mpp     float            micrometres per analysis pixel (10 / magnification)
        stain            float64 (7,)     with ``stain_regions`` > 0: the slide's Reinhard source statistics
                                          (for ``custom.transforms.ReinhardNormalized(source_key="stain")``);
                                          absent for a slide without detected tissue (then the tile's own
                                          colours are used, with a warning)

    Args:
        keys: the image key (MONAI Label: "image").
        magnification: the model's analysis magnification (40: 0.25 um/px).
        backend: "cucim" or "openslide" for whole slides.
        mpp, base_magnification: default level-0 pixel size for files without one.
        allow_upsample: enlarge images coarser than ``magnification`` instead of failing.
        context: default context in analysis pixels (>= 0).
        stain_regions: 0 (the tile's own colour statistics) or the number of tissue regions of the
            whole slide pooled for its colour statistics, as :class:`custom.wsi.datasets.SlideWindowDataset`
            does (give both the same values and they normalise a slide identically).
        stain_region_size: those regions' side, analysis pixels.
        brightness_percentile: as in stain normalisation.
        tissue: :class:`custom.wsi.tissue.TissueParams` fields for the tissue mask, or None for the defaults.
        use_tissue_mask: False: draw the regions from the whole slide, tissue or not.
        max_cached: slides whose statistics are kept (least recently used dropped).
    """

    def __init__(self, keys: KeysCollection = "image", magnification: float = 40, backend: str = "cucim", mpp: float | None = None,
                 base_magnification: float | None = None, allow_upsample: bool = True, context: int = 0, allow_missing_keys: bool = False,
                 stain_regions: int = 0, stain_region_size: int = 512, brightness_percentile: float | None = 90.0,
                 tissue: dict | None = None, use_tissue_mask: bool = True, max_cached: int = 32):
        super().__init__(keys, allow_missing_keys)
        if int(context) < 0:
            raise ValueError(f"context must be >= 0 pixels, got {context!r}.")
        if int(stain_regions) < 0 or int(stain_region_size) < 16:
            raise ValueError(f"stain_regions must be >= 0 (0: the tile's own colours) and stain_region_size >= 16 pixels, "
                             f"got {stain_regions!r} and {stain_region_size!r}.")
        self.target_mpp = magnification_to_mpp(float(magnification))
        self.backend, self.mpp, self.base_magnification = backend, mpp, base_magnification
        self.allow_upsample, self.context = flag(allow_upsample, "allow_upsample"), int(context)
        self.stain_regions, self.stain_region_size = int(stain_regions), int(stain_region_size)
        self.brightness_percentile = brightness_percentile
        self.tissue, self.use_tissue_mask = TissueParams(**(tissue or {})), flag(use_tissue_mask, "use_tissue_mask")
        self.max_cached = int(max_cached)
        self._stain: OrderedDict = OrderedDict()  # (path, mtime, size, mpp, base) -> (7,) or None (no tissue)

    def slide_stain(self, slide: Slide) -> np.ndarray | None:
        """The slide's Reinhard source statistics ``(7,)`` (see :func:`custom.wsi.datasets.slide_stain_stats`),
        computed on first use and kept per file (a changed file is read again); None for a slide
        in which no tissue is found."""
        st = os.stat(slide.path)
        key = (str(Path(slide.path).resolve()), st.st_mtime_ns, st.st_size, slide.mpp, slide.scale_to_level0(self.target_mpp))
        if key in self._stain:
            self._stain.move_to_end(key)
            return self._stain[key]
        mask = factor = None
        if self.use_tissue_mask:
            mask, factor = tissue_mask(slide, self.tissue)
        try:
            stats = slide_stain_stats(slide, self.target_mpp, None, mask, factor, self.stain_regions, self.stain_region_size,
                                      self.brightness_percentile, self.allow_upsample)
        except ValueError as e:
            logger.warning("%s Its tiles are normalised by their own colours.", e)
            stats = None
        self._stain[key] = stats
        while len(self._stain) > self.max_cached:
            self._stain.popitem(last=False)
        return stats

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if not isinstance(d[key], (str, os.PathLike)):
                continue
            mpp = d.get("mpp") if d.get("mpp") is not None else self.mpp
            base = d.get("base_magnification") if d.get("base_magnification") is not None else self.base_magnification
            context = int(d.get("context") if d.get("context") is not None else self.context)
            if context < 0:
                raise ValueError(f"context must be >= 0 pixels, got {context!r}.")
            with Slide(d[key], backend=self.backend, mpp=mpp, base_magnification=base) as slide:
                level = int(d.get("level") or 0)
                if not 0 <= level < len(slide.downsamples):
                    raise ValueError(f"{slide.path}: level {level} does not exist (the slide has {len(slide.downsamples)}).")
                f = slide.scale_to_level0(self.target_mpp)
                h, w = slide.size_at(self.target_mpp)
                y0, x0, y1, x1 = region_box((h, w), f, d.get("location"), d.get("size"), slide.downsamples[level])
                ry0, rx0, ry1, rx1 = max(0, y0 - context), max(0, x0 - context), min(h, y1 + context), min(w, x1 + context)
                d[key] = slide.read((ry0, rx0), (ry1 - ry0, rx1 - rx0), self.target_mpp, self.allow_upsample)
                stain = self.slide_stain(slide) if self.stain_regions else None
            if stain is not None:
                d["stain"] = stain
            d["region_origin"] = np.array([ry0, rx0], np.int64)
            d["region_core"] = np.array([y0 - ry0, x0 - rx0, y1 - ry0, x1 - rx0], np.int64)
            d["scale_to_level0"] = float(f)
            d["analysis_mpp"] = float(self.target_mpp)
        return d
