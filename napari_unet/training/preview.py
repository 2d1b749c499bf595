"""The live preview of fine-tuning: which part of the image is re-predicted, and how the
probabilities are shown (a foreground map placed where that part lies). numpy only."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

#: a 3D model's preview slab is at least this many slices deep
MIN_PREVIEW_DEPTH = 8


def preview_slab(data: Any, z: int | None, spatial_dims: int, z_divisor: int) -> tuple[Any, int]:
    """The part of ``data`` re-predicted for the preview, and its first slice index.

    A 2D image is itself; a 2D model previews slice ``z``; a 3D model a slab around ``z``
    deep enough for its pooling (``z_divisor``: what its depth must be a multiple of), inside
    the stack. ``data`` is sliced, not read (a lazy array stays lazy).
    """
    if np.ndim(data) == 2:
        return data, 0
    if spatial_dims == 2:
        return data[z], z
    depth = max(MIN_PREVIEW_DEPTH, z_divisor * 2)
    start = int(np.clip(z - depth // 2, 0, max(0, data.shape[0] - depth)))
    return data[start:start + depth], start


def preview_foreground(probabilities: np.ndarray, task: str, image_ndim: int) -> np.ndarray:
    """The map shown: foreground probability (for classes: 1 - background), float32, with a
    z axis of one slice when the image is a stack and the map is 2D."""
    probs = np.asarray(probabilities, dtype=np.float32)
    foreground = 1.0 - probs[0] if task == "semantic" else probs[0]
    if image_ndim >= 3 and foreground.ndim == 2:
        foreground = foreground[None]
    return foreground


def preview_translate(translate: Sequence[float], scale: Sequence[float], image_ndim: int,
                      z: int) -> np.ndarray:
    """Where the preview lies: the image's ``translate`` moved to slice ``z`` of a stack."""
    out = np.array(translate, dtype=float)
    if image_ndim >= 3:
        out[-3] += z * scale[-3]
    return out
