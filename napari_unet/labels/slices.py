"""Slice bookkeeping of a labels stack: which slices a paint stroke touched, which slices are
marked corrected, and the runs of slices that may be written. Plain Python and numpy."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np


def slice_list(slices: Iterable[Any]) -> list[int]:
    """``slices`` as sorted, distinct ints (how corrected slices are stored)."""
    return sorted({int(z) for z in slices})


def touched_slices(atoms: Any, ndim: int) -> set[int]:
    """First-axis indices (the third axis from the end) touched by napari paint history atoms.

    An atom is ``(slice_key, old_values, new_value)`` or has a ``slice_key``; the key indexes a
    3D (or higher) labels array with slices, index arrays or ints.
    """
    touched: set[int] = set()
    for atom in atoms or []:
        key = getattr(atom, "slice_key", None)
        if key is None and isinstance(atom, tuple) and atom:
            key = atom[0]
        if key is None or len(key) < ndim:
            continue
        first = key[len(key) - 3] if ndim >= 3 else None
        if isinstance(first, slice):
            start, stop = first.start or 0, first.stop
            if stop is not None:
                touched.update(range(int(start), int(stop)))
        elif isinstance(first, np.ndarray):
            touched.update(int(v) for v in np.unique(first))
        elif first is not None:
            touched.add(int(first))
    return touched


def clip_index(value: float, length: int) -> int:
    """The index nearest to ``value`` on an axis of ``length``."""
    return int(np.clip(round(float(value)), 0, length - 1))


def clip_point(point: Sequence[float], shape: Sequence[int]) -> tuple[int, ...]:
    """The index nearest to ``point`` in an array of ``shape`` (the last ``len(shape)`` values)."""
    point = list(point)[-len(shape):]
    return tuple(clip_index(v, n) for v, n in zip(point, shape))


def free_runs(start: int, stop: int, protected: set[int]) -> list[tuple[int, int]]:
    """The runs ``[lo, hi)`` of ``range(start, stop)`` that contain no index of ``protected``."""
    runs, lo = [], None
    for z in range(start, stop):
        if z in protected:
            if lo is not None:
                runs.append((lo, z))
                lo = None
        elif lo is None:
            lo = z
    if lo is not None:
        runs.append((lo, stop))
    return runs


def marks_outside(marks: Iterable[int], z_range: range) -> list[int]:
    """The corrected-slice ``marks`` left after the slices of ``z_range`` are overwritten."""
    return [int(z) for z in marks if z not in z_range]
