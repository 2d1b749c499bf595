"""Segment dock: a 2D model's instances on a stack are stitched through z, or kept per slice."""

from __future__ import annotations

import numpy as np

from napari_unet.engine.predict import segment
from napari_unet.progress import drain
from napari_unet.zoo.loading import load_model

from .conftest import blobs, click, wait_idle


def test_stitch_option_matches_core(make_napari_viewer, qtbot, registry, model_2d_path):
    from napari_unet._widgets._segment import SegmentWidget

    viewer = make_napari_viewer()
    image, _ = blobs((6, 48, 48))
    viewer.add_image(image, name="stack")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    assert widget.load_model_file(model_2d_path)
    widget.output_combo.setCurrentText("instances")
    model = load_model(model_2d_path)
    probs = drain(segment(image, model, output="probabilities")).data
    threshold = round(float(np.quantile(probs, 0.8)), 2)  # objects, whatever the tiny net says
    widget.threshold_spin.setValue(threshold)
    for stitch in (0.0, 0.25):
        widget.stitch_spin.setValue(stitch)
        click(qtbot, widget, "Segment")
        wait_idle(qtbot, widget)
        labels = np.asarray(viewer.layers["stack labels"].data)
        expected = drain(segment(image, model, output="instances", threshold=threshold,
                                 min_size=widget.min_size_spin.value(), stitch_threshold=stitch))
        np.testing.assert_array_equal(labels, expected.data)
        if stitch == 0:
            assert widget.stitch_spin.text() == "per slice"
            spans = [np.count_nonzero((labels == i).any(axis=(1, 2))) for i in np.unique(labels)[1:]]
            assert spans and max(spans) == 1
