"""Fine-tune dock: train a copy of the model on the user's corrected labels, live."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QListWidget,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_unet._widgets._common import (
    DockKeys,
    LayerCombo,
    ProgressBar,
    ask_model_file,
    button,
    connect_until_destroyed,
    fill_model_combo,
    precision_combo,
    remember,
    resolved_precision,
    row,
    select_model_in_combo,
    status_label,
)
from napari_unet._widgets._new_model import NewModelDialog, NewModelSpec
from napari_unet._widgets._state import (
    corrected_slices,
    current_slice_index,
    format_seconds,
    get_registry,
    import_heavy_modules_on_main_thread,
    install_correction_tracking,
    notify_error,
)
from napari_unet._widgets._workers import start_job
from napari_unet.model.checkpoint import CheckpointError, save_checkpoint

PREVIEW_LAYER = "fine-tune preview"
#: key binding of Fine-tune (Alt+F is napari's File menu and napari-animation's key frame)
KEY = "Alt-U"
#: the loss curve is redrawn at most this often (seconds)
PLOT_INTERVAL = 0.5


class LossPlot:
    """A small matplotlib figure in the dock: training loss and validation Dice.

    The axes are fixed for the run (x: the time limit or iteration count), so updates only
    redraw the two lines (blitting, a few ms) instead of the whole figure.
    """

    def __init__(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.6, 2.2), dpi=80, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        # a fixed height: a status line that wraps differently must not resize the canvas
        # (every resize is a full figure redraw, ~50 ms, on the main thread)
        self.canvas.setFixedHeight(150)
        self.canvas.setToolTip("Training loss relative to its first value (blue, left) and "
                               "validation Dice (orange, right)")
        self.ax = self.figure.add_subplot(111)
        self.ax.set_ylabel("loss / first loss", fontsize=8)
        self.ax.tick_params(labelsize=7)
        self.dice_ax = self.ax.twinx()
        self.dice_ax.set_ylim(0, 1)
        self.dice_ax.set_ylabel("val. Dice", fontsize=8)
        self.dice_ax.tick_params(labelsize=7)
        (self.loss_line,) = self.ax.plot([], [], color="tab:blue", lw=1.2, animated=True)
        (self.dice_line,) = self.dice_ax.plot([], [], color="tab:orange", marker="o", ms=3, lw=1,
                                              animated=True)
        self._background = None
        self.canvas.mpl_connect("draw_event", self._on_full_draw)
        self.by_time = True
        self.x_max = 60.0
        self.y_max = 1.0
        self._drawn_axes: tuple[Any, ...] | None = None
        self.clear()
        # the layout is computed once; constrained layout on every full redraw costs ~0.3 s
        self.figure.set_layout_engine("none")

    def clear(self, time_limit: float | None = None, iterations: int | None = None) -> None:
        """Empty the plot; x is seconds when there is a time limit, else iterations."""
        self.x: list[float] = []
        self.losses: list[float] = []
        self.dice_x: list[float] = []
        self.dice: list[float] = []
        self.by_time = iterations is None or bool(time_limit)
        # a little room past the plan: the last iteration may end after the time limit
        self.x_max = 1.15 * (float(time_limit or 60.0) if self.by_time else float(iterations or 100))
        self.y_max = 1.25
        self.first_loss: float | None = None
        axes = (self.by_time, self.x_max, self.y_max)
        self.dirty = False
        if axes == self._drawn_axes and self._background is not None:
            self._blit()  # same axes as the last run: only the lines go (no full redraw)
            return
        self._drawn_axes = axes
        self.ax.set_xlabel("seconds" if self.by_time else "iteration", fontsize=8)
        self.ax.set_xlim(0, self.x_max)
        self.ax.set_ylim(0, self.y_max)
        self._full_redraw()

    def _full_redraw(self) -> None:
        self.loss_line.set_data(self.x, self.losses)
        self.dice_line.set_data(self.dice_x, self.dice)
        self.canvas.draw()  # triggers _on_full_draw (background + lines)

    def _on_full_draw(self, _event: Any = None) -> None:
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._draw_lines()

    def _draw_lines(self) -> None:
        self.ax.draw_artist(self.loss_line)
        self.dice_ax.draw_artist(self.dice_line)

    def add(self, stats: Any) -> None:
        x = stats.elapsed if self.by_time else stats.iteration
        if np.isfinite(stats.loss) and stats.loss > 0:
            if self.first_loss is None:
                self.first_loss = float(stats.loss)
            # relative to the first loss: the axes stay fixed, so updates are cheap blits
            self.x.append(x)
            self.losses.append(stats.loss / self.first_loss)
        if stats.validation_dice is not None:
            self.dice_x.append(x)
            self.dice.append(stats.validation_dice)
        self.dirty = True

    def draw(self) -> None:
        """Show new points (called by a timer, at most every PLOT_INTERVAL)."""
        if not self.dirty:
            return
        self.dirty = False
        rescale = False
        if self.losses and max(self.losses) > self.y_max:
            self.y_max = max(self.losses) * 1.2
            self.ax.set_ylim(0, self.y_max)
            rescale = True
        if self.x and self.x[-1] > self.x_max:  # ran past the plan (e.g. no limit given)
            self.x_max = self.x[-1] * 2
            self.ax.set_xlim(0, self.x_max)
            rescale = True
        if rescale or self._background is None:
            self._drawn_axes = (self.by_time, self.x_max, self.y_max)
            self._full_redraw()
            return
        self._blit()

    def _blit(self) -> None:
        self.loss_line.set_data(self.x, self.losses)
        self.dice_line.set_data(self.dice_x, self.dice)
        self.canvas.restore_region(self._background)
        self._draw_lines()
        # update(), not blit(): blit repaints at once, i.e. one more flush of the whole window
        # (a GL composition in napari); update() joins the dock's other changes in one repaint
        self.canvas.update()


class FineTuneWidget(QWidget):
    """Fine-tune the selected model on image + labels pairs (corrected slices of stacks)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        from napari.layers import Image, Labels

        from napari_unet.engine.devices import available_devices

        self.viewer = napari_viewer
        self.registry = get_registry()
        install_correction_tracking(napari_viewer)
        import_heavy_modules_on_main_thread()  # never in the worker (see _state)
        self.worker: Any = None
        #: the running job's :class:`~napari_unet.training.Trainer` (its stop handle)
        self.training_job: Any = None
        self._stop_early = False
        self._pbar: Any = None
        self._run: dict[str, Any] = {}
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
            "Load model file…", "Add a napari-unet checkpoint (.pt) or a bioimage.io package "
            "(.zip, rdf.yaml) made by napari-unet to the list, to fine-tune it",
            self._choose_model_file)
        fields.addRow("", row(self.new_model_button, self.load_button))

        pairs = QGroupBox("Training data")
        pairs_layout = QVBoxLayout(pairs)
        self.image_combo = LayerCombo(napari_viewer, (Image,), "Image the labels belong to")
        self.labels_combo = LayerCombo(napari_viewer, (Labels,), "Corrected labels for the image")
        pair_form = QFormLayout()
        pair_form.addRow("Image", self.image_combo)
        pair_form.addRow("Labels", self.labels_combo)
        pairs_layout.addLayout(pair_form)
        self.pair_list = QListWidget()
        self.pair_list.setToolTip("Image + labels pairs to train on. Empty: the pair chosen above")
        self.pair_list.setMaximumHeight(70)
        pairs_layout.addWidget(row(
            button("Add pair", "Add the image + labels above to the list (several pairs allowed)",
                   self.add_pair),
            button("Remove pair", "Remove the selected pair from the list", self.remove_pair)))
        pairs_layout.addWidget(self.pair_list)
        self.corrected_only = QCheckBox("Only corrected slices (stacks)")
        self.corrected_only.setChecked(True)
        self.corrected_only.setToolTip("Train on the slices you corrected (Edit dock list); if none "
                                       "are marked, on the whole stack. 2D images: whole image")
        pairs_layout.addWidget(self.corrected_only)
        layout.addWidget(pairs)

        settings = QFormLayout()
        self.time_spin = QSpinBox()
        self.time_spin.setRange(0, 24 * 3600)
        self.time_spin.setValue(60)
        self.time_spin.setSuffix(" s")
        self.time_spin.setToolTip("Stop after this long (0 = no time limit; then set iterations)")
        settings.addRow("Time limit", self.time_spin)
        remember(self.time_spin, "time_limit")
        self.iterations_spin = QSpinBox()
        self.iterations_spin.setRange(0, 1_000_000)
        self.iterations_spin.setValue(0)
        self.iterations_spin.setSpecialValueText("auto")
        self.iterations_spin.setToolTip("Stop after this many iterations (auto = by time limit)")
        settings.addRow("Iterations", self.iterations_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(0.0, 0.1)
        self.lr_spin.setSingleStep(0.0001)
        self.lr_spin.setValue(0.0)
        self.lr_spin.setSpecialValueText("auto")
        self.lr_spin.setToolTip("Learning rate (auto = 3e-4 for fine-tuning)")
        settings.addRow("Learning rate", self.lr_spin)
        self.validation_check = QCheckBox("Hold out a part, keep the best weights")
        self.validation_check.setChecked(True)
        self.validation_check.setToolTip("With 2 or more corrected slices or images, one part is "
                                         "kept aside to score the weights, and Stop and the end "
                                         "keep the best-scoring ones; with fewer, or unchecked, "
                                         "the last weights are kept")
        settings.addRow("", self.validation_check)
        self.device_combo = QComboBox()
        found = available_devices()
        self.device_combo.addItem(f"auto ({found[0]})", "auto")
        for name in found:
            self.device_combo.addItem(name, name)
        self.device_combo.setToolTip(f"Where training runs. Found here: {', '.join(found)}")
        settings.addRow("Device", self.device_combo)
        remember(self.device_combo, "device")
        self.precision_combo = precision_combo(
            "Numeric precision of training: auto = bf16 on CPUs with native bf16 and on GPUs, "
            "fp16 (with loss scaling) on older GPUs, else fp32; fp32 = exact")
        settings.addRow("Precision", self.precision_combo)
        self.preview_check = QCheckBox("Live preview of the current slice")
        self.preview_check.setChecked(True)
        self.preview_check.setToolTip("Every few seconds re-predict the slice on screen into the "
                                      f"'{PREVIEW_LAYER}' layer")
        settings.addRow("", self.preview_check)
        layout.addLayout(settings)

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
        layout.addWidget(self.weights_label)
        self.status = status_label("Correct some slices (Edit dock), then click Fine-tune.")
        layout.addWidget(self.status)
        # the free space stays below the status line: a status that wraps to more lines moves
        # nothing above it (no relayout and repaint of the whole dock)
        layout.addStretch(1)

        # the view (status, progress, loss curve) is redrawn by this timer, not per iteration;
        # it ticks twice per PLOT_INTERVAL: the dock, then napari's activity bar (see _refresh_view)
        self._timer = QTimer(self)
        self._timer.setInterval(int(PLOT_INTERVAL * 500))
        self._timer.timeout.connect(self._refresh_view)

        self.model_combo.currentIndexChanged.connect(self._model_selected)
        connect_until_destroyed(self, self.registry.changed, self._fill_models)
        connect_until_destroyed(self, self.registry.current_changed, self._show_current)
        self._fill_models()
        self.keys = DockKeys(self, napari_viewer, {KEY: self.fine_tune})

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
        if getattr(model, "foreign", False):
            self.status.setText(f"Loaded {key}: a Zoo model made elsewhere segments (Segment "
                                "dock) but cannot be fine-tuned here.")
        else:
            self.status.setText(f"Loaded {key}; Fine-tune makes a new version of it.")
        return key

    # pairs ------------------------------------------------------------------------------------
    def add_pair(self) -> None:
        image, labels = self.image_combo.layer(), self.labels_combo.layer()
        if image is None or labels is None:
            notify_error(ValueError("choose an image and a labels layer"), "Add pair")
            return
        text = f"{image.name}  ↔  {labels.name}"
        if not self.pair_list.findItems(text, Qt.MatchExactly):
            self.pair_list.addItem(text)

    def remove_pair(self) -> None:
        for item in self.pair_list.selectedItems():
            self.pair_list.takeItem(self.pair_list.row(item))

    def _pairs(self) -> list[tuple[Any, Any]]:
        names = [self.pair_list.item(i).text() for i in range(self.pair_list.count())]
        pairs = []
        for text in names:
            image_name, labels_name = text.split("  ↔  ")
            if image_name in self.viewer.layers and labels_name in self.viewer.layers:
                pairs.append((self.viewer.layers[image_name], self.viewer.layers[labels_name]))
        if not names:
            image, labels = self.image_combo.layer(), self.labels_combo.layer()
            if image is not None and labels is not None:
                pairs.append((image, labels))
        if not pairs:
            raise ValueError("no training data: choose an image and its labels layer")
        return pairs

    def training_pairs(self) -> tuple[list[Any], list[str]]:
        """TrainingPairs from the chosen layers, and notes for the status line.

        The labels are a snapshot taken now (the corrected slices, or everything when none are
        marked): painting while training changes nothing in this run. The images stay as they
        are (a lazy, dask-backed image is read in the worker, not here).
        """
        from napari_unet.training.config import TrainingPair

        result, notes = [], []
        for image, labels in self._pairs():
            image_data = image.data[0] if image.multiscale else image.data
            slices = None
            if labels.data.ndim >= 3 and self.corrected_only.isChecked():
                slices = corrected_slices(labels) or None
                if slices is None:
                    notes.append(f"no corrected slices in {labels.name!r}: using the whole stack")
                else:
                    notes.append(f"{labels.name}: {len(slices)} corrected slice(s)")
            result.append(TrainingPair(image=image_data, labels=snapshot_labels(labels.data, slices),
                                       slices=slices))
        return result, notes

    def validation_expected(self, pairs: list[Any]) -> bool:
        """Whether a part can be held out (2 or more corrected slices or images)."""
        if not self.validation_check.isChecked():
            return False
        parts = sum(len(p.slices) if p.slices is not None else
                    (np.shape(p.labels)[0] if len(np.shape(p.labels)) >= 3 else 1) for p in pairs)
        return parts >= 2

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
        """Build an untrained model from ``spec`` (:func:`napari_unet.training.new_model`), add it
        to the model list and select it; returns its key."""
        from napari_unet.training.trainer import new_model

        try:
            model = new_model(spec.spatial_dims, spec.task, spec.class_names,
                              base_channels=spec.base_channels, depth=spec.depth,
                              inplane_only_levels=spec.inplane_only_levels, name=spec.name,
                              normalization=spec.normalization, voxel_size=spec.voxel_size,
                              architecture=spec.architecture,
                              description=f"new {spec.spatial_dims}D {spec.task} model "
                                          "made in napari")
        except ValueError as err:
            notify_error(err, "New model")
            return None
        key = self.registry.add_model(model, select=True, source="new")
        aniso = (f", in-plane-only pooling at level(s) {list(spec.inplane_only_levels)}"
                 if spec.inplane_only_levels else "")
        classes = f", {len(spec.class_names) - 1} classes" if spec.class_names else ""
        self.status.setText(f"New model {key}: {spec.spatial_dims}D {spec.task}{classes}{aniso}. "
                            "Fine-tune trains it on your corrected slices.")
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
        z = current_slice_index(self.viewer, image)
        if model.spatial_dims == 2:
            return data[z], z
        depth = max(8, model.config.divisor()[0] * 2)
        start = int(np.clip(z - depth // 2, 0, max(0, data.shape[0] - depth)))
        return data[start:start + depth], start

    def fine_tune(self) -> None:
        """Start fine-tuning in a worker; the new version is added to the model list."""
        from napari.utils import progress
        from napari.utils.notifications import show_info

        from napari_unet.training.config import TrainingConfig
        from napari_unet.training.trainer import Trainer

        if self.worker is not None:
            show_info("Fine-tuning is already running; Stop it first.")
            return
        try:
            key = self.registry.current
            model = self.registry.get(key)
            if getattr(model, "foreign", False):
                raise CheckpointError(f"{key} is a Zoo model made elsewhere: napari-unet "
                                      "fine-tunes its own UNets only (it can still segment)")
            precision_label = resolved_precision(self.precision_combo.currentData(),
                                                 self.device_combo.currentData())
            pairs, notes = self.training_pairs()
        except (ValueError, CheckpointError) as err:
            notify_error(err, "Fine-tune")
            return
        # torch._dynamo/triton are imported by the first optimizer step: do it here, not in the
        # worker thread (CUDA builds crashed napari importing triton in a worker)
        import_heavy_modules_on_main_thread()
        image_layer = self._pairs()[0][0]
        preview_image, preview_z = self._preview_input(image_layer, model)
        lr = self.lr_spin.value() or None
        config = TrainingConfig(
            iterations=self.iterations_spin.value() or None,
            time_limit=float(self.time_spin.value()) or None,
            learning_rate=lr,
            validation_fraction=None if self.validation_check.isChecked() else 0.0,
            device=self.device_combo.currentData(),
            precision=self.precision_combo.currentData(),
            preview_image=None, preview_interval=3.0)
        for name, value in self.config_overrides.items():
            setattr(config, name, value)
        if config.iterations is None and config.time_limit is None:
            config.time_limit = 60.0

        self.base_key = key
        self.training_job = None
        self._stop_early = False
        self._run = {"model": model, "image": image_layer, "preview_z": preview_z,
                     "start": time.perf_counter(), "notes": notes, "precision": precision_label}

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
        self._pbar = progress(total=1000, desc=f"Fine-tune {model.label}")
        self.progress_bar.setValue(0)
        self.finetune_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.revert_button.setEnabled(False)
        self.status.setText(f"Preparing fine-tuning of {model.label} ({precision_label})… "
                            + "; ".join(notes))
        if self.validation_expected(pairs):
            self.weights_label.setText("A part of the corrections will be held out to score the "
                                       "weights; the best-scoring ones are kept.")
        else:
            self.weights_label.setText("Fewer than 2 corrected slices or images (or hold-out "
                                       "off): nothing is held out, the last weights are kept.")
        if preview_image is not None:  # the preview layer exists from the start
            self._run["preview_shape"] = preview_image.shape
            self._show_preview(np.zeros((1, *preview_image.shape), np.float32))
        self._timer.start()
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
        if run.get("finished") or run.get("ended"):  # a late update
            return
        self.last_stats = run["stats"] = stats
        if stats.message and "weights" not in run:
            # the Trainer says what it held out and which weights it keeps
            run["weights"] = stats.keeps_best
            self.weights_label.setText(stats.message[:1].upper() + stats.message[1:] + ".")
        self.plot.add(stats)
        run["fresh"] = True
        if stats.preview is not None:
            self._show_preview(stats.preview)

    def _refresh_view(self) -> None:
        """Timer tick while training. Odd ticks (every PLOT_INTERVAL): the dock's status, progress
        bar and loss curve, repainted together. Even ticks: napari's activity-panel bar, alone:
        it calls processEvents, i.e. repaints the window at once, so it gets its own tick."""
        run = self._run
        stats = run.get("stats")  # this run's latest
        run["tick"] = tick = run.get("tick", 0) + 1
        if run.get("ended") or stats is None:
            return
        fraction = stats.fraction
        if tick % 2:
            if run.get("fresh"):
                run["fresh"] = False
                self.progress_bar.setValue(int(1000 * fraction))
                text = (f"iteration {stats.iteration}"
                        + (f"/{stats.total_iterations}" if stats.total_iterations else "")
                        + f" · loss {stats.loss:.4f} · {stats.samples_per_second:.1f} samples/s"
                        + f" · {format_seconds(stats.elapsed)} · {run['precision']}")
                if stats.best_score is not None:
                    text += f" · best Dice {stats.best_score:.3f}"
                self.status.setText(text)
            self.plot.draw()
        elif self._pbar is not None and int(1000 * fraction) != self._pbar.n:
            self._pbar.update(int(1000 * fraction) - self._pbar.n)

    def _show_preview(self, probabilities: np.ndarray) -> None:
        run = self._run
        model, image = run["model"], run["image"]
        probs = np.asarray(probabilities, dtype=np.float32)
        foreground = 1.0 - probs[0] if model.task == "semantic" else probs[0]
        if image.ndim >= 3 and foreground.ndim == 2:
            foreground = foreground[None]
        translate = np.array(image.translate, dtype=float)
        if image.ndim >= 3:
            translate[-3] += run["preview_z"] * image.scale[-3]
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
        self._run["ended"] = True
        self.progress_bar.setValue(self.progress_bar.maximum())
        self.result_key = self.registry.add_model(model, parent_key=self.base_key)
        self.revert_button.setEnabled(True)
        elapsed = time.perf_counter() - self._run["start"]
        stats = self.last_stats
        text = f"New version {self.result_key} (after {format_seconds(elapsed)}"
        if stats is not None:
            text += f", {stats.iteration} iterations, loss {stats.loss:.4f}"
            if stats.keeps_best and stats.best_score is not None:
                text += f", best-scoring weights: Dice {stats.best_score:.3f} on the held-out part"
            elif not stats.keeps_best:
                text += ", last weights"
        self.status.setText(text + "). It is selected in the Segment dock.")

    def _on_error(self, err: BaseException) -> None:
        self._run["ended"] = True
        self.status.setText(notify_error(err, "Fine-tune"))

    def _on_finish(self) -> None:
        self._run["finished"] = True
        self.worker = None
        self.training_job = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
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
        path, _ = QFileDialog.getSaveFileName(self, "Save model", f"{key or 'model'}.pt".replace(" ", "_"),
                                              "napari-unet checkpoints (*.pt)")
        if path:
            self.save_model(path)

    def save_model(self, path: str | Path, key: str | None = None) -> Path | None:
        """Write the new version (or the selected model) to ``path`` (``.pt``)."""
        from napari.utils.notifications import show_info

        path = Path(path)
        if path.suffix.lower() not in (".pt", ".pth"):
            path = path.with_suffix(".pt")
        try:
            model = self.registry.get(key or self.result_key or self.registry.current)
            written = save_checkpoint(model, path)
        except (OSError, CheckpointError) as err:
            notify_error(err, "Save model")
            return None
        show_info(f"Saved {model.label} to {written}")
        self.status.setText(f"Saved {model.label} to {written}.")
        return written


def snapshot_labels(data: Any, slices: list[int] | None) -> Any:
    """A copy of a labels layer's array to train on, taken on the main thread.

    With ``slices`` only those slices are copied, into an array that is zero elsewhere (never
    trained on: the loss only sees annotated voxels), so the copy costs what was corrected. A
    lazy (dask) array cannot be painted in napari and is returned as it is.
    """
    if hasattr(data, "compute") and hasattr(data, "dask"):
        return data
    if slices is None:
        return np.array(data, copy=True)
    snapshot = np.zeros(np.shape(data), dtype=data.dtype)
    for z in slices:
        if 0 <= z < snapshot.shape[0]:  # others: the Trainer says what is wrong
            snapshot[z] = data[z]
    return snapshot
