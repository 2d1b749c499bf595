"""Tests for :mod:`napari_unet.labels.metrics` on hand-computed examples."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_unet.labels import metrics


def squares(shape, corners, size, ids=None) -> np.ndarray:
    labels = np.zeros(shape, np.uint16)
    for k, (r, c) in enumerate(corners):
        labels[r:r + size, c:c + size] = (ids[k] if ids else k + 1)
    return labels


def test_dice_and_iou_hand_computed():
    gt = np.zeros((10, 10), bool)
    gt[0:4, 0:5] = True  # 20 px
    pred = np.zeros((10, 10), np.uint8)
    pred[2:6, 0:5] = 3  # 20 px, 10 overlap
    assert metrics.dice(pred, gt) == pytest.approx(2 * 10 / 40)
    assert metrics.iou(pred, gt) == pytest.approx(10 / 30)
    assert metrics.dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert metrics.iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert metrics.dice(gt, np.zeros_like(gt)) == 0.0


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        metrics.dice(np.zeros((4, 5)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        metrics.match_instances(np.zeros((4, 5), int), np.zeros((5, 4), int))
    with pytest.raises(ValueError):
        metrics.evaluate(np.zeros((4, 5)), np.zeros((4, 5, 1)))


def test_perfect_prediction_with_different_ids():
    gt = squares((30, 30), [(2, 2), (15, 15), (2, 20)], 6)
    pred = squares((30, 30), [(2, 2), (15, 15), (2, 20)], 6, ids=[40, 7, 1000])
    scores = metrics.match_instances(pred, gt)
    assert (scores.precision, scores.recall, scores.f1, scores.mean_matched_iou) == (1, 1, 1, 1)
    assert scores.true_positives == scores.n_pred == scores.n_gt == 3
    assert scores.false_positives == scores.false_negatives == 0


def test_one_missing_object():
    gt = squares((30, 30), [(2, 2), (15, 15)], 6)
    pred = squares((30, 30), [(2, 2)], 6)
    scores = metrics.match_instances(pred, gt)
    assert scores.recall == 0.5 and scores.precision == 1.0
    assert scores.f1 == pytest.approx(2 / 3)
    assert (scores.true_positives, scores.false_positives, scores.false_negatives) == (1, 0, 1)
    result = metrics.evaluate(pred, gt)
    assert result["dice"] == pytest.approx(2 * 36 / (36 + 72))
    assert result["iou"] == pytest.approx(0.5)
    assert result["recall"] == 0.5 and result["n_gt"] == 2 and result["n_pred"] == 1


def test_shifted_object_below_threshold_not_matched():
    gt = squares((20, 30), [(5, 5)], 10)
    pred = squares((20, 30), [(5, 11)], 10)  # overlap 10x4 = 40, union 160: IoU 0.25
    scores = metrics.match_instances(pred, gt)
    assert scores.true_positives == 0
    assert (scores.false_positives, scores.false_negatives) == (1, 1)
    assert scores.f1 == 0.0 and scores.mean_matched_iou == 0.0
    low = metrics.match_instances(pred, gt, iou_threshold=0.2)
    assert low.true_positives == 1
    assert low.mean_matched_iou == pytest.approx(0.25)


def test_low_threshold_matches_are_one_to_one():
    gt = squares((20, 20), [(0, 0)], 10)  # one 10x10 object
    pred = np.zeros((20, 20), np.uint8)
    pred[0:10, 0:4] = 1  # IoU 0.4
    pred[0:10, 4:10] = 2  # IoU 0.6
    scores = metrics.match_instances(pred, gt, iou_threshold=0.1)
    assert scores.true_positives == 1
    assert scores.mean_matched_iou == pytest.approx(0.6)
    assert scores.false_positives == 1


def test_hungarian_beats_greedy():
    # IoUs: g1-p2 = 6/14 (largest), g1-p1 = 4/10, g2-p2 = 4/10.  Greedy takes g1-p2 and
    # matches one pair; the optimal one-to-one matching takes g1-p1 and g2-p2.
    gt = np.zeros((1, 20), np.uint8)
    pred = np.zeros((1, 20), np.uint8)
    gt[0, 0:10], gt[0, 10:14] = 1, 2
    pred[0, 0:4], pred[0, 4:14] = 1, 2
    scores = metrics.match_instances(pred, gt, iou_threshold=0.2)
    assert scores.true_positives == 2
    assert scores.mean_matched_iou == pytest.approx(0.4)
    assert metrics.match_instances(pred, gt).true_positives == 0  # nothing above 0.5


def test_evaluate_auto_instances_and_format():
    mask_gt = np.zeros((10, 10), np.uint8)
    mask_gt[2:6, 2:6] = 1
    binary_only = metrics.evaluate(mask_gt, mask_gt)
    assert set(binary_only) == {"dice", "iou"}
    forced = metrics.evaluate(mask_gt, mask_gt, instances=True)
    assert forced["f1"] == 1.0 and forced["n_gt"] == 1
    gt = squares((30, 30), [(2, 2), (15, 15)], 6)
    scores = metrics.evaluate(gt, gt)
    for key in ("dice", "iou", "precision", "recall", "f1", "mean_matched_iou", "n_pred", "n_gt"):
        assert key in scores
    line = metrics.format_scores(scores)
    assert "\n" not in line
    assert line.startswith(
        "dice=1.000 iou=1.000 precision=1.000 recall=1.000 f1=1.000 mean_matched_iou=1.000"
    )
    assert "n_gt=2" in line


def test_empty_images():
    empty = np.zeros((8, 8), np.uint8)
    scores = metrics.match_instances(empty, empty)
    assert scores.f1 == 1.0 and scores.n_pred == scores.n_gt == 0
    one = empty.copy()
    one[2:4, 2:4] = 5
    missed = metrics.match_instances(empty, one)
    assert missed.recall == 0.0 and missed.f1 == 0.0 and missed.precision == 0.0


def test_3d_and_inputs_unchanged():
    gt = np.zeros((6, 10, 10), np.int32)
    gt[1:4, 1:4, 1:4] = 2
    gt[1:4, 5:9, 5:9] = 9
    pred = gt.copy()
    pred[pred == 9] = 0
    gt_copy, pred_copy = gt.copy(), pred.copy()
    scores = metrics.evaluate(pred, gt)
    assert scores["recall"] == 0.5
    np.testing.assert_array_equal(gt, gt_copy)
    np.testing.assert_array_equal(pred, pred_copy)


def test_many_objects_fast():
    gt = np.zeros((600, 600), np.uint32)
    ids = np.arange(1, 10001, dtype=np.uint32) * 7
    for k, (r, c) in enumerate((r, c) for r in range(0, 600, 6) for c in range(0, 600, 6)):
        gt[r:r + 4, c:c + 4] = ids[k]
    pred = np.roll(gt, 1, axis=1)  # every 4x4 object shifted by 1: IoU 12/20 = 0.6
    start = time.perf_counter()
    scores = metrics.match_instances(pred, gt)
    low = metrics.match_instances(pred, gt, iou_threshold=0.1)
    assert time.perf_counter() - start < 2.0
    assert scores.true_positives == low.true_positives == 10000
    assert scores.mean_matched_iou == pytest.approx(0.6)


label_images = arrays(
    np.uint16,
    st.tuples(st.integers(1, 16), st.integers(1, 16)),
    elements=st.integers(0, 20),
)


@settings(max_examples=60, deadline=None)
@given(label_images)
def test_self_comparison_is_perfect(labels):
    assert metrics.dice(labels, labels) == 1.0
    assert metrics.iou(labels, labels) == 1.0
    assert metrics.match_instances(labels, labels).f1 == 1.0
    assert metrics.match_instances(labels, labels, iou_threshold=0.1).f1 == 1.0


@settings(max_examples=60, deadline=None)
@given(label_images, st.data())
def test_scores_bounded_and_symmetric(gt, data):
    pred = data.draw(arrays(np.uint16, gt.shape, elements=st.integers(0, 20)))
    for threshold in (0.5, 0.2):
        scores = metrics.match_instances(pred, gt, iou_threshold=threshold)
        swapped = metrics.match_instances(gt, pred, iou_threshold=threshold)
        assert 0.0 <= scores.f1 <= 1.0
        assert scores.true_positives == swapped.true_positives
        assert scores.true_positives <= min(scores.n_pred, scores.n_gt)
    assert metrics.dice(pred, gt) == pytest.approx(metrics.dice(gt, pred))


# --- float and NaN inputs (issue 14) --------------------------------------------------------


def test_probability_maps_and_nan_are_refused_not_counted_as_foreground():
    gt = np.ones((6, 6), np.uint8)
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.dice(np.full((6, 6), np.nan), gt)
    with pytest.raises(ValueError, match="NaN or infinite"):
        metrics.evaluate(np.full((6, 6), np.nan), gt)
    with pytest.raises(ValueError, match="fractional values"):
        metrics.evaluate(np.full((6, 6), 0.7), squares((6, 6), [(0, 0), (3, 3)], 2))
    with pytest.raises(ValueError, match="^pred holds fractional values"):
        metrics.match_instances(np.full((6, 6), 0.7), gt)


def test_whole_number_floats_are_labels():
    gt = squares((20, 20), [(2, 2), (12, 12)], 5)
    scores = metrics.evaluate(gt.astype(np.float32), gt)
    assert scores["f1"] == 1.0 and scores["dice"] == 1.0
    np.testing.assert_array_equal(metrics.as_label_image(np.array([0.0, 3.0])), [0, 3])
    assert metrics.as_label_image(gt) is gt
