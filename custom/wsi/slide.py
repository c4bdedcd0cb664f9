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

Which reader opens a file (see :class:`Slide`):

* whole-slide formats (svs, ndpi, ...) and tiled 8-bit RGB TIFFs: the backend (cuCIM or OpenSlide);
* untiled (stripped) ``.tif``/``.tiff`` files, those that are not 8-bit RGB (16-bit, RGBA, CMYK,
  palette) and those with separate colour planes (which cuCIM misreads): tifffile, by regions
  (the backends cannot read these by regions, or at all): only the strips or tiles that overlap a region
  are read and decoded (uncompressed contiguous data is memory-mapped), with a
  bounded cache of decoded segments (:data:`TIFF_CACHE_BYTES`), so a TIFF of any
  size can be segmented;
* PNG, JPEG and BMP: Pillow, which can only decode them whole, so they are refused
  above :data:`MAX_WHOLE_IMAGE_PIXELS` with an error that says how to convert them
  to a tiled pyramidal TIFF.

Bad inputs stop with a :class:`SlideError` that names the file, says what is wrong
and what to do: missing, empty, unsupported suffix, not a TIFF although named
``.svs``/``.tif``, damaged TIFF structure, truncated data (offsets past the end of
the file), corrupt tiles (cuCIM returns undecodable JPEG and deflate tiles black
without an error, so the headers of up to :data:`HEADER_CHECKS_PER_PAGE` tiles per
page are checked when the slide is opened; damage inside a tile with a valid header
is only reported by ``--backend openslide``, when it is read), an image too large
to read whole, grayscale pixels (H&E segmentation needs colour), pixel formats
that cannot be made RGB. Pixel formats that can be made RGB without guessing are
converted with a logged warning: RGBA and palette transparency are composited on
white (glass), 16-bit channels keep their high byte, CMYK and palette images
become RGB.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.transform import resize

__all__ = ['IMAGE_SUFFIXES', 'MAX_WHOLE_IMAGE_PIXELS', 'SLIDE_SUFFIXES', 'TIFF_CACHE_BYTES', 'MagnificationUnavailable', 'SlideError', 'SlideNotFoundError', 'Slide', 'list_slides', 'magnification_to_mpp', 'mpp_to_magnification']


logger = logging.getLogger(__name__)


SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


# Slide formats that are TIFF files: their structure is checked with tifffile before a backend opens them.
TIFF_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif")
_PLAIN_TIFF_SUFFIXES = (".tif", ".tiff")
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


# Images that can only be decoded whole (PNG, JPEG, BMP) are refused above this many pixels (~ 8900 x 8900;
# 240 MB as 8-bit RGB, plus the instance map written for plain images). Below Pillow's decompression-bomb warning.
MAX_WHOLE_IMAGE_PIXELS = 80_000_000


# Decoded strips/tiles kept per open TIFF read with tifffile (a window row of a wide stripped image reuses them).
TIFF_CACHE_BYTES = 128 * 2**20


# Tiles whose header bytes are checked per TIFF page when a JPEG / JPEG 2000 slide is opened (evenly spread).
HEADER_CHECKS_PER_PAGE = 1024


_WARNED: set[tuple[str, str]] = set()  # (file, conversion) already logged


# Level-0 pixel sizes outside this range (um/px) are not microscope pixels (e.g. a 72 dpi screen resolution): ignored.
PLAUSIBLE_MPP = (0.05, 50.0)


# Levels whose pixel size is within this relative tolerance of the one asked for are read without resizing.
MPP_RTOL = 0.02
_UNIT_TO_UM = {"micrometer": 1.0, "micron": 1.0, "um": 1.0, "µm": 1.0, "millimeter": 1e3, "mm": 1e3, "centimeter": 1e4, "cm": 1e4,
               "inch": 25400.0}


class SlideError(ValueError):
    """A slide or image that cannot be used. The message starts with the file's path,
    says what is wrong with it and what to do."""


class SlideNotFoundError(SlideError, FileNotFoundError):
    """A slide, folder or CSV that does not exist."""


class MagnificationUnavailable(SlideError):
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
    """``value`` of the option ``--name`` as a positive number, or None. A decimal comma is refused
    with the option's name: the command line (Fire) reads ``--mpp 0,25`` as the pair ``(0, 25)``."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(type(v) is int and v >= 0 for v in value):
        value = f"{value[0]},{value[1]}"
    if isinstance(value, str) and "," in value:
        raise ValueError(f"--{name}: {value!r} is not a number (use a decimal point: {value.strip().replace(',', '.')}).")
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan  # raised below, outside this handler: the message is the root cause, not float()'s
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"--{name} must be a positive number, got {value!r}.")
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


def _plausible_mpp(mpp: float | None, source: str, path: Path) -> tuple[float | None, str]:
    """The metadata pixel size, or None when it cannot be a microscope's (e.g. 72 dpi)."""
    if mpp is None or PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        return mpp, source
    logger.warning("%s: ignoring the pixel size %.4g um/px from its %s (not a microscope's; a screen resolution such as 72 dpi?).",
                   path, mpp, source)
    return None, ""


