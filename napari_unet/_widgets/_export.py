"""Export dock: labeled TIFF with voxel size and unit (binary or instances), probability map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QLineEdit,
    QVBoxLayout,
    QWidget,
)

from napari_unet._widgets._common import (
    DockKeys,
    LayerCombo,
    MainThreadSteps,
    button,
    row,
    status_label,
)
from napari_unet._widgets._state import (
    PROBABILITIES_KEY,
    SOURCE_KEY,
    layer_unit,
    notify_error,
)
from napari_unet._widgets._workers import start_job
from napari_unet.io.writers import write_image_tiff, write_labels_tiff
from napari_unet.labels import edits, statistics

#: ``as in the layer`` (default) writes the ids as they are: an instance layer as instances,
#: classes as classes, a mask as 0/1. ``instances`` also splits a mask into objects;
#: ``binary`` writes foreground = 1 (only when asked)
MODES = ("as in the layer", "instances", "binary")
KEY = "Alt-E"
#: bytes copied per event-loop pass when the layer is snapshot for writing
COPY_CHUNK_BYTES = 512 * 2**10


def copy_steps(data: Any, chunk_bytes: int | None = None) -> Any:
    """A generator copying ``data`` along its first axis, a piece (``chunk_bytes``, default
    :data:`COPY_CHUNK_BYTES`) per step; returns the copy."""
    chunk_bytes = chunk_bytes or COPY_CHUNK_BYTES
    out = np.empty(np.shape(data), dtype=data.dtype)
    n = out.shape[0] if out.ndim else 0
    if n == 0:
        out[...] = data
        return out
    step = max(1, chunk_bytes // max(1, out.nbytes // n))
    for lo in range(0, n, step):
        out[lo:lo + step] = data[lo:lo + step]
        yield
    return out


def labels_for_export(data: np.ndarray, mode: str) -> np.ndarray:
    """The array written for ``mode``: ``as in the layer`` = unchanged, ``binary`` = 0/1,
    ``instances`` = one id per object (a binary mask is split into its connected objects)."""
    data = np.asarray(data)
    if mode == MODES[0]:
        return data
    if mode == "binary":
        return edits.instances_to_binary(data).astype(np.uint8)
    if mode == "instances":
        if data.size and int(data.max()) <= 1:  # a binary mask: split it into objects
            return edits.binary_to_instances(data > 0)
        return data
    raise ValueError(f"unknown export mode {mode!r}; choose one of {', '.join(MODES)}")


def summary_line(labels: np.ndarray, voxel_size: tuple[float, ...], unit: str) -> str:
    """``"54 objects, 12 345 voxels, volume 1 234.5 um³"``."""
    stats = statistics.label_statistics(labels, voxel_size)
    power = "³" if labels.ndim == 3 else "²"
    return (f"{stats['objects']} objects, {stats['voxels']} voxels, volume "
            f"{stats['volume']:.4g} {unit}{power} (mean {stats['mean_volume']:.4g} {unit}{power})")


def probability_path(path: Path) -> Path:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)] + "_probabilities.tif")
    return path.with_name(name + "_probabilities.tif")


def export_labels(path: str | Path, data: np.ndarray, *, mode: str, voxel_size: tuple[float, ...],
                  unit: str, input_path: str | None = None,
                  probabilities: np.ndarray | None = None) -> tuple[list[Path], str]:
    """Write the labels (and optionally the probabilities) atomically; returns paths and summary."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        raise ValueError(f"export to a .tif file, got {path.name!r}")
    labels = labels_for_export(data, mode)
    written = [write_labels_tiff(path, labels, voxel_size=voxel_size, unit=unit,
                                 input_path=input_path)]
    if probabilities is not None:
        probs = np.asarray(probabilities, dtype=np.float32)
        if probs.dtype == np.uint8:
            probs = probs / 255
        probs = probs[0] if probs.shape[0] == 1 else probs
        axes = ("C" if probs.ndim > labels.ndim else "") + ("ZYX" if labels.ndim == 3 else "YX")
        written.append(write_image_tiff(probability_path(path), probs, voxel_size=voxel_size,
                                        unit=unit, input_path=input_path, axes=axes))
    return written, summary_line(labels, voxel_size, unit)


