"""Tests for :mod:`napari_unet.training` on tiny synthetic data and tiny networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_unet.model.checkpoint import load_checkpoint, save_checkpoint
from napari_unet.progress import drain
from napari_unet.training import trainer as trainer_module
from napari_unet.training.config import TrainingConfig, TrainingPair, TrainingStats
from napari_unet.training.targets import training_targets
from napari_unet.training.trainer import Trainer, new_model, train

TINY = dict(base_channels=4, depth=2)


def blobs(shape, n=6, radius=4, seed=0):
    """Image with bright discs/balls and their instance labels."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape)
    labels = np.zeros(shape, np.uint16)
    for i in range(1, n + 1):
        centre = [rng.integers(min(radius, s // 2), max(s - radius, s // 2 + 1)) for s in shape]
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
        labels[inside & (labels == 0)] = i
    image = (labels > 0) * 100.0 + rng.normal(10, 5, shape)
    return image.astype(np.float32), labels


def fast(**kwargs):
    return TrainingConfig(**{"iterations": 3, "batch_size": 2, "device": "cpu", **kwargs})


def weights(model):
    return {k: v.clone() for k, v in model.network.state_dict().items()}


# --- targets and models --------------------------------------------------------------------

def test_training_targets_per_task():
    labels = np.zeros((10, 12), np.uint16)
    labels[2:6, 2:6] = 1
    labels[2:6, 6:10] = 2  # touching object
    fg = training_targets(labels, "foreground")
    assert fg.shape == (1, 10, 12) and fg.dtype == np.uint8 and fg.sum() == 32
    fb = training_targets(labels, "foreground_boundary")
    assert fb.shape == (2, 10, 12)
    assert fb[1, 3, 5] == 1 and fb[1, 3, 6] == 1  # both sides of the contact
    assert fb[1, 3, 3] == 0 and not fb[1][labels == 0].any()
    membranes_from_instances = training_targets(labels, "membranes")
    assert membranes_from_instances[0, 3, 5] == 1 and membranes_from_instances[0, 3, 3] == 0
    binary = (labels > 0).astype(np.uint8)
    assert np.array_equal(training_targets(binary, "membranes")[0], binary)
    semantic = training_targets(labels, "semantic")
    assert semantic.shape == labels.shape and semantic.dtype == np.int64
    with pytest.raises(ValueError):
        training_targets(labels, "nonsense")


def test_new_model_channels_and_version():
    assert new_model(2, "foreground_boundary", **TINY).config.out_channels == 2
    model = new_model(3, "semantic", ["background", "nucleus", "cytoplasm"], inplane_only_levels=(0,), **TINY)
    assert model.config.out_channels == 3 and model.version == 0 and model.spatial_dims == 3
    with pytest.raises(ValueError):
        new_model(2, "nonsense")


# --- training ------------------------------------------------------------------------------

def test_train_returns_new_model_and_leaves_parent_alone():
    image, labels = blobs((40, 40))
    parent = new_model(2, "foreground", **TINY)
    before = weights(parent)
    stats: list[TrainingStats] = []
    result = drain(train(parent, [TrainingPair(image, labels)], fast()), stats.append)
    assert [s.iteration for s in stats] == [1, 2, 3]
    assert stats[-1].fraction == 1.0 and np.isfinite(stats[-1].loss)
    assert all(torch.equal(before[k], v) for k, v in parent.network.state_dict().items())
    assert result is not parent and result.version == 1 and result.parent is None
    entry = result.history[-1]
    assert entry["kind"] == "train" and entry["iterations"] == 3
    assert entry["data"]["pairs"] == 1 and entry["data"]["images"][0]["objects"] == 6
    assert any(not torch.equal(before[k], v) for k, v in result.network.state_dict().items())


def test_loss_goes_down():
    image, labels = blobs((48, 48), n=8)
    stats = []
    drain(train(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)],
                fast(iterations=30, batch_size=4, patch_shape=(32, 32), augment=False, learning_rate=1e-2)),
          stats.append)
    assert stats[-1].loss < 0.9 * stats[0].loss


def test_checkpoint_lineage(tmp_path):
    image, labels = blobs((32, 32))
    first = drain(train(new_model(2, "foreground_boundary", name="mine", **TINY),
                        [TrainingPair(image, labels)], fast()))
    path = save_checkpoint(first, tmp_path / "mine.pt")
    parent = load_checkpoint(path)
    second = drain(train(parent, [TrainingPair(image, labels)], fast(iterations=2)))
    assert second.version == 2 and second.parent == "mine v1" and second.name == "mine"
    assert [h["kind"] for h in second.history] == ["train", "fine-tune"]
    assert second.history[-1]["learning_rate"] < second.history[0]["learning_rate"]
    reloaded = load_checkpoint(save_checkpoint(second, tmp_path / "mine-v2.pt"))
    assert reloaded.history == second.history
    assert load_checkpoint(path).version == 1  # parent file untouched


def test_3d_model_trains_from_a_few_slices():
    image, labels = blobs((16, 32, 32), n=5, radius=5)
    model = new_model(3, "foreground_boundary", inplane_only_levels=(0,), **TINY)
    trainer = Trainer(model, [TrainingPair(image, labels, slices=[3, 9])], fast())
    masks = trainer._sample_batch(np.random.default_rng(0))[2]
    assert all(m.any() for m in masks)  # every patch holds annotated voxels
    result = drain(trainer.run())
    assert result.history[-1]["data"]["images"][0]["slices"] == [3, 9]
    assert result.history[-1]["data"]["annotated_voxels"] == 2 * 32 * 32


def test_unannotated_labels_do_not_change_training():
    image, labels = blobs((32, 32), n=4)
    mask = np.zeros(labels.shape, bool)
    mask[:, :16] = True
    other = labels.copy()
    other[~mask] = 9
    runs = [drain(train(new_model(2, "foreground", **TINY), [TrainingPair(image, lab, annotated=mask)],
                        fast(augment=False))) for lab in (labels, other)]
    a, b = (r.network.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_2d_model_on_a_stack_with_corrected_slices_and_semantic():
    image, labels = blobs((6, 32, 32), n=6)
    semantic = np.where(labels > 0, 1 + labels % 2, 0)
    model = new_model(2, "semantic", ["background", "a", "b"], **TINY)
    result = drain(train(model, [TrainingPair(image, semantic, slices=[1, 4])], fast()))
    assert result.class_names == ["background", "a", "b"]
    assert result.history[-1]["data"]["images"][0]["shape"] == [6, 32, 32]


def test_request_stop_returns_normally():
    image, labels = blobs((32, 32))
    trainer = Trainer(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)],
                      fast(iterations=1000))
    assert trainer.best_model() is None
    job = trainer.run()
    next(job)
    next(job)
    trainer.request_stop()
    result = drain(job)
    assert result.history[-1]["iterations"] == 2
    assert trainer.best_model().history[-1]["iterations"] == 2