_RESOLUTION_UNITS = {2: ("inch", 25400.0), 3: ("centimeter", 1e4), 4: ("millimeter", 1e3), 5: ("micrometer", 1.0)}


def _tiff_mpp(page) -> tuple[float | None, str]:
    """Level-0 pixel size from a TIFF page's resolution tags (None without a length unit)."""
    unit = int(getattr(page, "resolutionunit", 1) or 1)
    xres = (getattr(page, "resolution", None) or (0, 0))[0]
    if unit not in _RESOLUTION_UNITS or not xres:
        return None, ""
    name, um = _RESOLUTION_UNITS[unit]
    return um / float(xres), f"TIFF resolution ({name})"


def _file_kind(head: bytes) -> str:
    """What a file looks like from its first bytes, for error messages."""
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8"):
        return "a JPEG image"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive or an office document"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return "not a TIFF"


def _zlib_header(b: bytes) -> bool:
    return len(b) >= 2 and b[0] & 0x0F == 8 and (b[0] << 8 | b[1]) % 31 == 0


def _j2k_header(b: bytes) -> bool:
    return b.startswith(b"\xff\x4f\xff\x51") or b[4:8] == b"jP  "


# How the segments of a TIFF compression start: (name, check of the first 8 bytes). Every segment
# of these codecs starts so; cuCIM returns undecodable JPEG and deflate tiles black without an error.
_SEGMENT_HEADERS = {
    5: ("LZW", lambda b: b[:1] == b"\x80" or (b[:1] == b"\0" and len(b) > 1 and b[1] & 1)),  # a Clear code first (or its old bit order)
    7: ("JPEG", lambda b: b.startswith(b"\xff\xd8")),
    8: ("deflate", _zlib_header),
    32946: ("deflate", _zlib_header),
    33003: ("JPEG 2000", _j2k_header),
    33005: ("JPEG 2000", _j2k_header),
    34712: ("JPEG 2000", _j2k_header),
    50000: ("Zstandard", lambda b: b.startswith(b"\x28\xb5\x2f\xfd")),
}


class _DamagedTiff(SlideError):
    """tifffile cannot parse the TIFF directories (a backend may still open the file)."""


