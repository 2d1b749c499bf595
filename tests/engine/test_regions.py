"""Which region a run reads and keeps, for each scope, and where its tiles go."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.engine.regions import (
    SLICE,
    VISIBLE,
    WHOLE,
    PredictRegion,
    covers,
    predict_region,
)


def test_whole_scope_reads_and_keeps_everything():
    region = predict_region(WHOLE, (8, 40, 50))
    assert region.read == region.keep == (slice(0, 8), slice(0, 40), slice(0, 50))
    assert region.reads_all((8, 40, 50)) and region.writes_all((8, 40, 50))
    assert region.offset == (0, 0, 0) and region.z_range(3) == range(0, 8)


def test_current_slice_of_a_2d_model():
    region = predict_region(SLICE, (8, 40, 50), z=5, spatial_dims=2)
    assert region.read == (slice(5, 6), slice(0, 40), slice(0, 50))
    assert region.layer_region == region.read and region.z_range(3) == range(5, 6)
    assert not region.reads_all((8, 40, 50))


def test_current_slice_of_a_3d_model_reads_a_slab_and_keeps_the_slice():
    region = predict_region(SLICE, (8, 40, 50), z=1, spatial_dims=3, halo=3)
    assert region.read[0] == slice(0, 5) and region.keep[0] == slice(1, 2)
    assert region.layer_region[0] == slice(1, 2)
    deep = predict_region(SLICE, (4, 40, 50), z=2, spatial_dims=3, halo=8)
    # the slab is the whole stack, but only the slice is written
    assert deep.reads_all((4, 40, 50)) and not deep.writes_all((4, 40, 50))
    assert deep.z_range(3) == range(2, 3)


def test_current_slice_of_a_2d_image_is_the_image():
    region = predict_region(SLICE, (40, 50), z=None)
    assert region.read == (slice(0, 40), slice(0, 50)) and region.z_range(2) == range(1)
    with pytest.raises(ValueError, match="slice index"):
        predict_region(SLICE, (8, 40, 50))
    with pytest.raises(ValueError, match="unknown scope"):
        predict_region("everything", (8, 40, 50))


def test_visible_region_cuts_the_displayed_axes_only():
    corners = np.array([[0.0, 10.2, -5.0], [7.0, 29.6, 80.0]])
    region = predict_region(VISIBLE, (8, 40, 50), corners=corners, displayed=(1, 2))
    assert region.read == (slice(0, 8), slice(10, 31), slice(0, 50))
    assert region.keep == (slice(0, 8), slice(0, 21), slice(0, 50))
    assert region.layer_region == region.read


def test_tiles_map_into_the_layer_and_the_start_point_into_the_region():
    region = PredictRegion((slice(2, 7), slice(10, 30)), (slice(1, 2), slice(0, 20)))
    assert region.to_layer((slice(0, 3), slice(5, 15))) == (
        (slice(3, 4), slice(15, 25)), (slice(1, 2), slice(5, 15)))
    assert region.to_layer((slice(3, 5), slice(0, 20))) is None  # not kept
    assert region.start_at((0, 5, 100)) == (3, 19)  # the last two values, clipped
    assert region.start_at((0, 0)) == (0, 0)
    assert region.start_at((4, 12)) == (2, 2)
    assert covers((slice(0, 3),), (3,)) and not covers((slice(1, 3),), (3,))
