"""Masked segmentation losses: only annotated voxels count.

Every term is multiplied by the annotation mask before it is summed, so the loss does not
depend on the target at unannotated voxels and its gradient with respect to the logits there is
exactly zero.

Four losses (:data:`LOSSES`, ``TrainingConfig.loss``), each a voxel term plus a region term:

* ``bce_dice`` (default): sigmoid tasks (``foreground``, ``foreground_boundary``,
  ``membranes``) binary cross-entropy (with a positive-class weight for rare foreground) + soft
  Dice per channel; ``semantic``: softmax cross-entropy (optional class weights) + soft Dice over
  classes 1..K;
* ``focal_dice``: the cross-entropy replaced by the focal loss (Lin et al. 2017), each voxel's
  term multiplied by ``(1 - p_t)^2`` (``p_t`` the probability of its true class), so easy voxels
  count little; + soft Dice;
* ``tversky``: cross-entropy + (1 - Tversky index), ``TP / (TP + 0.3 FP + 0.7 FN)`` (Salehi et
  al. 2017): missed foreground costs more than false alarms, which favours recall on thin or
  small structures. The plain Tversky index, not the focal-Tversky power: the cross-entropy
  already supplies the per-voxel gradient;
* ``boundary_bce``: the original U-Net loss (Ronneberger et al. 2015), cross-entropy weighted per
  voxel by :func:`unet_weight_map` (class balance plus a large weight in the narrow gaps between
  nearby objects, so touching objects are kept apart; the map replaces the positive and class
  weights) + soft Dice.

All four work for sigmoid and ``semantic`` tasks. With deep supervision the trainer averages the
loss over the heads.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

_EPS = 1.0
#: the losses ``masked_loss`` knows (``TrainingConfig.loss``)
LOSSES = ("bce_dice", "focal_dice", "tversky", "boundary_bce")
#: losses that need a per-voxel weight map (:func:`unet_weight_map`)
WEIGHTED_LOSSES = ("boundary_bce",)
FOCAL_GAMMA = 2.0
#: Tversky weights of false positives and of false negatives
TVERSKY_ALPHA, TVERSKY_BETA = 0.3, 0.7
#: weight-map border weight and width (pixels) of the original U-Net
UNET_W0, UNET_SIGMA = 10.0, 5.0
#: the weight map's border term is dropped where ``d1 + d2`` exceeds this many ``sigma``
#: (there it is below ``w0 * exp(-8)``, 0.03 % of ``w0``)
_CUTOFF_SIGMAS = 4.0
#: largest class-balance weight of the map (rare objects)
_MAX_CLASS_WEIGHT = 10.0


def _expand(weights: torch.Tensor, ndim: int) -> torch.Tensor:
    return weights.reshape((1, -1) + (1,) * (ndim - 2))


def masked_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, task: str, *,
                pos_weight: torch.Tensor | Sequence[float] | None = None,
                class_weights: torch.Tensor | Sequence[float] | None = None,
                dice_weight: float = 1.0, loss: str = "bce_dice",
                weight_map: torch.Tensor | None = None) -> torch.Tensor:
    """Combined loss on annotated voxels.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, C, *spatial)`` network output (float32 or float64; lower precisions are computed
        in float32).
    target : torch.Tensor
        Sigmoid tasks: ``(B, C, *spatial)`` 0/1; ``semantic``: ``(B, *spatial)`` class ids.
    mask : torch.Tensor
        ``(B, *spatial)``, nonzero = annotated.
    task : str
        One of ``checkpoint.TASKS``.
    pos_weight : per-channel weight of positive voxels in the BCE (sigmoid tasks; not with
        ``boundary_bce``).
    class_weights : per-class weights of the CE (semantic; not with ``boundary_bce``).
    dice_weight : weight of the Dice (or Tversky) term relative to the cross-entropy.
    loss : str
        One of :data:`LOSSES`.
    weight_map : torch.Tensor, optional
        ``(B, *spatial)`` per-voxel weights (:func:`unet_weight_map`); required by
        ``boundary_bce``, ignored by the others.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
    if loss in WEIGHTED_LOSSES and weight_map is None:
        raise ValueError(f"the {loss} loss needs a weight map (unet_weight_map of the labels)")
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    m = (mask != 0).to(logits.dtype)
    n_annotated = m.sum().clamp(min=1.0)
    spatial_axes = tuple(range(2, logits.ndim))
    voxel_weight = m
    if loss == "boundary_bce":
        voxel_weight = m * weight_map.to(logits.dtype)
        pos_weight = class_weights = None  # the map balances the classes itself
    if task == "semantic":
        n_classes = logits.shape[1]
        t = (target.long() * (mask != 0).long())  # labels outside the annotation are ignored
        weight = None
        if class_weights is not None:
            weight = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
        ce = F.cross_entropy(logits, t, weight=weight, reduction="none")
        probs = torch.softmax(logits, dim=1)
        if loss == "focal_dice":
            p_true = probs.gather(1, t.unsqueeze(1)).squeeze(1)
            ce = ce * (1 - p_true) ** FOCAL_GAMMA
        ce = (ce * voxel_weight).sum() / n_annotated
        probs = probs * m.unsqueeze(1)
        onehot = F.one_hot(t, n_classes).movedim(-1, 1).to(logits.dtype) * m.unsqueeze(1)
        if n_classes > 1:
            probs, onehot = probs[:, 1:], onehot[:, 1:]
        return ce + dice_weight * _region_loss(probs, onehot, (0, *spatial_axes), loss)
    t = target.to(logits.dtype) * m.unsqueeze(1)
    pw = None
    if pos_weight is not None:
        pw = _expand(torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device), logits.ndim)
    bce = F.binary_cross_entropy_with_logits(logits, t, pos_weight=pw, reduction="none")
    probs = torch.sigmoid(logits)
    if loss == "focal_dice":
        p_true = probs * t + (1 - probs) * (1 - t)
        bce = bce * (1 - p_true) ** FOCAL_GAMMA
    bce = (bce * voxel_weight.unsqueeze(1)).sum() / (n_annotated * logits.shape[1])
    probs = probs * m.unsqueeze(1)
    return bce + dice_weight * _region_loss(probs, t, (0, *spatial_axes), loss)


