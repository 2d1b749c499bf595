"""Writing a prediction into the user's labels without losing their work.

The rules the Segment dock follows: the dtype of a new labels array, whether a result fits in
the array there, writing a block while leaving corrected slices alone, the array a whole-stack
run starts from, and when to ask before corrections or edits are overwritten. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from napari_unet.labels.slices import (
    Plane,
    free_runs,
    plane_in_range,
    plane_key,
    plane_name,
    plane_region,
    slice_list,
)

#: how a prediction goes into an existing labels array: everything but the corrected slices,
#: or everything
KEEP, OVERWRITE = "keep", "overwrite"


def labels_dtype(output: str, n_classes: int) -> np.dtype:
    """dtype of a labels layer for Segment's ``output``: uint8 for masks and up to 255 classes,
    else uint16 (also for instances; a result with more objects widens the layer).

    napari draws uint8/uint16 labels as they are; wider ids are hashed on the CPU at every
    redraw (~20-60 ms per 1024x1024 slice here), which would stall the viewer while tiles
    arrive.
    """
    if output != "instances" and n_classes <= 256:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16)


def fits_in_place(data: Any, dtype: np.dtype, largest: int) -> bool:
    """Whether labels of ``dtype`` (ids up to ``largest``) can be written into ``data`` as is."""
    if not isinstance(data, np.ndarray) or not data.flags.writeable:
        return False
    if not np.issubdtype(data.dtype, np.integer):
        return False
    if not (np.issubdtype(dtype, np.integer) or dtype == bool):
        return False
    return 0 <= largest <= np.iinfo(data.dtype).max


def write_unprotected(data: Any, region: tuple[slice, ...], values: np.ndarray,
                      protected: Iterable[Plane]) -> bool:
    """Write ``values`` into ``data[region]`` except the ``protected`` planes (z slices: ints;
    y and x planes: ``(axis, index)``, see :mod:`napari_unet.labels.slices`); returns whether
    anything was written. ``region`` holds slices with a start, one per axis of ``data``."""
    planes = slice_list(protected)
    zs = {p for p in planes if isinstance(p, int)}
    others = [plane_key(p) for p in planes if not isinstance(p, int)]
    if not planes:
        data[region] = values
        return True
    lead = max(0, len(region) - 3)
    if others:  # the block keeps what is there on the protected y/x planes it crosses
        kept = None
        for axis, index in others:
            cut = region[lead + axis]
            start, stop = cut.start or 0, cut.stop if cut.stop is not None else data.shape[lead + axis]
            if start <= index < stop:
                if kept is None:
                    kept = np.array(values, copy=True)
                at = (slice(None),) * (lead + axis) + (index - start,)
                kept[at] = np.asarray(data[region])[at]
        values = values if kept is None else kept
    if not zs:
        data[region] = values
        return True
    z0 = region[lead].start or 0
    wrote = False
    for lo, hi in free_runs(z0, z0 + values.shape[lead], zs):
        data[(*region[:lead], slice(lo, hi), *region[lead + 1:])] = \
            values[(slice(None),) * lead + (slice(lo - z0, hi - z0),)]
        wrote = True
    return wrote


def fresh_labels(old: Any, shape: Sequence[int], dtype: np.dtype,
                 kept: Iterable[Plane] = ()) -> np.ndarray:
    """The array a whole-stack run writes into: zeros in a dtype holding ``old``'s ids and
    ``dtype``'s, with the planes ``kept`` (corrected z, y or x slices) copied from ``old``."""
    new = np.zeros(tuple(shape), dtype=np.promote_types(old.dtype, dtype))
    for p in slice_list(kept):
        if plane_in_range(p, shape):
            where = plane_region(p, len(shape))
            new[where] = np.asarray(old[where])
    return new


@dataclass(frozen=True)
class WriteDecision:
    """How a run writes into an existing labels array: ``mode`` (:data:`KEEP` or
    :data:`OVERWRITE`), after a Yes to ``question`` when there is one (No: change nothing)."""

    mode: str
    question: str | None = None


def write_decision(mode: str, name: str, ndim: int, corrected: Sequence[Plane], z_range: range,
                   edited: bool) -> WriteDecision:
    """What a run in ``mode`` does to the labels ``name``, and what to ask first.

    ``corrected`` are the planes marked corrected (a 2D image: ``[0]`` when it is), ``z_range``
    the slices the run writes, ``edited`` whether the labels have edits. :data:`KEEP` leaves
    the corrected planes alone, and asks only when everything to write is corrected;
    :data:`OVERWRITE` asks when corrections or edits would be lost (a y or x plane: whenever
    the run writes some slices).
    """
    if ndim >= 3:
        planes = slice_list(corrected)
        hit = [z for z in planes if isinstance(z, int) and z in z_range]
        crossed = [p for p in planes if not isinstance(p, int)] if len(z_range) else []
        what = f"{len(hit) + len(crossed)} corrected slice(s) of {name!r}"
        if crossed:
            what += f" ({', '.join(plane_name(p) for p in crossed)})"
    else:
        hit = list(z_range) if corrected else []
        what = f"your corrections in {name!r}"
    if mode == KEEP:
        if hit and len(hit) == len(z_range):
            if ndim >= 3:
                text = (f"Everything to segment is marked corrected ({what}). Overwrite it? "
                        "(No: nothing is changed; choose 'new labels layer' to compare.)")
            else:
                text = (f"{name!r} is marked corrected. Overwrite your corrections? "
                        "(No: nothing is changed; choose 'new labels layer' to compare.)")
            return WriteDecision(OVERWRITE, text)
        return WriteDecision(KEEP)
    if ndim >= 3:
        hit = hit + crossed
    if hit or edited:
        text = (f"Overwrite {what if hit else 'the edits of ' + repr(name)}? "
                "Ctrl+Z undoes the run. (No: nothing is changed.)")
        return WriteDecision(OVERWRITE, text)
    return WriteDecision(OVERWRITE)
