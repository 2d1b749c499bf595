"""Turn network probabilities into masks and instance labels, and edit label images.

The network outputs probabilities with shape ``(C, *spatial)`` for one of the model
:data:`TASKS`:

``"foreground"``
    ``C == 1``: p(foreground), e.g. nuclei.
``"foreground_boundary"``
    ``C == 2``: channel 0 = p(foreground), channel 1 = p(boundary between touching objects).
``"membranes"``
    ``C == 1``: p(membrane); cells are the regions between membranes and tile the image.
``"semantic"``
    ``C == K + 1``: softmax over the classes ``0..K`` (0 = background).

Every function works on 2D and 3D arrays and never modifies its input.  Label images use
unsigned integer dtypes, as small as the largest id allows (:func:`smallest_uint_dtype`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from .io import smallest_label_dtype

TASKS = ("foreground", "foreground_boundary", "membranes", "semantic")
METHODS = ("watershed", "connected_components")

Task = Literal["foreground", "foreground_boundary", "membranes", "semantic"]
Method = Literal["watershed", "connected_components"]

#: Label images whose largest id is at most this (or at most 4x their size) are handled with
#: lookup tables indexed by id; larger ids fall back to sorting with ``np.unique``.
_MAX_LUT_ID = 1 << 26
# smallest object kept by default: below this, seeds and specks are noise, not objects
DEFAULT_MIN_SIZE = 16


# ----------------------------------------------------------------------------------------------
# dtype and label bookkeeping
# ----------------------------------------------------------------------------------------------


# one rule for label dtypes across the package (io writes what postprocess makes)
smallest_uint_dtype = smallest_label_dtype


def _as_label_array(labels: np.ndarray) -> np.ndarray:
    """Check that ``labels`` is a bool or non-negative integer array and return it as ndarray."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels must be a bool or integer array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.signedinteger) and arr.size and arr.min() < 0:
        raise ValueError("labels must be non-negative")
    return arr


def _uses_lut(arr: np.ndarray) -> bool:
    """Whether ids of ``arr`` are small enough for lookup tables indexed by id."""
    if arr.size == 0:
        return True
    max_id = int(arr.max())
    return max_id <= _MAX_LUT_ID or max_id <= 4 * arr.size


#: elements per ``np.bincount`` call in :func:`chunked_bincount`
BINCOUNT_CHUNK = 1 << 22


def chunked_bincount(values: np.ndarray, chunk: int = BINCOUNT_CHUNK) -> np.ndarray:
    """``np.bincount(values.ravel())`` of non-negative integers, computed a chunk at a time.

    Equal to ``np.bincount``; ``np.bincount`` holds the interpreter lock for its whole run
    (0.5 s on 10^8 voxels), which freezes a GUI running it in a thread; each chunk here takes
    a few milliseconds, and the ids are cast to ``intp`` a chunk at a time (no 8-byte copy of
    the whole array).
    """
    flat = np.asarray(values).reshape(-1)
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64)
    counts = np.zeros(int(flat.max()) + 1, dtype=np.int64)
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk].astype(np.intp, copy=False)
        part_counts = np.bincount(part)
        counts[:part_counts.size] += part_counts
    return counts


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


def _label_sizes(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nonzero ids present in ``arr`` (sorted) and their voxel counts."""
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if _uses_lut(arr):
        counts = chunked_bincount(arr)
        ids = np.flatnonzero(counts)
        ids = ids[ids != 0]
        return ids, counts[ids]
    ids, counts = np.unique(arr, return_counts=True)
    keep = ids != 0
    return ids[keep], counts[keep]


def _isin_ids(arr: np.ndarray, ids: Iterable[int]) -> np.ndarray:
    """Boolean mask of the voxels of ``arr`` whose id is in ``ids``."""
    ids = np.asarray(list(ids), dtype=np.int64).ravel()
    if ids.size == 0 or arr.size == 0:
        return np.zeros(arr.shape, dtype=bool)
    if _uses_lut(arr):
        max_id = int(arr.max())
        lut = np.zeros(max_id + 1, dtype=bool)
        ids = ids[(ids >= 0) & (ids <= max_id)]
        lut[ids] = True
        return lut[arr]
    return np.isin(arr, ids)


def _compact(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel ``arr`` to ``1..N`` (smallest dtype); also return the original id of each new id.

    ``original_ids[k - 1]`` is the id that became ``k``.
    """
    if arr.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8), np.zeros(0, dtype=np.int64)
    if _uses_lut(arr):
        ids, _ = _label_sizes(arr)
        dtype = smallest_uint_dtype(len(ids))
        lut = np.zeros(int(arr.max()) + 1, dtype=dtype)
        lut[ids] = np.arange(1, len(ids) + 1, dtype=dtype)
        return lut[arr], ids
    uniq, inverse = np.unique(arr, return_inverse=True)
    inverse = inverse.reshape(arr.shape)
    if uniq[0] != 0:
        inverse = inverse + 1
    else:
        uniq = uniq[1:]
    return inverse.astype(smallest_uint_dtype(len(uniq))), uniq.astype(np.int64)


