"""Tissue detection on a slide's thumbnail (saturation and brightness thresholds, small regions dropped)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hsv

from custom.wsi.slide import Slide

__all__ = ['TissueParams', 'tissue_mask']


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection in HSV on a low-resolution picture of the slide.

    A pixel is tissue when its saturation >= ``min_saturation`` and its value
    (brightness) is within [``min_value``, ``max_value``] (background glass is bright
    and grey; pen and dirt are dark). The mask is then closed, holes are filled and
    pieces smaller than ``min_area_um2`` are dropped (on a picture smaller than four such
    pieces, a crop, pieces smaller than a quarter of the picture).

    Args:
        min_saturation: in [0, 1].
        min_value, max_value: in [0, 1].
        mask_mpp: pixel size of the mask in um/px (8 um: a 40x slide at 1/32).
        min_area_um2: smallest tissue piece kept.
    """

    min_saturation: float = 0.07
    min_value: float = 0.1
    max_value: float = 0.95
    mask_mpp: float = 8.0
    min_area_um2: float = 5000.0

    def __post_init__(self):
        for name in ("min_saturation", "min_value", "max_value"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"tissue {name} must be in [0, 1], got {v!r}.")
        if self.min_value >= self.max_value:
            raise ValueError(f"tissue min_value ({self.min_value}) must be below max_value ({self.max_value}).")
        if self.mask_mpp <= 0 or self.min_area_um2 < 0:
            raise ValueError(f"tissue mask_mpp must be > 0 and min_area_um2 >= 0, got {self.mask_mpp}, {self.min_area_um2}.")


def tissue_mask(slide: Slide, params: TissueParams | None = None) -> tuple[np.ndarray, float]:
    """Tissue mask of a slide, computed once on a low-resolution picture.

    Args:
        slide: an open :class:`Slide` (its pixel size must be known).
        params: thresholds (:class:`TissueParams`; defaults when None).

    Returns:
        ``(mask, factor)``: bool ``(h, w)`` mask and level-0 pixels per mask pixel.
        The picture is read by regions (see :meth:`Slide.thumbnail`), never a whole level.
    """
    params = params or TissueParams()
    h0, w0 = slide.shape
    factor = max(1.0, params.mask_mpp / slide.require_mpp())
    rgb, factor = slide.thumbnail(max_size=max(1, int(math.ceil(max(h0, w0) / factor))))
    hsv = rgb2hsv(rgb)
    s, v = hsv[..., 1], hsv[..., 2]
    mask = (s >= params.min_saturation) & (v >= params.min_value) & (v <= params.max_value)
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=2, border_value=0) | mask
    mask = ndimage.binary_fill_holes(mask)
    min_pixels = min(params.min_area_um2 / (factor * slide.require_mpp()) ** 2, mask.size / 4)  # a small crop keeps its tissue
    if min_pixels > 1:
        labels, n = ndimage.label(mask)
        if n:
            sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
            mask = np.isin(labels, 1 + np.flatnonzero(sizes >= min_pixels))
    return mask, factor
