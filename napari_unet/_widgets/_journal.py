"""Nothing lost: the docks journal the labels layers they work on, and offer them back.

Every change to a labels layer of an opened image (napari's brush, fill and eraser, the Edit
dock's operations and undo, Segment results, the corrected-slice marks) marks the chunks it
touched; a timer on the main thread hands them, every ``INTERVAL_MS``, to a writer thread that
journals them (:class:`napari_unet.io.journal.LabelsJournal`). The main thread only records
chunk ids: the writer reads the layer's array itself (a chunk changed while it is read is marked
again and written again).

When an image is opened whose journal holds unsaved labels, the docks ask whether to restore
them (labels and corrected slices) or discard them. Export and File > Save mark a journal
saved. A running fine-tune keeps its best weights so far next to the journals (see
:class:`FineTuneRescue`); after a crash they come back in the model lists as
``<name> v<N> (recovered)``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from napari_unet._widgets._state import (
    CORRECTED_KEY,
    DERIVED_KEY,
    SOURCE_KEY,
    corrections_changed,
    set_corrected_slices,
)
from napari_unet.io import journal as jr
from napari_unet.io import recovery as rc
from napari_unet.io.settings import get_setting

log = logging.getLogger("napari_unet")

#: how often the main thread hands the changed chunks to the writer (the journal lags the
#: brush by this plus the write, well under 2 s)
INTERVAL_MS = 200


def ask_restore(parent: Any, text: str) -> bool:
    """Ask whether to restore journaled labels (a seam for tests and scripts)."""
    from napari_unet._widgets._common import ask_yes_no

    return ask_yes_no(parent, "Restore your unsaved labels?", text)


@dataclass
class _Tracked:
    """A journaled labels layer: what changed since the last write."""

    layer: Any  # weakref.ref
    journal: jr.LabelsJournal
    dirty: set | None = field(default_factory=set)  # None: the whole array
    marks: bool = False
    since: float | None = None  # the oldest change not yet handed to the writer
    changes: int = 0
    busy: bool = False
    clean_at: int | None = None  # saved (Export) as of this change count


class LayerJournals:
    """The journals of one viewer's labels layers (see the module's notes)."""

    def __init__(self, viewer: Any):
        from qtpy.QtCore import QTimer

        self.viewer_ref = weakref.ref(viewer)
        self.tracked: dict[int, _Tracked] = {}
        self.max_lag = 0.0
        #: what journaling costs: bytes written, writer-thread CPU seconds, main-thread seconds
        self.stats = {"writes": 0, "bytes": 0, "writer_cpu_s": 0.0, "main_s": 0.0,
                      "max_main_s": 0.0}
        self.last_error: str | None = None
        self._shown_error: str | None = None
        self._offered: set[tuple[str, str]] = set()
        self._hashes: dict[int, tuple[str, str]] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        # the thread holds the manager weakly: it ends when the viewer (and so this) is gone
        self._thread = threading.Thread(target=_write_loop, args=(weakref.ref(self), self._jobs),
                                        name="napari-unet journal", daemon=True)
        self._thread.start()
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(INTERVAL_MS)
        self._timer.timeout.connect(self._tick)
        corrections_changed.connect(self._marks_changed)
        viewer.layers.events.inserted.connect(self._inserted)
        for layer in list(viewer.layers):
            self._inserted(layer=layer)
        try:
            rc.prune(max_age_days=float(get_setting(jr.MAX_AGE_KEY, jr.MAX_AGE_DAYS)),
                     max_mb=float(get_setting(jr.MAX_SIZE_KEY, jr.MAX_SIZE_MB)))
        except (OSError, ValueError, TypeError) as err:
            log.warning("could not prune the journals: %s", err)

    # which image a layer belongs to ----------------------------------------------------------
    def _image_key(self, layer: Any) -> tuple[str, str] | None:
        """``(path, content hash)`` of an image layer opened from a file (None otherwise)."""
        if id(layer) in self._hashes:
            return self._hashes[id(layer)]
        path = getattr(layer.source, "path", None) or layer.metadata.get(SOURCE_KEY)
        if not path:
            return None
        data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
        key = (str(path), jr.content_hash(data))
        self._hashes[id(layer)] = key
        return key

    def _source_of(self, labels: Any) -> tuple[str, str] | None:
        """The image a labels layer annotates: its SOURCE_KEY, else an image of its shape."""
        from napari.layers import Image

        viewer = self.viewer_ref()
        images = [l for l in viewer.layers if isinstance(l, Image)] if viewer is not None else []
        path = labels.metadata.get(SOURCE_KEY)
        if path:
            for image in images:
                key = self._image_key(image)
                if key is not None and key[0] == str(path):
                    return key
            if getattr(labels.source, "path", None):  # labels opened from their own file
                return self._image_key(labels)
            return None
        shape = tuple(labels.data.shape)
        matches = [k for k in (self._image_key(i) for i in images
                               if tuple(i.data.shape[-len(shape):]) == shape and not i.rgb) if k]
        return matches[0] if len(matches) == 1 else None

    # tracking ---------------------------------------------------------------------------------
    def _inserted(self, event: Any = None, layer: Any = None) -> None:
        from napari.layers import Image, Labels

        layer = layer if layer is not None else event.value
        if isinstance(layer, Labels):
            self.track(layer)
        elif isinstance(layer, Image):
            key = self._image_key(layer)
            if key is not None and key not in self._offered:
                found = self._unsaved(key)  # as the image opens (not what is painted meanwhile)
                if not found:
                    self._offered.add(key)
                else:
                    from qtpy.QtCore import QTimer

                    # after napari has finished adding the layer (a question inside the event
                    # would block it half-way)
                    QTimer.singleShot(0, lambda: self.offer_restore(layer, found))
            for other in list(self.viewer_ref().layers):  # labels added before their image
                if isinstance(other, Labels) and id(other) not in self.tracked:
                    self.track(other)

    def track(self, layer: Any) -> _Tracked | None:
        """Journal ``layer`` from now on (None when no image file is known for it)."""
        if id(layer) in self.tracked:
            return self.tracked[id(layer)]
        if layer.metadata.get(DERIVED_KEY):  # a model's output, not the user's labels
            return None
        key = self._source_of(layer)
        if key is None:
            return None
        journal = jr.LabelsJournal.for_layer(key[0], key[1], layer.name)
        entry = _Tracked(weakref.ref(layer), journal)
        self.tracked[id(layer)] = entry
        layer.events.paint.connect(self._painted)
        layer.events.data.connect(self._replaced)
        layer.events.name.connect(self._renamed)
        if journal.exists and not journal.clean and (key[0], key[1]) not in self._offered:
            entry.dirty, entry.changes = set(), 0  # the journal is offered, not overwritten yet
        else:
            self.note_changed(layer)  # what the layer holds now (a Segment result, a file)
        return entry

    def _entry(self, layer: Any) -> _Tracked | None:
        entry = self.tracked.get(id(layer))
        return entry if entry is not None and entry.layer() is layer else None

    def note_changed(self, layer: Any, region: tuple | None = None, chunks: set | None = None,
                     marks: bool = True, edit: bool = True) -> None:
        """Record that ``region`` of ``layer`` (None: all of it) changed; cheap, main thread.

        ``edit`` False: nothing changed in the labels, the journal is to be written anyway."""
        entry = self._entry(layer)
        if entry is None:
            return
        if entry.dirty is not None:
            if chunks is not None:
                entry.dirty |= chunks
            elif region is None:
                entry.dirty = None
            else:
                shape = layer.data.shape
                grid = entry.journal.manifest.get("chunks")
                if grid is None or entry.journal.shape != tuple(shape):
                    entry.dirty = None
                else:
                    entry.dirty |= jr.chunks_of_region(shape, grid, region)
        entry.marks = entry.marks or marks
        entry.changes += int(edit)
        if entry.since is None:
            entry.since = time.time()
        if not self._timer.isActive():
            self._timer.start()

    def _painted(self, event: Any) -> None:
        layer = event.source
        entry = self._entry(layer)
        if entry is None:
            return
        grid = entry.journal.manifest.get("chunks")
        if grid is None or entry.journal.shape != tuple(layer.data.shape):
            self.note_changed(layer)
            return
        chunks: set = set()
        try:
            for atom in event.value or []:
                key = getattr(atom, "slice_key", None)
                key = atom[0] if key is None else key
                if any(isinstance(k, slice) for k in key):
                    chunks |= jr.chunks_of_region(layer.data.shape, grid, key)
                else:
                    chunks |= jr.chunks_of_indices(grid, key)
        except (TypeError, ValueError, IndexError):
            self.note_changed(layer)
            return
        self.note_changed(layer, chunks=chunks)

    def _replaced(self, event: Any) -> None:
        self.note_changed(event.source)

    def _renamed(self, event: Any) -> None:
        """A renamed layer is journaled under its new name (the old journal goes)."""
        layer = event.source
        entry = self._entry(layer)
        if entry is None or entry.journal.layer_name == layer.name:
            return
        old = entry.journal
        entry.journal = jr.LabelsJournal.for_layer(old.manifest["image_path"],
                                                   old.manifest["image_hash"], layer.name)
        self._jobs.put(((lambda: old.discard()),))  # after any write of the old one
        with self._lock:
            self._pending += 1
        self.note_changed(layer)

    def _marks_changed(self, layer: Any) -> None:
        self.note_changed(layer, chunks=set())

    def change_count(self, layer: Any) -> int | None:
        entry = self._entry(layer)
        return None if entry is None else entry.changes

    def mark_saved(self, layer: Any, as_of: int | None = None) -> None:
        """The layer is saved as it was at change ``as_of`` (default: now): mark it clean."""
        entry = self._entry(layer)
        if entry is None:
            return
        if as_of is None or as_of == entry.changes:
            entry.clean_at = entry.changes
            self.note_changed(layer, chunks=set(), marks=False, edit=False)

    # writing ----------------------------------------------------------------------------------
    def _tick(self) -> None:
        """Hand every layer's changes to the writer (main thread: only bookkeeping, no copy)."""
        start = time.perf_counter()
        try:
            self._hand_over()
        finally:
            spent = time.perf_counter() - start
            self.stats["main_s"] += spent
            self.stats["max_main_s"] = max(self.stats["max_main_s"], spent)

    def _hand_over(self) -> None:
        if self.last_error and self.last_error != self._shown_error:
            from napari.utils.notifications import show_warning

            self._shown_error = self.last_error
            show_warning(f"Could not save the recovery journal: {self.last_error}")
        waiting = False
        for key, entry in list(self.tracked.items()):
            layer = entry.layer()
            if layer is None:
                del self.tracked[key]
                continue
            if entry.since is None:
                continue
            if entry.busy:
                waiting = True
                continue
            import numpy as np

            data = layer.data
            if not isinstance(data, np.ndarray):  # a lazy (dask/zarr) layer: saved in its store
                entry.since = None
                continue
            dirty, since = entry.dirty, entry.since
            marks = jr.json_safe(layer.metadata.get(CORRECTED_KEY, [])) if entry.marks else None
            clean = entry.clean_at == entry.changes
            entry.dirty, entry.marks, entry.since, entry.busy = set(), False, None, True
            with self._lock:
                self._pending += 1
            self._jobs.put((entry, data, dirty, marks, clean, since))
        if waiting:
            self._timer.start()

    def _write(self, job: tuple) -> None:
        """Writer thread: journal one layer's changes (or run a task, in order)."""
        if len(job) == 1:
            try:
                job[0]()
            finally:
                with self._lock:
                    self._pending -= 1
            return
        entry, data, dirty, marks, clean, since = job
        cpu = time.thread_time()
        try:
            result = entry.journal.write(data, dirty, corrected=marks, clean=clean,
                                         extra={"pid": os.getpid()})
            self.max_lag = max(self.max_lag, time.time() - since)
            self.stats["writes"] += int(result.committed)
            self.stats["bytes"] += result.nbytes
        except Exception as err:  # noqa: BLE001 - a full disk must not stop painting
            self.last_error = str(err)
            log.warning("could not write the recovery journal: %s", err)
        finally:
            self.stats["writer_cpu_s"] += time.thread_time() - cpu
            entry.busy = False
            with self._lock:
                self._pending -= 1

    def flush(self, timeout: float = 10.0) -> bool:
        """Write every change now and wait for the writer (tests, scripts, closing)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self._tick()
            with self._lock:
                pending = self._pending
            if not pending and all(e.since is None for e in self.tracked.values()):
                return True
            time.sleep(0.01)
        return False

    # restoring --------------------------------------------------------------------------------
    def _unsaved(self, key: tuple[str, str]) -> list[jr.LabelsJournal]:
        """Unsaved, non-empty journals over an image, of no other process running now."""
        return [j for j in rc.find_journals(*key) if not _alive_elsewhere(j.manifest.get("pid"))
                and (j.manifest["files"] or j.manifest["corrected"])]  # (empty: nothing lost)

    def offer_restore(self, image: Any, found: list[jr.LabelsJournal] | None = None) -> list[Any]:
        """Ask to restore the unsaved labels journaled over ``image`` (``found`` when it was
        opened); Yes restores them (new or same-named labels layers, with their corrected
        slices), No deletes them."""
        viewer = self.viewer_ref()
        key = self._image_key(image)
        if viewer is None or key is None or key in self._offered:
            return []
        self._offered.add(key)
        found = [j for j in (self._unsaved(key) if found is None else found) if j.exists]
        if not found:
            return []
        when = time.strftime("%H:%M", time.localtime(found[0].updated))
        names = ", ".join(repr(j.layer_name) for j in found)
        text = (f"napari-unet kept the labels you had not saved for {image.name!r} "
                f"({names}, last change at {when}). Restore them?\n\n"
                "Yes restores the labels and the corrected slices; No discards them.")
        from qtpy.QtWidgets import QApplication

        if not ask_restore(QApplication.activeWindow(), text):
            for journal in found:
                journal.discard()
                self._reset(journal.folder)
            return []
        restored = []
        for journal in found:
            try:
                restored.append(self._restore(viewer, image, journal))
            except ValueError as err:
                from napari_unet._widgets._state import notify_error

                notify_error(err, f"Restore {journal.layer_name!r}")
        return restored

    def _reset(self, folder: Any) -> None:
        """A journal was discarded: the layers journaled there start a new one."""
        for entry in self.tracked.values():
            layer = entry.layer()
            if layer is not None and entry.journal.folder == folder:
                entry.journal = jr.LabelsJournal.for_layer(
                    entry.journal.manifest["image_path"], entry.journal.manifest["image_hash"],
                    entry.journal.layer_name)
                self.note_changed(layer)

    def _restore(self, viewer: Any, image: Any, journal: jr.LabelsJournal) -> Any:
        labels = journal.read_labels()
        name = journal.layer_name
        layer = viewer.layers[name] if name in viewer.layers else None
        if layer is not None and tuple(layer.data.shape) == labels.shape:
            layer.data = labels
        else:
            ndim = labels.ndim
            layer = viewer.add_labels(labels, name=name, scale=image.scale[-ndim:],
                                      translate=image.translate[-ndim:],
                                      metadata={SOURCE_KEY: journal.manifest["image_path"]})
        entry = self.track(layer)
        set_corrected_slices(layer, journal.corrected)
        if entry is not None:
            self.note_changed(layer)
        return layer


def _write_loop(manager_ref: Callable[[], LayerJournals | None], jobs: queue.Queue) -> None:
    while True:
        try:
            job = jobs.get(timeout=5.0)
        except queue.Empty:
            if manager_ref() is None:
                return
            continue
        manager = manager_ref()
        if manager is None:
            return
        manager._write(job)
        del manager


def _alive_elsewhere(pid: Any) -> bool:
    """Whether ``pid`` is another process still running (its journal is in use)."""
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# ----------------------------------------------------------------------------------------------
# the hooks the docks call
# ----------------------------------------------------------------------------------------------

_MANAGERS: "weakref.WeakKeyDictionary[Any, LayerJournals]" = weakref.WeakKeyDictionary()


def install_journal(viewer: Any) -> LayerJournals:
    """Journal the labels layers of ``viewer`` (idempotent)."""
    manager = _MANAGERS.get(viewer)
    if manager is None:
        manager = _MANAGERS[viewer] = LayerJournals(viewer)
        from napari_unet._widgets._rescue import recover_models

        recover_models()  # fine-tuned versions a crash lost
    return manager


def journals_of(layer: Any) -> list[LayerJournals]:
    return [m for m in list(_MANAGERS.values()) if m._entry(layer) is not None]


def note_changed(layer: Any, region: tuple | None = None) -> None:
    """A dock wrote into ``region`` of ``layer`` (None: anywhere): journal it."""
    for manager in journals_of(layer):
        manager.note_changed(layer, region)


def change_count(layer: Any) -> int | None:
    counts = [m.change_count(layer) for m in journals_of(layer)]
    return counts[0] if counts else None


def mark_saved(layer: Any, as_of: int | None = None) -> None:
    """``layer`` was exported or saved as it was at change ``as_of``: its journal is clean."""
    for manager in journals_of(layer):
        manager.mark_saved(layer, as_of)


def mark_saved_data(data: Any) -> None:
    """File > Save wrote ``data``: mark the layer holding that array saved."""
    for manager in list(_MANAGERS.values()):
        for entry in list(manager.tracked.values()):
            layer = entry.layer()
            if layer is not None and layer.data is data:
                manager.mark_saved(layer)

