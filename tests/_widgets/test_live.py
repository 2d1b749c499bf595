"""Live mode in the Fine-tune dock: painting while the model trains is never lost and enters
training, the live layer follows the slice, Apply keeps corrected slices and can be undone,
stopping or closing leaves no thread running, the key toggles Live, and an empty start works."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import blobs, click, make_tiny_model

TIMEOUT = 60_000


def _viewer_with_stack(make_napari_viewer, shape=(6, 40, 40)):
    viewer = make_napari_viewer()
    image, labels = blobs(shape, n=5)
    viewer.add_image(image, name="img")
    layer = viewer.add_labels(labels.astype(np.uint16), name="img labels")
    return viewer, layer


def _dock(viewer, registry, model=None):
    from napari_unet._widgets._finetune import FineTuneWidget

    widget = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune")
    if model is not None:
        registry.add_model(model, source="file", key=model.label)
    widget.image_combo.set_layer(viewer.layers["img"])
    if "img labels" in viewer.layers:
        widget.labels_combo.set_layer(viewer.layers["img labels"])
    return widget


def _wait_update(qtbot, live, condition=lambda u: True):
    qtbot.waitUntil(lambda: live._run.update is not None
                    and live._run.update.prediction is not None
                    and condition(live._run.update), timeout=TIMEOUT)
    return live._run.update


def _stop(qtbot, live):
    live.stop()
    qtbot.waitUntil(lambda: live.worker is None, timeout=TIMEOUT)


def _no_thread_running(qtbot):
    from qtpy.QtCore import QThreadPool

    qtbot.waitUntil(lambda: QThreadPool.globalInstance().activeThreadCount() == 0,
                    timeout=TIMEOUT)


def test_painting_during_live_is_kept_and_enters_training(make_napari_viewer, qtbot, registry):
    from napari_unet._widgets._live_layer import LIVE_LAYER
    from napari_unet._widgets._state import corrected_slices

    viewer, layer = _viewer_with_stack(make_napari_viewer)
    widget = _dock(viewer, registry, make_tiny_model(2))
    live = widget.live
    viewer.dims.set_current_step(0, 2)
    click(qtbot, widget.live, "Live")
    assert live.running and live.live_button.isChecked()
    _wait_update(qtbot, live)
    assert LIVE_LAYER in viewer.layers
    assert viewer.layers.selection.active is layer  # the user's layer stays the active one

    before = np.array(layer.data, copy=True)
    layer.paint((2, 10, 10), 9)  # a stroke while it trains
    assert 2 in corrected_slices(layer)
    qtbot.waitUntil(lambda: live._run.snapshots.version >= 1, timeout=5_000)
    version = live._run.snapshots.version
    _wait_update(qtbot, live, lambda u: u.corrections_version >= version)
    assert live._run.latencies  # the correction was shown trained on

    layer.paint((2, 30, 30), 9)  # a second stroke on the same slice: a newer snapshot
    qtbot.waitUntil(lambda: live._run.snapshots.version > version, timeout=5_000)
    np.testing.assert_array_equal(live._run.snapshots.planes[2], layer.data[2])
    _wait_update(qtbot, live, lambda u: u.corrections_version > version and u.trained_on_latest)

    # the user's labels hold their strokes and nothing else changed (never written into)
    changed = np.argwhere(layer.data != before)
    assert len(changed) and set(map(int, changed[:, 0])) == {2}
    assert (layer.data[2][before[2] != layer.data[2]] == 9).all()
    assert "Updated" in live.clock_label.text() or "Preparing" in live.clock_label.text()
    _stop(qtbot, live)
    _no_thread_running(qtbot)


def test_live_layer_follows_the_slice(make_napari_viewer, qtbot, registry):
    from napari_unet._widgets._live_layer import LIVE_LAYER, OUTLINE_WIDTH
    from napari_unet.labels.outlines import plane_outlines

    viewer, layer = _viewer_with_stack(make_napari_viewer)
    widget = _dock(viewer, registry, make_tiny_model(2))
    live = widget.live
    viewer.dims.set_current_step(0, 1)
    live.toggle()
    first = _wait_update(qtbot, live)
    assert first.view.index == 1
    viewer.dims.set_current_step(0, 4)
    assert live._run.view.index == 4  # re-targeted at once
    update = _wait_update(qtbot, live, lambda u: u.view.index == 4)
    region = update.region
    assert region[0].start <= 4 < region[0].stop
    shown = viewer.layers[LIVE_LAYER]
    # contours by default: the outlines in the plane on screen, made by the worker
    outlines = plane_outlines(update.prediction, (1, 2), OUTLINE_WIDTH)
    np.testing.assert_array_equal(shown.data[region], outlines.astype(shown.data.dtype))
    live.display_combo.setCurrentText("translucent")
    assert shown.visible and shown.opacity < 0.5
    _wait_update(qtbot, live, lambda u: np.array_equal(shown.data[u.region], u.prediction))
    live.display_combo.setCurrentText("hidden")
    assert not shown.visible
    _stop(qtbot, live)


def test_apply_keeps_corrected_slices_and_undo_restores(make_napari_viewer, qtbot, registry):
    from napari_unet._widgets._history import history_for
    from napari_unet._widgets._state import set_corrected_slices

    viewer, layer = _viewer_with_stack(make_napari_viewer)
    layer.data[:] = 7  # what Apply will replace outside the corrected slices
    layer.data[3, 5:15, 5:15] = 2
    set_corrected_slices(layer, [3])
    original = np.array(layer.data, copy=True)
    base = make_tiny_model(2)
    widget = _dock(viewer, registry, base)
    live = widget.live
    live.toggle()
    _wait_update(qtbot, live)
    click(qtbot, live, "Apply")  # training stops, then the whole stack is segmented
    qtbot.waitUntil(lambda: live.worker is None and not live._run.apply_after, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not live.applier.running, timeout=TIMEOUT)
    key = widget.result_key
    if key is not None:  # the live weights beat the start model: a new version, selected
        assert registry.current == key and registry.get(key).version == base.version + 1
        assert live._run.result is registry.get(key)
    else:  # the start model was kept (Apply used it)
        assert live._run.result is live._run.model
    np.testing.assert_array_equal(layer.data[3], original[3])  # the corrected slice is kept
    assert not (layer.data[[0, 1, 2, 4, 5]] == 7).all()  # the others were segmented
    assert "Ctrl+Z" in live.apply_status.text()
    assert history_for(layer).undo() is not None
    np.testing.assert_array_equal(layer.data, original)
    if key is not None:
        widget.revert()  # Revert takes the new version out of the list
        assert key not in registry


def test_stop_and_closing_the_viewer_leave_no_thread(make_napari_viewer, qtbot, registry):
    viewer, layer = _viewer_with_stack(make_napari_viewer)
    widget = _dock(viewer, registry, make_tiny_model(2))
    live = widget.live
    live.toggle()
    _wait_update(qtbot, live)
    live.toggle()  # off: stops after its current step
    assert not live.live_button.isChecked()
    qtbot.waitUntil(lambda: live.worker is None, timeout=TIMEOUT)
    assert live._run.result is not None  # run() returned the kept weights
    _no_thread_running(qtbot)

    live.toggle()
    qtbot.waitUntil(lambda: live._run.session is not None, timeout=TIMEOUT)
    viewer.close()
    _no_thread_running(qtbot)


def test_key_toggles_live(make_napari_viewer, qtbot, registry):
    from napari.utils.key_bindings import coerce_keybinding

    from napari_unet._widgets._live import KEY

    viewer, layer = _viewer_with_stack(make_napari_viewer)
    widget = _dock(viewer, registry, make_tiny_model(2))
    handler = viewer.window._qt_viewer._key_map_handler
    handler.press_key(str(coerce_keybinding(KEY)))
    assert widget.live.running
    handler.press_key(str(coerce_keybinding(KEY)))
    qtbot.waitUntil(lambda: widget.live.worker is None, timeout=TIMEOUT)
    assert not widget.live.live_button.isChecked()


def test_empty_start_from_a_new_model(make_napari_viewer, qtbot, registry):
    from napari_unet._widgets._live_layer import LIVE_LAYER
    from napari_unet._widgets._new_model import NewModelSpec

    viewer = make_napari_viewer()
    image, truth = blobs((64, 64), n=4)
    viewer.add_image(image, name="img")
    widget = _dock(viewer, registry)
    widget.create_model(NewModelSpec(spatial_dims=2, task="foreground", base_channels=4, depth=2))
    live = widget.live
    live.background_spin.setValue(5)
    assert live.start()  # no labels layer: Live makes one to paint into
    layer = widget.labels_combo.layer()
    assert layer is not None and not layer.data.any()
    # paint two objects and some background, sparsely
    ids = [i for i in np.unique(truth) if i][:2]
    for i in ids:
        ys, xs = np.nonzero(truth == i)
        layer.data[ys, xs] = i
    layer.data[0:6, :] = 5
    layer.paint((2, 2), 5)  # the stroke that tells
    _wait_update(qtbot, live, lambda u: u.corrections_version >= 1 and u.iteration > 0)
    assert LIVE_LAYER in viewer.layers
    assert live._run.session.config.sparse
    _stop(qtbot, live)


def test_empty_start_needs_a_background_label(make_napari_viewer, qtbot, registry, notifications):
    from napari_unet._widgets._new_model import NewModelSpec

    viewer = make_napari_viewer()
    image, _ = blobs((32, 32), n=2)
    viewer.add_image(image, name="img")
    widget = _dock(viewer, registry)
    widget.create_model(NewModelSpec(spatial_dims=2, task="foreground", base_channels=4, depth=2))
    assert not widget.live.start()
    assert any("background" in message for _, message in notifications)
    assert not widget.live.running


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
