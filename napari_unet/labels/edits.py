"""Editing operations on label images: remove small objects, fill holes, delete, merge, split."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from napari_unet.labels.dtypes import (
    _as_label_array,
    _compact,
    _isin_ids,
    _label_sizes,
    _with_capacity,
    chunked_bincount,
    smallest_uint_dtype,
)
from napari_unet.labels.watershed import (
    _check_sampling,
    _distance_markers,
    _distance_transform,
    _principal_axis_seeds,
)


def fill_binary_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)`` (default structure), computed by labelling.

    The holes are the background components (face connectivity) that do not touch the array's
    border. The same result as scipy's iterated dilation, several times faster on large
    volumes, and without holding the interpreter lock for long (scipy's dilation holds it for
    ~0.15 s per iteration on 10^8 voxels).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0 or mask.ndim == 0:
        return mask.copy()
    components, n = ndi.label(~mask)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, dtype=bool)
    for axis in range(mask.ndim):
        for index in (0, -1):
            face = np.take(components, index, axis=axis)
            outside[np.unique(face)] = True
    outside[0] = True  # 0 = the mask itself
    return mask | ~outside[components]


def binary_to_instances(mask: np.ndarray, connectivity: int | None = None) -> np.ndarray:
    """Label the connected components of a mask.

    Parameters
    ----------
    mask : numpy.ndarray
        Binary mask (nonzero = foreground).
    connectivity : int, optional
        Neighbourhood: 1 (faces, default) up to ``mask.ndim`` (full).

    Returns
    -------
    numpy.ndarray
        Labels ``1..N`` in the smallest unsigned dtype.
    """
    binary = np.asarray(mask) != 0
    structure = None
    if connectivity is not None:
        structure = ndi.generate_binary_structure(binary.ndim, connectivity)
    components, n = ndi.label(binary, structure=structure)
    return components.astype(smallest_uint_dtype(n))


def instances_to_binary(labels: np.ndarray) -> np.ndarray:
    """Foreground mask (``labels != 0``) of a label image."""
    return np.asarray(labels) != 0


# ----------------------------------------------------------------------------------------------
# cleaning
# ----------------------------------------------------------------------------------------------


def remove_small_objects(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Remove the objects with fewer than ``min_size`` voxels.

    Parameters
    ----------
    labels : numpy.ndarray
        Bool mask (objects = connected components, face connectivity) or integer instance
        labels (objects = ids; the remaining ids are kept as they are).
    min_size : int
        Smallest object size kept, in voxels.

    Returns
    -------
    numpy.ndarray
        New array of the same dtype.
    """
    arr = _as_label_array(labels)
    if arr.dtype == bool:
        components, _ = ndi.label(arr)
        sizes = chunked_bincount(components)
        keep = sizes >= min_size
        keep[0] = False
        return keep[components]
    out = arr.copy()
    ids, sizes = _label_sizes(arr)
    small = ids[sizes < min_size]
    if small.size:
        out[_isin_ids(arr, small)] = 0
    return out


def fill_holes(labels: np.ndarray) -> np.ndarray:
    """Fill the holes of each object.

    Parameters
    ----------
    labels : numpy.ndarray
        Bool mask or integer instance labels, 2D or 3D (3D holes are enclosed 3D cavities).
        For instance labels a background hole enclosed by object ``k`` alone gets ``k``;
        other objects inside the hole are kept.

    Returns
    -------
    numpy.ndarray
        New array of the same dtype.
    """
    arr = _as_label_array(labels)
    if arr.dtype == bool:
        return fill_binary_holes(arr)
    out = arr.copy()
    background = arr == 0
    holes = fill_binary_holes(~background) & background
    if not holes.any():
        return out
    compact, original_ids = _compact(arr)
    for index, box in enumerate(ndi.find_objects(compact)):
        if box is None:
            continue
        crop = compact[box]
        if not holes[box].any():
            continue
        filled = ndi.binary_fill_holes(crop == index + 1) & (crop == 0)
        if filled.any():
            out[box][filled] = original_ids[index]
    return out


# ----------------------------------------------------------------------------------------------
# editing
# ----------------------------------------------------------------------------------------------


