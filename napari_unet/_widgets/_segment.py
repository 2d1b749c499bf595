"""Segment dock: run a model on an image layer, tile by tile, into a labels layer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_unet._widgets._common import (
    ChunkedWriter,
    DockKeys,
    LayerCombo,
    ProgressBar,
    ask_model_file,
    ask_yes_no,
    button,
    connect_until_destroyed,
    fill_model_combo,
    is_user_choice,
    precision_combo,
    remember,
    resolved_precision,
    row,
    select_model_in_combo,
    status_label,
)
from napari_unet._widgets._history import history_for
from napari_unet._widgets._state import (
    MODEL_KEY,
    PROBABILITIES_KEY,
    SOURCE_KEY,
    UNIT_KEY,
    corrected_slices,
    current_slice_index,
    format_seconds,
    get_registry,
    import_heavy_modules_on_main_thread,
    install_correction_tracking,
    layer_unit,
    notify_error,
    set_corrected_slices,
    set_suggested_slices,
    view_point,
)
from napari_unet._widgets._workers import start_job
from napari_unet.labels.instances import DEFAULT_MIN_SIZE
from napari_unet.model.checkpoint import CheckpointError

OUTPUTS = {"instances": "instances", "binary / classes": "labels"}
SCOPES = ("whole stack", "current slice", "visible region")
#: where the result goes: the image's labels layer with the corrected slices left as they are
#: (default), a new labels layer, or the labels layer entirely (asks first when it has
#: corrected slices or edits)
WRITE_MODES = ("keep corrected slices", "new labels layer", "overwrite all")
KEY = "Alt-G"
#: the labels layer is redrawn at most this often while tiles arrive (seconds)
REFRESH_INTERVAL = 0.1
#: slices suggested to correct after a whole-stack run (listed in the Edit dock)
SUGGESTED_SLICES = 5


class SegmentWidget(QWidget):
    """Pick a model, click Segment; the labels layer fills in tile by tile."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        from napari.layers import Image

        from napari_unet.engine.devices import available_devices

        self.viewer = napari_viewer
        self.registry = get_registry()
        self.worker: Any = None
        self.last_result: Any = None
        self.labels_layer: Any = None
        #: the image layer with the last run's uncertainty map (the "Uncertainty layer" option)
        self.uncertainty_layer: Any = None
        self._pbar: Any = None
        self._run: dict[str, Any] = {}
        #: extra options for inference.segment (tile_shape, batch_size); empty = automatic
        self.predict_options: dict[str, Any] = {}
        install_correction_tracking(napari_viewer)
        # heavy imports now (while the dock opens), never in a worker thread
        import_heavy_modules_on_main_thread()

        layout = QVBoxLayout(self)
        fields = QFormLayout()
        layout.addLayout(fields)

        self.image_combo = LayerCombo(napari_viewer, (Image,),
                                      "Image layer to segment (2D image or 3D stack)")
        fields.addRow("Image", self.image_combo)

        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Model to run: shipped models, loaded files and fine-tuned "
                                    "versions (from the Fine-tune dock)")
        self.load_button = button("Load model file…", "Add a napari-unet checkpoint (.pt) or a "
                                  "bioimage.io Model Zoo package (.zip, rdf.yaml) to the list",
                                  self._choose_model_file)
        fields.addRow("Model", self.model_combo)
        fields.addRow("", self.load_button)
        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)
        self.model_info.setToolTip("What the selected model does")
        fields.addRow("", self.model_info)

        found = available_devices()
        self.device_combo = QComboBox()
        self.device_combo.addItem(f"auto ({found[0]})", "auto")
        for name in found:
            self.device_combo.addItem(name, name)
        self.device_combo.setToolTip(f"Where the model runs. Found here: {', '.join(found)}. "
                                     "auto = the fastest one; out of GPU memory falls back to "
                                     "smaller tiles, then to the CPU")
        fields.addRow("Device", self.device_combo)
        remember(self.device_combo, "device")
        self.precision_combo = precision_combo(
            "Numeric precision: auto = bf16 on CPUs with native bf16 and on GPUs, fp16 on older "
            "GPUs, else fp32; fp32 = exact")
        fields.addRow("Precision", self.precision_combo)

        self.output_combo = QComboBox()
        self.output_combo.addItems(list(OUTPUTS))
        self.output_combo.setToolTip("instances: one id per object (nuclei, cells); binary / "
                                     "classes: foreground = 1, or class ids for multi-class models")
        fields.addRow("Output", self.output_combo)
        remember(self.output_combo, "output")

        self.scope_combo = QComboBox()
        self.scope_combo.addItems(list(SCOPES))
        self.scope_combo.setToolTip("whole stack: everything; current slice: only the slice on "
                                    "screen (fast check); visible region: the part in view (all "
                                    "slices)")
        fields.addRow("Scope", self.scope_combo)

        self.write_combo = QComboBox()
        self.write_combo.addItems(list(WRITE_MODES))
        self.write_combo.setToolTip("keep corrected slices: the image's labels layer is rewritten "
                                    "except the slices marked corrected (Edit dock); new labels "
                                    "layer: your layer stays as it is; overwrite all: everything, "
                                    "corrected slices included (asks first). Ctrl+Z undoes a run")
        fields.addRow("Write into", self.write_combo)

        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.01, 0.99)
        self.threshold_spin.setSingleStep(0.05)
        self.threshold_spin.setValue(0.5)
        self.threshold_spin.setToolTip("Probability above which a pixel is foreground (lower = "
                                       "larger objects)")
        fields.addRow("Threshold", self.threshold_spin)

        self.min_size_spin = QSpinBox()
        self.min_size_spin.setRange(0, 10_000_000)
        self.min_size_spin.setValue(DEFAULT_MIN_SIZE)
        self.min_size_spin.setToolTip("Remove objects smaller than this many pixels/voxels "
                                      "(0 = keep all)")
        fields.addRow("Min size", self.min_size_spin)
        #: False while threshold and min size show the model's own (tuned) values; True once
        #: the user changes one, so their value wins over the model's
        self.postprocess_edited = False
        for spin in (self.threshold_spin, self.min_size_spin):
            spin.valueChanged.connect(self._postprocess_edited)

        self.tta_check = QCheckBox("Test-time augmentation")
        self.tta_check.setToolTip("Average the model over 8 flips and rotations of the image: "
                                  "smoother, often slightly better results, 8x slower")
        fields.addRow("", self.tta_check)
        self.uncertainty_check = QCheckBox("Uncertainty layer")
        self.uncertainty_check.setToolTip(
            "Add (or update) an image layer '<image> uncertainty' where the model is unsure "
            "(0..1: entropy of the probabilities, with test-time augmentation also the "
            "disagreement between the augmentations). Toggle it like any layer")
        fields.addRow("", self.uncertainty_check)

        self.segment_button = button("Segment", f"Run the model on the image ({KEY.replace('-', '+')}). The labels "
                                     "layer fills in tile by tile", self.segment)
        self.cancel_button = button("Cancel", "Stop at the next tile; what is done stays",
                                    self.cancel)
        self.cancel_button.setEnabled(False)
        layout.addWidget(row(self.segment_button, self.cancel_button))

        self.progress_bar = ProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setFormat("%v / %m tiles")
        self.progress_bar.setToolTip("Tiles done / total")
        layout.addWidget(self.progress_bar)
        self.status = status_label("Pick an image and a model, then click Segment.")
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.model_combo.currentIndexChanged.connect(self._model_selected)
        connect_until_destroyed(self, self.registry.changed, self._fill_models)
        connect_until_destroyed(self, self.registry.current_changed, self._show_current)
        self._fill_models()
        self.keys = DockKeys(self, napari_viewer, {KEY: self.segment})
        #: writes tiles and the result into the layer, a piece per event-loop pass
        self._writer: ChunkedWriter | None = None

    # models -----------------------------------------------------------------------------------
    def _fill_models(self) -> None:
        if fill_model_combo(self.model_combo, self.registry, "(no model: load a model file)"):
            self._show_current(self.registry.current or "")

    def _show_current(self, key: str) -> None:
        if select_model_in_combo(self.model_combo, key):
            self._describe(key)

    def _model_selected(self, index: int) -> None:
        key = self.model_combo.itemData(index)
        if key:
            self.registry.current = key
            self._describe(key)

    def _postprocess_edited(self, *_: Any) -> None:
        self.postprocess_edited = True

    def show_model_postprocess(self, model: Any) -> None:
        """Show ``model``'s tuned threshold and min size (the built-in defaults if it has none);
        they are used until the user changes them."""
        from napari_unet.engine.predict import postprocess_settings

        threshold, min_size, _ = postprocess_settings(model)
        for spin, value in ((self.threshold_spin, threshold), (self.min_size_spin, min_size)):
            spin.blockSignals(True)
            spin.setValue(value)
            spin.blockSignals(False)
        self.postprocess_edited = False

    def _describe(self, key: str) -> None:
        if not key or key not in self.registry:
            self.model_info.setText("")
            return
        entry = self.registry.entry(key)
        if entry.model is None:
            self.model_info.setText(f"{entry.source} model (loads on first use)")
            return
        model = entry.model
        self.show_model_postprocess(model)
        text = f"{model.spatial_dims}D · {model.task}"
        if model.task in ("foreground_boundary",) or "nuclei" in model.name or "cells" in model.name:
            default = "instances"
        else:
            default = "binary / classes"
        if model.description:
            text += f" · {model.description.splitlines()[0][:80]}"
        self.model_info.setText(text)
        if not is_user_choice(self.output_combo):  # the user's (saved) choice wins
            self.output_combo.setCurrentText(default)

    def _choose_model_file(self) -> None:
        path = ask_model_file(self)
        if path:
            self.load_model_file(path)

    def load_model_file(self, path: str | Path) -> str | None:
        """Add a checkpoint to the model list and select it; errors become notifications."""
        try:
            key = self.registry.add_file(path)
        except CheckpointError as err:
            notify_error(err, "Load model")
            return None
        self._describe(key)
        self.status.setText(f"Loaded {key}.")
        return key

    # scope ------------------------------------------------------------------------------------
    def _spatial_shape(self, layer: Any) -> tuple[int, ...]:
        return tuple(np.shape(layer.data[0] if layer.multiscale else layer.data))

    def _region(self, layer: Any, model: Any) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """(region read from the image, part of that region written to the layer)."""
        shape = self._spatial_shape(layer)
        full = tuple(slice(0, n) for n in shape)
        scope = self.scope_combo.currentText()
        if scope == "current slice" and len(shape) == 3:
            z = current_slice_index(self.viewer, layer)
            if model.spatial_dims == 2:
                return (slice(z, z + 1), *full[1:]), (slice(0, 1), *full[1:])
            # a 3D model needs context: a slab around the slice, keep only the slice
            halo = model.config.halo()[0]
            start, stop = max(0, z - halo), min(shape[0], z + halo + 1)
            return (slice(start, stop), *full[1:]), (slice(z - start, z - start + 1), *full[1:])
        if scope == "visible region":
            corners = np.asarray(layer.corner_pixels)
            region = list(full)
            for axis in range(len(shape)):
                if axis in self.viewer.dims.displayed[-2:] or axis >= len(shape) - 2:
                    lo = int(np.clip(np.floor(corners[0, axis]), 0, shape[axis] - 1))
                    hi = int(np.clip(np.ceil(corners[1, axis]) + 1, lo + 1, shape[axis]))
                    region[axis] = slice(lo, hi)
            region = tuple(region)
            return region, tuple(slice(0, s.stop - s.start) for s in region)
        return full, full

    # labels layer -----------------------------------------------------------------------------
    def _existing_layer(self, image: Any, shape: tuple[int, ...]) -> Any | None:
        """The image's labels layer, when it has the right shape (None: make a new one)."""
        from napari.layers import Labels

        name = f"{image.name} labels"
        if name not in self.viewer.layers:
            return None
        layer = self.viewer.layers[name]
        if not isinstance(layer, Labels) or tuple(layer.data.shape) != shape:
            return None
        return layer

    def _new_layer(self, image: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        ndim = len(shape)
        return self.viewer.add_labels(np.zeros(shape, dtype=dtype), name=f"{image.name} labels",
                                      scale=image.scale[-ndim:], translate=image.translate[-ndim:])

    def confirm_overwrite(self, text: str) -> bool:
        """Ask before corrected slices or edits are overwritten (a seam for tests)."""
        return ask_yes_no(self, "Overwrite your corrections?", text)

    def _write_mode(self, layer: Any, z_range: range) -> str | None:
        """``keep`` or ``overwrite`` for an existing layer, after asking where needed; None = stop."""
        mode = self.write_combo.currentText()
        if layer.ndim >= 3:
            corrected = [z for z in corrected_slices(layer) if z in z_range]
        else:
            corrected = list(z_range) if corrected_slices(layer) else []
        edited = history_for(layer).edited
        what = (f"{len(corrected)} corrected slice(s) of {layer.name!r}" if layer.ndim >= 3
                else f"your corrections in {layer.name!r}")
        if mode == WRITE_MODES[0]:
            if corrected and len(corrected) == len(z_range):
                if layer.ndim >= 3:
                    text = (f"Everything to segment is marked corrected ({what}). Overwrite it? "
                            "(No: nothing is changed; choose 'new labels layer' to compare.)")
                else:
                    text = (f"{layer.name!r} is marked corrected. Overwrite your corrections? "
                            "(No: nothing is changed; choose 'new labels layer' to compare.)")
                return "overwrite" if self.confirm_overwrite(text) else None
            return "keep"
        if corrected or edited:
            text = (f"Overwrite {what if corrected else 'the edits of ' + repr(layer.name)}? "
                    "Ctrl+Z undoes the run. (No: nothing is changed.)")
            return "overwrite" if self.confirm_overwrite(text) else None
        return "overwrite"

    def _start_at(self, image: Any, read: tuple[slice, ...]) -> tuple[int, ...]:
        """The view centre on the current slice, in the coordinates of the region read."""
        point = view_point(self.viewer, image)[-len(read):]
        return tuple(int(np.clip(p - r.start, 0, r.stop - r.start - 1)) for p, r in zip(point, read))

    # run --------------------------------------------------------------------------------------
    def segment(self) -> None:
        """Start segmenting the chosen image with the chosen model (in a worker).

        The image is read tile by tile in the worker (a lazy, dask-backed layer is never loaded
        on the main thread). The labels go into the image's labels layer, leaving its corrected
        slices as they are (default), or into a new layer; one Ctrl+Z puts the layer back as
        it was.
        """
        from napari.utils import progress
        from napari.utils.notifications import show_info, show_warning

        from napari_unet.zoo.predict import (
            segment_model as segment,  # Zoo models made elsewhere: blended tiles
        )

        if self.worker is not None:
            show_info("Segmentation is already running; Cancel it first.")
            return
        image = self.image_combo.layer()
        if image is None:
            show_warning("Open an image first (File > Open, or File > Open Sample > napari-unet).")
            return
        if image.rgb:
            show_warning(f"{image.name!r} is an RGB image; the models take one channel. "
                         "Convert it to grayscale first.")
            return
        try:
            model = self.registry.get()
        except CheckpointError as err:
            notify_error(err, "Segment")
            return
        import_heavy_modules_on_main_thread()

        data = image.data[0] if image.multiscale else image.data
        shape = self._spatial_shape(image)
        read, keep = self._region(image, model)
        voxel_size = tuple(float(s) for s in image.scale[-len(shape):])
        output = OUTPUTS[self.output_combo.currentText()]
        device, precision = self.device_combo.currentData(), self.precision_combo.currentData()
        try:
            sub = data[read]  # a view (numpy) or a lazy slice (dask): nothing is read here
            if sub.ndim not in (2, 3):
                raise ValueError(f"{image.name!r} has {sub.ndim} axes; open a 2D image or a 3D stack")
            if model.spatial_dims == 3 and sub.ndim != 3:
                raise ValueError(f"{model.label} is a 3D model and {image.name!r} is a 2D image; "
                                 "pick a 2D model")
            precision_label = resolved_precision(precision, device)
        except (ValueError, MemoryError) as err:
            notify_error(err, f"Segment {image.name!r} with {model.label}")
            return
        offset = tuple(s.start for s in read)
        layer_region = tuple(slice(o + k.start, o + k.stop) for o, k in zip(offset, keep))
        z_range = range(layer_region[0].start, layer_region[0].stop) if len(shape) >= 3 else range(1)
        layer = None
        if self.write_combo.currentText() != WRITE_MODES[1]:
            layer = self._existing_layer(image, shape)
        mode = "overwrite"
        if layer is not None:
            mode = self._write_mode(layer, z_range)
            if mode is None:
                self.status.setText("Nothing was changed (your corrections are kept).")
                return
        # the job's own checks (device, channels) run in the worker and come back as errors
        tta = self.tta_check.isChecked()
        want_map = self.uncertainty_check.isChecked()
        whole_run = all(r.start == 0 and r.stop == n for r, n in zip(read, shape))
        rank = len(shape) == 3 and whole_run
        uncertain = None
        if want_map or rank:
            # a 3D model's errors at the ends of the stack are edge effects: suggested last
            from napari_unet.engine.uncertainty import default_edge

            edge = default_edge(shape[0], SUGGESTED_SLICES) if model.spatial_dims == 3 else 0
            uncertain = {"map": want_map, "rank": rank, "spread": None, "edge": edge}
            if tta:  # the disagreement between augmentations, filled tile by tile
                spatial = tuple(sub.shape[1:] if model.config.in_channels > 1 else sub.shape)
                uncertain["spread"] = np.zeros(spatial, np.float16)
        if not self.postprocess_edited:  # the model's tuned values (it may have just loaded)
            self.show_model_postprocess(model)
        job = segment(sub, model, output=output, device=device, precision=precision,
                      threshold=self.threshold_spin.value(), min_size=self.min_size_spin.value(),
                      voxel_size=voxel_size, start_at=self._start_at(image, read), tta=tta,
                      tta_spread=uncertain["spread"] if uncertain else None,
                      **self.predict_options)

        created = layer is None
        dtype = labels_dtype(output, len(model.class_names))
        if created:
            layer = self._new_layer(image, shape, dtype)
        layer.metadata[UNIT_KEY] = layer_unit(image)
        layer.metadata[MODEL_KEY] = model.label
        if image.source.path:
            layer.metadata[SOURCE_KEY] = str(image.source.path)
        self.labels_layer = layer
        history = history_for(layer)
        description = f"Segment with {model.label}"
        whole = all(r.start == 0 and r.stop == n for r, n in zip(read, shape))
        marks = None
        if not created and mode == "overwrite":
            # overwritten slices are no longer corrected (Fine-tune must not train on them);
            # undo marks them again
            before_marks = corrected_slices(layer)
            remaining = [z for z in before_marks if z not in z_range] if layer.ndim >= 3 else []
            if remaining != before_marks:
                marks = before_marks
                set_corrected_slices(layer, remaining)
        if created:
            history.record(None, np.zeros(shape, dtype=layer.data.dtype), description)
        elif whole:
            # a new array, so the tiles show as they arrive; the old one is the undo step (no copy)
            old = layer.data
            new = np.zeros(shape, dtype=np.promote_types(old.dtype, dtype))
            if mode == "keep" and layer.ndim >= 3:
                for z in corrected_slices(layer):
                    if 0 <= z < shape[0]:
                        new[z] = np.asarray(old[z])
            history.record(None, old, description, marks)
            layer.data = new
        else:
            history.record(layer_region, np.array(layer.data[layer_region], copy=True), description,
                           marks)
        history.busy = "Segment"
        self._writer = ChunkedWriter(self._write_block, parent=self, on_error=self._write_failed)
        self._run = {"image": image, "model": model, "layer": layer, "offset": offset,
                     "keep": keep, "read": read, "output": output, "last_refresh": 0.0,
                     "threshold": self.threshold_spin.value(), "start": time.perf_counter(),
                     "first_tile": None, "done": 0, "total": 0, "created": created,
                     "wrote": False, "mode": mode, "precision": precision_label,
                     "history": history, "uncertain": uncertain}
        self._pbar = progress(total=0, desc=f"Segment {image.name} ({model.label})")
        self.progress_bar.setRange(0, 0)  # busy until the tile count is known
        self.segment_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        kept = ""
        if mode == "keep" and layer.ndim >= 3 and corrected_slices(layer):
            kept = f"; corrected slices {_short_list(corrected_slices(layer))} are kept"
        augmented = " · TTA x8" if tta else ""
        self.status.setText(f"Segmenting {image.name} with {model.label} · {precision_label}"
                            f"{augmented}{kept}…")
        if uncertain is not None:
            # corrected slices are done: never suggested again
            uncertain["exclude"] = corrected_slices(layer) if layer.ndim >= 3 else []
        self.worker = start_job(self._with_previews(job, model.task, self.threshold_spin.value(),
                                                    uncertain),
                                on_yield=self._on_progress, on_return=self._on_result,
                                on_error=self._on_error, on_finish=self._on_finish,
                                on_abort=self._on_abort)

    @staticmethod
    def _with_previews(job: Any, task: str, threshold: float,
                       uncertain: dict[str, Any] | None = None) -> Any:
        """Run in the worker: pass the job's progress on, with the tile's thresholded preview
        computed here rather than on the main thread. At the end, also here: the uncertainty
        map and the suggested slices when ``uncertain`` asks for them."""
        from napari_unet.labels.instances import to_semantic

        while True:
            try:
                update = next(job)
            except StopIteration as stop:
                result = stop.value
                # count objects (and find the largest id) here, not on the main thread
                ids = np.unique(result.data) if result.output != "probabilities" else np.zeros(1)
                largest = int(ids[-1]) if ids.size and result.output != "probabilities" else 0
                extras = _uncertainty_extras(result, task, threshold, uncertain)
                return result, int(np.count_nonzero(ids)), largest, extras
            preview = None
            if update.region is not None and update.probabilities is not None:
                preview = to_semantic(np.asarray(update.probabilities, dtype=np.float32), task,
                                      threshold=threshold)
            try:
                yield update, preview
            except GeneratorExit:
                job.close()
                raise

    def cancel(self) -> None:
        """Stop at the next tile; the tiles done so far stay in the labels layer."""
        if self.worker is not None and not self._run.get("returned") \
                and not self._run.get("finished"):
            self.worker.quit()
            self.status.setText("Cancelling at the next tile…")

    def _to_layer(self, region: tuple[slice, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """Map a region of the job's output to (layer region, region inside the job's output)."""
        keep = self._run["keep"]
        out_region, layer_region = [], []
        for r, k, o in zip(region, keep, self._run["offset"]):
            lo, hi = max(r.start, k.start), min(r.stop, k.stop)
            if hi <= lo:
                return None
            out_region.append(slice(lo, hi))
            layer_region.append(slice(o + lo, o + hi))
        return tuple(layer_region), tuple(out_region)

    def _protected(self) -> set[int]:
        """Slices of the layer not to write (read now: a slice painted meanwhile is kept too)."""
        run = self._run
        layer = run["layer"]
        if run["mode"] != "keep" or layer.ndim < 3:
            return set()
        return set(corrected_slices(layer))

    def _write_block(self, layer_region: tuple[slice, ...], values: np.ndarray) -> bool:
        """Write ``values`` into ``layer_region``, except the protected slices."""
        data = self._run["layer"].data
        protected = self._protected()
        if not protected:
            data[layer_region] = values
            return True
        z0 = layer_region[0].start
        wrote = False
        for lo, hi in free_runs(z0, z0 + values.shape[0], protected):
            data[(slice(lo, hi), *layer_region[1:])] = values[lo - z0:hi - z0]
            wrote = True
        return wrote

    def _on_progress(self, item: tuple[Any, np.ndarray | None]) -> None:
        update, preview = item
        run = self._run
        if run.get("finished") or run.get("returned"):  # a late update
            return
        run["done"], run["total"] = update.done, update.total
        if preview is not None:
            mapped = self._to_layer(update.region)
            if mapped is not None:
                layer_region, out_region = mapped
                local = tuple(slice(o.start - r.start, o.stop - r.start)
                              for o, r in zip(out_region, update.region))
                run["wrote"] = True
                self._writer.push(layer_region, preview[local], then=self._tile_written,
                                  itemsize=run["layer"].data.dtype.itemsize)
        if update.stage == "postprocess":
            self.status.setText("Post-processing (objects, small-object removal)…")
        elif update.stage == "plan":
            run["plan"] = update.message
            self.status.setText(f"{update.message}…")
        else:
            self.progress_bar.setRange(0, max(1, update.total))
            self.progress_bar.setValue(update.done)
            self.status.setText(f"{update.done}/{update.total} tiles · "
                                f"{format_seconds(update.elapsed)} · "
                                f"{format_seconds(update.eta)} left · {run['precision']}")
        if update.message and update.stage not in ("postprocess", "plan"):
            from napari.utils.notifications import show_warning

            show_warning(update.message)
        # last: napari's activity-panel bar calls processEvents, which may run later callbacks
        if self._pbar is not None and update.stage not in ("postprocess", "plan"):
            if self._pbar.total != update.total:
                self._pbar.total = update.total
            self._pbar.update(update.done - self._pbar.n)

    def _tile_written(self) -> None:
        """A tile's preview is in the layer: show it (at most every REFRESH_INTERVAL)."""
        run = self._run
        now = time.perf_counter()
        if run["first_tile"] is None:
            run["first_tile"] = now - run["start"]
        if now - run["last_refresh"] >= REFRESH_INTERVAL or not self._writer.pending:
            run["last_refresh"] = now
            run["layer"].refresh()

    def _on_result(self, returned: tuple[Any, int, int, dict[str, Any]]) -> None:
        result, n_found, largest, extras = returned
        self._run["extras"] = extras
        run = self._run
        run["returned"] = True
        layer = run["layer"]
        keep = run["keep"]
        values = np.asarray(result.data)[keep]  # a view
        layer_region = tuple(slice(o + k.start, o + k.stop) for o, k in zip(run["offset"], keep))
        if not _fits_in_place(layer.data, values.dtype, largest):
            # a reused layer whose dtype cannot hold the ids (rare): a wider copy of its data
            layer.data = np.asarray(layer.data, dtype=np.promote_types(layer.data.dtype,
                                                                       values.dtype))
        self.status.setText("Writing the result into the layer…")
        # the final labels overwrite the previews in the layer's own array, a piece per
        # event-loop pass: no new array, no data event, no long block of the viewer
        self._writer.push(layer_region, values,
                          then=lambda: self._result_written(result, n_found),
                          itemsize=layer.data.dtype.itemsize)

    def _result_written(self, result: Any, n_found: int) -> None:
        run = self._run
        layer = run["layer"]
        whole = all(r.start == 0 and r.stop == n for r, n in zip(run["read"], layer.data.shape))
        if whole:
            layer.metadata[PROBABILITIES_KEY] = result.probabilities
        else:
            layer.metadata.pop(PROBABILITIES_KEY, None)
        self.last_result = result
        self.progress_bar.setRange(0, max(1, run["total"]))
        self.progress_bar.setValue(max(1, run["total"]))
        elapsed = time.perf_counter() - run["start"]
        found = f"{n_found} objects" if result.output == "instances" else f"{n_found} class(es)"
        text = f"Done in {format_seconds(elapsed)}: {found} ({run['model'].label}, {run['precision']})."
        protected = sorted(self._protected())
        if protected:
            text += f" Corrected slices {_short_list(protected)} were left as they were."
        text += " Ctrl+Z puts the layer back as it was."
        text += self._show_uncertainty(run.get("extras") or {})
        for message in result.messages:
            text += f"\n{message}"
        layer.refresh()
        self.status.setText(text)

    def _show_uncertainty(self, extras: dict[str, Any]) -> str:
        """Put the uncertainty map and the suggested slices in place (main thread); returns
        what to add to the status line."""
        run = self._run
        text = ""
        uncertainty = extras.get("uncertainty")
        if uncertainty is not None:
            self.uncertainty_layer = self._uncertainty_into_layer(uncertainty)
            text += f" Uncertainty in {self.uncertainty_layer.name!r}."
        suggested = extras.get("suggested")
        if suggested is not None:
            set_suggested_slices(run["layer"], suggested)
            if suggested:
                text += (f" Suggested slices to correct: "
                         f"{_short_list([z for z, _ in suggested])} (Edit dock).")
        return text

    def _uncertainty_into_layer(self, uncertainty: np.ndarray) -> Any:
        """Add the image's uncertainty layer, or update the one there (same shape)."""
        from napari.layers import Image

        run = self._run
        image, keep, offset = run["image"], run["keep"], run["offset"]
        shape = self._spatial_shape(image)
        name = f"{image.name} uncertainty"
        values = uncertainty[keep]
        region = tuple(slice(o + k.start, o + k.stop) for o, k in zip(offset, keep))
        whole = all(r.start == 0 and r.stop == n for r, n in zip(region, shape))
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if not isinstance(layer, Image) or tuple(layer.data.shape) != shape \
                or not isinstance(layer.data, np.ndarray):
            if layer is not None:
                self.viewer.layers.remove(layer)
            data = values if whole else np.zeros(shape, np.float32)
            if not whole:
                data[region] = values
            ndim = len(shape)
            return self.viewer.add_image(data, name=name, colormap="magma", blending="additive",
                                         contrast_limits=(0.0, 1.0), scale=image.scale[-ndim:],
                                         translate=image.translate[-ndim:])
        if whole:
            layer.data = values
        else:
            layer.data[region] = values
            layer.refresh()
        return layer

    def _write_failed(self, err: BaseException) -> None:
        self._on_error(err)

    def _on_error(self, err: BaseException) -> None:
        run = self._run
        message = notify_error(err, f"Segment with {run['model'].label}")
        self.status.setText(message)
        layer = run["layer"]
        if run["created"] and not run["wrote"] and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)  # an empty layer would only confuse
            self.labels_layer = None

    def _on_abort(self) -> None:
        run = self._run
        run["layer"].refresh()
        self.status.setText(f"Cancelled after {run['done']}/{run['total']} tiles; the tiles done "
                            "so far are kept (thresholded, not split into objects). Ctrl+Z puts "
                            "the layer back as it was.")

    def _on_finish(self) -> None:
        self._run["finished"] = True
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._writer.when_done(self._finalize)  # after the tiles and result still queued

    def _finalize(self) -> None:
        """The run is over (result written, cancelled or failed): the dock is free again."""
        history = self._run.get("history")
        if history is not None:
            history.busy = None
        self._run["layer"].refresh()
        self.worker = None
        try:
            self.segment_button.setEnabled(True)
            self.cancel_button.setEnabled(False)
        except RuntimeError:
            pass

    @property
    def first_tile_seconds(self) -> float | None:
        """Seconds from clicking Segment to the first tile on screen (last run)."""
        return self._run.get("first_tile")


def _uncertainty_extras(result: Any, task: str, threshold: float,
                        uncertain: dict[str, Any] | None) -> dict[str, Any]:
    """In the worker: the uncertainty map (when asked) and the suggested slices (whole-stack
    runs), from the result's probabilities and the TTA spread."""
    if not uncertain:
        return {}
    from napari_unet.engine.uncertainty import rank_slices, uncertainty_map

    extras: dict[str, Any] = {}
    uncertainty = uncertainty_map(result.probabilities, task, uncertain.get("spread"))
    if uncertain.get("map"):
        extras["uncertainty"] = uncertainty
    if uncertain.get("rank"):
        extras["suggested"] = rank_slices(uncertainty, result.probabilities, SUGGESTED_SLICES,
                                          task=task, threshold=threshold,
                                          edge=uncertain.get("edge", 0),
                                          exclude=uncertain.get("exclude", ()))
    return extras


def labels_dtype(output: str, n_classes: int) -> np.dtype:
    """dtype of a labels layer for Segment's ``output``: uint8 for masks and up to 255 classes,
    else uint16 (also for instances; a result with more objects widens the layer).

    napari draws uint8/uint16 labels as they are; wider ids are hashed on the CPU at every
    redraw (~20-60 ms per 1024x1024 slice here), which would stall the viewer while tiles
    arrive.
    """
    if output != "instances" and n_classes <= 256:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16)


def free_runs(start: int, stop: int, protected: set[int]) -> list[tuple[int, int]]:
    """The runs ``[lo, hi)`` of ``range(start, stop)`` that contain no index of ``protected``."""
    runs, lo = [], None
    for z in range(start, stop):
        if z in protected:
            if lo is not None:
                runs.append((lo, z))
                lo = None
        elif lo is None:
            lo = z
    if lo is not None:
        runs.append((lo, stop))
    return runs


def _short_list(values: list[int], limit: int = 8) -> str:
    text = ", ".join(str(v) for v in values[:limit])
    return text + (f", … ({len(values)} in all)" if len(values) > limit else "")


def _fits_in_place(data: Any, dtype: np.dtype, largest: int) -> bool:
    """Whether labels of ``dtype`` (ids up to ``largest``) can be written into ``data`` as is."""
    if not isinstance(data, np.ndarray) or not data.flags.writeable:
        return False
    if not np.issubdtype(data.dtype, np.integer):
        return False
    if not (np.issubdtype(dtype, np.integer) or dtype == bool):
        return False
    return 0 <= largest <= np.iinfo(data.dtype).max
