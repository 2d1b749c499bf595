"""Small Qt helpers shared by the docks (qtpy only)."""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Iterator

import numpy as np
from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from napari_unet.progress import drain

#: file dialog filter of "Load model file…" (Segment and Fine-tune)
MODEL_FILE_FILTER = ("Models (*.pt *.pth *.zip *.yaml *.yml);;napari-unet checkpoints (*.pt *.pth);;"
                     "bioimage.io packages (*.zip rdf.yaml *.yaml);;All files (*)")


def ask_model_file(parent: QWidget) -> str | None:
    """Ask for a model file: a napari-unet checkpoint or a bioimage.io package."""
    path, _ = QFileDialog.getOpenFileName(parent, "Load a model file", "", MODEL_FILE_FILTER)
    return path or None


class ProgressBar(QProgressBar):
    """A QProgressBar whose ``setValue`` and ``setRange`` do not repaint at once.

    ``QProgressBar.setValue`` calls ``repaint()``, and so does ``setRange`` below the value (its
    ``reset()``, e.g. at each Segment click): one more synchronous flush of the whole window
    (in napari with a software OpenGL stack, ~15 ms or more of blocked event loop). Here the
    bar is repainted with the window's other changes, in one flush.
    """

    def setValue(self, value: int) -> None:  # noqa: N802 - Qt API
        if value != self.value():
            self._later(super().setValue, value)

    def setRange(self, minimum: int, maximum: int) -> None:  # noqa: N802 - Qt API
        self._later(super().setRange, minimum, maximum)

    def _later(self, method: Callable[..., None], *args: int) -> None:
        self.setUpdatesEnabled(False)
        try:
            method(*args)
        finally:
            self.setUpdatesEnabled(True)  # schedules update() (no immediate repaint)


def button(text: str, tooltip: str, slot: Any = None, parent: QWidget | None = None) -> QPushButton:
    widget = QPushButton(text, parent)
    widget.setToolTip(tooltip)
    if slot is not None:
        widget.clicked.connect(lambda _checked=False: slot())
    return widget


def row(*widgets: QWidget) -> QWidget:
    holder = QWidget()
    layout = QHBoxLayout(holder)
    layout.setContentsMargins(0, 0, 0, 0)
    for widget in widgets:
        layout.addWidget(widget)
    return holder


def status_label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextSelectableByMouse)
    label.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
    label.setToolTip("What the dock did last")
    return label


def scrolled(*widgets: QWidget, min_height: int = 60) -> QScrollArea:
    """``widgets`` at the top of a frameless scroll area (vertical only) that takes the space
    given to it: long status text scrolls instead of squeezing the form above it."""
    holder = QWidget()
    layout = QVBoxLayout(holder)
    layout.setContentsMargins(0, 0, 0, 0)
    for widget in widgets:
        layout.addWidget(widget)
    layout.addStretch(1)
    area = QScrollArea()
    area.setWidget(holder)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
    area.setMinimumHeight(min_height)
    return area


def form(parent: QWidget) -> QFormLayout:
    layout = QFormLayout()
    layout.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
    return layout


def connect_until_destroyed(widget: QWidget, signal: Any, slot: Any) -> None:
    """Connect a psygnal ``signal`` to ``slot`` and disconnect it when ``widget`` is deleted.

    The registry outlives the docks; a closed dock must not be called again.
    """
    signal.connect(slot)

    def disconnect(*_args: Any) -> None:
        try:
            signal.disconnect(slot)
        except (ValueError, RuntimeError):
            pass

    widget.destroyed.connect(disconnect)


def ask_yes_no(parent: QWidget, title: str, text: str) -> bool:
    """A modal Yes/No question (default: No); True for Yes."""
    answer = QMessageBox.question(parent, title, text, QMessageBox.Yes | QMessageBox.No,
                                  QMessageBox.No)
    return answer == QMessageBox.Yes


