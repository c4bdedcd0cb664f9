"""Classical, annotation-free nucleus baselines, run through the same post-processing
and evaluator as the model so that their rows are comparable.

Each baseline is a parameter-free ``nn.Module`` with the attention network's interface:
an ImageNet-normalised RGB batch ``(B, 3, H, W)`` in, a foreground map ``(B, 1, H, W)``
in {0, 1} out (1 = nucleus), which :func:`custom.inference.postprocess.attention_to_instances`
then splits into instances with the paper's watershed.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from skimage.filters import threshold_otsu
from torch import nn

from custom.inference.postprocess import local_threshold_mask
from custom.model.networks import HematoxylinDensity

__all__ = ['BASELINES', 'HematoxylinLocalThreshold', 'HematoxylinOtsu']


class _HematoxylinBaseline(nn.Module):
    """Shared part: hematoxylin optical density per image, thresholded by ``_mask``."""

    def __init__(self, smoothing_sigma: float = 1.0):
        super().__init__()
        if smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must be >= 0, got {smoothing_sigma}.")
        self.smoothing_sigma = float(smoothing_sigma)
        self.hematoxylin = HematoxylinDensity()

    def _mask(self, h: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` ImageNet-normalised RGB -> ``(B, 1, H, W)`` float {0, 1}."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an RGB batch (B, 3, H, W), got shape {tuple(x.shape)}.")
        h = self.hematoxylin(x).cpu().numpy()[:, 0]
        out = np.zeros_like(h, dtype=np.float32)
        for b in range(h.shape[0]):
            hb = ndimage.gaussian_filter(h[b], self.smoothing_sigma) if self.smoothing_sigma > 0 else h[b]
            out[b] = self._mask(hb)
        return torch.from_numpy(out)[:, None].to(x.device)


class HematoxylinOtsu(_HematoxylinBaseline):
    """Colour deconvolution (Ruifrok & Johnston) to hematoxylin optical density, light
    Gaussian smoothing (``smoothing_sigma`` px), one global Otsu threshold per image."""

    def _mask(self, h: np.ndarray) -> np.ndarray:
        if np.ptp(h) == 0:
            return np.zeros_like(h, dtype=np.float32)
        return (h > threshold_otsu(h)).astype(np.float32)


class HematoxylinLocalThreshold(_HematoxylinBaseline):
    """Hematoxylin optical density with a local (adaptive) threshold, as Fiji's
    "Auto Local Threshold" does: a pixel is nucleus when its density exceeds the
    Gaussian-weighted mean of its ``block_size`` neighbourhood by ``offset`` OD units
    and the image's global Otsu threshold scaled by ``global_fraction`` (which keeps
    empty stroma from being split into noise)."""

    def __init__(self, smoothing_sigma: float = 1.0, block_size: int = 101, offset: float = 0.02, global_fraction: float = 0.8):
        super().__init__(smoothing_sigma)
        if block_size < 3 or block_size % 2 == 0:
            raise ValueError(f"block_size must be an odd number >= 3, got {block_size}.")
        self.block_size, self.offset, self.global_fraction = int(block_size), float(offset), float(global_fraction)

    def _mask(self, h: np.ndarray) -> np.ndarray:
        if np.ptp(h) == 0:
            return np.zeros_like(h, dtype=np.float32)
        return (local_threshold_mask(h, self.block_size, self.offset) & (h > self.global_fraction * threshold_otsu(h))).astype(np.float32)


BASELINES = {"hematoxylin_otsu": HematoxylinOtsu, "hematoxylin_local": HematoxylinLocalThreshold}
