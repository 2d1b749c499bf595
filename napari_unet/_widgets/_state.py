"""State shared by the docks: the model registry, main-thread imports, slice bookkeeping.

Nothing here computes; the docks call the core (``inference``, ``training``, ``postprocess``).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from psygnal import Signal

from napari_unet.model.checkpoint import (
    CheckpointError,
    SegmentationModel,
    list_pretrained,
)
from napari_unet.zoo.loading import load_model

log = logging.getLogger("napari_unet")

#: metadata keys written on napari layers (read by the other docks and the writer)
CORRECTED_KEY = "napari_unet_corrected_slices"
PROBABILITIES_KEY = "napari_unet_probabilities"
MODEL_KEY = "napari_unet_model"
UNIT_KEY = "napari_unet_unit"
SOURCE_KEY = "napari_unet_source_path"
#: on a labels layer: the slices Segment suggests to correct, ``[[z, score], ...]`` best first
SUGGESTED_KEY = "napari_unet_suggested_slices"

#: errors that are the user's situation, not a bug: shown as one-line notifications
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, CheckpointError, MemoryError,
                                                    FileNotFoundError, PermissionError, OSError)


# ----------------------------------------------------------------------------------------------
# heavy imports on the main thread
# ----------------------------------------------------------------------------------------------

#: modules imported on the main thread before a worker starts. torch._dynamo (and triton on
#: CUDA builds) are imported lazily by the first optimizer step / compiled op; importing triton
#: in a worker thread crashed napari (segfault) with the CUDA build of torch 2.14.1.
MAIN_THREAD_IMPORTS = ("torch", "torch._dynamo", "triton", "scipy.ndimage", "skimage.segmentation",
                       "skimage.measure", "napari_unet.postprocess", "napari_unet.training",
                       # napari imports pandas when the first labels layer is added (0.6 s):
                       # when the dock opens rather than when Segment is clicked
                       "pandas")
_imported_on_main: set[str] = set()
_import_module = importlib.import_module  # a seam for tests


def import_heavy_modules_on_main_thread(modules: tuple[str, ...] = MAIN_THREAD_IMPORTS) -> list[str]:
    """Import ``modules`` now, on the main thread, so worker threads never import them.

    Call before starting any worker (Segment and Fine-tune both do). Missing optional modules
    (``triton`` on CPU builds, ``napari_unet.training`` in a partial install) are skipped.

    Returns
    -------
    list of str
        The modules that are imported (now or before).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("heavy modules must be imported on the main thread")
    for name in modules:
        if name in _imported_on_main:
            continue
        try:
            _import_module(name)
        except ImportError:
            continue
        except Exception as err:  # noqa: BLE001 - a broken optional module must not stop the GUI
            log.warning("could not import %s on the main thread: %s", name, err)
            continue
        _imported_on_main.add(name)
    return sorted(_imported_on_main)


# ----------------------------------------------------------------------------------------------
# model registry shared by Segment and Fine-tune
# ----------------------------------------------------------------------------------------------

@dataclass
class ModelEntry:
    """One item of the model list: a shipped model, a file, or a fine-tuned version in memory."""

    key: str
    source: str  # "shipped", "file", "fine-tuned" or "new" (untrained)
    path: Path | None = None
    model: SegmentationModel | None = None
    parent_key: str | None = None

    @property
    def display(self) -> str:
        if self.source == "file" and self.path is not None:
            return f"{self.key}  ({self.path.name})"
        if self.source == "fine-tuned":
            return f"{self.key}  (fine-tuned)"
        if self.source == "new":
            return f"{self.key}  (new, untrained)"
        return self.key


