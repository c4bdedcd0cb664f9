"""Where a segmentation loses AJI: foreground or splitting (error analysis against labels).

Two oracles, each fixing one half of the pipeline with the labels, bound what the other half can reach:

- :func:`oracle_split`: the *predicted foreground*, split into nuclei perfectly. Every predicted pixel
  of a connected component that touches a true nucleus is given to its nearest true nucleus; a
  component that touches none stays one (false) instance. Its AJI is the ceiling of any splitting of
  that foreground: what a perfect watershed would score.
- the *true foreground* through the same splitting (``custom.inference.postprocess.mask_to_instances`` of
  ``gt > 0``): the ceiling of that splitting with a perfect foreground.

:func:`segmentation_errors` counts the instance errors behind the gap: merges (one predicted nucleus
holding most of two or more true ones), splits (one true nucleus shared out among predictions),
missed true nuclei and false predictions.

Labels are read here only to diagnose; nothing in training or post-processing uses these functions.
Inputs are ``(H, W)`` instance maps as in :mod:`custom.evaluation.metrics` (0 background, positive ids nuclei).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from custom.evaluation.metrics import InstanceOverlap, check_instance_pair

__all__ = ['ERROR_NAMES', 'oracle_split', 'segmentation_errors']


ERROR_NAMES = ("n_true", "n_pred", "merges", "merged_true", "split_true", "missed_true", "false_pred")


"""Keys of :func:`segmentation_errors`, all counts of nuclei."""


_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def oracle_split(gt: Any, pred: Any) -> np.ndarray:
    """The foreground of ``pred`` split into nuclei by the labels (the splitting ceiling).

    Args:
        gt: ``(H, W)`` true instance map.
        pred: ``(H, W)`` predicted instance map; only its foreground ``pred > 0`` is used.

    Returns:
        ``(H, W)`` int64 instance map with the foreground of ``pred``: the pixels of each 8-connected
        component of it that overlaps a true nucleus carry the id of the nearest true nucleus (Euclidean,
        in pixels; a pixel inside a true nucleus carries that nucleus); each component that overlaps
        none is one instance with an id above ``gt.max()``.
    """
    gt, pred = check_instance_pair(gt, pred, allow_integral_float=True)
    gt = gt.astype(np.int64, copy=False)
    fg = pred > 0
    out = np.zeros(gt.shape, np.int64)
    if not fg.any():
        return out
    comp, n_comp = ndimage.label(fg, structure=_EIGHT_CONNECTED)
    touches = np.zeros(n_comp + 1, bool)
    touches[comp[fg & (gt > 0)]] = True
    touches[0] = False
    keep = touches[comp]
    if gt.any():
        _, (iy, ix) = ndimage.distance_transform_edt(gt == 0, return_indices=True)
        out[keep] = gt[iy[keep], ix[keep]]
    lone = fg & ~keep
    if lone.any():
        lone_ids, _ = ndimage.label(lone, structure=_EIGHT_CONNECTED)  # renumbered 1..k
        out[lone] = lone_ids[lone] + int(gt.max())
    return out


def segmentation_errors(gt: Any, pred: Any, hold: float = 0.5, part: float = 0.2) -> dict[str, int]:
    """Counts of the instance errors of ``pred`` against ``gt``.

    A prediction *holds* a true nucleus when it covers at least ``hold`` of its area; a true nucleus is
    *split* when two or more predictions each cover at least ``part`` of it, *missed* when all
    predictions together cover less than ``part`` of it; a prediction is *false* when less than
    ``part`` of its area lies on true nuclei.

    Args:
        gt, pred: ``(H, W)`` instance maps.
        hold: fraction in (0.5, 1] or 0.5: with at least one half, a true nucleus is held by one
            prediction at most.
        part: fraction in (0, 1).

    Returns:
        dict with the keys of ``ERROR_NAMES``: ``n_true``, ``n_pred``; ``merges`` (predictions holding
        two or more true nuclei) and ``merged_true`` (the true nuclei they hold); ``split_true``,
        ``missed_true``, ``false_pred``.
    """
    if not 0.5 <= float(hold) <= 1.0:
        raise ValueError(f"hold must be in [0.5, 1], got {hold!r}.")
    if not 0.0 < float(part) < 1.0:
        raise ValueError(f"part must be in (0, 1), got {part!r}.")
    gt, pred = check_instance_pair(gt, pred, allow_integral_float=True)
    ov = InstanceOverlap(gt, pred)
    g_frac = ov.inter / ov.g_area[ov.pair_g]  # share of each true nucleus in each overlapping prediction
    held_by = np.bincount(ov.pair_p[g_frac >= hold], minlength=ov.n_p)
    pieces = np.bincount(ov.pair_g[g_frac >= part], minlength=ov.n_g)
    g_covered = np.bincount(ov.pair_g, weights=ov.inter, minlength=ov.n_g) / np.maximum(ov.g_area, 1)
    p_on_true = np.bincount(ov.pair_p, weights=ov.inter, minlength=ov.n_p) / np.maximum(ov.p_area, 1)
    return {
        "n_true": ov.n_g,
        "n_pred": ov.n_p,
        "merges": int((held_by >= 2).sum()),
        "merged_true": int(held_by[held_by >= 2].sum()),
        "split_true": int((pieces >= 2).sum()),
        "missed_true": int((g_covered < part).sum()),
        "false_pred": int((p_on_true < part).sum()),
    }
