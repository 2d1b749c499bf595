"""Fine-tune dock: train a copy of the model on the user's corrected labels, live."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QComboBox, QFileDialog, QFormLayout, QVBoxLayout, QWidget

from napari_unet._widgets._common import (
    DockKeys,
    ProgressBar,
    ask_model_file,
    button,
    connect_until_destroyed,
    row,
    scrolled,
    status_label,
)
from napari_unet._widgets._fields import LayerChoices, fill_model_combo, select_model_in_combo
from napari_unet._widgets._finetune_form import TrainingData, TrainingSettings
from napari_unet._widgets._live import KEY as LIVE_KEY, LivePanel
from napari_unet._widgets._loss_plot import LossPlot
from napari_unet._widgets._new_model import NewModelDialog, NewModelSpec
from napari_unet._widgets._state import (
    current_slice_index,
    format_seconds,
    get_registry,
    import_heavy_modules_on_main_thread,
    install_correction_tracking,
    notify_error,
)
from napari_unet._widgets._rescue import FineTuneRescue, model_saved
from napari_unet._widgets._workers import start_job
from napari_unet.io.export_paths import checkpoint_file_name, checkpoint_path
from napari_unet.model.checkpoint import CheckpointError, save_checkpoint
from napari_unet.training import run_summary
from napari_unet.training.corrections import snapshot_labels
from napari_unet.training.finetune_setup import check_finetunable
from napari_unet.training.new_models import build_new_model, new_model_text
from napari_unet.training.preview import (
    preview_foreground,
    preview_slab,
    preview_translate,
)

__all__ = ["FineTuneWidget", "FineTuneRun", "LossPlot", "snapshot_labels", "KEY", "PREVIEW_LAYER",
           "PLOT_INTERVAL"]

PREVIEW_LAYER = "fine-tune preview"
#: key binding of Fine-tune (Alt+F is napari's File menu and napari-animation's key frame)
KEY = "Alt-U"
#: the loss curve is redrawn at most this often (seconds)
PLOT_INTERVAL = 0.5


@dataclass
class FineTuneRun:
    """What the dock keeps of the run in progress (or the last one)."""

    model: Any
    #: the image layer the preview belongs to
    image: Any
    #: first slice of the previewed part of ``image``
    preview_z: int
    #: ``time.perf_counter()`` at the start
    start: float
    #: what the training data is (for the status line)
    notes: list[str]
    #: the precision it trains in, resolved (``bf16``, …)
    precision: str
    preview_shape: tuple[int, ...] | None = None
    #: the latest :class:`~napari_unet.training.config.TrainingStats`
    stats: Any = None
    #: whether the Trainer said it keeps the best-scoring weights (None: not said yet)
    keeps_best: bool | None = None
    #: new stats not yet shown
    fresh: bool = False
    #: view timer ticks so far
    tick: int = 0
    #: the job returned or failed
    ended: bool = False
    #: the worker finished (its last signal)
    finished: bool = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class FineTuneWidget(LayerChoices, QWidget):
    """Fine-tune the selected model on image + labels pairs (corrected slices of stacks)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.registry = get_registry()
        install_correction_tracking(napari_viewer)
        import_heavy_modules_on_main_thread()  # never in the worker (see _state)
        self.worker: Any = None
        #: the running job's :class:`~napari_unet.training.Trainer` (its stop handle)
        self.training_job: Any = None
        self._stop_early = False
        self._pbar: Any = None
        self._run: FineTuneRun | None = None
        self.base_key: str | None = None
        self.result_key: str | None = None
        self.last_stats: Any = None
        #: extra TrainingConfig fields (batch_size, patch_shape, ...); empty = automatic
        self.config_overrides: dict[str, Any] = {}

        layout = QVBoxLayout(self)
        fields = QFormLayout()
        layout.addLayout(fields)
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Model to start from (the one selected in the Segment dock); "
                                    "it is never changed: fine-tuning makes a new version")
        fields.addRow("Model", self.model_combo)
        self.new_model_button = button(
            "New model…", "Start from an untrained 2D or 3D model (foreground, foreground + "
            "boundary, membranes or classes) made for the labels layer below", self.choose_new_model)
        self.load_button = button(
            "Load file…", "Add a napari-unet checkpoint (.pt) or a bioimage.io package "
            "(.zip, rdf.yaml) made by napari-unet to the list, to fine-tune it",
            self._choose_model_file)
        fields.addRow("", row(self.new_model_button, self.load_button))

        #: the image + labels pairs (see :mod:`._finetune_form`)
        self.data = TrainingData(napari_viewer, layout)
        self.image_combo, self.labels_combo = self.data.image_combo, self.data.labels_combo
        self.pair_list, self.corrected_only = self.data.pair_list, self.data.corrected_only
        #: the run's settings
        self.settings = TrainingSettings(layout, PREVIEW_LAYER)
        form = self.settings
        self.time_spin, self.iterations_spin, self.lr_spin = (
            form.time_spin, form.iterations_spin, form.lr_spin)
        self.validation_check, self.device_combo = form.validation_check, form.device_combo
        self.precision_combo, self.preview_check = form.precision_combo, form.preview_check

        self.finetune_button = button("Fine-tune", f"Start fine-tuning in the background "
                                      f"({KEY.replace('-', '+')})", self.fine_tune)
        self.stop_button = button("Stop", "Stop now: keeps the best-scoring weights when a part is "
                                  "held out, else the last ones", self.stop)
        self.stop_button.setEnabled(False)
        layout.addWidget(row(self.finetune_button, self.stop_button))
        self.revert_button = button("Revert", "Go back to the model version before this "
                                    "fine-tuning (removes the new version from the list)",
                                    self.revert)
        self.revert_button.setEnabled(False)
        self.save_button = button("Save model…", "Write the selected/new model to a .pt file",
                                  self._choose_save_path)
        layout.addWidget(row(self.revert_button, self.save_button))
        # Live mode (trains while you paint, see _live): in the scrolling part below
        self.live = LivePanel(self)

        self.progress_bar = ProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(False)
        self.progress_bar.setToolTip("Progress by iterations or time limit")
        layout.addWidget(self.progress_bar)
        self.plot = LossPlot()
        layout.addWidget(self.plot.canvas)
        self.weights_label = status_label("")
        self.weights_label.setToolTip("Which weights the new version gets: the best-scoring ones "
                                      "(a part is held out) or the last ones")
        self.status = status_label("Correct some slices (Edit dock), then click Fine-tune.")
        # the free space goes to the status lines, which scroll: a status that wraps to more
        # lines moves nothing above it (no relayout of the whole dock) and, in a narrow and short
        # dock, does not squeeze the form
        layout.addWidget(scrolled(self.live, self.weights_label, self.status), 1)

        # the view (status, progress, loss curve) is redrawn by this timer, not per iteration;
        # it ticks twice per PLOT_INTERVAL: the dock, then napari's activity bar (see _refresh_view)
        self._timer = QTimer(self)
        self._timer.setInterval(int(PLOT_INTERVAL * 500))
        self._timer.timeout.connect(self._refresh_view)

        self.model_combo.currentIndexChanged.connect(self._model_selected)
        connect_until_destroyed(self, self.registry.changed, self._fill_models)
        connect_until_destroyed(self, self.registry.current_changed, self._show_current)
        self._fill_models()
        self.keys = DockKeys(self, napari_viewer, {KEY: self.fine_tune, LIVE_KEY: self.live.toggle})
        #: False once the dock's Qt objects are deleted (dock or viewer closed): the worker's
        #: last callbacks then leave the widgets alone
        self._alive = True
        self.destroyed.connect(lambda *_: self._closed())

    def _closed(self) -> None:
        """The dock was closed during a run: end training at the next iteration (the best
        weights so far still become a version); no widget is touched from now on."""
        self._alive = False
        self._stop_early = True
        if getattr(self, "training_job", None) is not None:
            self.training_job.request_stop()

    # models -----------------------------------------------------------------------------------
    def _fill_models(self) -> None:
        if fill_model_combo(self.model_combo, self.registry):
            self._show_current(self.registry.current or "")

    def _show_current(self, key: str) -> None:
        select_model_in_combo(self.model_combo, key)

    def _model_selected(self, index: int) -> None:
        key = self.model_combo.itemData(index)
        if key:
            self.registry.current = key

    def _choose_model_file(self) -> None:
        path = ask_model_file(self)
        if path:
            self.load_model_file(path)

    def load_model_file(self, path: str | Path) -> str | None:
        """Add a model file to the list (shared with Segment) and select it; errors become
        notifications."""
        try:
            key = self.registry.add_file(path)
        except CheckpointError as err:
            notify_error(err, "Load model")
            return None
        model = self.registry.get(key)
        self.status.setText(run_summary.loaded_model_text(key, getattr(model, "foreign", False)))
        return key

    # pairs ------------------------------------------------------------------------------------
    def add_pair(self) -> None:
        self.data.add_pair()

    def remove_pair(self) -> None:
        self.data.remove_pair()

    def _pairs(self) -> list[tuple[Any, Any]]:
        return self.data.layers()

    def training_pairs(self) -> tuple[list[Any], list[str]]:
        """TrainingPairs from the chosen layers, and notes for the status line.

        The labels are a snapshot taken now (the corrected slices, or everything when none are
        marked): painting while training changes nothing in this run. The images stay as they
        are (a lazy, dask-backed image is read in the worker, not here).
        """
        return self.data.training_pairs()

    def validation_expected(self, pairs: list[Any]) -> bool:
        """Whether a part can be held out (2 or more corrected slices or images)."""
        return self.settings.validation_expected(pairs)

    # new models -------------------------------------------------------------------------------
    def choose_new_model(self) -> str | None:
        """Ask for a new model (dialog) and add it to the list, selected."""
        dialog = NewModelDialog(self.labels_combo.layer(), self)
        if not dialog.exec_():
            return None
        try:
            spec = dialog.spec()
        except ValueError as err:
            notify_error(err, "New model")
            return None
        return self.create_model(spec)

    def create_model(self, spec: NewModelSpec) -> str | None:
        """Build an untrained model from ``spec``
        (:func:`~napari_unet.training.new_models.build_new_model`), add it to the model list and
        select it; returns its key."""
        try:
            model = build_new_model(spec)
        except ValueError as err:
            notify_error(err, "New model")
            return None
        key = self.registry.add_model(model, select=True, source="new")
        self.status.setText(new_model_text(key, spec))
        return key

    # run --------------------------------------------------------------------------------------
    def _preview_input(self, image: Any, model: Any) -> tuple[Any | None, int]:
        """The part of ``image`` re-predicted for the preview (a view or a lazy slice, read in
        the worker), and its first slice index."""
        data = image.data[0] if image.multiscale else image.data
        if not self.preview_check.isChecked():
            return None, 0
        if np.ndim(data) == 2:
            return data, 0
        return preview_slab(data, current_slice_index(self.viewer, image), model.spatial_dims,
                            model.config.divisor()[0])

    def fine_tune(self) -> None:
        """Start fine-tuning in a worker; the new version is added to the model list."""
        from napari.utils.notifications import show_info

        from napari_unet.training.trainer import Trainer

        if self.worker is not None or self.live.running:
            show_info("Fine-tuning or Live is already running; Stop it first.")
            return
        try:
            key = self.registry.current
            model = self.registry.get(key)
            check_finetunable(model, key)
            precision_label = self.settings.precision_label()
            pairs, notes = self.training_pairs()
        except (ValueError, CheckpointError) as err:
            notify_error(err, "Fine-tune")
            return
        # torch._dynamo/triton are imported by the first optimizer step: do it here, not in the
        # worker thread (CUDA builds crashed napari importing triton in a worker)
        import_heavy_modules_on_main_thread()
        image_layer = self._pairs()[0][0]
        preview_image, preview_z = self._preview_input(image_layer, model)
        config = self.settings.config(self.config_overrides)

        self.base_key = key
        self.training_job = None
        self._stop_early = False
        self._run = run = FineTuneRun(model=model, image=image_layer, preview_z=preview_z,
                                      start=time.perf_counter(), notes=notes,
                                      precision=precision_label)

        def job():  # runs in the worker thread
            # lazy (dask) images and the preview slab are read here, not on the main thread
            for pair in pairs:
                pair.image = np.asarray(pair.image)
                pair.labels = np.asarray(pair.labels)
            if preview_image is not None:
                config.preview_image = np.asarray(preview_image)
            trainer = Trainer(model, pairs, config)  # prepares the data
            self.training_job = trainer
            if self._stop_early:
                trainer.request_stop()
            result = yield from trainer.run()
            return result

        self.plot.clear(time_limit=config.time_limit, iterations=config.iterations)
        self._pbar = None  # napari's activity bar (~75 ms): made by the timer, not in the click
        self.progress_bar.setValue(0)
        self.finetune_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.revert_button.setEnabled(False)
        self.status.setText(run_summary.preparing_text(model.label, precision_label, notes))
        self.weights_label.setText(run_summary.weights_plan_text(self.validation_expected(pairs)))
        if preview_image is not None:  # the preview layer appears at the next event-loop pass
            run.preview_shape = tuple(preview_image.shape)
            self._first_preview(run)
        self._timer.start()
        self.rescue = FineTuneRescue(model.label)  # its best weights survive a crash
        self.worker = start_job(job(), on_yield=self._on_stats, on_return=self._on_result,
                                on_error=self._on_error, on_finish=self._on_finish)

    def stop(self) -> None:
        """End training at the next iteration; the best weights so far become the new version."""
        self._stop_early = True
        if self.training_job is not None:
            self.training_job.request_stop()
        self.status.setText("Stopping after this iteration…")

    def _on_stats(self, stats: Any) -> None:
        """Each iteration: keep the numbers; the view is redrawn by the timer (cheap here)."""
        run = self._run
        if run is None or run.finished or run.ended or not self._alive:  # a late update
            return
        self.last_stats = run.stats = stats
        if stats.message and run.keeps_best is None:
            # the Trainer says what it held out and which weights it keeps
            run.keeps_best = bool(stats.keeps_best)
            self.weights_label.setText(run_summary.trainer_message_text(stats.message))
        self.plot.add(stats)
        self.rescue.progress(self.training_job)
        run.fresh = True
        if stats.preview is not None:
            self._show_preview(stats.preview)

    def _refresh_view(self) -> None:
        """Timer tick while training. Odd ticks (every PLOT_INTERVAL): the dock's status, progress
        bar and loss curve, repainted together. Even ticks: napari's activity-panel bar, alone:
        it calls processEvents, i.e. repaints the window at once, so it gets its own tick."""
        run = self._run
        if run is None:
            return
        stats = run.stats  # this run's latest
        run.tick += 1
        if run.ended or stats is None:
            return
        fraction = stats.fraction
        if run.tick % 2:
            if run.fresh:
                run.fresh = False
                self.progress_bar.setValue(int(1000 * fraction))
                self.status.setText(run_summary.progress_text(
                    stats, run.precision, format_seconds(stats.elapsed)))
            self.plot.draw()
        elif self._pbar is None:
            from napari.utils import progress

            self._pbar = progress(total=1000, desc=f"Fine-tune {run.model.label}")
        elif int(1000 * fraction) != self._pbar.n:
            self._pbar.update(int(1000 * fraction) - self._pbar.n)

    def _first_preview(self, run: FineTuneRun) -> None:
        """An empty preview layer (adding a layer costs ~100 ms: not in the click handler)."""
        if self._alive and run is self._run and not run.ended and PREVIEW_LAYER not in self.viewer.layers:
            self._show_preview(np.zeros((1, *run.preview_shape), np.float32))

    def _show_preview(self, probabilities: np.ndarray) -> None:
        run = self._run
        image = run.image
        foreground = preview_foreground(probabilities, run.model.task, image.ndim)
        translate = preview_translate(image.translate, image.scale, image.ndim, run.preview_z)
        if PREVIEW_LAYER in self.viewer.layers:
            layer = self.viewer.layers[PREVIEW_LAYER]
            data = layer.data
            if (isinstance(data, np.ndarray) and data.shape == foreground.shape
                    and data.dtype == np.float32 and data.flags.writeable):
                if not np.allclose(layer.translate, translate):
                    layer.translate = translate
                # in place + one refresh: no new array, no data event, no dims update
                data[...] = foreground
                layer.refresh()
                return
            self.viewer.layers.remove(layer)
        # the layer owns its array (it is written in place later)
        self.viewer.add_image(np.array(foreground, dtype=np.float32), name=PREVIEW_LAYER,
                              scale=image.scale, translate=translate, colormap="magma",
                              blending="additive", opacity=0.6, contrast_limits=(0.0, 1.0))

    def _on_result(self, model: Any) -> None:
        self._run.ended = True
        if not self._alive:  # closed while training: keep the version, show nothing
            self.result_key = self.registry.add_model(model, parent_key=self.base_key)
            return
        self.progress_bar.setValue(self.progress_bar.maximum())
        self.result_key = self.registry.add_model(model, parent_key=self.base_key)
        self.rescue.finished(model)
        self.revert_button.setEnabled(True)
        self.status.setText(run_summary.result_text(
            self.result_key, format_seconds(self._run.elapsed()), self.last_stats,
            model.history[-1] if model.history else None))

    def _on_error(self, err: BaseException) -> None:
        self._run.ended = True
        message = notify_error(err, "Fine-tune")
        if self._alive:
            self.status.setText(message)

    def _on_finish(self) -> None:
        self._run.finished = True
        self.worker = None
        self.training_job = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if not self._alive:
            return
        try:
            self._timer.stop()
            self.plot.draw()  # the last points
            self.finetune_button.setEnabled(True)
            self.stop_button.setEnabled(False)
        except RuntimeError:
            pass

    # versions ---------------------------------------------------------------------------------
    def revert(self) -> None:
        """Go back to the version fine-tuning started from (the new version is removed)."""
        if self.result_key is None:
            return
        self.registry.remove(self.result_key)
        if self.base_key in self.registry:
            self.registry.current = self.base_key
        self.status.setText(f"Reverted to {self.base_key}.")
        self.result_key = None
        self.revert_button.setEnabled(False)

    def _choose_save_path(self) -> None:
        key = self.result_key or self.registry.current
        path, _ = QFileDialog.getSaveFileName(self, "Save model", checkpoint_file_name(key),
                                              "napari-unet checkpoints (*.pt)")
        if path:
            self.save_model(path)

    def save_model(self, path: str | Path, key: str | None = None) -> Path | None:
        """Write the new version (or the selected model) to ``path`` (``.pt``)."""
        from napari.utils.notifications import show_info

        path = checkpoint_path(path)
        try:
            model = self.registry.get(key or self.result_key or self.registry.current)
            written = save_checkpoint(model, path)
            model_saved(model)  # its crash copy is no longer needed
        except (OSError, CheckpointError) as err:
            notify_error(err, "Save model")
            return None
        show_info(f"Saved {model.label} to {written}")
        self.status.setText(f"Saved {model.label} to {written}.")
        return written

