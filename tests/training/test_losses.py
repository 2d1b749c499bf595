"""Tests for :mod:`napari_unet.training.losses`: only annotated voxels count."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_unet.training.losses import (
    LOSSES,
    class_weights_from_counts,
    map_class_weights,
    masked_loss,
    positive_weights,
    unet_weight_map,
)


def _case(task: str, spatial=(2, 12, 10), channels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(spatial[0], channels, *spatial[1:], generator=g, requires_grad=True)
    if task == "semantic":
        target = torch.randint(0, channels, (spatial[0], *spatial[1:]), generator=g)
    else:
        target = torch.randint(0, 2, (spatial[0], channels, *spatial[1:]), generator=g)
    mask = torch.rand(spatial[0], *spatial[1:], generator=g) > 0.6
    return logits, target, mask


def _weight_map(shape, seed=1):
    """A positive per-voxel weight map ``(B, *spatial)`` like :func:`unet_weight_map` gives."""
    return 0.5 + 10 * torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("task,channels", [("foreground", 1), ("foreground_boundary", 2),
                                           ("membranes", 1), ("semantic", 4)])
@pytest.mark.parametrize("spatial", [(2, 12, 10), (2, 4, 6, 5)])
def test_unannotated_voxels_have_exactly_zero_gradient(task, channels, spatial, loss):
    logits, target, mask = _case(task, spatial, channels)
    kwargs = {"pos_weight": [3.0] * channels} if task != "semantic" else {"class_weights": [1.0, 2, 3, 4]}
    kwargs.update(loss=loss, weight_map=_weight_map(mask.shape))
    loss = masked_loss(logits, target, mask, task, **kwargs)
    loss.backward()
    grad = logits.grad
    outside = ~mask.unsqueeze(1).expand_as(grad)
    assert torch.count_nonzero(grad[outside]) == 0
    assert torch.count_nonzero(grad[~outside]) > 0

    # other labels where nothing is annotated: same loss, same gradients
    other = target.clone()
    if task == "semantic":
        other[~mask] = (other[~mask] + 1) % channels
    else:
        other[~mask.unsqueeze(1).expand_as(other)] ^= 1
    logits2 = logits.detach().clone().requires_grad_(True)
    loss2 = masked_loss(logits2, other, mask, task, **kwargs)
    loss2.backward()
    assert torch.equal(loss.detach(), loss2.detach())
    assert torch.equal(grad, logits2.grad)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("task", ["foreground", "foreground_boundary", "semantic"])
def test_loss_is_lower_for_the_right_answer(task, loss):
    _, target, mask = _case(task, channels={"foreground": 1, "foreground_boundary": 2, "semantic": 3}[task])
    if task == "semantic":
        good = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 20 - 10
    else:
        good = target.float() * 20 - 10
    bad = -good
    unsure = torch.zeros_like(good)
    kwargs = dict(loss=loss, weight_map=_weight_map(mask.shape))
    right = masked_loss(good, target, mask, task, **kwargs)
    assert right < 0.05
    assert right < masked_loss(unsure, target, mask, task, **kwargs) < masked_loss(bad, target, mask, task, **kwargs)
    assert masked_loss(bad, target, mask, task, **kwargs) > 1.0


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("task,channels", [("foreground", 1), ("foreground_boundary", 2), ("semantic", 3)])
def test_gradient_check_in_float64(task, channels, loss):
    logits, target, mask = _case(task, (1, 4, 5), channels, seed=3)
    logits = logits.detach().double().requires_grad_(True)
    weights = _weight_map(mask.shape).double()
    kwargs = {"pos_weight": [2.0] * channels} if task != "semantic" else {"class_weights": [1.0, 2.0, 3.0]}

    def f(x):
        return masked_loss(x, target, mask, task, loss=loss, weight_map=weights, **kwargs)

    assert f(logits).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-6)


def test_boundary_weights_scale_the_cross_entropy_voxel_by_voxel():
    logits, target, mask = _case("foreground", channels=1)
    ones = torch.ones(mask.shape)
    plain = masked_loss(logits, target, mask, "foreground", dice_weight=0.0)
    assert torch.allclose(masked_loss(logits, target, mask, "foreground", loss="boundary_bce",
                                      weight_map=ones, dice_weight=0.0), plain)
    assert torch.allclose(masked_loss(logits, target, mask, "foreground", loss="boundary_bce",
                                      weight_map=3 * ones, dice_weight=0.0), 3 * plain)
    # only the weights at annotated voxels matter
    other = torch.where(mask, ones, 100.0)
    assert torch.equal(masked_loss(logits, target, mask, "foreground", loss="boundary_bce", weight_map=other),
                       masked_loss(logits, target, mask, "foreground", loss="boundary_bce", weight_map=ones))


def test_focal_and_tversky_weigh_what_they_should():
    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[..., :4, :] = 1
    mask = torch.ones(1, 8, 8, dtype=bool)
    easy = target.float() * 6 - 3  # confident and right
    # the focal term discounts easy voxels far more than the cross-entropy does
    assert (masked_loss(easy, target, mask, "foreground", loss="focal_dice", dice_weight=0.0)
            < 0.01 * masked_loss(easy, target, mask, "foreground", dice_weight=0.0))
    # Tversky: missing foreground costs more than as many false alarms (Dice: the same);
    # prediction and target swapped swap the false negatives and false positives
    half = torch.zeros_like(target)
    half[..., :2, :] = 1
    def losses(truth, predicted, loss):
        return masked_loss(predicted.float() * 40 - 20, truth, mask, "foreground", loss=loss)
    assert losses(target, half, "tversky") - losses(half, target, "tversky") > 0.1
    assert losses(target, half, "bce_dice") == pytest.approx(float(losses(half, target, "bce_dice")), abs=1e-3)


def test_loss_errors():
    logits, target, mask = _case("foreground", channels=1)
    with pytest.raises(ValueError, match="unknown loss"):
        masked_loss(logits, target, mask, "foreground", loss="nonsense")
    with pytest.raises(ValueError, match="weight map"):
        masked_loss(logits, target, mask, "foreground", loss="boundary_bce")


# --- the U-Net weight map ------------------------------------------------------------------

def _reference_weight_map(labels, w0=10.0, sigma=5.0, sampling=None):
    """Brute force: every object's distance transform over the whole image."""
    ids = [i for i in np.unique(labels) if i]
    distances = np.sort(np.stack([ndi.distance_transform_edt(labels != i, sampling=sampling) for i in ids]), axis=0)
    w_bg, w_obj = map_class_weights(np.count_nonzero(labels) / labels.size)
    border = w0 * np.exp(-(distances[0] + distances[1]) ** 2 / (2 * sigma**2))
    return np.where(labels == 0, w_bg + border, w_obj)


