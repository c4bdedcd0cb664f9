"""Transforms: the dihedral group, Reinhard colour transfer and HED jitter.

Array transforms work on channel-first RGB images ``(3, H, W)`` with float
values in ``[0, 1]`` (numpy or torch); each has a dictionary twin (suffix
``d``) in MONAI's style.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, Transform
from skimage.color.colorconv import hed_from_rgb, rgb_from_hed, rgb_from_xyz, xyz_from_rgb

__all__ = ['IMAGENET_MEAN', 'IMAGENET_STD', 'DIHEDRAL_NAMES', 'EQUIVARIANCE_TRANSFORMS', 'RandDihedral', 'RandDihedrald', 'RandHEDJitter', 'RandHEDJitterd', 'ReinhardNormalize', 'ReinhardNormalized', 'dihedral', 'dihedral_inverse', 'reinhard_source_stats', 'reinhard_stats']


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# The eight elements of the dihedral group D4 acting on the last two axes (H, W).
DIHEDRAL_NAMES = ("identity", "hflip", "vflip", "transpose", "rot90", "rot180", "rot270", "antitranspose")


# The paper's set T for the equivariance loss (section 3.2): indices into DIHEDRAL_NAMES.
EQUIVARIANCE_TRANSFORMS = (1, 2, 3, 4, 5, 6)


# Index of each element's inverse: rot90 and rot270 undo each other, the rest are involutions.
_INVERSE = (0, 1, 2, 3, 6, 5, 4, 7)


def _flip(x, axis: int):
    return torch.flip(x, dims=(axis,)) if isinstance(x, torch.Tensor) else np.flip(x, axis=axis)


def _swap(x):
    return x.transpose(-1, -2) if isinstance(x, torch.Tensor) else np.swapaxes(x, -1, -2)


def _rot90(x, k: int):
    if isinstance(x, torch.Tensor):
        return torch.rot90(x, k, dims=(-2, -1))
    return np.rot90(x, k, axes=(-2, -1))


def dihedral(x, index: int):
    """Apply one element of the dihedral group D4 to the last two axes.

    Args:
        x: array or tensor ``(..., H, W)``.
        index: element of ``DIHEDRAL_NAMES`` (0 identity, 1 horizontal flip (W axis),
            2 vertical flip (H axis), 3 transpose, 4/5/6 counter-clockwise rotation
            by 90/180/270 degrees, 7 anti-transpose).

    Returns:
        The transformed array, ``(..., H, W)`` or ``(..., W, H)`` for transposes and
        quarter turns. Numpy results may be views; copy before writing in place.
    """
    if not 0 <= int(index) < len(DIHEDRAL_NAMES):
        raise ValueError(f"dihedral index must be in 0..{len(DIHEDRAL_NAMES) - 1}, got {index}.")
    index = int(index)
    if index == 0:
        return x
    if index == 1:
        return _flip(x, -1)
    if index == 2:
        return _flip(x, -2)
    if index == 3:
        return _swap(x)
    if index in (4, 5, 6):
        return _rot90(x, index - 3)
    return _rot90(_swap(x), 2)  # anti-transpose: reflection about the anti-diagonal


def dihedral_inverse(x, index: int):
    """Undo ``dihedral(., index)``: ``dihedral_inverse(dihedral(x, i), i) == x``.

    Args:
        x: array or tensor ``(..., H, W)``.
        index: the element that was applied.
    """
    if not 0 <= int(index) < len(DIHEDRAL_NAMES):
        raise ValueError(f"dihedral index must be in 0..{len(DIHEDRAL_NAMES) - 1}, got {index}.")
    return dihedral(x, _INVERSE[int(index)])


# CIELAB under illuminant D65, 2-degree observer: skimage.color's rgb2lab / lab2rgb, in float32
_D65_WHITE = np.array([0.95047, 1.0, 1.08883], dtype=np.float32)
_XYZ_FROM_RGB = (xyz_from_rgb.T / _D65_WHITE).astype(np.float32)  # linear RGB -> XYZ divided by the white point
_RGB_FROM_XYZ = (rgb_from_xyz.T * _D65_WHITE[:, None]).astype(np.float32)  # XYZ relative to the white point -> linear RGB


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB ``(..., 3)`` in [0, 1] -> CIELAB ``(..., 3)`` float32 (D65, 2 degrees): ``skimage.color.rgb2lab``'s
    formulas computed in float32 (differences from it below 1e-3 L*a*b* units), about 5x faster."""
    c = np.asarray(rgb, dtype=np.float32)
    linear = np.where(c > 0.04045, np.power((c + np.float32(0.055)) / np.float32(1.055), np.float32(2.4)), c / np.float32(12.92))
    t = linear @ _XYZ_FROM_RGB
    f = np.where(t > 0.008856, np.power(np.maximum(t, 0.008856), np.float32(1 / 3)), np.float32(7.787) * t + np.float32(16.0 / 116.0))
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB ``(..., 3)`` -> sRGB ``(..., 3)`` float32 in [0, 1]: ``skimage.color.lab2rgb``'s formulas in
    float32 (negative z clipped to 0 as it does, without its warning)."""
    lab = np.asarray(lab, dtype=np.float32)
    f = np.empty_like(lab)
    f[..., 1] = (lab[..., 0] + np.float32(16.0)) / np.float32(116.0)
    f[..., 0] = lab[..., 1] / np.float32(500.0) + f[..., 1]
    f[..., 2] = np.maximum(f[..., 1] - lab[..., 2] / np.float32(200.0), 0.0)
    t = np.where(f > 0.2068966, f * f * f, (f - np.float32(16.0 / 116.0)) / np.float32(7.787))
    linear = t @ _RGB_FROM_XYZ
    rgb = np.where(linear > 0.0031308, np.float32(1.055) * np.power(np.maximum(linear, 0.0031308), np.float32(1 / 2.4)) - np.float32(0.055),
                   np.float32(12.92) * linear)
    return np.clip(rgb, 0.0, 1.0)


def _chw(img) -> np.ndarray:
    """A channel-first RGB image ``(3, H, W)``, numpy or torch, as a numpy array (refused otherwise)."""
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(f"expected a channel-first RGB image (3, H, W), got shape {arr.shape}.")
    return arr


def _to_hwc(img) -> np.ndarray:
    return np.moveaxis(_chw(img), 0, -1).astype(np.float64, copy=False)


def _like(out_hwc: np.ndarray, ref):
    out = np.ascontiguousarray(np.moveaxis(out_hwc, -1, 0), dtype=np.float32)
    return torch.as_tensor(out) if isinstance(ref, torch.Tensor) else out


def _brightness(rgb: np.ndarray, percentile: float | None) -> float | None:
    """The `percentile` of mean-RGB brightness of (H, W, 3) [0, 1] pixels (None: no standardisation)."""
    return None if percentile is None else float(np.percentile(rgb.mean(axis=-1), percentile))


def _standardise_brightness(rgb: np.ndarray, percentile: float | None, white: float | None = None) -> np.ndarray:
    """Scale an RGB image (H, W, 3), values in [0, 1], so its `percentile` of
    brightness (or the given ``white`` level) becomes white, then clip (the authors'
    step before Reinhard)."""
    p = _brightness(rgb, percentile) if white is None else white
    if p is None:
        return rgb
    return np.clip(rgb / max(p, 1e-6), 0.0, 1.0) if p > 0 else rgb


def reinhard_source_stats(images: Sequence[np.ndarray], brightness_percentile: float | None = 90.0) -> np.ndarray:
    """Colour statistics of a whole slide, pooled over several of its regions, so that
    every window of the slide is normalised the same way (see :class:`ReinhardNormalize`).

    Args:
        images: ``(H, W, 3)`` uint8 regions of one slide.
        brightness_percentile: as in :class:`ReinhardNormalize` (None: off).

    Returns:
        float64 ``(7,)``: the white level (brightness percentile of the pooled pixels, in [0, 1];
        NaN when off), then the L*, a*, b* means and standard deviations of the pooled,
        brightness-standardised pixels. For a single image this is exactly what
        ``ReinhardNormalize`` computes from that image.
    """
    if len(images) == 0:
        raise ValueError("reinhard_source_stats needs at least one region.")
    pixels = np.concatenate([np.asarray(i).reshape(-1, 3) for i in images])
    if pixels.dtype == np.uint8:  # each colour once, weighted by its pixel count: the same figures, ~7x faster on 1 MP
        codes, counts = np.unique(_colour_codes(pixels.T[:, :, None]), return_counts=True)
        pixels = _colour_channels(codes)
    else:
        counts = np.ones(len(pixels), dtype=np.int64)
    rgb = pixels.astype(np.float64) / 255.0
    white = None if brightness_percentile is None else _weighted_percentile(rgb.mean(axis=-1), counts, brightness_percentile)
    lab = rgb_to_lab(_standardise_brightness(rgb, None, white)).astype(np.float64)
    weights = counts / counts.sum()
    mean = weights @ lab
    std = np.sqrt(weights @ (lab - mean) ** 2)
    return np.array([np.nan if white is None else white, *mean, *std])


def _weighted_percentile(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """``np.percentile(np.repeat(values, counts), q)`` (linear interpolation) without repeating."""
    order = np.argsort(values, kind="stable")
    ranked, ends = values[order], np.cumsum(counts[order])  # sorted values; rank (0-based) k holds ranked[first end > k]
    position = q / 100.0 * (ends[-1] - 1)
    below = int(np.floor(position))
    lo, hi = (ranked[np.searchsorted(ends, k, side="right")] for k in (below, min(below + 1, int(ends[-1]) - 1)))
    return float(lo + (hi - lo) * (position - below))


def reinhard_stats(images: Sequence, brightness_percentile: float | None = 90.0) -> tuple[list, list]:
    """Mean LAB statistics of a set of images, the default Reinhard target.

    Args:
        images: RGB images, each ``(3, H, W)`` in [0, 1] or ``(H, W, 3)`` uint8.
        brightness_percentile: brightness standardisation applied first (None: off).

    Returns:
        ``(means, stds)``: two lists of 3 floats, the average over images of the per-image
        L*, a*, b* channel means and standard deviations (CIELAB units).
    """
    if len(images) == 0:
        raise ValueError("reinhard_stats needs at least one image.")
    means, stds = [], []
    for img in images:
        arr = np.asarray(img)
        rgb = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 and arr.shape[-1] == 3 else _to_hwc(arr)
        lab = rgb_to_lab(_standardise_brightness(rgb, brightness_percentile)).reshape(-1, 3).astype(np.float64)
        means.append(lab.mean(0))
        stds.append(lab.std(0))
    return np.mean(means, 0).tolist(), np.mean(stds, 0).tolist()


class ReinhardNormalize(Transform):
    """Reinhard et al. (2001) colour transfer in CIELAB to fixed target statistics.

    Each LAB channel of the image is shifted and scaled to the target mean and
    standard deviation. Optionally the image's brightness is first standardised
    (its ``brightness_percentile`` of mean RGB value is mapped to white), as the
    authors' code does with the 90th percentile.

    By default the source statistics (white level, LAB means and stds) are those
    of the image itself; passing ``source`` (see :func:`reinhard_source_stats`) uses
    fixed ones instead, so that all windows of a slide get the same mapping.

    ``max_std_ratio`` bounds the contrast change: each channel's scale
    ``target_std / source_std`` is clipped to ``[1 / max_std_ratio, max_std_ratio]``.
    Plain Reinhard (None) stretches a low-contrast image without white space (e.g. one
    that is 40 % pale nuclei) until pale nuclei and stroma look alike.

    Args:
        target_means: 3 LAB means (L* in [0, 100]).
        target_stds: 3 LAB standard deviations.
        brightness_percentile: percentile in (0, 100] or None to skip.
        max_std_ratio: largest contrast change per LAB channel (>= 1), or None for none.
        colour_table: with fixed ``source`` statistics, compute each 8-bit colour once per slide and look it
            up in later windows (:class:`_ColourTable`: up to 200 MB of address space, of which only the
            pages of the slide's colours are written); False computes every pixel of every window. The
            values are the same.
    """

    def __init__(self, target_means: Sequence[float], target_stds: Sequence[float], brightness_percentile: float | None = 90.0,
                 max_std_ratio: float | None = None, colour_table: bool = True):
        if len(target_means) != 3 or len(target_stds) != 3:
            raise ValueError("ReinhardNormalize needs 3 target means and 3 target stds (L*, a*, b*).")
        if brightness_percentile is not None and not 0 < brightness_percentile <= 100:
            raise ValueError(f"brightness_percentile must be in (0, 100], got {brightness_percentile}.")
        if max_std_ratio is not None and (isinstance(max_std_ratio, bool) or not isinstance(max_std_ratio, (int, float)) or not max_std_ratio >= 1):
            raise ValueError(f"max_std_ratio must be a number >= 1 or None, got {max_std_ratio!r}.")
        if not isinstance(colour_table, bool):
            raise ValueError(f"colour_table must be true or false, got {colour_table!r}.")
        self.colour_table = colour_table
        self.target_means = np.asarray(target_means, dtype=np.float64)
        self.target_stds = np.asarray(target_stds, dtype=np.float64)
        self.brightness_percentile = brightness_percentile
        self.max_std_ratio = None if max_std_ratio is None else float(max_std_ratio)
        self._source: np.ndarray | None = None  # the source statistics that came last (a slide's), and its colours:
        self._table: _ColourTable | None = None

    def __call__(self, img, source=None):
        """img: ``(3, H, W)`` RGB in [0, 1]; returns the same shape and type.
        source: None, or the 7 source statistics of :func:`reinhard_source_stats`.

        With ``source``, the mapping is one function of the colour for all windows of a slide: from the
        second image with the same ``source`` on, when it holds 8-bit colours (every value ``k / 255``, as
        ``ScaleIntensityRange`` makes them from uint8), each colour is computed once and looked up afterwards
        (:class:`_ColourTable`), with the same float32 results as computing every pixel."""
        if source is None:
            rgb = _standardise_brightness(_to_hwc(img), self.brightness_percentile)
            lab = rgb_to_lab(rgb)
            return _like(self._transfer(lab, lab.reshape(-1, 3).mean(0, dtype=np.float64), lab.reshape(-1, 3).std(0, dtype=np.float64)), img)
        src = np.asarray(source.detach().cpu() if isinstance(source, torch.Tensor) else source, dtype=np.float64).reshape(-1)
        if src.shape != (7,):
            raise ValueError(f"Reinhard source statistics must be 7 numbers (white, 3 means, 3 stds), got shape {src.shape}.")
        if self._source is None or not np.array_equal(self._source, src, equal_nan=True):
            self._source, self._table = src, None  # a slide's first window (or a single image): computed directly
            return _like(self._with_source(_to_hwc(img), src), img)
        codes = _colour_codes(img) if self.colour_table else None
        if codes is None:
            return _like(self._with_source(_to_hwc(img), src), img)
        if self._table is None:
            self._table = _ColourTable()
        return _like(self._table.lookup(codes, lambda rgb: self._with_source(rgb, src)), img)

    def _with_source(self, rgb: np.ndarray, src: np.ndarray) -> np.ndarray:
        """Normalised float32 RGB ``(..., 3)`` of float64 RGB ``(..., 3)`` in [0, 1] under the 7 source statistics."""
        white = None if np.isnan(src[0]) else float(src[0])
        return self._transfer(rgb_to_lab(_standardise_brightness(rgb, None, white)), src[1:4], src[4:7])

    def _transfer(self, lab: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
        """Reinhard's transfer of CIELAB ``(..., 3)`` from means ``mu``, stds ``sd`` to the target: float32 RGB."""
        scale = self.target_stds / np.maximum(sd, 1e-6)
        if self.max_std_ratio is not None:
            scale = np.clip(scale, 1.0 / self.max_std_ratio, self.max_std_ratio)
        lab = (lab - mu.astype(np.float32)) * scale.astype(np.float32) + self.target_means.astype(np.float32)
        lab[..., 0] = np.clip(lab[..., 0], 0.0, 100.0)
        return lab_to_rgb(lab)


_EIGHT_BIT = np.arange(256, dtype=np.float32) / np.float32(255)  # uint8 k -> k / 255, as ScaleIntensityRange computes it in float32


def _colour_codes(img) -> np.ndarray | None:
    """The 24-bit colour codes ``(H, W)`` (``r << 16 | g << 8 | b``) of a ``(3, H, W)`` image whose values are all
    ``k / 255`` in float32 (or uint8), else None."""
    arr = _chw(img)
    if arr.dtype == np.uint8:
        k = arr
    elif arr.dtype == np.float32:
        k = np.rint(np.clip(arr, 0.0, 1.0) * np.float32(255)).astype(np.uint8)
        if not np.array_equal(_EIGHT_BIT[k], arr):
            return None
    else:
        return None
    return (k[0].astype(np.uint32) << 16) | (k[1].astype(np.uint32) << 8) | k[2]


def _colour_channels(codes: np.ndarray) -> np.ndarray:
    """The 8-bit ``(r, g, b)`` ``(..., 3)`` of 24-bit colour codes ``(...)``: the inverse of :func:`_colour_codes`."""
    return np.stack([(codes >> shift) & 255 for shift in (16, 8, 0)], axis=-1)


class _ColourTable:
    """One slide's normalised colour for each 24-bit colour met so far.

    The table is allocated untouched (about 200 MB of address space, 12 bytes per colour); only the pages of the
    colours a slide holds are ever written: 84 MB for the 505,162 colours of the real 18-window slide
    ``tcga-cr-7395``. Each window computes only the colours not met in earlier windows, so on a slide of many
    windows the stain normalisation becomes a lookup."""

    def __init__(self):
        self.known = np.zeros(1 << 24, dtype=bool)
        self.values = np.empty((1 << 24, 3), dtype=np.float32)

    def lookup(self, codes: np.ndarray, compute) -> np.ndarray:
        """Normalised float32 ``(H, W, 3)`` of the colour codes ``(H, W)``; ``compute`` maps float64 RGB
        ``(1, N, 3)`` in [0, 1] to float32 ``(1, N, 3)`` for the colours not yet in the table."""
        flat = codes.reshape(-1)
        new = np.unique(flat[~self.known[flat]])
        if new.size:
            rgb = _EIGHT_BIT[_colour_channels(new)].astype(np.float64)
            self.values[new] = compute(rgb[None])[0]
            self.known[new] = True
        return self.values[flat].reshape(*codes.shape, 3)


class RandHEDJitter(RandomizableTransform):
    """Stain augmentation: scale each of the H, E, D channels (colour deconvolution,
    Ruifrok & Johnston) by an independent factor drawn from N(1, sigma).

    Args:
        sigma: standard deviation of the multiplicative factors (paper: 0.03).
        prob: probability of applying the jitter.
    """

    def __init__(self, sigma: float = 0.03, prob: float = 1.0):
        RandomizableTransform.__init__(self, prob)
        if sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}.")
        self.sigma = sigma
        self._factors = np.ones(3)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._factors = self.R.normal(1.0, self.sigma, size=3)

    def __call__(self, img, randomize: bool = True):
        """img: ``(3, H, W)`` RGB in [0, 1]; returns the same shape and type."""
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        # optical density, unmixed into stain concentrations (Ruifrok & Johnston matrix);
        # negative concentrations are kept so that factors of 1 give the image back exactly
        od = -np.log(np.clip(_to_hwc(img), 1e-6, 1.0))
        hed = od @ hed_from_rgb
        rgb = np.exp(-((hed * self._factors) @ rgb_from_hed))
        return _like(np.clip(rgb, 0.0, 1.0), img)