def delete_label(labels: np.ndarray, label_id: int) -> np.ndarray:
    """Copy of ``labels`` with object ``label_id`` set to background."""
    arr = _as_label_array(labels)
    out = arr.copy()
    out[arr == label_id] = 0
    return out


def merge_labels(labels: np.ndarray, label_ids: Sequence[int]) -> np.ndarray:
    """Merge objects: all ``label_ids`` (background 0 ignored) become the smallest of them.

    Returns
    -------
    numpy.ndarray
        New label image of the same dtype.
    """
    arr = _as_label_array(labels)
    out = arr.copy()
    ids = sorted({int(i) for i in label_ids if int(i) != 0})
    if len(ids) < 2:
        return out
    out[_isin_ids(arr, ids[1:])] = ids[0]
    return out


def split_label(
    labels: np.ndarray,
    label_id: int,
    seeds: Sequence[Sequence[float]] | None = None,
    *,
    sampling: float | Sequence[float] | None = None,
    peak_prominence: float = 0.2,
) -> np.ndarray:
    """Split one object with a seeded watershed on its distance transform.

    Manual seeds use a compact watershed (distance transform plus distance to the seed), so
    that seeds off the object's centre still split it between them.  Automatic seeds are the
    prominent distance-transform maxima; an object with a single maximum is halved across its
    longest axis.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer instance labels.
    label_id : int
        Object to split.
    seeds : list of tuple, optional
        Seed coordinates (array indices, rounded), one per piece, all inside the object.
        ``None``: automatic seeds (see above).
    sampling : float or sequence of float, optional
        Voxel size, for an anisotropic distance transform.
    peak_prominence : float
        Automatic seeds only: see :func:`to_instances`.

    Returns
    -------
    numpy.ndarray
        New label image: the piece of the first seed keeps ``label_id``, the other pieces get
        new ids ``labels.max() + 1, ...`` (the dtype is widened if needed).  If fewer than two
        seeds can be placed, an unchanged copy.
    """
    arr = _as_label_array(labels)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    obj = arr == label_id
    if label_id == 0 or not obj.any():
        raise ValueError(f"label {label_id} is not in the label image")
    sampling = _check_sampling(sampling, arr.ndim)
    box = ndi.find_objects(obj.astype(np.uint8))[0]
    box = tuple(
        slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, arr.shape)
    )
    crop = obj[box]
    distance = _distance_transform(crop, sampling)

    # manual seeds need not sit at distance maxima: a compact watershed (distance transform
    # plus distance to the seed) keeps a seed on the object's flank from being flooded by one
    # near its centre
    compactness = 1.0
    if seeds is not None:
        markers = np.zeros(crop.shape, dtype=np.int32)
        for number, seed in enumerate(seeds, start=1):
            if len(seed) != arr.ndim:
                raise ValueError(f"seed {tuple(seed)} does not have {arr.ndim} coordinates")
            index = tuple(int(round(float(c))) for c in seed)
            local = tuple(i - s.start for i, s in zip(index, box))
            inside = all(0 <= i < n for i, n in zip(local, crop.shape))
            if not inside or not crop[local]:
                raise ValueError(f"seed {tuple(seed)} is not inside label {label_id}")
            if markers[local] == 0:
                markers[local] = number
        markers, seed_ids = _compact(markers)  # duplicate seeds collapse, order is kept
        n_markers = len(seed_ids)
    else:
        compactness = 0.0
        markers, n_markers = _distance_markers(crop, distance, sampling, peak_prominence)
        if n_markers < 2:  # one maximum only: halve the object along its long axis
            markers = _principal_axis_seeds(crop, sampling)
            n_markers = int(markers.max())
            compactness = 1.0
    if n_markers < 2:
        return arr.copy()

    pieces = watershed(-distance, markers, mask=crop, compactness=compactness)
    pieces[crop & (pieces == 0)] = 1  # parts of the object that no seed reached
    present = [k for k in range(2, n_markers + 1) if np.any(pieces == k)]
    next_id = int(arr.max()) + 1
    out = _with_capacity(arr, next_id + len(present) - 1)
    target = out[box]
    for offset, k in enumerate(present):
        target[pieces == k] = next_id + offset
    return out
