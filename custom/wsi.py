"""Whole-slide images: reading at a magnification, tissue detection, slide lists.

A :class:`Slide` wraps MONAI's ``WSIReader`` (cuCIM backend by default, OpenSlide
as the alternative) or, for plain images (PNG, JPEG, untiled TIFF), the image
itself. Coordinates follow MONAI: ``(row, column)`` = ``(y, x)``, locations in
level-0 pixels, sizes in pixels of the level (or magnification) asked for.

Magnification and pixel size are tied by the usual microscope convention
``mpp = 10 / magnification`` (40x = 0.25 um/px, 20x = 0.5, 10x = 1.0).
A slide's level-0 pixel size comes from, in order: an explicit ``mpp`` or
``base_magnification`` given by the user, the slide's pixel size (Aperio ``MPP``,
OpenSlide ``mpp-x``, TIFF resolution in a length unit), its objective power.
A slide with none of these stops with an error that says what to pass.

Regions at a magnification are read from the nearest level that is at least as
fine and resized with antialiasing, so no level is ever loaded whole.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.transform import resize

__all__ = [
    "IMAGE_SUFFIXES",
    "SLIDE_SUFFIXES",
    "MagnificationUnavailable",
    "Slide",
    "TissueParams",
    "list_slides",
    "magnification_to_mpp",
    "mpp_to_magnification",
    "tissue_mask",
    "write_pyramidal_tiff",
]

logger = logging.getLogger(__name__)

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# Levels whose pixel size is within this relative tolerance of the one asked for are read without resizing.
MPP_RTOL = 0.02
_UNIT_TO_UM = {"micrometer": 1.0, "micron": 1.0, "um": 1.0, "µm": 1.0, "millimeter": 1e3, "mm": 1e3, "centimeter": 1e4, "cm": 1e4,
               "inch": 25400.0}


class MagnificationUnavailable(ValueError):
    """The slide has no level fine enough for the magnification asked for."""


def magnification_to_mpp(magnification: float) -> float:
    """Pixel size in um/px of an objective magnification (40x -> 0.25)."""
    if not magnification or magnification <= 0:
        raise ValueError(f"magnification must be > 0, got {magnification!r}.")
    return 10.0 / float(magnification)


def mpp_to_magnification(mpp: float) -> float:
    """Objective magnification of a pixel size in um/px (0.25 -> 40x)."""
    if not mpp or mpp <= 0:
        raise ValueError(f"mpp must be > 0, got {mpp!r}.")
    return 10.0 / float(mpp)


def _positive(value, name: str) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a positive number, got {value!r}.") from e
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    return v


def _metadata_mpp(backend: str, handle) -> tuple[float | None, str]:
    """Level-0 pixel size from a slide's own metadata, and where it came from."""
    if backend == "cucim":
        meta = handle.metadata
        aperio = meta.get("aperio", {})
        if aperio.get("MPP"):
            return float(aperio["MPP"]), "aperio MPP"
        cu = meta.get("cucim", {})
        spacing, units = cu.get("spacing") or [], cu.get("spacing_units") or []
        if len(spacing) >= 2 and len(units) >= 2 and str(units[1]).lower() in _UNIT_TO_UM and spacing[1]:
            return float(spacing[1]) * _UNIT_TO_UM[str(units[1]).lower()], f"TIFF resolution ({units[1]})"
        if aperio.get("AppMag"):
            return magnification_to_mpp(float(aperio["AppMag"])), "aperio AppMag"
        return None, ""
    if backend == "openslide":
        props = handle.properties
        if props.get("openslide.mpp-x"):
            return float(props["openslide.mpp-x"]), "openslide mpp-x"
        if props.get("openslide.objective-power"):
            return magnification_to_mpp(float(props["openslide.objective-power"])), "openslide objective-power"
        return None, ""
    return None, ""