def _with_capacity(labels: np.ndarray, max_id: int) -> np.ndarray:
    """Copy of ``labels`` in a dtype that can also hold ``max_id``."""
    dtype = labels.dtype
    if dtype == bool:
        dtype = np.dtype(np.uint8)
    if max_id > np.iinfo(dtype).max:
        dtype = np.promote_types(dtype, smallest_uint_dtype(max_id))
    return labels.astype(dtype, copy=True)


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Renumber the objects of a label image to ``1..N``, keeping their order.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer label image (0 = background); a bool mask is returned as ``uint8`` 0/1.

    Returns
    -------
    numpy.ndarray
        New label image in the smallest unsigned dtype that holds ``N``.
    """
    arr = _as_label_array(labels)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    return _compact(arr)[0]


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
    seed_erosion: float = 1.0,
    mask: np.ndarray | None = None,
    min_seed_size: int | None = None,
    seed_threshold: float | None = None,
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
        Cells = ``p(membrane) < t``; seeds = components of the cells eroded by
        ``seed_erosion``; ``"watershed"``: grow them on the membrane probability over the whole
        image (cells tile it); ``"connected_components"``: label the cells without growing.
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
    seed_erosion : float
        ``"membranes"``: seeds keep the cell voxels farther than this from a membrane.
    mask : numpy.ndarray, optional
        Region of interest (spatial shape); voxels outside are background.
    min_seed_size : int, optional
        Watershed seeds smaller than this are dropped (default ``min_size // 4``); streamed
        chunks set it while keeping ``min_size=0``, since objects cut by a chunk border are
        only measured after merging.
    seed_threshold : float, optional
        ``"foreground_boundary"``: seeds are where ``boundary < seed_threshold``;
        ``"membranes"``: seeds come from ``membrane < seed_threshold`` (then eroded). Default:
        ``threshold``. A lower value splits touching objects more readily.

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
            seed_cells = cells if seed_threshold is None else (membrane < seed_threshold)
            if roi is not None:
                seed_cells &= roi
            interior = _distance_transform(seed_cells, sampling) > seed_erosion
            seeds, _ = ndi.label(interior)
            seeds = remove_small_objects(seeds, min_seed_size)
            if not seeds.any():  # erosion removed everything: use the cells themselves
                seeds, _ = ndi.label(cells)
            labels = watershed(membrane, seeds, mask=roi)

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


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


def label_statistics(
    labels: np.ndarray, voxel_size: float | Sequence[float] | None = None
) -> dict[str, float | int]:
    """Count and measure the objects of a label image.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer instance labels, or a bool mask (objects = connected components).
    voxel_size : float or sequence of float, optional
        Voxel size per axis; volumes are in voxels when ``None``.

    Returns
    -------
    dict
        ``objects`` (count), ``voxels`` (foreground voxels), ``volume`` (calibrated),
        ``mean_voxels`` and ``mean_volume`` (per object, 0 without objects).
    """
    arr = _as_label_array(labels)
    if arr.dtype == bool:
        n_objects = int(ndi.label(arr)[1])
        n_voxels = int(np.count_nonzero(arr))
    else:
        ids, sizes = _label_sizes(arr)
        n_objects = len(ids)
        n_voxels = int(sizes.sum())
    spacing = _check_sampling(voxel_size, arr.ndim)
    voxel_volume = float(np.prod(spacing)) if spacing else 1.0
    volume = n_voxels * voxel_volume
    return {
        "objects": n_objects,
        "voxels": n_voxels,
        "volume": volume,
        "mean_voxels": n_voxels / n_objects if n_objects else 0.0,
        "mean_volume": volume / n_objects if n_objects else 0.0,
    }
