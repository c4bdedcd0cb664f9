"""Post-processing: attention map -> nucleus instances (the paper's section 3.3).

The authors' pipeline (their ``post.py``), in order:

1. ``seg = A > threshold`` (0.5; here optionally ``"otsu"``, a threshold per image,
   see :func:`otsu_threshold`, optionally after a Gaussian blur of A, ``attention_sigma``,
   and optionally also above A's local Gaussian-weighted mean plus ``local_offset`` in a
   ``local_block_size`` neighbourhood, see :func:`local_threshold_mask`);
2. binary opening disk(2), closing disk(2), opening disk(1), closing disk(1)
   (here optionally followed by filling the holes of at most ``fill_holes`` pixels: the
   pale interior of a vesicular nucleus, whose chromatin rim alone passes the threshold);
3. Euclidean distance transform of ``seg``, Gaussian blur (sigma 1);
4. markers: local maxima of the blurred distance with a disk(7) footprint inside
   the mask (``skimage.feature.peak_local_max``), connected maxima labelled together
   (here optionally only the h-maxima of the distance that hold such a maximum,
   ``marker_h``: a top that rises less than ``marker_h`` pixels above the saddle to a
   higher top is a bump of one nucleus' outline, not a nucleus of its own);
5. marker-controlled watershed of the negated blurred distance, restricted to ``seg``;
6. optionally, instances smaller than ``min_size`` pixels removed.

Two details differ from the authors' code, both only where it misbehaves:
morphology ignores the image border (pixels outside the image neither erode
nor dilate, whereas ``scipy.ndimage``'s defaults strip a rim of nuclei touching
the border), and a connected component of the mask in which no maximum was
found (a small nucleus within 7 px of a larger one; an all-foreground map) is
kept as one instance instead of being silently dropped (``fill_unmarked=False``
restores the authors' behaviour).

Shapes: attention maps ``(H, W)`` or ``(1, H, W)``, float in [0, 1], numpy or torch;
instance maps int32, background 0, instances numbered ``1..N`` consecutively.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import disk, local_maxima, reconstruction
from skimage.segmentation import watershed

from custom.command_line import flag

__all__ = ['PostprocessParams', 'AttentionToInstances', 'AttentionToInstancesd', 'attention_foreground', 'attention_to_instances', 'fill_small_holes', 'foreground_to_instances', 'keep_centred', 'local_threshold', 'local_threshold_mask', 'mask_to_instances', 'otsu_threshold']


OTSU = "otsu"
DEFAULT_OTSU_RANGE = (0.4, 0.6)
OTSU_CLIP_PERCENTILES = (0.5, 99.5)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

try:  # the compiled loop of skimage.morphology.reconstruction (private: see _lowered_reconstruction)
    from skimage.morphology._grayreconstruct import (
        reconstruction_loop as _reconstruction_loop,
    )
except ImportError:  # pragma: no cover - another skimage layout: its public function is used
    _reconstruction_loop = None


@dataclasses.dataclass(frozen=True)
class PostprocessParams:
    """The post-processing parameters, with their defaults (the paper's pipeline) in this one place.

    A model file stores the set tuned for it (``scripts/tune_postprocess.py --write_model``);
    :meth:`from_stored` reads it, and the bundle's ``postprocess`` config key overrides single
    values (``--postprocess '{"min_size": 50}'``). Every consumer (evaluation, inference, whole slides,
    MONAI Label) takes the resulting dict. Fields: see :func:`attention_to_instances` and
    :func:`mask_to_instances`.
    """

    threshold: float | str = 0.5
    morphology_radii: tuple[int, ...] = (2, 1)
    sigma: float = 1.0
    footprint_radius: int = 7
    min_size: int = 0
    otsu_range: tuple[float, float] = DEFAULT_OTSU_RANGE
    attention_sigma: float = 0.0
    local_block_size: int = 0
    local_offset: float = 0.0
    marker_h: float = 0.0
    fill_holes: int = 0
    fill_unmarked: bool = True

    def __post_init__(self):
        lo, hi = _check_threshold(self.threshold, self.otsu_range)
        block, offset = _check_local(self.local_block_size, self.local_offset)
        checked = {
            "otsu_range": (lo, hi),
            "morphology_radii": _check_params(self.morphology_radii, self.sigma, self.footprint_radius, self.min_size),
            "attention_sigma": _check_attention_sigma(self.attention_sigma),
            "local_block_size": block,
            "local_offset": offset,
            "marker_h": _check_marker_h(self.marker_h),
            "fill_holes": _check_fill_holes(self.fill_holes),
            "fill_unmarked": flag(self.fill_unmarked, "fill_unmarked"),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_mapping(cls, values: Mapping | None, source: str = "post-processing") -> PostprocessParams:
        """The defaults updated by ``values``; an unknown key is refused with the closest name."""
        values = dict(values or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            hint = difflib.get_close_matches(unknown[0], names, n=1)
            raise ValueError(f"{source}: unknown post-processing parameter {unknown[0]!r}"
                             + (f"; did you mean {hint[0]!r}?" if hint else f"; the parameters are {names}."))
        return cls(**values)

    @classmethod
    def from_stored(cls, stored: Mapping | None, overrides: Mapping | None = None) -> PostprocessParams:
        """The set a model stores (``network.postprocess``, without the records :data:`STORED_RECORDS`:
        the sigmoid slope ``r`` it was tuned at and ``tuned_on``), updated by ``overrides`` (the
        ``postprocess`` config key)."""
        stored = {k: v for k, v in dict(stored or {}).items() if k not in STORED_RECORDS}
        return cls.from_mapping({**stored, **dict(overrides or {})}, "postprocess")

    def as_dict(self, with_unmarked: bool = False) -> dict:
        """JSON-ready keyword arguments of :func:`attention_to_instances` (lists for tuples);
        ``fill_unmarked`` only when asked (it is not tuned, and reports leave it out)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["morphology_radii"], out["otsu_range"] = list(self.morphology_radii), list(self.otsu_range)
        if not with_unmarked:
            del out["fill_unmarked"]
        return out


# what a model file stores beside the parameters: the sigmoid slope they were tuned at (the inferer's) and the tuning record
STORED_RECORDS = ("r", "tuned_on")



def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_params(morphology_radii, sigma, footprint_radius, min_size) -> tuple[int, ...]:
    try:
        radii = tuple(morphology_radii)
    except TypeError:
        radii = None
    if radii is None or not all(_is_int(r) and r >= 0 for r in radii):
        raise ValueError(f"morphology_radii must be a sequence of integers >= 0 (pixels), e.g. (2, 1), got {morphology_radii!r}.")
    if not isinstance(sigma, (int, float, np.number)) or isinstance(sigma, bool) or not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma (Gaussian blur of the distance map, pixels) must be a finite number >= 0, got {sigma!r}.")
    if not _is_int(footprint_radius) or footprint_radius < 1:
        raise ValueError(f"footprint_radius (local-maximum disk, pixels) must be an integer >= 1, got {footprint_radius!r}.")
    if not _is_int(min_size) or min_size < 0:
        raise ValueError(f"min_size (pixels) must be an integer >= 0, got {min_size!r}.")
    return tuple(int(r) for r in radii)


def _check_attention_sigma(attention_sigma) -> float:
    if (isinstance(attention_sigma, bool) or not isinstance(attention_sigma, (int, float, np.number))
            or not np.isfinite(attention_sigma) or attention_sigma < 0):
        raise ValueError(f"attention_sigma (Gaussian blur of the attention before the threshold, pixels) must be a finite number >= 0, "
                         f"got {attention_sigma!r}.")
    return float(attention_sigma)


def _check_marker_h(marker_h) -> float:
    if isinstance(marker_h, bool) or not isinstance(marker_h, (int, float, np.number)) or not np.isfinite(marker_h) or marker_h < 0:
        raise ValueError(f"marker_h (least height of a marker's top above its saddle in the distance map, pixels) must be a finite "
                         f"number >= 0 (0: off), got {marker_h!r}.")
    return float(marker_h)


def _check_fill_holes(fill_holes) -> int:
    if not _is_int(fill_holes) or fill_holes < 0:
        raise ValueError(f"fill_holes (largest hole in the foreground that is filled, pixels) must be an integer >= 0 (0: off), "
                         f"got {fill_holes!r}.")
    return int(fill_holes)


def fill_small_holes(seg: np.ndarray, max_area: int) -> np.ndarray:
    """Fill the holes of a binary mask ``(H, W)`` of at most ``max_area`` pixels.

    A hole is a 4-connected background region that does not reach the image border
    (``scipy.ndimage.binary_fill_holes``). Larger holes (a gland lumen ringed by nuclei)
    stay background. Returns a new bool ``(H, W)`` mask; ``max_area`` 0 returns a copy.
    """
    seg = np.asarray(seg, dtype=bool)
    max_area = _check_fill_holes(max_area)
    if not max_area:
        return seg.copy()
    # the 4-connected background components that do not reach the border: binary_fill_holes' holes, labelled once
    background, n = ndimage.label(~seg)
    edge = np.unique(np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]]))
    small = np.bincount(background.ravel(), minlength=n + 1) <= max_area
    small[edge] = False
    small[0] = False
    return seg | small[background]


