"""Cells from a membrane (boundary) probability map, the way PlantSeg does it.

1. Seeds: maxima of the smoothed, anisotropy-aware distance transform of the cell interiors
   (voxels whose membrane probability is below the threshold); maxima closer than a fraction
   of the object radius are one seed.
2. A seeded watershed on the (lightly smoothed) membrane probability over the whole image, so
   the cells tile it.
3. Agglomeration: neighbouring regions are merged, lowest first, while the mean membrane
   probability along their shared border stays below ``merge_threshold``
   (:func:`skimage.graph.rag_boundary` + :func:`skimage.graph.merge_hierarchical`): a gap in a
   membrane leaves a low border, a real membrane a high one.

Sizes are physical (the units of ``sampling``) and relative to ``object_radius``, so one set of
parameters holds for images of other resolutions (see :func:`relative_settings`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage import graph
from skimage.segmentation import watershed

from napari_unet.labels.watershed import _check_sampling, _distance_transform

#: seeds: the distance transform is smoothed by this fraction of the object radius
SEED_SIGMA = 0.1
#: seeds: distance-transform maxima closer than this fraction of the object radius are one seed
SEED_DISTANCE = 0.4
#: watershed: the membrane probability is smoothed by this fraction of the object radius
WEIGHT_SIGMA = 0.05


def _voxel_units(value: float, sampling: tuple[float, ...] | None, ndim: int) -> np.ndarray:
    """A physical length (units of ``sampling``) in voxels per axis."""
    scale = np.ones(ndim) if sampling is None else np.asarray(sampling, dtype=float)
    return float(value) / scale


def membrane_seeds(cells: np.ndarray, sampling: tuple[float, ...] | None, object_radius: float,
                   seed_sigma: float = SEED_SIGMA, seed_distance: float = SEED_DISTANCE
                   ) -> np.ndarray:
    """Seeds at the maxima of the smoothed distance transform of ``cells`` (bool interiors).

    Returns int32 labels; seeds closer than ``seed_distance * object_radius`` merge."""
    ndim = cells.ndim
    distance = _distance_transform(cells, sampling)
    sigma = _voxel_units(seed_sigma * object_radius, sampling, ndim)
    if np.any(sigma > 0):
        distance = ndi.gaussian_filter(distance, sigma)
    # a box of half-width seed_distance * radius per axis (separable, so fast)
    half = np.floor(_voxel_units(seed_distance * object_radius, sampling, ndim)).astype(int)
    size = tuple(int(2 * h + 1) for h in np.maximum(half, 0))
    peaks = (distance == ndi.maximum_filter(distance, size=size, mode="nearest"))
    peaks &= cells & (distance > 0)
    # a plateau, or maxima within reach of each other inside one cell, is one seed
    half_size = tuple(int(h + 1) for h in np.maximum(half, 0) // 2)
    grown = ndi.maximum_filter(peaks, size=half_size) & cells
    seeds, _ = ndi.label(grown)
    return np.where(peaks, seeds, 0).astype(np.int32)


def _weight_boundary(rag: graph.RAG, src: int, dst: int, n: int) -> dict[str, float]:
    """Merged edge of ``src``+``dst`` to ``n``: the count-weighted mean boundary value."""
    default = {"weight": 0.0, "count": 0}
    a, b = rag[src].get(n, default), rag[dst].get(n, default)
    count = a["count"] + b["count"]
    weight = (a["count"] * a["weight"] + b["count"] * b["weight"]) / max(count, 1)
    return {"count": count, "weight": weight}


def _merge_nothing(rag: graph.RAG, src: int, dst: int) -> None:
    """Node data needs no update: edge weights come from :func:`_weight_boundary`."""


def agglomerate(labels: np.ndarray, membrane: np.ndarray, merge_threshold: float) -> np.ndarray:
    """Merge neighbouring regions while the mean ``membrane`` along their border is below
    ``merge_threshold`` (lowest border first). Label 0 takes no part."""
    if labels.max() < 2 or merge_threshold <= 0:
        return labels
    rag = graph.rag_boundary(labels, membrane.astype(np.float64), connectivity=1)
    if rag.has_node(0):
        rag.remove_node(0)
    merged = graph.merge_hierarchical(labels, rag, thresh=merge_threshold, rag_copy=False,
                                      in_place_merge=True, merge_func=_merge_nothing,
                                      weight_func=_weight_boundary)
    # merge_hierarchical numbers from 0; keep 0 for what was background
    return np.where(labels > 0, merged + 1, 0)


def membrane_instances(membrane: np.ndarray, *, threshold: float, object_radius: float,
                       sampling: float | Sequence[float] | None = None,
                       seed_threshold: float | None = None,
                       merge_threshold: float | None = None,
                       seed_sigma: float = SEED_SIGMA, seed_distance: float = SEED_DISTANCE,
                       weight_sigma: float = WEIGHT_SIGMA,
                       roi: np.ndarray | None = None) -> np.ndarray:
    """Cells tiling the image, from the membrane probability (PlantSeg's DT watershed + RAG
    agglomeration). ``object_radius`` is in the units of ``sampling`` (voxels without it).

    Parameters
    ----------
    membrane : numpy.ndarray
        Membrane probability, spatial shape.
    threshold : float
        Voxels with ``membrane < threshold`` are cell interior (for the distance transform).
    object_radius : float
        Typical cell radius; seed smoothing and spacing scale with it.
    sampling : float or sequence of float, optional
        Voxel size per axis (anisotropy-aware distances).
    seed_threshold : float, optional
        Interior cut for the seeds only (default ``threshold``).
    merge_threshold : float, optional
        Regions merge while their border's mean membrane probability is below it (default
        ``threshold``); 0 turns agglomeration off.
    roi : numpy.ndarray, optional
        Bool region; outside it is background.

    Returns
    -------
    numpy.ndarray
        int64 labels (not relabelled; 0 only outside ``roi``).
    """
    membrane = np.asarray(membrane, dtype=np.float32)
    ndim = membrane.ndim
    sampling = _check_sampling(sampling, ndim)
    cut = threshold if seed_threshold is None else seed_threshold
    cells = membrane < cut
    if roi is not None:
        cells &= roi
    seeds = membrane_seeds(cells, sampling, object_radius, seed_sigma, seed_distance)
    if not seeds.any():
        return np.where(roi, 1, 0) if roi is not None else np.ones(membrane.shape, np.int64)
    sigma = _voxel_units(weight_sigma * object_radius, sampling, ndim)
    height = ndi.gaussian_filter(membrane, sigma) if np.any(sigma >= 0.5) else membrane
    labels = watershed(height, seeds, mask=roi).astype(np.int64)
    merge = threshold if merge_threshold is None else merge_threshold
    return agglomerate(labels, membrane, merge)


def estimate_radius(cells: np.ndarray, sampling: float | Sequence[float] | None = None) -> float:
    """Median equivalent radius of the connected components of ``cells`` (bool), in the units
    of ``sampling``: a fallback when the model does not know its objects' size."""
    sampling = _check_sampling(sampling, cells.ndim)
    components, n = ndi.label(cells)
    unit = float(np.prod(sampling)) if sampling else 1.0
    if n == 0:
        return 0.5 * min(cells.shape) * (unit ** (1 / cells.ndim))
    sizes = np.bincount(components.ravel())[1:]
    return equivalent_diameter(float(np.median(sizes)) * unit, cells.ndim) / 2


def equivalent_diameter(size: float, ndim: int) -> float:
    """Diameter of the disk (2D) or ball (3D) of area / volume ``size``."""
    if ndim == 2:
        return float(2.0 * np.sqrt(size / np.pi))
    return float((6.0 * size / np.pi) ** (1.0 / 3.0))
