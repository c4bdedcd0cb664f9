"""Test helper: synthetic pyramidal TIFF slides (tiled, with resolution tags) that cuCIM and OpenSlide read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_pyramidal_tiff(path: str | Path, image: np.ndarray, mpp: float, levels: int = 3, tile: int = 256, compression: str | None = "zlib") -> Path:
    """Write an RGB image as a tiled pyramidal TIFF readable by cuCIM and OpenSlide.

    Args:
        path: output file (``.tiff``).
        image: ``(H, W, 3)`` uint8, level 0.
        mpp: level-0 pixel size in um/px (stored as TIFF resolution in centimetres).
        levels: number of levels, each half the size of the previous one.
        tile: tile size in pixels (a multiple of 16).
        compression: tifffile compression ("zlib", None, ...).
    """
    import tifffile

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.dtype} {image.shape}.")
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    level = image
    with tifffile.TiffWriter(tmp) as tw:
        for i in range(levels):
            res = 1e4 / (mpp * 2**i)  # pixels per centimetre
            tw.write(level, tile=(tile, tile), compression=compression, photometric="rgb", resolution=(res, res),
                     resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1)
            if i + 1 < levels:
                h, w = level.shape[0] // 2, level.shape[1] // 2
                level = np.asarray(Image.fromarray(level).resize((w, h), Image.BILINEAR, reducing_gap=2.0))
    tmp.replace(path)
    return path