def _check_local(local_block_size, local_offset) -> tuple[int, float]:
    if not _is_int(local_block_size) or (local_block_size != 0 and (local_block_size < 3 or local_block_size % 2 == 0)):
        raise ValueError(f"local_block_size (neighbourhood of the local threshold, pixels) must be 0 (off) or an odd integer >= 3, "
                         f"got {local_block_size!r}.")
    if (isinstance(local_offset, bool) or not isinstance(local_offset, (int, float, np.number))
            or not np.isfinite(local_offset)):
        raise ValueError(f"local_offset (attention units above the local mean) must be a finite number, got {local_offset!r}.")
    return int(local_block_size), float(local_offset)


def local_threshold_mask(attention, block_size: int = 101, offset: float = 0.05) -> np.ndarray:
    """Pixels whose attention exceeds its neighbourhood's: ``A > gaussian_mean_block(A) + offset``.

    The adaptive threshold of Fiji's "Auto Local Threshold" (and of the hematoxylin-local
    baseline), applied to the attention: the mean is Gaussian-weighted (sigma
    ``(block_size - 1) / 6``, image edges reflected). Within a crowd of nuclei it cuts the
    pale gaps between them that a single threshold per image lets through.

    Args:
        attention: ``(H, W)`` or ``(1, H, W)`` float map in [0, 1], numpy or torch.
        block_size: odd side (pixels) of the neighbourhood, >= 3.
        offset: how far above the local mean a pixel must be, attention units.

    Returns:
        ``(H, W)`` bool mask.
    """
    block_size, offset = _check_local(block_size, offset)
    if block_size == 0:
        raise ValueError("local_threshold_mask needs block_size >= 3 (0 means no local threshold in attention_to_instances).")
    arr = _to_2d(attention, "attention")
    if np.isnan(arr).any():
        raise ValueError("attention contains NaN values.")
    return _local_mask(arr, block_size, offset)