def test_send_stop_and_close_keep_the_best_weights():
    image, labels = blobs((32, 32))
    job = train(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)], fast(iterations=1000))
    next(job)
    with pytest.raises(StopIteration) as stop:
        job.send("stop")
    assert stop.value.value.history[-1]["iterations"] == 1

    trainer = Trainer(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)],
                      fast(iterations=1000))
    job = trainer.run()
    for _ in range(3):
        next(job)
    job.close()
    best = trainer.best_model()
    assert best is not None and best.version == 1 and best.history[-1]["iterations"] == 3
    assert best.history[-1]["complete"] is False


def every_iteration(monkeypatch):
    """Validation after every iteration (``validation_interval=0`` and no time share cap)."""
    monkeypatch.setattr("napari_unet.training.trainer.EVALUATION_SHARE", 1e9)


def test_validation_split_tracks_the_best_weights(monkeypatch):
    every_iteration(monkeypatch)
    image, labels = blobs((8, 32, 32), n=6)
    trainer = Trainer(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)],
                      fast(iterations=6, validation_fraction=0.25, validation_interval=0.0))
    stats = []
    result = drain(trainer.run(), stats.append)
    scores = [s.validation_dice for s in stats if s.validation_dice is not None]
    assert len(scores) == 6 and all(0 <= s <= 1 for s in scores)
    recorded = [score for _, score in trainer.validation_scores]
    assert [i for i, _ in trainer.validation_scores] == list(range(1, 7)) and recorded == scores
    # the model before training is scored too, for comparison
    assert 0 <= trainer.start_score <= 1 and stats[0].start_score == trainer.start_score
    assert result.history[-1]["start_score"] == pytest.approx(trainer.start_score, abs=1e-4)
    assert result.history[-1]["best_score"] == pytest.approx(max(recorded), abs=1e-4)
    assert stats[-1].best_score == pytest.approx(max(recorded))


def test_single_image_validation_strip_and_preview():
    image, labels = blobs((32, 48), n=6)
    stats = []
    drain(train(new_model(2, "foreground_boundary", **TINY), [TrainingPair(image, labels)],
                fast(validation_fraction=0.3, preview_image=image[:20, :20], preview_interval=0.0)),
          stats.append)
    assert stats[-1].validation_dice is not None
    previews = [s.preview for s in stats if s.preview is not None]
    assert previews and previews[0].shape == (2, 20, 20)


def test_fine_tuning_freezes_batch_norm_statistics():
    image, labels = blobs((32, 32))
    parent = drain(train(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)], fast()))
    means = lambda m: [v for k, v in m.network.state_dict().items() if k.endswith("running_mean")]
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(means(a), means(b)))
    # default: frozen as they are, even on data of other intensities
    frozen = drain(train(parent, [TrainingPair(image * 3 + 50, labels)], fast()))
    assert same(parent, frozen)
    # on request: statistics re-estimated on the new data once, then frozen during the iterations
    short, longer = (drain(train(parent, [TrainingPair(image * 3 + 50, labels)],
                                 fast(iterations=n, recalibrate_norm=True)))
                     for n in (1, 3))
    assert not same(parent, short) and same(short, longer)
    unfrozen = drain(train(parent, [TrainingPair(image, labels)], fast(freeze_norm=False)))
    assert not same(parent, unfrozen)


def test_small_images_are_padded():
    image, labels = blobs((12, 20), n=2, radius=3)
    result = drain(train(new_model(2, "foreground", base_channels=4, depth=3), [TrainingPair(image, labels)],
                         fast(patch_shape=(16, 24))))
    assert result.version == 1


@pytest.mark.parametrize("pair,message", [
    (TrainingPair(np.zeros((8, 8)), np.zeros((8, 9), np.uint8)), "differs"),
    (TrainingPair(np.zeros((8, 8)), np.zeros((8, 8), np.uint8)), "empty"),
    (TrainingPair(np.zeros((8, 8)), np.full((8, 8), 0.5)), "integers"),
    (TrainingPair(np.zeros((8, 8)), np.ones((8, 8), np.uint8), annotated=np.zeros((8, 8))), "nothing"),
    (TrainingPair(np.zeros((8, 8)), np.ones((8, 8), np.uint8), slices=[1]), "stacks"),
    (TrainingPair(np.zeros((4, 8, 8)), np.ones((4, 8, 8), np.uint8), slices=[7]), "outside"),
])
def test_bad_input_raises_value_error(pair, message):
    with pytest.raises(ValueError, match=message):
        train(new_model(2, "foreground", **TINY), [pair], fast())


