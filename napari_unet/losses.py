"""Masked segmentation losses: only annotated voxels count.

Every term is multiplied by the annotation mask before it is summed, so the loss does not
depend on the target at unannotated voxels and its gradient with respect to the logits there is
exactly zero.

* sigmoid tasks (``foreground``, ``foreground_boundary``, ``membranes``): binary cross-entropy
  (with a positive-class weight for rare foreground) + soft Dice per channel;
* ``semantic``: softmax cross-entropy (optional class weights) + soft Dice over classes 1..K.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

_EPS = 1.0


def _expand(weights: torch.Tensor, ndim: int) -> torch.Tensor:
    return weights.reshape((1, -1) + (1,) * (ndim - 2))


def masked_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, task: str, *,
                pos_weight: torch.Tensor | Sequence[float] | None = None,
                class_weights: torch.Tensor | Sequence[float] | None = None,
                dice_weight: float = 1.0) -> torch.Tensor:
    """Combined loss on annotated voxels.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, C, *spatial)`` network output.
    target : torch.Tensor
        Sigmoid tasks: ``(B, C, *spatial)`` 0/1; ``semantic``: ``(B, *spatial)`` class ids.
    mask : torch.Tensor
        ``(B, *spatial)``, nonzero = annotated.
    task : str
        One of ``checkpoint.TASKS``.
    pos_weight : per-channel weight of positive voxels in the BCE (sigmoid tasks).
    class_weights : per-class weights of the CE (semantic).
    dice_weight : weight of the Dice term relative to the cross-entropy.
    """
    logits = logits.float()
    m = (mask != 0).to(logits.dtype)
    n_annotated = m.sum().clamp(min=1.0)
    spatial_axes = tuple(range(2, logits.ndim))
    if task == "semantic":
        n_classes = logits.shape[1]
        t = (target.long() * (mask != 0).long())  # labels outside the annotation are ignored
        weight = None
        if class_weights is not None:
            weight = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
        ce = F.cross_entropy(logits, t, weight=weight, reduction="none")
        ce = (ce * m).sum() / n_annotated
        probs = torch.softmax(logits, dim=1) * m.unsqueeze(1)
        onehot = F.one_hot(t, n_classes).movedim(-1, 1).to(logits.dtype) * m.unsqueeze(1)
        if n_classes > 1:
            probs, onehot = probs[:, 1:], onehot[:, 1:]
        dice = _soft_dice(probs, onehot, (0, *spatial_axes))
        return ce + dice_weight * (1 - dice.mean())
    t = target.to(logits.dtype) * m.unsqueeze(1)
    pw = None
    if pos_weight is not None:
        pw = _expand(torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device), logits.ndim)
    weight = m.unsqueeze(1).expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, t, weight=weight, pos_weight=pw, reduction="sum")
    bce = bce / (n_annotated * logits.shape[1])
    probs = torch.sigmoid(logits) * m.unsqueeze(1)
    dice = _soft_dice(probs, t, (0, *spatial_axes))
    return bce + dice_weight * (1 - dice.mean())


def _soft_dice(probs: torch.Tensor, target: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Per-channel soft Dice over the batch (smoothed so empty channels are well defined)."""
    intersection = (probs * target).sum(axes)
    denominator = probs.sum(axes) + target.sum(axes)
    return (2 * intersection + _EPS) / (denominator + _EPS)


def positive_weights(fractions: Sequence[float], cap: float = 5.0) -> list[float]:
    """BCE weight of positive voxels per channel: ``sqrt(negatives / positives)``, in 1..cap."""
    out = []
    for f in fractions:
        f = float(np.clip(f, 1e-6, 1.0))
        out.append(float(np.clip(np.sqrt((1 - f) / f), 1.0, cap)))
    return out


def class_weights_from_counts(counts: Sequence[float], cap: float = 10.0) -> list[float]:
    """CE weights per class: inverse square root of frequency, background = 1, capped."""
    counts = np.asarray(counts, dtype=float)
    freq = counts / max(counts.sum(), 1.0)
    weights = np.ones_like(freq)
    present = freq > 0
    weights[present] = np.sqrt(freq[0] / freq[present]) if freq[0] > 0 else 1.0
    return [float(w) for w in np.clip(weights, 1.0, cap)]
