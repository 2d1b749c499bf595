"""Tests for :mod:`napari_unet.training` on tiny synthetic data and tiny networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_unet.checkpoint import load_checkpoint, save_checkpoint
from napari_unet.progress import drain
from napari_unet.training import (Trainer, TrainingConfig, TrainingPair, TrainingStats, new_model,
                                  train, train_in_subprocess, training_targets)

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


def test_train_in_subprocess_keeps_the_generator_contract():
    image, labels = blobs((32, 32))
    parent = new_model(2, "foreground", **TINY)
    before = weights(parent)
    stats = []
    job = train_in_subprocess(parent, [TrainingPair(image, labels)],
                              fast(iterations=3, preview_image=image, preview_interval=0.0))
    result = drain(job, stats.append)
    assert [s.iteration for s in stats] == [1, 2, 3] and isinstance(stats[0], TrainingStats)
    assert stats[-1].preview.shape == (1, 32, 32)  # previews come across too
    assert result.version == 1 and result.history[-1]["iterations"] == 3
    assert result.history[-1]["complete"] is True
    assert all(torch.equal(v, parent.network.state_dict()[k]) for k, v in before.items())
    assert not all(torch.equal(v, result.network.state_dict()[k]) for k, v in before.items())


def test_train_in_subprocess_stop_and_errors():
    image, labels = blobs((32, 32))
    job = train_in_subprocess(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)],
                              fast(iterations=1000))
    n = 0
    for _stats in job:
        n += 1
        if n == 2:
            job.request_stop()  # Stop: the job ends normally with the best weights
    # the child may finish an iteration or two before the stop request reaches it
    assert 2 <= n <= 4 and job.result.history[-1]["iterations"] == n
    bad = train_in_subprocess(new_model(2, "foreground", **TINY),
                              [TrainingPair(image, labels[:10])], fast())
    with pytest.raises(ValueError, match="differs from labels shape"):
        drain(bad)


def test_validation_split_tracks_the_best_weights():
    image, labels = blobs((8, 32, 32), n=6)
    trainer = Trainer(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)],
                      fast(iterations=6, validation_fraction=0.25, validation_interval=0.0))
    stats = []
    result = drain(trainer.run(), stats.append)
    scores = [s.validation_dice for s in stats if s.validation_dice is not None]
    assert len(scores) == 6 and all(0 <= s <= 1 for s in scores)
    assert result.history[-1]["best_score"] == pytest.approx(max(scores), abs=1e-4)
    assert stats[-1].best_score == pytest.approx(max(scores))


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
    frozen = drain(train(parent, [TrainingPair(image, labels)], fast(recalibrate_norm=False)))
    assert same(parent, frozen)
    # default: statistics re-estimated on the new data once, then frozen during the iterations
    short, longer = (drain(train(parent, [TrainingPair(image * 3 + 50, labels)], fast(iterations=n)))
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