def resolved_precision(precision: str, device: str) -> str:
    """What ``precision`` on ``device`` means here, e.g. ``bf16 (auto: native bf16 CPU)``.

    Raises
    ------
    ValueError
        For a precision the device cannot run (bf16 on a GPU without it, fp16 on MPS).
    """
    from napari_unet.engine.devices import select_device
    from napari_unet.model.precision import resolve_precision

    return resolve_precision(precision, select_device(device)).label()


class DockKeys(QObject):
    """Viewer key bindings that live as long as a dock is in the window.

    Bound when the dock is created; released when it is taken out of the window (napari's close
    button un-parents the dock's widget) or deleted, putting back what was bound before, if
    anything; bound again if the widget is docked again.
    """

    def __init__(self, widget: QWidget, viewer: Any, bindings: dict[str, Callable[[], Any]]):
        super().__init__(widget)
        self._viewer = viewer
        self._slots = bindings
        self._bound: dict[str, tuple[Any, Any]] = {}  # key -> (our function, previous one)
        self._had_parent = widget.parent() is not None
        widget.installEventFilter(self)
        widget.destroyed.connect(self._release_keys)
        self.bind()

    @property
    def keys(self) -> list[str]:
        return list(self._slots)

    def bind(self) -> None:
        """Bind the keys (again); what was bound to them is kept to be put back."""
        for key, slot in self._slots.items():
            if key in self._bound:
                continue

            def function(_viewer: Any, slot: Callable[[], Any] = slot) -> None:
                slot()

            previous = self._viewer.bind_key(key, function, overwrite=True)
            if getattr(previous, "_napari_unet_released", False):
                previous = None
            self._bound[key] = (function, previous)

    def release(self) -> None:
        """Unbind our keys; a key another binding took over meanwhile is left alone."""
        self._release_keys()

    def _release_keys(self, *_args: Any) -> None:
        from napari.utils.key_bindings import coerce_keybinding

        bound, self._bound = self._bound, {}
        for key, (function, previous) in bound.items():
            function._napari_unet_released = True
            keymap = self._viewer.keymap
            if keymap.get(coerce_keybinding(key)) is not function:
                continue
            if previous is not None:
                self._viewer.bind_key(key, previous, overwrite=True)
            else:
                self._viewer.bind_key(key, None)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt API
        if event.type() == QEvent.ParentChange:
            has_parent = watched.parent() is not None
            if has_parent and not self._had_parent:
                self.bind()
            elif not has_parent and self._had_parent:
                self.release()
            self._had_parent = has_parent
        return False


class MainThreadSteps(QObject):
    """Run a generator on the main thread a few milliseconds at a time.

    Big copies into a napari layer (a finished segmentation, a snapshot) must happen on the
    main thread; done in one go they would block the event loop. Each timer tick runs steps
    until ``budget_s`` is spent, then lets Qt process events. ``on_done(value)`` gets the
    generator's return value.
    """

    def __init__(self, steps: Iterator[Any], on_done: Callable[[Any], None],
                 budget_s: float = 0.012, parent: QObject | None = None,
                 on_error: Callable[[BaseException], None] | None = None):
        super().__init__(parent)
        self._steps = steps
        self._on_done = on_done
        self._on_error = on_error
        self._budget = budget_s
        self.done = False
        self._timer = QTimer(self)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self._tick)

    def start(self) -> "MainThreadSteps":
        self._timer.start()
        return self

    def _tick(self) -> None:
        end = time.perf_counter() + self._budget
        try:
            while time.perf_counter() < end:
                next(self._steps)
        except StopIteration as stop:
            self._timer.stop()
            self.done = True
            self._on_done(stop.value)
        except Exception as err:  # noqa: BLE001 - handed to the dock, or raised to napari
            self._timer.stop()
            self.done = True
            if self._on_error is None:
                raise
            self._on_error(err)

    def finish_now(self) -> None:
        """Run the remaining steps at once (the dock is closing)."""
        if self.done:
            return
        self._timer.stop()
        result = drain(self._steps)
        self.done = True
        self._on_done(result)


