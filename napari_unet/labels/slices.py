"""Slice bookkeeping of a labels stack: which slices a paint stroke touched, which slices are
marked corrected, and the runs of slices that may be written. Plain Python and numpy.

A corrected slice is a *plane* of a stack (Z, Y, X): an int ``z`` for a slice along z (as
napari shows a stack by default), or a pair ``(axis, index)`` with ``axis`` 1 (a slice along
y, seen when napari shows the axes z and x) or 2 (along x). :func:`plane` writes every plane
in this one form (``(0, 12)`` becomes ``12``), so z-only lists stay lists of ints.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence, Union

import numpy as np

#: names of the three axes of a stack, as the lists show them (``z 12``, ``y 40``, ``x 7``)
AXIS_NAMES = ("z", "y", "x")

#: a corrected plane: ``z`` (an int) or ``(axis, index)`` with ``axis`` 1 (y) or 2 (x)
Plane = Union[int, tuple[int, int]]


def plane(value: Any) -> Plane:
    """``value`` as a :data:`Plane`: an int (a z slice) or ``(axis, index)`` with ``axis`` 1
    or 2. Accepts ints, ``(axis, index)`` pairs (``axis`` 0-2 or ``"z"``/``"y"``/``"x"``)
    and lists of two; ValueError otherwise."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, (tuple, list, np.ndarray)) and len(value) == 2:
        axis, index = value
        if isinstance(axis, str):
            if axis.lower() not in AXIS_NAMES:
                raise ValueError(f"unknown axis {axis!r}: expected z, y or x")
            axis = AXIS_NAMES.index(axis.lower())
        axis, index = int(axis), int(index)
        if axis not in (0, 1, 2):
            raise ValueError(f"axis {axis} of a plane: expected 0 (z), 1 (y) or 2 (x)")
        return index if axis == 0 else (axis, index)
    raise ValueError(f"not a slice: {value!r} (expected z or (axis, index))")


def plane_key(value: Plane) -> tuple[int, int]:
    """``(axis, index)`` of a plane (a z slice: ``(0, z)``)."""
    p = plane(value)
    return (0, p) if isinstance(p, int) else p


def plane_name(value: Plane) -> str:
    """A plane in words: ``z 12``, ``y 40``, ``x 7``."""
    axis, index = plane_key(value)
    return f"{AXIS_NAMES[axis]} {index}"


def plane_label(value: Plane) -> str:
    """A plane in a list of slices: ``12`` for a z slice (as z-only lists always read),
    ``y 40``, ``x 7`` for the others."""
    p = plane(value)
    return str(p) if isinstance(p, int) else plane_name(p)


def plane_region(value: Plane, ndim: int = 3) -> tuple[Any, ...]:
    """The index of a plane in an array whose last three axes are (Z, Y, X)."""
    axis, index = plane_key(value)
    return (slice(None),) * (ndim - 3 + axis) + (index,)






def z_slices(planes: Iterable[Any]) -> list[int]:
    """The z slices among ``planes``, sorted."""
    return [p for p in slice_list(planes) if isinstance(p, int)]


def plane_in_range(value: Plane, shape: Sequence[int]) -> bool:
    """Whether a plane lies in a stack of ``shape`` (its last three axes)."""
    axis, index = plane_key(value)
    return len(shape) >= 3 and 0 <= index < shape[len(shape) - 3 + axis]


def planes_mask(shape: Sequence[int], planes: Iterable[Any]) -> np.ndarray:
    """Bool mask of ``shape`` (a stack): True on every plane of ``planes`` (their union)."""
    mask = np.zeros(tuple(shape), dtype=bool)
    for p in slice_list(planes):
        mask[plane_region(p, len(shape))] = True
    return mask


def slice_list(slices: Iterable[Any]) -> list[Plane]:
    """``slices`` as sorted, distinct planes (how corrected slices are stored): the z slices
    (ints) first, then ``(1, y)`` and ``(2, x)`` pairs. A z-only list is a list of ints."""
    keys = sorted({plane_key(p) for p in slices})
    return [index if axis == 0 else (axis, index) for axis, index in keys]




def touched_slices(atoms: Any, ndim: int, axis: int = 0) -> set[int]:
    """Indices along ``axis`` of the stack (0 = z: the third axis from the end, 1 = y, 2 = x)
    touched by napari paint history atoms.

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
        first = key[len(key) - 3 + axis] if ndim >= 3 else None
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


def marks_outside(marks: Iterable[Any], z_range: range,
                  region: Sequence[slice] | None = None) -> list[Plane]:
    """The corrected-slice ``marks`` left after the slices of ``z_range`` are overwritten.

    A y or x plane is left when the overwritten block (``z_range``, and ``region``'s last two
    axes when given) misses it: partly overwritten, it is no longer the user's.
    """
    left: list[Plane] = []
    for mark in slice_list(marks):
        axis, index = plane_key(mark)
        if axis == 0:
            hit = index in z_range
        else:
            hit = len(z_range) > 0
            if region is not None and len(region) >= 3:
                hit = hit and _in_slice(index, region[len(region) - 3 + axis])
        if not hit:
            left.append(mark)
    return left


def _in_slice(index: int, cut: slice) -> bool:
    return (cut.start is None or index >= cut.start) and (cut.stop is None or index < cut.stop)
