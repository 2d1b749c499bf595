"""Fine-tune dock: trains through the core Trainer in a worker, versions, stop, revert, save."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from napari_unet.checkpoint import load_model

from .conftest import blobs, click, make_tiny_model, wait_idle


def _docks(viewer):
    from napari_unet._widgets._finetune import FineTuneWidget
    from napari_unet._widgets._segment import SegmentWidget

    segment = SegmentWidget(viewer)
    finetune = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment")
    viewer.window.add_dock_widget(finetune, name="Fine-tune")
    return segment, finetune


def test_finetune_2d_new_version_revert_save(make_napari_viewer, qtbot, registry, model_2d_path,
                                             tmp_path, monkeypatch):
    from napari_unet._widgets import _finetune, _state

    # record where the heavy modules get imported and what is loaded when the worker starts
    _state._imported_on_main.clear()
    imported = []
    real_import = _state._import_module

    def recording_import(name):
        imported.append((name, threading.current_thread() is threading.main_thread()))
        return real_import(name)

    monkeypatch.setattr(_state, "_import_module", recording_import)
    at_start = {}
    real_start = _finetune.start_job

    def recording_start(job, **kwargs):
        at_start["dynamo"] = "torch._dynamo" in sys.modules
        at_start["main"] = threading.current_thread() is threading.main_thread()
        at_start["imported"] = [name for name, _ in imported]
        return real_start(job, **kwargs)

    monkeypatch.setattr(_finetune, "start_job", recording_start)

    viewer = make_napari_viewer()
    image, labels = blobs((48, 48))
    viewer.add_image(image, name="img")
    viewer.add_labels(labels, name="img labels")
    segment, widget = _docks(viewer)
    base_key = segment.load_model_file(model_2d_path)
    assert widget.model_combo.currentData() == base_key
    widget.iterations_spin.setValue(3)
    widget.time_spin.setValue(0)
    widget.config_overrides = {"batch_size": 2}
    click(qtbot, widget, "Fine-tune")
    assert widget.worker is not None and widget.stop_button.isEnabled()
    wait_idle(qtbot, widget)

    assert at_start == {"dynamo": True, "main": True, "imported": at_start["imported"]}
    assert "torch._dynamo" in at_start["imported"]
    assert all(on_main for _, on_main in imported)

    key = widget.result_key
    assert key is not None and registry.current == key
    new = registry.get(key)
    assert new.version == load_model(model_2d_path).version + 1
    assert segment.model_combo.currentData() == key  # the Segment dock shows the new version
    assert len(widget.plot.x) >= 1 and widget.last_stats.iteration == 3
    assert "fine-tune preview" in viewer.layers
    assert viewer.layers["fine-tune preview"].data.shape == (48, 48)
    assert widget.finetune_button.isEnabled() and not widget.stop_button.isEnabled()

    saved = widget.save_model(tmp_path / "new_model")
    assert saved.suffix == ".pt" and load_model(saved).version == new.version

    click(qtbot, widget, "Revert")
    assert key not in registry and registry.current == base_key
    assert segment.model_combo.currentData() == base_key


def test_stop_keeps_best_weights(make_napari_viewer, qtbot, registry, model_3d_path):
    viewer = make_napari_viewer()
    image, labels = blobs((8, 32, 32))
    viewer.add_image(image, name="stack")
    layer = viewer.add_labels(labels, name="stack labels")
    layer.metadata["napari_unet_corrected_slices"] = [2, 5]
    segment, widget = _docks(viewer)
    segment.load_model_file(model_3d_path)
    pairs, notes = widget.training_pairs()
    assert list(pairs[0].slices) == [2, 5] and "2 corrected" in notes[0]
    widget.time_spin.setValue(120)
    widget.config_overrides = {"batch_size": 1}
    widget.preview_check.setChecked(False)
    click(qtbot, widget, "Fine-tune")
    qtbot.waitUntil(lambda: widget.last_stats is not None, timeout=60_000)
    click(qtbot, widget, "Stop")
    wait_idle(qtbot, widget)
    assert widget.result_key is not None
    assert widget.last_stats.elapsed < 60
    assert registry.get(widget.result_key).history[-1]["iterations"] >= 1


def test_bad_training_data_is_a_notification(make_napari_viewer, qtbot, registry, model_2d_path,
                                            notifications):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.float32), name="img")
    viewer.add_labels(np.zeros((16, 16), np.uint8), name="wrong shape")
    segment, widget = _docks(viewer)
    segment.load_model_file(model_2d_path)
    widget.iterations_spin.setValue(2)
    widget.config_overrides = {"batch_size": 1}
    click(qtbot, widget, "Fine-tune")
    wait_idle(qtbot, widget)
    assert any(sev == "error" and "Fine-tune" in msg for sev, msg in notifications), notifications
    assert widget.result_key is None and widget.finetune_button.isEnabled()
    assert not widget.revert_button.isEnabled()


def test_pairs_list(make_napari_viewer, qtbot, registry):
    viewer = make_napari_viewer()
    for name in ("a", "b"):
        image, labels = blobs((24, 24))
        viewer.add_image(image, name=name)
        viewer.add_labels(labels, name=f"{name} labels")
    _, widget = _docks(viewer)
    for name in ("a", "b"):
        widget.image_combo.setCurrentText(name)
        widget.labels_combo.setCurrentText(f"{name} labels")
        click(qtbot, widget, "Add pair")
    pairs, _ = widget.training_pairs()
    assert len(pairs) == 2
    widget.pair_list.item(0).setSelected(True)
    click(qtbot, widget, "Remove pair")
    assert widget.pair_list.count() == 1


def test_training_in_a_child_process_preview_updated_in_place(make_napari_viewer, qtbot,
                                                             registry, model_2d_path):
    import os

    from napari_unet._widgets._finetune import PREVIEW_LAYER
    from napari_unet.subprocess_job import SubprocessJob

    viewer = make_napari_viewer()
    image, labels = blobs((48, 48))
    viewer.add_image(image, name="img")
    viewer.add_labels(labels, name="img labels")
    segment, widget = _docks(viewer)
    segment.load_model_file(model_2d_path)
    assert not widget.in_subprocess  # the default: the worker thread (see _finetune.IN_SUBPROCESS)
    widget.in_subprocess = True
    widget.iterations_spin.setValue(4)
    widget.time_spin.setValue(0)
    widget.config_overrides = {"batch_size": 2}
    click(qtbot, widget, "Fine-tune")
    preview = viewer.layers[PREVIEW_LAYER]  # created before the worker starts
    array = preview.data
    jobs = []
    widget.worker.yielded.connect(lambda _stats: jobs.append(widget.training_job))
    wait_idle(qtbot, widget)

    assert jobs and all(isinstance(job, SubprocessJob) for job in jobs)
    assert jobs[0].pid is None or jobs[0].pid != os.getpid()
    assert not jobs[0].running  # the child is gone
    assert widget.result_key is not None and widget.last_stats.iteration == 4
    assert registry.get(widget.result_key).history[-1]["iterations"] == 4
    # the preview was written into the layer's own array (no new array per update)
    assert viewer.layers[PREVIEW_LAYER] is preview and preview.data is array
    assert array.any()
    # the view caught up with the last iteration when the job ended
    assert widget.progress_bar.value() == widget.progress_bar.maximum()
    assert "New version" in widget.status.text()


def test_training_in_the_worker_thread_by_default(make_napari_viewer, qtbot, registry,
                                                  model_2d_path):
    from napari_unet._widgets._finetune import PREVIEW_LAYER
    from napari_unet.training import Trainer

    viewer = make_napari_viewer()
    image, labels = blobs((32, 32))
    viewer.add_image(image, name="img")
    viewer.add_labels(labels, name="img labels")
    segment, widget = _docks(viewer)
    segment.load_model_file(model_2d_path)
    widget.iterations_spin.setValue(2)
    widget.time_spin.setValue(0)
    widget.config_overrides = {"batch_size": 2}
    click(qtbot, widget, "Fine-tune")
    array = viewer.layers[PREVIEW_LAYER].data
    handles = []
    widget.worker.yielded.connect(lambda _stats: handles.append(widget.training_job))
    wait_idle(qtbot, widget)
    assert handles and isinstance(handles[0], Trainer)
    assert registry.get(widget.result_key).history[-1]["iterations"] == 2
    assert viewer.layers[PREVIEW_LAYER].data is array and array.any()  # written in place
