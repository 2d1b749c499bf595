"""Measurements dock: one row per object of a labels layer, kept up to date after edits.

The table is the layer's ``features`` (a ``label`` column equal to the pixel id, napari's
``index`` too so that napari's status bar shows the right row). It is measured in a worker
(:mod:`napari_unet.labels.measure`) when a labels layer is chosen or opened, when Segment or a
whole-stack edit finishes, and after each edit; an edit of one slice re-measures only the
labels it touched. Clicking a row selects that label and centres the view on it.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import CheckBox
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QFormLayout,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from napari_unet._widgets._common import button, row, status_label
from napari_unet._widgets._fields import LayerChoices, LayerCombo, add_fields
from napari_unet._widgets._history import history_for
from napari_unet._widgets._measure_table import MeasurementModel
from napari_unet._widgets._state import SOURCE_KEY, layer_unit, notify_error
from napari_unet._widgets._workers import start_job
from napari_unet.engine.live import labels_name
from napari_unet.io.table import measurements_path, write_csv
from napari_unet.labels.measure import column_units, measure_labels, update_table

#: milliseconds of quiet after an edit before measuring (a brush stroke is many paint events)
DELAY_MS = 300
#: the last table measured for each labels layer (the base of the next incremental update)
_TABLES: "weakref.WeakKeyDictionary[Any, dict[str, np.ndarray]]" = weakref.WeakKeyDictionary()


def table_of(layer: Any) -> dict[str, np.ndarray] | None:
    """The measurements of ``layer`` made by this dock (None: not measured yet)."""
    return _TABLES.get(layer)


def image_for(viewer: Any, labels: Any) -> Any | None:
    """The image layer ``labels`` were made from: the one Segment names them after, else the
    only image layer of the same shape (None when there is no such single layer)."""
    from napari.layers import Image

    images = [layer for layer in viewer.layers if isinstance(layer, Image) and not layer.rgb
              and tuple(_data(layer).shape) == tuple(labels.data.shape)]
    for image in images:
        if labels_name(image.name) == labels.name:
            return image
    return images[0] if len(images) == 1 else None


def intensity_data(viewer: Any, labels: Any) -> Any | None:
    """The pixels of :func:`image_for` (None when there is no such image)."""
    image = image_for(viewer, labels)
    return None if image is None else _data(image)


def _data(layer: Any) -> Any:
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def table_unit(layer: Any) -> str:
    """The length unit of a labels layer's measurements: its own, else ``px`` for an
    uncalibrated layer (scale 1), else ``um`` (a scale set without a unit)."""
    unit = layer_unit(layer, default="")
    if unit:
        return unit
    return "um" if any(float(s) != 1.0 for s in layer.scale) else "px"

class MeasureWidget(LayerChoices, QWidget):
    """The measurement table of a labels layer: click a row to go to the object."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        from napari.layers import Image, Labels

        self.viewer = napari_viewer
        self.worker: Any = None
        self._layer: Any = None  # the labels layer watched
        self._observer: Any = None
        self._full = True  # the next measurement re-measures everything
        self._touched: set[int] = set()
        layout = QVBoxLayout(self)
        fields = QFormLayout()
        layout.addLayout(fields)
        add_fields(
            fields, self,
            labels_combo=LayerCombo(napari_viewer, (Labels,), "Labels layer to measure",
                                    label="Labels"),
            image_combo=LayerCombo(napari_viewer, (Image,), "Image for the intensity columns "
                                   "(same shape as the labels)", allow_none=True,
                                   label="Intensity"),
            auto_check=CheckBox(text="Update after edits", value=True, tooltip=(
                "Measure again after Segment and each edit (only the objects an edit touched), "
                "in the background")))
        self.measure_button = button("Measure", "Measure every object again", self.measure)
        self.save_button = button("Save CSV…", "Write the table as CSV (units in the header)",
                                  self._choose_csv)
        layout.addWidget(row(self.measure_button, self.save_button))
        self.status = status_label("Choose a labels layer.")
        layout.addWidget(self.status)
        self.model = MeasurementModel(self)
        self.view = QTableView()
        self.view.setModel(self.model)
        self.view.setSortingEnabled(True)
        self.view.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SingleSelection)
        self.view.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.view.setToolTip("One row per object; click a row to select the label and centre the "
                             "view on it; click a header to sort")
        self.view.clicked.connect(lambda index: self.go_to_row(index.row()))
        layout.addWidget(self.view, 1)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DELAY_MS)
        self._timer.timeout.connect(self._start)
        self.labels_combo.changed.connect(self._labels_changed)
        self.image_combo.changed.connect(self._image_changed)
        self._labels_changed()

    # which layer ------------------------------------------------------------------------------
    def _labels_changed(self, *_: Any) -> None:
        layer = self.labels_combo.layer()
        if layer is self._layer:
            return
        self._unwatch()
        self._layer = layer
        if layer is None:
            self.model.set_table({}, {})
            self.status.setText("Choose a labels layer.")
            return
        image = image_for(self.viewer, layer)
        with self.image_combo.changed.blocked():
            self.image_combo.set_layer(image)
        history = history_for(layer)
        ref = weakref.WeakMethod(self._edited)

        def observer(touched: np.ndarray | None) -> None:
            method = ref()
            if method is not None:
                method(touched)

        self._observer = (history, observer)
        history.observers.append(observer)
        table = table_of(layer)
        if table is not None and "label" in layer.features:
            self._show(layer, table)
        self._full, self._touched = table is None, set()
        if table is None:
            self._schedule()

    def _unwatch(self) -> None:
        if self._observer is not None:
            history, observer = self._observer
            if observer in history.observers:
                history.observers.remove(observer)
        self._observer = None

    def _image_changed(self, *_: Any) -> None:
        self.measure()

    def _image_data(self) -> Any | None:
        image = self.image_combo.layer()
        if image is None or self._layer is None:
            return None
        data = _data(image)
        if tuple(data.shape) != tuple(self._layer.data.shape):
            self.status.setText(f"{image.name!r} has shape {tuple(data.shape)}, the labels "
                                f"{tuple(self._layer.data.shape)}: no intensity columns.")
            return None
        return data

    # when -------------------------------------------------------------------------------------
    def _edited(self, touched: np.ndarray | None) -> None:
        if not self.auto_check.isChecked():
            return
        if touched is None:
            self._full = True
        else:
            self._touched.update(int(i) for i in touched)
        self._schedule()

    def _schedule(self) -> None:
        self._timer.start()

    def measure(self) -> None:
        """Measure every object of the chosen labels layer again (in a worker)."""
        self._full = True
        self._schedule()

    # measuring --------------------------------------------------------------------------------
    def _start(self) -> None:
        layer = self._layer
        if layer is None or self.worker is not None:
            return  # a running measurement checks for more work when it ends
        if history_for(layer).busy:
            self.status.setText(f"Waiting for {history_for(layer).busy} to finish…")
            return  # the history tells us when it is free
        if not self._full and not self._touched:
            return
        if layer.ndim not in (2, 3):
            self.status.setText(f"{layer.name!r} has {layer.ndim} axes; measurements take 2D or 3D.")
            return
        table = table_of(layer)
        image = self._image_data()
        ndim = layer.ndim
        spacing = tuple(float(s) for s in layer.scale[-ndim:])
        origin = tuple(float(t) for t in layer.translate[-ndim:])
        intensity = image is not None
        if self._full or table is None or ("mean_intensity" in table) != intensity:
            job = measure_labels(layer.data, image, spacing, origin)
            what = "all objects"
        else:
            touched = sorted(self._touched)
            job = update_table(table, layer.data, touched, image, spacing, origin)
            what = f"{len(touched)} edited object{'s' * (len(touched) != 1)}"
        self._full, self._touched = False, set()
        self.measure_button.setEnabled(False)
        self.status.setText(f"Measuring {what} of {layer.name}…")

        def done(result: dict[str, np.ndarray]) -> None:
            _TABLES[layer] = result
            layer.features = {**result, "index": result["label"]}
            if layer is self._layer:
                self._show(layer, result)

        self.worker = start_job(job, on_yield=lambda _p: None, on_return=done,
                                on_error=self._on_error, on_finish=self._on_finish)

    def _on_error(self, err: BaseException) -> None:
        self.status.setText(notify_error(err, "Measure"))

    def _on_finish(self) -> None:
        self.worker = None
        try:
            self.measure_button.setEnabled(True)
        except RuntimeError:  # the dock was closed
            return
        if self._full or self._touched:
            self._schedule()

    def _show(self, layer: Any, table: dict[str, np.ndarray]) -> None:
        ndim = layer.ndim
        unit = table_unit(layer)
        self.model.set_table(table, column_units(ndim, unit, "mean_intensity" in table))
        size = table["volume" if ndim == 3 else "area"]
        self.status.setText(f"{len(table['label'])} objects in {layer.name}; total "
                            f"{'volume' if ndim == 3 else 'area'} {float(np.sum(size)):.4g} "
                            f"{unit}^{ndim}.")

    # rows -------------------------------------------------------------------------------------
    def go_to_row(self, row: int) -> int | None:
        """Select the label of view row ``row`` and centre the view on its centroid."""
        layer = self._layer
        if layer is None or not 0 <= row < self.model.rowCount():
            return None
        label = self.model.label_at(row)
        layer.selected_label = label
        self.viewer.layers.selection.active = layer
        ndim = layer.ndim
        centre = [float(self.model.value(row, f"centroid_{a}")) for a in "zyx"[-ndim:]]
        dims = self.viewer.dims
        offset = dims.ndim - ndim  # the layer's axes are the viewer's last ones
        for axis in range(dims.ndim):
            if axis >= offset and axis not in dims.displayed:
                dims.set_point(axis, centre[axis - offset])
        shown = [centre[a - offset] for a in dims.displayed if a >= offset]
        if len(shown) == len(dims.displayed):
            scene = getattr(self.viewer, "scene", None)  # napari >= 0.9; viewer.camera before
            camera = scene.camera if scene is not None else self.viewer.camera
            camera.center = tuple(shown)
        return label

    # CSV --------------------------------------------------------------------------------------
    def _choose_csv(self) -> None:
        if self._layer is None:
            return
        source = self._layer.metadata.get(SOURCE_KEY)
        default = measurements_path(Path(source).parent / f"{self._layer.name}.tif" if source
                                    else Path.cwd() / f"{self._layer.name}.tif")
        path, _ = QFileDialog.getSaveFileName(self, "Save measurements", str(default), "CSV (*.csv)")
        if path:
            self.save_csv(path)

    def save_csv(self, path: str | Path) -> Path | None:
        """Write the shown table to ``path`` (atomically); errors become notifications."""
        layer = self._layer
        table = table_of(layer) if layer is not None else None
        if table is None:
            notify_error(ValueError("nothing measured yet: choose a labels layer"), "Save CSV")
            return None
        try:
            written = write_csv(path, table, column_units(layer.ndim, table_unit(layer),
                                                          "mean_intensity" in table))
        except OSError as err:
            notify_error(err, "Save CSV")
            return None
        self.status.setText(f"Wrote {written.name} ({len(table['label'])} objects).")
        return written
