"""Segment dock scopes: the slice on screen, with a 2D model and with a 3D model."""

from __future__ import annotations

import numpy as np

from napari_unet.engine.predict import segment
from napari_unet.progress import drain
from napari_unet.zoo.loading import load_model

from .conftest import blobs, click, wait_idle
from .test_segment import _dock


def test_current_slice_scope(make_napari_viewer, qtbot, registry, model_2d_path):
    viewer = make_napari_viewer()
    image, _ = blobs((8, 40, 40))
    viewer.add_image(image, name="stack")
    viewer.dims.set_point(0, 5)
    widget = _dock(viewer, qtbot)
    widget.load_model_file(model_2d_path)
    widget.output_combo.setCurrentText("binary / classes")
    widget.scope_combo.setCurrentText("current slice")
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    layer = viewer.layers["stack labels"]
    expected = drain(segment(image[5:6], load_model(model_2d_path), output="labels")).data
    np.testing.assert_array_equal(layer.data[5:6], expected)
    assert not np.delete(layer.data, 5, axis=0).any()


def test_current_slice_of_a_3d_model_leaves_the_other_slices(make_napari_viewer, qtbot, registry,
                                                             model_3d_path):
    """The slab a 3D model reads around the slice may be the whole stack: still only the slice
    on screen is written."""
    viewer = make_napari_viewer()
    image, _ = blobs((6, 32, 32))
    viewer.add_image(image, name="stack")
    before = np.full((6, 32, 32), 7, np.uint16)
    layer = viewer.add_labels(before.copy(), name="stack labels")
    viewer.dims.set_point(0, 2)
    widget = _dock(viewer, qtbot)
    widget.load_model_file(model_3d_path)
    widget.output_combo.setCurrentText("binary / classes")
    widget.scope_combo.setCurrentText("current slice")
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    assert widget._run.region.reads_all((6, 32, 32))  # the halo covers the stack
    expected = drain(segment(image, load_model(model_3d_path), output="labels")).data
    np.testing.assert_array_equal(layer.data[2], expected[2])
    np.testing.assert_array_equal(np.delete(layer.data, 2, axis=0), np.delete(before, 2, axis=0))
