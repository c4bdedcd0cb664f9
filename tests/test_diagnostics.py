"""Error analysis: the oracle splitting of a predicted foreground and the instance error counts."""

from __future__ import annotations

import numpy as np
import pytest

from custom.evaluation.error_analysis import ERROR_NAMES, oracle_split, segmentation_errors
from custom.evaluation.metrics import aji, dice_foreground


def _two_nuclei():
    """Two true nuclei side by side and one prediction that merges them, plus a halo pixel row."""
    gt = np.zeros((20, 30), np.int64)
    gt[5:15, 3:13], gt[5:15, 14:24] = 1, 2
    pred = np.zeros_like(gt)
    pred[4:15, 3:24] = 7  # one object over both (and a row above them)
    return gt, pred


def test_oracle_split_gives_each_pixel_its_nearest_true_nucleus():
    gt, pred = _two_nuclei()
    out = oracle_split(gt, pred)
    assert np.array_equal(out > 0, pred > 0)  # the foreground is kept exactly
    assert np.array_equal(out[gt > 0], gt[gt > 0])
    assert (out[4, 3:13] == 1).all() and (out[4, 14:24] == 2).all()  # the halo row goes to the nucleus below it
    assert aji(gt, out) > aji(gt, pred)
    assert dice_foreground(gt, out) == pytest.approx(dice_foreground(gt, pred))


def test_oracle_split_keeps_a_false_component_as_one_instance():
    gt, pred = _two_nuclei()
    pred[17:19, 26:29] = 3  # touches no true nucleus
    pred[0:2, 26:29] = 3  # the same id, but a separate component: its own instance
    out = oracle_split(gt, pred)
    lone = np.unique(out[(out > 0) & ~np.isin(out, [1, 2])])
    assert len(lone) == 2 and (lone > gt.max()).all()
    assert len(np.unique(out[17:19, 26:29])) == 1


def test_oracle_split_of_empty_maps():
    gt, _ = _two_nuclei()
    assert not oracle_split(gt, np.zeros_like(gt)).any()
    pred = np.zeros_like(gt)
    pred[1:3, 1:3] = 1
    out = oracle_split(np.zeros_like(gt), pred)
    assert np.array_equal(out > 0, pred > 0) and len(np.unique(out[out > 0])) == 1


def test_oracle_split_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        oracle_split(np.zeros((4, 4), np.int64), np.zeros((4, 5), np.int64))


def test_segmentation_errors_counts_each_kind():
    gt = np.zeros((40, 40), np.int64)
    gt[2:10, 2:10], gt[2:10, 11:19] = 1, 2  # merged by one prediction
    gt[20:30, 2:12] = 3  # split in two
    gt[30:36, 30:36] = 4  # missed
    gt[14:18, 30:34] = 5  # found
    pred = np.zeros_like(gt)
    pred[2:10, 2:19] = 1
    pred[20:30, 2:7], pred[20:30, 7:12] = 2, 3
    pred[14:18, 30:34] = 4
    pred[36:39, 2:5] = 5  # false
    e = segmentation_errors(gt, pred)
    assert list(e) == list(ERROR_NAMES)
    assert e == {"n_true": 5, "n_pred": 5, "merges": 1, "merged_true": 2, "split_true": 1, "missed_true": 1, "false_pred": 1}


def test_segmentation_errors_perfect_and_bad_arguments():
    gt, _ = _two_nuclei()
    e = segmentation_errors(gt, gt)
    assert (e["merges"], e["split_true"], e["missed_true"], e["false_pred"]) == (0, 0, 0, 0)
    with pytest.raises(ValueError, match="hold"):
        segmentation_errors(gt, gt, hold=0.4)
    with pytest.raises(ValueError, match="part"):
        segmentation_errors(gt, gt, part=1.0)
