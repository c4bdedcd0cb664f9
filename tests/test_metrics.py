"""Nucleus instance metrics: hand-derived small cases, reference implementations, MONAI/Ignite wrappers."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.handlers import MetricsSaver, from_engine
from monai.metrics import compute_panoptic_quality
from PIL import Image
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import directed_hausdorff

import custom.evaluation.metrics as M
from custom.evaluation.metrics import INSTANCE_METRIC_KEYS, METRIC_NAMES, NucleiInstanceMetric, NucleiMetricHandler, ahd, aji, aji_plus, detection_scores, dice_foreground, instance_metrics, panoptic_quality
from tests.conftest import require_monuseg


def square(shape, boxes) -> np.ndarray:
    """Instance map with ``{id: (r0, r1, c0, c1)}`` half-open boxes painted in order."""
    out = np.zeros(shape, np.int32)
    for k, (r0, r1, c0, c1) in boxes.items():
        out[r0:r1, c0:c1] = k
    return out


def discs(size: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((size, size), np.int32)
    for k in range(1, n + 1):
        cy, cx, r = rng.integers(4, size - 4), rng.integers(4, size - 4), rng.integers(3, 8)
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    return out


def perturb(gt: np.ndarray) -> np.ndarray:
    """Shifted copy with a few nuclei dropped, a few merged, one split and a false positive."""
    pred = np.roll(gt, (1, -2), axis=(0, 1)) * 3 + 5 * (np.roll(gt, (1, -2), axis=(0, 1)) > 0)  # new, sparse ids
    ids = np.unique(pred)[1:]
    pred[np.isin(pred, ids[:2])] = 0  # dropped
    pred[np.isin(pred, ids[2:5])] = ids[2]  # merged
    rows = np.nonzero(pred == ids[6])[0]
    pred[(pred == ids[6]) & (np.arange(gt.shape[0])[:, None] < np.median(rows))] = 999  # split
    pred[2:6, 2:6] = 1000  # false positive (or overlap)
    return pred


def assert_metrics(result: dict, expected: dict) -> None:
    for key, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(result[key]), key
        else:
            assert result[key] == pytest.approx(value, abs=1e-12), key


# --------------------------------------------------------------------------------------------------------------
# hand-derived cases
# --------------------------------------------------------------------------------------------------------------


def test_perfect_prediction_with_other_ids():
    gt = square((20, 20), {1: (0, 10, 0, 10), 2: (12, 18, 12, 19)})
    pred = square((20, 20), {7: (0, 10, 0, 10), 3: (12, 18, 12, 19)})  # same nuclei, different ids
    expected = {k: 1.0 for k in METRIC_NAMES} | {"ahd": 0.0, "n_true": 2.0, "n_pred": 2.0}
    assert_metrics(instance_metrics(gt, pred), expected)
    assert set(instance_metrics(gt, pred)) == set(INSTANCE_METRIC_KEYS)


def test_empty_prediction_and_both_empty():
    gt = square((20, 20), {1: (0, 10, 0, 10)})
    empty = np.zeros_like(gt)
    # AJI: C = 0, U = |G| = 100 -> 0. PQ: TP 0, FN 1 -> DQ 0, SQ 0 (no TP). precision: 0/0 -> 0 (not both empty).
    # AHD: no ground-truth nucleus is overlapped -> NaN.
    expected = {k: 0.0 for k in METRIC_NAMES} | {"ahd": float("nan"), "n_true": 1.0, "n_pred": 0.0}
    assert_metrics(instance_metrics(gt, empty), expected)
    # the reverse (only false positives): every score 0, AHD NaN
    assert_metrics(instance_metrics(empty, gt), expected | {"n_true": 0.0, "n_pred": 1.0})
    # both empty: the prediction is exactly right -> 1.0 everywhere (our convention), AHD NaN, counts 0
    both = {k: 1.0 for k in METRIC_NAMES} | {"ahd": float("nan"), "n_true": 0.0, "n_pred": 0.0}
    assert_metrics(instance_metrics(empty, empty), both)
    assert panoptic_quality(empty, empty) == {"pq": 1.0, "dq": 1.0, "sq": 1.0, "tp": 0, "fp": 0, "fn": 0}


def test_one_nucleus_split_in_two():
    gt = square((12, 12), {1: (0, 10, 0, 10)})  # 10 x 10 = 100 px
    pred = square((12, 12), {1: (0, 10, 0, 3), 2: (0, 10, 3, 10)})  # 30 px (IoU 0.3) and 70 px (IoU 0.7)
    # AJI: best P = P2: C = 70, U = 100; P1 never used: U += 30 -> 70 / 130. AJI+ picks the same pair.
    # Dice: the foregrounds coincide -> 1. PQ: only P2 has IoU > 0.5: TP 1, FP 1, FN 0 -> DQ = 1 / 1.5,
    # SQ = 0.7, PQ = 0.7 / 1.5; precision 1/2, recall 1, F1 = 2 / 3.
    # AHD: G -> P1∩G (cols 0-2): farthest G pixel is col 9, 9 - 2 = 7; G -> P2∩G (cols 3-9): col 0 -> 3; max 7.
    expected = {
        "aji": 70 / 130, "aji_plus": 70 / 130, "dice": 1.0, "ahd": 7.0, "pq": 0.7 / 1.5, "dq": 1 / 1.5, "sq": 0.7,
        "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "n_true": 1.0, "n_pred": 2.0,
    }  # fmt: skip
    assert_metrics(instance_metrics(gt, pred), expected)


def test_two_nuclei_merged_into_one_prediction():
    gt = square((12, 16), {1: (0, 10, 0, 10), 2: (0, 10, 10, 14)})  # |G1| = 100, |G2| = 40
    pred = square((12, 16), {5: (0, 10, 0, 14)})  # |P| = 140 = G1 ∪ G2
    # Authors' AJI: P is the best (only) match of BOTH G1 and G2 and counts once per G:
    #   C = 100 + 40 = 140, U = 140 + 140 = 280 -> AJI = 0.5.
    # This test FAILS for an implementation forbidding a P from serving two G: it would give
    #   C = 100, U = 140 + |G2| = 180 -> 5/9 (or 40 / 240 = 1/6 if G2 took P first).
    assert aji(gt, pred) == pytest.approx(0.5, abs=1e-12)
    # AJI+ (one-to-one, max IoU): P -> G1 (IoU 100/140 > 40/140); G2 unmatched: C = 100, U = 140 + 40 -> 5/9
    assert aji_plus(gt, pred) == pytest.approx(5 / 9, abs=1e-12)
    # PQ: IoU(G1, P) = 5/7 > 0.5 -> TP 1, FN 1 (G2): DQ = 1 / 1.5 = 2/3, SQ = 5/7; precision 1, recall 1/2.
    # AHD: P ∩ G = G for both -> 0. Dice: same foreground -> 1.
    expected = {
        "aji": 0.5, "aji_plus": 5 / 9, "dice": 1.0, "ahd": 0.0, "pq": 2 / 3 * 5 / 7, "dq": 2 / 3, "sq": 5 / 7,
        "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "n_true": 2.0, "n_pred": 1.0,
    }  # fmt: skip
    assert_metrics(instance_metrics(gt, pred), expected)


def test_false_positive_added_to_perfect_prediction():
    gt = square((20, 20), {1: (0, 10, 0, 10)})  # 100 px
    pred = square((20, 20), {1: (0, 10, 0, 10), 2: (14, 19, 14, 19)})  # + a 5 x 5 = 25 px false positive
    # AJI = AJI+ = 100 / (100 + 25) = 0.8; Dice = 2 * 100 / (100 + 125) = 8/9;
    # TP 1, FP 1: DQ = 1 / 1.5, SQ = 1, precision 1/2, recall 1; AHD ignores false positives -> 0.
    expected = {
        "aji": 0.8, "aji_plus": 0.8, "dice": 8 / 9, "ahd": 0.0, "pq": 2 / 3, "dq": 2 / 3, "sq": 1.0,
        "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "n_true": 1.0, "n_pred": 2.0,
    }  # fmt: skip
    assert_metrics(instance_metrics(gt, pred), expected)


def test_pq_match_requires_iou_strictly_above_threshold():
    gt = square((12, 12), {1: (0, 10, 0, 10)})  # 100 px
    half = square((12, 12), {1: (0, 10, 0, 5)})  # IoU = 50 / 100 = 0.5 exactly -> no match
    assert panoptic_quality(gt, half) == {"pq": 0.0, "dq": 0.0, "sq": 0.0, "tp": 0, "fp": 1, "fn": 1}
    assert detection_scores(gt, half)["f1"] == 0.0
    more = half.copy()
    more[0, 5] = 1  # IoU = 51 / 100 = 0.51 -> a match: DQ 1, SQ = PQ = 0.51
    assert panoptic_quality(gt, more) == pytest.approx({"pq": 0.51, "dq": 1.0, "sq": 0.51, "tp": 1, "fp": 0, "fn": 0})
    # a lower threshold (Hungarian matching) accepts the IoU-0.5 pair; MONAI agrees on both
    assert panoptic_quality(gt, half, iou_threshold=0.4)["tp"] == 1
    for p, tp in ((half, 0), (more, 1)):
        cm = compute_panoptic_quality(torch.as_tensor(p), torch.as_tensor(gt), output_confusion_matrix=True)
        assert int(cm[0]) == tp


def test_ahd_hand_computed():
    # G1 (rows 0-9, cols 0-9) is half covered by P1 (cols 0-4, which also spills out of G1 below):
    #   the farthest G1 pixel (col 9) is 9 - 4 = 5 px from P1 ∩ G1.
    # G2 (rows 0-9, cols 12-21) is touched by P2 in its corner pixel (0, 12) only: the farthest G2 pixel
    #   (9, 21) is sqrt(9^2 + 9^2) = 9 sqrt(2) away. G3 has no overlapping prediction: skipped.
    gt = square((30, 30), {1: (0, 10, 0, 10), 2: (0, 10, 12, 22), 3: (20, 25, 20, 25)})
    pred = square((30, 30), {1: (0, 15, 0, 5), 2: (0, 1, 12, 13)})
    assert ahd(gt, pred) == pytest.approx((5 + 9 * math.sqrt(2)) / 2, abs=1e-12)
    # with a second prediction inside G1 further away, G1 takes the max over its predictions
    pred[0:10, 9] = 3  # P3 ∩ G1 = col 9: farthest G1 pixel (col 0) is 9 px away
    assert ahd(gt, pred) == pytest.approx((9 + 9 * math.sqrt(2)) / 2, abs=1e-12)
    assert math.isnan(ahd(gt, np.zeros_like(gt)))


# --------------------------------------------------------------------------------------------------------------
# reference implementations on random maps
# --------------------------------------------------------------------------------------------------------------


def reference_aji_and_ahd(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """Literal per-nucleus loops of the authors' evaluation code (AJI and scipy directed_hausdorff AHD)."""
    c = u = 0
    used: set[int] = set()
    per_gt = []
    for g in np.unique(gt)[1:]:
        gm = gt == g
        cands = np.unique(pred[gm])
        cands = cands[cands > 0]
        if cands.size == 0:
            u += gm.sum()
            continue
        best, best_iou = None, 0.0
        for p in cands:  # strict ">" over increasing ids: ties go to the smallest id
            iou = (gm & (pred == p)).sum() / (gm | (pred == p)).sum()
            if iou > best_iou:
                best, best_iou = p, iou
        c += (gm & (pred == best)).sum()
        u += (gm | (pred == best)).sum()
        used.add(int(best))
        g_coords = np.argwhere(gm)
        per_gt.append(max(directed_hausdorff(g_coords, np.argwhere(gm & (pred == p)))[0] for p in cands))
    u += sum((pred == p).sum() for p in np.unique(pred)[1:] if int(p) not in used)
    return c / u, float(np.mean(per_gt))


