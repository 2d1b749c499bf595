"""Edit dock: operations equal the core's, undo/redo restore exact data, corrections are tracked."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.labels import dtypes, edits

from .conftest import click, wait_idle


def _dock(viewer):
    from napari_unet._widgets._edit import EditWidget

    widget = EditWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Edit")
    return widget


def two_touching_squares(shape=(40, 40)) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint16)
    labels[5:20, 5:15] = 1
    labels[5:20, 15:25] = 2
    labels[25:28, 25:28] = 3  # small
    labels[30:38, 5:13] = 4
    labels[33:35, 8:10] = 0  # a hole
    return labels


def press(viewer, key: str) -> None:
    viewer.window._qt_viewer._key_map_handler.press_key(key)


def test_merge_undo_redo_exact(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    original = two_touching_squares()
    layer = viewer.add_labels(original.copy(), name="labels")
    widget = _dock(viewer)
    widget.ids_edit.setText("1, 2")
    click(qtbot, widget, "Merge")
    np.testing.assert_array_equal(layer.data, edits.merge_labels(original, [1, 2]))
    merged = layer.data.copy()
    click(qtbot, widget, "Undo")
    np.testing.assert_array_equal(layer.data, original)
    click(qtbot, widget, "Redo")
    np.testing.assert_array_equal(layer.data, merged)
    # the keyboard shortcuts do the same (bound on the layer, over napari's paint-only undo)
    viewer.layers.selection.active = layer
    press(viewer, "Control-Z")
    np.testing.assert_array_equal(layer.data, original)
    press(viewer, "Control-Shift-Z")
    np.testing.assert_array_equal(layer.data, merged)


@pytest.mark.parametrize("operation, expected", [
    ("Fill holes", lambda a: edits.fill_holes(a)),
    ("Remove small", lambda a: edits.remove_small_objects(a, 50)),
    ("Relabel", lambda a: dtypes.relabel_sequential(a)),
    ("Instances → binary", lambda a: edits.instances_to_binary(a).astype(np.uint8)),
])
def test_operations_match_core_2d(make_napari_viewer, qtbot, operation, expected):
    viewer = make_napari_viewer()
    original = two_touching_squares()
    if operation == "Relabel":
        original[original == 4] = 9
    layer = viewer.add_labels(original.copy(), name="labels")
    widget = _dock(viewer)
    click(qtbot, widget, operation)
    np.testing.assert_array_equal(layer.data, expected(original))
    if operation == "Relabel":  # a new dtype would make napari rebuild its colormap texture
        assert layer.data.dtype == original.dtype
    click(qtbot, widget, "Undo")
    np.testing.assert_array_equal(layer.data, original)


def test_delete_selected_and_binary_to_instances(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    original = two_touching_squares()
    layer = viewer.add_labels(original.copy(), name="labels")
    widget = _dock(viewer)
    layer.selected_label = 4
    click(qtbot, widget, "Delete")  # empty ids field: the selected label
    np.testing.assert_array_equal(layer.data, edits.delete_label(original, 4))
    layer.data = (original > 0).astype(np.uint8)
    click(qtbot, widget, "Binary → instances")
    np.testing.assert_array_equal(layer.data, edits.binary_to_instances(original > 0))


def test_split_with_seed_clicks_and_automatic(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    original = np.zeros((30, 50), dtype=np.uint16)
    original[8:22, 5:45] = 7  # one long object
    layer = viewer.add_labels(original.copy(), name="labels", scale=(0.5, 0.5))
    widget = _dock(viewer)
    points = widget.add_seeds_layer()
    points.add([[15, 10], [15, 40]])  # the seeds layer has the labels layer's scale
    widget.labels_combo.set_layer(layer)
    click(qtbot, widget, "Split")
    expected = edits.split_label(original, 7, [(15.0, 10.0), (15.0, 40.0)], sampling=(0.5, 0.5))
    np.testing.assert_array_equal(layer.data, expected)
    assert len(points.data) == 0  # seeds are used up
    click(qtbot, widget, "Undo")
    np.testing.assert_array_equal(layer.data, original)
    widget.ids_edit.setText("7")
    click(qtbot, widget, "Split")  # no seeds: automatic
    np.testing.assert_array_equal(layer.data, edits.split_label(original, 7, None,
                                                                      sampling=(0.5, 0.5)))


def test_stack_current_slice_scope_and_correction_tracking(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    stack = np.stack([two_touching_squares()] * 6)
    layer = viewer.add_labels(stack.copy(), name="labels")
    widget = _dock(viewer)
    viewer.dims.set_point(0, 3)
    widget.ids_edit.setText("1 2")
    click(qtbot, widget, "Merge")
    expected = stack.copy()
    expected[3] = edits.merge_labels(stack[3], [1, 2])
    np.testing.assert_array_equal(layer.data, expected)
    assert layer.metadata["napari_unet_corrected_slices"] == [3]

    # painting with napari's brush marks the slice as corrected
    viewer.dims.set_point(0, 1)
    layer.n_edit_dimensions = 2
    layer.paint((1, 30, 30), 9)
    assert layer.metadata["napari_unet_corrected_slices"] == [1, 3]
    assert [widget.slice_list.item(i).text() for i in range(widget.slice_list.count())] == \
        ["z 1", "z 3"]
    # undo walks back through the paint stroke and the merge, in order
    click(qtbot, widget, "Undo")
    assert not (layer.data[1] == 9).any()
    np.testing.assert_array_equal(layer.data, expected)
    click(qtbot, widget, "Undo")
    np.testing.assert_array_equal(layer.data, stack)

    # the list: unmark, mark manually, jump
    widget.slice_list.item(0).setSelected(True)
    click(qtbot, widget, "Unmark")
    assert layer.metadata["napari_unet_corrected_slices"] == [3]
    viewer.dims.set_point(0, 5)
    click(qtbot, widget, "Mark current")
    assert layer.metadata["napari_unet_corrected_slices"] == [3, 5]
    widget.slice_list.clearSelection()
    widget.slice_list.item(0).setSelected(True)
    click(qtbot, widget, "Go to")
    assert viewer.dims.current_step[0] == 3

    # 3D scope changes every slice
    widget.scope_combo.setCurrentText("whole stack (3D)")
    widget.ids_edit.setText("4")
    click(qtbot, widget, "Delete")
    wait_idle(qtbot, widget)  # a whole stack is done in a worker
    assert not (layer.data == 4).any()


def test_errors_are_notifications(make_napari_viewer, qtbot, notifications):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    click(qtbot, widget, "Merge")  # no labels layer
    assert any(sev == "error" for sev, _ in notifications)
    viewer.add_labels(two_touching_squares(), name="labels")
    notifications.clear()
    widget.ids_edit.setText("one, two")
    click(qtbot, widget, "Delete")
    assert any(sev == "error" and "whole numbers" in msg for sev, msg in notifications)
    notifications.clear()
    widget.ids_edit.setText("42")
    click(qtbot, widget, "Split")
    assert any(sev == "error" and "42" in msg for sev, msg in notifications)


# ---------------------------------------------------------------------------------------------
# whole-stack operations run in a worker (issue 9, item 6)
# ---------------------------------------------------------------------------------------------

def _hollow_stack(n: int = 6) -> np.ndarray:
    stack = np.stack([two_touching_squares()] * n)
    stack[stack == 4] = 9
    stack[[0, -1], 30:38, 5:13] = 9  # caps: the hole of object 9 is a closed 3D cavity
    return stack


@pytest.mark.parametrize("operation, name, expected", [
    ("Fill holes", "fill_holes", lambda a: edits.fill_holes(a)),
    ("Relabel", "relabel_sequential", lambda a: dtypes.relabel_sequential(a)),
    ("Split", "split_label", lambda a: edits.split_label(a, 9, None)),
])
def test_whole_stack_operations_run_in_a_worker(make_napari_viewer, qtbot, monkeypatch, operation,
                                                name, expected):
    import threading

    viewer = make_napari_viewer()
    original = _hollow_stack()
    layer = viewer.add_labels(original.copy(), name="labels")
    widget = _dock(viewer)
    widget.scope_combo.setCurrentText("whole stack (3D)")
    if operation == "Split":
        widget.ids_edit.setText("9")
    threads, data_events = [], []
    module = dtypes if name == "relabel_sequential" else edits
    real = getattr(module, name)

    def recording(*args, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    layer.events.data.connect(
        lambda _e: data_events.append(threading.current_thread() is threading.main_thread()))
    array = layer.data
    click(qtbot, widget, operation)
    assert widget.worker is not None  # in the background
    wait_idle(qtbot, widget)
    assert threads == [False]  # computed in the worker thread
    assert data_events and all(data_events)  # the layer was updated on the main thread
    result = expected(original)
    np.testing.assert_array_equal(layer.data, result)
    assert layer.data is not array and layer.data.dtype == array.dtype  # swapped in, no copy
    assert "Ctrl+Z" in widget.status.text()
    click(qtbot, widget, "Undo")
    np.testing.assert_array_equal(layer.data, original)
    click(qtbot, widget, "Redo")
    np.testing.assert_array_equal(layer.data, result)


def test_paint_while_a_whole_stack_operation_runs_is_kept(make_napari_viewer, qtbot, monkeypatch,
                                                          notifications):
    import time

    viewer = make_napari_viewer()
    original = _hollow_stack()
    layer = viewer.add_labels(original.copy(), name="labels")
    widget = _dock(viewer)
    real = dtypes.relabel_sequential

    def slow(labels):
        time.sleep(0.5)
        return real(labels)

    monkeypatch.setattr(dtypes, "relabel_sequential", slow)
    click(qtbot, widget, "Relabel")
    assert widget.worker is not None
    click(qtbot, widget, "Undo")  # refused while the operation runs
    assert any("wait" in msg for _, msg in notifications), notifications
    viewer.dims.set_point(0, 1)
    layer.n_edit_dimensions = 2
    layer.paint((1, 30, 30), 42)
    painted = layer.data.copy()
    wait_idle(qtbot, widget)
    np.testing.assert_array_equal(layer.data, painted)  # the paint stays, the result is dropped
    assert "changed while it ran" in widget.status.text()
    for button in widget.buttons.values():
        assert button.isEnabled()


def test_suggested_slices_fill_after_segment_and_jump(make_napari_viewer, qtbot, registry,
                                                      model_2d_path):
    from qtpy.QtCore import Qt

    from napari_unet._widgets._segment import SegmentWidget

    from .conftest import blobs

    viewer = make_napari_viewer()
    image, _ = blobs((12, 40, 40))
    viewer.add_image(image, name="stack")
    segment_dock = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment_dock, name="Segment")
    segment_dock.load_model_file(model_2d_path)
    edit = _dock(viewer)
    assert edit.suggestion_list.count() == 0
    click(qtbot, segment_dock, "Segment")
    wait_idle(qtbot, segment_dock)
    labels = viewer.layers["stack labels"]
    edit.labels_combo.set_layer(labels)
    suggested = labels.metadata["napari_unet_suggested_slices"]
    assert edit.suggestion_list.count() == len(suggested) == 5
    texts = [edit.suggestion_list.item(i).text() for i in range(edit.suggestion_list.count())]
    assert texts[0].startswith(f"slice {suggested[0][0]} · score")
    # double-click jumps there
    viewer.dims.set_point(0, 0)
    target = edit.suggestion_list.item(1)
    edit.suggestion_list.itemDoubleClicked.emit(target)
    assert viewer.dims.current_step[0] == suggested[1][0]
    # the button: the selected one, else the best one
    edit.suggestion_list.clearSelection()
    qtbot.mouseClick(edit.goto_suggested_button, Qt.LeftButton)
    assert viewer.dims.current_step[0] == suggested[0][0]
    edit.suggestion_list.item(2).setSelected(True)
    click(qtbot, edit, "Go to slice")
    assert viewer.dims.current_step[0] == suggested[2][0]
    # correcting a suggested slice shows it as done
    click(qtbot, edit, "Mark current")
    assert "(corrected)" in edit.suggestion_list.item(2).text()
