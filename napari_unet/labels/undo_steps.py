"""The steps of a labels layer's undo history, as data: an operation's before/after values
(:class:`Patch`), the other version of what a job replaced (:class:`Swap`), or a marker for a
paint step of the viewer's own history (:data:`NAPARI_STEP`); and how long a history may grow.
The history that applies them to a layer is the widget package's ``_history``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

#: an entry standing for one of napari's own paint/fill/erase steps (undone by ``layer.undo``)
NAPARI_STEP = "napari"
MAX_STEPS = 50
#: bytes of stored arrays (before/after values, replaced arrays) kept per layer; the oldest
#: steps are forgotten beyond this
MAX_BYTES = 2 * 2**30


@dataclass
class Patch:
    """One operation: the region it changed, with the values before and after."""

    region: tuple[slice, ...]
    before: np.ndarray
    after: np.ndarray
    description: str

    @property
    def nbytes(self) -> int:
        return int(self.before.nbytes + self.after.nbytes)


@dataclass
class Swap:
    """One operation stored as the other version of what it changed.

    ``region`` None: the layer's whole array was replaced and ``values`` is the other array
    (no copy is made). Otherwise ``values`` is the other content of ``region``. Undo and redo
    both exchange ``values`` with what the layer holds.
    """

    region: tuple[slice, ...] | None
    values: np.ndarray
    description: str
    #: the other list of corrected slices (None: the step does not change the list)
    corrected: list | None = None

    @property
    def nbytes(self) -> int:
        return int(getattr(self.values, "nbytes", 0))


#: one entry of an undo stack
Step = Union[Patch, Swap, str]


def trim_steps(steps: list[Step], max_steps: int = MAX_STEPS, max_bytes: int = MAX_BYTES) -> None:
    """Forget the oldest ``steps`` (in place) beyond ``max_steps`` entries or ``max_bytes`` of
    stored arrays; the newest step is always kept."""
    del steps[:-max_steps]
    total = 0
    for index in range(len(steps) - 1, -1, -1):
        total += getattr(steps[index], "nbytes", 0)
        if total > max_bytes and index < len(steps) - 1:
            del steps[:index + 1]
            break


def is_user_edit(step: Step) -> bool:
    """Whether ``step`` changed the labels by hand: a paint step or an Edit operation (a Swap
    of a Segment run is not)."""
    return (step == NAPARI_STEP or isinstance(step, Patch)
            or (isinstance(step, Swap) and not step.description.startswith("Segment")))
