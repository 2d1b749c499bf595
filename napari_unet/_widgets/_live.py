"""Live mode: the model trains while the user paints, and the prediction in view follows.

A part of the Fine-tune dock (:class:`LivePanel`). While Live is on, one napari worker runs
:meth:`napari_unet.training.live.LiveSession.run`, which alternates training rounds on the
user's corrections with predictions of the slice on screen. The main thread only:

- marks what a paint stroke, an Edit operation or a corrected-slice mark changed and, at most
  ``DEBOUNCE_MS`` later, hands the session a copy of the corrected planes that changed
  (:class:`~napari_unet.labels.plane_snapshots.PlaneSnapshots`) with a version number; the
  user's layer is never locked;
- re-targets the session at once when the view moves to another slice;
- writes each prediction into the *live prediction* layer (:mod:`._live_layer`), never into the
  user's labels.

*Apply* segments the whole image with the live weights as Segment does (:mod:`._live_apply`)
and adds them to the model list as a new version; *Stop* keeps the guarded best weights as one.
"""

from __future__ import annotations

import time
from typing import Any, Generator

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
)

from napari_unet._widgets._common import ProgressBar, ask_yes_no, button, row, status_label
from napari_unet._widgets._history import history_for
from napari_unet._widgets._live_apply import LiveApply, apply_output
from napari_unet._widgets._live_events import (
    DEBOUNCE_MS,
    LiveEventsMixin,
    LiveRun,
    same_weights,
)
from napari_unet._widgets._live_layer import (
    DISPLAYS,
    HIDDEN,
    LiveLayer,
    shown_values,
    view_plane,
)
from napari_unet._widgets._state import (
    corrected_slices,
    import_heavy_modules_on_main_thread,
    notify_error,
)
from napari_unet._widgets._workers import start_job
from napari_unet.engine.live import labels_name
from napari_unet.labels.plane_snapshots import PlaneSnapshots
from napari_unet.model.checkpoint import CheckpointError
from napari_unet.training.corrections import is_lazy
from napari_unet.training.finetune_setup import check_finetunable

__all__ = ["LivePanel", "LiveRun", "KEY", "DEBOUNCE_MS"]

#: key binding of the Live toggle (free in napari 0.9, its menus and napari-animation)
KEY = "Alt-I"
#: the "updated … s ago" line is redrawn this often (ms)
CLOCK_MS = 500


def shown(job: Generator[Any, None, Any], live_layer: LiveLayer) -> Generator[Any, None, Any]:
    """``job``'s updates with what the live layer shows of each (its outlines are made here, in
    the worker thread: see :func:`._live_layer.shown_values`); returns what ``job`` returns."""
    try:
        while True:
            try:
                update = next(job)
            except StopIteration as stop:
                return stop.value
            yield update, shown_values(update, live_layer.display)
    finally:
        job.close()


