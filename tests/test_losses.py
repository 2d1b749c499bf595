"""Tests for :mod:`napari_unet.losses`: only annotated voxels count."""

from __future__ import annotations

import pytest
import torch

from napari_unet.losses import class_weights_from_counts, masked_loss, positive_weights


def _case(task: str, spatial=(2, 12, 10), channels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(spatial[0], channels, *spatial[1:], generator=g, requires_grad=True)
    if task == "semantic":
        target = torch.randint(0, channels, (spatial[0], *spatial[1:]), generator=g)
    else:
        target = torch.randint(0, 2, (spatial[0], channels, *spatial[1:]), generator=g)
    mask = torch.rand(spatial[0], *spatial[1:], generator=g) > 0.6
    return logits, target, mask


@pytest.mark.parametrize("task,channels", [("foreground", 1), ("foreground_boundary", 2),
                                           ("membranes", 1), ("semantic", 4)])
@pytest.mark.parametrize("spatial", [(2, 12, 10), (2, 4, 6, 5)])
def test_unannotated_voxels_have_exactly_zero_gradient(task, channels, spatial):
    logits, target, mask = _case(task, spatial, channels)
    kwargs = {"pos_weight": [3.0] * channels} if task != "semantic" else {"class_weights": [1.0, 2, 3, 4]}
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


@pytest.mark.parametrize("task", ["foreground", "semantic"])
def test_loss_is_lower_for_the_right_answer(task):
    _, target, mask = _case(task, channels=1 if task != "semantic" else 3)
    if task == "semantic":
        good = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 20 - 10
        bad = -good
    else:
        good = target.float() * 20 - 10
        bad = -good
    assert masked_loss(good, target, mask, task) < 0.05
    assert masked_loss(bad, target, mask, task) > 1.0


def test_weights_for_rare_classes():
    assert positive_weights([0.5, 0.01]) == [1.0, 5.0]
    weights = class_weights_from_counts([1000, 10, 0])
    assert weights[0] == 1.0 and weights[1] == 10.0 and weights[2] == 1.0
