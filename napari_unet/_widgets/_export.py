"""Export dock: labeled TIFF with voxel size and unit (binary or instances), probability map."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FileEdit, LineEdit
from qtpy.QtWidgets import (
    QFileDialog,
    QFormLayout,
    QMessageBox,
    QVBoxLayout,
    QWidget,
)

from napari_unet._widgets._common import DockKeys, MainThreadSteps, button, status_label
from napari_unet._widgets._fields import LayerChoices, LayerCombo, add_fields
from napari_unet._widgets._measure import intensity_data
from napari_unet._widgets._state import (
    PROBABILITIES_KEY,
    SOURCE_KEY,
    layer_unit,
    notify_error,
)
from napari_unet._widgets._workers import start_job
from napari_unet.io.export_paths import (
    default_export_path,
    export_path,
    is_ome_zarr_export,
    probability_path,
)
from napari_unet.io.label_export import (
    COPY_CHUNK_BYTES,
    MODES,
    copy_steps,
    export_labels,
    labels_for_export,
    summary_line,
)
from napari_unet.io.table import export_measurements

__all__ = ["ExportWidget", "ExportCopy", "KEY", "MODES", "COPY_CHUNK_BYTES", "copy_steps",
           "export_labels", "labels_for_export", "probability_path", "summary_line"]

KEY = "Alt-E"
#: a layer painted while it is copied is copied again up to this many times
COPY_TRIES = 3


@dataclass
class ExportCopy:
    """The snapshot of the layer being copied before it is written."""

    #: napari paint steps seen when the copy started; more: the layer is copied again
    paints: int
    #: copies started again so far (at most :data:`COPY_TRIES`)
    tries: int = 0


def image_for_labels(viewer: Any, shape: tuple[int, ...]) -> Any:
    """The data of the image layer a labels layer of ``shape`` belongs to (the selected one
    first, else the newest of that shape; its first level when multiscale), or None."""
    from napari.layers import Image

    candidates = [viewer.layers.selection.active, *reversed(list(viewer.layers))]
    for layer in candidates:
        if isinstance(layer, Image) and not layer.rgb:
            data = layer.data[0] if layer.multiscale else layer.data
            if tuple(data.shape) == tuple(shape):
                return data
    return None


class ExportWidget(LayerChoices, QWidget):
    """Write a labels layer as a calibrated, compressed TIFF."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        from napari.layers import Labels

        self.viewer = napari_viewer
        self.worker: Any = None
        self.last_written: list[Path] = []
        #: the file name the dock suggested (not typed or chosen by the user)
        self._suggested = ""
        self._copy: ExportCopy | None = None
        layout = QVBoxLayout(self)
        fields = QFormLayout()
        layout.addLayout(fields)
        add_fields(
            fields, self,
            labels_combo=LayerCombo(napari_viewer, (Labels,), "Labels layer to export",
                                    label="Labels"),
            mode_combo=ComboBox(label="Write as", choices=list(MODES), tooltip=(
                "as in the layer: the ids as they are (instances stay instances, classes stay "
                "classes); instances: a binary mask is also split into objects; binary: "
                "foreground = 1")),
            unit_edit=LineEdit(label="Unit", value="um", tooltip="Unit of the voxel size (the "
                               "layer's scale), e.g. um, nm, mm"))
        self.voxel_label = status_label("")
        self.voxel_label.setToolTip("Voxel size written to the file (the layer's scale)")
        fields.addRow("Voxel size", self.voxel_label)
        self.probability_check = CheckBox(text="probability map", tooltip=(
            "Writes <name>_probabilities.tif (float32) next to the labels; available after "
            "Segment on the whole image")).native
        self.measure_check = CheckBox(text="measurements (CSV)", tooltip=(
            "Writes <name>_measurements.csv next to the labels: one row per object, in "
            "calibrated units (see the Measurements dock)")).native
        fields.addRow("Also write", self.probability_check)
        fields.addRow("", self.measure_check)
        file_edit = FileEdit(mode="w", filter="TIFF (*.tif *.tiff);;OME-Zarr (*.ome.zarr)")
        file_edit.margins = (0, 0, 0, 0)
        file_edit.choose_btn.text, file_edit.choose_btn.tooltip = "Browse…", "Choose the output file"
        self.path_edit = file_edit.line_edit.native
        self.path_edit.setPlaceholderText("labels.tif")
        self.path_edit.setToolTip("Output file: .tif, or .ome.zarr (OME-Zarr: the image with the "
                                  "labels under labels/, multiscale); written atomically, never "
                                  "over the input")
        fields.addRow("File", file_edit.native)
        self.export_button = button("Export", f"Write the TIFF ({KEY.replace('-', '+')})",
                                    self.export)
        layout.addWidget(self.export_button)
        self.status = status_label("Choose a labels layer and a file, then click Export.")
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.labels_combo.changed.connect(self._layer_changed)
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
        if not self.path_edit.text() or self.path_edit.text() == self._suggested:
            self._suggested = str(self._default_path(layer))
            self.path_edit.setText(self._suggested)

    @staticmethod
    def _default_path(layer: Any) -> Path:
        """The file an export of ``layer`` suggests: its name, next to its image."""
        return default_export_path(layer.name, layer.metadata.get(SOURCE_KEY))

    def _refuse(self, message: str) -> None:
        """An export that does not start: one line in the status line (nothing written)."""
        from napari.utils.notifications import show_warning

        self.status.setText(message)
        show_warning(message)

    def _opened_files(self) -> dict[Path, str]:
        """The files the viewer's layers were opened from (never overwritten by an export)."""
        files: dict[Path, str] = {}
        for layer in self.viewer.layers:
            for source in (getattr(getattr(layer, "source", None), "path", None),
                           layer.metadata.get(SOURCE_KEY)):
                if source:
                    files[Path(str(source)).expanduser().resolve()] = layer.name
        return files

    def _check_target(self, path: Path, layer: Any, confirmed: bool = False) -> str | None:
        """Why ``path`` cannot be written for ``layer`` (one line), or None when it can."""
        import os

        from napari_unet.io.files import check_output_path

        if layer.data.ndim not in (2, 3):
            return (f"Cannot export {layer.name}: it is {layer.data.ndim}D (shape "
                    f"{tuple(layer.data.shape)}); Export writes 2D or 3D labels: make a layer "
                    "of one time point or channel first")
        targets = [path]
        if self.probability_check.isChecked():
            targets.append(probability_path(path))
        if self.measure_check.isChecked():
            from napari_unet.io.table import measurements_path

            targets.append(measurements_path(path))
        opened = self._opened_files()
        for target in targets:
            for source, name in opened.items():
                same = target.resolve() == source
                if not same and target.exists() and source.exists():
                    same = os.path.samefile(target, source)
                if same:
                    return (f"Not exported: {target.name} is the file of the layer {name!r}; "
                            "choose another file name")
        if not path.parent.is_dir():
            return (f"Not exported: the folder {path.parent} does not exist; choose an existing "
                    "folder (Browse…) or create it first")
        try:
            check_output_path(path, folder=is_ome_zarr_export(path))  # OME-Zarr: a folder
        except OSError as err:
            return f"Not exported: {err}"
        existing = [t for t in targets if t.exists() and not (confirmed and t == path)]
        if existing:
            names = " and ".join(t.name for t in existing)
            answer = QMessageBox.question(
                self, "Overwrite?", f"{names} already exist{'s' if len(existing) == 1 else ''} "
                f"in {path.parent}. Overwrite?", QMessageBox.Yes | QMessageBox.No, QMessageBox.No)
            if answer != QMessageBox.Yes:
                return f"Not exported: {names} exists; choose another file name"
        return None

    def export(self, path: str | Path | None = None) -> None:
        """Write the chosen layer to ``path`` (default: the file field), in a worker.

        The layer is copied first (a snapshot: painting may go on meanwhile), a piece per
        event-loop pass so that a large stack does not block the viewer.
        """
        from napari.utils.notifications import show_info

        from napari_unet._widgets import _journal as journal
        from napari_unet._widgets._history import history_for

        if self.worker is not None:
            show_info("An export is already running.")
            return
        layer = self.labels_combo.layer()
        if layer is None:
            notify_error(ValueError("no labels layer to export"), "Export")
            return
        confirmed = False  # a save dialog asked about overwriting already
        if path is None and self.path_edit.text().strip() in ("", self._suggested):
            chosen, _ = QFileDialog.getSaveFileName(
                self, "Export labels", str(self._default_path(layer)), "TIFF (*.tif *.tiff)")
            if not chosen:
                self.status.setText("Not exported: no file chosen.")
                return
            path, confirmed = chosen, True
        path = export_path(path or self.path_edit.text())
        self.path_edit.setText(str(path))
        refusal = self._check_target(path, layer, confirmed)
        if refusal is not None:
            self._refuse(refusal)
            return
        probabilities = (layer.metadata.get(PROBABILITIES_KEY)
                         if self.probability_check.isChecked() else None)
        source_data = layer.data
        voxel_size = tuple(float(s) for s in layer.scale[-source_data.ndim:])
        unit = self.unit_edit.text().strip() or "um"
        mode = self.mode_combo.currentText()
        source = layer.metadata.get(SOURCE_KEY)
        history = history_for(layer)
        image = image_for_labels(self.viewer, source_data.shape) if is_ome_zarr_export(path) else None
        with_table = self.measure_check.isChecked()  # and the intensities of the labels' image
        intensities = intensity_data(self.viewer, layer) if with_table else None
        self.export_button.setEnabled(False)
        self.status.setText(f"Copying {layer.name}…")

        def start(data: np.ndarray) -> None:
            def job():  # runs in the worker thread
                yield "writing"
                written, summary = export_labels(path, np.asarray(data), mode=mode, voxel_size=voxel_size,
                                                 unit=unit, input_path=source, probabilities=probabilities,
                                                 image=image, name=layer.name)
                if with_table:
                    written.append(export_measurements(
                        path, labels_for_export(np.asarray(data), mode), voxel_size=voxel_size,
                        unit=unit, image=None if intensities is None else np.asarray(intensities)))
                return written, summary

            self.status.setText(f"Writing {path.name}…")
            as_of = journal.change_count(layer)  # the journal is clean once this copy is written
            self.worker = start_job(job(), on_yield=lambda _msg: None,
                                    on_return=lambda r: (journal.mark_saved(layer, as_of),
                                                         self._on_written(r)),
                                    on_error=self._on_error, on_finish=self._on_finish)

        def failed(err: BaseException) -> None:
            self._on_error(err)
            self._on_finish()

        def copied(data: np.ndarray) -> None:
            copy = self._copy
            if history.paint_count != copy.paints and copy.tries < COPY_TRIES:
                copy.tries += 1  # painted while copying: copy again
                copy.paints = history.paint_count
                self.worker = MainThreadSteps(copy_steps(layer.data, COPY_CHUNK_BYTES), copied,
                                              parent=self, on_error=failed).start()
                return
            start(data)

        if hasattr(source_data, "dask"):  # lazy: cannot be painted, read in the worker
            start(source_data)
            return
        self._copy = ExportCopy(paints=history.paint_count)
        self.worker = MainThreadSteps(copy_steps(source_data, COPY_CHUNK_BYTES), copied,
                                      parent=self, on_error=failed).start()

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
