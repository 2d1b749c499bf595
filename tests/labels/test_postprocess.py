"""Tests for :mod:`napari_unet.postprocess` on small synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from napari_unet.labels import dtypes, edits, instances, statistics


def balls(shape, centres, radius, sampling=None) -> np.ndarray:
    """Union of discs / balls (radius in physical units when ``sampling`` is given)."""
    grid = np.indices(shape, dtype=np.float32)
    spacing = np.ones(len(shape)) if sampling is None else np.asarray(sampling, dtype=float)
    mask = np.zeros(shape, dtype=bool)
    for centre in centres:
        squared = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
        mask |= squared <= radius**2
    return mask


def probs(*channels: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(c, dtype=np.float32) for c in channels])


def n_objects(labels: np.ndarray) -> int:
    return len(np.setdiff1d(np.unique(labels), [0]))


def assert_sequential(labels: np.ndarray) -> None:
    ids = np.setdiff1d(np.unique(labels), [0])
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    assert labels.dtype == dtypes.smallest_uint_dtype(len(ids))


TWO_DISKS = balls((64, 96), [(32, 30), (32, 52)], 14)  # centres 22 apart: they overlap
TWO_BALLS = balls((36, 40, 64), [(18, 20, 22), (18, 20, 38)], 10)


# ----------------------------------------------------------------------------------------------
# dtype helpers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(0, np.uint8), (255, np.uint8), (256, np.uint16), (65535, np.uint16), (65536, np.uint32),
     (2**32, np.uint64)],
)
def test_smallest_uint_dtype(value, dtype):
    assert dtypes.smallest_uint_dtype(value) == np.dtype(dtype)


def test_smallest_uint_dtype_rejects_negative():
    with pytest.raises(ValueError):
        dtypes.smallest_uint_dtype(-1)


def test_relabel_sequential_keeps_order_and_shrinks_dtype():
    labels = np.array([[0, 70000, 70000], [5, 0, 300]], dtype=np.int64)
    out = dtypes.relabel_sequential(labels)
    np.testing.assert_array_equal(out, [[0, 3, 3], [1, 0, 2]])
    assert out.dtype == np.uint8
    many = np.arange(300, dtype=np.int32).reshape(15, 20) * 1000
    assert dtypes.relabel_sequential(many).dtype == np.uint16


def test_relabel_sequential_huge_ids():
    labels = np.array([[0, 2**62], [7, 2**62]], dtype=np.uint64)
    np.testing.assert_array_equal(dtypes.relabel_sequential(labels), [[0, 2], [1, 2]])


@settings(max_examples=40, deadline=None)
@given(arrays(np.int32, st.tuples(st.integers(1, 12), st.integers(1, 12)),
              elements=st.integers(0, 1000)))
def test_relabel_sequential_is_a_bijection(labels):
    original = labels.copy()
    out = dtypes.relabel_sequential(labels)
    np.testing.assert_array_equal(labels, original)
    assert_sequential(out)
    # same partition: the pairs (old id, new id) define a one-to-one map with 0 -> 0
    pairs = np.unique(np.stack([labels.ravel(), out.ravel().astype(np.int64)]), axis=1)
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
    assert np.all((pairs[0] == 0) == (pairs[1] == 0))


# ----------------------------------------------------------------------------------------------
# probabilities → binary / semantic
# ----------------------------------------------------------------------------------------------


def test_to_binary_and_to_semantic_per_task():
    p = np.array([[[0.2, 0.6], [0.5, 0.9]]], dtype=np.float16)
    np.testing.assert_array_equal(instances.to_binary(p, "foreground"), [[False, True], [False, True]])
    np.testing.assert_array_equal(instances.to_binary(p, "membranes", threshold=0.3),
                                  [[False, True], [True, True]])
    sem = instances.to_semantic(p, "foreground")
    assert sem.dtype == np.uint8
    np.testing.assert_array_equal(sem, [[0, 1], [0, 1]])
    boundary = np.concatenate([p, 1 - p])
    np.testing.assert_array_equal(instances.to_binary(boundary, "foreground_boundary"),
                                  instances.to_binary(p, "foreground"))


def test_semantic_argmax():
    classes = np.array([[0, 1, 2], [2, 2, 0]])
    p = np.eye(3, dtype=np.float32)[classes].transpose(2, 0, 1) * 0.7 + 0.1
    out = instances.to_semantic(p, "semantic")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, classes)
    np.testing.assert_array_equal(instances.to_binary(p, "semantic"), classes > 0)


def test_channel_count_and_task_are_checked():
    with pytest.raises(ValueError, match="channel"):
        instances.to_binary(np.zeros((2, 8, 8)), "foreground")
    with pytest.raises(ValueError, match="channel"):
        instances.to_instances(np.zeros((1, 8, 8)), "foreground_boundary")
    with pytest.raises(ValueError, match="task"):
        instances.to_binary(np.zeros((1, 8, 8)), "cells")
    with pytest.raises(ValueError, match="method"):
        instances.to_instances(np.zeros((1, 8, 8)), "foreground", method="magic")


# ----------------------------------------------------------------------------------------------
# probabilities → instances
# ----------------------------------------------------------------------------------------------


def test_foreground_touching_disks_split_2d():
    p = probs(TWO_DISKS)
    labels = instances.to_instances(p, "foreground")
    assert n_objects(labels) == 2
    assert_sequential(labels)
    np.testing.assert_array_equal(labels > 0, TWO_DISKS)
    # each disk centre gets a different label, and the cut lies near the contact line
    assert labels[32, 30] != labels[32, 52]
    assert labels[32, 36] == labels[32, 30] and labels[32, 46] == labels[32, 52]
    assert n_objects(instances.to_instances(p, "foreground", method="connected_components")) == 1


def test_foreground_touching_balls_split_3d():
    p = probs(TWO_BALLS).astype(np.float16)
    labels = instances.to_instances(p, "foreground")
    assert labels.shape == TWO_BALLS.shape
    assert n_objects(labels) == 2
    assert labels[18, 20, 22] != labels[18, 20, 38]
    assert n_objects(instances.to_instances(p, "foreground", method="connected_components")) == 1


def test_foreground_anisotropic_sampling():
    sampling = (2.0, 1.0, 1.0)  # z voxels twice as thick: balls are squashed in voxel space
    mask = balls((20, 40, 64), [(10, 20, 22), (10, 20, 38)], 10, sampling=sampling)
    labels = instances.to_instances(probs(mask), "foreground", sampling=sampling)
    assert n_objects(labels) == 2


def test_foreground_single_objects_not_split():
    rectangle = np.zeros((60, 90), bool)
    rectangle[10:30, 10:80] = True
    disk = balls((60, 90), [(45, 40)], 10)
    labels = instances.to_instances(probs(rectangle | disk), "foreground", min_size=5)
    assert n_objects(labels) == 2


def test_foreground_noisy_probabilities():
    rng = np.random.default_rng(0)
    mask = balls((96, 96), [(30, 30), (30, 52), (70, 70)], 12)
    noisy = np.clip(mask * 0.8 + rng.normal(0.1, 0.15, mask.shape), 0, 1)
    labels = instances.to_instances(probs(noisy), "foreground", min_size=30)
    assert n_objects(labels) == 3


def test_foreground_fills_holes_and_removes_small():
    mask = balls((48, 48), [(20, 20)], 12)
    mask[18:22, 18:22] = False  # hole
    mask[44:46, 44:46] = True  # speck of 4 pixels
    labels = instances.to_instances(probs(mask), "foreground", min_size=10)
    assert n_objects(labels) == 1
    assert labels[20, 20] == 1 and labels[45, 45] == 0


def test_foreground_boundary_seeds_split_touching_objects():
    # two squares that touch along a full side form one rectangle without any neck
    foreground = np.zeros((60, 100), np.float32)
    foreground[10:50, 10:90] = 0.9
    boundary = np.zeros_like(foreground)
    boundary[10:50, 49:51] = 0.8
    assert n_objects(instances.to_instances(probs(foreground), "foreground")) == 1
    labels = instances.to_instances(probs(foreground, boundary), "foreground_boundary")
    assert n_objects(labels) == 2
    np.testing.assert_array_equal(labels > 0, foreground > 0.5)  # boundary pixels assigned
    assert len(np.unique(labels[10:50, 10:49])) == 1
    assert len(np.unique(labels[10:50, 51:90])) == 1
    interiors = instances.to_instances(probs(foreground, boundary), "foreground_boundary",
                                method="connected_components")
    assert n_objects(interiors) == 2
    assert np.all(interiors[10:50, 49:51] == 0)


def test_foreground_boundary_small_seeds_removed():
    foreground = np.zeros((40, 60), np.float32)
    foreground[5:35, 5:55] = 1
    boundary = np.zeros_like(foreground)
    boundary[5:35, 29:31] = 1
    boundary[5:35, 5:10] = 1
    boundary[6:8, 6:8] = 0  # 4-pixel seed enclosed by boundary, which it would grow into
    p = probs(foreground, boundary)
    assert n_objects(instances.to_instances(p, "foreground_boundary", min_size=4)) == 3
    # min_size 40 drops seeds under 10 voxels: the sliver joins its neighbour
    assert n_objects(instances.to_instances(p, "foreground_boundary", min_size=40)) == 2


def test_membranes_grid_gives_cells():
    membrane = np.zeros((90, 120), np.float32)
    for row in (29, 59):
        membrane[row:row + 2, :] = 0.95
    for col in (29, 59, 89):
        membrane[:, col:col + 2] = 0.95
    labels = instances.to_instances(probs(membrane), "membranes")
    assert n_objects(labels) == 12  # 3 rows x 4 columns
    assert np.all(labels > 0)  # cells tile the image
    for row in (10, 45, 75):
        for col in (10, 45, 75, 105):
            block = labels[row - 5:row + 5, col - 5:col + 5]
            assert len(np.unique(block)) == 1
    assert n_objects(instances.to_instances(probs(membrane), "membranes",
                                     method="connected_components")) == 12
    roi = np.zeros(membrane.shape, bool)
    roi[:, :60] = True
    masked = instances.to_instances(probs(membrane), "membranes", mask=roi)
    assert n_objects(masked) == 6 and np.all(masked[:, 60:] == 0)


def test_membranes_3d():
    membrane = np.zeros((20, 40, 40), np.float32)
    membrane[9:11] = 1
    membrane[:, 19:21] = 1
    labels = instances.to_instances(probs(membrane), "membranes", min_size=10)
    assert n_objects(labels) == 4


def test_semantic_instances_unique_across_classes():
    classes = np.zeros((40, 60), int)
    classes[5:15, 5:15] = 1
    classes[5:15, 15:25] = 2  # touches the first class-1 object
    classes[25:35, 30:50] = 1
    p = np.eye(3, dtype=np.float32)[classes].transpose(2, 0, 1) * 0.8 + 0.1
    labels = instances.to_instances(p, "semantic")
    assert n_objects(labels) == 3
    assert len({labels[10, 10], labels[10, 20], labels[30, 40]}) == 3
    assert_sequential(labels)


def test_to_instances_does_not_modify_input():
    for task, p in [
        ("foreground", probs(TWO_DISKS)),
        ("foreground_boundary", probs(TWO_DISKS, np.zeros(TWO_DISKS.shape))),
        ("membranes", probs(~TWO_DISKS)),
        ("semantic", probs(~TWO_DISKS, TWO_DISKS)),
    ]:
        original = p.copy()
        instances.to_instances(p, task)
        instances.to_binary(p, task)
        instances.to_semantic(p, task)
        np.testing.assert_array_equal(p, original)


# ----------------------------------------------------------------------------------------------
# cleaning and editing
# ----------------------------------------------------------------------------------------------


def test_remove_small_objects_instances_and_binary():
    labels = np.zeros((20, 20), np.uint16)
    labels[2:10, 2:10] = 4  # 64 px
    labels[12:14, 12:14] = 9  # 4 px
    original = labels.copy()
    out = edits.remove_small_objects(labels, 10)
    np.testing.assert_array_equal(labels, original)
    assert out.dtype == labels.dtype
    assert set(np.unique(out)) == {0, 4}
    assert np.all(out[2:10, 2:10] == 4)

    binary = labels > 0
    out_binary = edits.remove_small_objects(binary, 10)
    assert out_binary.dtype == bool
    np.testing.assert_array_equal(out_binary, labels == 4)
    np.testing.assert_array_equal(binary, original > 0)


def test_fill_holes_per_instance_2d():
    labels = np.zeros((20, 30), np.uint8)
    labels[2:12, 2:12] = 3
    labels[5:8, 5:8] = 0  # hole in object 3
    labels[2:12, 15:25] = 5
    labels[5:8, 18:21] = 7  # object 7 inside object 5: not a hole
    labels[14:19, 2:28] = 2
    labels[14:19, 12] = 0  # a gap open to the outside is no hole
    labels[15:18, 13] = 0
    original = labels.copy()
    out = edits.fill_holes(labels)
    np.testing.assert_array_equal(labels, original)
    assert np.all(out[5:8, 5:8] == 3)
    assert np.all(out[5:8, 18:21] == 7)
    np.testing.assert_array_equal(out[14:19], original[14:19])

    binary = original > 0
    filled = edits.fill_holes(binary)
    assert filled.dtype == bool and filled[6, 6] and not binary[6, 6]


def test_fill_holes_3d():
    labels = np.zeros((12, 12, 12), np.uint16)
    labels[2:10, 2:10, 2:10] = 300
    labels[4:6, 4:6, 4:6] = 0  # enclosed cavity
    labels[6:8, 6:8, 2:10] = 0  # tunnel through the object: no 3D hole
    out = edits.fill_holes(labels)
    assert np.all(out[4:6, 4:6, 4:6] == 300)
    assert np.all(out[6:8, 6:8, :] == 0)


def test_delete_and_merge_labels():
    labels = np.array([[1, 1, 2], [3, 3, 2], [0, 4, 4]], dtype=np.uint8)
    original = labels.copy()
    deleted = edits.delete_label(labels, 2)
    np.testing.assert_array_equal(deleted, [[1, 1, 0], [3, 3, 0], [0, 4, 4]])
    merged = edits.merge_labels(labels, [4, 2, 3])
    np.testing.assert_array_equal(merged, [[1, 1, 2], [2, 2, 2], [0, 2, 2]])
    np.testing.assert_array_equal(edits.merge_labels(labels, [0, 3]), labels)
    np.testing.assert_array_equal(labels, original)


def test_split_label_with_seeds():
    labels = np.zeros((40, 40), np.uint8)
    labels[5:30, 5:30] = 7
    labels[32:38, 32:38] = 255  # forces new ids beyond uint8
    original = labels.copy()
    out = edits.split_label(labels, 7, [(10, 10), (25.2, 24.8)])
    np.testing.assert_array_equal(labels, original)
    assert out.dtype == np.uint16
    assert out[10, 10] == 7 and out[25, 25] == 256
    assert set(np.unique(out[labels == 7])) == {7, 256}
    assert min(np.sum(out == 7), np.sum(out == 256)) > 200  # a fair split of the square
    np.testing.assert_array_equal(out[labels != 7], labels[labels != 7])
    with pytest.raises(ValueError, match="not inside"):
        edits.split_label(labels, 7, [(10, 10), (35, 35)])
    with pytest.raises(ValueError):
        edits.split_label(labels, 9, None)


def test_split_label_automatic_2d_and_3d():
    labels = TWO_DISKS.astype(np.uint16) * 3
    out = edits.split_label(labels, 3)
    assert set(np.unique(out)) == {0, 3, 4}
    assert out[32, 30] != out[32, 52]
    labels3d = TWO_BALLS.astype(np.uint8) * 2
    out3d = edits.split_label(labels3d, 2)
    assert out3d[18, 20, 22] != out3d[18, 20, 38]
    assert n_objects(out3d) == 2


def test_split_label_square_automatic_still_splits():
    labels = np.zeros((30, 30), np.uint8)
    labels[5:25, 5:25] = 1
    assert n_objects(edits.split_label(labels, 1)) == 2


def test_binary_instance_conversion():
    mask = np.zeros((10, 10), bool)
    mask[1:3, 1:3] = True
    mask[6:9, 6:9] = True
    labels = edits.binary_to_instances(mask)
    assert labels.dtype == np.uint8 and n_objects(labels) == 2
    np.testing.assert_array_equal(edits.instances_to_binary(labels), mask)


def test_label_statistics():
    labels = np.zeros((4, 10, 10), np.uint16)
    labels[0:2, 0:5, 0:5] = 1  # 50 voxels
    labels[2:4, 5:10, 5:10] = 9  # 50 voxels
    labels[3, 0, 0] = 4  # 1 voxel
    stats = statistics.label_statistics(labels, voxel_size=(2.0, 0.5, 0.5))
    assert stats["objects"] == 3
    assert stats["voxels"] == 101
    assert stats["volume"] == pytest.approx(101 * 0.5)
    assert stats["mean_volume"] == pytest.approx(101 * 0.5 / 3)
    empty = statistics.label_statistics(np.zeros((5, 5), np.uint8))
    assert empty["objects"] == 0 and empty["mean_volume"] == 0.0
    assert statistics.label_statistics(labels > 0)["objects"] == 3


@settings(max_examples=30, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(2, 10), st.integers(2, 10), st.integers(1, 6)),
              elements=st.integers(0, 6)))
def test_editing_never_modifies_input(labels):
    original = labels.copy()
    edits.remove_small_objects(labels, 3)
    edits.fill_holes(labels)
    dtypes.relabel_sequential(labels)
    edits.merge_labels(labels, [1, 2])
    edits.delete_label(labels, 1)
    statistics.label_statistics(labels)
    if np.any(labels == 1):
        edits.split_label(labels, 1)
    np.testing.assert_array_equal(labels, original)
