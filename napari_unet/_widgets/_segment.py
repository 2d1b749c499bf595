"""Segment dock: run a model on an image layer, tile by tile, into a labels layer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QLabel, QSpinBox,
                            QVBoxLayout, QWidget)

from ..checkpoint import CheckpointError
from ..postprocess import DEFAULT_MIN_SIZE
from ._common import (LayerCombo, ProgressBar, button, connect_until_destroyed, fill_model_combo,
                      row, select_model_in_combo, status_label)
from ._state import (MODEL_KEY, PROBABILITIES_KEY, SOURCE_KEY, UNIT_KEY, current_slice_index,
                     format_seconds, get_registry, import_heavy_modules_on_main_thread,
                     install_correction_tracking, layer_unit, notify_error)
from ._workers import start_job

OUTPUTS = {"instances": "instances", "binary / classes": "labels"}
SCOPES = ("whole stack", "current slice", "visible region")
#: the labels layer is redrawn at most this often while tiles arrive (seconds)
REFRESH_INTERVAL = 0.1


class SegmentWidget(QWidget):
    """Pick a model, click Segment; the labels layer fills in tile by tile."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        from napari.layers import Image

        from ..inference import available_devices

        self.viewer = napari_viewer
        self.registry = get_registry()
        self.worker: Any = None
        self.last_result: Any = None
        self.labels_layer: Any = None
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
        self.load_button = button("Load model file…", "Add a napari-unet checkpoint (.pt) to the list",
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

        self.output_combo = QComboBox()
        self.output_combo.addItems(list(OUTPUTS))
        self.output_combo.setToolTip("instances: one id per object (nuclei, cells); binary / "
                                     "classes: foreground = 1, or class ids for multi-class models")
        fields.addRow("Output", self.output_combo)

        self.scope_combo = QComboBox()
        self.scope_combo.addItems(list(SCOPES))
        self.scope_combo.setToolTip("whole stack: everything; current slice: only the slice on "
                                    "screen (fast check); visible region: the part in view (all "
                                    "slices)")
        fields.addRow("Scope", self.scope_combo)

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

        self.segment_button = button("Segment", "Run the model on the image (Alt+S). The labels "
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
        napari_viewer.bind_key("Alt-S", lambda _viewer: self.segment(), overwrite=True)

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

    def _describe(self, key: str) -> None:
        if not key or key not in self.registry:
            self.model_info.setText("")
            return
        entry = self.registry.entry(key)
        if entry.model is None:
            self.model_info.setText(f"{entry.source} model (loads on first use)")
            return
        model = entry.model
        text = f"{model.spatial_dims}D · {model.task}"
        if model.task in ("foreground_boundary",) or "nuclei" in model.name or "cells" in model.name:
            default = "instances"
        else:
            default = "binary / classes"
        if model.description:
            text += f" · {model.description.splitlines()[0][:80]}"
        self.model_info.setText(text)
        self.output_combo.setCurrentText(default)

    def _choose_model_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load napari-unet model", "",
                                              "napari-unet checkpoints (*.pt *.pth);;All files (*)")
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
    def _target_layer(self, image: Any, shape: tuple[int, ...], model: Any) -> Any:
        """The labels layer for ``image`` (reused when it has the right shape)."""
        name = f"{image.name} labels"
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if layer is not None and tuple(layer.data.shape) != shape:
            layer = None
        if layer is None:
            layer = self.viewer.add_labels(np.zeros(shape, dtype=np.uint32), name=name,
                                           scale=image.scale, translate=image.translate)
        layer.metadata[UNIT_KEY] = layer_unit(image)
        layer.metadata[MODEL_KEY] = model.label
        if image.source.path:
            layer.metadata[SOURCE_KEY] = str(image.source.path)
        return layer

    # run --------------------------------------------------------------------------------------
    def segment(self) -> None:
        """Start segmenting the chosen image with the chosen model (in a worker)."""
        from napari.utils import progress
        from napari.utils.notifications import show_info, show_warning

        from ..inference import segment

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
        try:
            sub = np.asarray(data[read])
            if sub.ndim not in (2, 3):
                raise ValueError(f"{image.name!r} has {sub.ndim} axes; open a 2D image or a 3D stack")
            if model.spatial_dims == 3 and sub.ndim != 3:
                raise ValueError(f"{model.label} is a 3D model and {image.name!r} is a 2D image; "
                                 "pick a 2D model")
        except (ValueError, MemoryError) as err:
            notify_error(err, f"Segment {image.name!r} with {model.label}")
            return
        # the job's own checks (device, channels) run in the worker and come back as errors
        job = segment(sub, model, output=output, device=self.device_combo.currentData(),
                      threshold=self.threshold_spin.value(), min_size=self.min_size_spin.value(),
                      voxel_size=voxel_size, **self.predict_options)

        created = f"{image.name} labels" not in self.viewer.layers
        layer = self._target_layer(image, shape, model)
        self.labels_layer = layer
        offset = tuple(s.start for s in read)
        self._run = {"image": image, "model": model, "layer": layer, "offset": offset,
                     "keep": keep, "read": read, "output": output, "last_refresh": 0.0,
                     "threshold": self.threshold_spin.value(), "start": time.perf_counter(),
                     "first_tile": None, "done": 0, "total": 0, "created": created,
                     "wrote": False}
        # whole-scope runs start from an empty layer, so the tiles show as they arrive
        whole = all(r.start == 0 and r.stop == n for r, n in zip(read, shape))
        if whole and not created:
            # big enough for any object count, so the result is written in place at the end
            dtype = layer.data.dtype if output != "instances" else np.promote_types(
                layer.data.dtype, np.uint32)
            layer.data = np.zeros(shape, dtype=dtype)
        self._pbar = progress(total=0, desc=f"Segment {image.name} ({model.label})")
        self.progress_bar.setRange(0, 0)  # busy until the tile count is known
        self.segment_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"Segmenting {image.name} with {model.label}…")
        self.worker = start_job(self._with_previews(job, model.task, self.threshold_spin.value()),
                                on_yield=self._on_progress, on_return=self._on_result,
                                on_error=self._on_error, on_finish=self._on_finish,
                                on_abort=self._on_abort)

    @staticmethod
    def _with_previews(job: Any, task: str, threshold: float) -> Any:
        """Run in the worker: pass the job's progress on, with the tile's thresholded preview
        computed here rather than on the main thread."""
        from ..postprocess import to_semantic

        while True:
            try:
                update = next(job)
            except StopIteration as stop:
                result = stop.value
                # count objects (and find the largest id) here, not on the main thread
                ids = np.unique(result.data) if result.output != "probabilities" else np.zeros(1)
                largest = int(ids[-1]) if ids.size and result.output != "probabilities" else 0
                return result, int(np.count_nonzero(ids)), largest
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
        if self.worker is not None:
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

    def _on_progress(self, item: tuple[Any, np.ndarray | None]) -> None:
        update, preview = item
        run = self._run
        if run.get("finished"):  # a late update (napari's progress bar processes events)
            return
        run["done"], run["total"] = update.done, update.total
        if preview is not None:
            mapped = self._to_layer(update.region)
            if mapped is not None:
                layer_region, out_region = mapped
                local = tuple(slice(o.start - r.start, o.stop - r.start)
                              for o, r in zip(out_region, update.region))
                run["layer"].data[layer_region] = preview[local]
                run["wrote"] = True
                if run["first_tile"] is None:
                    run["first_tile"] = time.perf_counter() - run["start"]
        now = time.perf_counter()
        if now - run["last_refresh"] >= REFRESH_INTERVAL or update.done >= update.total:
            run["last_refresh"] = now
            run["layer"].refresh()
        if update.stage == "postprocess":
            self.status.setText("Post-processing (objects, small-object removal)…")
        else:
            self.progress_bar.setRange(0, max(1, update.total))
            self.progress_bar.setValue(update.done)
            self.status.setText(f"{update.done}/{update.total} tiles · "
                                f"{format_seconds(update.elapsed)} · "
                                f"{format_seconds(update.eta)} left")
        if update.message and update.stage != "postprocess":
            from napari.utils.notifications import show_warning

            show_warning(update.message)
        # last: napari's activity-panel bar calls processEvents, which may run later callbacks
        if self._pbar is not None and update.stage != "postprocess":
            if self._pbar.total != update.total:
                self._pbar.total = update.total
            self._pbar.update(update.done - self._pbar.n)

    def _on_result(self, returned: tuple[Any, int, int]) -> None:
        result, n_found, largest = returned
        run = self._run
        layer = run["layer"]
        keep = run["keep"]
        values = np.asarray(result.data)[keep]  # a view
        layer_region = tuple(slice(o + k.start, o + k.stop) for o, k in zip(run["offset"], keep))
        if _fits_in_place(layer.data, values.dtype, largest):
            # the final result overwrites the preview in the layer's own array: one copy of the
            # segmented region, no new array, no data event (napari re-slices what is on screen)
            layer.data[layer_region] = values
            layer.refresh()
        else:  # a reused layer whose dtype cannot hold the ids (rare): replace its data
            full = np.asarray(layer.data, dtype=np.promote_types(layer.data.dtype, values.dtype))
            full[layer_region] = values
            layer.data = full
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
        self.status.setText(f"Done in {format_seconds(elapsed)}: {found} ({run['model'].label}).")
        for message in result.messages:
            self.status.setText(self.status.text() + f"\n{message}")

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
                            "so far are kept (thresholded, not split into objects).")

    def _on_finish(self) -> None:
        self._run["finished"] = True
        self.worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        try:
            self.segment_button.setEnabled(True)
            self.cancel_button.setEnabled(False)
        except RuntimeError:
            pass

    @property
    def first_tile_seconds(self) -> float | None:
        """Seconds from clicking Segment to the first tile on screen (last run)."""
        return self._run.get("first_tile")


def _fits_in_place(data: Any, dtype: np.dtype, largest: int) -> bool:
    """Whether labels of ``dtype`` (ids up to ``largest``) can be written into ``data`` as is."""
    if not isinstance(data, np.ndarray) or not data.flags.writeable:
        return False
    if not np.issubdtype(data.dtype, np.integer):
        return False
    if not (np.issubdtype(dtype, np.integer) or dtype == bool):
        return False
    return 0 <= largest <= np.iinfo(data.dtype).max
