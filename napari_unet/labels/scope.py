"""Where an edit of a labels array applies, and how it is run there.

An edit's *scope* is either one slice of a stack (the slice on screen, edited as a 2D image)
or the whole array (a 2D image, or a stack edited in 3D). This module holds the rules the Edit
dock follows, as plain functions on arrays: the region of a scope, the seed points inside it
and the labels under them, the label ids the user typed, running an operation on a slice, and
the whole-stack job that runs in a worker thread. numpy only; no viewer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Generator, Iterable, Sequence

import numpy as np

#: an edit operation: labels block in, labels block of the same shape out
Operation = Callable[[np.ndarray], np.ndarray]


def parse_ids(text: str) -> list[int]:
    """``"3, 7 12"`` → ``[3, 7, 12]``; raises ValueError on anything else."""
    parts = [p for p in re.split(r"[\s,;]+", text.strip()) if p]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"label ids must be whole numbers like '3, 7', got {text!r}") from None
    if any(i < 0 for i in ids):
        raise ValueError("label ids must be positive")
    return ids


def chosen_ids(text: str, under_seeds: Sequence[int], selected: int) -> list[int]:
    """The labels an operation acts on: those typed (``text``), else those under the seed
    points, else the selected label."""
    if text.strip():
        return parse_ids(text.strip())
    if under_seeds:
        return list(under_seeds)
    return [int(selected)]


def split_target(text: str, seeds: Sequence[Sequence[float]], under_seeds: Sequence[int],
                 selected: int) -> int:
    """The label Split cuts: the first typed id, else the label under the first seed, else the
    selected label. Raises ValueError (bad text) or IndexError (nothing typed or under the
    seeds)."""
    if text.strip():
        return parse_ids(text.strip())[0]
    if seeds:
        return list(under_seeds)[0]
    return int(selected)


@dataclass(frozen=True)
class EditScope:
    """The part of a labels array an edit works on.

    ``z`` is the slice index when the scope is one slice of a stack (the slice is edited as a
    2D image), None when it is the whole array.
    """

    region: tuple[slice, ...]
    z: int | None = None

    @property
    def is_slice(self) -> bool:
        return self.z is not None

    def where(self, ndim: int) -> str:
        """``"slice 3"``, ``"whole stack"`` or ``"image"`` (for the status line)."""
        if self.z is not None:
            return f"slice {self.z}"
        return "whole stack" if ndim >= 3 else "image"


def whole_scope(shape: Sequence[int]) -> EditScope:
    """The whole array."""
    return EditScope(tuple(slice(0, int(n)) for n in shape), None)


def edit_scope(shape: Sequence[int], z: int | None) -> EditScope:
    """Slice ``z`` (along the third axis from the end) of an array of ``shape``, or the whole
    array when ``z`` is None or the array has fewer than 3 dimensions."""
    full = whole_scope(shape)
    if z is None or len(shape) < 3:
        return full
    region = list(full.region)
    region[-3] = slice(int(z), int(z) + 1)
    return EditScope(tuple(region), int(z))


def seeds_in_scope(points: Iterable[Sequence[float]], shape: Sequence[int],
                   z: int | None) -> list[tuple[float, ...]]:
    """Seed points (in the labels' data coordinates, one row per point) that fall inside the
    array; with a slice scope only those on slice ``z``, their z coordinate set to 0."""
    ndim = len(shape)
    seeds = []
    for point in points:
        coords = np.asarray(point, dtype=float)[-ndim:]
        index = np.round(coords).astype(int)
        if np.any(index < 0) or np.any(index >= tuple(shape)):
            continue
        if z is not None:
            if index[-3] != z:
                continue
            coords = coords.copy()
            coords[-3] = 0
        seeds.append(tuple(float(c) for c in coords))
    return seeds


def labels_under_seeds(data: np.ndarray, seeds: Iterable[Sequence[float]],
                       z: int | None) -> list[int]:
    """The nonzero labels under ``seeds`` (from :func:`seeds_in_scope`), each once, in order."""
    ids: list[int] = []
    for seed in seeds:
        index = tuple(int(round(c)) for c in seed)
        if z is not None:
            index = (*index[:-3], z, *index[-2:])
        value = int(data[index])
        if value and value not in ids:
            ids.append(value)
    return ids


def seeds_in_slice(seeds: Iterable[Sequence[float]], z: int | None) -> list[tuple[float, ...]]:
    """Seeds in the coordinates of the edited block: the z coordinate dropped for a slice."""
    if z is None:
        return [tuple(s) for s in seeds]
    return [tuple(s[:-3]) + tuple(s[-2:]) for s in seeds]


def seed_index(seed: Sequence[float], z: int | None) -> tuple[int, ...]:
    """The array index of a seed given in block coordinates (see :func:`seeds_in_slice`)."""
    index = tuple(int(round(c)) for c in seed)
    if z is not None:
        index = (*index[:-2], z, *index[-2:])
    return index


def seeds_on_label(data: np.ndarray, seeds: Iterable[Sequence[float]], z: int | None,
                   label_id: int) -> list[tuple[float, ...]] | None:
    """The block-coordinate ``seeds`` that lie on ``label_id``; None when none do (Split is
    then automatic)."""
    on = [tuple(s) for s in seeds if int(data[seed_index(s, z)]) == label_id]
    return on or None


def scope_spacing(scale: Sequence[float], ndim: int, z: int | None) -> tuple[float, ...]:
    """Voxel spacing of the edited block: the layer's ``scale`` (its last ``ndim`` values),
    without the z spacing for a slice."""
    spacing = tuple(float(s) for s in scale[-ndim:])
    if z is not None:
        spacing = spacing[:-3] + spacing[-2:]
    return spacing


def run_on_scope(before: np.ndarray, z: int | None, operation: Operation) -> np.ndarray:
    """Run ``operation`` on the scope's values ``before``: a slice is given to it as a 2D image
    (the singleton z axis removed, then put back)."""
    block = before[..., 0, :, :] if z is not None else before
    result = np.asarray(operation(block))
    return result[..., None, :, :] if z is not None else result


def slice_id_offset(data: np.ndarray, z: int) -> int:
    """The largest id in the slices other than ``z``: new objects of slice ``z`` are numbered
    after it, so they do not take the ids of objects elsewhere in the stack."""
    return max(int(np.max(data[..., :z, :, :], initial=0)),
               int(np.max(data[..., z + 1:, :, :], initial=0)))


def offset_new_ids(block: np.ndarray, offset: int, dtype: np.dtype) -> np.ndarray:
    """``block``'s nonzero ids shifted by ``offset``, in a dtype holding ``dtype``'s ids too."""
    out = block.astype(np.promote_types(block.dtype, dtype))
    out[out > 0] += offset
    return out


def result_in_dtype(result: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``result`` in the layer's ``dtype`` when its ids fit (wider otherwise)."""
    if result.dtype == dtype:
        return result
    if result.dtype == bool or not np.issubdtype(dtype, np.integer):
        return result.astype(dtype)
    largest = int(result.max(initial=0))
    if largest <= np.iinfo(dtype).max and int(result.min(initial=0)) >= 0:
        return result.astype(dtype)
    return result.astype(np.promote_types(dtype, result.dtype))


def whole_stack_job(data: np.ndarray, operation: Operation,
                    description: str) -> Generator[str, None, np.ndarray | None]:
    """A whole-array edit as a job (run in a worker thread): yields its stage (``computing``,
    ``comparing``); returns the new array in ``data``'s dtype where the ids fit, or None when
    nothing changed. ``data`` is only read."""
    yield "computing"
    result = np.asarray(operation(np.asarray(data)))
    yield "comparing"
    if result.shape != data.shape:
        raise ValueError(f"{description}: result has shape {result.shape}, expected {data.shape}")
    if np.array_equal(result, data):
        return None
    return result_in_dtype(result, data.dtype)
