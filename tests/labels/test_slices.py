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


# --- planes: slices along z, y or x ----------------------------------------------------------
def test_planes_are_stored_in_one_form():
    from napari_unet.labels.slices import plane, plane_label, plane_name, slice_list, z_slices

    assert plane(3) == 3 and plane((0, 3)) == 3 and plane(("y", 40)) == (1, 40)
    assert plane([2, 7]) == (2, 7) and plane(np.int64(5)) == 5 and plane(4.0) == 4
    assert slice_list([(2, 7), 5, (1, 40), [0, 1], 5]) == [1, 5, (1, 40), (2, 7)]
    assert slice_list([3, 1]) == [1, 3]  # z only: a list of ints, as before
    assert [plane_name(p) for p in [12, (1, 40), (2, 7)]] == ["z 12", "y 40", "x 7"]
    assert [plane_label(p) for p in [12, (1, 40)]] == ["12", "y 40"]
    assert z_slices([(1, 4), 9, 2]) == [2, 9]
    for bad in [(3, 1), ("w", 2), "z", (1, 2, 3)]:
        try:
            plane(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was taken as a plane")


def test_planes_mask_and_touched_slices_along_any_axis():
    from napari_unet.labels.slices import planes_mask, touched_slices

    mask = planes_mask((4, 5, 6), [1, (1, 2), (2, 5)])
    expected = np.zeros((4, 5, 6), bool)
    expected[1] = True
    expected[:, 2] = True
    expected[:, :, 5] = True
    assert np.array_equal(mask, expected)
    # a stroke in a view along y: one y index, many z and x
    key = (np.array([0, 1, 3]), np.array([2, 2, 2]), np.array([1, 4, 5]))
    assert touched_slices([(key, None, 1)], 3, axis=1) == {2}
    assert touched_slices([(key, None, 1)], 3, axis=0) == {0, 1, 3}


def test_marks_outside_an_overwritten_block():
    from napari_unet.labels.slices import marks_outside

    region = (slice(0, 4), slice(0, 10), slice(5, 10))
    marks = [1, 6, (1, 3), (2, 2), (2, 7)]
    # z 1 and the planes the block crosses (y 3, x 7) are overwritten; x 2 is outside it
    assert marks_outside(marks, range(0, 4), region) == [6, (2, 2)]
    assert marks_outside(marks, range(0, 0), region) == [1, 6, (1, 3), (2, 2), (2, 7)]