class RandDihedral(RandomizableTransform):
    """Apply a uniformly drawn element of the dihedral group D4 (the 8 rigid
    transforms that map the pixel grid onto itself) to ``(C, H, W)`` images."""

    def __init__(self, prob: float = 1.0):
        RandomizableTransform.__init__(self, prob)
        self._index = 0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._index = int(self.R.randint(len(DIHEDRAL_NAMES))) if self._do_transform else 0

    def __call__(self, img, randomize: bool = True):
        if randomize:
            self.randomize()
        out = dihedral(img, self._index)
        return out.contiguous() if isinstance(out, torch.Tensor) else np.ascontiguousarray(out)


class ReinhardNormalized(MapTransform):
    """Dictionary version of :class:`ReinhardNormalize`. With ``source_key``, the
    source statistics are read from that item key (e.g. a slide's, see
    :func:`reinhard_source_stats`) when present."""

    def __init__(self, keys: KeysCollection, target_means, target_stds, brightness_percentile: float | None = 90.0,
                 source_key: str | None = None, allow_missing_keys: bool = False, max_std_ratio: float | None = None,
                 colour_table: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.transform = ReinhardNormalize(target_means, target_stds, brightness_percentile, max_std_ratio, colour_table)
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        source = d.get(self.source_key) if self.source_key else None
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], source)
        return d


class _SharedDrawd(RandomizableTransform, MapTransform):
    """Dictionary wrapper of a random array transform: one draw, applied to every key."""

    def __init__(self, keys: KeysCollection, transform: RandomizableTransform, prob: float, allow_missing_keys: bool):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.transform = transform

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        self.transform.randomize()
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], randomize=False)
        return d


class RandHEDJitterd(_SharedDrawd):
    """Dictionary version of :class:`RandHEDJitter` (one draw shared by all keys)."""

    def __init__(self, keys: KeysCollection, sigma: float = 0.03, prob: float = 1.0, allow_missing_keys: bool = False):
        super().__init__(keys, RandHEDJitter(sigma=sigma, prob=1.0), prob, allow_missing_keys)


class RandDihedrald(_SharedDrawd):
    """Dictionary version of :class:`RandDihedral` (the same element for all keys)."""

    def __init__(self, keys: KeysCollection, prob: float = 1.0, allow_missing_keys: bool = False):
        super().__init__(keys, RandDihedral(prob=1.0), prob, allow_missing_keys)