class LivePanel(LiveEventsMixin, QGroupBox):
    """The Live group of the Fine-tune dock: Live toggle, Apply, display, score and clock."""

    def __init__(self, dock: Any, layout: QVBoxLayout | None = None):
        super().__init__("Live")
        self.dock = dock
        self.viewer = dock.viewer
        self.worker: Any = None
        self._run: LiveRun | None = None
        self._alive = True
        box = QVBoxLayout(self)
        self.live_button = button(
            "Live", f"Train while you paint ({KEY.replace('-', '+')}): the prediction of the "
            "slice on screen follows your corrections in the 'live prediction' layer", self.toggle)
        self.live_button.setCheckable(True)
        self.apply_button = button(
            "Apply", "Stop training and segment the whole image with the kept weights into "
            "your labels (corrected slices are kept; Ctrl+Z undoes it)", self.apply)
        self.apply_button.setEnabled(False)
        self.cancel_button = button("Cancel", "Stop Apply at the next tile", self.cancel_apply)
        self.cancel_button.setEnabled(False)
        box.addWidget(row(self.live_button, self.apply_button, self.cancel_button))
        fields = QFormLayout()
        self.display_combo = QComboBox()
        self.display_combo.addItems([*DISPLAYS, HIDDEN])
        self.display_combo.setToolTip("How the live prediction is drawn")
        fields.addRow("Show", self.display_combo)
        self.background_spin = QSpinBox()
        self.background_spin.setRange(0, 65535)
        self.background_spin.setSpecialValueText("none")
        self.background_spin.setToolTip(
            "Empty start (a New model…): only what you paint counts; paint some background "
            "with this label id")
        fields.addRow("Background label", self.background_spin)
        box.addLayout(fields)
        self.score_label = status_label("Live: paint corrections and watch the prediction follow.")
        self.score_label.setToolTip("The live weights' score on held-out corrections (and the "
                                    "start model's), and which weights Apply and Stop keep: the "
                                    "live ones, or the start model's while it scores better")
        box.addWidget(self.score_label)
        self.clock_label = status_label("")
        self.clock_label.setToolTip("Time since the live prediction was last updated; 'up to "
                                    "date': it was made by weights trained on your latest paint")
        # texts that change every update keep their height: nothing below them moves (no
        # relayout and repaint of the dock, its loss plot included, while Live runs)
        self.clock_label.setWordWrap(False)
        self.clock_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Fixed)  # nor its width
        self.score_label.setMinimumHeight(3 * self.score_label.fontMetrics().lineSpacing())
        box.addWidget(self.clock_label)
        self.apply_progress = ProgressBar()
        self.apply_progress.setRange(0, 1)
        self.apply_progress.setValue(0)
        self.apply_progress.setFormat("%v / %m tiles")
        self.apply_progress.setTextVisible(False)  # until Apply runs
        box.addWidget(self.apply_progress)
        self.apply_status = status_label("")
        box.addWidget(self.apply_status)
        if layout is not None:
            layout.addWidget(self)

        self.live_layer = LiveLayer(self.viewer)
        self.display_combo.currentTextChanged.connect(self.live_layer.set_display)
        self.applier = LiveApply(self.viewer, self.apply_status, self.apply_progress,
                                 self.apply_button, self.cancel_button,
                                 lambda text: ask_yes_no(self, "Overwrite your corrections?", text),
                                 parent=self)
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(DEBOUNCE_MS)
        self._debounce.timeout.connect(self._submit)
        self._clock = QTimer(self)
        self._clock.setInterval(CLOCK_MS)
        self._clock.timeout.connect(self._tick)
        self.destroyed.connect(lambda *_: self._closed())

    # on and off -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether a live session runs (or is stopping)."""
        return self.worker is not None

    def toggle(self) -> None:
        """Live on, or off (the key and the button)."""
        if self.running:
            self.stop()
        else:
            self.start()
        run = self._run
        self.live_button.setChecked(self.running and run is not None and not run.stopping)

    def _labels_for(self, image: Any) -> Any:
        """The labels layer to correct: the dock's choice, else a new empty one (empty start)."""
        layer = self.dock.labels_combo.layer()
        if layer is not None:
            return layer
        shape = tuple(np.shape(image.data[0] if image.multiscale else image.data))
        layer = self.viewer.add_labels(np.zeros(shape, np.uint16), name=labels_name(image.name),
                                       scale=image.scale, translate=image.translate)
        layer.mode = "paint"
        self.dock.labels_combo.set_layer(layer)
        return layer

    def _config(self, empty: bool) -> Any:
        """The session's config from the dock's form; an empty start (a New model) learns
        from painted voxels only, with the Background label as background."""
        from napari_unet.training.live import LiveConfig

        background = self.background_spin.value() or None
        if empty and background is None:
            raise ValueError("an empty start (New model…) learns from what you paint: set "
                             "Background label to the label you paint background with")
        dock = self.dock
        return LiveConfig(precision=dock.precision_combo.currentData(),
                          device=dock.device_combo.currentData(), sparse=empty,
                          distillation=0.0 if empty else 1.0,
                          background_label=background if empty else None)

    def start(self) -> bool:
        """Start a live session on the dock's image and labels with the selected model."""
        from napari_unet.training.live import LiveSession, LiveView

        dock = self.dock
        if self.running:
            return False
        if dock.worker is not None:
            notify_error(ValueError("fine-tuning is running; Stop it first"), "Live")
            return False
        try:
            key = dock.registry.current
            model = dock.registry.get(key)
            check_finetunable(model, key)
            image = dock.image_combo.layer()
            if image is None:
                raise ValueError("choose an image (Training data)")
            empty = dock.registry.entry(key).source == "new"
            config = self._config(empty)
            labels = self._labels_for(image)
            shape = tuple(np.shape(image.data[0] if image.multiscale else image.data))
            if tuple(labels.data.shape) != shape or is_lazy(labels.data):
                raise ValueError(f"{labels.name!r} does not fit {image.name!r}: Live needs "
                                 "labels of the image's shape, in memory")
        except (ValueError, CheckpointError) as err:
            notify_error(err, "Live")
            return False
        import_heavy_modules_on_main_thread()
        history = history_for(labels)
        run = LiveRun(image=image, labels=labels, model=model, base_key=key,
                      shape=tuple(labels.data.shape), snapshots=PlaneSnapshots(),
                      paints_seen=history.paint_count)
        now = time.perf_counter()
        run.snapshots.mark(None, now)
        planes = run.snapshots.take(labels.data, corrected_slices(labels)) or {}
        version = run.snapshots.version
        if planes:
            run.waiting[version] = now
        run.view = LiveView(*view_plane(self.viewer, labels))
        data = image.data[0] if image.multiscale else image.data
        voxel_size = tuple(float(v) for v in image.scale[-len(shape):])

        def job():  # the worker thread
            session = LiveSession(model, np.asarray(data), config, voxel_size=voxel_size)
            if planes:
                session.submit_corrections(planes, version)
            session.set_view(run.view)
            run.session = session  # from now on the main thread hands it changes itself
            session.set_view(run.view)  # the view may have moved meanwhile
            if run.stopping:
                session.request_stop()
            return (yield from shown(session.run(), self.live_layer))

        self._run = run
        self.live_layer.prepare(image, run.shape)
        self.viewer.layers.selection.active = labels  # the user paints on at once
        self._hook(run)
        self.live_button.setText("Stop live")
        self.live_button.setChecked(True)
        self.apply_button.setEnabled(True)
        start_text = ("Empty start: paint a few objects, and some background with the "
                      "Background label." if empty else "Paint corrections; the prediction in "
                      "view follows.")
        self.score_label.setText(f"Live with {model.label}. {start_text}")
        self.clock_label.setText("Preparing…")
        self._clock.start()
        self.worker = start_job(job(), on_yield=self._on_update, on_return=self._on_result,
                                on_error=self._on_error, on_finish=self._on_finish)
        return True

    def stop(self) -> None:
        """End the session after its current step; its guarded best weights become a version."""
        run = self._run
        if run is None or run.finished:
            return
        run.stopping = True
        session = run.session
        if session is not None:
            session.request_stop()
        if self._alive:
            self.live_button.setText("Stopping…")
            self.live_button.setEnabled(False)

    def _closed(self) -> None:
        """The dock was closed (or the viewer): the session ends; no widget is touched again."""
        self._alive = False
        self.stop()
        self._unhook()

    # the view ---------------------------------------------------------------------------------
    def _on_update(self, item: tuple[Any, Any]) -> None:
        """A prediction of the view (main thread): into the live layer, and the numbers."""
        update, values = item
        run = self._run
        if run is None or run.finished or run.ended or not hasattr(update, "prediction"):
            return
        run.update = update
        if values is not None and self._alive:
            self.live_layer.show(run.image, run.shape, update.region, values)
            now = run.shown_at = time.perf_counter()
            for version in [v for v in run.waiting if v <= update.corrections_version]:
                run.latencies.append(now - run.waiting.pop(version))
        if self._alive:
            self._show_score(update)

    def _show_score(self, update: Any) -> None:
        if update.held_out_score is None:
            score = "Not enough corrections to judge yet"
        else:
            score = f"Held-out score {update.held_out_score:.2f}"
            if update.start_score is not None:
                score += f" (start model {update.start_score:.2f})"
        kept = "Keeps the live weights" if update.kept == "live" else "Keeps the start model"
        loss = f" · loss {update.loss:.3f}" if update.loss is not None else ""
        self.score_label.setText(f"{score}. {kept}. {update.iteration} steps{loss}.")

    def _tick(self) -> None:
        """The clock: seconds since the live prediction was last updated."""
        run = self._run
        if run is None or not self._alive:
            return
        if run.finished:
            self._clock.stop()
            return
        if run.shown_at is None:
            self.clock_label.setText(f"Preparing… {run.elapsed():.0f} s")
            return
        update = run.update
        latest = update is not None and update.corrections_version >= run.snapshots.version
        state = "up to date" if latest else "learning your latest…"
        self.clock_label.setText(f"Updated {time.perf_counter() - run.shown_at:.1f} s ago · "
                                 f"{state}")

    # apply ------------------------------------------------------------------------------------
    def _add_version(self, model: Any) -> str:
        """``model`` as a new version in the model list, the one Revert and Save use."""
        run, dock = self._run, self.dock
        key = dock.registry.add_model(model, parent_key=run.base_key)
        dock.base_key, dock.result_key = run.base_key, key
        if self._alive:
            dock.revert_button.setEnabled(True)
        return key

    def apply(self) -> bool:
        """Segment the whole image with the live weights (corrected slices kept, one undo step).

        Training stops first: on a small CPU a whole-image run beside the training loses
        badly to both (their OpenMP threads wait for each other), and the weights Apply uses
        are the ones Stop keeps (a new version). Live can be turned on again afterwards: it
        starts from that version.
        """
        run = self._run
        if run is None or (run.finished and run.result is None):
            notify_error(ValueError("turn Live on and let it train first"), "Apply")
            return False
        if self.applier.running:
            self.apply_status.setText("Apply is already running.")
            return False
        if not run.finished:
            run.apply_after = True
            self.stop()
            self.apply_status.setText("Stopping live training, then Apply…")
            return True
        return self._start_apply(run)

    def _start_apply(self, run: LiveRun) -> bool:
        """Apply the weights the run kept to the whole image (see :meth:`apply`)."""
        run.apply_after = False
        dock = self.dock
        return self.applier.start(run.result, run.image, run.labels,
                                  apply_output(run.result, run.snapshots.planes),
                                  device=dock.device_combo.currentData(),
                                  precision=dock.precision_combo.currentData(),
                                  precision_label=dock.settings.precision_label())

    def cancel_apply(self) -> None:
        self.applier.cancel()

    # the end ----------------------------------------------------------------------------------
    def _on_result(self, model: Any) -> None:
        """Stopped: the guarded best weights become a version (unless they are the start
        model's)."""
        run = self._run
        run.ended, run.result = True, model
        if model is None or same_weights(model, run.model):
            run.result = run.model
            text = f"Live stopped: the live weights did not beat {run.model.label}; it is kept."
        else:
            run.result_key = self._add_version(model)
            text = f"Live stopped: its best weights are the new version {run.result_key}."
        if self._alive:
            self.score_label.setText(text)

    def _on_error(self, err: BaseException) -> None:
        message = notify_error(err, "Live")
        if self._alive:
            self.score_label.setText(message)

    def _on_finish(self) -> None:
        run = self._run
        run.finished = True
        self.worker = None
        self._unhook()
        if not self._alive:
            return
        try:
            self._debounce.stop()
            self._clock.stop()
            self.live_button.setText("Live")
            self.live_button.setChecked(False)
            self.live_button.setEnabled(True)
            self.apply_button.setEnabled(run.result is not None)
            if run.shown_at is not None:
                self.clock_label.setText(f"Stopped after {run.elapsed():.0f} s.")
        except RuntimeError:  # the Qt objects are gone
            return
        if run.apply_after and run.result is not None:
            self._start_apply(run)

    @property
    def latencies(self) -> list[float]:
        """Seconds from each correction to the first shown prediction trained on it."""
        return list(self._run.latencies) if self._run is not None else []
