"""Segment dock: driven like a user, compared with the core on the same input."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_unet.engine.live import PredictOptions
from napari_unet.engine.predict import segment
from napari_unet.model.checkpoint import save_checkpoint
from napari_unet.progress import drain
from napari_unet.zoo.loading import load_model

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
    # the result is written into the layer's own array (no new array on the main thread), a
    # dtype napari draws without hashing
    assert layer.data is array and array.dtype == np.uint16
    np.testing.assert_array_equal(layer.data, expected.data)
    assert tuple(layer.scale) == (0.5, 0.5)
    np.testing.assert_array_equal(layer.metadata["napari_unet_probabilities"], expected.probabilities)
    assert widget.segment_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert "Done" in widget.status.text()
    assert widget.progress_bar.value() == widget.progress_bar.maximum()


def test_stack_fills_tile_by_tile_and_cancel_keeps_done_tiles(make_napari_viewer, qtbot, registry,
                                                              model_2d_path, monkeypatch):
    from napari_unet.engine import predict, runner

    original = runner.TileRunner._run_batch

    def slow_run(self, tiles, write):  # a slow model, so Cancel lands mid-way
        time.sleep(0.05)
        return original(self, tiles, write)

    monkeypatch.setattr(runner.TileRunner, "_run_batch", slow_run)
    viewer = make_napari_viewer()
    image, _ = blobs((20, 48, 48))
    viewer.add_image(image, name="stack")
    widget = _dock(viewer, qtbot)
    widget.load_model_file(model_2d_path)
    widget.output_combo.setCurrentText("binary / classes")
    widget.predict_options = PredictOptions(batch_size=1)
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
    done = widget._run.done
    assert 3 <= done < 20, done
    assert "Cancelled" in widget.status.text()
    assert widget.segment_button.isEnabled() and not widget.cancel_button.isEnabled()
    # the finished slices hold the core's thresholded prediction, the rest is untouched
    probabilities = drain(predict.predict_probabilities(image, load_model(model_2d_path)))
    from napari_unet.labels.instances import to_semantic

    expected = to_semantic(probabilities.astype(np.float32), "foreground", threshold=0.5)
    np.testing.assert_array_equal(layer.data[:done], expected[:done])
    assert not layer.data[done + 1:].any()
    assert seen_partial == sorted(seen_partial)  # it filled in progressively


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
    from qtpy.QtWidgets import QAbstractButton, QAbstractSpinBox, QComboBox, QLineEdit

    from napari_unet._widgets import (
        EditWidget,
        ExportWidget,
        FineTuneWidget,
        SegmentWidget,
    )

    viewer = make_napari_viewer()
    for cls in (SegmentWidget, EditWidget, FineTuneWidget, ExportWidget):
        widget = cls(viewer)
        viewer.window.add_dock_widget(widget, name=cls.__name__)
        controls = widget.findChildren((QAbstractButton, QComboBox, QAbstractSpinBox, QLineEdit))
        missing = [getattr(c, "text", lambda: "")() or type(c).__name__ for c in controls
                   if not c.toolTip() and not isinstance(c.parent(), (QAbstractSpinBox, QComboBox))]
        assert not missing, f"{cls.__name__}: controls without tooltip: {missing}"


# ---------------------------------------------------------------------------------------------
# the user's work is never lost (issue 9, item 2)
# ---------------------------------------------------------------------------------------------

def _stack_with_corrections(viewer, shape=(8, 40, 40)):
    image, truth = blobs(shape, seed=3)
    viewer.add_image(image, name="stack")
    corrected = np.zeros(shape, dtype=np.uint32)
    corrected[2] = truth[2] + 50  # ids no model would give
    corrected[5] = 77
    layer = viewer.add_labels(corrected.copy(), name="stack labels")
    layer.metadata["napari_unet_corrected_slices"] = [2, 5]
    return image, layer, corrected


def test_segment_keeps_corrected_slices_and_one_undo_restores(make_napari_viewer, qtbot, registry,
                                                               model_2d_path):
    viewer = make_napari_viewer()
    image, layer, before = _stack_with_corrections(viewer)
    widget = _dock(viewer, qtbot)
    widget.load_model_file(model_2d_path)
    widget.output_combo.setCurrentText("binary / classes")
    assert widget.write_combo.currentText() == "keep corrected slices"  # the default
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    expected = drain(segment(image, load_model(model_2d_path), output="labels")).data
    for z in range(8):
        if z in (2, 5):
            np.testing.assert_array_equal(layer.data[z], before[z])  # left as they were
        else:
            np.testing.assert_array_equal(layer.data[z], expected[z])
    assert "2, 5" in widget.status.text() and "left as they were" in widget.status.text()
    segmented = layer.data.copy()

    from napari_unet._widgets._history import history_for

    history = history_for(layer)
    assert history.undo() == f"Segment with {load_model(model_2d_path).label}"
    np.testing.assert_array_equal(layer.data, before)  # one step: the layer as it was
    history.redo()
    np.testing.assert_array_equal(layer.data, segmented)


def test_segment_into_a_new_layer(make_napari_viewer, qtbot, registry, model_2d_path):
    viewer = make_napari_viewer()
    image, layer, before = _stack_with_corrections(viewer)
    widget = _dock(viewer, qtbot)
    widget.load_model_file(model_2d_path)
    widget.output_combo.setCurrentText("binary / classes")
    widget.write_combo.setCurrentText("new labels layer")
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    np.testing.assert_array_equal(layer.data, before)
    new = widget.labels_layer
    assert new is not layer and new in viewer.layers and new.name != layer.name
    expected = drain(segment(image, load_model(model_2d_path), output="labels")).data
    np.testing.assert_array_equal(new.data, expected)


def test_overwrite_needs_a_confirmation(make_napari_viewer, qtbot, registry, model_2d_path,
                                        monkeypatch):
    viewer = make_napari_viewer()
    image, layer, before = _stack_with_corrections(viewer)
    widget = _dock(viewer, qtbot)
    widget.load_model_file(model_2d_path)
    widget.output_combo.setCurrentText("binary / classes")
    widget.write_combo.setCurrentText("overwrite all")
    asked = []
    monkeypatch.setattr(widget, "confirm_overwrite", lambda text: asked.append(text) or False)
    click(qtbot, widget, "Segment")
    assert widget.worker is None and len(asked) == 1 and "2 corrected slice" in asked[0]
    np.testing.assert_array_equal(layer.data, before)
    assert "Nothing was changed" in widget.status.text()

    monkeypatch.setattr(widget, "confirm_overwrite", lambda text: asked.append(text) or True)
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    expected = drain(segment(image, load_model(model_2d_path), output="labels")).data
    np.testing.assert_array_equal(layer.data, expected)  # corrected slices included
    assert len(asked) == 2
    # overwritten slices are no longer marked corrected; one undo restores content and marks
    assert layer.metadata["napari_unet_corrected_slices"] == []
    from napari_unet._widgets._history import history_for

    history_for(layer).undo()
    np.testing.assert_array_equal(layer.data, before)
    assert layer.metadata["napari_unet_corrected_slices"] == [2, 5]


def test_keep_mode_asks_when_everything_is_corrected(make_napari_viewer, qtbot, registry,
                                                     model_2d_path, monkeypatch):
    viewer = make_napari_viewer()
    image, truth = blobs((40, 40))
    viewer.add_image(image, name="img")
    layer = viewer.add_labels(truth.astype(np.uint32), name="img labels")
    widget = _dock(viewer, qtbot)
    widget.load_model_file(model_2d_path)
    layer.paint((10, 10), 9)  # a 2D image with a paint stroke is corrected as a whole
    assert layer.metadata["napari_unet_corrected_slices"] == [0]
    painted = layer.data.copy()
    asked = []
    monkeypatch.setattr(widget, "confirm_overwrite", lambda text: asked.append(text) or False)
    click(qtbot, widget, "Segment")
    assert asked and widget.worker is None
    np.testing.assert_array_equal(layer.data, painted)


def test_undo_is_refused_while_segmenting(make_napari_viewer, qtbot, registry, model_2d_path,
                                          monkeypatch):
    from napari_unet._widgets._history import HistoryBusy, history_for
    from napari_unet.engine import runner

    original = runner.TileRunner._run_batch

    def slow_run(self, tiles, write):
        time.sleep(0.05)
        return original(self, tiles, write)

    monkeypatch.setattr(runner.TileRunner, "_run_batch", slow_run)
    viewer = make_napari_viewer()
    image, layer, before = _stack_with_corrections(viewer)
    widget = _dock(viewer, qtbot)
    widget.load_model_file(model_2d_path)
    widget.predict_options = PredictOptions(batch_size=1)
    click(qtbot, widget, "Segment")
    with pytest.raises(HistoryBusy):
        history_for(layer).undo()
    wait_idle(qtbot, widget)
    history_for(layer).undo()
    np.testing.assert_array_equal(layer.data, before)


class _RecordingArray:
    """An array that records which thread reads it (to check a lazy layer is streamed)."""

    def __init__(self, data):
        import threading

        self.data, self.shape, self.dtype, self.ndim = data, data.shape, data.dtype, data.ndim
        self.reads: list[bool] = []
        self._main = threading.main_thread()

    def __getitem__(self, index):
        import threading

        self.reads.append(threading.current_thread() is self._main)
        return self.data[index]


def test_lazy_layer_is_streamed_in_the_worker(make_napari_viewer, qtbot, registry, model_2d_path):
    import dask.array as da

    viewer = make_napari_viewer()
    image, _ = blobs((6, 48, 48), seed=2)
    source = _RecordingArray(image)
    lazy = da.from_array(source, chunks=(1, 48, 48))
    viewer.add_image(lazy, name="lazy", contrast_limits=(0, 250))
    source.reads.clear()  # napari reads the slice on screen: that is napari's own business
    widget = _dock(viewer, qtbot)
    widget.load_model_file(model_2d_path)
    widget.output_combo.setCurrentText("binary / classes")
    segment_calls = []
    widget.segment()
    # nothing read on the main thread by the click itself (the worker may already be reading)
    segment_calls.append(list(source.reads))
    wait_idle(qtbot, widget)
    assert not any(segment_calls[0])
    layer = viewer.layers["lazy labels"]
    expected = drain(segment(image, load_model(model_2d_path), output="labels")).data
    np.testing.assert_array_equal(layer.data, expected)
    assert source.reads and not all(source.reads)  # the worker read it


def test_more_objects_than_the_layer_holds_widen_it(make_napari_viewer, qtbot, registry,
                                                     model_2d_path, monkeypatch):
    from napari_unet.labels import instances

    viewer = make_napari_viewer()
    image, _ = blobs((64, 80))
    viewer.add_image(image, name="cells")
    widget = _dock(viewer, qtbot)
    widget.load_model_file(model_2d_path)
    widget.output_combo.setCurrentText("instances")
    real = instances.to_instances

    def many(*args, **kwargs):  # ids beyond uint16
        out = real(*args, **kwargs).astype(np.uint32)
        out[out > 0] += 70_000
        out[:4, :4] = 99_999
        return out

    monkeypatch.setattr(instances, "to_instances", many)
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    layer = viewer.layers["cells labels"]
    assert layer.data.dtype == np.uint32
    expected = drain(segment(image, load_model(model_2d_path), output="instances"))
    assert int(expected.data.max()) == 99_999
    np.testing.assert_array_equal(layer.data, expected.data)


def test_start_at_the_view_and_precision(make_napari_viewer, qtbot, registry, model_2d_path,
                                         monkeypatch):
    from napari_unet.engine import predict
    from napari_unet.model.precision import resolve_precision

    calls, regions = [], []
    original = predict.segment

    def recording(*args, **kwargs):
        calls.append(kwargs)
        job = original(*args, **kwargs)

        def record_regions():  # in the worker: every tile's region, in order
            while True:
                try:
                    item = next(job)
                except StopIteration as stop:
                    return stop.value
                if item.region:
                    regions.append(item.region)
                yield item

        return record_regions()

    monkeypatch.setattr(predict, "segment", recording)
    viewer = make_napari_viewer()
    image, _ = blobs((10, 40, 60))
    viewer.add_image(image, name="stack")
    viewer.dims.set_point(0, 6)
    widget = _dock(viewer, qtbot)
    widget.load_model_file(model_2d_path)
    widget.output_combo.setCurrentText("binary / classes")
    widget.precision_combo.setCurrentText("fp32")
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    start_at = calls[0]["start_at"]
    assert start_at[0] == 6 and 0 <= start_at[1] < 40 and 0 <= start_at[2] < 60
    assert calls[0]["precision"] == "fp32"
    assert regions[0][0] == slice(6, 7)  # the slice on screen came first
    label = resolve_precision("fp32", "cpu").label()
    assert label in widget.status.text()


def test_tuned_post_processing_is_the_default_and_the_user_can_override(
        make_napari_viewer, qtbot, registry, model_2d_path, tmp_path):
    model = load_model(model_2d_path)
    model.postprocess = {"threshold": 0.35, "min_size": 7, "tuned_on": "a test"}
    tuned_path = save_checkpoint(model, tmp_path / "tuned.pt")
    viewer = make_napari_viewer()
    image, _ = blobs((64, 80))
    viewer.add_image(image, name="cells")
    widget = _dock(viewer, qtbot)
    assert widget.load_model_file(tuned_path)
    assert widget.threshold_spin.value() == pytest.approx(0.35)
    assert widget.min_size_spin.value() == 7
    widget.output_combo.setCurrentText("instances")
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    expected = drain(segment(image, model, output="instances"))  # the model's own values
    np.testing.assert_array_equal(viewer.layers["cells labels"].data, expected.data)
    # the user's value wins, also over a model loaded later without tuned values
    widget.threshold_spin.setValue(0.6)
    assert widget.postprocess_edited
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    assert widget.threshold_spin.value() == pytest.approx(0.6)


def test_uncertainty_layer_and_suggested_slices_after_segment(make_napari_viewer, qtbot, registry,
                                                              model_2d_path):
    from napari_unet.engine.uncertainty import rank_slices, uncertainty_map

    viewer = make_napari_viewer()
    image, _ = blobs((10, 40, 48))
    viewer.add_image(image, name="stack")
    widget = _dock(viewer, qtbot)
    widget.load_model_file(model_2d_path)
    widget.output_combo.setCurrentText("binary / classes")
    model = load_model(model_2d_path)
    threshold = widget.threshold_spin.value()
    # without the option: no layer, but the slices are ranked all the same (no extra cost)
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    assert "stack uncertainty" not in viewer.layers
    labels = viewer.layers["stack labels"]
    probabilities = drain(segment(image, model, output="labels")).probabilities
    plain_map = uncertainty_map(probabilities, model.task)
    expected = rank_slices(plain_map, probabilities, 5, task=model.task, threshold=threshold)
    assert labels.metadata["napari_unet_suggested_slices"] == [[z, pytest.approx(s)] for z, s in expected]
    assert "Suggested slices to correct" in widget.status.text()

    # with the option: the layer appears (magma, additive, 0..1)
    widget.uncertainty_check.setChecked(True)
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    layer = viewer.layers["stack uncertainty"]
    assert layer is widget.uncertainty_layer
    assert layer.colormap.name == "magma" and layer.blending == "additive"
    assert tuple(layer.contrast_limits) == (0.0, 1.0)
    np.testing.assert_allclose(layer.data, plain_map, atol=1e-6)

    # with TTA it updates in place and includes the disagreement between augmentations
    widget.tta_check.setChecked(True)
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    assert viewer.layers["stack uncertainty"] is layer
    spread = np.zeros(image.shape, np.float16)
    augmented = drain(segment(image, model, output="labels", tta=True, tta_spread=spread))
    expected_map = uncertainty_map(augmented.probabilities, model.task, spread)
    np.testing.assert_allclose(layer.data, expected_map, atol=1e-6)
    assert spread.max() > 0 and np.abs(layer.data - plain_map).max() > 5e-5
    np.testing.assert_array_equal(labels.data, augmented.data)

    # the user may toggle it; a corrected slice is never suggested again
    layer.visible = False
    labels.metadata["napari_unet_corrected_slices"] = [expected[0][0]]
    widget.tta_check.setChecked(False)
    click(qtbot, widget, "Segment")
    wait_idle(qtbot, widget)
    suggested = [z for z, _ in labels.metadata["napari_unet_suggested_slices"]]
    assert expected[0][0] not in suggested and len(suggested) == 5
    assert not viewer.layers["stack uncertainty"].visible
