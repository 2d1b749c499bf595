"""Slice bookkeeping: paint strokes, corrected marks, the runs of slices that may be written."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from napari_unet.labels.slices import (
    clip_index,
    clip_point,
    free_runs,
    marks_outside,
    slice_list,
    touched_slices,
)


def test_free_runs_skip_protected_slices():
    assert free_runs(0, 8, {2, 5}) == [(0, 2), (3, 5), (6, 8)]
    assert free_runs(2, 4, {2, 3}) == []
    assert free_runs(0, 3, set()) == [(0, 3)]
    assert free_runs(4, 7, {0, 4}) == [(5, 7)]


def test_touched_slices_of_paint_atoms():
    atoms = [
        ((slice(2, 4), slice(0, 5), slice(0, 5)), None, 1),  # a slab
        ((np.array([5, 5, 7]), np.array([1, 2, 3]), np.array([0, 0, 0])), None, 1),  # a fill
        SimpleNamespace(slice_key=(9, slice(None), slice(None))),
        ((slice(0, None), slice(0, 5), slice(0, 5)), None, 1),  # open-ended: skipped
        ((slice(0, 2), slice(0, 5)), None, 1),  # fewer axes than the layer: skipped
    ]
    assert touched_slices(atoms, 3) == {2, 3, 5, 7, 9}
    assert touched_slices(None, 3) == set()
    # a 4D layer: the slice axis is the third from the end
    assert touched_slices([((0, 6, slice(0, 2), slice(0, 2)), None, 1)], 4) == {6}


def test_slice_lists_marks_and_clipping():
    assert slice_list([3, 1.0, np.int64(3)]) == [1, 3]
    assert marks_outside([1, 4, 6], range(3, 6)) == [1, 6]
    assert clip_index(-2.4, 10) == 0 and clip_index(9.7, 10) == 9 and clip_index(4.6, 10) == 5
    assert clip_point([7.0, -1.0, 3.2, 99.0], (5, 6, 7)) == (0, 3, 6)
