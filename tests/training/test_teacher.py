"""Tests for the distillation teacher predicted once before training (training/teacher.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.model.config import UNetConfig
from napari_unet.model.precision import resolve_precision
from napari_unet.model.unet import UNet, fuse_for_inference
from napari_unet.progress import drain
from napari_unet.training.augment import AugmentSettings
from napari_unet.training.config import TrainingConfig, TrainingPair
from napari_unet.training.sampling import sample_patches
from napari_unet.training.teacher import Teacher, start_teacher, teacher_maps
from napari_unet.training.trainer import Trainer, new_model, train
from tests.training.test_guard import _output
from tests.training.test_trainer import TINY, blobs

CPU = torch.device("cpu")
FP32 = resolve_precision("fp32", CPU)


def _unetpp_3d(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    config = UNetConfig(spatial_dims=3, out_channels=2, base_channels=4, depth=3, architecture="unetpp",
                        deep_supervision=True, inplane_only_levels=(0,))
    network = UNet(config)
    for module in network.modules():  # batch norm statistics that are not the identity
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return fuse_for_inference(network)


def test_teacher_maps_are_every_head_of_the_whole_image_whatever_the_tiles():
    network = _unetpp_3d()
    image = np.random.default_rng(0).random((12, 44, 52)).astype(np.float32)
    with torch.no_grad():
        whole = torch.cat([torch.sigmoid(h) for h in network.forward_heads(torch.from_numpy(image)[None, None])],
                          dim=1)[0].numpy()
    assert whole.shape == (4, 12, 44, 52)  # 2 heads x 2 channels
    for tile_voxels in (10**9, 30000):  # one tile, and many small ones (with the network's halo)
        maps = teacher_maps(network, image, "foreground_boundary", FP32, CPU, tile_voxels=tile_voxels)
        assert maps.dtype == np.float16 and maps.shape == whole.shape
        np.testing.assert_allclose(maps.astype(np.float32), whole, atol=1e-3)


def _corrected_stack():
    image, labels = blobs((10, 32, 32), n=6, radius=5)
    return image, labels


def test_start_teacher_predicts_within_budget_runs_per_step_beyond_and_skips_when_all_is_annotated():
    image, labels = _corrected_stack()
    parent = new_model(3, "foreground", inplane_only_levels=(0,), **TINY)
    parent.version = 1  # a trained model: fine-tuning distils
    config = TrainingConfig(iterations=1, device="cpu", precision="fp32", validation_fraction=0,
                            predict_teacher=True)
    trainer = Trainer(parent, [TrainingPair(image, labels, slices=[2, 6])], config)
    (item,) = trainer._items
    teacher = start_teacher(parent.network, trainer._items, "foreground", FP32, CPU)
    assert teacher.predicted and teacher.network is None
    assert item.teacher.shape == (1, *item.image.shape) and item.teacher.dtype == np.float16
    item.teacher = None
    teacher = start_teacher(parent.network, trainer._items, "foreground", FP32, CPU, budget=0)
    assert not teacher.predicted and teacher.network is not None and item.teacher is None
    everything = Trainer(parent, [TrainingPair(image, labels)], config)
    assert start_teacher(parent.network, everything._items, "foreground", FP32, CPU) is None
    # a run predicts the maps at its start (timed) and drops them at its end
    drain(trainer.run())
    assert trainer.timings["teacher"] > 0 and item.teacher is None
    # by default the teacher runs per patch: no maps
    seen = []
    default = Trainer(parent, [TrainingPair(image, labels, slices=[2, 6])],
                      TrainingConfig(iterations=2, device="cpu", precision="fp32", validation_fraction=0))
    real = default._batch_loss
    default._batch_loss = lambda *a, **k: seen.append((default._teacher.predicted, a[-1])) or real(*a, **k)
    drain(default.run())
    assert seen == [(False, None), (False, None)]


def teacher_network(parent: SegmentationModel) -> UNet:
    return fuse_for_inference(parent.network).requires_grad_(False)


def test_teacher_patches_move_with_the_labels():
    image, labels = _corrected_stack()
    parent = new_model(3, "foreground", inplane_only_levels=(0,), **TINY)
    parent.version = 1
    config = TrainingConfig(iterations=1, device="cpu", precision="fp32", validation_fraction=0,
                            patch_shape=(8, 32, 32), batch_size=3)
    trainer = Trainer(parent, [TrainingPair(image, labels, slices=[2, 6])], config)
    start_teacher(parent.network, trainer._items, "foreground", FP32, CPU)
    (item,) = trainer._items
    # geometric augmentation (flips, rotations, elastic) moves the maps exactly as the targets
    item.teacher = np.concatenate([item.teacher, item.target.astype(np.float16)])
    rng = np.random.default_rng(3)
    for _ in range(8):
        _, targets, masks, _, teachers = sample_patches(
            trainer._items, np.ones(1), (8, 32, 32), 3, rng, augment=True,
            settings=AugmentSettings(elastic_probability=0.5), foreground_oversampling=0.5, anisotropic=True)
        assert teachers.dtype == np.float16 and teachers.shape == (3, 2, 8, 32, 32)
        np.testing.assert_array_equal(teachers[:, 1], targets[:, 0])


def test_predicted_and_per_step_teachers_agree_when_the_patch_is_the_image():
    image, labels = blobs((32, 32), n=4, radius=4)
    parent = new_model(2, "foreground", **TINY)
    parent.version = 1
    annotated = np.zeros(image.shape, bool)
    annotated[:10] = True
    config = TrainingConfig(iterations=1, device="cpu", precision="fp32", validation_fraction=0,
                            patch_shape=(32, 32), batch_size=2, augment=False)
    trainer = Trainer(parent, [TrainingPair(image, labels, annotated=annotated)], config)
    teacher = start_teacher(parent.network, trainer._items, "foreground", FP32, CPU)
    assert teacher.predicted
    x, t, m, w, maps = trainer._device_batch(trainer._sample_patches(np.random.default_rng(0)))
    per_step = Teacher(teacher_network(parent), "foreground", predicted=False)
    predicted, run = teacher.targets(x, maps), per_step.targets(x, None)
    assert len(predicted) == len(run) == 1 and predicted[0].shape == (2, 1, 32, 32)
    np.testing.assert_allclose(predicted[0].numpy(), run[0].numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="carries none"):
        teacher.targets(x, None)


def test_distillation_with_predicted_and_per_step_teachers_keeps_the_output_alike():
    image, labels = blobs((48, 48), n=8, radius=5)
    parent = drain(train(new_model(2, "foreground", **TINY), [TrainingPair(image, labels)],
                         TrainingConfig(iterations=40, batch_size=4, device="cpu", learning_rate=3e-3)))
    annotated = np.zeros(image.shape, bool)
    annotated[:12] = True
    wrong = np.where(annotated, 0, labels).astype(np.uint16)
    wrong[2:6, 2:6] = 1
    config = TrainingConfig(iterations=60, batch_size=4, device="cpu", learning_rate=3e-3, seed=1,
                            validation_fraction=0, augment=False, precision="fp32")
    outputs = {}
    for predicted in (True, False):
        config.predict_teacher = predicted
        tuned = drain(train(parent, [TrainingPair(image, wrong, annotated=annotated)], config))
        outputs[predicted] = _output(tuned, image)
    # the same patches (same seed) and, the patch being the whole image, the same targets
    # whether predicted once or run per step: the same fine-tuned output
    assert np.abs(outputs[True] - outputs[False]).max() < 0.01
