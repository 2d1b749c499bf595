"""Export dock and the npe2 writer: calibrated, compressed TIFFs equal to the layer."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_unet._widgets._launch import PLUGIN
from napari_unet.io.readers import read_image
from napari_unet.labels import edits, statistics

from .conftest import blobs, click, wait_idle


def _dock(viewer):
    from napari_unet._widgets._export import ExportWidget

    widget = ExportWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Export")
    return widget


def test_export_instances_with_voxel_size_and_summary(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    _, labels = blobs((6, 40, 40))
    layer = viewer.add_labels(labels, name="nuclei labels", scale=(0.5, 0.2, 0.2))
    layer.metadata["napari_unet_unit"] = "um"
    widget = _dock(viewer)
    assert widget.unit_edit.text() == "um"
    widget.mode_combo.setCurrentText("instances")
    widget.path_edit.setText(str(tmp_path / "out.tif"))
    click(qtbot, widget, "Export")
    wait_idle(qtbot, widget)
    back = read_image(tmp_path / "out.tif")
    np.testing.assert_array_equal(back.data, labels)
    assert back.voxel_size == pytest.approx((0.5, 0.2, 0.2)) and back.unit == "um"
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        assert tif.pages[0].compression != 1  # compressed
    stats = statistics.label_statistics(labels, (0.5, 0.2, 0.2))
    assert f"{stats['objects']} objects" in widget.status.text()
    assert "um³" in widget.status.text()


def test_export_binary_and_probabilities(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    _, labels = blobs((32, 32))
    layer = viewer.add_labels(labels, name="labels")
    probs = np.random.default_rng(0).random((1, 32, 32)).astype(np.float16)
    layer.metadata["napari_unet_probabilities"] = probs
    widget = _dock(viewer)
    widget._layer_changed()
    widget.mode_combo.setCurrentText("binary")
    widget.probability_check.setChecked(True)
    widget.export(tmp_path / "mask.tif")
    wait_idle(qtbot, widget)
    np.testing.assert_array_equal(read_image(tmp_path / "mask.tif").data, (labels > 0).astype(np.uint8))
    np.testing.assert_allclose(read_image(tmp_path / "mask_probabilities.tif").data,
                               probs[0].astype(np.float32))


def test_export_errors_are_notifications(make_napari_viewer, qtbot, tmp_path, notifications):
    viewer = make_napari_viewer()
    widget = _dock(viewer)
    click(qtbot, widget, "Export")  # nothing to export
    assert any(sev == "error" for sev, _ in notifications)
    viewer.add_labels(np.ones((8, 8), np.uint8), name="labels")
    notifications.clear()
    widget.export(tmp_path / "out.png")
    wait_idle(qtbot, widget)
    assert any(sev == "error" and ".tif" in msg for sev, msg in notifications)
    assert widget.export_button.isEnabled()


def test_npe2_writer_via_save_layers(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    _, labels = blobs((5, 24, 24))
    layer = viewer.add_labels(labels, name="labels", scale=(2.0, 0.5, 0.5))
    layer.metadata["napari_unet_unit"] = "um"
    written = viewer.layers.save(str(tmp_path / "saved.tif"), selected=False, plugin=PLUGIN)
    assert written
    back = read_image(tmp_path / "saved.tif")
    np.testing.assert_array_equal(back.data, labels)
    assert back.voxel_size == pytest.approx((2.0, 0.5, 0.5))


def test_export_follows_the_layer(make_napari_viewer, qtbot, tmp_path):
    """An instance layer exports as instances by default, also when the dock was opened while
    the layer was still empty (issue 9: it wrote one object); binary only when asked."""
    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.zeros((4, 40, 40), np.uint32), name="nuclei labels")
    widget = _dock(viewer)  # opened before the layer has objects
    _, labels = blobs((4, 40, 40))
    layer.data[:] = labels  # filled later, as Segment does (in place)
    assert widget.mode_combo.currentText() == "as in the layer"
    widget.path_edit.setText(str(tmp_path / "nuclei_labels.tif"))  # not the working folder
    click(qtbot, widget, "Export")
    wait_idle(qtbot, widget)
    back = read_image(widget.last_written[0]).data
    np.testing.assert_array_equal(back, labels)
    assert len(np.unique(back)) - 1 == len(np.unique(labels)) - 1 > 1
    n = len(np.unique(labels)) - 1
    assert widget.status.text().split("Wrote ")[1].split(": ")[1].startswith(f"{n} objects")

    widget.mode_combo.setCurrentText("binary")
    widget.export(tmp_path / "mask.tif")
    wait_idle(qtbot, widget)
    np.testing.assert_array_equal(read_image(tmp_path / "mask.tif").data,
                                  (labels > 0).astype(np.uint8))
    # a binary layer stays binary "as in the layer"; "instances" splits it into objects
    layer.data = (labels > 0).astype(np.uint8)
    widget.mode_combo.setCurrentText("as in the layer")
    widget.export(tmp_path / "as_is.tif")
    wait_idle(qtbot, widget)
    np.testing.assert_array_equal(read_image(tmp_path / "as_is.tif").data, labels > 0)
    widget.mode_combo.setCurrentText("instances")
    widget.export(tmp_path / "split.tif")
    wait_idle(qtbot, widget)
    np.testing.assert_array_equal(read_image(tmp_path / "split.tif").data,
                                  edits.binary_to_instances(labels > 0))


def test_export_snapshot_is_copied_in_pieces(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_unet._widgets import _export

    _, labels = blobs((5, 40, 40))
    data = labels.astype(np.uint32)
    steps = _export.copy_steps(data, 40 * 40 * 4)  # one slice per step
    for _ in range(5):
        next(steps)
    with pytest.raises(StopIteration) as done:
        next(steps)
    copy = done.value.value
    np.testing.assert_array_equal(copy, data)
    assert not np.shares_memory(copy, data)

    monkeypatch.setattr(_export, "COPY_CHUNK_BYTES", 40 * 40 * 4)
    viewer = make_napari_viewer()
    viewer.add_labels(data, name="labels")
    widget = _dock(viewer)
    widget.export(tmp_path / "out.tif")
    assert widget.worker is not None  # copying, then writing, in the background
    wait_idle(qtbot, widget)
    np.testing.assert_array_equal(read_image(tmp_path / "out.tif").data, labels)
