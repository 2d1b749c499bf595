"""Tests for the never-worse rules of fine-tuning (:mod:`napari_unet.training.guard`) and the
trainer's use of them: distillation, the start model as a candidate, post-processing kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_unet.model.normalization import fit_normalizer
from napari_unet.progress import drain
from napari_unet.training.config import TrainingConfig, TrainingPair
from napari_unet.training.guard import choose_weights, held_out_objects, keep_margin, tuning_allowed
from napari_unet.training.losses import distillation_loss
from napari_unet.training.sampling import _Item
from napari_unet.training.trainer import Trainer, new_model, train
from tests.training.test_trainer import TINY, blobs


def test_distillation_loss_counts_only_unannotated_voxels():
    teacher = torch.randn(2, 1, 8, 8)
    annotated = torch.zeros(2, 8, 8, dtype=torch.bool)
    annotated[:, :4] = True
    student = teacher.clone().requires_grad_()
    loss = distillation_loss(student, teacher, annotated, "foreground")
    loss.backward()
    # at the teacher's own logits the soft cross-entropy is at its minimum: zero gradient
    assert torch.allclose(student.grad, torch.zeros_like(student.grad), atol=1e-7)
    moved = teacher.clone()
    moved[:, :, :4] += 5  # changes on annotated voxels cost nothing
    assert torch.isclose(distillation_loss(moved, teacher, annotated, "foreground"), loss.detach())
    moved[:, :, 6] += 5  # changes elsewhere do
    assert distillation_loss(moved, teacher, annotated, "foreground") > loss + 0.01
    everything = torch.ones_like(annotated)
    assert float(distillation_loss(student.detach(), teacher, everything, "foreground")) == 0.0
    semantic = distillation_loss(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), annotated, "semantic")
    assert semantic.ndim == 0 and float(semantic) > 0


def _output(model, image):
    normalized = fit_normalizer(image, model.normalization)(image).astype(np.float32)
    with torch.no_grad():
        return torch.sigmoid(model.network(torch.from_numpy(normalized[None, None]))).numpy()[0, 0]


def test_distillation_keeps_the_start_models_output_on_unannotated_voxels():
    image, labels = blobs((48, 48), n=8, radius=5)
    parent = drain(train(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)],
                         TrainingConfig(iterations=40, batch_size=4, device="cpu", learning_rate=3e-3)))
    parent.network.eval()
    # corrections that contradict the model: the top rows say "no object", and only they count
    annotated = np.zeros(image.shape, bool)
    annotated[:12] = True
    wrong = np.where(annotated, 0, labels).astype(np.uint16)
    wrong[2:6, 2:6] = 1  # one object so the labels are not empty
    before = _output(parent, image)
    drift, learned = {}, {}
    for weight in (0.0, 1.0):
        config = TrainingConfig(iterations=60, batch_size=4, device="cpu", learning_rate=3e-3,
                                distillation=weight, validation_fraction=0, augment=False)
        tuned = drain(train(parent, [TrainingPair(image, wrong, annotated=annotated)], config))
        change = np.abs(_output(tuned, image) - before)
        drift[weight], learned[weight] = float(change[~annotated].mean()), float(change[annotated].mean())
    # measured: drift 0.128 -> 0.075 while the corrected rows change alike (0.103, 0.098)
    assert drift[1.0] < 0.7 * drift[0.0], drift
    assert learned[1.0] > 0.8 * learned[0.0], learned


def test_start_model_is_kept_when_fine_tuning_cannot_beat_it():
    image, labels = blobs((6, 40, 40), n=10, radius=4)
    parent = drain(train(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)],
                         TrainingConfig(iterations=30, batch_size=4, device="cpu", learning_rate=3e-3)))
    pair = TrainingPair(image, labels, slices=[0, 2, 4])
    # no trained weights can beat the start model by a margin of 1 (scores are at most 1)
    trainer = Trainer(parent, [pair], TrainingConfig(iterations=4, batch_size=2, device="cpu",
                                                     keep_margin=1.0))
    result = drain(trainer.run())
    assert trainer.keeps_best and trainer.kept == "start"
    assert "start model's weights" in result.history[-1]["decision"]
    for key, value in parent.network.state_dict().items():
        assert torch.equal(result.network.state_dict()[key], value), key
    # a barely trained start model is beaten by a clear margin: the fine-tuned weights are kept
    weak = drain(train(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)],
                       TrainingConfig(iterations=1, batch_size=2, device="cpu")))
    trainer = Trainer(weak, [pair], TrainingConfig(iterations=40, batch_size=4, device="cpu",
                                                   learning_rate=3e-3))
    drain(trainer.run())
    assert trainer.kept == "best" and "fine-tuned weights" in trainer.decision, trainer.decision


def test_keep_margin_is_at_least_one_objects_worth():
    assert keep_margin(0.01, 0) == 0.01
    assert keep_margin(0.01, 8) == 0.0625  # one of 8 objects moves F1 by 1/8, the score by half
    assert keep_margin(0.01, 200) == 0.01


def test_choose_weights_rules():
    assert choose_weights(None, None, False, 0.01, True)[0] == "last"
    assert choose_weights(0.80, 0.805, True, 0.01, True)[0] == "start"
    kept, why = choose_weights(0.80, 0.83, True, 0.01, True)
    assert kept == "best" and "0.830" in why and "0.800" in why
    assert choose_weights(0.80, float("nan"), True, 0.01, True)[0] == "start"
    assert choose_weights(None, 0.5, True, 0.01, False)[0] == "best"  # training from scratch
    # the score rose (pixel Dice) but objects were lost on the held-out part: the start model stays
    kept, why = choose_weights(0.40, 0.45, True, 0.01, True, f1=(0.42, 0.30))
    assert kept == "start" and "object F1 fell from 0.420 to 0.300" in why
    assert choose_weights(0.40, 0.45, True, 0.01, True, f1=(0.42, 0.42))[0] == "best"


def _view(labels, valid):
    return _Item(image=np.zeros(labels.shape, np.float32), target=np.zeros((1, *labels.shape), np.uint8),
                 mask=None, valid=valid, labels=labels)


def test_post_processing_is_never_tuned_from_slices_of_a_3d_model():
    labels = np.zeros((10, 40, 40), np.uint16)
    for i in range(40):
        labels[2:8, (i // 8) * 8:(i // 8) * 8 + 4, (i % 8) * 5:(i % 8) * 5 + 3] = i + 1
    one_slice = np.zeros(labels.shape, bool)
    one_slice[4] = True
    assert held_out_objects([_view(labels, one_slice)], 3) == (40, False)
    allowed, why = tuning_allowed([_view(labels, one_slice)], 3, 30)
    assert not allowed and "slices only" in why
    block = np.ones(labels.shape, bool)
    assert tuning_allowed([_view(labels, block)], 3, 30)[0]
    assert not tuning_allowed([_view(labels, block)], 3, 50)[0]
    # a 2D model: enough objects on at least two held-out images, never on one
    allowed, why = tuning_allowed([_view(labels[4], one_slice[4])], 2, 30)
    assert not allowed and "never re-tuned from one slice" in why
    assert tuning_allowed([_view(labels[4], one_slice[4]), _view(labels[5], one_slice[4])], 2, 30)[0]


def test_3d_membrane_model_judged_on_slices_keeps_its_weights():
    from napari_unet.training.guard import SLICES_CANNOT_JUDGE, sees_across_z

    assert choose_weights(0.4, 0.6, True, 0.01, True, blind_to_z=True)[0] == "start"
    labels = np.zeros((12, 24, 24), np.uint16)
    labels[:, :12] = 1
    labels[:, 12:] = 2
    image = np.where(labels == 1, 50.0, 150.0).astype(np.float32)
    parent = drain(train(new_model(3, "membranes", **TINY), [TrainingPair(image, labels)],
                         TrainingConfig(iterations=1, batch_size=1, device="cpu")))
    # z slices only: the held-out one cannot show z, the start model stays
    trainer = Trainer(parent, [TrainingPair(image, labels, slices=[2, 6, 10])],
                      TrainingConfig(iterations=2, batch_size=1, device="cpu", keep_margin=-1.0))
    drain(trainer.run())
    assert not sees_across_z(trainer._validation_views())
    assert trainer.kept == "start" and trainer.decision.startswith(SLICES_CANNOT_JUDGE)
    # a y plane among the corrections is the part held out: it shows z, but still not cells merging
    # on either side of it, so the start model stays
    trainer = Trainer(parent, [TrainingPair(image, labels, slices=[2, 10, (1, 5)])],
                      TrainingConfig(iterations=2, batch_size=1, device="cpu", keep_margin=-1.0))
    drain(trainer.run())
    assert sees_across_z(trainer._validation_views()) and "y 5" in trainer.validation_message
    assert trainer.kept == "start" and trainer.decision.startswith(SLICES_CANNOT_JUDGE)
    # cells annotated in 3D (a held-out block of slices) can judge
    annotated = np.zeros(labels.shape, bool)
    annotated[:, :, :] = True
    trainer = Trainer(parent, [TrainingPair(image, labels, annotated=annotated)],
                      TrainingConfig(iterations=2, batch_size=1, device="cpu", keep_margin=-1.0,
                                     validation_fraction=0.3))
    drain(trainer.run())
    assert not trainer.decision.startswith(SLICES_CANNOT_JUDGE), trainer.decision


def test_a_failing_start_validation_leaves_the_threads_as_they_were(monkeypatch):
    image, labels = blobs((6, 32, 32), n=6, radius=4)
    parent = drain(train(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)],
                         TrainingConfig(iterations=1, batch_size=2, device="cpu")))
    trainer = Trainer(parent, [TrainingPair(image, labels, slices=[0, 2, 4])],
                      TrainingConfig(iterations=2, batch_size=2, device="cpu"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("napari_unet.engine.threads.thread_choices", lambda cores=None: [1, 2])

    def broken(network):
        raise RuntimeError("validation failed")

    monkeypatch.setattr(trainer, "_validate", broken)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="validation failed"):
            drain(trainer.run())
        assert torch.get_num_threads() == 2  # the tuner (one thread first) did not leave its mark
    finally:
        torch.set_num_threads(saved)
