"""Fine-tune dock: trains through the core Trainer in a worker, versions, stop, revert, save."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from napari_unet.zoo.loading import load_model

from .conftest import blobs, click, wait_idle


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


def test_training_in_the_worker_thread_preview_updated_in_place(make_napari_viewer, qtbot,
                                                                registry, model_2d_path):
    from napari_unet._widgets._finetune import PREVIEW_LAYER
    from napari_unet.training.trainer import Trainer

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
    # the view caught up with the last iteration when the job ended
    assert widget.progress_bar.value() == widget.progress_bar.maximum()
    assert "New version" in widget.status.text()


def test_click_leaves_the_activity_bar_and_the_plot_to_the_timer(make_napari_viewer, qtbot,
                                                                 registry, model_2d_path):
    """napari's activity bar (~75 ms) and the loss figure's full redraw (~50 ms) each get
    their own event-loop pass, after the click (which makes the preview layer)."""
    from napari_unet._widgets._finetune import PREVIEW_LAYER

    viewer = make_napari_viewer()
    image, labels = blobs((32, 32))
    viewer.add_image(image, name="img")
    viewer.add_labels(labels, name="img labels")
    segment, widget = _docks(viewer)
    segment.load_model_file(model_2d_path)
    widget.iterations_spin.setValue(3)
    widget.time_spin.setValue(0)
    draws = []
    widget.plot.canvas.mpl_connect("draw_event", lambda _e: draws.append(1))
    widget.fine_tune()
    assert PREVIEW_LAYER in viewer.layers
    assert widget._pbar is None and not draws  # neither was made in the click
    qtbot.waitUntil(lambda: widget._pbar is not None or widget.worker is None, timeout=30000)
    wait_idle(qtbot, widget)
    assert draws  # the timer redrew the figure for the new run


# ---------------------------------------------------------------------------------------------
# best weights, honestly (issue 9, item 3)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("slices, keeps_best", [([3], False), ([1, 4, 7], True)])
def test_dock_says_which_weights_it_keeps(make_napari_viewer, qtbot, registry, model_2d_path,
                                          slices, keeps_best):
    viewer = make_napari_viewer()
    image, labels = blobs((9, 32, 32))
    viewer.add_image(image, name="stack")
    layer = viewer.add_labels(labels, name="stack labels")
    layer.metadata["napari_unet_corrected_slices"] = slices
    segment, widget = _docks(viewer)
    segment.load_model_file(model_2d_path)
    widget.iterations_spin.setValue(2)
    widget.time_spin.setValue(0)
    widget.config_overrides = {"batch_size": 2}
    widget.preview_check.setChecked(False)
    click(qtbot, widget, "Fine-tune")
    expected_start = "best-scoring" if keeps_best else "last weights"
    assert expected_start in widget.weights_label.text()  # said at once
    wait_idle(qtbot, widget)
    assert widget.last_stats.keeps_best is keeps_best
    text = widget.weights_label.text().lower()  # now the Trainer's own account
    if keeps_best:
        assert "held out" in text and "best-scoring" in text
        # which weights were kept and why, with the held-out scores of both candidates
        status = widget.status.text()
        assert ("start model's weights" in status or "fine-tuned weights" in status), status
        assert "held-out" in status and "start model's" in status
    else:
        assert "last weights" in text and "held out for validation:" not in text
        assert "last weights" in widget.status.text()


def test_labels_are_a_snapshot_of_the_corrected_slices(make_napari_viewer, registry,
                                                       model_2d_path):
    viewer = make_napari_viewer()
    image, labels = blobs((6, 24, 24))
    viewer.add_image(image, name="stack")
    layer = viewer.add_labels(labels.copy(), name="stack labels")
    layer.metadata["napari_unet_corrected_slices"] = [1, 4]
    _, widget = _docks(viewer)
    pairs, _ = widget.training_pairs()
    snap = pairs[0].labels
    assert not np.shares_memory(snap, layer.data)
    np.testing.assert_array_equal(snap[[1, 4]], labels[[1, 4]])
    assert not snap[[0, 2, 3, 5]].any()  # never trained on: not copied
    layer.data[1] = 0  # painting afterwards does not reach it
    np.testing.assert_array_equal(snap[1], labels[1])
    widget.corrected_only.setChecked(False)
    whole, _ = widget.training_pairs()
    assert not np.shares_memory(whole[0].labels, layer.data)


def test_precision_choice_and_resolved_label(make_napari_viewer, qtbot, registry, model_2d_path):
    from napari_unet.model.precision import PRECISIONS, resolve_precision

    viewer = make_napari_viewer()
    image, labels = blobs((32, 32))
    viewer.add_image(image, name="img")
    viewer.add_labels(labels, name="img labels")
    segment, widget = _docks(viewer)
    segment.load_model_file(model_2d_path)
    for dock in (segment, widget):
        assert [dock.precision_combo.itemData(i) for i in range(dock.precision_combo.count())] \
            == list(PRECISIONS)
    widget.iterations_spin.setValue(1)
    widget.time_spin.setValue(0)
    widget.config_overrides = {"batch_size": 2}
    widget.precision_combo.setCurrentText("fp32")
    configs = []
    click(qtbot, widget, "Fine-tune")
    label = resolve_precision("fp32", "cpu").label()
    assert label in widget.status.text()
    widget.worker.yielded.connect(lambda _stats: configs.append(widget.training_job.config))
    wait_idle(qtbot, widget)
    assert configs and configs[0].precision == "fp32"
    assert "fp32" in widget.weights_label.text()  # the Trainer's first message says it too


# ---------------------------------------------------------------------------------------------
# New model… (issue 9, item 8)
# ---------------------------------------------------------------------------------------------

def test_new_model_for_ct_organs_as_classes(make_napari_viewer, qtbot, registry):
    from napari_unet._widgets._io import read_layers
    from napari_unet._widgets._new_model import NewModelDialog, spec_for_layer
    from napari_unet._widgets._state import corrected_slices, set_corrected_slices

    from .test_plugin import SAMPLES

    viewer = make_napari_viewer()
    for data, kwargs, kind in read_layers([str(SAMPLES / "ct_small.nii.gz"),
                                           str(SAMPLES / "ct_small_organs.nii.gz")]):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    organs = viewer.layers["ct_small_organs"]
    names = organs.features.set_index("index")["name"]
    assert names[1] == "spleen" and names[5] == "liver"  # from ct_small_label_map.json
    _, widget = _docks(viewer)
    widget.labels_combo.set_layer(organs)
    widget.image_combo.setCurrentText("ct_small")

    # the dialog offers the layer's names, 3D, and no in-plane-only level (3 mm isotropic)
    dialog = NewModelDialog(organs, widget)
    dialog.task_combo.setCurrentText("classes")
    spec = dialog.spec()
    assert spec.spatial_dims == 3 and spec.task == "semantic" and spec.inplane_only_levels == ()
    assert spec.class_names[:3] == ["background", "spleen", "kidney_right"]
    assert len(spec.class_names) == 118

    spec = spec_for_layer(organs, 3, "semantic", base_channels=4, depth=3)
    key = widget.create_model(spec)
    assert registry.current == key and widget.model_combo.currentData() == key
    assert "new, untrained" in widget.model_combo.currentText()
    model = registry.get(key)
    assert model.version == 0 and model.class_names == spec.class_names
    assert model.config.out_channels == 118 and model.config.inplane_only_levels == ()

    set_corrected_slices(organs, [8, 15, 22])
    assert corrected_slices(organs) == [8, 15, 22]
    widget.iterations_spin.setValue(2)
    widget.time_spin.setValue(0)
    widget.config_overrides = {"batch_size": 1}
    widget.preview_check.setChecked(False)
    click(qtbot, widget, "Fine-tune")
    wait_idle(qtbot, widget, timeout=120_000)
    trained = registry.get(widget.result_key)
    assert trained.version == 1 and trained.task == "semantic"
    assert trained.class_names[5] == "liver"


def test_new_model_anisotropy_from_the_scale(make_napari_viewer, qtbot, registry):
    from napari_unet._widgets._new_model import NewModelDialog

    viewer = make_napari_viewer()
    _, labels = blobs((8, 32, 32))
    layer = viewer.add_labels(labels, name="nuclei labels", scale=(0.28, 0.127, 0.127))
    _, widget = _docks(viewer)
    dialog = NewModelDialog(layer, widget)
    assert dialog.aniso_spin.value() == 1  # z is 2.2x coarser: one in-plane-only level
    dialog.task_combo.setCurrentText("foreground + boundary")
    spec = dialog.spec()
    assert spec.inplane_only_levels == (0,) and spec.voxel_size == pytest.approx((0.28, 0.127, 0.127))
    key = widget.create_model(spec)
    assert registry.get(key).config.inplane_only_levels == (0,)
    # 2D: no anisotropy; classes need names
    dialog.dims_combo.setCurrentIndex(0)
    assert dialog.spec().inplane_only_levels == ()
    dialog.task_combo.setCurrentText("classes")
    with pytest.raises(ValueError, match="names"):
        dialog.spec()
    dialog.classes_edit.setText("nucleus, nucleolus")
    assert dialog.spec().class_names == ["background", "nucleus", "nucleolus"]


def test_new_model_button_uses_the_dialog(make_napari_viewer, qtbot, registry, monkeypatch):
    from napari_unet._widgets import _finetune

    viewer = make_napari_viewer()
    _, labels = blobs((32, 32))
    viewer.add_labels(labels, name="cells")
    _, widget = _docks(viewer)
    monkeypatch.setattr(_finetune.NewModelDialog, "exec_", lambda self: True)
    click(qtbot, widget, "New model…")
    model = registry.get(registry.current)
    assert model.spatial_dims == 2 and model.task == "foreground_boundary"
    assert model.name == "cells-model" and model.version == 0


def test_dock_and_cli_agree(make_napari_viewer, qtbot, registry, model_3d_path, tmp_path, monkeypatch):
    """The same corrections, iterations and seed through the Fine-tune dock and `napari-unet
    train` give the same weights, the same choice of weights and the same words for it."""
    import tifffile
    import torch

    from napari_unet.cli.main import main
    from napari_unet.model.checkpoint import load_checkpoint

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread count: bit-identical arithmetic
    image, labels = blobs((10, 32, 32), n=8)
    slices = [2, 5, 8]
    viewer = make_napari_viewer()
    viewer.add_image(image, name="stack")
    layer = viewer.add_labels(labels, name="stack labels")
    layer.metadata["napari_unet_corrected_slices"] = slices
    segment, widget = _docks(viewer)
    segment.load_model_file(model_3d_path)
    widget.iterations_spin.setValue(4)
    widget.time_spin.setValue(0)
    widget.preview_check.setChecked(True)
    click(qtbot, widget, "Fine-tune")
    wait_idle(qtbot, widget)
    from_dock = registry.get(widget.result_key)

    tifffile.imwrite(tmp_path / "stack.tif", image)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    out = tmp_path / "cli.pt"
    assert main(["train", "--image", str(tmp_path / "stack.tif"), "--labels", str(tmp_path / "labels.tif"),
                 "--slices", "2,5,8", "--from", str(model_3d_path), "--iterations", "4", "-o", str(out)]) == 0
    from_cli = load_checkpoint(out)
    dock_entry, cli_entry = from_dock.history[-1], from_cli.history[-1]
    for key in ("iterations", "kept", "decision", "postprocessing", "best_score", "start_score"):
        assert dock_entry[key] == cli_entry[key], key
    assert dock_entry["decision"] in widget.status.text()
    for key, value in from_dock.network.state_dict().items():
        assert torch.allclose(value.float(), from_cli.network.state_dict()[key].float(), atol=1e-6), key
