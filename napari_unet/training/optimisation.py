"""Optimisation steps: learning-rate schedule, device batches, batch-norm modes, gradient steps."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from napari_unet.model.precision import PrecisionPolicy, prepare_batch

#: a batch on the device: images, targets, annotation masks, loss weight maps (or None) and
#: the teacher's predicted probabilities (or None)
DeviceBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]


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


def new_optimizer(network: torch.nn.Module, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW over ``network``'s parameters, its update done by multi-tensor kernels
    (``foreach``; on the CPU torch's default is a Python loop over the parameters).

    The same numbers as the loop, but a handful of calls into torch per step instead of about
    ten per parameter tensor: in a worker thread beside napari, every call gives up and waits
    for the GIL, which the busy main thread holds for up to ``sys.getswitchinterval()``.
    """
    return torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-4, foreach=True)


def gradients_finite(network: torch.nn.Module) -> bool:
    """Whether every gradient of ``network`` is finite: one multi-tensor call
    (``torch._amp_foreach_non_finite_check_and_unscale_`` with a scale of 1, which leaves the
    gradients as they are), or the norm of each gradient where that kernel is missing."""
    grads = [p.grad for p in network.parameters() if p.grad is not None]
    if not grads:
        return True
    check = getattr(torch, "_amp_foreach_non_finite_check_and_unscale_", None)
    if check is None or len({(g.device, g.dtype) for g in grads}) > 1:
        return bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(network.parameters(), float("inf"))))
    found = torch.zeros((), device=grads[0].device)
    check(grads, found, torch.ones((), device=grads[0].device))
    return not bool(found)


def device_batch(patches: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None],
                 policy: PrecisionPolicy, device: torch.device) -> DeviceBatch:
    """Sampled patch arrays (:func:`sampling.sample_patches`) as tensors on ``device`` (images
    in ``policy``'s memory layout)."""
    images, targets, masks, maps, teachers = patches
    return (prepare_batch(torch.from_numpy(images).to(device), policy),
            torch.from_numpy(targets).to(device), torch.from_numpy(masks).to(device),
            None if maps is None else torch.from_numpy(maps).to(device),
            None if teachers is None else torch.from_numpy(teachers).to(device))


def optimizer_step(network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: "torch.amp.GradScaler | None", batches: Sequence[DeviceBatch],
                   policy: PrecisionPolicy, batch_loss: Callable[..., torch.Tensor]) -> tuple[float, bool]:
    """One optimizer step on the gradients of ``batches``, accumulated.

    Each loss (``batch_loss(x, t, m, w, teacher)``) is divided by the number of micro-batches, so the
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
    for batch in batches:
        with policy.autocast():
            loss = batch_loss(*batch) / len(batches)
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
    if gradients_finite(network):
        optimizer.step()
        return total, False
    return total, True
