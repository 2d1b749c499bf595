"""Undo/redo for the Edit dock's operations and Segment runs, interleaved with napari's own
paint history."""

from __future__ import annotations

import weakref
from typing import Any, Callable

import numpy as np

from napari_unet._widgets._journal import note_changed
from napari_unet.labels.measure import labels_in_atoms, touched_labels
from napari_unet.labels.undo_steps import (
    MAX_BYTES,
    MAX_STEPS,
    NAPARI_STEP,
    Patch,
    Step,
    Swap,
    is_user_edit,
    trim_steps,
)

__all__ = ["EditHistory", "HistoryBusy", "history_for", "Patch", "Swap", "NAPARI_STEP",
           "MAX_STEPS", "MAX_BYTES"]


class HistoryBusy(ValueError):
    """Undo/redo asked for while a job writes into the layer."""


class EditHistory:
    """Undo/redo stack of one labels layer.

    Operations of the Edit dock are stored as :class:`Patch` es, Segment runs and whole-stack
    operations as :class:`Swap` s; napari's brush, fill and eraser steps (its ``paint``
    event) as markers, undone through napari's own history, so Ctrl+Z walks back through all
    of them in the order they happened. While ``busy`` names a running job, undo and redo
    raise :class:`HistoryBusy`.
    """

    def __init__(self, layer: Any):
        self.layer = layer
        self.undo_stack: list[Step] = []
        self.redo_stack: list[Step] = []
        #: napari paint steps seen so far (a job compares it before and after)
        self.paint_count = 0
        #: called after each change with the labels it touched, or None when anything may
        #: have changed (a replaced array, a finished job, napari's own undo)
        self.observers: list[Callable[[np.ndarray | None], None]] = []
        self._busy: str | None = None
        layer.events.paint.connect(self._on_paint)

    @property
    def busy(self) -> str | None:
        """What is writing into the layer now (None: nothing); observers hear when it ends."""
        return self._busy

    @busy.setter
    def busy(self, what: str | None) -> None:
        was, self._busy = self._busy, what
        if was and not what:
            self._notify(None)

    def _notify(self, touched: np.ndarray | None) -> None:
        if touched is not None and touched.size == 0:
            return
        for observer in list(self.observers):
            observer(touched)

    def _on_paint(self, event: Any = None) -> None:
        self.paint_count += 1
        self._push(NAPARI_STEP)
        self._notify(labels_in_atoms(getattr(event, "value", None)) if event is not None else None)

    def _push(self, step: Step) -> None:
        self.undo_stack.append(step)
        self.redo_stack.clear()
        trim_steps(self.undo_stack, MAX_STEPS, MAX_BYTES)

    def apply(self, region: tuple[slice, ...], after: np.ndarray, description: str) -> Patch | None:
        """Write ``after`` into ``region`` of the layer, recording the change; None if no change."""
        self._check_free()
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
        note_changed(layer, region)
        patch = Patch(region, before, after.astype(layer.data.dtype, copy=False), description)
        self._push(patch)
        self._notify(touched_labels(before, patch.after))
        return patch

    def replace(self, data: np.ndarray, description: str) -> Swap:
        """Give the layer a new array ``data`` (no copy); undo puts the old one back."""
        self._check_free()
        step = Swap(None, self.layer.data, description)
        self.layer.data = data
        self._push(step)
        self._notify(None)
        return step

    def record(self, region: tuple[slice, ...] | None, values: np.ndarray, description: str,
               corrected: list[int] | None = None) -> Swap:
        """Record a change about to be written by someone else (a Segment run).

        ``values``: what ``region`` holds now (a copy), or for ``region`` None the layer's
        current array, which the caller then replaces. ``corrected``: the list of corrected
        slices now, when the change unmarks some (undo marks them again).
        """
        step = Swap(region, values, description, corrected)
        self._push(step)
        return step

    def _check_free(self) -> None:
        if self.busy:
            raise HistoryBusy(f"{self.busy} is writing into {self.layer.name!r}; wait for it to "
                              "finish (or cancel it), then undo")

    def _exchange(self, step: Swap) -> None:
        layer = self.layer
        if step.corrected is not None:
            from napari_unet._widgets._state import (
                corrected_slices,
                set_corrected_slices,
            )

            now = corrected_slices(layer)
            set_corrected_slices(layer, step.corrected)
            step.corrected = now
        if step.region is None:
            current = layer.data
            layer.data = step.values
            step.values = current
            return
        current = np.array(layer.data[step.region], copy=True)
        layer.data[step.region] = step.values
        step.values = current
        layer.refresh()
        note_changed(layer, step.region)

    def _replay(self, step: Patch | Swap, undo: bool) -> None:
        if isinstance(step, Swap):
            self._exchange(step)
            self._notify(None)
            return
        self.layer.data[step.region] = step.before if undo else step.after
        self.layer.refresh()
        note_changed(self.layer, step.region)
        self._notify(touched_labels(step.before, step.after))

    def undo(self) -> str | None:
        """Undo the last step (ours or napari's); returns what was undone."""
        self._check_free()
        if not self.undo_stack:
            return None
        step = self.undo_stack.pop()
        self.redo_stack.append(step)
        if step == NAPARI_STEP:
            self.layer.undo()
            self._notify(None)
            return "paint"
        self._replay(step, undo=True)
        return step.description

    def redo(self) -> str | None:
        """Redo the last undone step; returns what was redone."""
        self._check_free()
        if not self.redo_stack:
            return None
        step = self.redo_stack.pop()
        self.undo_stack.append(step)
        if step == NAPARI_STEP:
            self.layer.redo()
            self._notify(None)
            return "paint"
        self._replay(step, undo=False)
        return step.description

    @property
    def can_undo(self) -> bool:
        return bool(self.undo_stack)

    @property
    def can_redo(self) -> bool:
        return bool(self.redo_stack)

    @property
    def edited(self) -> bool:
        """Whether the user changed the layer by hand (paint strokes or Edit operations)."""
        return any(is_user_edit(step) for step in self.undo_stack)


_HISTORIES: "weakref.WeakKeyDictionary[Any, EditHistory]" = weakref.WeakKeyDictionary()


def _undo_key(layer: Any) -> None:
    _run_key(layer, "undo")


def _redo_key(layer: Any) -> None:
    _run_key(layer, "redo")


def _run_key(layer: Any, what: str) -> None:
    try:
        getattr(history_for(layer), what)()
    except HistoryBusy as err:
        from napari.utils.notifications import show_info

        show_info(str(err))


def history_for(layer: Any) -> EditHistory:
    """The undo/redo history of a labels layer (created on first use, with its key bindings).

    Ctrl+Z / Ctrl+Shift+Z are bound on the layer itself: instance bindings take precedence over
    napari's class bindings, which only undo paint.
    """
    history = _HISTORIES.get(layer)
    if history is None:
        history = EditHistory(layer)
        _HISTORIES[layer] = history
        from app_model.types import KeyCode, KeyMod

        layer.bind_key(KeyMod.CtrlCmd | KeyCode.KeyZ, _undo_key, overwrite=True)
        layer.bind_key(KeyMod.CtrlCmd | KeyMod.Shift | KeyCode.KeyZ, _redo_key, overwrite=True)
    return history
