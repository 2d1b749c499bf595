"""Snapshots of the corrected planes for Live mode: only changed planes are copied, and a
snapshot never changes after it is taken."""

from __future__ import annotations

import numpy as np

from napari_unet.labels.plane_snapshots import PlaneSnapshots, plane_copy


def test_first_snapshot_copies_the_corrected_planes_only():
    data = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    snaps = PlaneSnapshots()
    snaps.mark(None, 1.0)
    assert snaps.pending and snaps.since == 1.0
    planes = snaps.take(data, [2, (1, 3)])
    assert snaps.version == 1 and not snaps.pending and snaps.since is None
    assert set(planes) == {2, (1, 3)}
    np.testing.assert_array_equal(planes[2], data[2])
    np.testing.assert_array_equal(planes[(1, 3)], data[:, 3])
    data[2, 0, 0] = 999  # the user paints on: the snapshot is a copy
    assert planes[2][0, 0] != 999


def test_only_changed_planes_are_copied_again():
    data = np.zeros((5, 8, 8), np.uint16)
    data[1, 2:4, 2:4] = 3
    snaps = PlaneSnapshots()
    snaps.mark(None, 0.0)
    first = snaps.take(data, [1, 3])
    data[3, 5, 5] = 7
    snaps.mark({3}, 2.0)
    second = snaps.take(data, [1, 3])
    assert snaps.version == 2
    assert second[1] is first[1]  # not marked: shared, not copied
    assert second[3] is not first[3] and second[3][5, 5] == 7
    assert first[3][5, 5] == 0  # the earlier snapshot is as it was


def test_nothing_changed_gives_no_snapshot_and_no_new_version():
    data = np.ones((3, 4, 4), np.uint8)
    snaps = PlaneSnapshots()
    snaps.mark(None, 0.0)
    snaps.take(data, [0])
    snaps.mark(None, 1.0)  # e.g. an undo elsewhere: every plane is compared, none differs
    assert snaps.take(data, [0]) is None
    assert snaps.version == 1 and not snaps.pending


def test_marking_and_unmarking_a_plane_changes_the_snapshot():
    data = np.ones((3, 4, 4), np.uint8)
    snaps = PlaneSnapshots()
    snaps.mark(None, 0.0)
    snaps.take(data, [0])
    snaps.mark((), 1.0)  # a slice newly marked corrected (no paint)
    assert set(snaps.take(data, [0, 2])) == {0, 2}
    snaps.mark((), 2.0)
    assert set(snaps.take(data, [2])) == {2}
    assert snaps.version == 3


def test_2d_labels_are_one_plane_and_out_of_range_planes_are_skipped():
    data = np.zeros((6, 7), np.int32)
    data[1, 1] = 4
    snaps = PlaneSnapshots()
    snaps.mark({0}, 0.0)
    planes = snaps.take(data, [0])
    assert list(planes) == [0] and planes[0].shape == (6, 7) and planes[0][1, 1] == 4
    stack = np.zeros((2, 3, 3), np.uint8)
    other = PlaneSnapshots()
    other.mark(None, 0.0)
    assert set(other.take(stack, [1, 5, (2, 9)])) == {1}
    np.testing.assert_array_equal(plane_copy(stack, (2, 1)), stack[:, :, 1])
