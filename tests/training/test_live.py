"""Tests for :mod:`napari_unet.training.live` (live mode's core) on tiny synthetic data."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch

from napari_unet.labels.metrics import match_instances
from napari_unet.training.live import LiveConfig, LiveSession, LiveUpdate, LiveView
from napari_unet.training.live_data import LiveImage, build_data, held_out_planes
from napari_unet.training.live_view import VIEW_HALO_SHARE, view_plan
from napari_unet.training.new_models import NewModelSpec
from napari_unet.training.trainer import new_model
from tests.conftest import tiny_model


def blobs(shape, n=8, radius=4, seed=0):
    """An image of bright discs (or balls) and their instance labels."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape)
    labels = np.zeros(shape, np.uint16)
    for i in range(1, n + 1):
        centre = [rng.integers(min(radius, s // 2), max(s - radius, s // 2 + 1)) for s in shape]
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
        labels[inside & (labels == 0)] = i
    image = (labels > 0) * 100.0 + rng.normal(10, 5, shape)
    return image.astype(np.float32), labels


def fast(**kwargs) -> LiveConfig:
    return LiveConfig(**{"device": "cpu", "precision": "fp32", "train_seconds_per_round": 0.05,
                         "augment": False, **kwargs})


def tuned(model):
    """``model`` made a fine-tuned one (version 1 with a history), as shipped models are."""
    model.history = [{"kind": "train"}]
    return model


def take(job, count: int, on_update=None) -> list[LiveUpdate]:
    updates = []
    for update in job:
        updates.append(update)
        if on_update is not None:
            on_update(update)
        if len(updates) >= count:
            break
    return updates


def finish(session: LiveSession, job):
    session.request_stop()
    try:
        next(job)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("run() went on after request_stop")


def test_snapshot_submitted_while_running_enters_training():
    image, labels = blobs((6, 32, 32))
    model = tuned(tiny_model(3, depth=2, task="foreground"))
    session = LiveSession(model, image, fast())
    job = session.run()
    first = next(job)  # the start model's prediction of the view, before any correction
    assert first.iteration == 0 and first.corrections_version == -1 and not first.trained_on_latest
    assert first.kept == "start" and first.prediction.shape == image[first.region].shape
    session.submit_corrections({2: labels[2].copy()}, version=1)
    update = next(job)
    assert update.corrections_version == 1 and update.trained_on_latest and update.iteration >= 1
    # a second snapshot while rounds run: the next update has trained on it
    session.submit_corrections({2: labels[2].copy(), 4: labels[4].copy()}, version=2)
    update = next(job)
    assert update.corrections_version == 2 and update.trained_on_latest
    assert session.data.trained_planes == [2, 4]
    with pytest.raises(ValueError):
        session.submit_corrections({2: labels[2, :10]}, version=3)  # wrong shape: refused at once
    with pytest.raises(ValueError):
        session.submit_corrections({2: labels[2]}, version=2)  # not newer
    result = finish(session, job)
    assert result.version == model.version + 1 and result.history[-1]["kind"] == "live"


def test_user_labels_are_not_touched():
    image, labels = blobs((32, 32))
    before_image, before_labels = image.copy(), labels.copy()
    session = LiveSession(tuned(tiny_model(2)), image, fast())
    job = session.run()
    next(job)
    session.submit_corrections({None: labels}, version=1)
    take(job, 2)
    finish(session, job)
    assert np.array_equal(image, before_image) and np.array_equal(labels, before_labels)


def test_set_view_retargets_the_next_prediction():
    image, labels = blobs((8, 32, 32))
    # a 2D model on a stack predicts the plane on screen
    session = LiveSession(tuned(tiny_model(2)), image, fast())
    job = session.run()
    session.set_view(LiveView(0, 1))
    assert next(job).region[0] == slice(1, 2)
    session.submit_corrections({1: labels[1]}, version=1)
    next(job)
    session.set_view(LiveView(0, 6))
    update = next(job)
    assert update.view == LiveView(0, 6) and update.region[0] == slice(6, 7)
    assert update.prediction.shape == (1, 32, 32) and update.probabilities.shape == (1, 32, 32)
    session.set_view(LiveView(1, 20))  # a y plane
    update = next(job)
    assert update.region[1] == slice(20, 21) and update.prediction.shape == (8, 1, 32)
    finish(session, job)


def test_view_plan_of_a_3d_model_reads_its_halo_on_the_pooling_grid():
    model = tiny_model(3, depth=3)
    halo, divisor = model.config.halo()[0], model.config.divisor()[0]
    plan = view_plan((100, 64, 64), 0, 50, model, halo=halo)
    kept = plan.region[0]
    assert kept.start <= 50 < kept.stop and kept.stop - kept.start >= 8
    assert plan.read[0].start % divisor == 0
    assert plan.read[0].start <= kept.start - halo and plan.read[0].stop >= min(100, kept.stop + halo)
    default = view_plan((100, 64, 64), 0, 50, model)  # the live default: part of the halo
    context = math.ceil(VIEW_HALO_SHARE * halo)
    assert default.region == plan.region and default.read[0].stop == kept.stop + context
    # the slab is the whole stack's prediction there (exact tiling)
    from napari_unet.engine.predict import predict_probabilities
    from napari_unet.model.normalization import fit_normalizer
    from napari_unet.progress import drain
    from napari_unet.training.live_view import predict_view

    image, _ = blobs((24, 24, 24), n=4)
    plan = view_plan(image.shape, 0, 12, model, depth=4, halo=halo)
    normalizer = fit_normalizer(image, model.normalization)
    whole = drain(predict_probabilities(image, model, device="cpu", precision="fp32", dtype=np.float32,
                                        normalizer=normalizer))
    view = predict_view(image, model, plan, normalizer, device=torch.device("cpu"), precision="fp32",
                        output="labels")
    assert view.probabilities.shape == image[plan.region].shape
    assert np.allclose(view.probabilities, whole[0][plan.region], atol=1e-5)


def test_stop_ends_run_and_returns_a_model_without_threads_left():
    threads = set(threading.enumerate())
    image, labels = blobs((32, 32))
    session = LiveSession(tuned(tiny_model(2)), image, fast())
    job = session.run()
    next(job)
    session.submit_corrections({None: labels}, version=1)
    take(job, 3)
    model = finish(session, job)
    assert model.history[-1]["complete"] and model.history[-1]["iterations"] >= 1
    assert torch.get_num_threads() >= 1
    assert set(threading.enumerate()) <= threads
    # stop from another thread while run() is driven elsewhere (the dock's worker)
    session = LiveSession(tuned(tiny_model(2)), image, fast())
    session.submit_corrections({None: labels}, version=1)
    result = {}

    def drive():
        from napari_unet.progress import drain

        result["model"] = drain(session.run())

    worker = threading.Thread(target=drive)
    worker.start()
    while session.iteration < 3 and worker.is_alive():
        worker.join(0.01)
    current = session.current_model()  # from this (the main) thread while it runs
    assert current.version == 2
    session.request_stop()
    worker.join(10)
    assert not worker.is_alive() and result["model"].history[-1]["kind"] == "live"


def test_held_out_planes_are_chosen_at_first_sight():
    order = {p: n for n, p in enumerate([3, 9, 15, 20, 25, 30, 35, 40])}
    assert held_out_planes(order, 5) == {25}
    assert held_out_planes(order, 3) == {15, 30}
    assert held_out_planes(order, 0) == set()


def test_guard_keeps_the_start_model_when_live_weights_are_worse():
    # a start model that is right, and corrections that teach it the opposite: the held-out
    # plane (the third) shows the live weights are worse, so the start model is kept
    image, labels = blobs((10, 48, 48), n=30, radius=4, seed=1)
    start = tuned(new_model(2, "foreground", base_channels=4, depth=2))
    from napari_unet.progress import drain
    from napari_unet.training.config import TrainingConfig, TrainingPair
    from napari_unet.training.trainer import Trainer

    start = drain(Trainer(start, [TrainingPair(image, labels)],
                          TrainingConfig(iterations=200, batch_size=4, device="cpu", precision="fp32",
                                         learning_rate=3e-3,
                                         validation_fraction=0, distillation=0)).run())
    wrong = np.where(labels > 0, 0, 1).astype(np.uint16)  # background painted as objects
    config = fast(min_heldout_objects=5, holdout_every=3, distillation=0.0, learning_rate=1e-2,
                  validation_interval=0.0)
    session = LiveSession(start, image, config)
    job = session.run()
    next(job)
    session.submit_corrections({1: wrong[1], 4: wrong[4]}, version=1)
    take(job, 6)  # the live weights learn the wrong labels; nothing is held out yet
    assert next(job).kept == "live" and session.data.held_out == []
    session.submit_corrections({1: wrong[1], 4: wrong[4], 7: labels[7]}, version=2)
    updates = take(job, 4)
    assert session.data.held_out == [7] and session.data.trained_planes == [1, 4]
    last = updates[-1]
    assert last.start_score is not None and last.held_out_score is not None
    assert last.held_out_score < last.start_score and last.kept == "start"
    result = finish(session, job)
    assert result.history[-1]["kept"] == "start"
    assert all(torch.equal(a, b) for a, b in zip(result.network.state_dict().values(),
                                                 start.network.state_dict().values()))


def test_empty_start_learns_a_separable_case_from_sparse_strokes():
    rng = np.random.default_rng(0)
    image = np.zeros((48, 48), np.float32)
    image[:, 24:] = 100.0
    image += rng.normal(0, 3, image.shape).astype(np.float32)
    painted = np.zeros(image.shape, np.uint16)
    painted[10:14, 30:44] = 1          # a stroke on the bright half: the object
    painted[30:34, 4:18] = 2           # a stroke on the dark half: the background label
    spec = NewModelSpec(spatial_dims=2, task="foreground", base_channels=4, depth=2)
    config = fast(sparse=True, background_label=2, learning_rate=3e-3, augment=True)
    session = LiveSession(None, image, config, new_model_spec=spec)
    assert not session.fine_tune
    job = session.run()
    next(job)
    session.submit_corrections({None: painted}, version=1)
    last = None
    for update in job:
        last = update
        if update.iteration >= 150:
            break
    truth = np.zeros(image.shape, bool)
    truth[:, 24:] = True
    predicted = last.prediction > 0
    assert (predicted == truth)[4:-4, 4:-4].mean() > 0.9  # learnt from two strokes only
    model = finish(session, job)
    assert model.version == 1 and model.parent is None
    with pytest.raises(ValueError):
        LiveSession(None, image, fast(sparse=True), new_model_spec=spec)  # no background label


def test_sparse_data_counts_only_painted_voxels():
    image, labels = blobs((32, 32))
    painted = np.zeros_like(labels)
    painted[labels == 1] = 1
    painted[:4, :4] = 9  # the background label
    model = new_model(2, "foreground_boundary", base_channels=4, depth=2)
    data = build_data(model, LiveImage(image, model), {None: painted}, 1, set(), sparse=True,
                      background_label=9)
    item = data.items[0]
    assert item.mask.sum() == (painted > 0).sum()
    assert item.target[0][painted == 9].sum() == 0 and item.target[0][painted == 1].all()


def test_instances_of_the_view_match_a_trained_plane():
    image, labels = blobs((48, 48), n=6, radius=5, seed=3)
    session = LiveSession(tuned(new_model(2, "foreground", base_channels=4, depth=2)), image,
                          fast(learning_rate=3e-3, output="instances", distillation=0.0))
    job = session.run()
    next(job)
    session.submit_corrections({None: labels}, version=1)
    last = None
    for update in job:
        last = update
        if update.iteration >= 150:
            break
    finish(session, job)
    match = match_instances(last.prediction, labels)
    assert match.true_positives >= 4