def reference_aji_plus(gt: np.ndarray, pred: np.ndarray) -> float:
    """HoVer-Net style: Hungarian on the full IoU matrix, pairs with IoU > 0 kept."""
    gi, pi = np.unique(gt)[1:], np.unique(pred)[1:]
    inter = np.array([[(gt == g)[pred == p].sum() for p in pi] for g in gi], float)
    union = np.array([[((gt == g) | (pred == p)).sum() for p in pi] for g in gi], float)
    r, c = linear_sum_assignment(-(inter / union))
    keep = inter[r, c] > 0
    r, c = r[keep], c[keep]
    unmatched_g = sum((gt == g).sum() for k, g in enumerate(gi) if k not in set(r))
    unmatched_p = sum((pred == p).sum() for k, p in enumerate(pi) if k not in set(c))
    return inter[r, c].sum() / (union[r, c].sum() + unmatched_g + unmatched_p)


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_reference_implementations_and_monai(seed):
    gt = discs(96, 25, seed)
    pred = perturb(gt)
    result = instance_metrics(gt, pred)
    ref_aji, ref_ahd = reference_aji_and_ahd(gt, pred)
    assert result["aji"] == pytest.approx(ref_aji, abs=1e-12)
    assert result["ahd"] == pytest.approx(ref_ahd, abs=1e-9)
    assert result["aji_plus"] == pytest.approx(reference_aji_plus(gt, pred), abs=1e-12)
    # panoptic quality against MONAI (its 1e-6 smoothing term -> loose tolerance)
    g, p = torch.as_tensor(gt), torch.as_tensor(pred)
    tp, fp, fn, _ = compute_panoptic_quality(p, g, output_confusion_matrix=True).tolist()
    pq = panoptic_quality(gt, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (tp, fp, fn) and tp > 5 and fp > 0 and fn > 0
    for name in ("pq", "sq"):
        assert pq[name] == pytest.approx(float(compute_panoptic_quality(p, g, metric_name=name)), abs=1e-5)
    assert pq["dq"] == pytest.approx(float(compute_panoptic_quality(p, g, metric_name="rq")), abs=1e-5)
    # the single-metric functions agree with the all-at-once one; torch input is accepted
    assert aji(g, p) == result["aji"] and aji_plus(gt, pred) == result["aji_plus"]
    assert dice_foreground(gt, pred) == result["dice"]
    assert detection_scores(gt, pred)["precision"] == result["precision"] == tp / (tp + fp)


def test_input_validation():
    gt = square((8, 8), {1: (0, 4, 0, 4)})
    with pytest.raises(ValueError, match="same shape"):
        aji(gt, gt[:, :7])
    with pytest.raises(ValueError, match="pred must have an integer dtype"):
        instance_metrics(gt, gt.astype(np.float32))
    with pytest.raises(ValueError, match="gt must be a 2-D"):
        dice_foreground(gt[None], gt[None])
    with pytest.raises(ValueError, match="negative"):
        ahd(-gt, gt)
    with pytest.raises(ValueError, match="iou_threshold"):
        panoptic_quality(gt, gt, iou_threshold=1.0)
    with pytest.raises(ValueError, match="metric_name"):
        NucleiInstanceMetric("hausdorff")


# --------------------------------------------------------------------------------------------------------------
# MONAI metric and Ignite handlers
# --------------------------------------------------------------------------------------------------------------


def test_cumulative_metric_batches_lists_and_nanmean():
    gt = square((12, 12), {1: (0, 10, 0, 10)})
    split = square((12, 12), {1: (0, 10, 0, 3), 2: (0, 10, 3, 10)})  # AJI 7/13, AHD 7 (see above)
    metric = NucleiInstanceMetric("ahd")
    # (B, 1, H, W) float maps (as MONAI loaders give labels); the empty prediction has AHD NaN
    y_pred = torch.as_tensor(np.stack([split, np.zeros_like(gt)])[:, None], dtype=torch.float32)
    y = torch.as_tensor(np.stack([gt, gt])[:, None], dtype=torch.float32)
    values = metric(y_pred, y)
    assert values.shape == (2, 1) and values[0, 0] == 7.0 and torch.isnan(values[1, 0])
    metric([torch.as_tensor(gt)[None]], [torch.as_tensor(gt)[None]])  # list of (1, H, W): AHD 0
    assert metric.aggregate().item() == pytest.approx((7 + 0) / 2)  # NaN image skipped
    counts = NucleiInstanceMetric("n_pred")
    counts(torch.as_tensor(split)[None], torch.as_tensor(gt)[None])  # (B, H, W)
    assert counts.aggregate().item() == 2.0
    with pytest.raises(ValueError, match="integer values"):
        metric(y_pred + 0.5, y)
    with pytest.raises(RuntimeError, match="nothing to aggregate"):
        NucleiInstanceMetric("aji").aggregate()


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # MONAI's row mean of the NaN AHD image
def test_handlers_write_per_image_details(tmp_path, monkeypatch):
    gt = square((12, 16), {1: (0, 10, 0, 10), 2: (0, 10, 10, 14)})
    images = {
        "perfect": (gt, gt),
        "merged": (gt, square((12, 16), {5: (0, 10, 0, 14)})),  # AJI 0.5 (see above)
        "empty": (gt, np.zeros_like(gt)),  # AJI 0, AHD NaN
    }
    expected = {name: instance_metrics(g, p) for name, (g, p) in images.items()}

    def batch(names):
        return {
            "name": names,
            "label": torch.as_tensor(np.stack([images[n][0] for n in names])[:, None]),
            "pred_instances": torch.as_tensor(np.stack([images[n][1] for n in names])[:, None]),
        }

    calls = []
    real = M.instance_metrics
    monkeypatch.setattr(M, "instance_metrics", lambda g, p: calls.append(1) or real(g, p))
    M._cache.clear()

    engine = Engine(lambda engine, b: b)
    transform = from_engine(["pred_instances", "label"])
    handlers = {name: NucleiMetricHandler(name, output_transform=transform) for name in ("aji", "ahd", "pq")}
    for name, handler in handlers.items():
        handler.attach(engine, name)
    saver = MetricsSaver(
        str(tmp_path),
        metric_details="*",
        batch_transform=lambda b: [{"filename_or_obj": n} for n in b["name"]],
        summary_ops=["mean", "notnans"],
    )
    saver.attach(engine)
    engine.run([batch(["perfect", "merged"]), batch(["empty"])], max_epochs=1)

    assert len(calls) == 3  # once per image although three handlers read every image
    metrics = engine.state.metrics
    assert metrics["aji"] == pytest.approx((1.0 + 0.5 + 0.0) / 3, abs=1e-6)
    assert metrics["ahd"] == pytest.approx(0.0)  # nanmean over (0, 0, NaN)
    assert metrics["pq"] == pytest.approx(np.mean([expected[n]["pq"] for n in images]), abs=1e-6)
    for name in ("aji", "ahd", "pq"):
        with open(tmp_path / f"{name}_raw.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["filename", "class0", "mean"]
        assert [r[0] for r in rows[1:]] == list(images)
        for row in rows[1:]:
            value = expected[row[0]][name]
            assert (row[1] == "nan") if math.isnan(value) else float(row[1]) == pytest.approx(value, abs=1e-4)
        assert (tmp_path / f"{name}_summary.csv").is_file()
    with open(tmp_path / "metrics.csv") as f:
        assert {r[0] for r in csv.reader(f)} == {"aji", "ahd", "pq"}


# --------------------------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------------------------


def test_real_monuseg_label():
    root = require_monuseg()
    path = min((root / "labels").glob("*.png"))
    gt = np.array(Image.open(path))
    result = instance_metrics(gt, gt)
    assert_metrics(result, {k: 1.0 for k in METRIC_NAMES} | {"ahd": 0.0})
    n = int(result["n_true"])
    assert n > 100
    # remove one nucleus: it adds its area a to U only, every other nucleus matches itself:
    #   AJI = (S - a) / S with S the total nucleus area; PQ: TP n - 1, FN 1; Dice = 2 (S - a) / (2 S - a)
    ids, areas = np.unique(gt[gt > 0], return_counts=True)
    pred = gt.copy()
    pred[gt == ids[10]] = 0
    s, a = int(areas.sum()), int(areas[10])
    removed = instance_metrics(gt, pred)
    assert removed["aji"] == pytest.approx((s - a) / s, abs=1e-12)
    assert removed["aji_plus"] == pytest.approx((s - a) / s, abs=1e-12)
    assert removed["dice"] == pytest.approx(2 * (s - a) / (2 * s - a), abs=1e-12)
    assert removed["dq"] == pytest.approx((n - 1) / (n - 0.5), abs=1e-12)
    assert removed["recall"] == pytest.approx((n - 1) / n, abs=1e-12)
    assert removed["ahd"] == 0.0 and removed["n_pred"] == n - 1
