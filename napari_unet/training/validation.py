"""Scoring on the held-out part: validation views, Dice and object F1, post-processing tuning."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from napari_unet.engine.predict import (
    postprocess_settings,
    predict_probabilities,
    probabilities_to_output,
    shape_settings,
)
from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.model.config import UNetConfig
from napari_unet.model.normalization import Normalizer
from napari_unet.training.sampling import _Item

if TYPE_CHECKING:
    from napari_unet.labels.tuning import TuningResult

#: objects of a held-out slice of a stack are made from the probabilities of this many slices
#: on each side of it (not the whole stack: cheaper). Three slices were too few for cells that
#: span 15 slices: their objects (and the minimum size) differed from the whole stack's, and
#: the held-out score approved weights that merged cells elsewhere (bench_hitl, cells-3d)
_OBJECT_Z_CONTEXT = 12


def validation_views(val_items: Sequence[_Item], config: UNetConfig) -> list[_Item]:
    """The validation items cut to what scoring reads.

    That is the box around their held-out voxels (for a stack with instance labels, with the
    slices its objects are made from), widened by the network's halo and started on its
    pooling grid (from ``config``). Tiled inference is exact, so the probabilities there
    equal those of the whole item, at a fraction of the cost.
    """
    halo, divisor = config.halo(), config.divisor()
    views = []
    for item in val_items:
        shape = item.valid.shape
        axes = tuple(range(len(shape)))
        box = []
        for axis in axes:
            along = np.flatnonzero(item.valid.any(axis=tuple(a for a in axes if a != axis)))
            need_lo, need_hi = int(along[0]), int(along[-1]) + 1
            if axis == 0 and len(shape) == 3 and item.labels is not None:
                need_lo, need_hi = need_lo - _OBJECT_Z_CONTEXT, need_hi + _OBJECT_Z_CONTEXT
            lo = max(0, (need_lo - halo[axis]) // divisor[axis] * divisor[axis])
            box.append(slice(lo, min(shape[axis], need_hi + halo[axis])))
        box = tuple(box)
        if all(b.start == 0 and b.stop == s for b, s in zip(box, shape)):
            views.append(item)
            continue
        views.append(dataclasses.replace(
            item, image=item.image[box], target=item.target[(Ellipsis, *box)], valid=item.valid[box],
            mask=None if item.mask is None else item.mask[box],
            labels=None if item.labels is None else item.labels[box],
            annotated_index=None, foreground_index=None, weight_map=None, teacher=None))
    return views


def _probabilities(item: _Item, model: SegmentationModel, device: torch.device,
                   precision: str) -> np.ndarray:
    """Probabilities of ``model`` on the (already normalised) image of ``item``."""
    from napari_unet.progress import drain

    return drain(predict_probabilities(item.image, model, device=device, precision=precision,
                                       normalizer=Normalizer(0.0, 1.0), dtype=np.float32))


def score(views: Sequence[_Item], model: SegmentationModel, task: str, device: torch.device,
          precision: str) -> tuple[float, float | None]:
    """Validation score of ``model`` on the held-out voxels of ``views``.

    Dice (mean over the outputs for sigmoid tasks, over the classes present for semantic
    ones), averaged with the object F1 of the held-out slices when their labels are
    instances (see :func:`object_counts`).

    Returns
    -------
    score, f1
        The score, and the object F1 alone (None without instance labels).
    """
    scores = []
    counts = np.zeros(3, dtype=np.int64)  # true positives, predicted, true objects
    for item in views:
        probs = _probabilities(item, model, device, precision)
        valid = item.valid
        if task == "semantic":
            pred = np.argmax(probs, axis=0)[valid]
            truth = item.target[valid]
            per_class = []
            for c in range(1, probs.shape[0]):
                p, g = pred == c, truth == c
                if p.any() or g.any():
                    per_class.append(2 * np.count_nonzero(p & g) / (p.sum() + g.sum()))
            scores.append(float(np.mean(per_class)) if per_class else 1.0)
        else:  # every output (foreground and boundary): boundaries decide how objects split
            per_channel = []
            for c in range(probs.shape[0]):
                p = probs[c][valid] > 0.5
                g = item.target[c][valid] > 0
                denom = p.sum() + g.sum()
                per_channel.append(1.0 if denom == 0 else 2 * np.count_nonzero(p & g) / denom)
            scores.append(float(np.mean(per_channel)))
        if item.labels is not None:
            counts += object_counts(item, probs, task, **_instance_options(model))
    result = float(np.mean(scores))
    f1 = None
    if counts[1] + counts[2] > 0:
        f1 = float(2 * counts[0] / (counts[1] + counts[2]))
        result = 0.5 * (result + f1)
    return result, f1


def _instance_options(model: SegmentationModel) -> dict:
    """The post-processing ``model`` segments with (its stored values), as keywords of
    :func:`probabilities_to_output`: validation scores the objects a user would get."""
    voxel_size = model.voxel_size if model.spatial_dims == 3 else None
    threshold, min_size, seed_threshold = postprocess_settings(model, voxel_size=voxel_size)
    return dict(threshold=threshold, min_size=min_size, seed_threshold=seed_threshold,
                voxel_size=voxel_size, **shape_settings(model, voxel_size))


def held_out_axis(valid: np.ndarray) -> int:
    """The axis a stack's held-out planes cut: the one along which they are thinnest."""
    extents = [int(np.count_nonzero(valid.any(axis=tuple(a for a in range(3) if a != axis))))
               for axis in range(3)]
    return int(np.argmin(extents))


