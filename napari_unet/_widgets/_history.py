"""Undo/redo for the Edit dock's operations, interleaved with napari's own paint history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: an entry standing for one of napari's own paint/fill/erase steps (undone by ``layer.undo``)
NAPARI_STEP = "napari"
MAX_STEPS = 50


@dataclass
class Patch:
    """One operation: the region it changed, with the values before and after."""

    region: tuple[slice, ...]
    before: np.ndarray
    after: np.ndarray
    description: str


class EditHistory:
    """Undo/redo stack of one labels layer.

    Operations of the Edit dock are stored as :class:`Patch` es; napari's brush, fill and
    eraser steps (its ``paint`` event) as markers, undone through napari's own history, so
    Ctrl+Z walks back through both in the order they happened.
    """

    def __init__(self, layer: Any):
        self.layer = layer
        self.undo_stack: list[Patch | str] = []
        self.redo_stack: list[Patch | str] = []
        layer.events.paint.connect(self._on_paint)

    def _on_paint(self, event: Any = None) -> None:
        self.undo_stack.append(NAPARI_STEP)
        self.redo_stack.clear()
        del self.undo_stack[:-MAX_STEPS]

    def apply(self, region: tuple[slice, ...], after: np.ndarray, description: str) -> Patch | None:
        """Write ``after`` into ``region`` of the layer, recording the change; None if no change."""
        layer = self.layer
        before = np.array(layer.data[region], copy=True)
        after = np.asarray(after)
        if before.shape != after.shape:
            raise ValueError(f"{description}: result has shape {after.shape}, expected {before.shape}")
        if np.array_equal(before, after):
            return None
        dtype = layer.data.dtype
        if after.size and np.issubdtype(dtype, np.integer) and int(after.max()) > np.iinfo(dtype).max:
            layer.data = np.asarray(layer.data).astype(np.promote_types(dtype, after.dtype))
        layer.data[region] = after
        layer.refresh()
        patch = Patch(region, before, after.astype(layer.data.dtype, copy=False), description)
        self.undo_stack.append(patch)
        del self.undo_stack[:-MAX_STEPS]
        self.redo_stack.clear()
        return patch

    def _replay(self, patch: Patch, values: np.ndarray) -> None:
        self.layer.data[patch.region] = values
        self.layer.refresh()

    def undo(self) -> str | None:
        """Undo the last step (ours or napari's); returns what was undone."""
        if not self.undo_stack:
            return None
        step = self.undo_stack.pop()
        self.redo_stack.append(step)
        if step == NAPARI_STEP:
            self.layer.undo()
            return "paint"
        self._replay(step, step.before)
        return step.description

    def redo(self) -> str | None:
        """Redo the last undone step; returns what was redone."""
        if not self.redo_stack:
            return None
        step = self.redo_stack.pop()
        self.undo_stack.append(step)
        if step == NAPARI_STEP:
            self.layer.redo()
            return "paint"
        self._replay(step, step.after)
        return step.description

    @property
    def can_undo(self) -> bool:
        return bool(self.undo_stack)

    @property
    def can_redo(self) -> bool:
        return bool(self.redo_stack)