def local_threshold(attention, block_size: int = 101, offset: float = 0.05) -> np.ndarray:
    """The threshold map of :func:`local_threshold_mask`: the Gaussian-weighted local mean of the
    attention plus ``offset``, ``(H, W)`` float32, as skimage's ``threshold_local(attention, block_size,
    method="gaussian", offset=-offset)`` (its sigma and reflected edges), which in float64 gave the same
    masks on the 30 MoNuSeg maps in 1.5x the time. Arguments as :func:`local_threshold_mask`."""
    block_size, offset = _check_local(block_size, offset)
    if block_size == 0:
        raise ValueError("local_threshold needs block_size >= 3 (0 means no local threshold in attention_to_instances).")
    return _local_threshold(_to_2d(attention, "attention"), block_size, offset)


def _local_threshold(arr: np.ndarray, block_size: int, offset: float) -> np.ndarray:
    arr = arr.astype(np.float32, copy=False)
    return ndimage.gaussian_filter(arr, (block_size - 1) / 6.0, mode="reflect") + np.float32(offset)


def _local_mask(arr: np.ndarray, block_size: int, offset: float) -> np.ndarray:
    """:func:`local_threshold_mask` of a checked ``(H, W)`` map with validated parameters."""
    return arr.astype(np.float32, copy=False) > _local_threshold(arr, block_size, offset)


def _check_threshold(threshold, otsu_range=DEFAULT_OTSU_RANGE) -> tuple[float, float]:
    if threshold != OTSU and (not isinstance(threshold, (int, float, np.number)) or isinstance(threshold, bool)
                              or not 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a number in [0, 1] (attention is in [0, 1]) or {OTSU!r} (one per image), got {threshold!r}.")
    try:
        lo, hi = (float(v) for v in otsu_range)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"otsu_range must be (low, high) with 0 <= low <= high <= 1 (attention units), got {otsu_range!r}.")
    return lo, hi


