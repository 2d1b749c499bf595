"""The models the GUI offers, by key: shipped models, files, and versions held in memory.

One process-wide :class:`ModelRegistry` (:func:`get_registry`) is shared by every dock; it loads
models lazily, caches them, and remembers the selected one for the next session (in the
settings file, :mod:`napari_unet.io.settings`). Its signals are psygnal signals (pure Python):
``changed()`` when the list changes, ``current_changed(key)`` when the selection does.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from psygnal import Signal

from napari_unet.model.checkpoint import (
    CheckpointError,
    SegmentationModel,
    list_pretrained,
)
from napari_unet.zoo.loading import load_model

log = logging.getLogger("napari_unet")

@dataclass
class ModelEntry:
    """One item of the model list: a shipped model, a file, or a fine-tuned version in memory."""

    key: str
    source: str  # "shipped", "file", "fine-tuned", "new" (untrained) or "recovered"
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
                  select: bool = True, source: str = "fine-tuned", key: str | None = None) -> str:
        """Add a model held in memory (a fine-tuned version, a ``new`` untrained one, or one
        ``recovered`` after a crash); ``key`` defaults to its label."""
        key = self._unique_key(key or model.label)
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
        """Forget everything but the shipped models (tests, new sessions), and this session's
        choices of model for kinds of data."""
        from napari_unet.zoo.choice import forget_session

        forget_session()
        self._entries.clear()
        self._current = None
        self.refresh_shipped()
        self.changed.emit()
        self.current_changed.emit(self._current or "")


_REGISTRY: ModelRegistry | None = None


def get_registry() -> ModelRegistry:
    """The process-wide registry shared by all docks (the last model of the previous session
    selected, see :mod:`napari_unet.io.settings`)."""
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