def test_bad_input_for_the_model():
    with pytest.raises(ValueError, match="3D"):
        Trainer(new_model(3, "foreground", **TINY), [TrainingPair(np.zeros((8, 8)), np.ones((8, 8), np.uint8))])
    with pytest.raises(ValueError, match="classes"):
        Trainer(new_model(2, "semantic", **TINY), [TrainingPair(np.zeros((8, 8)), np.full((8, 8), 3, np.uint8))])
    with pytest.raises(ValueError, match="no training data"):
        Trainer(new_model(2, "foreground", **TINY), [])


def test_default_budget_is_sixty_seconds():
    image, labels = blobs((16, 16), n=1)
    trainer = Trainer(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)])
    assert trainer.time_limit == 60.0 and trainer.learning_rate == pytest.approx(1e-3)
    stats = TrainingStats(iteration=5, total_iterations=None, loss=1.0, learning_rate=1e-3, elapsed=30.0,
                          samples_per_second=1.0, time_limit=60.0)
    assert stats.fraction == pytest.approx(0.5)


# --- targets from what was corrected (issue 9) ------------------------------------------------

def _paste(base, truth, slices):
    """``truth`` on ``slices`` pasted into ``base`` with fresh ids, as a user paints corrections."""
    out = base.astype(np.int64)
    for z in slices:
        ids, inverse = np.unique(truth[z], return_inverse=True)
        fresh = np.where(ids == 0, 0, np.arange(len(ids)) + out.max() + 1)
        out[z] = fresh[inverse].reshape(truth[z].shape)
    return out


def _a_prediction(truth):
    """Another segmentation of the same objects: shifted, with other ids."""
    from skimage.measure import label
    return label(np.roll(truth > 0, 2, axis=2)) * 3 + 1


def test_label_boundaries_ignore_unannotated_neighbours():
    from skimage.segmentation import find_boundaries

    from napari_unet.training.targets import label_boundaries

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, (6, 7, 8))
    assert np.array_equal(label_boundaries(labels), find_boundaries(labels, connectivity=1, mode="thick"))
    annotated = np.zeros(labels.shape, bool)
    annotated[2] = True
    other = labels.copy()
    other[~annotated] = rng.integers(5, 9, other[~annotated].shape)
    a, b = (label_boundaries(x, annotated) for x in (labels, other))
    assert np.array_equal(a, b) and not a[~annotated].any()
    assert np.array_equal(a[2], label_boundaries(labels[2]))  # lone slice: its own 2D boundaries
    assert np.array_equal(label_boundaries(labels, axes=(1, 2))[3], label_boundaries(labels[3]))


@pytest.mark.parametrize("dims,task", [(2, "foreground_boundary"), (2, "membranes"),
                                       (3, "foreground_boundary"), (3, "membranes")])
def test_corrected_slices_give_the_same_targets_in_truth_and_in_a_prediction(dims, task):
    image, truth = blobs((12, 32, 32), n=8, radius=5)
    slices = [3, 6, 7]
    pasted = _paste(_a_prediction(truth), truth, slices)
    channel = -1  # the boundary / membrane output
    # the whole-stack targets (the old behaviour) do differ on the corrected slices
    assert not np.array_equal(training_targets(truth, task)[channel][slices],
                              training_targets(pasted, task)[channel][slices])
    model = new_model(dims, task, **TINY)
    a, b = (Trainer(model, [TrainingPair(image, lab, slices=slices)], fast()) for lab in (truth, pasted))
    for items_a, items_b in ((a._items, b._items), (a._val_items, b._val_items)):
        assert len(items_a) == len(items_b)
        for x, y in zip(items_a, items_b):
            assert np.array_equal(x.target, y.target)
            for m, n in ((x.mask, y.mask), (x.valid, y.valid)):
                assert (m is None and n is None) or np.array_equal(m, n)
    # a slice without annotated neighbours has its own 2D targets, for a 2D and a 3D model
    alone = training_targets(truth[3], task)
    item = next(it for it in a._items + a._val_items if dims == 3 or it.source == (0, 3))
    assert np.array_equal(item.target[:, 3] if dims == 3 else item.target, alone)


def test_2d_model_on_a_stack_gets_per_slice_targets():
    image, truth = blobs((6, 32, 32), n=8, radius=5)
    trainer = Trainer(new_model(2, "foreground_boundary", **TINY), [TrainingPair(image, truth)],
                      fast(validation_fraction=0))
    assert [it.source for it in trainer._items] == [(0, z) for z in range(6)]
    for z, item in enumerate(trainer._items):
        assert np.array_equal(item.target, training_targets(truth[z], "foreground_boundary"))
    # a 3D model on the fully annotated stack keeps 3D targets
    trainer3 = Trainer(new_model(3, "foreground_boundary", **TINY), [TrainingPair(image, truth)],
                       fast(validation_fraction=0))
    assert np.array_equal(trainer3._items[0].target, training_targets(truth, "foreground_boundary"))


# --- validation split and best weights (issue 9) ----------------------------------------------

