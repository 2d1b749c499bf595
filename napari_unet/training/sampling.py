"""Training items, patch shapes, batch sizes, and the sampling of augmented patch batches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.training.augment import AugmentSettings, augment_patch

#: at most this many voxel indices per item to draw patch centres from
_MAX_INDEX_SAMPLES = 200_000


@dataclass
class _Item:
    """One training image, normalised and padded to at least the patch shape."""

    image: np.ndarray          # float32 (*spatial)
    target: np.ndarray         # (C, *spatial) uint8 or (*spatial) int64
    mask: np.ndarray | None    # bool (*spatial) or None = all annotated
    valid: np.ndarray | None = None  # bool (*spatial): validation voxels
    annotated_index: np.ndarray | None = None
    foreground_index: np.ndarray | None = None
    weight: float = 1.0
    #: training pair, and slice of a stack (2D model): z, or ``(axis, index)`` for y and x
    source: tuple[int, Any] = (0, None)
    labels: np.ndarray | None = None  # instance ids (*spatial) of a validation item, to score objects
    weight_map: np.ndarray | None = None  # float32 (*spatial) voxel weights of the loss (boundary_bce)
    #: a stack annotated on y or x slices (and z ones): its planes (``labels.slices``); None
    #: when its annotation is z slices, a mask or everything
    planes: list | None = None
    #: the distillation teacher's probabilities ``(heads * channels, *spatial)`` float16, when
    #: predicted once before training (see :mod:`napari_unet.training.teacher`)
    teacher: np.ndarray | None = None


def _pad_to(array: np.ndarray, shape: Sequence[int], mode: str, lead: int = 0) -> np.ndarray:
    pads = [(0, 0)] * lead + [(0, max(0, s - a)) for s, a in zip(shape, array.shape[lead:])]
    if not any(p[1] for p in pads):
        return array
    if mode == "constant":
        return np.pad(array, pads, mode="constant")
    return np.pad(array, pads, mode="reflect" if all(a > 1 for a in array.shape[lead:]) else "edge")


def _divisor_multiple(size: int, divisor: int) -> int:
    return max(divisor, size // divisor * divisor)


def auto_patch_shape(model: SegmentationModel, shapes: Sequence[Sequence[int]],
                     device: torch.device) -> tuple[int, ...]:
    """Training patch shape: as large as the data allows, capped for speed, multiples of the
    network's divisor."""
    divisor = model.config.divisor()
    gpu = device.type == "cuda"
    if model.spatial_dims == 2:
        cap = [256, 256] if gpu else [128, 128]
    else:
        aniso = bool(model.config.inplane_only_levels)
        cap = ([32, 128, 128] if aniso else [64, 96, 96]) if gpu else ([16, 64, 64] if aniso else [32, 48, 48])
    largest = [max(s[a] for s in shapes) for a in range(model.spatial_dims)]
    patch = []
    for size, c, d in zip(largest, cap, divisor):
        c = max(c, d)
        patch.append(_divisor_multiple(min(size, c), d) if size >= d else d)
    if model.spatial_dims == 3 or len(patch) == 2:  # square in-plane patches allow rotations
        side = min(patch[-1], patch[-2])
        patch[-1] = patch[-2] = side
    return tuple(patch)


