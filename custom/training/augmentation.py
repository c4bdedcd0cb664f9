"""Strong photometric augmentation for self-training (issue 29): JPEG re-encoding, array and dict pair.

The rest of the self-training recipe (``bundle/configs/selftrain.json``, ``selftrain#augmentation``) is
made of existing transforms: :class:`custom.transforms.RandDihedrald` and MONAI's ``RandZoomd`` (scale,
the label resampled by nearest neighbour, padding ignored) on image and label; stain jitter
(:class:`custom.transforms.RandHEDJitterd`), MONAI's ``RandGaussianSmoothd`` (blur) and
``RandGaussianNoised`` on the image only, then :class:`RandJPEGd`.

Images are channel-first RGB ``(3, H, W)`` floats in [0, 1] (numpy or torch).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import RandomizableTransform
from monai.utils import convert_to_dst_type
from PIL import Image

from custom.transforms import _SharedDrawd

__all__ = ['RandJPEG', 'RandJPEGd', 'jpeg_roundtrip']


def jpeg_roundtrip(img, quality: int):
    """``img`` ``(3, H, W)`` RGB in [0, 1] (values outside are clipped) encoded as a JPEG of ``quality``
    (1-95, PIL) and decoded: same shape and type, float32, multiples of 1/255."""
    arr = img.detach().cpu().float().numpy() if isinstance(img, torch.Tensor) else np.asarray(img, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(f"expected a channel-first RGB image (3, H, W), got shape {arr.shape}.")
    rgb = np.rint(np.clip(np.moveaxis(arr, 0, -1), 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        out = np.moveaxis(np.asarray(decoded.convert("RGB"), dtype=np.float32) / 255.0, -1, 0)
    return convert_to_dst_type(np.ascontiguousarray(out), dst=img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)[0]


class RandJPEG(RandomizableTransform):
    """JPEG compression artefacts: re-encode the image at a quality drawn uniformly from ``quality``.

    Args:
        quality: ``(low, high)`` JPEG quality range, integers in 1..95.
        prob: probability of applying it.
    """

    def __init__(self, quality: Sequence[int] = (30, 90), prob: float = 1.0):
        RandomizableTransform.__init__(self, prob)
        low, high = (int(q) for q in quality)
        if not 1 <= low <= high <= 95:
            raise ValueError(f"quality must be (low, high) with 1 <= low <= high <= 95, got {quality!r}.")
        self.quality_range = (low, high)
        self._quality = high

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._quality = int(self.R.randint(self.quality_range[0], self.quality_range[1] + 1))

    def __call__(self, img, randomize: bool = True):
        """img: ``(3, H, W)`` RGB in [0, 1]; returns the same shape and type."""
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        return jpeg_roundtrip(img, self._quality)


class RandJPEGd(_SharedDrawd):
    """Dictionary version of :class:`RandJPEG` (one quality for all keys; give it the image keys only)."""

    def __init__(self, keys: KeysCollection, quality: Sequence[int] = (30, 90), prob: float = 1.0, allow_missing_keys: bool = False):
        super().__init__(keys, RandJPEG(quality=quality, prob=1.0), prob, allow_missing_keys)
