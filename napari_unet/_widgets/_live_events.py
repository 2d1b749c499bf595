"""Live mode, the main thread's side of a session: what the panel keeps of it
(:class:`LiveRun`), and the events that feed it (:class:`LiveEventsMixin`): paint strokes, Edit
operations and corrected-slice marks become snapshots of the changed planes handed to the
session (at most ``DEBOUNCE_MS`` after the change, the user's layer never locked), and a move of
the view re-targets the session's next prediction at once. Every callback costs a few ms at most:
a copy of the planes that changed, no more."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from napari_unet._widgets._history import history_for
from napari_unet._widgets._live_layer import view_plane
from napari_unet._widgets._state import (
    corrected_slices,
    corrections_changed,
    layer_view_axis,
    notify_error,
)
from napari_unet.labels.plane_snapshots import PlaneSnapshots
from napari_unet.labels.slices import touched_slices

#: a change enters a snapshot at most this long after it (ms); changes meanwhile join it
DEBOUNCE_MS = 150


@dataclass
class LiveRun:
    """What the panel keeps of the live session in progress (or the last one)."""

    image: Any
    labels: Any
    #: the model Live started from, and its key in the model list
    model: Any
    base_key: str
    #: spatial shape of the image
    shape: tuple[int, ...]
    snapshots: PlaneSnapshots
    start: float = field(default_factory=time.perf_counter)
    #: the session, once the worker made it (the main thread talks to it from then on)
    session: Any = None
    #: the view on screen (a LiveView)
    view: Any = None
    #: the latest LiveUpdate
    update: Any = None
    #: ``time.perf_counter()`` when the last prediction was shown
    shown_at: float | None = None
    #: version -> when its oldest correction was made, until a prediction trained on it shows
    waiting: dict[int, float] = field(default_factory=dict)
    #: seconds from a correction to a shown prediction that trained on it
    latencies: list[float] = field(default_factory=list)
    #: napari paint steps seen (a history notice with the same count is not a stroke)
    paints_seen: int = 0
    #: the weights run() kept (the start model when nothing beat it), and their new version
    result: Any = None
    result_key: str | None = None
    #: Apply was asked for: it runs once training has stopped
    apply_after: bool = False
    stopping: bool = False
    ended: bool = False
    finished: bool = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def same_weights(a: Any, b: Any) -> bool:
    """Whether two models hold the same weights (what Stop kept and the start model)."""
    import torch

    if a is b:
        return True
    if a is None or b is None:
        return False
    sa, sb = a.network.state_dict(), b.network.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class LiveEventsMixin:
    """The panel's event handlers of a live session; the panel provides ``viewer``, ``_run``,
    ``_alive`` and the ``_debounce`` timer (single shot, ``DEBOUNCE_MS``, calling
    :meth:`_submit`)."""

    viewer: Any
    _run: LiveRun | None
    _alive: bool
    _debounce: Any

    def _hook(self, run: LiveRun) -> None:
        """Listen to the labels, the corrected-slice marks and the view, for ``run``."""
        run.labels.events.paint.connect(self._painted)
        history_for(run.labels).observers.append(self._history_changed)
        corrections_changed.connect(self._marks_changed)
        dims = self.viewer.dims.events
        for emitter in (dims.current_step, dims.order, dims.ndisplay):
            emitter.connect(self._view_moved)

    # corrections ------------------------------------------------------------------------------
    def _painted(self, event: Any) -> None:
        """A paint stroke on the labels: its planes are re-copied in the next snapshot (napari's
        paint events also mark them corrected, see :func:`._state.mark_painted`)."""
        run = self._run
        if run is None or run.finished or event.source is not run.labels:
            return
        layer = run.labels
        if layer.ndim < 3:
            planes: set = {0}
        else:
            axis = layer_view_axis(layer)
            planes = {z if axis == 0 else (axis, z)
                      for z in touched_slices(event.value, layer.ndim, axis)}
        run.snapshots.mark(planes, time.perf_counter())
        self._schedule()

    def _history_changed(self, _touched: Any) -> None:
        """An Edit operation, undo or a Segment/Apply result changed the labels: any corrected
        plane may have changed (a stroke is handled by :meth:`_painted`)."""
        run = self._run
        if run is None or run.finished:
            return
        count = history_for(run.labels).paint_count
        if count != run.paints_seen:
            run.paints_seen = count
            return
        run.snapshots.mark(None, time.perf_counter())
        self._schedule()

    def _marks_changed(self, layer: Any) -> None:
        run = self._run
        if run is not None and not run.finished and layer is run.labels:
            run.snapshots.mark((), time.perf_counter())
            self._schedule()

    def _schedule(self) -> None:
        if self._alive and not self._debounce.isActive():
            self._debounce.start()

    def _submit(self) -> None:
        """Hand the session a snapshot of the corrected planes that changed (main thread: a
        copy of those planes only)."""
        run = self._run
        if run is None or run.finished or run.stopping or not run.snapshots.pending:
            return
        session = run.session
        if session is None:  # the worker is still making it
            self._debounce.start()
            return
        since = run.snapshots.since or time.perf_counter()
        planes = run.snapshots.take(run.labels.data, corrected_slices(run.labels))
        if planes is None:
            return
        try:
            session.submit_corrections(planes, run.snapshots.version)
        except ValueError as err:  # planes the session cannot use: said, the session goes on
            notify_error(err, "Live")
            return
        run.waiting[run.snapshots.version] = since

    # the view ---------------------------------------------------------------------------------
    def _view_moved(self, _event: Any = None) -> None:
        """Another slice (or axis) on screen: the session predicts it next."""
        from napari_unet.training.live import LiveView

        run = self._run
        if run is None or run.finished or run.labels not in self.viewer.layers:
            return
        view = LiveView(*view_plane(self.viewer, run.labels))
        if view == run.view:
            return
        run.view = view
        session = run.session
        if session is not None:
            session.set_view(view)

    def _unhook(self) -> None:
        run = self._run
        if run is None:
            return
        try:
            run.labels.events.paint.disconnect(self._painted)
        except (TypeError, ValueError, RuntimeError):
            pass
        observers = history_for(run.labels).observers
        if self._history_changed in observers:
            observers.remove(self._history_changed)
        try:
            corrections_changed.disconnect(self._marks_changed)
        except (ValueError, RuntimeError):
            pass
        dims = self.viewer.dims.events
        for emitter in (dims.current_step, dims.order, dims.ndisplay):
            try:
                emitter.disconnect(self._view_moved)
            except (TypeError, ValueError, RuntimeError):
                pass
