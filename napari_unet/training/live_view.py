"""The region a live session predicts for the view on screen, and that prediction.

A 2D model predicts the plane on screen; a 3D model a slab of planes around it, read with
its halo of context and started on its pooling grid, so the tiled prediction equals that of
the whole stack (see :mod:`napari_unet.engine.predict`). The labels come from the model's
own post-processing (:func:`napari_unet.engine.predict.postprocessed`), as Segment makes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generator, Sequence

import numpy as np
import torch

from napari_unet.engine.live import default_output
from napari_unet.engine.predict import postprocessed, predict_probabilities
from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.model.normalization import Normalizer
from napari_unet.progress import drain
from napari_unet.training.preview import preview_foreground

#: a 3D model's live slab is at least this many planes deep (the plane on screen in its middle)
MIN_SLAB_DEPTH = 8
#: the context a 3D model's slab reads on each side, as a share of the network's (exact) halo.
#: Measured with nuclei-3d on a 100 x 256 x 256 stack (halo 28 planes along z, bf16, 2-core CPU
#: under load): 16 planes (0.6) changed the plane on screen by at most 0.003 in probability and
#: no object, in half the time of the exact halo (3.3 s against 6.6 s); 12 planes changed it by
#: 0.03, 8 planes by 0.25 (3 of 41 objects). Apply segments with the exact halo.
VIEW_HALO_SHARE = 0.6

Region = tuple[slice, ...]


@dataclass(frozen=True)
class ViewPlan:
    """What one view prediction reads and keeps.

    ``read``: the image region run through the network; ``keep``: the part of it kept
    (relative to ``read``); ``region``: where the kept part lies in the image; ``axis``: for a
    2D model on a stack, the axis of the plane (read squeezed along it), else None.
    """

    read: Region
    keep: Region
    region: Region
    axis: int | None


def view_plan(shape: Sequence[int], axis: int, index: int, model: SegmentationModel,
              depth: int | None = None, halo: int | None = None) -> ViewPlan:
    """The :class:`ViewPlan` of plane ``index`` along ``axis`` of an image of ``shape``.

    A 2D image is read whole. A 2D model on a stack reads the plane. A 3D model keeps a slab
    of ``depth`` planes (default: :data:`MIN_SLAB_DEPTH` or two pooling steps, whichever is
    more) around the plane and reads ``halo`` more on each side (default:
    :data:`VIEW_HALO_SHARE` of the network's halo; the whole halo makes the slab exact),
    starting on its pooling grid.
    """
    shape = tuple(int(n) for n in shape)
    full = tuple(slice(0, n) for n in shape)
    if len(shape) == 2:
        return ViewPlan(full, full, full, None)
    if not 0 <= axis < 3:
        raise ValueError(f"view axis {axis}: expected 0 (z), 1 (y) or 2 (x)")
    index = int(np.clip(index, 0, shape[axis] - 1))
    if model.spatial_dims == 2:
        region = tuple(slice(index, index + 1) if a == axis else s for a, s in enumerate(full))
        return ViewPlan(region, tuple(slice(0, r.stop - r.start) for r in region), region, axis)
    config = model.network.config
    divisor = int(config.divisor()[axis])
    depth = max(MIN_SLAB_DEPTH, 2 * divisor) if depth is None else max(1, int(depth))
    depth = min(depth, shape[axis])
    lo = int(np.clip(index - depth // 2, 0, shape[axis] - depth))
    hi = lo + depth
    exact = int(config.halo()[axis])
    context = math.ceil(VIEW_HALO_SHARE * exact) if halo is None else min(exact, max(0, int(halo)))
    read_lo = max(0, lo - context) // divisor * divisor
    read_hi = min(shape[axis], hi + context)
    read = tuple(slice(read_lo, read_hi) if a == axis else s for a, s in enumerate(full))
    keep = tuple(slice(lo - read_lo, hi - read_lo) if a == axis else slice(0, n) for a, n in enumerate(shape))
    region = tuple(slice(lo, hi) if a == axis else s for a, s in enumerate(full))
    return ViewPlan(read, keep, region, None)


@dataclass
class ViewPrediction:
    """Labels (the model's post-processing) and foreground probability of ``region``, both of
    the shape of ``image[region]``."""

    region: Region
    labels: np.ndarray
    probabilities: np.ndarray


def _plane_voxel_size(voxel_size: Sequence[float] | None, ndim: int, axis: int | None
                      ) -> tuple[float, ...] | None:
    if voxel_size is None or len(voxel_size) != ndim:
        return None
    if axis is None:
        return tuple(float(v) for v in voxel_size)
    return tuple(float(v) for a, v in enumerate(voxel_size) if a != axis)


def predict_view(image: np.ndarray, model: SegmentationModel, plan: ViewPlan, normalizer: Normalizer, *,
                 device: torch.device, precision: str, output: str | None = None,
                 voxel_size: Sequence[float] | None = None) -> ViewPrediction:
    """Predict ``plan``'s region of ``image`` with ``model`` (batch norm folded, eval mode, no
    gradients, in ``precision``) and post-process it as Segment does. ``normalizer``: fitted
    on the whole image, so the region is normalised as the whole would be."""
    output = output or default_output(model)
    data = image[plan.read]
    if plan.axis is not None:
        data = np.take(data, 0, axis=plan.axis)

    def cropped() -> Generator:
        probs = yield from predict_probabilities(data, model, device=device, precision=precision,
                                                 normalizer=normalizer, dtype=np.float32)
        return probs if plan.axis is not None else probs[(slice(None), *plan.keep)]

    sampling = _plane_voxel_size(voxel_size, image.ndim, plan.axis)
    result = drain(postprocessed(cropped(), model, output=output, voxel_size=sampling))
    labels = np.asarray(result.data)
    foreground = preview_foreground(result.probabilities, model.task, 2)
    if plan.axis is not None:
        labels = np.expand_dims(labels, plan.axis)
        foreground = np.expand_dims(foreground, plan.axis)
    return ViewPrediction(plan.region, labels, foreground)
