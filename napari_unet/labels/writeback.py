"""Writing a prediction into the user's labels without losing their work.

The rules the Segment dock follows: the dtype of a new labels array, whether a result fits in
the array there, writing a block while leaving corrected slices alone, the array a whole-stack
run starts from, and when to ask before corrections or edits are overwritten. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from napari_unet.labels.slices import free_runs

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
                      protected: set[int]) -> bool:
    """Write ``values`` into ``data[region]`` except the ``protected`` first-axis slices;
    returns whether anything was written."""
    if not protected:
        data[region] = values
        return True
    z0 = region[0].start
    wrote = False
    for lo, hi in free_runs(z0, z0 + values.shape[0], protected):
        data[(slice(lo, hi), *region[1:])] = values[lo - z0:hi - z0]
        wrote = True
    return wrote


def fresh_labels(old: Any, shape: Sequence[int], dtype: np.dtype,
                 kept: Iterable[int] = ()) -> np.ndarray:
    """The array a whole-stack run writes into: zeros in a dtype holding ``old``'s ids and
    ``dtype``'s, with the slices ``kept`` (corrected ones) copied from ``old``."""
    new = np.zeros(tuple(shape), dtype=np.promote_types(old.dtype, dtype))
    for z in kept:
        if 0 <= z < shape[0]:
            new[z] = np.asarray(old[z])
    return new


@dataclass(frozen=True)
class WriteDecision:
    """How a run writes into an existing labels array: ``mode`` (:data:`KEEP` or
    :data:`OVERWRITE`), after a Yes to ``question`` when there is one (No: change nothing)."""

    mode: str
    question: str | None = None


def write_decision(mode: str, name: str, ndim: int, corrected: Sequence[int], z_range: range,
                   edited: bool) -> WriteDecision:
    """What a run in ``mode`` does to the labels ``name``, and what to ask first.

    ``corrected`` are the slices marked corrected (a 2D image: ``[0]`` when it is), ``z_range``
    the slices the run writes, ``edited`` whether the labels have edits. :data:`KEEP` leaves
    the corrected slices alone, and asks only when everything to write is corrected;
    :data:`OVERWRITE` asks when corrections or edits would be lost.
    """
    if ndim >= 3:
        hit = [z for z in corrected if z in z_range]
        what = f"{len(hit)} corrected slice(s) of {name!r}"
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
    if hit or edited:
        text = (f"Overwrite {what if hit else 'the edits of ' + repr(name)}? "
                "Ctrl+Z undoes the run. (No: nothing is changed.)")
        return WriteDecision(OVERWRITE, text)
    return WriteDecision(OVERWRITE)