def object_counts(item: _Item, probs: np.ndarray, task: str, **options) -> np.ndarray:
    """Objects matched at IoU 0.5 on the held-out part of ``item``, slice by slice.

    A held-out slice of a stack has its objects made from a few slices around it, as from
    the whole stack, which is faster. Returns true positives, predicted and true object
    counts.
    """
    from napari_unet.labels.metrics import match_instances

    counts = np.zeros(3, dtype=np.int64)
    if item.image.ndim == 2:
        views = [(probs, item.labels, item.valid)]
    elif held_out_axis(item.valid) != 0:  # y or x planes: objects of the whole view, cut
        axis = held_out_axis(item.valid)
        instances = probabilities_to_output(probs, task, "instances", **options)
        for k in np.flatnonzero(item.valid.any(axis=tuple(a for a in range(3) if a != axis))):
            cut = lambda array: np.take(array, k, axis=axis)  # noqa: E731
            valid = cut(item.valid)
            m = match_instances(np.where(valid, cut(instances), 0), np.where(valid, cut(item.labels), 0))
            counts += (m.true_positives, m.n_pred, m.n_gt)
        return counts
    else:
        views = []
        depth = item.image.shape[0]
        for z in np.flatnonzero(item.valid.any(axis=tuple(range(1, item.valid.ndim)))):
            lo, hi = max(0, z - _OBJECT_Z_CONTEXT), min(depth, z + _OBJECT_Z_CONTEXT + 1)
            views.append((probs[:, lo:hi], item.labels[z], item.valid[z], z - lo))
    for view in views:
        p, truth, valid = view[:3]
        instances = probabilities_to_output(p, task, "instances", **options)
        if len(view) == 4:
            instances = instances[view[3]]
        m = match_instances(np.where(valid, instances, 0), np.where(valid, truth, 0))
        counts += (m.true_positives, m.n_pred, m.n_gt)
    return counts


def tune_on_held_out(views: Sequence[_Item], model: SegmentationModel, task: str, device: torch.device,
                     precision: str) -> TuningResult:
    """Tune ``model``'s post-processing on the held-out voxels of ``views`` (non-semantic)
    and store it in ``model.postprocess``; see :mod:`napari_unet.labels.tuning`."""
    from napari_unet.labels.tuning import tune_postprocessing

    instances = all(item.labels is not None for item in views)
    probs, truths, valid = [], [], []
    for item in views:
        p = _probabilities(item, model, device, precision)
        # score the box of the held-out voxels only
        box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(item.valid))
        probs.append(p[(slice(None), *box)])
        truths.append((item.labels if instances else item.target[0])[box])
        valid.append(item.valid[box])
    result = tune_postprocessing(probs, truths, task, instances=instances, valid=valid)
    where = (f"the held-out part of the training data ({sum(int(v.sum()) for v in valid)} "
             "voxels)")
    model.postprocess = result.to_postprocess(where)
    return result
