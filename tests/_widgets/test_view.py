"""What the viewer shows (region_on_screen) and the warm-up of napari's labels visuals."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet._widgets import _view
from napari_unet._widgets._view import region_on_screen, warm_up_labels_visuals

YX = (slice(0, 32), slice(0, 32))


def test_region_on_screen_follows_the_slice_shown(make_napari_viewer):
    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.zeros((6, 32, 32), np.uint8), scale=(2.0, 1.0, 1.0))
    viewer.dims.set_point(0, 8.0)  # world z 8 = slice 4
    assert region_on_screen(viewer, layer, (slice(4, 5), *YX))
    assert region_on_screen(viewer, layer, (slice(3, 6), *YX))
    assert not region_on_screen(viewer, layer, (slice(0, 4), *YX))
    assert not region_on_screen(viewer, layer, (slice(5, 6), *YX))
    viewer.dims.ndisplay = 3  # the whole volume is drawn
    assert region_on_screen(viewer, layer, (slice(0, 1), *YX))


def test_region_on_screen_with_more_viewer_axes_than_layer_axes(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((3, 6, 32, 32), np.float32))  # the viewer has 4 axes
    layer = viewer.add_labels(np.zeros((6, 32, 32), np.uint8))
    viewer.dims.set_point(1, 2)
    viewer.dims.set_point(0, 1)  # an axis the labels do not have: never hides a write
    assert region_on_screen(viewer, layer, (slice(2, 3), *YX))
    assert not region_on_screen(viewer, layer, (slice(3, 4), *YX))


def test_a_2d_layer_is_always_on_screen(make_napari_viewer):
    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.zeros((32, 32), np.uint8))
    assert region_on_screen(viewer, layer, YX)


def test_segment_dock_builds_naparis_first_labels_visuals_when_it_opens(make_napari_viewer,
                                                                        registry, monkeypatch):
    dash_atlas = pytest.importorskip("vispy.visuals.line.dash_atlas")
    from napari_unet._widgets._segment import SegmentWidget

    monkeypatch.setattr(_view, "_warmed", False)
    dash_atlas._make_pattern.cache_clear()
    viewer = make_napari_viewer()
    SegmentWidget(viewer)
    # the patterns napari's first labels layer needs are cached before any click
    assert dash_atlas._make_pattern.cache_info().currsize >= 13
    dash_atlas._make_pattern.cache_clear()
    warm_up_labels_visuals()  # once per process
    assert dash_atlas._make_pattern.cache_info().currsize == 0