#: bytes written per piece by :class:`ChunkedWriter`. The first write into fresh memory costs a
#: page fault per 4 kB page (measured ~70 us each on the project's shared VM: 16 MB = 0.28 s),
#: so pieces stay small and a pass of the event loop writes only a few of them
WRITE_PIECE_BYTES = 512 * 2**10


def pieces(region: tuple[slice, ...], values: np.ndarray, piece_bytes: int = WRITE_PIECE_BYTES,
           axis: int = 0) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """Split a write of ``values`` into ``region`` into pieces of at most ``piece_bytes``: runs
    along the first axis, and where one index of it is still larger, along the next axes
    (never along the last one)."""
    if values.nbytes <= piece_bytes or axis >= values.ndim - 1 or values.shape[axis] == 0:
        yield region, values
        return
    n = values.shape[axis]
    per = values.nbytes // n
    step = piece_bytes // per if per <= piece_bytes else 1
    start = region[axis].start or 0
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        sub_region = (*region[:axis], slice(start + lo, start + hi), *region[axis + 1:])
        sub_values = values[(slice(None),) * axis + (slice(lo, hi),)]
        if step == 1 and per > piece_bytes:
            yield from pieces(sub_region, sub_values, piece_bytes, axis + 1)
        else:
            yield sub_region, sub_values


class ChunkedWriter(QObject):
    """Writes blocks into a napari layer's array on the main thread, a piece at a time.

    ``push(region, values, then)`` queues a block; a 0 ms timer writes pieces (see
    :func:`pieces`) until ``budget_s`` is spent per event-loop pass, so a large block (a finished
    segmentation, tiles into fresh memory) never blocks the viewer for long. ``then()`` runs
    once the block is written; ``write(region, values)`` does the writing (the caller decides
    what it skips).
    """

    def __init__(self, write: Callable[[tuple[slice, ...], np.ndarray], Any],
                 budget_s: float = 0.010, parent: QObject | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 piece_bytes: int = WRITE_PIECE_BYTES):
        super().__init__(parent)
        self._write = write
        self._budget = budget_s
        self._on_error = on_error
        self._piece_bytes = piece_bytes
        self._queue: deque[tuple[Iterator[Any], Callable[[], None] | None]] = deque()
        self._timer = QTimer(self)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self._tick)

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    def push(self, region: tuple[slice, ...], values: np.ndarray,
             then: Callable[[], None] | None = None, itemsize: int | None = None) -> None:
        """Queue ``values`` for ``region``; ``itemsize``: bytes per element of the array written
        into (pieces are sized by what is written there, e.g. uint8 tiles into uint32 labels)."""
        piece = self._piece_bytes
        if itemsize:
            piece = max(1, piece * values.itemsize // itemsize)
        self._enqueue(pieces(region, values, piece), then)

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once everything queued so far is written (now if nothing is)."""
        if not self._queue:
            callback()
        else:
            self._enqueue(iter(()), callback)

    def _enqueue(self, block: Iterator[Any], then: Callable[[], None] | None) -> None:
        self._queue.append((block, then))
        if not self._timer.isActive():
            self._timer.start()

    def _tick(self) -> None:
        end = time.perf_counter() + self._budget
        first = True  # at least one piece per pass, whatever the budget
        while self._queue and (first or time.perf_counter() < end):
            first = False
            block, then = self._queue[0]
            try:
                region, values = next(block)
                self._write(region, values)
            except StopIteration:
                self._queue.popleft()
                if then is not None:
                    then()
            except Exception as err:  # noqa: BLE001 - the block is dropped, the dock told
                self._queue.popleft()
                if self._on_error is None:
                    raise
                self._on_error(err)
        if not self._queue:
            self._timer.stop()

    def flush(self) -> None:
        """Write everything queued now (the run ends or the dock closes)."""
        self._timer.stop()
        while self._queue:
            block, then = self._queue.popleft()
            for region, values in block:
                self._write(region, values)
            if then is not None:
                then()