class ModelRegistry:
    """The models the docks offer, by key; loads lazily and caches.

    Signals: ``changed()`` when the list changes, ``current_changed(key)`` when the selection does.
    """

    changed = Signal()
    current_changed = Signal(str)

    def __init__(self) -> None:
        self._entries: dict[str, ModelEntry] = {}
        self._current: str | None = None
        self.refresh_shipped()

    # listing ----------------------------------------------------------------------------------
    def refresh_shipped(self) -> None:
        """Add shipped models found in ``napari_unet/pretrained`` (cheap: no loading)."""
        added = False
        for name, path in list_pretrained().items():
            if name not in self._entries:
                self._entries[name] = ModelEntry(name, "shipped", path=path)
                added = True
        if added:
            if self._current is None and self._entries:
                self._current = next(iter(self._entries))
            self.changed.emit()

    def keys(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def entry(self, key: str) -> ModelEntry:
        if key not in self._entries:
            raise CheckpointError(f"no model {key!r} in the list")
        return self._entries[key]

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    # selection --------------------------------------------------------------------------------
    @property
    def current(self) -> str | None:
        return self._current

    @current.setter
    def current(self, key: str | None) -> None:
        if key is not None and key not in self._entries:
            raise CheckpointError(f"no model {key!r} in the list")
        if key != self._current:
            self._current = key
            self.current_changed.emit(key or "")

    # adding and getting -----------------------------------------------------------------------
    def _unique_key(self, key: str) -> str:
        base, n = key, 2
        while key in self._entries:
            key = f"{base} ({n})"
            n += 1
        return key

    def add_file(self, path: str | os.PathLike, select: bool = True) -> str:
        """Load a checkpoint file (raises :class:`CheckpointError`) and add it to the list."""
        path = Path(path)
        model = load_model(path)
        for entry in self._entries.values():  # the same file twice: reuse its entry
            if entry.path is not None and entry.path.resolve() == path.resolve():
                entry.model = model
                if select:
                    self.current = entry.key
                return entry.key
        key = self._unique_key(model.label)
        self._entries[key] = ModelEntry(key, "file", path=path, model=model)
        self.changed.emit()
        if select:
            self.current = key
        return key

    def add_model(self, model: SegmentationModel, parent_key: str | None = None,
                  select: bool = True, source: str = "fine-tuned") -> str:
        """Add a model held in memory (a fine-tuned version, or a ``new`` untrained one)."""
        key = self._unique_key(model.label)
        self._entries[key] = ModelEntry(key, source, model=model, parent_key=parent_key)
        self.changed.emit()
        if select:
            self.current = key
        return key

    def remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        if self._current == key:
            fallback = entry.parent_key if entry.parent_key in self._entries else None
            self._current = None
            self.current = fallback or (next(iter(self._entries)) if self._entries else None)
            if self._current is None:
                self.current_changed.emit("")
        self.changed.emit()

    def get(self, key: str | None = None) -> SegmentationModel:
        """The model for ``key`` (default: the current one), loading it on first use."""
        key = key if key is not None else self._current
        if key is None:
            raise CheckpointError("no model selected: pick a shipped model or load a model file")
        entry = self.entry(key)
        if entry.model is None:
            entry.model = load_model(entry.path if entry.source == "file" else entry.key)
        return entry.model

    def reset(self) -> None:
        """Forget everything but the shipped models (tests, new sessions)."""
        self._entries.clear()
        self._current = None
        self.refresh_shipped()
        self.changed.emit()
        self.current_changed.emit(self._current or "")


_REGISTRY: ModelRegistry | None = None


def get_registry() -> ModelRegistry:
    """The process-wide registry shared by all docks (the last model of the previous session
    selected, see :mod:`napari_unet.settings`)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = ModelRegistry()
        restore_last_model(_REGISTRY)
        _REGISTRY.current_changed.connect(remember_model)
    return _REGISTRY


def remember_model(key: str) -> None:
    """Save the selected model (a shipped name or a file) as the next session's first choice;
    versions held only in memory (fine-tuned, new) cannot come back and are not saved."""
    from napari_unet.io.settings import save_settings

    registry = get_registry()
    if not key or key not in registry:
        return
    entry = registry.entry(key)
    if entry.source == "shipped":
        save_settings(model=key, model_file=None)
    elif entry.source == "file" and entry.path is not None:
        save_settings(model=None, model_file=str(entry.path.resolve()))


def restore_last_model(registry: ModelRegistry) -> str | None:
    """Select the model saved by :func:`remember_model` (a file is loaded again; one that is
    gone or no longer loads is skipped). Returns its key, or None."""
    from napari_unet.io.settings import load_settings

    saved = load_settings()
    path = saved.get("model_file")
    if path and Path(path).is_file():
        try:
            return registry.add_file(path)
        except CheckpointError as err:
            log.warning("last model %s not loaded again: %s", path, err)
            return None
    name = saved.get("model")
    if name in registry:
        registry.current = name
        return name
    return None


# ----------------------------------------------------------------------------------------------
# layers and slices
# ----------------------------------------------------------------------------------------------

def layer_unit(layer: Any, default: str = "um") -> str:
    """Length unit of a layer: our metadata, else napari's ``units``, else ``default``."""
    unit = (getattr(layer, "metadata", None) or {}).get(UNIT_KEY)
    if unit:
        return str(unit)
    units = getattr(layer, "units", None)
    if units:
        text = f"{units[-1]:~}" if hasattr(units[-1], "dimensionality") else str(units[-1])
        text = text.replace("µm", "um").replace("μm", "um")
        if text and text not in ("pixel", "px", "dimensionless", ""):
            return {"micrometer": "um", "millimeter": "mm", "nanometer": "nm"}.get(text, text)
    return default


def current_slice_index(viewer: Any, layer: Any) -> int | None:
    """Index along the first axis of a 3D layer that the viewer shows now (None for 2D)."""
    if layer.ndim < 3:
        return None
    point = layer.world_to_data(viewer.dims.point[-layer.ndim:] if len(viewer.dims.point) >= layer.ndim
                                else viewer.dims.point)
    z = int(round(float(point[-3])))
    return int(np.clip(z, 0, layer.data.shape[-3] - 1))


def view_point(viewer: Any, layer: Any) -> tuple[int, ...]:
    """Data index of ``layer`` under the centre of the view, on the slice shown now."""
    point = list(viewer.dims.point)
    displayed = list(viewer.dims.displayed)
    center = list(viewer.camera.center)[-len(displayed):]
    for axis, value in zip(displayed, center):
        if axis < len(point):
            point[axis] = value
    world = point[-layer.ndim:] if len(point) >= layer.ndim else point
    data = np.asarray(layer.world_to_data(world), dtype=float)[-layer.ndim:]
    shape = layer.data[0].shape if getattr(layer, "multiscale", False) else layer.data.shape
    return tuple(int(np.clip(round(v), 0, n - 1)) for v, n in zip(data, shape[-layer.ndim:]))


def set_current_slice(viewer: Any, layer: Any, z: int) -> None:
    """Move the viewer to slice ``z`` of ``layer`` (data index along its first spatial axis)."""
    if layer.ndim < 3:
        return
    data_point = [0.0] * layer.ndim
    data_point[-3] = float(z)
    world = layer.data_to_world(data_point)
    axis = viewer.dims.ndim - layer.ndim + layer.ndim - 3
    viewer.dims.set_point(axis, float(world[-3]))


def corrected_slices(layer: Any) -> list[int]:
    return sorted(int(z) for z in layer.metadata.get(CORRECTED_KEY, []))


def set_corrected_slices(layer: Any, slices: Any) -> None:
    layer.metadata[CORRECTED_KEY] = sorted({int(z) for z in slices})
    corrections_changed.emit(layer)


class _CorrectionSignals:
    changed = Signal(object)


_correction_signals = _CorrectionSignals()
corrections_changed = _correction_signals.changed


class _SuggestionSignals:
    changed = Signal(object)


_suggestion_signals = _SuggestionSignals()
#: emitted with the labels layer whose suggested slices changed
suggestions_changed = _suggestion_signals.changed


def suggested_slices(layer: Any) -> list[tuple[int, float]]:
    """The slices Segment suggested to correct on ``layer``: ``[(z, score), ...]``, best first."""
    return [(int(z), float(score)) for z, score in layer.metadata.get(SUGGESTED_KEY, [])]


def set_suggested_slices(layer: Any, ranked: Any) -> None:
    layer.metadata[SUGGESTED_KEY] = [[int(z), float(score)] for z, score in ranked]
    suggestions_changed.emit(layer)


def _paint_slices(atoms: Any, ndim: int) -> set[int]:
    """First-axis indices touched by napari paint history atoms (3D layers)."""
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


def mark_painted(layer: Any, atoms: Any) -> None:
    """Mark the slices napari's brush/fill/eraser touched as corrected."""
    if layer.ndim < 3:
        slices = {0}
    else:
        slices = _paint_slices(atoms, layer.ndim)
    if slices:
        now = set(corrected_slices(layer))
        if not slices <= now:
            set_corrected_slices(layer, now | slices)


_TRACKED_LAYERS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_TRACKED_VIEWERS: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _on_paint(event: Any) -> None:
    mark_painted(event.source, event.value)


def track_corrections(layer: Any) -> None:
    """Connect a labels layer's paint events to correction tracking (idempotent)."""
    if layer in _TRACKED_LAYERS:
        return
    layer.events.paint.connect(_on_paint)
    _TRACKED_LAYERS.add(layer)
    layer.metadata.setdefault(CORRECTED_KEY, [])


def install_correction_tracking(viewer: Any) -> None:
    """Track painting on every labels layer of ``viewer``, now and later (idempotent)."""
    from napari.layers import Labels

    for layer in viewer.layers:
        if isinstance(layer, Labels):
            track_corrections(layer)
    if viewer in _TRACKED_VIEWERS:
        return

    def on_insert(event: Any) -> None:
        if isinstance(event.value, Labels):
            track_corrections(event.value)

    viewer.layers.events.inserted.connect(on_insert)
    _TRACKED_VIEWERS.add(viewer)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------

def notify_error(err: BaseException, what: str) -> str:
    """Show an error as a napari notification (one line); returns the message."""
    from napari.utils.notifications import show_error

    if isinstance(err, EXPECTED_ERRORS):
        message = f"{what}: {err}"
    else:
        message = f"{what} failed unexpectedly: {type(err).__name__}: {err}"
        log.error("%s\n%s", message, "".join(traceback.format_exception(err)))
    show_error(message)
    return message


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def connect_layer_list(viewer: Any, callback: Callable[[Any], None]) -> None:
    """Call ``callback(event)`` when layers are added, removed, renamed or reordered.

    ``callback`` should be a bound method: napari holds it weakly, so a closed dock is not kept
    alive (or called) by the viewer.
    """
    events = viewer.layers.events
    for name in ("inserted", "removed", "reordered", "moved"):
        emitter = getattr(events, name, None)
        if emitter is not None:
            emitter.connect(callback)

    watched: weakref.WeakSet = weakref.WeakSet()

    def watch_names(event: Any = None) -> None:
        for layer in viewer.layers:
            if layer not in watched:
                layer.events.name.connect(callback)
                watched.add(layer)

    events.inserted.connect(watch_names)
    watch_names()
