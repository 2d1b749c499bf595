"""A fine-tune survives a crash: its best weights so far are kept next to the labels journals.

The Fine-tune dock makes a :class:`FineTuneRescue` per run and calls it from its progress
callback; after the first iteration and then every ``CHECKPOINT_INTERVAL_S`` a thread asks the trainer for its best model so far
(``Trainer.best_model()``) and saves it atomically, with an ``info.json`` saying ``running``.
The finished version is kept too (``finished``) until it is saved to a file. A run the app
lost comes back in the model lists as ``<name> v<N> (recovered)`` (:func:`recover_models`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import weakref
from typing import Any

from napari_unet.io import recovery as rc

log = logging.getLogger("napari_unet")

#: how often a running fine-tune's best weights are saved
CHECKPOINT_INTERVAL_S = 10.0
RECOVERED = " (recovered)"

_RESCUES: "weakref.WeakSet[FineTuneRescue]" = weakref.WeakSet()
_recovered_folders: set[str] = set()


class FineTuneRescue:
    """Keeps one fine-tune run's best weights on disk while it runs (see the module's notes)."""

    def __init__(self, base_label: str, interval: float = CHECKPOINT_INTERVAL_S):
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.base_label = base_label
        self.interval = interval
        self.folder = None
        self.saves = 0
        self.final: Any = None
        self.last_error: str | None = None
        self._last: float | None = None  # the first save: after the first iteration
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        _RESCUES.add(self)

    def progress(self, trainer: Any) -> None:
        """Called each iteration (main thread): save the best weights in the background when
        ``interval`` has passed and no save is running."""
        if trainer is None or self.final is not None:
            return
        if self._last is not None and time.monotonic() - self._last < self.interval:
            return
        if self._thread is not None and self._thread.is_alive():
            return
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._save_best, args=(trainer,), daemon=True,
                                        name="napari-unet fine-tune rescue")
        self._thread.start()

    def _save_best(self, trainer: Any) -> None:
        try:
            model = trainer.best_model()
        except Exception as err:  # noqa: BLE001 - the training goes on whatever happens here
            self.last_error = str(err)
            return
        if model is None:
            self._last = None  # before the first iteration: try again at the next
            return
        self._write(model, "running")

    def _write(self, model: Any, state: str) -> None:
        from napari_unet.model.checkpoint import save_checkpoint

        with self._lock:
            if state == "running" and self.final is not None:
                return  # the run finished meanwhile: its final weights are written
            try:
                folder = rc.finetune_folder(self.run_id)
                save_checkpoint(model, folder / rc.CHECKPOINT)
                rc.write_info(folder, label=model.label, base=self.base_label, state=state,
                              pid=os.getpid(), saved=time.time())
                self.folder = folder
                self.saves += 1
            except Exception as err:  # noqa: BLE001 - a full disk must not stop the training
                self.last_error = str(err)
                log.warning("could not keep the fine-tune's weights: %s", err)

    def wait(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def finished(self, model: Any) -> None:
        """The run returned ``model`` (now in the model list, in memory only): keep it until it
        is saved to a file."""
        self.final = model
        self._thread = threading.Thread(target=self._write, args=(model, "finished"), daemon=True,
                                        name="napari-unet fine-tune rescue")
        self._thread.start()

    def saved(self) -> None:
        """The finished version was saved to a file: nothing to recover any more."""
        self.wait()
        if self.folder is not None:
            info = rc.read_info(self.folder) or {}
            rc.write_info(self.folder, **{**info, "state": "saved"})


def model_saved(model: Any) -> None:
    """The Fine-tune dock saved ``model`` to a file (marks its run's weights saved)."""
    for rescue in list(_RESCUES):
        if rescue.final is not None and rescue.final is model:
            rescue.saved()


def recover_models(registry: Any = None) -> list[str]:
    """Add the fine-tuned versions a crash (or an unsaved close) lost to the model list, as
    ``<label> (recovered)``; returns their keys."""
    from napari_unet._widgets._journal import _alive_elsewhere
    from napari_unet.model.checkpoint import CheckpointError, load_checkpoint

    if registry is None:
        from napari_unet._widgets._state import get_registry

        registry = get_registry()
    keys = []
    for path, info in rc.recoverable_checkpoints():
        folder = str(path.parent)
        if folder in _recovered_folders or _alive_elsewhere(info.get("pid")):
            continue
        _recovered_folders.add(folder)
        try:
            model = load_checkpoint(path)
        except (CheckpointError, OSError) as err:
            log.warning("could not recover the fine-tuned model in %s: %s", path, err)
            continue
        keys.append(registry.add_model(model, select=False, source="recovered",
                                       key=f"{model.label}{RECOVERED}"))
        rc.write_info(path.parent, **{**info, "state": "restored"})
    return keys
