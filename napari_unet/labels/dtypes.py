"""Label dtypes and fast label bookkeeping: the smallest dtype, chunked bincounts, relabelling."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def smallest_label_dtype(max_label: int) -> np.dtype:
    """The smallest unsigned integer dtype holding labels ``0..max_label``.

    Parameters
    ----------
    max_label : int
        Largest label value (>= 0).

    Returns
    -------
    numpy.dtype
        uint8, uint16, uint32 or uint64.
    """
    max_label = int(max_label)
    if max_label < 0:
        raise ValueError(f"labels must be >= 0, got max label {max_label}")
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"max label {max_label} does not fit in uint64")


#: Label images whose largest id is at most this (or at most 4x their size) are handled with
#: lookup tables indexed by id; larger ids fall back to sorting with ``np.unique``.
_MAX_LUT_ID = 1 << 26


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
