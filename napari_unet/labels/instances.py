"""Turning probabilities into binary, semantic or instance labels (seeded watershed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from napari_unet.labels.dtypes import relabel_sequential, smallest_uint_dtype
from napari_unet.labels.edits import fill_holes, remove_small_objects
from napari_unet.labels.membranes import estimate_radius, membrane_instances
from napari_unet.labels.watershed import (
    _check_sampling,
    _distance_markers,
    _distance_transform,
)

TASKS = ("foreground", "foreground_boundary", "membranes", "semantic")
METHODS = ("watershed", "connected_components")

Task = Literal["foreground", "foreground_boundary", "membranes", "semantic"]
Method = Literal["watershed", "connected_components"]
# smallest object kept by default: below this, seeds and specks are noise, not objects
DEFAULT_MIN_SIZE = 16


# ----------------------------------------------------------------------------------------------
# probabilities → masks and labels
# ----------------------------------------------------------------------------------------------


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _check_probabilities(probabilities: np.ndarray, task: str) -> np.ndarray:
    """Validate the ``(C, *spatial)`` probabilities of ``task`` and return them as ndarray."""
    _check_task(task)
    probs = np.asarray(probabilities)
    if probs.ndim not in (3, 4):
        raise ValueError(
            f"probabilities must have shape (C, *spatial) with 2 or 3 spatial axes, "
            f"got shape {probs.shape}"
        )
    channels = probs.shape[0]
    expected = {"foreground": 1, "foreground_boundary": 2, "membranes": 1}
    if task in expected and channels != expected[task]:
        raise ValueError(f"task {task!r} needs {expected[task]} channel(s), got {channels}")
    if task == "semantic" and channels < 2:
        raise ValueError(f"task 'semantic' needs at least 2 channels, got {channels}")
    return probs


def to_binary(probabilities: np.ndarray, task: Task, threshold: float = 0.5) -> np.ndarray:
    """Binary mask from the network probabilities.

    Parameters
    ----------
    probabilities : numpy.ndarray
        Shape ``(C, *spatial)``, values in [0, 1].
    task : str
        One of :data:`TASKS`.
    threshold : float
        Probability above which a voxel is foreground (ignored for ``"semantic"``).

    Returns
    -------
    numpy.ndarray
        Bool mask of the spatial shape: foreground (``"foreground"``,
        ``"foreground_boundary"``: channel 0), membrane (``"membranes"``) or
        ``argmax > 0`` (``"semantic"``).
    """
    probs = _check_probabilities(probabilities, task)
    if task == "semantic":
        return np.argmax(probs, axis=0) > 0
    return probs[0] > threshold


def to_semantic(probabilities: np.ndarray, task: Task, threshold: float = 0.5) -> np.ndarray:
    """Class map from the network probabilities.

    Returns
    -------
    numpy.ndarray
        ``"semantic"``: argmax class ids; other tasks: :func:`to_binary` as ``uint8`` 0/1.
        Smallest unsigned dtype.
    """
    probs = _check_probabilities(probabilities, task)
    if task == "semantic":
        return np.argmax(probs, axis=0).astype(smallest_uint_dtype(probs.shape[0] - 1))
    return to_binary(probs, task, threshold).astype(np.uint8)


def to_instances(
    probabilities: np.ndarray,
    task: Task,
    *,
    threshold: float = 0.5,
    min_size: int = DEFAULT_MIN_SIZE,
    sampling: float | Sequence[float] | None = None,
    method: Method = "watershed",
    min_distance: float | None = None,
    peak_prominence: float = 0.2,
    mask: np.ndarray | None = None,
    min_seed_size: int | None = None,
    seed_threshold: float | None = None,
    object_radius: float | None = None,
    merge_threshold: float | None = None,
) -> np.ndarray:
    """Instance labels from the network probabilities.

    ``"foreground"``
        Threshold, drop small components, fill holes; ``"watershed"``: seeded watershed on the
        distance transform, seeds at its prominent maxima, so touching round objects split;
        ``"connected_components"``: label the mask.
    ``"foreground_boundary"``
        Seeds = components of ``(fg > t) & (boundary < t)``; ``"watershed"``: grow them over
        the foreground on the boundary probability; ``"connected_components"``: the seeds.
    ``"membranes"``
        ``"watershed"``: PlantSeg's way (:func:`~napari_unet.labels.membranes.membrane_instances`):
        seeds at the maxima of the smoothed distance transform of ``p(membrane) < t``, a
        seeded watershed on the membrane probability over the whole image (cells tile it),
        then neighbours merge while the mean membrane probability on their border is below
        ``merge_threshold``; ``"connected_components"``: label ``p(membrane) < t``.
    ``"semantic"``
        Connected components of each argmax class, ids unique across classes (``method``
        ignored).

    Parameters
    ----------
    probabilities : numpy.ndarray
        Shape ``(C, *spatial)``, values in [0, 1].
    task : str
        One of :data:`TASKS`.
    threshold : float
        Probability threshold.
    min_size : int
        Objects (and seeds of ``"foreground_boundary"``/``"membranes"``: a quarter of it)
        with fewer voxels are removed.
    sampling : float or sequence of float, optional
        Voxel size per spatial axis for anisotropic distance transforms; ``min_distance`` and
        ``seed_erosion`` are in these units.
    method : str
        ``"watershed"`` or ``"connected_components"``.
    min_distance : float, optional
        ``"foreground"``: distance-transform maxima of one object closer than this are merged
        into one seed.  Default: half the object's radius.
    peak_prominence : float
        ``"foreground"``: a distance-transform maximum becomes a seed when it rises by this
        fraction of the object's radius above the saddle to a higher maximum; lower values
        split more.
    mask : numpy.ndarray, optional
        Region of interest (spatial shape); voxels outside are background.
    min_seed_size : int, optional
        Watershed seeds smaller than this are dropped (default ``min_size // 4``); streamed
        chunks set it while keeping ``min_size=0``, since objects cut by a chunk border are
        only measured after merging.
    seed_threshold : float, optional
        ``"foreground_boundary"``: seeds are where ``boundary < seed_threshold``;
        ``"membranes"``: the distance transform for the seeds is of ``membrane <
        seed_threshold``. Default: ``threshold``. A lower value splits touching objects more
        readily.
    object_radius : float, optional
        ``"membranes"``: typical cell radius (units of ``sampling``, else voxels), which scales
        seed smoothing and spacing. Default: estimated from ``membrane < threshold``; chunked
        runs pass one value for all chunks.
    merge_threshold : float, optional
        ``"membranes"``: neighbouring cells merge while the mean membrane probability along
        their border is below it (default ``threshold``; 0: no merging).

    Returns
    -------
    numpy.ndarray
        Labels ``1..N`` in the smallest unsigned dtype.
    """
    probs = _check_probabilities(probabilities, task)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    spatial_shape = probs.shape[1:]
    sampling = _check_sampling(sampling, len(spatial_shape))
    roi = None
    if mask is not None:
        roi = np.asarray(mask) != 0
        if roi.shape != spatial_shape:
            raise ValueError(f"mask shape {roi.shape} differs from spatial shape {spatial_shape}")
    if min_seed_size is None:
        min_seed_size = max(1, int(min_size) // 4)

    if task == "semantic":
        classes = np.argmax(probs, axis=0)
        if roi is not None:
            classes[~roi] = 0
        labels = np.zeros(spatial_shape, dtype=np.int64)
        offset = 0
        for class_id in range(1, probs.shape[0]):
            components, n = ndi.label(classes == class_id)
            if n:
                inside = components > 0
                labels[inside] = components[inside] + offset
                offset += n
    elif task == "foreground":
        foreground = probs[0] > threshold
        if roi is not None:
            foreground &= roi
        foreground = fill_holes(remove_small_objects(foreground, min_size))
        if method == "connected_components":
            labels, _ = ndi.label(foreground)
        else:
            distance = _distance_transform(foreground, sampling)
            markers, _ = _distance_markers(
                foreground, distance, sampling, peak_prominence, min_distance
            )
            labels = watershed(-distance, markers, mask=foreground)
    elif task == "foreground_boundary":
        foreground = probs[0] > threshold
        if roi is not None:
            foreground &= roi
        foreground = fill_holes(remove_small_objects(foreground, min_size))
        boundary = probs[1].astype(np.float32)
        seed_cut = threshold if seed_threshold is None else seed_threshold
        seeds, _ = ndi.label(foreground & (boundary < seed_cut))
        seeds = remove_small_objects(seeds, min_seed_size)
        if method == "connected_components":
            labels = seeds
        else:
            labels = watershed(boundary, seeds, mask=foreground)
            labels = _label_unreached(labels, foreground)
    else:  # membranes
        membrane = probs[0].astype(np.float32)
        cells = membrane < threshold
        if roi is not None:
            cells &= roi
        if method == "connected_components":
            labels, _ = ndi.label(cells)
        else:
            if object_radius is None:
                object_radius = estimate_radius(cells, sampling)
            labels = membrane_instances(membrane, threshold=threshold, sampling=sampling,
                                        object_radius=object_radius,
                                        seed_threshold=seed_threshold,
                                        merge_threshold=merge_threshold, roi=roi)

    if roi is not None:
        labels = np.where(roi, labels, 0)
    labels = remove_small_objects(np.asarray(labels), min_size)
    return relabel_sequential(labels)


def _label_unreached(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Give the parts of ``mask`` that the watershed did not reach their own new ids."""
    unreached = mask & (labels == 0)
    if not unreached.any():
        return labels
    extra, n = ndi.label(unreached)
    labels = labels.astype(np.int64)
    labels[extra > 0] = extra[extra > 0] + labels.max()
    return labels