def otsu_threshold(attention, otsu_range: Sequence[float] = DEFAULT_OTSU_RANGE) -> float:
    """One image's foreground threshold: Otsu's on its attention histogram, clamped to ``otsu_range``.

    The map is clipped to its 0.5-99.5 percentiles first so that a few extreme pixels
    do not stretch the histogram. Needs a soft map (the inferer's ``r`` about 1):
    training's slope saturates nearly every pixel to 0 or 1 and Otsu then lands near 0.5
    whatever the image. The clamp keeps a tile without nuclei (one mode, no valley) from
    being split in two: its threshold stays at ``otsu_range[0]`` or above.

    Args:
        attention: ``(H, W)`` or ``(1, H, W)`` float map in [0, 1], numpy or torch.
        otsu_range: ``(low, high)`` bounds of the threshold, attention units.

    Returns:
        the threshold, a float in ``otsu_range``.
    """
    lo, hi = _check_threshold(OTSU, otsu_range)
    arr = _to_2d(attention, "attention")
    if np.isnan(arr).any():
        raise ValueError("attention contains NaN values.")
    return _otsu_level(arr, lo, hi)


def _otsu_level(arr: np.ndarray, lo: float, hi: float) -> float:
    """:func:`otsu_threshold` of a checked ``(H, W)`` map with validated bounds (in the map's own float
    type: float32 attention is not copied to float64)."""
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    a, b = np.percentile(arr, OTSU_CLIP_PERCENTILES)
    t = float(threshold_otsu(np.clip(arr, a, b))) if b > a else float(a)
    return float(np.clip(t, lo, hi))


def _to_2d(x, name: str) -> np.ndarray:
    """``(H, W)`` or ``(1, H, W)`` numpy/torch -> numpy ``(H, W)``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        arr = (x.float() if x.is_floating_point() else x).numpy()  # numpy has no bfloat16
    else:
        arr = np.asarray(x)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (H, W) or (1, H, W), got {tuple(arr.shape)}.")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(arr.shape)}).")
    return arr


def _opening(seg: np.ndarray, fp: np.ndarray) -> np.ndarray:
    # border_value: outside pixels count as foreground for erosion and background for dilation,
    # so the border neither erodes nor grows anything (skimage's mode="ignore")
    return ndimage.binary_dilation(ndimage.binary_erosion(seg, fp, border_value=1), fp, border_value=0)


def _closing(seg: np.ndarray, fp: np.ndarray) -> np.ndarray:
    return ndimage.binary_erosion(ndimage.binary_dilation(seg, fp, border_value=0), fp, border_value=1)


def _relabel_sequential(labels: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Drop labels with fewer than ``min_size`` pixels and renumber the rest 1..N (int32)."""
    counts = np.bincount(labels.ravel())
    keep = counts >= max(min_size, 1)
    keep[0] = False
    lut = np.zeros(len(counts), dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]


def _watershed(distance: np.ndarray, markers: np.ndarray, n_markers: int, seg: np.ndarray) -> np.ndarray:
    """``skimage.segmentation.watershed(-distance, markers, mask=seg)``, flooded only where it has a choice to make.

    The watershed floods 4-connected within the mask, so each 4-connected component of ``seg`` is
    flooded by its own markers alone: a component that holds one marker becomes all that marker's, one
    without any stays 0, and only the components holding two or more are flooded (about 57 % of the
    foreground on the MoNuSeg maps). The flooding of a component does not depend on the others: its
    pixels keep their order in the queue, except that markers of exactly equal value (all enter the queue
    first, at age 0) may leave it in another order, so a pixel between two such markers may go to the
    other one (a few pixels on an unblurred integer-valued distance). On the 30 MoNuSeg maps of the
    shipped model the instances are identical to the whole watershed's.
    """
    components, n_components = ndimage.label(seg)  # 4-connected, as the watershed floods
    has = markers > 0
    pairs = np.unique(components[has].astype(np.int64) * (n_markers + 1) + markers[has])
    owner, marker = pairs // (n_markers + 1), pairs % (n_markers + 1)
    count = np.bincount(owner, minlength=n_components + 1)
    single = count[owner] == 1
    lut = np.zeros(n_components + 1, np.int32)
    lut[owner[single]] = marker[single]
    lut[0] = 0  # background stays background (a marker outside the mask floods nothing)
    labels = lut[components]
    several = count >= 2
    several[0] = False
    if several.any():
        shared = several[components]
        labels = np.where(shared, watershed(-distance, np.where(shared, markers, 0), mask=shared), labels)
    return labels


