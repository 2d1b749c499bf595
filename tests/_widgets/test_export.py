"""Export dock and the npe2 writer: calibrated, compressed TIFFs equal to the layer."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_unet import postprocess
from napari_unet.io import read_image

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
    stats = postprocess.label_statistics(labels, (0.5, 0.2, 0.2))
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
    written = viewer.layers.save(str(tmp_path / "saved.tif"), selected=False, plugin="napari-unet")
    assert written
    back = read_image(tmp_path / "saved.tif")
    np.testing.assert_array_equal(back.data, labels)
    assert back.voxel_size == pytest.approx((2.0, 0.5, 0.5))
