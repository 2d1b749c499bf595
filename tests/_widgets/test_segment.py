"""Segment dock: driven like a user, compared with the core on the same input."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_unet.checkpoint import load_model, save_checkpoint
from napari_unet.inference import segment
from napari_unet.progress import drain

from .conftest import blobs, click, make_tiny_model, wait_idle


def _dock(viewer, qtbot):
    from napari_unet._widgets._segment import SegmentWidget

    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    return widget


def test_segment_2d_instances_match_core(make_napari_viewer, qtbot, registry, model_2d_path):
    viewer = make_napari_viewer()
    image, _ = blobs((64, 80))
    viewer.add_image(image, name="cells", scale=(0.5, 0.5))
    widget = _dock(viewer, qtbot)
    assert widget.load_model_file(model_2d_path)
    widget.output_combo.setCurrentText("instances")
    widget.threshold_spin.setValue(0.5)
    click(qtbot, widget, "Segment")
    layer = viewer.layers["cells labels"]  # appears at once
    array = layer.data
    wait_idle(qtbot, widget)

    expected = drain(segment(image, load_model(model_2d_path), output="instances",
                             voxel_size=(0.5, 0.5)))
    # the result is written into the layer's own array (no new array on the main thread)
    assert layer.data is array and array.dtype == np.uint32
    np.testing.assert_array_equal(layer.data, expected.data)
    assert tuple(layer.scale) == (0.5, 0.5)
    np.testing.assert_array_equal(layer.metadata["napari_unet_probabilities"], expected.probabilities)
    assert widget.segment_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert "Done" in widget.status.text()
    assert widget.progress_bar.value() == widget.progress_bar.maximum()


def test_stack_fills_tile_by_tile_and_cancel_keeps_done_tiles(make_napari_viewer, qtbot, registry,
                                                              model_2d_path, monkeypatch):
    from napari_unet import inference

    original = inference._TileRunner.run

    def slow_run(self, tiles):  # a slow model, so Cancel lands mid-way
        time.sleep(0.05)
        return original(self, tiles)

    monkeypatch.setattr(inference._TileRunner, "run", slow_run)
    viewer = make_napari_viewer()
    image, _ = blobs((20, 48, 48))
    viewer.add_image(image, name="stack")
    widget = _dock(viewer, qtbot)
    widget.load_model_file(model_2d_path)
    widget.output_combo.setCurrentText("binary / classes")
    widget.predict_options = {"batch_size": 1}
    seen_partial = []
    click(qtbot, widget, "Segment")
    layer = viewer.layers["stack labels"]

    def on_tile(item):
        progress, _preview = item
        seen_partial.append(int(np.count_nonzero(layer.data.any(axis=(1, 2)))))
        if progress.done >= 3:
            widget.cancel()

    widget.worker.yielded.connect(on_tile)
    wait_idle(qtbot, widget)
    done = widget._run["done"]
    assert 3 <= done < 20, done
    assert "Cancelled" in widget.status.text()
    assert widget.segment_button.isEnabled() and not widget.cancel_button.isEnabled()
    # the finished slices hold the core's thresholded prediction, the rest is untouched
    probabilities = drain(inference.predict_probabilities(image, load_model(model_2d_path)))
    from napari_unet.postprocess import to_semantic

    expected = to_semantic(probabilities.astype(np.float32), "foreground", threshold=0.5)
    np.testing.assert_array_equal(layer.data[:done], expected[:done])
    assert not layer.data[done + 1:].any()
    assert seen_partial == sorted(seen_partial)  # it filled in progressively


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


def test_wrong_model_is_a_notification_not_a_crash(make_napari_viewer, qtbot, registry, tmp_path,
                                                   model_3d_path, notifications):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="flat")
    widget = _dock(viewer, qtbot)
    # a 3D model on a 2D image: refused before any work
    widget.load_model_file(model_3d_path)
    click(qtbot, widget, "Segment")
    assert widget.worker is None
    assert any(sev == "error" and "3D model" in msg for sev, msg in notifications)
    # a 2-channel model on a 1-channel image: the core refuses in the worker
    two = save_checkpoint(make_tiny_model(2, in_channels=2, name="two"), tmp_path / "two.pt")
    widget.load_model_file(two)
    notifications.clear()
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    assert any(sev == "error" and "channels" in msg for sev, msg in notifications), notifications
    assert "flat labels" not in viewer.layers  # the empty layer was taken away again
    assert widget.segment_button.isEnabled()
    # a broken model file
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    notifications.clear()
    assert widget.load_model_file(bad) is None
    assert any(sev == "error" for sev, _ in notifications)


def test_no_image_and_no_model(make_napari_viewer, qtbot, registry, notifications):
    viewer = make_napari_viewer()
    widget = _dock(viewer, qtbot)
    click(qtbot, widget, "Segment")
    assert any("Open an image" in msg for _, msg in notifications)
    viewer.add_image(np.zeros((16, 16), np.float32))
    notifications.clear()
    if not len(registry):
        click(qtbot, widget, "Segment")
        assert any(sev == "error" and "model" in msg for sev, msg in notifications)


def test_every_control_has_a_tooltip(make_napari_viewer, qtbot, registry):
    from qtpy.QtWidgets import QAbstractButton, QComboBox, QAbstractSpinBox, QLineEdit

    from napari_unet._widgets import EditWidget, ExportWidget, FineTuneWidget, SegmentWidget

    viewer = make_napari_viewer()
    for cls in (SegmentWidget, EditWidget, FineTuneWidget, ExportWidget):
        widget = cls(viewer)
        viewer.window.add_dock_widget(widget, name=cls.__name__)
        controls = widget.findChildren((QAbstractButton, QComboBox, QAbstractSpinBox, QLineEdit))
        missing = [getattr(c, "text", lambda: "")() or type(c).__name__ for c in controls
                   if not c.toolTip() and not isinstance(c.parent(), (QAbstractSpinBox, QComboBox))]
        assert not missing, f"{cls.__name__}: controls without tooltip: {missing}"
