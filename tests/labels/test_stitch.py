"""A 2D model's instances on a stack: per slice, stitched through z by overlap."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.labels.stitch import stitch_slices


def _disk(shape, center, radius):
    yy, xx = np.indices(shape)
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius ** 2


def _stack():
    """20 slices: a disk drifting slowly (one object), a disk that jumps far away at z=10
    (two objects), a disk only in z 3-6 and again in z 14-17 at the same place (two objects,
    the slices between are empty), and background noise of small ids."""
    stack = np.zeros((20, 64, 64), np.int64)
    for z in range(20):
        stack[z][_disk((64, 64), (15, 10 + z), 6)] = 1
        stack[z][_disk((64, 64), (45, 15 if z < 10 else 50), 6)] = 2
        if 3 <= z <= 6 or 14 <= z <= 17:
            stack[z][_disk((64, 64), (20, 52), 5)] = 7
    return stack


def test_stitching_follows_overlap_and_never_bridges_gaps():
    stack = _stack()
    out = stitch_slices(stack, 0.25)
    drifting = {int(out[z, 15, 10 + z]) for z in range(20)}
    assert len(drifting) == 1
    assert out[9, 45, 15] != out[10, 45, 50]
    assert out[5, 20, 52] != out[15, 20, 52]
    assert out.max() == 5
    # every object is continuous in z and overlaps itself between consecutive slices
    for label in range(1, int(out.max()) + 1):
        zs = np.flatnonzero((out == label).any(axis=(1, 2)))
        assert np.array_equal(zs, np.arange(zs[0], zs[-1] + 1))
        for z in zs[:-1]:
            assert np.any((out[z] == label) & (out[z + 1] == label))


def test_threshold_zero_keeps_objects_per_slice():
    stack = _stack()
    out = stitch_slices(stack, 0)
    n_per_slice = [len(np.unique(s)) - 1 for s in stack]
    assert out.max() == sum(n_per_slice)
    for label in range(1, int(out.max()) + 1):
        assert np.count_nonzero((out == label).any(axis=(1, 2))) == 1


def test_a_high_threshold_cuts_a_fast_drift():
    stack = np.zeros((3, 40, 40), np.int64)
    for z in range(3):
        stack[z][_disk((40, 40), (20, 10 + 6 * z), 6)] = 3
    assert stitch_slices(stack, 0.1).max() == 1
    assert stitch_slices(stack, 0.5).max() == 3


def test_one_object_continues_into_one_object_only():
    stack = np.zeros((2, 20, 40), np.int64)
    stack[0, 5:15, 5:35] = 1
    stack[1, 5:15, 5:19] = 1   # the object splits in two in the next slice
    stack[1, 5:15, 21:35] = 2
    out = stitch_slices(stack, 0.25)
    assert out.max() == 2
    assert out[1, 10, 10] != out[1, 10, 30]
    assert out[0, 10, 10] in (out[1, 10, 10], out[1, 10, 30])


def test_needs_a_stack():
    with pytest.raises(ValueError, match="stack"):
        stitch_slices(np.zeros((8, 8), np.int64))