def auto_batch_size(model: SegmentationModel, patch: Sequence[int], device: torch.device) -> int:
    voxels = math.prod(patch)
    budget = (2**20 if device.type == "cuda" else 2**16) * 16 / max(8, model.config.base_channels)
    return int(np.clip(budget // voxels, 2, 32))


def make_item(image: np.ndarray, target: np.ndarray, mask: np.ndarray | None, patch: Sequence[int],
              task: str, seed: int, weight_map: np.ndarray | None = None) -> _Item:
    """An indexed :class:`_Item`, padded to at least ``patch``.

    Parameters
    ----------
    image, target, mask, weight_map
        Normalised image, training targets, annotation mask (None: all annotated) and loss
        weight map (or None).
    patch
        The training patch shape.
    task, seed
        Model task and the training seed (for :func:`index_item`).
    """
    lead = 0 if task == "semantic" else 1
    padded = any(s < p for s, p in zip(image.shape, patch))
    if padded and mask is None:
        mask = np.ones(image.shape, dtype=bool)
    image = _pad_to(image, patch, "reflect")
    target = _pad_to(target, patch, "constant", lead)
    if mask is not None:
        mask = _pad_to(mask, patch, "constant")
    item = _Item(image=np.ascontiguousarray(image, dtype=np.float32), target=target, mask=mask)
    if weight_map is not None:
        item.weight_map = np.ascontiguousarray(_pad_to(weight_map, patch, "constant"), dtype=np.float32)
    index_item(item, task, seed)
    return item


def index_item(item: _Item, task: str, seed: int) -> None:
    """Set ``item``'s sampling weight and its indices of annotated and foreground voxels
    (at most ``_MAX_INDEX_SAMPLES`` of each, drawn with ``seed``)."""
    rng = np.random.default_rng(seed + 7)
    fg = item.target > 0 if task == "semantic" else item.target[0] > 0
    if item.mask is not None:
        fg = fg & item.mask
        idx = np.flatnonzero(item.mask)
        if idx.size > _MAX_INDEX_SAMPLES:
            idx = rng.choice(idx, _MAX_INDEX_SAMPLES, replace=False)
        item.annotated_index = idx
        item.weight = float(item.mask.sum())
    else:
        item.annotated_index = None
        item.weight = float(item.image.size)
    fidx = np.flatnonzero(fg)
    if fidx.size > _MAX_INDEX_SAMPLES:
        fidx = rng.choice(fidx, _MAX_INDEX_SAMPLES, replace=False)
    item.foreground_index = fidx


def is_anisotropic(model: SegmentationModel) -> bool:
    """Whether ``model`` is 3D with coarser Z (in-plane-only levels, or a Z voxel size over
    1.5 times the in-plane one): augmentation then rotates in-plane only."""
    if model.spatial_dims != 3:
        return False
    if model.config.inplane_only_levels:
        return True
    vs = model.voxel_size
    return bool(vs and len(vs) == 3 and vs[0] > 1.5 * min(vs[1:]))


def patch_start(item: _Item, rng: np.random.Generator, patch: Sequence[int],
                foreground_oversampling: float) -> tuple[int, ...]:
    """Corner of a patch around a drawn centre voxel (jittered by up to a quarter patch).

    The centre is an annotated foreground voxel with probability
    ``foreground_oversampling``, else an annotated voxel (any voxel without a mask).
    """
    shape = item.image.shape
    use_fg = item.foreground_index.size and rng.random() < foreground_oversampling
    if use_fg:
        centre = np.unravel_index(int(item.foreground_index[rng.integers(item.foreground_index.size)]), shape)
    elif item.annotated_index is not None:
        centre = np.unravel_index(int(item.annotated_index[rng.integers(item.annotated_index.size)]), shape)
    else:
        centre = tuple(int(rng.integers(s)) for s in shape)
    start = []
    for c, s, p in zip(centre, shape, patch):
        lo = int(c) - p // 2 + int(rng.integers(-(p // 4), p // 4 + 1))
        start.append(int(np.clip(lo, 0, s - p)))
    return tuple(start)


def sample_patches(items: Sequence[_Item], probabilities: np.ndarray, patch: Sequence[int], count: int,
                   rng: np.random.Generator, *, augment: bool, settings: AugmentSettings | None,
                   foreground_oversampling: float, anisotropic: bool
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """A batch of ``count`` training patches.

    Items are drawn with ``probabilities``, patch centres by :func:`patch_start`. Only each
    patch, with the margin of its elastic deformation, is read and augmented
    (:func:`augment.augment_patch`), straight into the batch arrays: nothing of the images'
    size is allocated. A weight map and the teacher's predicted probabilities move with the
    targets (nearest neighbour).

    Returns
    -------
    images, targets, masks, maps, teachers
        Images ``(B, 1, *patch)`` float32, targets ``(B, C, *patch)`` (semantic: ``(B,
        *patch)``), annotation masks ``(B, *patch)`` bool, loss weight maps ``(B, *patch)``
        float32 when the items have them (else None), and the teacher's probabilities ``(B, K,
        *patch)`` float16 when items have them (``_Item.teacher``; zeros for items without,
        whose voxels are all annotated; else None).
    """
    patch = tuple(patch)
    lead = items[0].target.shape[:items[0].target.ndim - len(patch)]
    images = np.empty((count, 1, *patch), dtype=np.float32)
    targets = np.empty((count, *lead, *patch), dtype=items[0].target.dtype)
    masks = np.empty((count, *patch), dtype=bool)
    weighted = items[0].weight_map is not None
    maps = np.empty((count, *patch), dtype=np.float32) if weighted else None
    taught = [item.teacher for item in items if item.teacher is not None]
    teachers = np.zeros((count, taught[0].shape[0], *patch), dtype=np.float16) if taught else None
    settings = settings or AugmentSettings()
    for b in range(count):
        item = items[int(rng.choice(len(items), p=probabilities))]
        start = patch_start(item, rng, patch, foreground_oversampling)
        extra = [a for a in (item.mask, item.weight_map if weighted else None, item.teacher) if a is not None]
        if augment:
            image, moved = augment_patch(item.image, [item.target, *extra], start, patch, rng,
                                         spatial_dims=len(patch), anisotropic=anisotropic,
                                         settings=settings)
        else:
            region = tuple(slice(a, a + p) for a, p in zip(start, patch))
            image = item.image[region]
            moved = [a[(Ellipsis, *region)] for a in (item.target, *extra)]
        images[b, 0], targets[b] = image, moved[0]
        moved = moved[1:]
        masks[b] = True if item.mask is None else moved.pop(0)
        if weighted:
            maps[b] = moved.pop(0)
        if item.teacher is not None:
            teachers[b] = moved.pop(0)
    return images, targets, masks, maps, teachers
