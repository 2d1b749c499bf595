"""postprocess.chunked_bincount and fill_binary_holes: equal to numpy/scipy, friendlier to a GUI."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_unet.labels import dtypes, edits


@pytest.mark.parametrize("seed", range(5))
def test_chunked_bincount_equals_bincount(seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, rng.integers(1, 500), size=(7, 33, 29)).astype(
        [np.uint8, np.uint16, np.uint32, np.int64, np.int32][seed])
    np.testing.assert_array_equal(dtypes.chunked_bincount(values, chunk=1000),
                                  np.bincount(values.ravel()))
    assert dtypes.chunked_bincount(np.zeros(0, np.uint8)).size == 0


@pytest.mark.parametrize("shape, density, seed", [
    ((40, 50), 0.5, 0), ((40, 50), 0.7, 1), ((12, 20, 24), 0.6, 2), ((12, 20, 24), 0.75, 3),
    ((1, 30, 30), 0.6, 4), ((64,), 0.5, 5), ((9, 9, 9), 1.0, 6), ((9, 9, 9), 0.0, 7),
])
def test_fill_binary_holes_equals_scipy(shape, density, seed):
    rng = np.random.default_rng(seed)
    mask = ndi.binary_opening(rng.random(shape) < density) if len(shape) > 1 else \
        rng.random(shape) < density
    if len(shape) > 1:
        mask |= rng.random(shape) < density / 4  # noise: many small holes and islands
    expected = ndi.binary_fill_holes(mask)
    np.testing.assert_array_equal(edits.fill_binary_holes(mask), expected)


def test_fill_holes_of_labels_unchanged_by_the_new_helpers():
    labels = np.zeros((10, 30, 30), np.uint16)
    labels[2:8, 5:15, 5:15] = 3
    labels[4:6, 9:11, 9:11] = 0  # a closed cavity in object 3
    labels[2:8, 18:28, 18:28] = 5
    labels[2:8, 22:24, 22:24] = 0  # a tunnel through object 5: not a hole
    out = edits.fill_holes(labels)
    assert (out[4:6, 9:11, 9:11] == 3).all() and not out[2:8, 22:24, 22:24].any()
    np.testing.assert_array_equal(out[labels != 0], labels[labels != 0])
