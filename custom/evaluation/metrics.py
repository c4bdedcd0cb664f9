"""Nucleus instance-segmentation metrics: the paper's (AJI, Dice, AHD) and the field's current standard
(AJI+, panoptic quality, detection precision/recall/F1), plus MONAI/Ignite wrappers.

Inputs are instance maps ``(H, W)`` (numpy or torch) of non-negative integers: 0 is background and every
positive id is one nucleus (ids need not be consecutive). ``gt`` is the reference, ``pred`` the prediction.
A "ground-truth nucleus" ``G`` and a "predicted nucleus" ``P`` *overlap* when they share at least one pixel;
``IoU(G, P) = |G ∩ P| / |G ∪ P|`` in pixels.

The authors' definitions (``aji``, ``dice_foreground``, ``ahd``) follow their released evaluation code
(github.com/msahasrabudhe/miccai2020_self_sup_nuclei_seg, ``metrics.py``), computed here from one sparse
overlap table instead of per-nucleus full-image masks, so a 1000 x 1000 MoNuSeg image with ~1000 nuclei
takes a fraction of a second for every metric at once (``instance_metrics``).

Empty-image conventions (documented per function): when both maps are empty every score is 1.0 (the
prediction is exactly right) except AHD, which is NaN whenever no ground-truth nucleus is overlapped;
means over images (``NucleiInstanceMetric.aggregate``) skip NaNs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ['COUNT_NAMES', 'INSTANCE_METRIC_KEYS', 'InstanceOverlap', 'METRIC_NAMES', 'NucleiInstanceMetric', 'NucleiMetricHandler', 'ahd', 'aji', 'aji_plus', 'cached_instance_metrics', 'check_instance_pair', 'detection_scores', 'dice_foreground', 'instance_metrics', 'panoptic_quality']


METRIC_NAMES = ("aji", "aji_plus", "dice", "ahd", "pq", "dq", "sq", "precision", "recall", "f1")


"""Per-image scores returned by ``instance_metrics`` (all in [0, 1] except ``ahd``, in pixels)."""


COUNT_NAMES = ("n_true", "n_pred")


"""Per-image nucleus counts returned by ``instance_metrics``."""


INSTANCE_METRIC_KEYS = METRIC_NAMES + COUNT_NAMES


"""Every key of ``instance_metrics``' result, in order; valid ``metric_name`` values of the wrappers."""


def _as_instance_map(x: Any, name: str, allow_integral_float: bool = False) -> np.ndarray:
    """``x`` as a 2-D numpy array of non-negative integers; ValueError naming ``name`` otherwise.

    With ``allow_integral_float``, a floating array whose values are all finite whole numbers (as MONAI's
    image loaders produce for label maps) is accepted and cast to int64.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x  # MetaTensor -> plain tensor
        x = x.numpy()
    else:
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) instance map, got shape {tuple(x.shape)}.")
    if x.dtype.kind == "f" and allow_integral_float:
        if not (np.isfinite(x).all() and np.array_equal(x, np.round(x))):
            raise ValueError(f"{name} is floating point with non-integer values; instance ids must be integers.")
        x = x.astype(np.int64)
    if x.dtype.kind not in "iu":
        raise ValueError(f"{name} must have an integer dtype (instance ids, 0 = background), got {x.dtype}.")
    if x.size and x.dtype.kind == "i" and x.min() < 0:
        raise ValueError(f"{name} has negative ids (min {x.min()}); ids must be >= 0 with 0 = background.")
    return x


def check_instance_pair(gt: Any, pred: Any, allow_integral_float: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``gt`` and ``pred`` as ``(H, W)`` integer instance maps of one shape (0 = background), or a
    ``ValueError`` naming the map that is not one; ``allow_integral_float`` accepts float maps of whole numbers."""
    gt = _as_instance_map(gt, "gt", allow_integral_float)
    pred = _as_instance_map(pred, "pred", allow_integral_float)
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred must have the same shape, got {tuple(gt.shape)} and {tuple(pred.shape)}.")
    return gt, pred


