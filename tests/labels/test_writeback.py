"""A prediction goes into the user's labels without overwriting their corrections."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.labels.writeback import (
    KEEP,
    OVERWRITE,
    WriteDecision,
    fits_in_place,
    fresh_labels,
    labels_dtype,
    write_decision,
    write_unprotected,
)


def test_labels_dtype_is_one_napari_draws_without_hashing():
    assert labels_dtype("labels", 1) == np.uint8
    assert labels_dtype("labels", 256) == np.uint8
    assert labels_dtype("labels", 300) == np.uint16
    assert labels_dtype("instances", 1) == np.uint16


def test_fits_in_place():
    data = np.zeros((4, 4), np.uint16)
    assert fits_in_place(data, np.dtype(np.uint32), 65_535)
    assert not fits_in_place(data, np.dtype(np.uint32), 65_536)
    assert fits_in_place(data, np.dtype(bool), 1)
    assert not fits_in_place(data, np.dtype(np.float32), 1)
    assert not fits_in_place(data.astype(np.float32), np.dtype(np.uint8), 1)
    assert not fits_in_place(data.tolist(), np.dtype(np.uint8), 1)
    frozen = data.copy()
    frozen.flags.writeable = False
    assert not fits_in_place(frozen, np.dtype(np.uint8), 1)


def test_write_unprotected_leaves_protected_slices_alone():
    data = np.full((6, 3, 3), 9, np.uint8)
    values = np.ones((4, 3, 3), np.uint8)
    region = (slice(1, 5), slice(0, 3), slice(0, 3))
    assert write_unprotected(data, region, values, {2, 3})
    assert [int(data[z, 0, 0]) for z in range(6)] == [9, 1, 9, 9, 1, 9]
    assert not write_unprotected(data, (slice(2, 4), slice(0, 3), slice(0, 3)),
                                 values[:2], {2, 3})
    assert write_unprotected(data, region, values * 2, set()) and (data[1:5] == 2).all()


def test_fresh_labels_keep_the_corrected_slices():
    old = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2)
    new = fresh_labels(old, old.shape, np.dtype(np.uint16), kept=[1, 7])
    assert new.dtype == np.uint16 and new is not old
    np.testing.assert_array_equal(new[1], old[1])
    assert not new[0].any() and not new[2].any()


@pytest.mark.parametrize("mode, corrected, edited, expected", [
    (KEEP, [1], False, WriteDecision(KEEP)),  # the corrected slice stays: nothing to ask
    (KEEP, [], True, WriteDecision(KEEP)),
    (OVERWRITE, [], False, WriteDecision(OVERWRITE)),
])
def test_write_decisions_without_a_question(mode, corrected, edited, expected):
    assert write_decision(mode, "cells labels", 3, corrected, range(0, 4), edited) == expected


def test_write_decisions_that_ask_first():
    everything = write_decision(KEEP, "cells labels", 3, [0, 1, 5], range(0, 2), False)
    assert everything.mode == OVERWRITE and "Everything to segment" in everything.question
    assert "2 corrected slice(s) of 'cells labels'" in everything.question
    image = write_decision(KEEP, "img labels", 2, [0], range(1), False)
    assert image.mode == OVERWRITE and "'img labels' is marked corrected" in image.question
    marks = write_decision(OVERWRITE, "stack labels", 3, [2, 5], range(0, 8), False)
    assert marks.mode == OVERWRITE and "Overwrite 2 corrected slice(s)" in marks.question
    edits = write_decision(OVERWRITE, "stack labels", 3, [9], range(0, 8), True)
    assert "the edits of 'stack labels'" in edits.question
    edits_2d = write_decision(OVERWRITE, "img labels", 2, [0], range(1), False)
    assert "your corrections in 'img labels'" in edits_2d.question


def test_write_unprotected_leaves_y_and_x_planes_alone():
    data = np.full((4, 6, 8), 9, np.uint16)
    values = np.ones((4, 4, 8), np.uint16)
    # the block covers y 2..5: y 3 and x 6 are corrected, z 1 too
    assert write_unprotected(data, (slice(0, 4), slice(2, 6), slice(0, 8)), values,
                             [1, (1, 3), (2, 6), (1, 0)])
    assert (data[1] == 9).all() and (data[:, 3] == 9).all() and (data[:, :, 6] == 9).all()
    assert (data[:, :2] == 9).all()  # outside the block
    written = np.ones(data.shape, bool)
    written[1] = written[:, 3] = written[:, :, 6] = written[:, :2] = False
    assert (data[written] == 1).all()
    assert (values == 1).all()  # the block itself is not changed


def test_fresh_labels_keep_corrected_planes_and_questions_name_them():
    old = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    new = fresh_labels(old, old.shape, np.dtype(np.uint8), [2, (1, 4), (2, 0), (1, 99)])
    kept = np.zeros(old.shape, bool)
    kept[2] = kept[:, 4] = kept[:, :, 0] = True
    assert np.array_equal(new[kept], old[kept]) and not new[~kept].any()
    decision = write_decision(OVERWRITE, "cells", 3, [(1, 4)], range(0, 4), edited=False)
    assert decision.question is not None and "y 4" in decision.question
    # keep mode never asks for a y plane: it is kept
    assert write_decision(KEEP, "cells", 3, [(1, 4)], range(0, 4), edited=False).question is None