class Slide:
    """One whole-slide image (or plain image) opened for reading regions.

    Args:
        path: the slide file (svs, tiff, ndpi, ... through the reader; png/jpg directly).
        backend: "cucim" or "openslide" (MONAI ``WSIReader`` backends). Plain images
            (png/jpg, and TIFFs the backend cannot open) are read with Pillow whatever the backend.
        mpp: level-0 pixel size in um/px, overriding the metadata.
        base_magnification: level-0 magnification, overriding the metadata (used when ``mpp`` is None).

    Attributes:
        level_dims: ``[(height, width)]`` per level, level 0 first.
        downsamples: level-0 pixels per level pixel, per level.
        mpp: level-0 um/px, or None when unknown (then :meth:`require_mpp` raises).
        mpp_source: where ``mpp`` came from.

    Raises:
        FileNotFoundError / ValueError naming the path when it cannot be opened.
    """

    def __init__(self, path: str | Path, backend: str = "cucim", mpp: float | None = None, base_magnification: float | None = None):
        self.path = Path(path)
        if backend not in ("cucim", "openslide"):
            raise ValueError(f"backend must be 'cucim' or 'openslide', got {backend!r}.")
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such slide file.")
        if self.path.stat().st_size == 0:
            raise ValueError(f"{self.path}: the file is empty.")
        self.name = self.path.stem
        self._reader = self._handle = self._array = None
        if self.path.suffix.lower() in IMAGE_SUFFIXES:
            self._open_image()
        else:
            try:
                from monai.data import WSIReader

                self._reader = WSIReader(backend=backend)
                self._handle = self._reader.read(str(self.path))
                self.backend = backend
            except Exception as e:  # noqa: BLE001 - the backends raise many types for unreadable files
                if self.path.suffix.lower() not in (".tif", ".tiff"):
                    raise ValueError(f"{self.path}: cannot be opened as a whole-slide image with {backend} ({type(e).__name__}: {e}).") from e
                self._open_image()  # untiled TIFF: not a pyramid, read as an image
        if self.backend == "image":
            self.level_dims = [tuple(self._array.shape[:2])]
            self.downsamples = [1.0]
        else:
            n = self._reader.get_level_count(self._handle)
            self.level_dims = [tuple(int(v) for v in self._reader.get_size(self._handle, lv)) for lv in range(n)]
            self.downsamples = [self.level_dims[0][1] / dims[1] for dims in self.level_dims]
        user_mpp = _positive(mpp, "mpp")
        user_mag = _positive(base_magnification, "base_magnification")
        if user_mpp is not None:
            self.mpp, self.mpp_source = user_mpp, "mpp given"
        elif user_mag is not None:
            self.mpp, self.mpp_source = magnification_to_mpp(user_mag), "base_magnification given"
        else:
            self.mpp, self.mpp_source = _metadata_mpp(self.backend, self._handle)

    def _open_image(self) -> None:
        try:
            with Image.open(self.path) as im:
                if im.mode not in ("RGB", "RGBA", "L", "P", "LA"):
                    raise ValueError(f"image mode {im.mode} (expected 8-bit RGB, RGBA or grayscale)")
                self._array = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{self.path}: cannot be read as an image ({e}).") from e
        self.backend = "image"

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 ``(height, width)`` in pixels."""
        return self.level_dims[0]

    def require_mpp(self) -> float:
        """Level-0 um/px; raises a ValueError saying what to pass when it is unknown."""
        if self.mpp is None:
            raise ValueError(
                f"{self.path}: the slide's pixel size is unknown (no mpp or objective power in its metadata). "
                "Pass --mpp (level-0 micrometres per pixel, e.g. 0.25) or --base_magnification (e.g. 40)."
            )
        return self.mpp

    def level_mpp(self, level: int) -> float:
        """um/px of a level."""
        return self.require_mpp() * self.downsamples[level]

    def level_for(self, target_mpp: float, allow_upsample: bool = False) -> int:
        """The coarsest level at least as fine as ``target_mpp`` (within ``MPP_RTOL``).

        Raises:
            MagnificationUnavailable: when even level 0 is coarser and ``allow_upsample`` is False.
        """
        candidates = [lv for lv in range(len(self.level_dims)) if self.level_mpp(lv) <= target_mpp * (1 + MPP_RTOL)]
        if candidates:
            return max(candidates, key=lambda lv: self.level_mpp(lv))
        if allow_upsample:
            return 0
        raise MagnificationUnavailable(
            f"{self.path}: no level at {mpp_to_magnification(target_mpp):g}x ({target_mpp:g} um/px); "
            f"the finest is {mpp_to_magnification(self.level_mpp(0)):g}x ({self.level_mpp(0):.4g} um/px, {self.mpp_source})."
        )

    def read_level(self, location: tuple[int, int], size: tuple[int, int], level: int = 0) -> np.ndarray:
        """Pixels of one level: uint8 ``(3, h, w)`` RGB.

        Args:
            location: ``(y, x)`` of the top-left corner in level-0 pixels, inside the slide.
            size: ``(h, w)`` in pixels of ``level``; the region must lie inside the level.
        """
        y, x = (int(v) for v in location)
        h, w = (int(v) for v in size)
        lh, lw = self.level_dims[level]
        ds = self.downsamples[level]
        ly, lx = int(y / ds), int(x / ds)
        if h <= 0 or w <= 0 or y < 0 or x < 0 or ly + h > lh or lx + w > lw:
            raise ValueError(f"{self.path}: region {h}x{w} at level-0 ({y}, {x}) is outside level {level} ({lh}x{lw}).")
        if self.backend == "image":
            return np.ascontiguousarray(np.moveaxis(self._array[y : y + h, x : x + w], -1, 0))
        try:
            patch, _ = self._reader.get_data(self._handle, location=(y, x), size=(h, w), level=level, mode="RGB")
        except Exception as e:  # noqa: BLE001 - corrupt tiles surface as backend-specific errors
            raise ValueError(f"{self.path}: reading {h}x{w} at ({y}, {x}) level {level} failed ({type(e).__name__}: {e}).") from e
        patch = np.asarray(patch)
        if patch.shape[0] == 4:
            patch = patch[:3]
        return np.ascontiguousarray(patch.astype(np.uint8, copy=False))

    def scale_to_level0(self, target_mpp: float) -> float:
        """Level-0 pixels per pixel at ``target_mpp``."""
        return target_mpp / self.require_mpp()

    def size_at(self, target_mpp: float) -> tuple[int, int]:
        """Slide ``(height, width)`` in pixels at ``target_mpp`` (floored)."""
        f = self.scale_to_level0(target_mpp)
        return int(self.shape[0] / f), int(self.shape[1] / f)

    def read(self, location: tuple[int, int], size: tuple[int, int], target_mpp: float, allow_upsample: bool = False) -> np.ndarray:
        """A region at a pixel size: uint8 ``(3, h, w)`` RGB.

        Args:
            location: ``(y, x)`` top-left in pixels AT ``target_mpp`` (the analysis grid).
            size: ``(h, w)`` at ``target_mpp``; must fit in :meth:`size_at`.
            target_mpp: um/px wanted (see :func:`magnification_to_mpp`).
            allow_upsample: read from level 0 and enlarge when the slide is coarser than asked.
        """
        level = self.level_for(target_mpp, allow_upsample)
        f = self.scale_to_level0(target_mpp)  # level-0 px per target px
        ds = self.downsamples[level]
        ty, tx = location
        h, w = size
        y0, x0 = int(round(ty * f)), int(round(tx * f))
        lh, lw = self.level_dims[level]
        scale = f / ds  # level px per target px
        if abs(scale - 1.0) <= MPP_RTOL and abs(round(h * scale) - h) <= 1:
            rh, rw = h, w
        else:
            rh, rw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        # clip to the level (rounding can overshoot by a pixel at the far edge)
        y0, x0 = min(y0, int((lh - rh) * ds)), min(x0, int((lw - rw) * ds))
        if y0 < 0 or x0 < 0:
            raise ValueError(f"{self.path}: region {h}x{w} at {mpp_to_magnification(target_mpp):g}x does not fit in the slide.")
        region = self.read_level((y0, x0), (rh, rw), level)
        if (rh, rw) == (h, w):
            return region
        out = resize(region, (3, h, w), order=1, anti_aliasing=scale > 1, preserve_range=True)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def thumbnail(self, max_size: int = 2048) -> tuple[np.ndarray, float]:
        """A low-resolution RGB picture ``(H, W, 3)`` uint8 with long side <= ``max_size``,
        read by regions, and its downsample factor (level-0 px per thumbnail px)."""
        h0, w0 = self.shape
        factor = max(1.0, max(h0, w0) / max_size)
        th, tw = max(1, int(h0 / factor)), max(1, int(w0 / factor))
        level = max((lv for lv, ds in enumerate(self.downsamples) if ds <= factor * (1 + MPP_RTOL)), default=0)
        lh, lw = self.level_dims[level]
        out = np.zeros((th, tw, 3), np.uint8)
        chunk = 2048  # level pixels per read: bounded memory however large the level is
        ratio = th / lh
        for ly in range(0, lh, chunk):
            for lx in range(0, lw, chunk):
                ch, cw = min(chunk, lh - ly), min(chunk, lw - lx)
                oy0, oy1 = int(round(ly * ratio)), int(round((ly + ch) * ratio))
                ox0, ox1 = int(round(lx * tw / lw)), int(round((lx + cw) * tw / lw))
                if oy1 <= oy0 or ox1 <= ox0:
                    continue
                ds = self.downsamples[level]
                region = self.read_level((int(ly * ds), int(lx * ds)), (ch, cw), level)
                small = resize(region, (3, oy1 - oy0, ox1 - ox0), order=1, anti_aliasing=True, preserve_range=True)
                out[oy0:oy1, ox0:ox1] = np.moveaxis(np.clip(np.rint(small), 0, 255).astype(np.uint8), 0, -1)
        return out, h0 / th

    def close(self) -> None:
        """Release the backend handle."""
        handle, self._handle = self._handle, None
        if handle is not None and hasattr(handle, "close"):
            handle.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mag = f"{mpp_to_magnification(self.mpp):g}x" if self.mpp else "unknown magnification"
        return f"Slide({self.path.name}, {self.backend}, {len(self.level_dims)} levels, {self.shape[0]}x{self.shape[1]}, {mag})"


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection in HSV on a low-resolution picture of the slide.

    A pixel is tissue when its saturation >= ``min_saturation`` and its value
    (brightness) is within [``min_value``, ``max_value``] (background glass is bright
    and grey; pen and dirt are dark). The mask is then closed, holes are filled and
    pieces smaller than ``min_area_um2`` are dropped.

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
    min_pixels = params.min_area_um2 / (factor * slide.require_mpp()) ** 2
    if min_pixels > 1:
        labels, n = ndimage.label(mask)
        if n:
            sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
            mask = np.isin(labels, 1 + np.flatnonzero(sizes >= min_pixels))
    return mask, factor


def list_slides(source: str | Path | Sequence[str | Path], suffixes: Sequence[str] = SLIDE_SUFFIXES + IMAGE_SUFFIXES) -> list[Path]:
    """Slide files from a folder, a CSV, a single file or a list.

    Args:
        source: a slide file; a folder (its files with a slide or image suffix, sorted;
            a prepared dataset's ``images/`` folder is used when present); a ``.csv`` with a
            ``path`` (or ``slide``) column, relative paths taken from the CSV's folder;
            or a list of any of these.
        suffixes: accepted file suffixes (lower case) for folders.

    Raises:
        FileNotFoundError / ValueError naming the source when it gives no slide.
    """
    if source is None or (isinstance(source, str) and not source.strip()):
        raise ValueError("no input given: pass --input with a slide, a folder of slides or images, or a CSV of slide paths.")
    if isinstance(source, (list, tuple)):
        out: list[Path] = []
        for s in source:
            out.extend(list_slides(s, suffixes))
        if not out:
            raise ValueError("the slide list is empty.")
        return out
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such slide, folder or CSV.")
    if path.is_dir():
        folder = path / "images" if (path / "images").is_dir() else path
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
        if not found:
            raise FileNotFoundError(f"{folder}: no slides or images (looked for {', '.join(suffixes)}).")
        return found
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        column = next((c for c in ("path", "slide", "file") if rows and c in rows[0]), None)
        if column is None:
            raise ValueError(f"{path}: a slide CSV needs a 'path' column (got {list(rows[0]) if rows else 'no rows'}).")
        out = [(p if p.is_absolute() else path.parent / p) for p in (Path(r[column]) for r in rows if r[column])]
        missing = [str(p) for p in out if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: {len(missing)} listed slides do not exist, e.g. {missing[:3]}.")
        if not out:
            raise ValueError(f"{path}: lists no slides.")
        return out
    return [path]


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
