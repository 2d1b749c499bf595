"""Instances of a 2D model on a stack: made per slice, then stitched through z by overlap.

As Cellpose's ``stitch_threshold``: an object of slice ``z`` continues an object of slice
``z - 1`` when their IoU is at least the threshold and they are each other's best match;
otherwise it starts a new object. A threshold of 0 keeps the objects per slice (every slice's
objects get their own ids), so a 2D model never makes one object through the whole stack by
accident.
"""

from __future__ import annotations

import numpy as np

from napari_unet.labels.dtypes import relabel_sequential

#: default IoU for linking objects of neighbouring slices: best or within 0.012 of the best 3D
#: object F1 of the thresholds 0.05-0.6 on true 2D objects of three 3D data sets
#: (``benchmarks/bench_generalize.py --stitch``); higher values cut objects at their caps
DEFAULT_STITCH_THRESHOLD = 0.1


def _iou(previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    """IoU matrix ``(n_current + 1, n_previous + 1)`` of two label slices (row/col 0 unused)."""
    n_prev, n_cur = int(previous.max(initial=0)), int(current.max(initial=0))
    both = (previous > 0) & (current > 0)
    overlap = np.zeros((n_cur + 1, n_prev + 1), dtype=np.float64)
    np.add.at(overlap, (current[both], previous[both]), 1)
    area_prev = np.bincount(previous.ravel(), minlength=n_prev + 1).astype(np.float64)
    area_cur = np.bincount(current.ravel(), minlength=n_cur + 1).astype(np.float64)
    union = area_cur[:, None] + area_prev[None, :] - overlap
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, overlap / union, 0.0)
    iou[0, :] = 0
    iou[:, 0] = 0
    return iou


def stitch_slices(slices: np.ndarray, threshold: float = DEFAULT_STITCH_THRESHOLD) -> np.ndarray:
    """Join per-slice labels ``(Z, Y, X)`` into 3D objects by IoU between neighbouring slices.

    Parameters
    ----------
    slices : numpy.ndarray
        Labels of each slice, numbered independently (ids may repeat between slices).
    threshold : float
        Smallest IoU that links two objects of neighbouring slices; ``<= 0``: no linking, the
        objects stay per slice (with ids unique over the stack).

    Returns
    -------
    numpy.ndarray
        Labels ``1..N`` over the stack in the smallest unsigned dtype.
    """
    slices = np.asarray(slices)
    if slices.ndim != 3:
        raise ValueError(f"stitching needs a (Z, Y, X) stack of labels, got shape {slices.shape}")
    out = np.zeros(slices.shape, dtype=np.int64)
    next_id = 1
    previous = None
    for z in range(slices.shape[0]):
        current, _ = _sequential(slices[z])
        n_cur = int(current.max(initial=0))
        ids = np.zeros(n_cur + 1, dtype=np.int64)
        linked = np.zeros(n_cur + 1, dtype=bool)
        if threshold > 0 and previous is not None and n_cur and previous.max(initial=0):
            local_prev, prev_ids = _sequential(previous)
            iou = _iou(local_prev, current)
            iou[iou < threshold] = 0
            # each earlier object continues into at most its best match, each new one into
            # its best remaining one
            keep = np.zeros_like(iou, dtype=bool)
            keep[iou.argmax(axis=0), np.arange(iou.shape[1])] = True  # ties: the first
            iou[~keep] = 0
            best = iou.argmax(axis=1)
            linked = iou.max(axis=1) > 0
            ids[linked] = prev_ids[best[linked]]
        fresh = np.flatnonzero(~linked[1:]) + 1
        ids[fresh] = np.arange(next_id, next_id + len(fresh))
        next_id += len(fresh)
        out[z] = ids[current]
        previous = out[z]
    return relabel_sequential(out)


def _sequential(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` renumbered ``1..n`` and the original id of each new one (index 0: 0)."""
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids[0] != 0:
        ids = np.concatenate([[0], ids])
        inverse = inverse + 1
    return inverse.reshape(labels.shape), ids
