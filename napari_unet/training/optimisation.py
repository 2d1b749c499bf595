"""Optimisation steps: learning-rate schedule, device batches, batch-norm modes, gradient steps."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from napari_unet.model.precision import PrecisionPolicy, prepare_batch

#: a batch on the device: images, targets, annotation masks and loss weight maps (or None)
DeviceBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def learning_rate_at(base_lr: float, iteration: int, warmup: int, fraction: float) -> float:
    """Learning rate of step ``iteration``: linear warm-up over ``warmup`` steps, then a
    cosine decay to a tenth of ``base_lr`` at ``fraction`` 1 of the run (iterations or time)."""
    return base_lr * min(1.0, (iteration + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction))))


def _batch_norms(network: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def set_train_mode(network: torch.nn.Module, freeze_norm: bool) -> None:
    """Put ``network`` in training mode; with ``freeze_norm``, its batch norms stay in eval
    mode (their running statistics frozen)."""
    network.train()
    if freeze_norm:
        for module in _batch_norms(network):
            module.eval()


@torch.no_grad()
def recalibrate_norm(network: torch.nn.Module, sample_images: Callable[[], np.ndarray],
                     policy: PrecisionPolicy, device: torch.device, batches: int = 8) -> None:
    """Re-estimate batch-norm statistics (cumulative average) on ``batches`` image batches
    from ``sample_images``, so that frozen statistics match the new data."""
    norms = _batch_norms(network)
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for _ in range(batches):
        images = sample_images()
        with policy.autocast():
            network(prepare_batch(torch.from_numpy(images).to(device), policy))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
        m.eval()


def device_batch(patches: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None],
                 policy: PrecisionPolicy, device: torch.device) -> DeviceBatch:
    """Sampled patch arrays as tensors on ``device`` (images in ``policy``'s memory layout)."""
    images, targets, masks, maps = patches
    return (prepare_batch(torch.from_numpy(images).to(device), policy),
            torch.from_numpy(targets).to(device), torch.from_numpy(masks).to(device),
            None if maps is None else torch.from_numpy(maps).to(device))


def optimizer_step(network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: "torch.amp.GradScaler | None", batches: Sequence[DeviceBatch],
                   policy: PrecisionPolicy, batch_loss: Callable[..., torch.Tensor]) -> tuple[float, bool]:
    """One optimizer step on the gradients of ``batches``, accumulated.

    Each loss (``batch_loss(x, t, m, w)``) is divided by the number of micro-batches, so the
    step follows the mean of their losses. A step whose gradient is not finite is skipped
    (with a GradScaler, it skips such steps itself).

    Returns
    -------
    loss, skipped
        The mean loss, and whether the step was skipped for a non-finite gradient (without
        a scaler; with one, always False).
    """
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for x, t, m, w in batches:
        with policy.autocast():
            loss = batch_loss(x, t, m, w) / len(batches)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        total += float(loss.detach())
    if scaler is not None:
        scaler.step(optimizer)  # skips steps with non-finite gradients itself
        scaler.update()
        return total, False
    # a rare non-finite gradient (seen with bf16) would poison every weight: such a step is
    # skipped, as GradScaler does for fp16
    grad_norm = torch.nn.utils.clip_grad_norm_(network.parameters(), float("inf"))
    if torch.isfinite(grad_norm):
        optimizer.step()
        return total, False
    return total, True