class ExportWidget(QWidget):
    """Write a labels layer as a calibrated, compressed TIFF."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        from napari.layers import Labels

        self.viewer = napari_viewer
        self.worker: Any = None
        self.last_written: list[Path] = []
        layout = QVBoxLayout(self)
        fields = QFormLayout()
        layout.addLayout(fields)
        self.labels_combo = LayerCombo(napari_viewer, (Labels,), "Labels layer to export")
        fields.addRow("Labels", self.labels_combo)
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(list(MODES))
        self.mode_combo.setToolTip("as in the layer: the ids as they are (instances stay "
                                   "instances, classes stay classes); instances: a binary mask is "
                                   "also split into objects; binary: foreground = 1")
        fields.addRow("Write as", self.mode_combo)
        self.unit_edit = QLineEdit("um")
        self.unit_edit.setToolTip("Unit of the voxel size (the layer's scale), e.g. um, nm, mm")
        fields.addRow("Unit", self.unit_edit)
        self.voxel_label = status_label("")
        self.voxel_label.setToolTip("Voxel size written to the file (the layer's scale)")
        fields.addRow("Voxel size", self.voxel_label)
        self.probability_check = QCheckBox("Also write the probability map")
        self.probability_check.setToolTip("Writes <name>_probabilities.tif (float32) next to the "
                                          "labels; available after Segment on the whole image")
        fields.addRow("", self.probability_check)
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("labels.tif")
        self.path_edit.setToolTip("Output file (.tif); written atomically, never over the input")
        fields.addRow("File", row(self.path_edit, button("Browse…", "Choose the output file",
                                                          self._choose_path)))
        self.export_button = button("Export", f"Write the TIFF ({KEY.replace('-', '+')})",
                                    self.export)
        layout.addWidget(self.export_button)
        self.status = status_label("Choose a labels layer and a file, then click Export.")
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.labels_combo.currentIndexChanged.connect(self._layer_changed)
        self._layer_changed()
        self.keys = DockKeys(self, napari_viewer, {KEY: self.export})

    def _layer_changed(self, *_args: Any) -> None:
        layer = self.labels_combo.layer()
        if layer is None:
            self.voxel_label.setText("")
            return
        self.unit_edit.setText(layer_unit(layer))
        self.voxel_label.setText(" × ".join(f"{s:g}" for s in layer.scale))
        has_probs = layer.metadata.get(PROBABILITIES_KEY) is not None
        self.probability_check.setEnabled(has_probs)
        if not has_probs:
            self.probability_check.setChecked(False)
        if not self.path_edit.text():
            source = layer.metadata.get(SOURCE_KEY)
            folder = Path(source).parent if source else Path.cwd()
            self.path_edit.setText(str(folder / f"{layer.name.replace(' ', '_')}.tif"))

    def _choose_path(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export labels", self.path_edit.text(),
                                              "TIFF (*.tif *.tiff)")
        if path:
            self.path_edit.setText(path)

    def export(self, path: str | Path | None = None) -> None:
        """Write the chosen layer to ``path`` (default: the file field), in a worker.

        The layer is copied first (a snapshot: painting may go on meanwhile), a piece per
        event-loop pass so that a large stack does not block the viewer.
        """
        from napari.utils.notifications import show_info

        from napari_unet._widgets._history import history_for

        if self.worker is not None:
            show_info("An export is already running.")
            return
        layer = self.labels_combo.layer()
        if layer is None:
            notify_error(ValueError("no labels layer to export"), "Export")
            return
        path = Path(path or self.path_edit.text().strip() or "labels.tif").expanduser()
        self.path_edit.setText(str(path))
        probabilities = (layer.metadata.get(PROBABILITIES_KEY)
                         if self.probability_check.isChecked() else None)
        source_data = layer.data
        voxel_size = tuple(float(s) for s in layer.scale[-source_data.ndim:])
        unit = self.unit_edit.text().strip() or "um"
        mode = self.mode_combo.currentText()
        source = layer.metadata.get(SOURCE_KEY)
        history = history_for(layer)
        self.export_button.setEnabled(False)
        self.status.setText(f"Copying {layer.name}…")

        def start(data: np.ndarray) -> None:
            def job():  # runs in the worker thread
                yield "writing"
                return export_labels(path, np.asarray(data), mode=mode, voxel_size=voxel_size,
                                     unit=unit, input_path=source, probabilities=probabilities)

            self.status.setText(f"Writing {path.name}…")
            self.worker = start_job(job(), on_yield=lambda _msg: None, on_return=self._on_written,
                                    on_error=self._on_error, on_finish=self._on_finish)

        def failed(err: BaseException) -> None:
            self._on_error(err)
            self._on_finish()

        def copied(data: np.ndarray) -> None:
            if history.paint_count != self._copy_paints and self._copy_tries < 3:
                self._copy_tries += 1  # painted while copying: copy again
                self._copy_paints = history.paint_count
                self.worker = MainThreadSteps(copy_steps(layer.data), copied, parent=self,
                                              on_error=failed).start()
                return
            start(data)

        if hasattr(source_data, "dask"):  # lazy: cannot be painted, read in the worker
            start(source_data)
            return
        self._copy_paints, self._copy_tries = history.paint_count, 0
        self.worker = MainThreadSteps(copy_steps(source_data), copied, parent=self,
                                      on_error=failed).start()

    def _on_written(self, result: tuple[list[Path], str]) -> None:
        from napari.utils.notifications import show_info

        written, summary = result
        self.last_written = written
        text = f"Wrote {', '.join(p.name for p in written)}: {summary}"
        self.status.setText(text)
        show_info(text)

    def _on_error(self, err: BaseException) -> None:
        self.status.setText(notify_error(err, "Export"))

    def _on_finish(self) -> None:
        self.worker = None
        try:
            self.export_button.setEnabled(True)
        except RuntimeError:
            pass
