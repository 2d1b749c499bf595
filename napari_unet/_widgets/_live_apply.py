"""Live mode's Apply: segment the whole image with the live weights into the user's labels,
exactly as a Segment run does (the corrected slices are kept, one Ctrl+Z undoes it).

The run is a Segment run: the same job (:func:`~napari_unet.zoo.predict.segment_model` with the
worker's previews), the same undo step (:meth:`SegmentWidget._record_undo`), the same
write-back that leaves the corrected slices alone (:class:`._segment_run.SegmentRunMixin`), so
Apply needs no Segment dock.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from qtpy.QtCore import QObject

from napari_unet._widgets._common import ChunkedWriter
from napari_unet._widgets._history import history_for
from napari_unet._widgets._segment import SegmentWidget
from napari_unet._widgets._segment_run import SegmentRun, SegmentRunMixin, spatial_shape
from napari_unet._widgets._state import (
    corrected_slices,
    import_heavy_modules_on_main_thread,
    notify_error,
    view_point,
)
from napari_unet._widgets._workers import start_job
from napari_unet.engine.live import default_output, with_previews
from napari_unet.engine.regions import WHOLE, predict_region
from napari_unet.labels.writeback import KEEP, labels_dtype, write_decision


def apply_output(model: Any, planes: dict[Any, np.ndarray]) -> str:
    """The output Apply writes: instances when the user's corrections hold several objects (or
    the model makes objects), else the model's own (masks or class ids)."""
    if model.task in ("foreground", "foreground_boundary"):
        if any(p.size and int(p.max()) > 1 for p in planes.values()):
            return "instances"
    return default_output(model)


class LiveApply(SegmentRunMixin, QObject):
    """Runs Apply; its callbacks are the Segment dock's (:class:`SegmentRunMixin`).

    ``status``, ``progress_bar`` and ``segment_button`` are the Live panel's widgets;
    ``cancel_button`` the panel's Cancel of Apply.
    """

    #: the undo step of a run, exactly as Segment makes it
    _record_undo = SegmentWidget._record_undo

    def __init__(self, viewer: Any, status: Any, progress_bar: Any, apply_button: Any,
                 cancel_button: Any, confirm: Callable[[str], bool], parent: QObject | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.status, self.progress_bar = status, progress_bar
        self.segment_button, self.cancel_button = apply_button, cancel_button
        self.confirm_overwrite = confirm
        self.worker: Any = None
        self._run: SegmentRun | None = None
        self._writer: ChunkedWriter | None = None
        self._pbar: Any = None
        self.last_result: Any = None
        self.labels_layer: Any = None
        self.uncertainty_layer: Any = None

    def start(self, model: Any, image: Any, layer: Any, output: str, *, device: str = "auto",
              precision: str = "auto", precision_label: str = "") -> bool:
        """Segment ``image`` with ``model`` into the labels ``layer`` (whole image, corrected
        slices kept); False when it does not start (the reason is in the status line)."""
        from napari_unet.engine.predict import postprocess_settings
        from napari_unet.zoo.predict import segment_model

        if self.worker is not None:
            self.status.setText("Apply is already running.")
            return False
        shape = spatial_shape(image)
        if tuple(layer.data.shape) != shape:
            self.status.setText(notify_error(ValueError(
                f"{layer.name!r} has shape {tuple(layer.data.shape)} and {image.name!r} "
                f"{shape}"), "Apply"))
            return False
        import_heavy_modules_on_main_thread()
        region = predict_region(WHOLE, shape, spatial_dims=model.spatial_dims)
        decision = write_decision(KEEP, layer.name, layer.ndim, corrected_slices(layer),
                                  region.z_range(len(shape)), history_for(layer).edited)
        if decision.question is not None and not self.confirm_overwrite(decision.question):
            self.status.setText("Nothing was changed (your corrections are kept).")
            return False
        mode = decision.mode
        data = image.data[0] if image.multiscale else image.data
        threshold = postprocess_settings(model)[0]
        voxel_size = tuple(float(s) for s in image.scale[-len(shape):])
        job = segment_model(data[region.read], model, output=output, device=device,
                            precision=precision, threshold=threshold, voxel_size=voxel_size,
                            start_at=region.start_at(view_point(self.viewer, image)))
        description = f"Apply live weights ({model.label})"
        dtype = labels_dtype(output, len(model.class_names))
        history = self._record_undo(layer, False, mode, region, dtype, description)
        self.labels_layer = layer
        self._writer = ChunkedWriter(self._write_block, parent=self, on_error=self._write_failed)
        self._run = SegmentRun(image=image, model=model, layer=layer, created=False,
                               region=region, output=output, threshold=threshold,
                               precision=precision_label or precision, mode=mode,
                               history=history, activity=f"Apply {model.label} to {image.name}")
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setRange(0, 0)
        self.segment_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText(f"Segmenting {image.name} with {model.label}; corrected slices are "
                            "kept…")
        self.worker = start_job(with_previews(job, model.task, threshold, None),
                                on_yield=self._on_progress, on_return=self._on_result,
                                on_error=self._on_error, on_finish=self._on_finish,
                                on_abort=self._on_abort)
        return True

    @property
    def running(self) -> bool:
        return self.worker is not None
