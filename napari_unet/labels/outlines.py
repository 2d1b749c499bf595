"""Object outlines in the plane on screen, made off the main thread.

napari draws a labels layer's contours on the main thread at every redraw (~10-17 ms for a
512x512 slice here); Live mode redraws its layer every second or so while the user paints, so
its worker makes the outlines instead (:func:`plane_outlines`) and napari draws them as plain
labels (~2-3 ms). numpy only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def plane_outlines(labels: np.ndarray, plane_axes: Sequence[int], width: int = 2) -> np.ndarray:
    """``labels`` kept only on each object's boundary within the planes spanned by
    ``plane_axes`` (its pixels next to another id along one of those axes), ``width`` pixels
    thick, inside the object; 0 elsewhere. Same shape and dtype as ``labels``."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, dtype=bool)
    for axis in plane_axes:
        if labels.shape[axis] < 2:
            continue
        differs = np.diff(labels, axis=axis) != 0
        lower = [slice(None)] * labels.ndim
        upper = [slice(None)] * labels.ndim
        lower[axis], upper[axis] = slice(0, -1), slice(1, None)
        edge[tuple(lower)] |= differs
        edge[tuple(upper)] |= differs
    inside = labels != 0
    edge &= inside
    for _ in range(max(0, width - 1)):
        grown = edge.copy()
        for axis in plane_axes:
            if labels.shape[axis] < 2:
                continue
            lower = [slice(None)] * labels.ndim
            upper = [slice(None)] * labels.ndim
            lower[axis], upper[axis] = slice(0, -1), slice(1, None)
            grown[tuple(lower)] |= edge[tuple(upper)]
            grown[tuple(upper)] |= edge[tuple(lower)]
        edge = grown & inside
    return np.where(edge, labels, np.zeros((), labels.dtype))