def _relabel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat labels renumbered 1..n in increasing order of the original ids (0 stays 0), and the n areas."""
    flat = x.ravel()
    if flat.size == 0:
        return np.zeros(0, np.intp), np.zeros(0, np.int64)
    top = int(flat.max())
    if top <= max(1 << 16, 4 * flat.size):  # small ids: a lookup table (much faster than np.unique's sort)
        counts = np.bincount(flat.astype(np.intp, copy=False), minlength=1)
        ids = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(top + 1, np.intp)
        lut[ids] = np.arange(1, ids.size + 1)
        return lut[flat], counts[ids]
    ids, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if ids[0] == 0:
        return inverse.astype(np.intp).ravel(), counts[1:]
    return inverse.astype(np.intp).ravel() + 1, counts


class InstanceOverlap:
    """Contingency table of two instance maps, computed once and shared by every metric.

    Nuclei are indexed 0..n_g-1 / 0..n_p-1 in increasing order of their ids; the maps ``g_lab`` / ``p_lab``
    ``(H, W)`` hold index + 1 (0 = background). Overlapping pairs (``|G ∩ P| > 0``) are listed sorted by
    (G, P) in ``pair_g``, ``pair_p`` with their ``inter``, ``union`` (pixels) and ``iou``.
    """

    def __init__(self, gt: np.ndarray, pred: np.ndarray):
        g, self.g_area = _relabel(gt)
        p, self.p_area = _relabel(pred)
        self.n_g, self.n_p = int(self.g_area.size), int(self.p_area.size)
        self.g_lab, self.p_lab = g.reshape(gt.shape), p.reshape(pred.shape)
        both = (g > 0) & (p > 0)
        codes = g[both] * (self.n_p + 1) + p[both]
        pair_codes, inter = np.unique(codes, return_counts=True)
        self.pair_g = pair_codes // (self.n_p + 1) - 1
        self.pair_p = pair_codes % (self.n_p + 1) - 1
        self.inter = inter.astype(np.int64)
        self.union = self.g_area[self.pair_g] + self.p_area[self.pair_p] - self.inter
        self.iou = self.inter / self.union
        self.fg_inter = int(self.inter.sum())  # |{gt > 0} ∩ {pred > 0}|

    @property
    def both_empty(self) -> bool:
        return self.n_g == 0 and self.n_p == 0


def _max_iou_matching(ov: InstanceOverlap, candidates: np.ndarray) -> np.ndarray:
    """Indices of the pairs (among ``candidates``, a boolean mask over ``ov``'s pairs) of a one-to-one
    matching maximising the summed IoU (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``).

    The bipartite graph of candidate pairs is split into connected components, solved independently
    (same optimum as one global assignment, far cheaper): a component that is a single pair is matched
    directly.
    """
    idx = np.flatnonzero(candidates)
    if idx.size == 0:
        return idx
    pg, pp = ov.pair_g[idx], ov.pair_p[idx]
    graph = coo_matrix((np.ones(idx.size), (pg, ov.n_g + pp)), shape=(ov.n_g + ov.n_p,) * 2)
    _, comp = connected_components(graph, directed=False)
    pair_comp = comp[pg]
    sizes = np.bincount(pair_comp)
    single = sizes[pair_comp] == 1
    chosen = [idx[single]]
    multi = np.flatnonzero(~single)
    if multi.size:
        order = multi[np.argsort(pair_comp[multi], kind="stable")]
        bounds = np.flatnonzero(np.diff(pair_comp[order])) + 1
        for group in np.split(order, bounds):
            rows, r_inv = np.unique(pg[group], return_inverse=True)
            cols, c_inv = np.unique(pp[group], return_inverse=True)
            weights = np.zeros((rows.size, cols.size))
            which = np.full((rows.size, cols.size), -1)
            weights[r_inv, c_inv] = ov.iou[idx[group]]
            which[r_inv, c_inv] = idx[group]
            r, c = linear_sum_assignment(weights, maximize=True)
            sel = which[r, c]
            chosen.append(sel[sel >= 0])  # an assigned zero-weight cell is not a pair: stays unmatched
    return np.sort(np.concatenate(chosen))


def _aji(ov: InstanceOverlap) -> float:
    if ov.both_empty:
        return 1.0
    if ov.inter.size == 0:
        return 0.0
    # best P per G: largest IoU, ties to the smallest pred id (the authors' strict ">" over increasing ids)
    order = np.lexsort((ov.pair_p, -ov.iou, ov.pair_g))
    first = np.ones(order.size, bool)
    first[1:] = ov.pair_g[order[1:]] != ov.pair_g[order[:-1]]
    # a P may be the best match of several G: its pair is counted once per G in C and U
    return _aggregated_jaccard(ov, order[first])


def _aji_plus(ov: InstanceOverlap) -> float:
    if ov.both_empty:
        return 1.0
    return _aggregated_jaccard(ov, _max_iou_matching(ov, ov.iou > 0))


def _aggregated_jaccard(ov: InstanceOverlap, pairs: np.ndarray) -> float:
    """C / U over the chosen (G, P) ``pairs`` (indices into the overlap table): C and U sum
    their intersections and unions; every G and every P in no chosen pair adds its area to U."""
    matched_g = np.zeros(ov.n_g, bool)
    matched_g[ov.pair_g[pairs]] = True
    matched_p = np.zeros(ov.n_p, bool)
    matched_p[ov.pair_p[pairs]] = True
    c = ov.inter[pairs].sum()
    u = ov.union[pairs].sum() + ov.g_area[~matched_g].sum() + ov.p_area[~matched_p].sum()
    return float(c / u)


def _dice(ov: InstanceOverlap) -> float:
    total = int(ov.g_area.sum() + ov.p_area.sum())
    return 1.0 if total == 0 else 2.0 * ov.fg_inter / total


def _ahd(ov: InstanceOverlap) -> float:
    if ov.inter.size == 0:
        return float("nan")
    boxes = ndimage.find_objects(ov.g_lab, max_label=ov.n_g)
    starts = np.flatnonzero(np.r_[True, ov.pair_g[1:] != ov.pair_g[:-1]])
    ends = np.r_[starts[1:], ov.pair_g.size]
    per_gt = np.empty(starts.size)
    for k, (s, e) in enumerate(zip(starts, ends)):
        gi = int(ov.pair_g[s])
        if e - s == 1 and ov.inter[s] == ov.g_area[gi]:  # one P covering all of G: distance 0
            per_gt[k] = 0.0
            continue
        box = boxes[gi]
        in_g = ov.g_lab[box] == gi + 1
        p_crop = ov.p_lab[box]
        worst = 0.0
        for j in range(s, e):
            if ov.inter[j] == ov.g_area[gi]:
                continue  # P ∩ G = G: distance 0
            # directed Hausdorff G -> (P ∩ G): the largest distance from a pixel of G to its nearest pixel of
            # P ∩ G. P ∩ G lies inside G's bounding box, so the exact Euclidean distance transform of the box
            # to P ∩ G gives every G pixel's nearest distance (same value as scipy's directed_hausdorff).
            dist = ndimage.distance_transform_edt(~(in_g & (p_crop == ov.pair_p[j] + 1)))
            worst = max(worst, float(dist[in_g].max()))
        per_gt[k] = worst
    return float(per_gt.mean())


def _pq(ov: InstanceOverlap, iou_threshold: float) -> dict[str, float]:
    sel = _max_iou_matching(ov, ov.iou > iou_threshold)
    tp = int(sel.size)
    fp, fn = ov.n_p - tp, ov.n_g - tp
    if ov.both_empty:
        return {"pq": 1.0, "dq": 1.0, "sq": 1.0, "tp": 0, "fp": 0, "fn": 0}
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(ov.iou[sel].mean()) if tp else 0.0
    return {"pq": dq * sq, "dq": dq, "sq": sq, "tp": tp, "fp": fp, "fn": fn}


def _detection(counts: dict[str, float], both_empty: bool) -> dict[str, float]:
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    fallback = 1.0 if both_empty else 0.0  # value of a 0/0 ratio
    precision = tp / (tp + fp) if tp + fp else fallback
    recall = tp / (tp + fn) if tp + fn else fallback
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else fallback
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def _check_threshold(iou_threshold: float) -> float:
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}.")
    return float(iou_threshold)


def aji(gt: Any, pred: Any) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017), as in the paper's evaluation code.

    For each ground-truth nucleus G: among the predicted nuclei overlapping it, P is the one of largest IoU
    (ties: smallest pred id); ``C += |G ∩ P|``, ``U += |G ∪ P|`` and P is marked used. A P may be the best
    match of several G and then counts in C and U once for each of them. A G with no overlapping prediction
    adds ``|G|`` to U; every predicted nucleus never used adds ``|P|`` to U. ``AJI = C / U``.

    Args:
        gt, pred: instance maps ``(H, W)`` of non-negative integer ids (0 = background).

    Returns:
        AJI in [0, 1]; 1.0 when both maps are empty (by convention), 0.0 when exactly one is.
    """
    return _aji(InstanceOverlap(*check_instance_pair(gt, pred)))


def aji_plus(gt: Any, pred: Any) -> float:
    """AJI+ (Graham et al., HoVer-Net, MedIA 2019): AJI with a one-to-one matching.

    G and P are matched one-to-one by maximising the summed IoU over overlapping pairs (IoU > 0; Hungarian
    algorithm). ``C`` and ``U`` sum ``|G ∩ P|`` and ``|G ∪ P|`` over matched pairs; each unmatched G adds
    ``|G|`` and each unmatched P adds ``|P|`` to U. ``AJI+ = C / U``; 1.0 when both maps are empty.

    Args:
        gt, pred: instance maps ``(H, W)`` of non-negative integer ids (0 = background).
    """
    return _aji_plus(InstanceOverlap(*check_instance_pair(gt, pred)))


def dice_foreground(gt: Any, pred: Any) -> float:
    """Pixel Dice of the foregrounds, ``2 |{gt>0} ∩ {pred>0}| / (|{gt>0}| + |{pred>0}|)``.

    The per-image term of the paper's ADC (average Dice coefficient); 1.0 when both maps are empty.

    Args:
        gt, pred: instance maps ``(H, W)`` of non-negative integer ids (0 = background).
    """
    return _dice(InstanceOverlap(*check_instance_pair(gt, pred)))


def ahd(gt: Any, pred: Any) -> float:
    """The paper's Average Hausdorff Distance (one-way, in pixels), as in the authors' evaluation code.

    For each ground-truth nucleus G overlapped by at least one prediction: for each overlapping predicted
    nucleus P, ``d(G, P) = max_{g in G} min_{q in P ∩ G} ||g - q||`` (directed Hausdorff distance from G's
    pixels to the pixels of P lying inside G, as ``scipy.spatial.distance.directed_hausdorff(G, P ∩ G)``);
    G scores ``max_P d(G, P)``. AHD is the mean over those G. Ground-truth nuclei without an overlapping
    prediction are skipped (false positives are ignored too), so AHD is NaN when no G is overlapped
    (e.g. an empty prediction, or both maps empty). Computed with an exact Euclidean distance transform of
    G's bounding box (same values as ``directed_hausdorff``, several times faster).

    Args:
        gt, pred: instance maps ``(H, W)`` of non-negative integer ids (0 = background).
    """
    return _ahd(InstanceOverlap(*check_instance_pair(gt, pred)))


def panoptic_quality(gt: Any, pred: Any, iou_threshold: float = 0.5) -> dict[str, float]:
    """Panoptic quality (Kirillov et al. 2019; for nuclei, Graham et al. 2019).

    True positives are pairs (G, P) with ``IoU > iou_threshold`` (strict): for thresholds >= 0.5 each G and P
    is in at most one such pair, so the matching is unique; below 0.5 the one-to-one matching maximises the
    summed IoU (Hungarian), as MONAI and HoVer-Net do. ``DQ = TP / (TP + FP/2 + FN/2)`` (= detection F1),
    ``SQ`` = mean IoU of the matched pairs (0 when TP = 0), ``PQ = DQ * SQ``.

    Args:
        gt, pred: instance maps ``(H, W)`` of non-negative integer ids (0 = background).
        iou_threshold: matching threshold in [0, 1).

    Returns:
        dict with ``pq``, ``dq``, ``sq`` (floats) and ``tp``, ``fp``, ``fn`` (ints). When both maps are empty,
        pq = dq = sq = 1.0 (our convention: MONAI's ``compute_panoptic_quality`` has no explicit one and
        returns 0 there only through its 1e-6 smoothing term).
    """
    return _pq(InstanceOverlap(*check_instance_pair(gt, pred)), _check_threshold(iou_threshold))


def detection_scores(gt: Any, pred: Any, iou_threshold: float = 0.5) -> dict[str, float]:
    """Nucleus detection scores from the panoptic-quality matching (``IoU > iou_threshold``).

    ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``, ``f1 = 2 TP / (2 TP + FP + FN)`` (= DQ).
    A 0/0 ratio is 1.0 when both maps are empty and 0.0 otherwise (e.g. precision of an empty prediction).

    Returns:
        dict with ``precision``, ``recall``, ``f1`` and ``tp``, ``fp``, ``fn``.
    """
    ov = InstanceOverlap(*check_instance_pair(gt, pred))
    return _detection(_pq(ov, _check_threshold(iou_threshold)), ov.both_empty)


def instance_metrics(gt: Any, pred: Any, iou_threshold: float = 0.5) -> dict[str, float]:
    """Every metric of this module for one image, from a single overlap table.

    Args:
        gt, pred: instance maps ``(H, W)`` of non-negative integer ids (0 = background).
        iou_threshold: matching threshold of pq/dq/sq/precision/recall/f1.

    Returns:
        dict with the keys of ``INSTANCE_METRIC_KEYS``: "aji", "aji_plus", "dice", "ahd" (pixels, may be NaN),
        "pq", "dq", "sq", "precision", "recall", "f1", "n_true", "n_pred" (nucleus counts, as floats).
    """
    ov = InstanceOverlap(*check_instance_pair(gt, pred))
    pq = _pq(ov, _check_threshold(iou_threshold))
    det = _detection(pq, ov.both_empty)
    return {
        "aji": _aji(ov),
        "aji_plus": _aji_plus(ov),
        "dice": _dice(ov),
        "ahd": _ahd(ov),
        "pq": pq["pq"],
        "dq": pq["dq"],
        "sq": pq["sq"],
        "precision": det["precision"],
        "recall": det["recall"],
        "f1": det["f1"],
        "n_true": float(ov.n_g),
        "n_pred": float(ov.n_p),
    }


_CACHE_SIZE = 16


_cache: list[tuple[tuple, np.ndarray, np.ndarray, dict[str, float]]] = []


_cache_lock = threading.Lock()


def _compact_copy(x: np.ndarray) -> np.ndarray:
    return x.astype(np.min_scalar_type(int(x.max()) if x.size else 0), copy=True)


def cached_instance_metrics(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """``instance_metrics`` memoised on the *content* of the last few (gt, pred) pairs.

    Several ``NucleiInstanceMetric`` handlers (one per metric name) see the same images in every iteration,
    usually as different tensor objects (``from_engine`` builds new lists, MONAI unsqueezes each item), so the
    memo compares pixel values (with a cheap sum fingerprint first), never object ids.
    """
    key = (gt.shape, int(gt.sum(dtype=np.int64)), int(pred.sum(dtype=np.int64)))
    with _cache_lock:
        for i, (k, g, p, result) in enumerate(_cache):
            if k == key and np.array_equal(g, gt) and np.array_equal(p, pred):
                _cache.append(_cache.pop(i))
                return dict(result)
    result = instance_metrics(gt, pred)
    with _cache_lock:
        _cache.append((key, _compact_copy(gt), _compact_copy(pred), dict(result)))
        del _cache[:-_CACHE_SIZE]
    return result


def _batch_maps(x: Any, name: str) -> np.ndarray:
    """A batch of instance maps ``(B, 1, H, W)`` or ``(B, H, W)`` as numpy ``(B, H, W)``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        x = x.numpy()
    x = np.asarray(x)
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"{name} must have one channel, (B, 1, H, W), got shape {tuple(x.shape)}.")
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"{name} must be a batch of instance maps (B, 1, H, W) or (B, H, W), got {tuple(x.shape)}.")
    return x


class NucleiInstanceMetric(CumulativeIterationMetric):
    """One of ``instance_metrics``' values per image, as a MONAI cumulative metric.

    Each call on a batch appends the per-image values ``(B, 1)`` to the buffer; ``aggregate()`` is their
    NaN-aware mean (images whose value is NaN, e.g. AHD with no overlapped nucleus, are skipped; NaN if all
    are). The per-image values are memoised on the maps' content, so several instances with different
    ``metric_name`` on the same batch compute the metrics once.

    Floating-point maps whose values are whole numbers (as MONAI's loaders give label images) are accepted.

    Args:
        metric_name: one of ``INSTANCE_METRIC_KEYS`` ("aji", "aji_plus", "dice", "ahd", "pq", "dq", "sq",
            "precision", "recall", "f1", "n_true", "n_pred").
    """

    def __init__(self, metric_name: str) -> None:
        super().__init__()
        if metric_name not in INSTANCE_METRIC_KEYS:
            raise ValueError(f"metric_name must be one of {INSTANCE_METRIC_KEYS}, got {metric_name!r}.")
        self.metric_name = metric_name

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Per-image values ``(B, 1)`` (float32) for predicted and reference instance maps ``(B, 1, H, W)``."""
        if y is None:
            raise ValueError("y (the reference instance maps) is required.")
        preds, gts = _batch_maps(y_pred, "y_pred"), _batch_maps(y, "y")
        if preds.shape != gts.shape:
            raise ValueError(f"y_pred and y must have the same shape, got {preds.shape} and {gts.shape}.")
        values = []
        for p, g in zip(preds, gts):
            g, p = check_instance_pair(g, p, allow_integral_float=True)
            values.append(cached_instance_metrics(g, p)[self.metric_name])
        device = y_pred.device if isinstance(y_pred, torch.Tensor) else None
        return torch.tensor(values, dtype=torch.float32, device=device).reshape(-1, 1)

    def aggregate(self) -> torch.Tensor:
        """NaN-aware mean of the buffered per-image values (a scalar tensor)."""
        data = self.get_buffer()
        if data is None:
            raise RuntimeError(f"nothing to aggregate for {self.metric_name!r}: call the metric on a batch first.")
        return torch.nanmean(torch.as_tensor(data).float())


class NucleiMetricHandler(IgniteMetricHandler):
    """Ignite handler computing one nucleus instance metric (mean over images) on an evaluator.

    For a MONAI bundle evaluator::

        "additional_metrics": {
            "aji": {"_target_": "custom.evaluation.metrics.NucleiMetricHandler", "metric_name": "aji",
                    "output_transform": "$monai.handlers.from_engine(['pred_instances', 'label'])"}}

    With ``save_details`` the per-image values ``(N, 1)`` go to ``engine.state.metric_details[name]``,
    which MONAI's ``MetricsSaver`` writes as ``<name>_raw.csv`` (and summaries).

    Args:
        metric_name: one of ``INSTANCE_METRIC_KEYS``.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)`` instance maps.
        save_details: keep the per-image values in ``engine.state.metric_details``.
    """

    def __init__(self, metric_name: str, output_transform: Callable = lambda x: x, save_details: bool = True) -> None:
        super().__init__(
            metric_fn=NucleiInstanceMetric(metric_name), output_transform=output_transform, save_details=save_details
        )
