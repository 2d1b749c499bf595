"""Distance transforms and seeds for the watershed, shared by splitting and instance labelling."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from skimage.morphology import h_maxima


def _check_sampling(
    sampling: float | Sequence[float] | None, ndim: int
) -> tuple[float, ...] | None:
    if sampling is None:
        return None
    values = np.asarray(sampling, dtype=float)
    if values.ndim == 0:
        values = np.full(ndim, float(values))
    if values.shape != (ndim,):
        raise ValueError(f"sampling needs {ndim} values, got {tuple(np.ravel(sampling))}")
    if np.any(values <= 0):
        raise ValueError(f"sampling must be positive, got {tuple(values)}")
    return tuple(float(v) for v in values)


def _distance_transform(mask: np.ndarray, sampling: tuple[float, ...] | None) -> np.ndarray:
    """Euclidean distance to the background (the image border counts as background if the
    mask has no background at all)."""
    if mask.all():
        padded = np.pad(mask, 1, constant_values=False)
        distance = ndi.distance_transform_edt(padded, sampling=sampling)
        return distance[(slice(1, -1),) * mask.ndim].astype(np.float32)
    return ndi.distance_transform_edt(mask, sampling=sampling).astype(np.float32)


def _distance_markers(
    mask: np.ndarray,
    distance: np.ndarray,
    sampling: tuple[float, ...] | None,
    peak_prominence: float,
    min_distance: float | None = None,
) -> tuple[np.ndarray, int]:
    """Seeds for splitting touching round objects: prominent maxima of the distance transform.

    Within each connected component of ``mask`` a maximum is kept when it rises by at least
    ``peak_prominence`` times the component's radius (and at least one voxel) above the saddle
    to any higher maximum.  Maxima closer than ``min_distance`` (default: half the
    component's radius) are merged.  Every component gets at least one seed.
    """
    components, n_components = ndi.label(mask)
    markers = np.zeros(mask.shape, dtype=np.int32)
    n_markers = 0
    unit = min(sampling) if sampling else 1.0
    scale = np.asarray(sampling) if sampling else np.ones(mask.ndim)
    full = ndi.generate_binary_structure(mask.ndim, mask.ndim)
    for number, box in enumerate(ndi.find_objects(components), start=1):
        if box is None:
            continue
        component = components[box] == number
        local_distance = np.where(component, distance[box], 0).astype(np.float64)
        radius = float(local_distance.max())
        height = max(peak_prominence * radius, unit)
        peaks = None
        if radius > height:
            peaks = h_maxima(local_distance, height).astype(bool) & component
        if peaks is None or not peaks.any():
            peaks = np.zeros(component.shape, dtype=bool)
            peaks[np.unravel_index(np.argmax(local_distance), component.shape)] = True
        local, n_local = ndi.label(peaks, structure=full)
        if n_local > 1:
            limit = 0.5 * radius if min_distance is None else float(min_distance)
            centres = np.asarray(
                ndi.center_of_mass(peaks, local, np.arange(1, n_local + 1))
            ) * scale
            pairs = cKDTree(centres).query_pairs(limit, output_type="ndarray")
            if len(pairs):
                graph = coo_matrix(
                    (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n_local, n_local)
                )
                n_local, groups = connected_components(graph, directed=False)
                local = np.concatenate([[0], groups + 1]).astype(np.int32)[local]
        target = markers[box]
        target[peaks] = local[peaks] + n_markers
        n_markers += n_local
    return markers, n_markers


def _principal_axis_seeds(mask: np.ndarray, sampling: tuple[float, ...] | None) -> np.ndarray:
    """Two markers one standard deviation either side of the centroid along the longest axis
    of ``mask`` (snapped to the nearest voxel of the mask)."""
    markers = np.zeros(mask.shape, dtype=np.int32)
    coords = np.argwhere(mask)
    if len(coords) < 2:
        return markers
    scale = np.asarray(sampling) if sampling else np.ones(mask.ndim)
    points = coords * scale
    centre = points.mean(axis=0)
    _, singular_values, axes = np.linalg.svd(points - centre, full_matrices=False)
    spread = singular_values[0] / np.sqrt(len(points))
    if spread == 0:
        return markers
    for number, sign in enumerate((-1.0, 1.0), start=1):
        target = centre + sign * spread * axes[0]
        nearest = np.argmin(np.sum((points - target) ** 2, axis=1))
        markers[tuple(coords[nearest])] = number
    return markers
