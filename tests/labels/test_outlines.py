"""Outlines of objects in the plane on screen (Live mode's contours, made in its worker)."""

from __future__ import annotations

import numpy as np

from napari_unet.labels.outlines import plane_outlines


def test_a_square_keeps_its_rim_only():
    labels = np.zeros((10, 10), np.uint16)
    labels[2:8, 2:8] = 3
    one = plane_outlines(labels, (0, 1), width=1)
    ring = labels.copy()
    ring[3:7, 3:7] = 0
    np.testing.assert_array_equal(one, ring)
    two = plane_outlines(labels, (0, 1), width=2)
    ring2 = labels.copy()
    ring2[4:6, 4:6] = 0
    np.testing.assert_array_equal(two, ring2)
    assert two.dtype == labels.dtype


def test_touching_objects_both_keep_their_side_and_background_stays_zero():
    labels = np.zeros((6, 8), np.int32)
    labels[1:5, 1:4] = 1
    labels[1:5, 4:7] = 2
    out = plane_outlines(labels, (0, 1), width=1)
    assert out[2, 3] == 1 and out[2, 4] == 2  # the shared border, on both sides
    assert (out[labels == 0] == 0).all()
    assert set(np.unique(out)) == {0, 1, 2}


def test_a_slab_is_outlined_in_the_displayed_planes_only():
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[:, 2:6, 2:6] = 5  # a column through z: no rim along z
    out = plane_outlines(labels, (1, 2), width=1)
    for z in range(3):
        np.testing.assert_array_equal(out[z], plane_outlines(labels[z], (0, 1), width=1))
    side = plane_outlines(labels, (0, 2), width=1)  # seen along y: z and x are on screen
    assert side[1, 3, 2] == 5 and side[1, 3, 3] == 0  # the rim along x
    assert side[0, 3, 3] == 0  # the array's own border is no boundary