def _touching_squares_2d():
    labels = np.zeros((40, 64), np.int32)
    labels[10:30, 5:25] = 1
    labels[10:30, 27:47] = 2  # a 2 px gap at x = 25, 26
    return labels


def test_weight_map_is_high_in_the_gap_between_touching_objects_2d():
    labels = _touching_squares_2d()
    w = unet_weight_map(labels)
    assert w.dtype == np.float32 and w.shape == labels.shape
    w_bg, w_obj = map_class_weights(np.count_nonzero(labels) / labels.size)
    assert np.all(w[labels > 0] == np.float32(w_obj))
    gap = w[10:30, 25:27]
    assert gap.min() > w_bg + 8  # d1 + d2 = 3: w0 * exp(-9 / 50) = 8.35
    assert w[20, 63] == pytest.approx(w_bg, abs=1e-3)  # far from any second object
    assert w[20, 2] < w_bg + 0.5 < gap.min()  # next to one object only
    np.testing.assert_allclose(w, _reference_weight_map(labels), atol=0.01)
    # class balance: the mean of w_c over the image is 1
    assert w_bg * (labels == 0).mean() + w_obj * (labels > 0).mean() == pytest.approx(1.0)


def test_weight_map_3d_anisotropic_and_annotated():
    labels = np.zeros((8, 24, 32), np.int32)
    labels[2:6, 4:20, 2:14] = 1
    labels[2:6, 4:20, 15:28] = 2  # 1 px gap
    labels[7, 0:3, 0:3] = 3  # a small third object
    w = unet_weight_map(labels)
    assert w.shape == labels.shape and w[4, 10, 14] > 9
    np.testing.assert_allclose(w, _reference_weight_map(labels), atol=0.01)
    sampling = (3.0, 1.0, 1.0)
    np.testing.assert_allclose(unet_weight_map(labels, sampling=sampling),
                               _reference_weight_map(labels, sampling=sampling), atol=0.01)
    # the class balance counts annotated voxels only
    annotated = np.zeros(labels.shape, bool)
    annotated[3] = True
    fraction = np.count_nonzero(labels[3]) / labels[3].size
    w_bg, w_obj = map_class_weights(fraction)
    assert unet_weight_map(labels, annotated=annotated)[3, 10, 5] == pytest.approx(w_obj)
    with pytest.raises(ValueError):
        unet_weight_map(labels, sampling=(1.0, 1.0))


def test_weight_map_without_objects_or_background():
    assert np.all(unet_weight_map(np.zeros((10, 10), np.uint8)) == 1)
    assert np.all(unet_weight_map(np.ones((10, 10), np.uint8)) == 1)
    one = np.zeros((10, 10), np.uint8)
    one[3:6, 3:6] = 1
    w_bg, _ = map_class_weights(9 / 100)
    assert np.allclose(unet_weight_map(one)[one == 0], w_bg)  # no second object: no border term


def test_weight_map_is_fast():
    rng = np.random.default_rng(0)
    labels = np.zeros((512, 512), np.int32)
    yy, xx = np.indices(labels.shape)
    for i in range(1, 101):
        cy, cx = rng.integers(10, 502, 2)
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 <= 64) & (labels == 0)] = i
    start = time.perf_counter()
    w = unet_weight_map(labels)
    print(f"unet_weight_map 512x512, 100 objects: {time.perf_counter() - start:.3f} s")
    assert w.max() > 5


def test_weights_for_rare_classes():
    assert positive_weights([0.5, 0.01]) == [1.0, 5.0]
    weights = class_weights_from_counts([1000, 10, 0])
    assert weights[0] == 1.0 and weights[1] == 10.0 and weights[2] == 1.0