def _open_tiff(path: Path):
    """Open a TIFF-based slide with tifffile and check its structure without decoding pixels.

    Checks: a TIFF header, readable directories, image data inside the file (a
    truncated copy has offsets past its end), and the first bytes of up to
    :data:`HEADER_CHECKS_PER_PAGE` segments per page (strips or tiles, evenly spread)
    for the compressions whose segments start with a known header (JPEG, JPEG 2000,
    deflate, LZW, Zstandard).

    Returns:
        an open ``tifffile.TiffFile`` (the caller closes it).

    Raises:
        SlideError naming the path and the damage.
    """
    import tifffile

    with path.open("rb") as f:
        head = f.read(8)
    if head[:4] not in _TIFF_MAGIC:
        raise SlideError(f"{path}: not a valid {path.suffix} slide: {path.suffix} files are TIFF files, but this one starts with "
                         f"{head[:8]!r} ({_file_kind(head)}). Check that it is the right file, or copy the slide again.")
    quiet = logging.getLogger("tifffile")  # it logs damaged directories as errors; the SlideError below says it all
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        tif = tifffile.TiffFile(path)
        pages = list(tif.pages)
    except Exception as e:  # noqa: BLE001 - tifffile raises many types for damaged directories
        raise _DamagedTiff(f"{path}: the file is damaged: its TIFF structure cannot be read ({type(e).__name__}: {e}). "
                           "It is probably truncated or corrupt (an incomplete copy or download?): copy the slide again.") from e
    finally:
        quiet.setLevel(level)
    if not pages:
        tif.close()
        raise SlideError(f"{path}: the file is damaged: its TIFF header points to no readable image directory "
                         f"({path.stat().st_size:,} bytes). It is probably truncated or corrupt (an incomplete copy or download?): "
                         "copy the slide again.")
    try:
        size = path.stat().st_size
        fh = tif.filehandle
        for page in pages:
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            if len(offsets) == 0:
                continue
            end = int((offsets + counts).max())
            if end > size:
                raise SlideError(f"{path}: the file is truncated: the image data of its page {page.index} ({page.imagelength}x{page.imagewidth}) "
                                 f"runs to byte {end:,} but the file has {size:,} bytes (an incomplete copy or download?). Copy the slide again.")
            if int(page.compression) in _SEGMENT_HEADERS and (counts > 1).any():
                name, valid = _SEGMENT_HEADERS[int(page.compression)]
                present = np.flatnonzero(counts > 1)
                picks = present[np.unique(np.linspace(0, len(present) - 1, min(HEADER_CHECKS_PER_PAGE, len(present))).round().astype(int))]
                bad = sum(not valid(head or b"") for head, _ in fh.read_segments(offsets[picks], np.minimum(counts[picks], 8), lock=fh.lock))
                if bad:
                    raise SlideError(f"{path}: the file is corrupt: {bad} of {len(picks)} {name} tiles checked on its page {page.index} "
                                     f"({page.imagelength}x{page.imagewidth}) do not start with a {name} header. Copy the slide again.")
    except BaseException:
        tif.close()
        raise
    return tif


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray, associated: bool = False) -> np.ndarray:
    """``(h, w, 3)`` uint8 RGB of RGB + alpha (uint8) over white: transparent pixels become glass."""
    a = alpha.astype(np.float32)[..., None] / 255.0
    c = rgb.astype(np.float32)
    out = c + 255.0 * (1 - a) if associated else c * a + 255.0 * (1 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """``(h, w, 3)`` uint8 RGB of uint8 CMYK ``(h, w, 4)``: ``R = (255 - C) (255 - K) / 255`` (Pillow's rule)."""
    c = cmyk.astype(np.float32)
    k = 255.0 - c[..., 3:4]
    return np.clip(np.rint((255.0 - c[..., :3]) * k / 255.0), 0, 255).astype(np.uint8)


def _too_large(path: Path, size: str) -> SlideError:
    """The error for a PNG/JPEG/BMP above :data:`MAX_WHOLE_IMAGE_PIXELS`; ``size`` describes it."""
    return SlideError(
        f"{path}: the image is {size}; {path.suffix.lstrip('.').upper()} images can only be decoded whole, and the limit is "
        f"{MAX_WHOLE_IMAGE_PIXELS / 1e6:.0f} megapixels. Convert it to a tiled pyramidal TIFF, which is read by regions, and segment "
        f"that: `vips tiffsave {path.name} {path.stem}.tif --tile --pyramid --compression deflate --tile-width 256 --tile-height 256`.")


class _UndecodableTiff(SlideError):
    """A TIFF compression tifffile cannot decode here (no imagecodecs)."""


def _grayscale(path: Path, what: str) -> SlideError:
    return SlideError(f"{path}: the image is grayscale ({what}); H&E nucleus segmentation needs the colour image (the network and "
                      "the tissue detection use the stain colours). Segment the original RGB image.")


def _decode_segment(pages: list, fh, level: int, index: int) -> np.ndarray | None:
    """Strip or tile ``index`` of ``pages[level]`` decoded by tifffile: ``(depth, length, width, contig)``, None when empty."""
    page, count = pages[level], int(pages[level].databytecounts[index])
    with fh.lock:
        fh.seek(int(page.dataoffsets[index]))
        data = fh.read(count) if count else None
    segment, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
    return None if segment is None else segment.reshape(shape)


class _TiffRegions:
    """Regions of a TIFF read with tifffile: only the strips or tiles overlapping a region are
    read and decoded by tifffile (``TiffPage.decode``; kept in an LRU cache of about
    :data:`TIFF_CACHE_BYTES`); data that tifffile can memory-map is memory-mapped. Pixels are
    converted to 8-bit RGB (see :class:`Slide`).

    tifffile reads a region without decoding the whole page only through Zarr (``aszarr``), which
    is not a dependency; MONAI's ``TiffFileWSIReader`` decodes the whole level for every patch.

    Args:
        path: the TIFF.
        tif: its open ``tifffile.TiffFile`` (checked by :func:`_open_tiff`; closed by :meth:`close`).

    Attributes:
        pages: the level pages, level 0 first. conversion: a description of the pixel conversion, or "".
        level_dims: ``[(height, width)]`` per level.

    Raises:
        SlideError when the pixels cannot be decoded by regions or made RGB.
    """

    def __init__(self, path: Path, tif):
        import tifffile

        self.path, self.tif = path, tif
        series = tif.series[0] if tif.series else None
        levels = [lv.keyframe for lv in series.levels] if series is not None else [tif.pages[0]]
        page = levels[0]
        if page.shaped[1] != 1:
            raise SlideError(f"{path}: a volumetric TIFF ({page.shaped[1]} planes deep) is not a slide; save one plane as an RGB image.")
        # levels are plain 2-D images of the same pixel format as level 0
        self.pages = [page] + [pg for pg in levels[1:] if pg.shaped[1] == 1 and pg.samplesperpixel == page.samplesperpixel
                               and pg.photometric == page.photometric and pg.dtype == page.dtype]
        self.level_dims = [(int(pg.imagelength), int(pg.imagewidth)) for pg in self.pages]
        self.conversion, self._convert = self._conversion(page)
        largest = 1  # bytes of the largest decoded segment
        for level, pg in enumerate(self.pages):
            # a compressed strip or tile is decoded whole: one spanning the image is the whole level
            seg = int(pg.tilelength) * int(pg.tilewidth) if pg.is_tiled else min(int(pg.rowsperstrip or pg.imagelength), int(pg.imagelength)) * int(pg.imagewidth)
            largest = max(largest, seg * int(pg.shaped[-1]) * np.dtype(pg.dtype).itemsize)
            if pg.compression != 1 and seg > MAX_WHOLE_IMAGE_PIXELS:
                raise SlideError(
                    f"{path}: level {level} is stored in compressed {'tiles' if pg.is_tiled else 'strips'} of {seg / 1e6:.0f} megapixels, "
                    f"which can only be decoded whole (the limit is {MAX_WHOLE_IMAGE_PIXELS / 1e6:.0f} megapixels). Convert it to a tiled "
                    "pyramidal TIFF (vips tiffsave in.tif out.tif --tile --pyramid --compression jpeg)."
                )
            if pg.compression != 1:
                try:
                    tifffile.TIFF.DECOMPRESSORS[pg.compression]
                except KeyError as e:
                    raise _UndecodableTiff(f"{path}: its {tifffile.COMPRESSION(pg.compression).name} compression cannot be decoded here "
                                     f"({str(e).strip(chr(39))}): install imagecodecs (pip install imagecodecs), or convert it to a tiled "
                                     "pyramidal TIFF (vips tiffsave --tile --pyramid).") from e
        self._segment = functools.lru_cache(max(1, TIFF_CACHE_BYTES // largest))(functools.partial(_decode_segment, self.pages, tif.filehandle))
        self._memmaps = [pg.asarray(out="memmap", squeeze=False) if pg.is_memmappable else None for pg in self.pages]

    def _conversion(self, page) -> tuple[str, callable]:
        """(description, function from a normalised ``(samples, h, w, contig)`` region to uint8 ``(h, w, 3)``)."""
        photometric, spp, dtype = int(page.photometric), int(page.samplesperpixel), np.dtype(page.dtype)
        what = f"{page.bitspersample}-bit {page.photometric.name}, {spp} samples per pixel"
        if photometric in (0, 1) or (photometric == 3 and spp > 1) or (photometric == 2 and spp < 3):
            if photometric in (0, 1) and spp == 1:
                raise _grayscale(self.path, f"TIFF {what}")
            raise SlideError(f"{self.path}: unsupported pixel format (TIFF {what}); convert it to 8-bit RGB.")
        if dtype not in (np.uint8, np.uint16) or (photometric == 3 and dtype != np.uint8 and page.bitspersample > 8):
            raise SlideError(f"{self.path}: unsupported pixel format (TIFF {what}, {dtype}); convert it to 8-bit RGB.")
        notes = []
        depth = (lambda a: (a >> 8).astype(np.uint8)) if dtype == np.uint16 and photometric != 3 else (lambda a: a)
        if dtype == np.uint16 and photometric != 3:
            notes.append("16 bits per channel reduced to 8 (the high byte)")
        extras = list(page.extrasamples or ())
        if photometric == 2:  # RGB
            alpha = 3 if spp >= 4 and extras and int(extras[0]) in (1, 2) else None
            if alpha is not None:
                notes.append("alpha composited on white")
                associated = int(extras[0]) == 1
                return f"TIFF {what}: " + ", ".join(notes), lambda r: _composite_on_white(depth(r[..., :3]), depth(r[..., 3]), associated)
            if spp > 3:
                notes.append(f"{spp - 3} extra samples dropped")
            return (f"TIFF {what}: " + ", ".join(notes)) if notes else "", lambda r: np.ascontiguousarray(depth(r[..., :3]))
        if photometric == 3:  # palette
            cmap = np.asarray(page.colormap)
            lut = (cmap.T >> 8).astype(np.uint8) if cmap.max() > 255 else cmap.T.astype(np.uint8)
            if (lut[:, 0] == lut[:, 1]).all() and (lut[:, 1] == lut[:, 2]).all():
                raise _grayscale(self.path, f"TIFF {what} with a gray palette")
            return f"TIFF {what}: palette colours looked up", lambda r: lut[r[..., 0]]
        if photometric == 5 and spp >= 4 and int(getattr(page, "inkset", 1) or 1) == 1:  # CMYK
            notes.append("CMYK converted to RGB")
            return f"TIFF {what}: " + ", ".join(notes), lambda r: _cmyk_to_rgb(depth(r[..., :4]))
        if photometric == 6 and page.compression in (6, 7):  # YCbCr JPEG: the decoder returns RGB
            return "", lambda r: np.ascontiguousarray(depth(r[..., :3]))
        raise SlideError(f"{self.path}: unsupported pixel format (TIFF {what}); convert it to 8-bit RGB.")

    def _region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Raw samples of a region: ``(separate samples, h, w, contig samples)`` in the page's dtype."""
        page = self.pages[level]
        planes, _, height, width, contig = page.shaped
        if self._memmaps[level] is not None:
            return np.asarray(self._memmaps[level][:, 0, y : y + h, x : x + w, :], dtype=page.dtype)
        seg_h, seg_w = (page.tilelength, page.tilewidth) if page.is_tiled else (min(int(page.rowsperstrip), height), width)
        down, across = -(-height // seg_h), -(-width // seg_w)
        out = np.zeros((planes, h, w, contig), page.dtype)
        for s in range(planes):
            for ty in range(y // seg_h, (y + h - 1) // seg_h + 1):
                for tx in range(x // seg_w, (x + w - 1) // seg_w + 1):
                    segment = self._segment(level, (s * down + ty) * across + tx)
                    if segment is None:
                        continue
                    sy0, sx0 = ty * seg_h, tx * seg_w
                    y0, y1 = max(y, sy0), min(y + h, sy0 + segment.shape[1])
                    x0, x1 = max(x, sx0), min(x + w, sx0 + segment.shape[2])
                    if y1 > y0 and x1 > x0:
                        out[s, y0 - y : y1 - y, x0 - x : x1 - x] = segment[0, y0 - sy0 : y1 - sy0, x0 - sx0 : x1 - sx0]
        return out

    def read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """uint8 RGB ``(h, w, 3)`` of a region in pixels of ``level`` (inside the level)."""
        raw = self._region(level, y, x, h, w)
        raw = np.moveaxis(raw, 0, -2).reshape(h, w, -1) if raw.shape[0] > 1 else raw[0]  # separate planes -> samples last
        return self._convert(raw)

    def close(self) -> None:
        self._memmaps.clear()
        self._segment.cache_clear()
        self.tif.close()


class Slide:
    """One whole-slide image (or plain image) opened for reading regions.

    Args:
        path: the slide file: a whole-slide format or a TIFF (through the backend or tifffile,
            see the module docstring), or a PNG/JPEG/BMP image (Pillow, whole, at most
            :data:`MAX_WHOLE_IMAGE_PIXELS`).
        backend: "cucim" or "openslide" (MONAI ``WSIReader`` backends) for whole-slide formats
            and tiled 8-bit RGB TIFFs; other files are read the same way whatever the backend.
        mpp: level-0 pixel size in um/px, overriding the metadata.
        base_magnification: level-0 magnification, overriding the metadata (used when ``mpp`` is None).

    Attributes:
        backend: the reader used: "cucim", "openslide", "tifffile" or "image" (Pillow).
        level_dims: ``[(height, width)]`` per level, level 0 first.
        downsamples: level-0 pixels per level pixel, per level.
        mpp: level-0 um/px, or None when unknown (then :meth:`require_mpp` raises).
        mpp_source: where ``mpp`` came from.
        is_image: a plain picture (one level, not tiled, at most :data:`MAX_WHOLE_IMAGE_PIXELS`):
            its outputs include an instance map.
        conversion: how the pixels were made 8-bit RGB ("" when they are), also logged as a warning.

    Raises:
        SlideError (SlideNotFoundError for a missing file) naming the path, what is wrong and what to do.
    """

    def __init__(self, path: str | Path, backend: str = "cucim", mpp: float | None = None, base_magnification: float | None = None):
        self.path = Path(path)
        if backend not in ("cucim", "openslide"):
            raise ValueError(f"backend must be 'cucim' or 'openslide', got {backend!r}.")
        user_mpp = _positive(mpp, "mpp")
        user_mag = _positive(base_magnification, "base_magnification")
        self.name = self.path.stem
        self._reader = self._handle = self._array = self._tiff = None
        self.conversion = ""
        self.is_image = False
        self._open(backend)
        if self.conversion and (str(self.path.resolve()), self.conversion) not in _WARNED:  # once per file and process
            _WARNED.add((str(self.path.resolve()), self.conversion))
            logger.warning("%s: %s.", self.path, self.conversion)
        if self.backend in ("image", "tifffile"):
            self.level_dims = [tuple(self._array.shape[:2])] if self.backend == "image" else list(self._tiff.level_dims)
        else:
            n = self._reader.get_level_count(self._handle)
            self.level_dims = [tuple(int(v) for v in self._reader.get_size(self._handle, lv)) for lv in range(n)]
        self.downsamples = [self.level_dims[0][1] / dims[1] for dims in self.level_dims]
        if user_mpp is not None:
            self.mpp, self.mpp_source = user_mpp, "mpp given"
        elif user_mag is not None:
            self.mpp, self.mpp_source = magnification_to_mpp(user_mag), "base_magnification given"
        elif self.backend == "tifffile":
            self.mpp, self.mpp_source = _plausible_mpp(*_tiff_mpp(self._tiff.pages[0]), self.path)
        else:
            self.mpp, self.mpp_source = _plausible_mpp(*_metadata_mpp(self.backend, self._handle), self.path)

    def _open(self, backend: str) -> None:
        """Check the file and open it with the right reader (sets ``backend`` and the handle)."""
        path, suffix = self.path, self.path.suffix.lower()
        if not path.exists():
            raise SlideNotFoundError(f"{path}: no such file. Check the path (relative paths start from the current folder).")
        if not path.is_file():
            raise SlideError(f"{path}: not a file (a folder?). Give a slide or image file, or the folder as the input to segment all of its slides.")
        if path.stat().st_size == 0:
            raise SlideError(f"{path}: the file is empty (0 bytes), probably an incomplete copy or download: copy it again.")
        if suffix not in SLIDE_SUFFIXES + IMAGE_SUFFIXES:
            raise SlideError(f"{path}: unsupported file type '{path.suffix}': give a whole-slide image ({', '.join(SLIDE_SUFFIXES)}) "
                             f"or an image ({', '.join(IMAGE_SUFFIXES)}).")
        if suffix in IMAGE_SUFFIXES:
            self._open_image()
            return
        undecodable = None
        try:
            tif = _open_tiff(path) if suffix in TIFF_SUFFIXES else None
        except _DamagedTiff as e:  # tifffile cannot parse it: the backend decides, with this error if it cannot either
            tif, undecodable = None, e
        if tif is not None:
            page = tif.pages[0]
            # cuCIM misreads tiles stored as separate colour planes (planar configuration 2): tifffile reads those
            rgb8 = int(page.photometric) in (2, 6) and page.samplesperpixel == 3 and np.dtype(page.dtype) == np.uint8 and int(page.planarconfig) == 1
            if (page.is_tiled and rgb8) or suffix not in _PLAIN_TIFF_SUFFIXES:  # a whole-slide format or tiled RGB: the backend
                tif.close()
            else:  # an untiled or non-RGB8 plain TIFF: tifffile, by regions
                self.is_image = not page.is_tiled and len(tif.pages) == 1 and page.imagelength * page.imagewidth <= MAX_WHOLE_IMAGE_PIXELS
                try:
                    self._tiff, self.backend = _TiffRegions(path, tif), "tifffile"
                    self.conversion = self._tiff.conversion
                    return
                except _UndecodableTiff as e:
                    tif.close()
                    if self.is_image:
                        logger.info("%s Reading it whole with Pillow instead.", e)
                        self._open_image()
                        return
                    undecodable = e  # a large TIFF: the backend may read it
                except BaseException:
                    tif.close()
                    raise
        try:
            from monai.data import WSIReader

            self._reader = WSIReader(backend=backend)
            self._handle = self._reader.read(str(path))
            self.backend = backend
            if undecodable is not None:
                logger.warning("%s (%s opens it: its structure was not checked.)", undecodable, backend)
        except Exception as e:  # noqa: BLE001 - the backends raise many types for unreadable files
            if undecodable is not None:
                raise undecodable from e
            other = "openslide" if backend == "cucim" else "cucim"
            raise SlideError(f"{path}: cannot be opened as a whole-slide image with {backend} ({type(e).__name__}: {e}). If the file is "
                             f"complete, try --backend {other}; otherwise copy it again.") from e

    def _open_image(self) -> None:
        """Read a picture whole with Pillow, converted to 8-bit RGB (or refused, see the module docstring)."""
        path, kind = self.path, self.path.suffix.lstrip(".").upper()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path)
        except Image.DecompressionBombError as e:  # far above the limit: Pillow refuses to open it
            raise _too_large(path, f"too large ({e})") from e
        except (OSError, ValueError, SyntaxError) as e:
            raise SlideError(f"{path}: cannot be read as an image ({e}): the file is damaged or not a {kind}. Copy or export it again.") from e
        with im:
            width, height = im.size
            if width * height > MAX_WHOLE_IMAGE_PIXELS:
                raise _too_large(path, f"{width}x{height} px ({width * height / 1e6:.0f} megapixels)")
            sixteen = any(";16" in str(getattr(t, "args", t[3] if len(t) > 3 else "")) for t in (im.tile or []))
            mode = im.mode
            try:
                im.load()
            except (OSError, ValueError, SyntaxError, EOFError) as e:
                raise SlideError(f"{path}: the {kind} cannot be decoded ({e}): the file is truncated or damaged. Copy or export it again.") from e
            self._array, self.conversion = self._image_to_rgb(im, mode, sixteen)
        self.backend = "image"
        self.is_image = True

    def _image_to_rgb(self, im: Image.Image, mode: str, sixteen: bool) -> tuple[np.ndarray, str]:
        """``(H, W, 3)`` uint8 RGB of a loaded Pillow image, and the conversion made ("" for none)."""
        what = f"{'16-bit ' if sixteen else ''}{mode}"
        if mode in ("1", "L", "LA", "La", "I", "F") or mode.startswith("I;16"):
            raise _grayscale(self.path, f"mode {mode}")
        if mode == "RGB":
            return np.asarray(im), ("16-bit RGB: 16 bits per channel reduced to 8 (the high byte)" if sixteen else "")
        if mode in ("P", "PA"):
            palette = np.asarray(im.getpalette("RGB") or [], np.uint8).reshape(-1, 3)
            used = np.unique(np.asarray(im if mode == "P" else im.getchannel(0)))
            used = used[used < len(palette)]
            if len(used) and (palette[used, 0] == palette[used, 1]).all() and (palette[used, 1] == palette[used, 2]).all():
                raise _grayscale(self.path, f"mode {mode} with gray palette colours")
            rgba = np.asarray(im.convert("RGBA"))
            if (rgba[..., 3] < 255).any():
                return _composite_on_white(rgba[..., :3], rgba[..., 3]), f"palette image (mode {mode}): colours looked up, transparency composited on white"
            return np.ascontiguousarray(rgba[..., :3]), f"palette image (mode {mode}): colours looked up"
        if mode in ("RGBA", "RGBa"):
            rgba = np.asarray(im)
            return _composite_on_white(rgba[..., :3], rgba[..., 3], associated=mode == "RGBa"), f"{what}: alpha composited on white"
        if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
            return np.asarray(im.convert("RGB")), f"{what}: converted to RGB"
        raise SlideError(f"{self.path}: unsupported pixel format (mode {mode}); convert it to 8-bit RGB.")

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
        if self.backend == "image":  # a writable copy: the image array is read-only
            return np.array(np.moveaxis(self._array[y : y + h, x : x + w], -1, 0), order="C")
        try:
            if self.backend == "tifffile":
                return np.array(np.moveaxis(self._tiff.read(level, ly, lx, h, w), -1, 0), order="C")
            patch, _ = self._reader.get_data(self._handle, location=(y, x), size=(h, w), level=level, mode="RGB")
        except Exception as e:  # noqa: BLE001 - corrupt tiles surface as backend-specific errors
            raise SlideError(f"{self.path}: reading {h}x{w} px at level-0 ({y}, {x}), level {level}, failed ({type(e).__name__}: {e}). "
                             "The file is probably damaged: copy it again.") from e
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
        chunk_h, chunk_w = self._chunk_shape(level)  # level pixels per read: bounded memory however large the level is
        ratio = th / lh
        for ly in range(0, lh, chunk_h):
            for lx in range(0, lw, chunk_w):
                ch, cw = min(chunk_h, lh - ly), min(chunk_w, lw - lx)
                oy0, oy1 = int(round(ly * ratio)), int(round((ly + ch) * ratio))
                ox0, ox1 = int(round(lx * tw / lw)), int(round((lx + cw) * tw / lw))
                if oy1 <= oy0 or ox1 <= ox0:
                    continue
                ds = self.downsamples[level]
                region = self.read_level((int(ly * ds), int(lx * ds)), (ch, cw), level)
                out[oy0:oy1, ox0:ox1] = np.moveaxis(_shrink(region, (oy1 - oy0, ox1 - ox0)), 0, -1)
        return out, h0 / th

    def _chunk_shape(self, level: int) -> tuple[int, int]:
        """``(rows, columns)`` per read when a level is read in full (thumbnails): 2048 x 2048,
        or whole-width bands of ~4 megapixels for a stripped TIFF, so each strip is decoded once."""
        if self.backend == "tifffile" and not self._tiff.pages[level].is_tiled:
            width = self.level_dims[level][1]
            return max(int(self._tiff.pages[level].rowsperstrip), 2**22 // max(width, 1), 1), width
        return 2048, 2048

    def close(self) -> None:
        """Release the backend handle."""
        handle, self._handle = self._handle, None
        if handle is not None and hasattr(handle, "close"):
            handle.close()
        tiff, self._tiff = self._tiff, None
        if tiff is not None:
            tiff.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mag = f"{mpp_to_magnification(self.mpp):g}x" if self.mpp else "unknown magnification"
        return f"Slide({self.path.name}, {self.backend}, {len(self.level_dims)} levels, {self.shape[0]}x{self.shape[1]}, {mag})"


def list_slides(source: str | Path | Sequence[str | Path], suffixes: Sequence[str] = SLIDE_SUFFIXES + IMAGE_SUFFIXES) -> list[Path]:
    """Slide files from a folder, a CSV, a single file or a list.

    Args:
        source: a slide file; a folder (its files with a slide or image suffix, sorted;
            a prepared dataset's ``images/`` folder is used when present; other files are
            ignored); a ``.csv`` with a ``path`` (or ``slide``) column, relative paths taken
            from the CSV's folder; or a list of any of these.
        suffixes: accepted file suffixes (lower case) for folders.

    Returns:
        the slide paths. Entries of a list or CSV are returned even when they do not exist
        or have another suffix: opening them (:class:`Slide`) reports each one, so a batch
        can go on with its other slides.

    Raises:
        SlideError / SlideNotFoundError naming the source when it gives no slide at all.
    """
    if source is None or (isinstance(source, str) and not source.strip()):
        raise SlideError("no input given: pass --input with a slide, a folder of slides or images, or a CSV of slide paths.")
    if isinstance(source, (list, tuple)):
        out: list[Path] = []
        for s in source:
            p = Path(s)
            out.extend(list_slides(p, suffixes) if p.is_dir() or (p.suffix.lower() == ".csv" and p.is_file()) else [p])
        if not out:
            raise SlideError("the slide list is empty.")
        return out
    path = Path(source)
    if not path.exists():
        raise SlideNotFoundError(f"{path}: no such slide, folder or CSV. Check the path (relative paths start from the current folder).")
    if path.is_dir():
        folder = path / "images" if (path / "images").is_dir() else path
        files = [p for p in folder.iterdir() if p.is_file()]
        found = sorted(p for p in files if p.suffix.lower() in suffixes)
        if not found:
            raise SlideNotFoundError(f"{folder}: no slides or images ({len(files)} other files; looked for {', '.join(suffixes)}).")
        return found
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        column = next((c for c in ("path", "slide", "file") if rows and c in rows[0]), None)
        if column is None:
            raise SlideError(f"{path}: a slide CSV needs a 'path' column (got {list(rows[0]) if rows else 'no rows'}).")
        out = [(p if p.is_absolute() else path.parent / p) for p in (Path(r[column]) for r in rows if r[column])]
        if not out:
            raise SlideError(f"{path}: lists no slides.")
        return out
    return [path]


def _shrink(region: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(3, h, w)`` uint8 -> ``(3, *size)`` uint8, anti-aliased: a copy when the size is the same; for
    a reduction by ``k >= 4`` times, first the mean of ``k // 2`` x ``k // 2`` blocks (exact area
    averaging, cheap), then skimage's anti-aliased bilinear resize of the small array (its Gaussian
    prefilter on the full region cost 0.3 s per megapixel for a tissue mask's 32x reduction)."""
    h, w = region.shape[1:]
    if (h, w) == tuple(size):
        return region.copy()
    block = int(min(h / size[0], w / size[1]) // 2)
    if block >= 2:
        bh, bw = h // block, w // block
        region = region[:, : bh * block, : bw * block].reshape(3, bh, block, bw, block).mean(axis=(2, 4))
    small = resize(region, (3, *size), order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)