def test_auto_validation_holds_out_runs_of_slices_with_their_neighbours():
    image, labels = blobs((16, 32, 32), n=8, radius=5)
    model = new_model(3, "foreground_boundary", inplane_only_levels=(0,), **TINY)
    chosen = set()
    for seed in range(5):
        trainer = Trainer(model, [TrainingPair(image, labels, slices=[2, 3, 8, 12])], fast(seed=seed))
        assert trainer.keeps_best and "keeping the best-scoring weights" in trainer.validation_message
        (item,) = trainer._items
        assert trainer._val_items == [item]
        held = set(np.flatnonzero(item.valid.any(axis=(1, 2))).tolist())
        trained = set(np.flatnonzero(item.mask.any(axis=(1, 2))).tolist())
        assert held in ({2, 3}, {8}, {12}) and trained == {2, 3, 8, 12} - held
        assert all(abs(h - t) > 1 for h in held for t in trained)  # neighbours never trained on
        chosen.add(min(held))
    assert len(chosen) > 1  # the seed picks the part
    # a fully annotated stack: its last slices, one slice between them and the training slices
    trainer = Trainer(model, [TrainingPair(image, labels)], fast())
    (item,) = trainer._items
    assert np.flatnonzero(item.valid.any(axis=(1, 2))).tolist() == [13, 14, 15]
    assert np.flatnonzero(item.mask.any(axis=(1, 2))).tolist() == list(range(12))
    assert "slices 13-15 of image 1 (slice 12 of image 1 not trained on)" in trainer.validation_message


@pytest.mark.parametrize("pairs_of,slices,config", [
    ("stack", [5], {}), ("stack", [4, 5], {}), ("stack", [2, 9], {"validation_fraction": 0}),
    ("image", None, {}),
])
def test_without_a_part_to_hold_out_the_last_weights_are_kept(pairs_of, slices, config):
    image, labels = blobs((12, 32, 32) if pairs_of == "stack" else (32, 32), n=6, radius=5)
    trainer = Trainer(new_model(2, "foreground", **TINY), [TrainingPair(image, labels, slices=slices)],
                      fast(**config))
    assert not trainer.keeps_best and not trainer._val_items
    assert "keeping the last weights" in trainer.validation_message
    stats = []
    result = drain(trainer.run(), stats.append)
    assert trainer.validation_message in stats[0].message and not stats[0].keeps_best
    assert result.history[-1]["kept"] == "last" and result.history[-1]["best_score"] is None
    last = trainer.network.state_dict()
    assert all(torch.equal(v, last[k]) for k, v in result.network.state_dict().items())


def test_two_images_keep_the_weights_that_score_best_on_the_held_out_one(monkeypatch):
    every_iteration(monkeypatch)
    pairs = [TrainingPair(*blobs((40, 40), n=6, seed=s)) for s in range(3)]
    # a high learning rate: the validation score rises, then falls again
    trainer = Trainer(new_model(2, "foreground", **TINY), pairs,
                      fast(iterations=20, batch_size=4, learning_rate=5e-2, validation_interval=0.0,
                           augment=False))
    assert trainer.keeps_best and trainer.validation_message.startswith("held out for validation: image ")
    stats = []
    result = drain(trainer.run(), stats.append)
    assert stats[0].keeps_best and trainer.validation_message in stats[0].message
    scores = dict(trainer.validation_scores)
    assert sorted(scores) == list(range(1, 21))
    best = max(scores.values())
    last_score = trainer._validate(trainer.network)
    assert last_score == pytest.approx(scores[20]) and last_score < best - 0.01  # the setup is a real test
    # the returned weights, scored again on the held-out image, are the best ones
    assert trainer._validate(result.network) == pytest.approx(best)
    assert scores[trainer.best_iteration] == best and result.history[-1]["best_iteration"] == trainer.best_iteration
    assert result.history[-1]["kept"] == "best" and result.history[-1]["best_score"] == pytest.approx(best, abs=1e-4)
    # instance labels: the score also counts objects (F1 on the held-out image)
    f1s = [st.validation_f1 for st in stats if st.validation_dice is not None]
    assert f1s and all(f is not None and 0 <= f <= 1 for f in f1s)


def test_validation_scores_objects_slice_by_slice():
    from napari_unet.engine.predict import (
        predict_probabilities,
        probabilities_to_output,
    )
    from napari_unet.labels.metrics import match_instances
    from napari_unet.model.normalization import Normalizer
    from napari_unet.progress import drain as run

    image, labels = blobs((12, 32, 32), n=8, radius=5)
    model = new_model(3, "foreground_boundary", **TINY)
    trainer = Trainer(model, [TrainingPair(image, labels, slices=[2, 8])], fast(seed=1))
    (item,) = trainer._val_items
    (z,) = np.flatnonzero(item.valid.any(axis=(1, 2)))
    trainer._validate(model.network)
    probs = run(predict_probabilities(item.image, model, device="cpu", normalizer=Normalizer(0.0, 1.0),
                                      dtype=np.float32))
    lo = max(0, z - 3)
    expected = match_instances(probabilities_to_output(probs[:, lo:z + 4], model.task, "instances")[z - lo],
                               labels[z]).f1
    assert trainer._last_f1 == pytest.approx(expected)
    # binary labels: no objects to score
    binary = Trainer(new_model(2, "foreground", **TINY), [TrainingPair(image, (labels > 0).astype(np.uint8),
                                                                      slices=[2, 8])], fast())
    assert binary.keeps_best and binary._val_items[0].labels is None
    binary._validate(binary.parent.network)
    assert binary._last_f1 is None


