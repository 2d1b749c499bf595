"""The correct → fine-tune → segment loop in the docks: the user's paint is never lost."""

from __future__ import annotations

import numpy as np

from .conftest import blobs, click, wait_idle


def test_segment_paint_finetune_segment_undo_keeps_every_painted_voxel(
        make_napari_viewer, qtbot, registry, model_2d_path, monkeypatch):
    from napari_unet._widgets._edit import EditWidget
    from napari_unet._widgets._finetune import FineTuneWidget
    from napari_unet._widgets._segment import SegmentWidget
    from napari_unet.training import trainer

    viewer = make_napari_viewer()
    image, _ = blobs((8, 48, 48), seed=5)
    viewer.add_image(image, name="stack")
    segment, edit, finetune = SegmentWidget(viewer), EditWidget(viewer), FineTuneWidget(viewer)
    for name, widget in (("Segment", segment), ("Edit", edit), ("Fine-tune", finetune)):
        viewer.window.add_dock_widget(widget, name=name)
    segment.load_model_file(model_2d_path)
    segment.output_combo.setCurrentText("binary / classes")

    # 1. segment
    click(qtbot, segment, "Segment")
    wait_idle(qtbot, segment)
    layer = viewer.layers["stack labels"]

    # 2. paint two slices with napari's brush (marks them corrected)
    layer.n_edit_dimensions = 2
    layer.brush_size = 9
    painted = np.zeros(layer.data.shape, bool)
    for z, (y, x), value in ((2, (20, 20), 5), (2, (30, 12), 6), (6, (10, 35), 7)):
        viewer.dims.set_point(0, z)
        before = layer.data.copy()
        layer.paint((z, y, x), value)
        painted |= layer.data != before
    paint_values = layer.data[painted].copy()
    assert painted.sum() > 50 and layer.metadata["napari_unet_corrected_slices"] == [2, 6]

    # 3. fine-tune ~1 s on a snapshot: painting meanwhile does not reach the running job
    seen = {}
    real_trainer = trainer.Trainer

    class Recording(real_trainer):
        def __init__(self, model, pairs, config=None):
            seen["labels"] = pairs[0].labels
            super().__init__(model, pairs, config)

    monkeypatch.setattr(trainer, "Trainer", Recording)
    finetune.time_spin.setValue(1)
    finetune.config_overrides = {"batch_size": 2}
    at_start = layer.data[[2, 6]].copy()
    click(qtbot, finetune, "Fine-tune")
    viewer.dims.set_point(0, 2)
    before = layer.data.copy()
    layer.paint((2, 5, 40), 8)  # while it trains
    painted |= layer.data != before
    paint_values = layer.data[painted].copy()
    wait_idle(qtbot, finetune, timeout=120_000)
    assert finetune.result_key is not None and registry.current == finetune.result_key
    assert not np.shares_memory(seen["labels"], layer.data)
    np.testing.assert_array_equal(seen["labels"][[2, 6]], at_start)

    # 4. segment again with the new version: the corrected slices are left as they are
    state = layer.data.copy()
    click(qtbot, segment, "Segment")
    wait_idle(qtbot, segment)
    np.testing.assert_array_equal(layer.data[painted], paint_values)
    np.testing.assert_array_equal(layer.data[[2, 6]], state[[2, 6]])

    # 5. one undo: the layer as it was before the second Segment, every painted voxel included
    click(qtbot, edit, "Undo")
    np.testing.assert_array_equal(layer.data, state)
    np.testing.assert_array_equal(layer.data[painted], paint_values)
    # further undos walk back through the paint strokes, then the first Segment
    for _ in range(4):
        click(qtbot, edit, "Undo")
    assert not (layer.data[painted] == paint_values).all()
    click(qtbot, edit, "Undo")
    assert not layer.data.any()
