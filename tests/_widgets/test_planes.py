"""Corrections in any plane: the Edit dock tracks slices seen along y and x, Segment keeps them,
Fine-tune trains on them."""

from __future__ import annotations

import numpy as np

from napari_unet.engine.predict import segment
from napari_unet.progress import drain
from napari_unet.zoo.loading import load_model

from .conftest import blobs, click, wait_idle

KEY = "napari_unet_corrected_slices"


def _edit_dock(viewer):
    from napari_unet._widgets._edit import EditWidget

    widget = EditWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Edit")
    return widget


def _rows(widget):
    return [widget.slice_list.item(i).text() for i in range(widget.slice_list.count())]


def test_painting_in_a_transposed_view_marks_that_plane(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.zeros((20, 50, 60), np.uint16), name="labels")
    widget = _edit_dock(viewer)
    layer.n_edit_dimensions = 2
    # napari's transpose: the view shows z and x, so it slices along y
    viewer.dims.order = (1, 0, 2)
    assert tuple(viewer.dims.displayed) == (0, 2)
    viewer.dims.set_point(1, 40)
    layer.paint((5, 40, 30), 9)
    assert (layer.data[:, 40] == 9).any() and not (layer.data[:, :40] == 9).any()
    assert layer.metadata[KEY] == [(1, 40)]
    assert _rows(widget) == ["y 40"]

    # Alt+O marks the slice on screen, here along x after a roll
    viewer.dims.order = (2, 0, 1)
    viewer.dims.set_point(2, 7)
    widget.mark_current()  # Alt+O
    assert layer.metadata[KEY] == [(1, 40), (2, 7)]
    assert _rows(widget) == ["y 40", "x 7"]

    # a stroke in the usual view marks a z slice
    viewer.dims.order = (0, 1, 2)
    viewer.dims.set_point(0, 12)
    layer.paint((12, 10, 10), 3)
    assert _rows(widget) == ["z 12", "y 40", "x 7"]

    # going to y 40 turns the view so that the y slice is on screen
    widget.slice_list.clearSelection()
    widget.slice_list.item(1).setSelected(True)
    click(qtbot, widget, "Go to")
    assert 1 not in viewer.dims.displayed and viewer.dims.ndisplay == 2
    assert viewer.dims.current_step[1] == 40
    # ... and back to z 12
    widget.slice_list.clearSelection()
    widget.slice_list.item(0).setSelected(True)
    click(qtbot, widget, "Go to")
    assert tuple(viewer.dims.displayed) == (1, 2) and viewer.dims.current_step[0] == 12

    # unmark a y slice
    widget.slice_list.clearSelection()
    widget.slice_list.item(1).setSelected(True)
    click(qtbot, widget, "Unmark")
    assert layer.metadata[KEY] == [12, (2, 7)]


def test_slice_operations_are_refused_in_a_view_along_y(make_napari_viewer, qtbot, notifications):
    viewer = make_napari_viewer()
    data = np.zeros((6, 20, 20), np.uint16)
    data[:, 2:8, 2:8] = 4
    layer = viewer.add_labels(data.copy(), name="labels")
    widget = _edit_dock(viewer)
    viewer.dims.order = (1, 0, 2)
    widget.ids_edit.setText("4")
    click(qtbot, widget, "Delete")
    np.testing.assert_array_equal(layer.data, data)  # nothing is edited off screen
    assert any(severity == "error" and "view the stack along z" in message
               for severity, message in notifications)
    assert layer.metadata[KEY] == []


def test_segment_keeps_a_corrected_y_plane(make_napari_viewer, qtbot, registry, model_2d_path):
    from napari_unet._widgets._segment import SegmentWidget

    viewer = make_napari_viewer()
    shape = (8, 40, 40)
    image, truth = blobs(shape, seed=3)
    viewer.add_image(image, name="stack")
    before = np.zeros(shape, np.uint32)
    before[:, 17] = 77  # a y plane painted by the user
    before[3] = truth[3] + 50
    layer = viewer.add_labels(before.copy(), name="stack labels")
    layer.metadata[KEY] = [3, (1, 17)]
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    widget.load_model_file(model_2d_path)
    widget.output_combo.setCurrentText("binary / classes")
    assert widget.write_combo.currentText() == "keep corrected slices"
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    expected = drain(segment(image, load_model(model_2d_path), output="labels")).data
    kept = np.zeros(shape, bool)
    kept[3] = kept[:, 17] = True
    np.testing.assert_array_equal(layer.data[kept], before[kept])  # never overwritten
    np.testing.assert_array_equal(layer.data[~kept], expected[~kept])
    assert "3, y 17" in widget.status.text() and "left as they were" in widget.status.text()
    assert layer.metadata[KEY] == [3, (1, 17)]

    # overwrite all asks, names the y plane, and unmarks it; undo marks it again
    widget.write_combo.setCurrentText("overwrite all")
    asked = []
    widget.confirm_overwrite = lambda text: asked.append(text) or True
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    assert len(asked) == 1 and "y 17" in asked[0]
    np.testing.assert_array_equal(layer.data, expected)
    assert layer.metadata[KEY] == []
    from napari_unet._widgets._history import history_for

    history_for(layer).undo()
    assert layer.metadata[KEY] == [3, (1, 17)]


def test_finetune_trains_on_a_corrected_y_plane(make_napari_viewer):
    from napari_unet.training.corrections import CorrectionSource, gather_training_pairs

    labels = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    pairs, notes = gather_training_pairs([CorrectionSource(np.zeros((4, 5, 6)), labels, "cells",
                                                           [(1, 2), 3])])
    assert pairs[0].slices == [3, (1, 2)] and notes == ["cells: 2 corrected slice(s)"]
    kept = np.zeros(labels.shape, bool)
    kept[3] = kept[:, 2] = True
    np.testing.assert_array_equal(pairs[0].labels[kept], labels[kept])
    assert not pairs[0].labels[~kept].any()  # only the corrected planes are copied


def test_segment_current_slice_is_refused_in_a_view_along_x(make_napari_viewer, qtbot, registry,
                                                            model_2d_path, notifications):
    from napari_unet._widgets._segment import SegmentWidget

    viewer = make_napari_viewer()
    image, _ = blobs((6, 32, 32), seed=1)
    viewer.add_image(image, name="stack")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    widget.load_model_file(model_2d_path)
    widget.scope_combo.setCurrentText("current slice")
    viewer.dims.order = (2, 0, 1)
    click(qtbot, widget, "Segment")
    assert widget.worker is None and len(viewer.layers) == 1  # nothing segmented
    assert any(severity == "error" and "view the stack along z" in message
               for severity, message in notifications)
    # along z it segments the slice on screen
    viewer.dims.order = (0, 1, 2)
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    assert len([layer for layer in viewer.layers if layer.name != "stack"]) == 1