@pytest.mark.parametrize("task", ["foreground_boundary", "membranes"])
def test_a_corrected_region_gives_the_same_targets_in_truth_and_in_a_prediction(task):
    image, truth = blobs((12, 32, 32), n=8, radius=5)
    region = np.zeros(truth.shape, bool)
    region[2:9, 4:20] = True
    ids, inverse = np.unique(truth[region], return_inverse=True)
    pasted = _a_prediction(truth)
    pasted[region] = np.where(ids == 0, 0, ids + 1000)[inverse]  # the region, with fresh ids
    a, b = (Trainer(new_model(3, task, **TINY), [TrainingPair(image, lab, annotated=region)], fast())
            for lab in (truth, pasted))
    (x,), (y,) = a._items, b._items
    assert np.array_equal(x.target, y.target) and np.array_equal(x.mask, y.mask)
    assert x.target[-1][region].any() and not x.target[:, ~region].any()


# --- precision, memory layout, patch pipeline (issue 8) ------------------------------------

def test_training_precision_follows_the_policy(monkeypatch):
    from napari_unet.model import precision
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    image, labels = blobs((32, 32))
    pair = [TrainingPair(image, labels)]
    model = new_model(2, "foreground", **TINY)
    auto = Trainer(model, pair, fast())
    assert auto.policy.name == "bf16" and auto.policy.requested == "auto"
    assert Trainer(model, pair, fast(precision="fp32")).policy.name == "fp32"
    assert Trainer(model, pair, fast(precision="bf16", amp=False)).policy.name == "fp32"  # amp=False: exact
    with pytest.raises(ValueError, match="unknown precision"):
        Trainer(model, pair, fast(precision="fp8"))
    stats = []
    drain(auto.run(), stats.append)
    assert "training in bf16 (auto: native bf16 CPU), channels-last" in stats[0].message
    assert not any(s.message for s in stats[1:])


def test_bf16_training_keeps_weights_and_batch_norm_statistics_in_fp32():
    image, labels = blobs((40, 40))
    parent = new_model(2, "foreground", **TINY)
    trainer = Trainer(parent, [TrainingPair(image, labels)],
                      fast(precision="bf16", freeze_norm=False, iterations=2))
    result = drain(trainer.run())
    assert trainer.policy.dtype == torch.bfloat16
    for tensors in (trainer.network.state_dict(), result.network.state_dict()):
        floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
        assert floats and all(v.dtype == torch.float32 for v in floats.values())
    before = parent.network.state_dict()
    means = [k for k in before if k.endswith("running_mean")]
    assert means and any(not torch.equal(before[k], result.network.state_dict()[k]) for k in means)
    assert all(torch.isfinite(v).all() for v in result.network.state_dict().values() if v.is_floating_point())


def test_channels_last_training_equals_contiguous_in_fp32(monkeypatch):
    import dataclasses

    from napari_unet.model import precision as training_precision
    image, labels = blobs((8, 32, 32), n=5)
    runs = {}
    real = training_precision.resolve_precision
    for channels_last in (True, False):
        monkeypatch.setattr(trainer_module, "resolve_precision", lambda *a, cl=channels_last, **k:
                            dataclasses.replace(real(*a, **k), channels_last=cl))
        trainer = Trainer(new_model(3, "foreground", **TINY), [TrainingPair(image, labels)],
                          fast(precision="fp32", iterations=3))
        stats = []
        result = drain(trainer.run(), stats.append)
        assert trainer.policy.exact and trainer.policy.channels_last == channels_last
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        conv = next(m for m in trainer.network.modules() if isinstance(m, torch.nn.Conv3d))
        assert conv.weight.is_contiguous(memory_format=fmt)
        runs[channels_last] = ([s.loss for s in stats], result.network.state_dict())
        assert ("channels-last" in stats[0].message) == channels_last
    (loss_cl, state_cl), (loss_c, state_c) = runs[True], runs[False]
    assert loss_cl == pytest.approx(loss_c, rel=1e-4, abs=1e-5)
    for key, value in state_c.items():
        assert torch.allclose(state_cl[key].float(), value.float(), rtol=1e-3, atol=1e-4), key


class _FakeScaler:
    """Stands in for ``torch.amp.GradScaler`` (no GPU here): records how it is used."""

    made: list["_FakeScaler"] = []

    def __init__(self, device: str):
        self.device, self.calls = device, []
        _FakeScaler.made.append(self)

    def scale(self, loss):
        self.calls.append("scale")
        return loss * 1.0

    def step(self, optimizer):
        self.calls.append("step")
        optimizer.step()

    def update(self):
        self.calls.append("update")


def test_fp16_on_cuda_trains_with_a_grad_scaler(monkeypatch):
    from napari_unet.model.precision import PrecisionPolicy
    monkeypatch.setattr(trainer_module, "resolve_precision", lambda requested, device: PrecisionPolicy(
        "fp16", "cuda", requested, "GPU without bf16"))
    monkeypatch.setattr(torch.amp, "GradScaler", _FakeScaler)
    _FakeScaler.made.clear()
    image, labels = blobs((32, 32))
    trainer = Trainer(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)], fast())
    assert trainer.policy.needs_grad_scaler
    with pytest.warns(UserWarning, match="CUDA is not available"):  # autocast("cuda") on a CPU-only machine
        stats = []
        drain(trainer.run(), stats.append)
    (scaler,) = _FakeScaler.made
    assert scaler.device == "cuda" and scaler.calls == ["scale", "step", "update"] * 3
    assert "training in fp16 (auto: GPU without bf16)" in stats[0].message
    # bf16 and fp32 need no scaler
    _FakeScaler.made.clear()
    monkeypatch.setattr(trainer_module, "resolve_precision", lambda requested, device: PrecisionPolicy(
        "bf16", "cpu", requested))
    drain(Trainer(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)], fast()).run())
    assert not _FakeScaler.made


