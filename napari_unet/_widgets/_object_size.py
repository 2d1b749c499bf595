"""The Segment dock's object size row: the expected object diameter (as Cellpose's diameter),
its unit, an *Estimate* button, and a note saying where the run's zoom comes from."""

from __future__ import annotations

from typing import Any, Sequence

from magicgui.widgets import ComboBox, FloatSpinBox
from qtpy.QtWidgets import QHBoxLayout, QLabel, QVBoxLayout, QWidget

from napari_unet._widgets._common import button
from napari_unet._widgets._workers import start_job

#: the unit choices and the core's units
UNITS = {"px": "px", "µm": "um"}
AUTO = "auto"


def calibrated_voxel_size(layer: Any, ndim: int) -> tuple[float, ...] | None:
    """The layer's voxel size in µm when it has one (a scale other than napari's default 1)."""
    from napari_unet._widgets._state import layer_unit
    from napari_unet.io.formats import voxel_size_um

    scale = tuple(float(s) for s in layer.scale[-ndim:])
    if all(s == 1.0 for s in scale):
        return None
    return voxel_size_um(scale, layer_unit(layer))


class ObjectSizeRow(QWidget):
    """Diameter (``auto``: from the voxel sizes, else the model's own size), unit, *Estimate*.

    :meth:`zoom` gives the run's zoom per model axis and shows its source in :attr:`note`;
    :meth:`estimate` measures the objects of the chosen model in the image's centre
    (:func:`napari_unet.engine.estimate.estimate_object_size`) in a worker.
    """

    def __init__(self, dock: Any, parent: QWidget | None = None):
        super().__init__(parent)
        self.dock = dock
        self.worker: Any = None
        self.spin = FloatSpinBox(max=100_000.0, step=1.0, tooltip=(
            "Expected object diameter (as Cellpose's diameter). The image is resampled tile by "
            "tile so objects reach the model at the size it was trained on; labels come back "
            "on the image's grid. auto: from the image's voxel size against the model's, else "
            "no resampling")).native
        self.spin.setDecimals(1)
        self.spin.setSpecialValueText(AUTO)
        self.unit_combo = ComboBox(choices=list(UNITS), tooltip=(
            "px: pixels (voxels); µm: needs the layer's scale (voxel size)")).native
        self.estimate_button = button("Estimate", "Measure the objects the model finds in the "
                                      "centre of the image (two quick passes) and use their size",
                                      self.estimate)
        self.note = QLabel("")
        self.note.setWordWrap(True)
        self.note.setToolTip("Where the zoom of the next run comes from")
        line = QHBoxLayout()
        line.setContentsMargins(0, 0, 0, 0)
        for widget in (self.spin, self.unit_combo):
            line.addWidget(widget)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(line)
        layout.addWidget(self.estimate_button)  # a line of its own: the dock stays narrow
        layout.addWidget(self.note)
        self.spin.valueChanged.connect(self._edited)
        self.unit_combo.currentIndexChanged.connect(self._edited)

    def size(self) -> tuple[float, str] | None:
        """``(diameter, unit)``, or None for ``auto``."""
        value = self.spin.value()
        return None if value <= 0 else (float(value), UNITS[self.unit_combo.currentText()])

    def _edited(self, *_: Any) -> None:
        self.note.setText("")

    def zoom(self, model: Any, voxel_size: Sequence[float] | None) -> tuple[float, ...] | None:
        """The zoom per model axis for ``model`` on an image of ``voxel_size`` (None: none),
        shown in :attr:`note`. Raises ``ValueError`` (one line) when it cannot be had."""
        from napari_unet.engine.resample import scale_for_model

        if getattr(model, "foreign", False):
            if self.size() is not None:
                raise ValueError("a Zoo model made elsewhere does not store the size of its "
                                 "training objects: set the object size to auto")
            return None
        scale, source = scale_for_model(model, voxel_size, self.size())
        if scale is None:
            self.note.setText(f"No resampling: {source}.")
        else:
            zooms = ", ".join(f"{s:.3g}" for s in scale)
            self.note.setText(f"Resampled x({zooms}): {source}.")
        return scale

    def estimate(self) -> None:
        """Estimate the object size of the chosen image with the chosen model (in a worker)."""
        from napari_unet.engine.estimate import estimate_object_size, zoom_from_estimate
        from napari_unet.model.checkpoint import CheckpointError

        if self.worker is not None:
            return
        image = self.dock.image_combo.layer()
        if image is None:
            self.note.setText("Open an image first.")
            return
        try:
            model = self.dock.registry.get()
        except CheckpointError as err:
            self.note.setText(str(err))
            return
        data = image.data[0] if image.multiscale else image.data
        voxel_size = calibrated_voxel_size(image, min(3, data.ndim))
        job = estimate_object_size(data, model, voxel_size=voxel_size,
                                   device=self.dock.device_combo.currentData(),
                                   precision=self.dock.precision_combo.currentData())
        self.estimate_button.setEnabled(False)
        self.note.setText(f"Estimating the object size of {image.name} with {model.label}…")

        def found(diameter: float) -> None:
            scale, source = zoom_from_estimate(model, voxel_size, diameter)
            self.spin.blockSignals(True)
            self.unit_combo.blockSignals(True)
            self.unit_combo.setCurrentText("px")
            # close to the model's own size: auto (no resampling unless the voxel sizes say so)
            self.spin.setValue(diameter if scale is not None else 0.0)
            self.spin.blockSignals(False)
            self.unit_combo.blockSignals(False)
            self.note.setText(f"Estimated in the centre of {image.name}: {source}"
                              f"{'' if scale is not None else ': object size left at auto'}.")

        def failed(error: BaseException) -> None:
            self.note.setText(f"Estimate failed: {error}")

        def finished() -> None:
            self.worker = None
            self.estimate_button.setEnabled(True)

        self.worker = start_job(job, on_yield=lambda _: None, on_return=found, on_error=failed,
                                on_finish=finished)