def _region_loss(probs: torch.Tensor, target: torch.Tensor, axes: tuple[int, ...], loss: str) -> torch.Tensor:
    """1 - soft Dice (or Tversky index for ``tversky``), averaged over the channels."""
    if loss == "tversky":
        return 1 - _tversky(probs, target, axes).mean()
    return 1 - _soft_dice(probs, target, axes).mean()


def _tversky(probs: torch.Tensor, target: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """Per-channel Tversky index over the batch (``probs`` and ``target`` already masked)."""
    tp = (probs * target).sum(axes)
    fp = probs.sum(axes) - tp
    fn = target.sum(axes) - tp
    return (tp + _EPS) / (tp + TVERSKY_ALPHA * fp + TVERSKY_BETA * fn + _EPS)


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


def map_class_weights(object_fraction: float, cap: float = _MAX_CLASS_WEIGHT) -> tuple[float, float]:
    """Class-balance weights ``(background, object)`` of :func:`unet_weight_map` for a fraction
    of object voxels: inverse frequencies scaled so that their mean is 1, capped at ``cap``."""
    f = float(object_fraction)
    if not 0 < f < 1:
        return 1.0, 1.0
    return float(min(cap, 0.5 / (1 - f))), float(min(cap, 0.5 / f))


def unet_weight_map(labels: np.ndarray, w0: float = UNET_W0, sigma: float = UNET_SIGMA,
                    sampling: Sequence[float] | None = None, *, annotated: np.ndarray | None = None,
                    class_weights: tuple[float, float] | None = None) -> np.ndarray:
    """The original U-Net weight map of a label image, 2D or 3D.

    ``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))`` on background voxels, ``w_c(x)``
    on object voxels: ``d1`` and ``d2`` are the distances to the nearest and the second-nearest
    object, and ``w_c`` balances the two classes (:func:`map_class_weights`). Narrow gaps
    between objects get weights near ``w_c + w0``, voxels far from them ``w_c``.

    Each object's distance transform is computed in its bounding box widened by ``4 sigma``
    (beyond that the border term is below ``w0 * exp(-8)`` and dropped), so the cost grows with
    the objects' size, not with the image's.

    Parameters
    ----------
    labels : numpy.ndarray
        Object ids (0 = background), 2D or 3D.
    w0, sigma : float
        Border weight, and width of the border term in units of ``sampling`` (pixels).
    sampling : sequence of float, optional
        Voxel spacing per axis (None = isotropic, 1).
    annotated : numpy.ndarray, optional
        Bool mask of annotated voxels: the class balance counts only those.
    class_weights : (float, float), optional
        ``(background, object)`` weights instead of those from the labels.

    Returns
    -------
    numpy.ndarray
        float32 weights of ``labels.shape``.
    """
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"unet_weight_map needs a 2D or 3D label image, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise ValueError(f"labels must hold integer ids, got {labels.dtype}")
    if sigma <= 0:
        raise ValueError("sigma must be positive")
    spacing = np.ones(labels.ndim) if sampling is None else np.asarray(sampling, dtype=float)
    if spacing.shape != (labels.ndim,) or not np.all(spacing > 0):
        raise ValueError(f"sampling must give {labels.ndim} positive spacings, got {sampling}")
    background = labels == 0
    if class_weights is None:
        known = background if annotated is None else background[np.asarray(annotated, dtype=bool)]
        class_weights = map_class_weights(1 - np.count_nonzero(known) / known.size if known.size else 0.0)
    w_bg, w_obj = class_weights
    weights = np.where(background, np.float32(w_bg), np.float32(w_obj)).astype(np.float32)
    if w0 == 0 or not background.any():
        return weights
    cutoff = _CUTOFF_SIGMAS * sigma
    margin = [int(math.ceil(cutoff / s)) for s in spacing]
    d1 = np.full(labels.shape, np.inf, dtype=np.float32)
    d2 = np.full(labels.shape, np.inf, dtype=np.float32)
    boxes = ndi.find_objects(labels.astype(np.intp, copy=False) if labels.dtype == bool else labels)
    for index, box in enumerate(boxes, start=1):
        if box is None:
            continue
        window = tuple(slice(max(0, b.start - g), min(n, b.stop + g))
                       for b, g, n in zip(box, margin, labels.shape))
        distance = ndi.distance_transform_edt(labels[window] != index, sampling=spacing).astype(np.float32)
        near, second = d1[window], d2[window]  # views: updated in place
        np.minimum(second, np.maximum(near, distance), out=second)
        np.minimum(near, distance, out=near)
    total = d1 + d2
    border = background & (total < cutoff)
    weights[border] += (w0 * np.exp(-total[border] ** 2 / (2 * sigma**2))).astype(np.float32)
    return weights


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, annotated: torch.Tensor,
                      task: str, *, probabilities: bool = False) -> torch.Tensor:
    """Learning without Forgetting (Li and Hoiem 2016) on the voxels nobody annotated.

    The student's logits are pulled toward the start model's probabilities (``teacher``
    logits) wherever ``annotated`` is False, so fine-tuning learns the corrections without
    drifting on the rest of the stack. The soft cross-entropy (softmax for ``semantic``, per
    channel sigmoid otherwise), mean over the unannotated voxels (and channels); 0 when every
    voxel is annotated. ``annotated``: bool ``(B, *spatial)``. ``probabilities``: ``teacher``
    holds the start model's probabilities already (e.g. predicted once before training).
    """
    keep = (~annotated).unsqueeze(1).to(student.dtype)
    count = keep.sum()
    if float(count) == 0:
        return student.sum() * 0.0
    if task == "semantic":
        target = teacher if probabilities else torch.softmax(teacher, dim=1)
        term = -(target * torch.log_softmax(student, dim=1)).sum(1, keepdim=True)
        channels = 1
    else:
        target = teacher if probabilities else torch.sigmoid(teacher)
        term = F.binary_cross_entropy_with_logits(student, target, reduction="none")
        channels = student.shape[1]
    return (term * keep).sum() / (count * channels)


def training_loss(network: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, m: torch.Tensor,
                  w: torch.Tensor | None, task: str, *, loss: str = "bce_dice",
                  pos_weight: torch.Tensor | None = None, class_weights: torch.Tensor | None = None,
                  teacher: torch.nn.Module | None = None, distillation: float = 0.0) -> torch.Tensor:
    """The loss of one batch: :func:`masked_loss` on the annotated voxels ``m`` and, with a
    ``teacher`` (the start model), ``distillation`` times :func:`distillation_loss` on the
    others. With deep supervision (the network's ``config.deep_supervision``) the mean over
    its full-resolution heads (``forward_heads``)."""
    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        return masked_loss(logits.float(), t, m, task, pos_weight=pos_weight,
                           class_weights=class_weights, loss=loss, weight_map=w)

    deep = getattr(network.config, "deep_supervision", False)
    heads = network.forward_heads(x) if deep else [network(x)]
    value = sum(loss_of(h) for h in heads) / len(heads)
    if teacher is not None and distillation > 0:
        with torch.no_grad():
            targets = teacher.forward_heads(x) if deep else [teacher(x)]
        value = value + distillation * sum(
            distillation_loss(h.float(), g.float(), m, task) for h, g in zip(heads, targets)) / len(heads)
    return value