def test_patches_are_read_without_full_size_allocations():
    import tracemalloc

    from napari_unet.training.augment import AugmentSettings
    image, labels = blobs((1024, 1024), n=40, radius=10)
    annotated = np.zeros(image.shape, bool)
    annotated[:, 300:] = True
    trainer = Trainer(new_model(2, "foreground", **TINY), [TrainingPair(image, labels, annotated)],
                      fast(patch_shape=(64, 64), batch_size=4,
                           augment_settings=AugmentSettings(elastic_probability=1.0)))
    rng = np.random.default_rng(0)
    batch = trainer._sample_batch(rng)  # warm-up (caches)
    batch_bytes = sum(a.nbytes for a in batch)
    tracemalloc.start()
    try:
        for _ in range(10):
            trainer._sample_batch(rng)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # a patch with its elastic margin and sampling coordinates: a few batches' worth; a bool
    # array of the image's size alone would be 1 MiB
    assert peak < 8 * batch_bytes < image.size


def test_validation_on_a_cut_out_window_scores_like_the_whole_stack():
    image, labels = blobs((40, 24, 24), n=12, radius=4)
    trainer = Trainer(new_model(3, "foreground_boundary", **TINY),
                      [TrainingPair(image, labels, slices=[4, 20, 36])], fast())
    (item,), (view,) = trainer._val_items, trainer._validation_views()
    assert view.image.shape[0] < item.image.shape[0] and view.valid.sum() == item.valid.sum()
    network = trainer.parent.network
    windowed = trainer._validate(network), trainer._last_f1
    trainer._val_views = list(trainer._val_items)  # score the whole stack instead
    assert (trainer._validate(network), trainer._last_f1) == pytest.approx(windowed, abs=1e-6)


def test_validation_and_preview_are_throttled_by_their_cost(monkeypatch):
    pass

    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

    clock = Clock()
    monkeypatch.setattr(trainer_module, "time", clock)
    image, labels = blobs((8, 32, 32), n=6)
    trainer = Trainer(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)],
                      fast(iterations=40, validation_fraction=0.25, validation_interval=0.0,
                           preview_image=image[0], preview_interval=0.0))
    assert trainer._val_items
    calls = {"validation": 0, "preview": 0}

    def costs(name, seconds, value):
        def run(network):
            calls[name] += 1
            clock.now += seconds
            return value
        return run

    step = trainer._set_train_mode
    monkeypatch.setattr(trainer, "_set_train_mode", lambda n: (step(n), setattr(clock, "now", clock.now + 1.0)))
    monkeypatch.setattr(trainer, "_validate", costs("validation", 1.0, 0.5))
    monkeypatch.setattr(trainer, "_preview", costs("preview", 0.5, None))
    drain(trainer.run())
    # each gets half of EVALUATION_SHARE (10%) of the ~45 s: 1 s validations, the one of the
    # starting weights included, and 0.5 s previews, besides the two at the end
    assert calls["validation"] == 3 and 3 <= calls["preview"] <= 5  # unthrottled: 41 each
    timings = trainer.timings
    assert timings["validation"] == calls["validation"] and timings["preview"] == 0.5 * calls["preview"]
    assert (timings["validation"] - 1.0 + timings["preview"] - 0.5) / timings["total"] <= 0.1


@pytest.mark.parametrize("held_out", [True, False])
def test_diverged_weights_are_never_kept(monkeypatch, held_out):
    from napari_unet.training import losses as training_losses
    from napari_unet.training import trainer as training_trainer

    every_iteration(monkeypatch)
    real, calls = training_losses.masked_loss, []

    def diverging(*args, **kwargs):  # the weights blow up from the third step on
        calls.append(1)
        if len(calls) >= 3:
            with torch.no_grad():
                trainer.network.head.weight.fill_(float("inf"))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "masked_loss", diverging)
    pairs = [TrainingPair(*blobs((32, 32), n=5, seed=s)) for s in range(3 if held_out else 1)]
    parent = new_model(2, "foreground", **TINY)
    trainer = Trainer(parent, pairs, fast(iterations=5, validation_interval=0.0))
    assert trainer.keeps_best == held_out
    result = drain(trainer.run())
    assert not training_trainer._finite_state(trainer.network)  # the run did diverge
    assert training_trainer._finite_state(result.network)
    if held_out:
        assert trainer.best_iteration in (1, 2)
    else:
        assert "diverged" in result.history[-1]["validation"]
        assert all(torch.equal(v, parent.network.state_dict()[k]) for k, v in result.network.state_dict().items())


def test_steps_with_non_finite_gradients_are_skipped(monkeypatch):
    """A rare non-finite gradient (seen with bf16 on a CPU) must not poison the weights."""
    from napari_unet.training import losses as training_losses
    from napari_unet.training import trainer as training_trainer

    real, calls = training_losses.masked_loss, []

    def sometimes_nan(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) in (2, 4) else loss

    monkeypatch.setattr(trainer_module, "masked_loss", sometimes_nan)
    parent = new_model(2, "foreground", **TINY)
    trainer = Trainer(parent, [TrainingPair(*blobs((32, 32), n=5, seed=0))],
                      fast(iterations=6, validation_fraction=0.0))
    result = drain(trainer.run())
    assert trainer.skipped_steps == 2
    assert training_trainer._finite_state(trainer.network) and training_trainer._finite_state(result.network)
    assert any(not torch.equal(v, parent.network.state_dict()[k])
               for k, v in result.network.state_dict().items())  # the other steps did train


