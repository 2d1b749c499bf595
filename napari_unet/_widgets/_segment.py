"""Segment dock: run a model on an image layer, tile by tile, into a labels layer.

The form and the start of a run are here; a run in progress is :mod:`._segment_run`. The rules
(which region, which dtype, what to ask before overwriting corrections, the worker's previews)
are in the core: :mod:`napari_unet.engine.regions`, :mod:`napari_unet.engine.live`,
:mod:`napari_unet.labels.writeback`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QLabel,
    QVBoxLayout,
    QWidget,
)

from napari_unet._widgets._common import (
    ChunkedWriter,
    DockKeys,
    ProgressBar,
    ask_model_file,
    ask_yes_no,
    button,
    connect_until_destroyed,
    resolved_precision,
    row,
    status_label,
)
from napari_unet._widgets._fields import (
    LayerChoices,
    LayerCombo,
    add_fields,
    device_combo,
    fill_model_combo,
    is_user_choice,
    precision_combo,
    remember,
    select_model_in_combo,
)
from napari_unet._widgets._history import history_for
from napari_unet._widgets._model_choice import note_model_used, pick_model_for
from napari_unet._widgets._object_size import calibrated_voxel_size
from napari_unet._widgets._segment_form import NEW_LAYER, OUTPUTS, SCOPES, WRITE_MODES, add_run_fields
from napari_unet._widgets._segment_run import SegmentRun, SegmentRunMixin, spatial_shape
from napari_unet._widgets._state import (
    MODEL_KEY,
    SOURCE_KEY,
    UNIT_KEY,
    corrected_slices,
    current_slice_index,
    get_registry,
    import_heavy_modules_on_main_thread,
    install_correction_tracking,
    layer_unit,
    notify_error,
    set_corrected_slices,
    view_axis,
    view_point,
)
from napari_unet._widgets._view import warm_up_labels_visuals
from napari_unet._widgets._workers import start_job
from napari_unet.engine.live import (
    PredictOptions,
    default_output,
    labels_name,
    uncertainty_request,
    with_previews,
)
from napari_unet.engine.messages import model_summary, short_list
from napari_unet.engine.regions import (
    SLICE,
    VISIBLE,
    PredictRegion,
    predict_region,
)
from napari_unet.labels.slices import marks_outside, plane_label, z_slices
from napari_unet.labels.writeback import (
    KEEP,
    OVERWRITE,
    fresh_labels,
    labels_dtype,
    write_decision,
)
from napari_unet.model.checkpoint import CheckpointError

KEY = "Alt-G"


class SegmentWidget(SegmentRunMixin, LayerChoices, QWidget):
    """Pick a model, click Segment; the labels layer fills in tile by tile."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        from napari.layers import Image


        self.viewer = napari_viewer
        self.registry = get_registry()
        self.worker: Any = None
        self.last_result: Any = None
        self.labels_layer: Any = None
        #: the image layer with the last run's uncertainty map (the "Uncertainty layer" option)
        self.uncertainty_layer: Any = None
        self._pbar: Any = None
        #: the last run (None before the first)
        self._run: SegmentRun | None = None
        #: extra options of the prediction (tile shape, batch size); unset = automatic
        self.predict_options = PredictOptions()
        install_correction_tracking(napari_viewer)
        # heavy imports now (while the dock opens), never in a worker thread
        import_heavy_modules_on_main_thread()
        warm_up_labels_visuals()

        layout = QVBoxLayout(self)
        fields = QFormLayout()
        layout.addLayout(fields)

        add_fields(fields, self, image_combo=LayerCombo(
            napari_viewer, (Image,), "Image layer to segment (2D image or 3D stack)", label="Image"))

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

        add_fields(fields, self, device_combo=device_combo(
            "Where the model runs. Found here: {found}. auto = the fastest one; out of GPU memory "
            "falls back to smaller tiles, then to the CPU"), precision_combo=precision_combo(
            "Numeric precision: auto = bf16 on CPUs with native bf16 and on GPUs, fp16 on older "
            "GPUs, else fp32; fp32 = exact"))
        remember(self.device_combo, "device")

        add_run_fields(self, fields)

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
        #: the image the model was picked for (picked again when another image is chosen)
        self._picked_for: Any = None
        self.image_combo.changed.connect(self.pick_model)
        self.pick_model()
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

    def pick_model(self, *_: Any) -> None:
        """Select the model that fits the chosen image, once per image (:mod:`._model_choice`)."""
        image = self.image_combo.layer()
        if image is not None and image is not self._picked_for:
            self._picked_for = image
            choice = pick_model_for(image, self.registry, self.model_combo, self.model_info)
            if choice.key is not None:
                self._describe(choice.key)
            self.status.setText(f"{image.name}: {choice.reason}")

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
        self.model_info.setText(model_summary(model))
        if not is_user_choice(self.output_combo):  # the user's (saved) choice wins
            self.output_combo.setCurrentText(_OUTPUT_CHOICE[default_output(model)])

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
    def _region(self, layer: Any, model: Any) -> PredictRegion:
        """The region of ``layer`` read, and the part of it written, for the chosen scope."""
        shape = spatial_shape(layer)
        scope = SCOPES[self.scope_combo.currentText()]
        one_slice = scope == SLICE and len(shape) == 3
        z = current_slice_index(self.viewer, layer) if one_slice else None
        # a 3D model needs context: a slab around the slice
        halo = model.config.halo()[0] if one_slice and model.spatial_dims == 3 else 0
        corners = layer.corner_pixels if scope == VISIBLE else None
        return predict_region(scope, shape, z=z, spatial_dims=model.spatial_dims, halo=halo,
                              corners=corners, displayed=self.viewer.dims.displayed)

    # labels layer -----------------------------------------------------------------------------
    def _existing_layer(self, image: Any, shape: tuple[int, ...]) -> Any | None:
        """The image's labels layer, when it has the right shape (None: make a new one)."""
        from napari.layers import Labels

        name = labels_name(image.name)
        if name not in self.viewer.layers:
            return None
        layer = self.viewer.layers[name]
        if not isinstance(layer, Labels) or tuple(layer.data.shape) != shape:
            return None
        return layer

    def _new_layer(self, image: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        ndim = len(shape)
        return self.viewer.add_labels(np.zeros(shape, dtype=dtype), name=labels_name(image.name),
                                      scale=image.scale[-ndim:], translate=image.translate[-ndim:])

    def confirm_overwrite(self, text: str) -> bool:
        """Ask before corrected slices or edits are overwritten (a seam for tests)."""
        return ask_yes_no(self, "Overwrite your corrections?", text)

    def _write_mode(self, layer: Any, z_range: range) -> str | None:
        """``keep`` or ``overwrite`` for an existing layer, after asking where needed; None = stop."""
        decision = write_decision(WRITE_MODES[self.write_combo.currentText()], layer.name,
                                  layer.ndim, corrected_slices(layer), z_range,
                                  history_for(layer).edited)
        if decision.question is not None and not self.confirm_overwrite(decision.question):
            return None
        return decision.mode

    def _record_undo(self, layer: Any, created: bool, mode: str, region: PredictRegion,
                     dtype: np.dtype, description: str) -> Any:
        """Make the run one undo step of ``layer`` (its history, busy until the run ends)."""
        shape = tuple(layer.data.shape)
        history = history_for(layer)
        marks = None
        if not created and mode == OVERWRITE:
            # overwritten slices are no longer corrected (Fine-tune must not train on them);
            # undo marks them again
            before = corrected_slices(layer)
            remaining = (marks_outside(before, region.z_range(len(shape)), region.layer_region)
                         if layer.ndim >= 3 else [])
            if remaining != before:
                marks = before
                set_corrected_slices(layer, remaining)
        if created:
            history.record(None, np.zeros(shape, dtype=layer.data.dtype), description)
        elif region.writes_all(shape):
            # a new array, so the tiles show as they arrive; the old one is the undo step (no copy)
            old = layer.data
            kept = corrected_slices(layer) if mode == KEEP and layer.ndim >= 3 else ()
            history.record(None, old, description, marks)
            layer.data = fresh_labels(old, shape, dtype, kept)
        else:
            where = region.layer_region
            history.record(where, np.array(layer.data[where], copy=True), description, marks)
        history.busy = "Segment"
        return history

    # run --------------------------------------------------------------------------------------
    def segment(self) -> None:
        """Start segmenting the chosen image with the chosen model (in a worker).

        The image is read tile by tile in the worker (a lazy, dask-backed layer is never loaded
        on the main thread). The labels go into the image's labels layer, leaving its corrected
        slices as they are (default), or into a new layer; one Ctrl+Z puts the layer back as
        it was.
        """
        from napari.utils.notifications import show_info

        from napari_unet.zoo.predict import (
            segment_model as segment,  # Zoo models made elsewhere: blended tiles
        )

        if self.worker is not None:
            show_info("Segmentation is already running; Cancel it first.")
            return
        image = self.image_combo.layer()
        if image is None:
            self._refused("Open an image first (File > Open, or File > Open Sample > napari-unet).")
            return
        if image.rgb:
            self._refused(f"{image.name!r} is an RGB image; the models take one channel. "
                          "Convert it to grayscale first.")
            return
        try:
            model = self.registry.get()
        except CheckpointError as err:
            self._refused(notify_error(err, "Segment"), shown=True)
            return
        note_model_used(self.registry, image)
        import_heavy_modules_on_main_thread()

        data = image.data[0] if image.multiscale else image.data
        shape = spatial_shape(image)
        if SCOPES[self.scope_combo.currentText()] == SLICE and len(shape) == 3 \
                and view_axis(self.viewer, image):
            self._refused(notify_error(ValueError(
                "'current slice' segments a z slice and the view shows a y or x slice: view the "
                "stack along z (napari's transpose button)"), "Segment"), shown=True)
            return
        region = self._region(image, model)
        voxel_size = tuple(float(s) for s in image.scale[-len(shape):])
        output = OUTPUTS[self.output_combo.currentText()]
        device, precision = self.device_combo.currentData(), self.precision_combo.currentData()
        try:
            sub = data[region.read]  # a view (numpy) or a lazy slice (dask): nothing is read here
            if sub.ndim not in (2, 3):
                raise ValueError(f"{image.name!r} has {sub.ndim} axes; open a 2D image or a 3D stack")
            if model.spatial_dims == 3 and sub.ndim != 3:
                raise ValueError(f"{model.label} is a 3D model and {image.name!r} is a 2D image; "
                                 "pick a 2D model")
            precision_label = resolved_precision(precision, device)
            zoom = self.object_size.zoom(model, calibrated_voxel_size(image, len(shape)))
        except (ValueError, MemoryError) as err:
            self._refused(notify_error(err, f"Segment {image.name!r} with {model.label}"), shown=True)
            return
        layer = None
        if self.write_combo.currentText() != NEW_LAYER:
            layer = self._existing_layer(image, shape)
        mode = OVERWRITE
        if layer is not None:
            mode = self._write_mode(layer, region.z_range(len(shape)))
            if mode is None:
                self.status.setText("Nothing was changed (your corrections are kept).")
                return
        # the job's own checks (device, channels) run in the worker and come back as errors
        tta = self.tta_check.isChecked()
        uncertain = uncertainty_request(shape, model, show=self.uncertainty_check.isChecked(),
                                        whole=region.reads_all(shape), tta=tta,
                                        input_shape=sub.shape)
        if not self.postprocess_edited:  # the model's tuned values (it may have just loaded)
            self.show_model_postprocess(model)
        threshold = self.threshold_spin.value()
        job = segment(sub, model, output=output, device=device, precision=precision,
                      threshold=threshold,  # the model's min size follows the voxel size
                      min_size=self.min_size_spin.value() if self.postprocess_edited else None,
                      voxel_size=voxel_size, start_at=region.start_at(view_point(self.viewer, image)),
                      tta=tta, tta_spread=uncertain.spread if uncertain else None,
                      stitch_threshold=self.stitch_spin.value(), scale=zoom,
                      **self.predict_options.kwargs())

        created = layer is None
        dtype = labels_dtype(output, len(model.class_names))
        if created:
            layer = self._new_layer(image, shape, dtype)
        unit = layer_unit(image, default="")  # none for an uncalibrated image (pixels)
        if unit:
            layer.metadata[UNIT_KEY] = unit
        else:
            layer.metadata.pop(UNIT_KEY, None)
        layer.metadata[MODEL_KEY] = model.label
        if image.source.path:
            layer.metadata[SOURCE_KEY] = str(image.source.path)
        self.labels_layer = layer
        history = self._record_undo(layer, created, mode, region, dtype, f"Segment with {model.label}")
        self._writer = ChunkedWriter(self._write_block, parent=self, on_error=self._write_failed)
        self._run = SegmentRun(image=image, model=model, layer=layer, created=created,
                               region=region, output=output, threshold=threshold,
                               precision=precision_label, mode=mode, history=history,
                               uncertain=uncertain,
                               activity=f"Segment {image.name} ({model.label})")
        self._pbar = None  # napari's activity bar: made with the first tile count, not here
        self.progress_bar.setRange(0, 0)  # busy until the tile count is known
        self.segment_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        kept = ""
        if mode == KEEP and layer.ndim >= 3 and corrected_slices(layer):
            kept = (f"; corrected slices "
                    f"{short_list([plane_label(p) for p in corrected_slices(layer)])} are kept")
        augmented = " · TTA x8" if tta else ""
        self.status.setText(f"Segmenting {image.name} with {model.label} · {precision_label}"
                            f"{augmented}{kept}…")
        if uncertain is not None:
            # corrected slices are done: never suggested again
            uncertain.exclude = z_slices(corrected_slices(layer)) if layer.ndim >= 3 else []
        self.worker = start_job(with_previews(job, model.task, threshold, uncertain),
                                on_yield=self._on_progress, on_return=self._on_result,
                                on_error=self._on_error, on_finish=self._on_finish,
                                on_abort=self._on_abort)


#: the Output choice that shows each core output
_OUTPUT_CHOICE = {output: choice for choice, output in OUTPUTS.items()}
