"""Patch shapes, batch sizes and the padding of sampled patches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from napari_unet.model.checkpoint import SegmentationModel


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
    source: tuple[int, int | None] = (0, None)  # training pair, and slice of a stack (2D model)
    labels: np.ndarray | None = None  # instance ids (*spatial) of a validation item, to score objects
    weight_map: np.ndarray | None = None  # float32 (*spatial) voxel weights of the loss (boundary_bce)


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
