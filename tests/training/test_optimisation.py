"""Tests for the optimizer and the gradient check of training steps (training/optimisation.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from napari_unet.training.optimisation import gradients_finite, new_optimizer
from napari_unet.training.trainer import new_model
from tests.training.test_trainer import TINY


def _with_gradients(seed: int = 0) -> torch.nn.Module:
    network = new_model(3, "foreground_boundary", **TINY).network
    generator = torch.Generator().manual_seed(seed)
    for p in network.parameters():
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    return network


def test_multi_tensor_adamw_takes_the_same_steps_as_the_loop():
    network = _with_gradients()
    loop = copy.deepcopy(network)
    for a, b in zip(network.parameters(), loop.parameters()):
        b.grad = a.grad.clone()
    ours = new_optimizer(network, 2e-4)
    reference = torch.optim.AdamW(loop.parameters(), lr=2e-4, weight_decay=1e-4, foreach=False)
    assert ours.defaults["foreach"] and ours.defaults["weight_decay"] == 1e-4
    for _ in range(3):
        ours.step()
        reference.step()
    for a, b in zip(network.parameters(), loop.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_gradients_finite_finds_any_non_finite_value_and_leaves_the_gradients(bad):
    network = _with_gradients()
    before = [p.grad.clone() for p in network.parameters()]
    assert gradients_finite(network)
    assert all(torch.equal(p.grad, g) for p, g in zip(network.parameters(), before))  # untouched
    list(network.parameters())[7].grad.view(-1)[3] = bad
    assert not gradients_finite(network)
    for p in network.parameters():
        p.grad = None
    assert gradients_finite(network)  # nothing to check