# --- losses, weight maps, accumulation, checkpointing, deep supervision ----------------------

def _touching(shape=(48, 48)):
    """Two squares 2 px apart and a lone one, with their image."""
    labels = np.zeros(shape, np.uint16)
    labels[4:20, 4:20] = 1
    labels[4:20, 22:38] = 2
    labels[28:40, 8:20] = 3
    image = (labels > 0) * 100.0 + np.random.default_rng(0).normal(10, 5, shape)
    return image.astype(np.float32), labels


@pytest.mark.parametrize("loss", ["bce_dice", "focal_dice", "tversky", "boundary_bce"])
@pytest.mark.parametrize("task", ["foreground_boundary", "semantic"])
def test_every_loss_trains_and_is_recorded(loss, task):
    image, labels = _touching()
    if task == "semantic":
        labels = np.where(labels == 3, 2, labels > 0).astype(np.uint8)
        model = new_model(2, "semantic", ["background", "a", "b"], **TINY)
    else:
        model = new_model(2, task, **TINY)
    stats = []
    result = drain(train(model, [TrainingPair(image, labels)], fast(loss=loss, validation_fraction=0.0)),
                   stats.append)
    assert all(np.isfinite(s.loss) for s in stats)
    entry = result.history[-1]
    assert entry["loss"] == loss and entry["accumulate_steps"] == 1 and entry["gradient_checkpointing"] is False


def test_boundary_weight_maps_move_with_the_targets():
    from napari_unet.training.augment import AugmentSettings
    image, labels = _touching()
    trainer = Trainer(new_model(2, "foreground_boundary", **TINY), [TrainingPair(image, labels)],
                      fast(loss="boundary_bce", patch_shape=(32, 32), batch_size=8, validation_fraction=0.0,
                           augment_settings=AugmentSettings(elastic_probability=0.5)))
    (item,) = trainer._items
    interior = (item.target[0] == 1) & (item.target[1] == 0)
    (w_obj,) = np.unique(item.weight_map[interior])
    far = item.weight_map[46, 46]
    between = item.weight_map[6:18, 19:23]  # the boundaries of the touching squares and their gap
    assert between.min() > far + 4 and item.weight_map[6:18, 3].max() < far + 1
    assert trainer._sample_batch(np.random.default_rng(0))[0].shape == (8, 1, 32, 32)
    rng = np.random.default_rng(1)
    for _ in range(3):
        images, targets, masks, maps, teachers = trainer._sample_patches(rng)
        assert teachers is None  # nothing distilled: trained from scratch
        assert maps.shape == masks.shape and maps.dtype == np.float32
        inside = (targets[:, 0] == 1) & (targets[:, 1] == 0)
        assert np.all(maps[inside] == w_obj) and np.all(maps[~inside] != w_obj)
    # the other losses carry no map
    plain = Trainer(new_model(2, "foreground_boundary", **TINY), [TrainingPair(image, labels)], fast())
    assert plain._items[0].weight_map is None and plain._sample_patches(rng)[3] is None


def test_boundary_weight_maps_of_corrected_slices_and_membranes():
    from napari_unet.training.targets import weight_map_objects
    image, labels = blobs((10, 32, 32), n=6, radius=5)
    trainer = Trainer(new_model(3, "foreground", inplane_only_levels=(0,), **TINY),
                      [TrainingPair(image, labels, slices=[2, 6])],
                      fast(loss="boundary_bce", validation_fraction=0.0))
    drain(trainer.run())
    (item,) = trainer._items
    assert item.weight_map.shape == item.image.shape and np.all(item.weight_map[[0, 1, 3]] == 1)
    # membranes: binary membrane labels (1 = membrane) give the cells between them as objects
    membranes = np.zeros((20, 20), np.uint8)
    membranes[:, 9:11] = 1
    objects = weight_map_objects(membranes, membranes[None], "membranes")
    assert set(np.unique(objects)) == {0, 1, 2} and not objects[membranes == 1].any()