def _disk_maximum(image: np.ndarray, radius: int) -> np.ndarray:
    """``ndimage.maximum_filter(image, footprint=disk(radius), mode="nearest")``, computed as the
    maximum of separable rectangle filters whose union is the disk (one per distinct row half-width;
    the rows of a disk narrow away from its centre): a maximum is exact, so the result is the same,
    in a few 1-D passes instead of one 2-D pass over the disk's pixels."""
    half = [math.isqrt(radius * radius - dy * dy) for dy in range(radius + 1)]  # disk(radius)'s row half-widths
    out = None
    for w in sorted(set(half), reverse=True):
        rows = max(dy for dy in range(radius + 1) if half[dy] >= w)
        box = ndimage.maximum_filter(image, size=(2 * rows + 1, 2 * w + 1), mode="nearest")
        out = box if out is None else np.maximum(out, box, out=out)
    return out


def _footprint_peaks(distance: np.ndarray, seg: np.ndarray, radius: int) -> np.ndarray:
    """The pixels ``skimage.feature.peak_local_max(distance, footprint=disk(radius),
    labels=seg.astype(int), exclude_border=False)`` returns, as a bool ``(H, W)`` image (their order
    is not needed), with its steps: within the box of ``seg``, pixels outside ``seg`` set to the
    lowest float, the maxima of their disk (:func:`_disk_maximum`), none for a flat map but the
    isolated pixels of ``seg``, and above the map's minimum."""
    peaks = np.zeros(seg.shape, dtype=bool)
    box = ndimage.find_objects(seg.astype(np.int32))
    if not box:
        return peaks
    roi = box[0]
    inside = seg[roi]
    image = distance[roi].copy()
    image[~inside] = np.finfo(image.dtype).min
    out = image == _disk_maximum(image, radius)
    if np.all(out[inside]):
        out[:] = False
        out[np.logical_xor(inside, ndimage.binary_opening(inside))] = True
    out &= image > distance.min()
    peaks[roi] = out
    return peaks


# the h-maxima's height resolution (pixels of the distance map): the distance is rounded to steps of
# 1/MARKER_LEVELS_PER_PIXEL above its least value before the reconstruction (see _lowered_reconstruction)
MARKER_LEVELS_PER_PIXEL = 256


