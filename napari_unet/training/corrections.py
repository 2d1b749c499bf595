"""Training data from the user's corrections.

The user corrects some slices of a stack (or whole 2D images); fine-tuning trains on those.
This module turns what the user chose (images, labels arrays and their lists of corrected
slices) into :class:`~napari_unet.training.config.TrainingPair` s, with one note per pair
for the status line, and says whether a part of them can be held out to score the weights.
It also words the Edit dock's lists of corrected and suggested slices. numpy only; no viewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from napari_unet.labels.slices import (
    Plane,
    plane_in_range,
    plane_name,
    plane_region,
    slice_list,
)
from napari_unet.training.config import TrainingPair

#: the row of the corrected-slices list for a 2D image (it has no slices to mark)
WHOLE_IMAGE_ROW = "2D image: the whole image is used"


@dataclass
class CorrectionSource:
    """One image with its labels, as the user chose them (arrays, not viewer layers).

    ``image`` may be lazy (a dask array, read later in the worker); ``corrected`` is the list
    of slices marked as corrected in the labels (z slices as ints, y and x slices as
    ``(axis, index)``, see :mod:`napari_unet.labels.slices`); ``name`` names the labels in the
    notes.
    """

    image: Any
    labels: Any
    name: str
    corrected: Sequence[Plane] = ()


def is_lazy(data: Any) -> bool:
    """Whether ``data`` is a lazy (dask) array: read when computed, not painted in napari."""
    return hasattr(data, "compute") and hasattr(data, "dask")


def snapshot_labels(data: Any, slices: list[Plane] | None) -> Any:
    """A copy of a labels layer's array to train on, taken on the main thread.

    With ``slices`` only those planes (z, y or x slices) are copied, into an array that is zero elsewhere (never
    trained on: the loss only sees annotated voxels), so the copy costs what was corrected. A
    lazy (dask) array cannot be painted in napari and is returned as it is.
    """
    if is_lazy(data):
        return data
    if slices is None:
        return np.array(data, copy=True)
    snapshot = np.zeros(np.shape(data), dtype=data.dtype)
    for p in slice_list(slices):
        if plane_in_range(p, snapshot.shape):  # others: the Trainer says what is wrong
            where = plane_region(p, snapshot.ndim)
            snapshot[where] = data[where]
    return snapshot


def slices_to_train(labels_ndim: int, corrected: Sequence[Plane],
                    corrected_only: bool) -> list[Plane] | None:
    """The slices of a stack to train on: the corrected ones when ``corrected_only`` and some
    are marked; None (the whole array) for 2D labels, without marks, or when not asked."""
    if labels_ndim < 3 or not corrected_only:
        return None
    return slice_list(corrected) or None


def correction_pair(source: CorrectionSource,
                    corrected_only: bool) -> tuple[TrainingPair, str | None]:
    """The :class:`TrainingPair` of ``source`` (its labels a snapshot, see
    :func:`snapshot_labels`) and a note on which slices it trains on (None for 2D labels or
    when the whole stack was asked for)."""
    ndim = np.ndim(source.labels)
    slices = slices_to_train(ndim, source.corrected, corrected_only)
    note = None
    if ndim >= 3 and corrected_only:
        note = (f"no corrected slices in {source.name!r}: using the whole stack" if slices is None
                else f"{source.name}: {len(slices)} corrected slice(s)")
    pair = TrainingPair(image=source.image, labels=snapshot_labels(source.labels, slices),
                        slices=slices)
    return pair, note


def gather_training_pairs(sources: Iterable[CorrectionSource],
                          corrected_only: bool = True) -> tuple[list[TrainingPair], list[str]]:
    """TrainingPairs of ``sources`` and the notes for the status line (see
    :func:`correction_pair`). Raises ValueError when there are none."""
    pairs, notes = [], []
    for source in sources:
        pair, note = correction_pair(source, corrected_only)
        pairs.append(pair)
        if note is not None:
            notes.append(note)
    if not pairs:
        raise ValueError("no training data: choose an image and its labels layer")
    return pairs, notes


def parts(pair: TrainingPair) -> int:
    """How many parts ``pair`` can be split into for validation: its corrected slices, else
    the slices of a stack, else 1 (a 2D image)."""
    if pair.slices is not None:
        return len(pair.slices)
    shape = np.shape(pair.labels)
    return shape[0] if len(shape) >= 3 else 1


def validation_expected(pairs: Sequence[TrainingPair], hold_out: bool = True) -> bool:
    """Whether a part can be held out to score the weights: asked for (``hold_out``) and 2 or
    more parts (corrected slices or images) in all."""
    return bool(hold_out) and sum(parts(p) for p in pairs) >= 2


def with_slice(corrected: Iterable[Plane], z: Plane) -> set[Plane]:
    """The corrected slices with ``z`` (a z slice, or ``(axis, index)``) marked too."""
    return set(slice_list([*corrected, z]))


def corrected_rows(ndim: int, corrected: Sequence[Plane]) -> list[tuple[str, Plane | None]]:
    """Rows of the corrected-slices list: ``(text, plane)``, e.g. ``("y 40", (1, 40))``; a 2D
    image has one row without a slice."""
    if ndim < 3:
        return [(WHOLE_IMAGE_ROW, None)]
    return [(plane_name(p), p) for p in slice_list(corrected)]


def suggestion_rows(suggested: Iterable[tuple[int, float]],
                    corrected: Iterable[Plane]) -> list[tuple[str, int]]:
    """Rows of the suggested-slices list (z slices): ``(text, slice)``, best first, those
    already corrected said so."""
    done = set(slice_list(corrected))
    return [(f"slice {z} · score {score:.3f}" + ("  (corrected)" if z in done else ""), int(z))
            for z, score in suggested]
