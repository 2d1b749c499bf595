"""Segment dock: the object size resamples each tile (as the core does), and Estimate measures it."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from napari_unet.engine.predict import segment
from napari_unet.progress import drain
from napari_unet.zoo.loading import load_model

from .conftest import blobs, click, wait_idle


def _dock(make_napari_viewer, image, name, **layer):
    from napari_unet._widgets._segment import SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(image, name=name, **layer)
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    return viewer, widget


def test_object_size_resamples_as_the_core(make_napari_viewer, qtbot, registry):
    from napari_unet.engine.resample import scale_for_model
    from napari_unet.model.checkpoint import list_pretrained

    image, _ = blobs((96, 104))
    viewer, widget = _dock(make_napari_viewer, image, "cells")
    assert widget.load_model_file(list_pretrained()["nuclei-2d"])
    widget.output_combo.setCurrentText("binary / classes")
    model = load_model("nuclei-2d")
    assert widget.object_size.spin.text() == "auto"
    widget.object_size.spin.setValue(12.0)
    widget.object_size.unit_combo.setCurrentText("px")
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    scale, _ = scale_for_model(model, None, (12.0, "px"))
    assert widget.object_size.note.text().startswith(f"Resampled x({scale[0]:.3g}, ")
    labels = np.asarray(viewer.layers["cells labels"].data)
    assert labels.shape == image.shape
    options = dict(output="labels", threshold=widget.threshold_spin.value(), voxel_size=(1.0, 1.0))
    expected = drain(segment(image, model, scale=scale, **options)).data
    np.testing.assert_array_equal(labels, expected)
    plain = drain(segment(image, model, **options)).data
    assert np.count_nonzero(labels != plain) > 20
    # auto, and the layer has no voxel size: no resampling, and the note says why
    widget.object_size.spin.setValue(0.0)
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    assert widget.object_size.note.text().startswith("No resampling")
    np.testing.assert_array_equal(np.asarray(viewer.layers["cells labels"].data), plain)


def test_estimate_measures_the_objects(make_napari_viewer, qtbot, registry):
    from napari_unet.model.checkpoint import list_pretrained

    yy, xx = np.indices((220, 220))
    truth = np.zeros((220, 220), np.int32)
    for k, (y, x) in enumerate([(40, 40), (40, 130), (110, 80), (160, 160), (170, 40)], 1):
        truth[(yy - y) ** 2 + (xx - x) ** 2 < 22 ** 2] = k
    image = ndi.gaussian_filter((truth > 0).astype(np.float32), 1.5) * 100 + 10
    viewer, widget = _dock(make_napari_viewer, image, "nuclei")
    assert widget.load_model_file(list_pretrained()["nuclei-2d"])
    click(qtbot, widget.object_size, "Estimate")
    qtbot.waitUntil(lambda: widget.object_size.worker is None, timeout=60_000)
    assert widget.object_size.note.text().startswith("Estimated"), widget.object_size.note.text()
    true_diameter = 2 * np.sqrt(np.bincount(truth.ravel())[1:].mean() / np.pi)
    assert abs(widget.object_size.spin.value() - true_diameter) < 0.15 * true_diameter
    assert widget.object_size.unit_combo.currentText() == "px"