def test_accumulated_steps_give_the_gradient_of_one_large_batch(monkeypatch):
    import copy

    import torch.nn.functional as F


    # a per-voxel mean (no batch-wide Dice), so the mean over two halves is the whole batch's loss
    monkeypatch.setattr(trainer_module, "masked_loss",
                        lambda logits, t, m, task, **kw: F.binary_cross_entropy_with_logits(logits, t.float()))
    image, labels = blobs((48, 48), n=8)
    model = new_model(2, "foreground", **TINY)
    trainer = Trainer(model, [TrainingPair(image, labels)],
                      fast(batch_size=2, precision="fp32", freeze_norm=True, patch_shape=(32, 32)))
    rng = np.random.default_rng(0)
    halves = [trainer._sample_patches(rng), trainer._sample_patches(rng)]
    whole = tuple(np.concatenate([a, b]) for a, b in zip(*[h[:3] for h in halves])) + (None, None)
    grads, losses = {}, {}
    for name, batches in {"accumulated": halves, "whole": [whole]}.items():
        network = copy.deepcopy(model.network)
        trainer._set_train_mode(network)  # batch norm frozen: no batch statistics
        assert network.training and not network.encoders[0][1].training
        optimizer = torch.optim.SGD(network.parameters(), lr=1e-12)
        losses[name] = trainer._optimizer_step(network, optimizer, None, [trainer._device_batch(b) for b in batches])
        grads[name] = [p.grad.clone() for p in network.parameters()]
    assert losses["accumulated"] == pytest.approx(losses["whole"], rel=1e-5)
    for a, b in zip(grads["accumulated"], grads["whole"]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_accumulation_counts_optimizer_steps_and_still_skips_bad_ones(monkeypatch):
    from napari_unet.training import losses as training_losses
    from napari_unet.training import trainer as training_trainer
    real, calls = training_losses.masked_loss, []

    def third_is_nan(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(trainer_module, "masked_loss", third_is_nan)
    parent = new_model(2, "foreground", **TINY)
    trainer = Trainer(parent, [TrainingPair(*blobs((32, 32), n=5))],
                      fast(iterations=3, accumulate_steps=2, validation_fraction=0.0))
    stats = []
    result = drain(trainer.run(), stats.append)
    assert len(calls) == 6 and [s.iteration for s in stats] == [1, 2, 3]
    assert trainer.skipped_steps == 1  # the second step, whose second micro-batch was not finite
    assert training_trainer._finite_state(result.network)
    assert result.history[-1]["accumulate_steps"] == 2 and result.history[-1]["iterations"] == 3
    assert trainer.effective_batch_size == 4


def test_accumulation_steps_a_grad_scaler_once_per_step(monkeypatch):
    from napari_unet.model.precision import PrecisionPolicy
    monkeypatch.setattr(trainer_module, "resolve_precision", lambda requested, device: PrecisionPolicy(
        "fp16", "cuda", requested, "GPU without bf16"))
    monkeypatch.setattr(torch.amp, "GradScaler", _FakeScaler)
    _FakeScaler.made.clear()
    trainer = Trainer(new_model(2, "foreground", **TINY), [TrainingPair(*blobs((32, 32)))],
                      fast(accumulate_steps=2))
    with pytest.warns(UserWarning, match="CUDA is not available"):
        drain(trainer.run())
    (scaler,) = _FakeScaler.made
    assert scaler.calls == ["scale", "scale", "step", "update"] * 3


def test_gradient_checkpointing_gives_the_same_training():
    image, labels = blobs((48, 48), n=8)
    runs = {}
    for checkpointing in (False, True):
        trainer = Trainer(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)],
                          fast(precision="fp32", gradient_checkpointing=checkpointing, validation_fraction=0.0))
        stats = []
        result = drain(trainer.run(), stats.append)
        assert trainer.network.gradient_checkpointing == checkpointing
        assert result.history[-1]["gradient_checkpointing"] == checkpointing
        runs[checkpointing] = [s.loss for s in stats], result.network.state_dict()
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for key, value in runs[False][1].items():
        assert torch.allclose(runs[True][1][key].float(), value.float(), rtol=1e-4, atol=1e-6), key


def test_deep_supervision_averages_the_loss_over_the_heads():
    from napari_unet.model.checkpoint import SegmentationModel
    from napari_unet.model.config import UNetConfig
    from napari_unet.model.unet import UNet
    from napari_unet.training.losses import masked_loss
    image, labels = blobs((32, 32), n=4)
    config = UNetConfig(spatial_dims=2, out_channels=1, base_channels=4, depth=3, architecture="unetpp",
                        deep_supervision=True)
    torch.manual_seed(0)
    model = SegmentationModel(network=UNet(config), task="foreground", version=0)
    trainer = Trainer(model, [TrainingPair(image, labels)], fast(precision="fp32", validation_fraction=0.0))
    network = model.network.train()
    x, t, m, w, _ = trainer._device_batch(trainer._sample_patches(np.random.default_rng(0)))
    with torch.no_grad():
        heads = network.forward_heads(x)
        assert len(heads) == 2
        expected = sum(masked_loss(h, t, m, "foreground") for h in heads) / 2
        assert trainer._batch_loss(network, x, t, m, w, None, None) == pytest.approx(float(expected), rel=1e-6)
        assert float(expected) != pytest.approx(float(masked_loss(network(x), t, m, "foreground")), rel=1e-3)
    result = drain(trainer.run())
    assert result.network.config.deep_supervision and result.history[-1]["iterations"] == 3


def test_training_options_are_checked():
    image, labels = blobs((32, 32))
    for bad in (dict(loss="dice"), dict(accumulate_steps=0), dict(accumulate_steps=1.5)):
        with pytest.raises(ValueError):
            Trainer(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)], fast(**bad))


def test_cli_trains_with_focal_loss_and_accumulation(tmp_path, capsys):
    import tifffile

    from napari_unet.cli.main import main
    from napari_unet.training.losses import LOSSES
    image, labels = blobs((32, 32))
    tifffile.imwrite(tmp_path / "image.tif", image)
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    out = tmp_path / "model.pt"
    code = main(["train", "--image", str(tmp_path / "image.tif"), "--labels", str(tmp_path / "labels.tif"),
                 "--dims", "2", "--task", "foreground", "--base-channels", "4", "--depth", "2",
                 "--iterations", "3", "--batch-size", "2", "--device", "cpu", "--loss", "focal_dice",
                 "--accumulate", "2", "--gradient-checkpointing", "-o", str(out)])
    assert code == 0 and "wrote" in capsys.readouterr().out
    entry = load_checkpoint(out).history[-1]
    assert entry["loss"] == "focal_dice" and entry["accumulate_steps"] == 2 and entry["iterations"] == 3
    assert entry["gradient_checkpointing"] is True
    # the CLI offers exactly the losses there are
    assert main(["train", "--loss", "nonsense"]) == 2
    assert f"(choose from {', '.join(map(repr, LOSSES))})" in capsys.readouterr().err