def _lowered_reconstruction(distance: np.ndarray, h: float) -> np.ndarray:
    """The h-maxima reconstruction of the distance map: ``skimage.morphology.reconstruction(q - h, q,
    method="dilation")`` with the 8-neighbourhood, where ``q`` is ``distance`` rounded to steps of
    ``1 / MARKER_LEVELS_PER_PIXEL`` pixel above its least value ``low`` and ``h`` is rounded the same way.

    On the rounded map every value is ``low + level / 256`` with an integer ``level``, so skimage's ranks
    are the levels themselves (the seed plane's ``level``, the mask plane's ``level + h_levels``: both
    planes share one rank-to-value map) and its two argsorts of float values become one stable sort of
    small integers (numpy's radix sort when they fit 16 bits). When some seed reaches ``low``
    (``q.max() - h >= low``) the reconstruction is ``max(low, r)``, where ``r`` is the reconstruction
    within the pixels above ``low``: every path through a floor pixel carries at most ``low``, and the
    seed that reaches ``low`` carries ``low`` everywhere. So the floor pixels join skimage's one-pixel pad
    at rank 0, which its compiled loop neither processes nor raises, and only the pixels above ``low``
    are sorted. The ties among equal levels may be ordered differently from skimage's; the
    reconstruction (a unique result) does not depend on it.

    The rounding (at most 1/512 px) moves a marker only where a top's depth is within that of
    ``marker_h``: on the 30 MoNuSeg maps of the shipped model it changes AJI by at most 0.0001.
    Otherwise (no seed reaches ``low``, or skimage's compiled loop is not available under its private
    name), skimage's function on the rounded map.
    """
    flat = distance.ravel()
    low = flat.min()
    levels = np.rint((flat - low) * MARKER_LEVELS_PER_PIXEL).astype(np.int64)
    h_levels = int(round(h * MARKER_LEVELS_PER_PIXEL))
    top = int(levels.max())
    if _reconstruction_loop is None or top < h_levels or h_levels == 0:
        rounded = (low + levels / MARKER_LEVELS_PER_PIXEL).reshape(distance.shape)
        return reconstruction(rounded - h_levels / MARKER_LEVELS_PER_PIXEL, rounded, method="dilation", footprint=_EIGHT_CONNECTED)
    height, width = distance.shape
    ph, pw = height + 2, width + 2  # a one-pixel pad, as skimage pads
    plane = ph * pw
    above = np.flatnonzero(levels)
    seed_rank = levels[above]
    at = ((above // width + 1) * pw + above % width + 1).astype(np.int32)  # into the padded plane; seed plane first
    rank_type = np.uint16 if top + h_levels <= np.iinfo(np.uint16).max else np.uint32
    both = np.concatenate([seed_rank, seed_rank + h_levels]).astype(rank_type)
    where = np.concatenate([at, at + plane])
    descending = where[np.argsort(both, kind="stable")[::-1]]
    ranks = np.zeros(2 * plane, np.uint32)  # rank 0: the pad and the floor, in both planes
    ranks[where] = both
    prev, following = np.full(2 * plane, -1, np.int32), np.full(2 * plane, -1, np.int32)
    prev[descending[1:]] = descending[:-1]
    following[descending[:-1]] = descending[1:]
    strides = np.array([dy * pw + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx], np.int32)
    _reconstruction_loop(ranks, prev, following, strides, int(descending[0]), plane)
    reached = ranks[:plane].reshape(ph, pw)[1:-1, 1:-1].astype(np.float64)
    return np.maximum(low + (reached - h_levels) / MARKER_LEVELS_PER_PIXEL, low)


def mask_to_instances(
    mask,
    morphology_radii: Sequence[int] = PostprocessParams.morphology_radii,
    sigma: float = PostprocessParams.sigma,
    footprint_radius: int = PostprocessParams.footprint_radius,
    min_size: int = PostprocessParams.min_size,
    fill_unmarked: bool = PostprocessParams.fill_unmarked,
    marker_h: float = PostprocessParams.marker_h,
    fill_holes: int = PostprocessParams.fill_holes,
) -> np.ndarray:
    """Split a binary foreground mask into instances (steps 2-6 of the pipeline).

    Args:
        mask: ``(H, W)`` or ``(1, H, W)`` numpy/torch; non-zero is foreground.
        morphology_radii: for each radius r, a binary opening then a closing with
            disk(r) (paper: (2, 1)); ``()`` skips the morphology.
        sigma: standard deviation (pixels) of the Gaussian blur of the distance map; 0: none.
        footprint_radius: radius (pixels) of the disk in which a marker must be the maximum.
        min_size: instances with fewer pixels are removed (0: keep all).
        fill_unmarked: keep a mask component without any marker as one instance.
        marker_h: 0 (the paper) or a height in pixels of the (blurred) distance: the markers are
            the h-maxima of the distance (its tops that rise at least ``marker_h`` above the
            saddle to any higher top; tops joined above that depth are one connected region:
            the regional maxima of the distance lowered by ``marker_h`` and reconstructed under
            it by dilation) that hold at least one footprint maximum, so that maxima of one
            nucleus split only by a shallow dip of its outline make one marker.
        fill_holes: 0 (the paper) or the largest hole (pixels) of the mask that is filled after
            the morphology, before the distance transform (:func:`fill_small_holes`): a vesicular
            nucleus whose pale interior fails the threshold then makes one solid instance, not a
            ring that the watershed cuts into pieces.

    Returns:
        ``(H, W)`` int32 instance map, 0 background, instances 1..N.
    """
    radii = _check_params(morphology_radii, sigma, footprint_radius, min_size)
    marker_h = _check_marker_h(marker_h)
    fill_holes = _check_fill_holes(fill_holes)
    seg = _to_2d(mask, "mask") != 0
    for r in radii:
        if r > 0:
            fp = disk(r).astype(bool)
            seg = _closing(_opening(seg, fp), fp)
    if fill_holes:
        seg = fill_small_holes(seg, fill_holes)
    if not seg.any():
        return np.zeros(seg.shape, dtype=np.int32)
    distance = ndimage.distance_transform_edt(seg)
    if sigma > 0:
        distance = ndimage.gaussian_filter(distance, sigma=float(sigma))
    peaks = _footprint_peaks(distance, seg, int(footprint_radius))
    markers, n_markers = ndimage.label(peaks, structure=_EIGHT_CONNECTED)  # a flat maximum gives one marker
    if marker_h > 0 and n_markers:
        # the tops of the distance that rise >= marker_h above their saddle: the regional maxima
        # (flat, each one connected region) of the distance lowered by marker_h and reconstructed under it
        lowered = _lowered_reconstruction(distance, marker_h)
        tops, n_tops = ndimage.label(local_maxima(lowered, connectivity=2, allow_borders=True) & seg, structure=_EIGHT_CONNECTED)
        held = np.zeros(n_tops + 1, dtype=bool)
        held[tops[peaks]] = True
        held[0] = False
        markers, n_markers = ndimage.label(held[tops], structure=_EIGHT_CONNECTED)
    labels = _watershed(distance, markers, n_markers, seg) if n_markers else np.zeros(seg.shape, dtype=np.int32)
    if fill_unmarked:
        orphans, n_orphans = ndimage.label(seg & (labels == 0), structure=_EIGHT_CONNECTED)
        if n_orphans:
            labels = np.where(orphans > 0, orphans + labels.max(), labels)
    return _relabel_sequential(labels.astype(np.int64, copy=False), int(min_size))


def attention_to_instances(attention, **params) -> np.ndarray:
    """Nucleus instances from an attention map: ``A > threshold``, then :func:`mask_to_instances`.

    Args:
        attention: ``(H, W)`` or ``(1, H, W)`` float map in [0, 1], numpy or torch.
        **params: fields of :class:`PostprocessParams` (its defaults for the rest):
        threshold: foreground is ``attention > threshold``, in [0, 1] (paper: 0.5), or
            ``"otsu"``: a threshold per map (:func:`otsu_threshold`, for soft maps).
        morphology_radii, sigma, footprint_radius, min_size, fill_unmarked, marker_h, fill_holes: see :func:`mask_to_instances`.
        otsu_range: bounds of the ``"otsu"`` threshold (attention units); unused otherwise.
        attention_sigma: standard deviation (pixels) of a Gaussian blur of the attention before
            the threshold (0: none, the paper), as the hematoxylin baseline blurs its map.
        local_block_size: 0 (the paper) or an odd neighbourhood side (pixels): foreground must
            then also pass :func:`local_threshold_mask` of the (blurred) attention.
        local_offset: that local threshold's offset above the local mean, attention units.

    Returns:
        ``(H, W)`` int32 instance map, 0 background, instances 1..N.
    """
    p = PostprocessParams.from_mapping(params)
    return foreground_to_instances(attention_foreground(attention, p)[0], p)


def attention_foreground(attention, params: PostprocessParams) -> tuple[np.ndarray, float, np.ndarray]:
    """Step 1 of :func:`attention_to_instances`: ``(mask, threshold, blurred)``, the foreground mask
    ``(H, W)`` bool, the threshold put on the map (Otsu's of this map, or the fixed one) and the map it
    is put on (``attention`` after the ``attention_sigma`` blur)."""
    p = params
    arr = _to_2d(attention, "attention")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    if np.isnan(arr).any():
        raise ValueError("attention contains NaN values.")
    if p.attention_sigma > 0:
        arr = ndimage.gaussian_filter(arr.astype(np.float32, copy=False), p.attention_sigma)  # "nearest" edges: no dark rim
    threshold = _otsu_level(arr, *p.otsu_range) if p.threshold == OTSU else p.threshold
    mask = arr > threshold
    if p.local_block_size:
        mask &= _local_mask(arr, p.local_block_size, p.local_offset)
    return mask, float(threshold), arr


def foreground_to_instances(mask, params: PostprocessParams) -> np.ndarray:
    """Steps 2-6 of :func:`attention_to_instances`: :func:`mask_to_instances` with ``params``' values."""
    p = params
    return mask_to_instances(mask, p.morphology_radii, p.sigma, p.footprint_radius, p.min_size, p.fill_unmarked, p.marker_h,
                             p.fill_holes)


def keep_centred(labels: np.ndarray, core: Sequence[int], max_size: int = 0) -> np.ndarray:
    """Keep the instances whose centroid lies in ``core``: the stitching rule of
    windowed inference.

    Windows overlap by a halo; each computes the instances of its core plus halo and
    keeps those centred in its core. Cores tile the slide, so every nucleus is kept by
    exactly one window, whole, as long as it (with the mask component it belongs to)
    fits in the halo.

    Args:
        labels: ``(H, W)`` int instance map of the core plus halo.
        core: ``(y0, x0, y1, x1)`` of the core in ``labels``' pixels (end exclusive).
        max_size: instances with more pixels are dropped too (0: no limit). Far larger than
            any nucleus, they are mask components the watershed did not split (dense
            purple tissue); they are also the ones that could outgrow the halo.

    Returns:
        ``(H, W)`` int32 instance map with the kept instances renumbered 1..N.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}.")
    y0, x0, y1, x1 = (int(v) for v in core)
    n = int(labels.max(initial=0))
    if n == 0:
        return np.zeros(labels.shape, np.int32)
    flat = labels.ravel().astype(np.int64)
    h, w = labels.shape
    counts = np.bincount(flat, minlength=n + 1)[1:]
    present = counts > 0
    with np.errstate(invalid="ignore", divide="ignore"):  # absent labels have no centroid (NaN); `present` drops them
        cy = np.floor(np.bincount(flat, np.repeat(np.arange(h, dtype=np.float64), w), n + 1)[1:] / counts)
        cx = np.floor(np.bincount(flat, np.tile(np.arange(w, dtype=np.float64), h), n + 1)[1:] / counts)
    keep = np.zeros(n + 1, bool)
    keep[1:] = present & (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)
    if max_size:
        keep[1:] &= counts <= int(max_size)
    return _relabel_sequential(np.where(keep[labels], labels, 0).astype(np.int64))


class AttentionToInstances(Transform):
    """Array transform: attention map -> instance map (see :func:`attention_to_instances`).

    Input ``(H, W)`` or ``(1, H, W)`` numpy/torch (MetaTensor meta kept); output of the
    same type, device and shape, dtype int32.

    Args:
        params: a :class:`PostprocessParams` or a mapping of its fields (e.g. the bundle's
            ``postprocess_params``); None: the defaults.
        **overrides: single fields, applied over ``params``.
    """

    def __init__(self, params: PostprocessParams | Mapping | None = None, **overrides):
        base = params.as_dict(with_unmarked=True) if isinstance(params, PostprocessParams) else dict(params or {})
        self.params = PostprocessParams.from_mapping({**base, **overrides})
        self.kwargs = {f.name: getattr(self.params, f.name) for f in dataclasses.fields(self.params)}

    def __call__(self, img):
        instances = attention_to_instances(img, **self.kwargs)
        if getattr(img, "ndim", 2) == 3:
            instances = instances[None]
        dtype = torch.int32 if isinstance(img, torch.Tensor) else np.int32
        return convert_to_dst_type(instances, dst=img, dtype=dtype)[0]


class AttentionToInstancesd(MapTransform):
    """Dictionary version of :class:`AttentionToInstances`.

    Args:
        keys: keys of the attention maps (default "pred").
        params: a :class:`PostprocessParams` or a mapping of its fields (None: the defaults).
        output_key: where to write the instances (only with a single key); default
            ``key + suffix``, i.e. "pred_instances".
        suffix: appended to each key when ``output_key`` is None.
        allow_missing_keys: skip absent keys.
        **overrides: single fields of :class:`PostprocessParams`, applied over ``params``.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        params: PostprocessParams | Mapping | None = None,
        output_key: str | None = None,
        suffix: str = "_instances",
        allow_missing_keys: bool = False,
        **overrides,
    ):
        super().__init__(keys, allow_missing_keys)
        if output_key is not None and len(self.keys) != 1:
            raise ValueError(f"output_key needs exactly one input key, got keys={self.keys}.")
        if output_key is None and not suffix:
            raise ValueError("suffix must be non-empty when output_key is None (it would overwrite the attention).")
        self.output_key, self.suffix = output_key, suffix
        self.transform = AttentionToInstances(params, **overrides)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key if self.output_key is not None else f"{key}{self.suffix}"] = self.transform(d[key])
        return d
