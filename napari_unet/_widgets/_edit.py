"""Edit dock: proofreading operations on a labels layer, undo/redo, corrected-slice tracking.

napari's brush, fill and eraser stay the main tools; this dock adds the object-level operations
(from :mod:`napari_unet.labels.edits`, on the scope :mod:`napari_unet.labels.scope` works out)
and keeps track of which slices the user corrected.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, LineEdit, SpinBox
from qtpy.QtWidgets import (
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QVBoxLayout,
    QWidget,
)

from napari_unet._widgets._common import (
    DockKeys,
    ProgressBar,
    button,
    connect_until_destroyed,
    status_label,
)
from napari_unet._widgets._fields import LayerChoices, LayerCombo, add_fields
from napari_unet._widgets._history import history_for
from napari_unet._widgets._slice_lists import SliceLists
from napari_unet._widgets._state import (
    corrected_slices,
    corrections_changed,
    current_slice_index,
    install_correction_tracking,
    notify_error,
    set_corrected_slices,
    suggestions_changed,
    view_axis,
)
from napari_unet._widgets._workers import start_job
from napari_unet.labels import dtypes, edits
from napari_unet.labels.slices import AXIS_NAMES
from napari_unet.labels.scope import (
    EditScope,
    Operation,
    chosen_ids,
    edit_scope,
    labels_under_seeds,
    offset_new_ids,
    parse_ids,
    run_on_scope,
    scope_spacing,
    seeds_in_scope,
    seeds_in_slice,
    seeds_on_label,
    slice_id_offset,
    split_target,
    whole_scope,
    whole_stack_job,
)
from napari_unet.training.corrections import with_slice

__all__ = ["EditWidget", "EditJob", "parse_ids", "KEYS", "SCOPES", "SEEDS_LAYER"]

SCOPES = ("current slice (2D)", "whole stack (3D)")
SEEDS_LAYER = "split seeds"
#: key bindings (napari uses Alt+C/S/T and the menus Alt+F/V/L/P/W/H; napari-animation
#: Alt+F/R/D/A/B)
KEYS = {"merge": "Alt-M", "split": "Alt-X", "delete": "Alt-K", "mark": "Alt-O"}


@dataclass
class EditJob:
    """The whole-stack operation running in the background (see ``_apply_in_worker``)."""

    layer: Any
    #: the array the worker reads; the result is dropped if the layer no longer holds it
    data: Any
    description: str
    #: napari paint steps seen when it started; the result is dropped after more
    paints: int
    start: float
    history: Any
    #: whether its result was applied
    ok: bool = False

    def seconds(self) -> float:
        return time.perf_counter() - self.start


class EditWidget(LayerChoices, QWidget):
    """Merge, split, delete, fill holes, remove small objects, relabel, binary ⇄ instances."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None):
        super().__init__(parent)
        from napari.layers import Labels, Points

        self.viewer = napari_viewer
        install_correction_tracking(napari_viewer)
        layout = QVBoxLayout(self)
        fields = QFormLayout()
        layout.addLayout(fields)

        add_fields(
            fields, self,
            labels_combo=LayerCombo(napari_viewer, (Labels,), "Labels layer to edit",
                                    label="Labels"),
            scope_combo=ComboBox(label="Scope", choices=list(SCOPES), tooltip=(
                "current slice (2D): only the slice on screen; whole stack (3D): objects in 3D")),
            ids_edit=LineEdit(label="Label ids", tooltip=(
                "Label ids to merge/delete/split, e.g. '3, 7'. Empty: the labels under the seed "
                "points, else the layer's selected label")))
        self.ids_edit.setPlaceholderText("selected label")
        self.seeds_combo = LayerCombo(napari_viewer, (Points,), "Points layer with seeds for "
                                      "Split (one click per piece); (none) = automatic split",
                                      allow_none=True)
        fields.addRow("Seeds", self.seeds_combo.native)
        fields.addRow("", button("Add seeds", "Add a points layer for split seeds and start "
                                 "clicking seeds", self.add_seeds_layer))

        ops = QGroupBox("Operations")
        grid = QGridLayout(ops)
        self.min_size_spin = SpinBox(min=1, max=10_000_000, value=50, tooltip=(
            "Objects smaller than this many pixels/voxels are removed")).native
        self.buttons: dict[str, Any] = {}
        specs = [
            ("Merge", "Merge the listed labels (or those under the seeds) into one (Alt+M)", self.merge),
            ("Split", "Split a label: seeded watershed from the seed points, or automatic (Alt+X)", self.split),
            ("Delete", "Delete the listed labels, or the selected one (Alt+K)", self.delete),
            ("Fill holes", "Fill holes inside every object", self.fill_holes),
            ("Remove small", "Remove objects smaller than the size on the right", self.remove_small),
            ("Relabel", "Renumber objects 1..N (always the whole stack)", self.relabel),
            ("Binary → instances", "Split a binary mask into connected objects", self.to_instances),
            ("Instances → binary", "Turn all objects into foreground = 1", self.to_binary),
        ]
        # two columns, the long names one a row: the dock stays narrow (see _launch.fit_docks)
        places = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (5, 0), (3, 0), (4, 0)]
        for (text, tip, slot), (grid_row, column) in zip(specs, places):
            widget = button(text, tip, slot)
            self.buttons[text] = widget
            grid.addWidget(widget, grid_row, column, 1, 2 if grid_row >= 3 else 1)
        grid.addWidget(self.min_size_spin, 2, 1)
        self.undo_button = button("Undo", "Undo the last edit or paint stroke (Ctrl+Z)", self.undo)
        self.redo_button = button("Redo", "Redo (Ctrl+Shift+Z)", self.redo)
        grid.addWidget(self.undo_button, 6, 0)
        grid.addWidget(self.redo_button, 6, 1)
        layout.addWidget(ops)

        #: the corrected and suggested slices (see :mod:`._slice_lists`)
        self.lists = SliceLists(napari_viewer, layout, self.labels_combo.layer,
                                lambda text: self.status.setText(text))
        self.slice_list = self.lists.slice_list
        self.suggestion_list = self.lists.suggestion_list
        self.mark_button, self.unmark_button = self.lists.mark_button, self.lists.unmark_button
        self.goto_button = self.lists.goto_button
        self.goto_suggested_button = self.lists.goto_suggested_button

        self.progress_bar = ProgressBar()
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        self.progress_bar.setTextVisible(False)
        self.progress_bar.setToolTip("Whole-stack operations run in the background")
        layout.addWidget(self.progress_bar)
        self.status = status_label("Select a labels layer; paint with napari's tools, use the "
                                   "operations above for whole objects.")
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.labels_combo.changed.connect(self._layer_changed)
        connect_until_destroyed(self, corrections_changed, self._corrections_changed)
        connect_until_destroyed(self, suggestions_changed, self._corrections_changed)
        self._layer_changed()
        #: the running whole-stack operation (a napari worker), None when idle
        self.worker: Any = None
        self._job: EditJob | None = None
        self._pbar: Any = None
        self.keys = DockKeys(self, napari_viewer, {
            KEYS["merge"]: self.merge, KEYS["split"]: self.split, KEYS["delete"]: self.delete,
            KEYS["mark"]: self.mark_current})

    # helpers ----------------------------------------------------------------------------------
    def layer(self) -> Any:
        layer = self.labels_combo.layer()
        if layer is None:
            raise ValueError("no labels layer: segment an image or add a labels layer first")
        return layer

    def _layer_changed(self, *_args: Any) -> None:
        layer = self.labels_combo.layer()
        if layer is not None:
            history_for(layer)
        self.lists.refresh()

    def _corrections_changed(self, layer: Any) -> None:
        try:
            if layer is self.labels_combo.layer():
                self.lists.refresh()
        except RuntimeError:  # dock closed
            pass

    def _off_axis(self, layer: Any) -> bool:
        """Whether the scope is the slice on screen and the view shows a y or x slice (the
        slice operations edit z slices): says so, and the operation does nothing."""
        if layer is None or layer.ndim < 3 or self.scope_combo.currentText() != SCOPES[0]:
            return False
        axis = view_axis(self.viewer, layer)
        if axis == 0:
            return False
        notify_error(ValueError(f"{SCOPES[0]!r} edits z slices and the view shows a "
                                f"{AXIS_NAMES[axis]} slice: view the stack along z (napari's "
                                f"transpose button) or choose {SCOPES[1]!r}"), "Edit")
        return True

    def _scope(self, layer: Any) -> EditScope:
        """The part of the layer an operation works on: the slice on screen (2D scope of a
        stack) or the whole array."""
        current = layer.ndim >= 3 and self.scope_combo.currentText() == SCOPES[0]
        return edit_scope(layer.data.shape, current_slice_index(self.viewer, layer) if current
                          else None)

    def _ids(self, layer: Any, scope: EditScope) -> list[int]:
        text = self.ids_edit.text()
        under = [] if text.strip() else self._labels_under_seeds(layer, scope.z)
        return chosen_ids(text, under, int(layer.selected_label))

    def _seeds(self, layer: Any, z: int | None) -> list[tuple[float, ...]]:
        """Seed points in the layer's data coordinates (2D scope: only those on slice ``z``)."""
        points = self.seeds_combo.layer()
        if points is None or len(points.data) == 0:
            return []
        coords = [np.asarray(layer.world_to_data(points.data_to_world(point)))
                  for point in points.data]
        return seeds_in_scope(coords, layer.data.shape, z)

    def _labels_under_seeds(self, layer: Any, z: int | None) -> list[int]:
        return labels_under_seeds(layer.data, self._seeds(layer, z), z)

    def _apply(self, description: str, operation: Operation, force_3d: bool = False) -> bool:
        """Run ``operation`` on the scope's data and record it (undoable); errors → notifications.

        A slice (or a 2D image) is done at once; a whole stack in a worker thread, the layer
        being updated on the main thread when it is done (see :meth:`_apply_in_worker`).
        """
        from napari.utils.notifications import show_info

        if self.worker is not None:
            running = self._job.description if self._job is not None else "An operation"
            show_info(f"{running} is still running; wait for it.")
            return False
        try:
            layer = self.layer()
            if not force_3d and self._off_axis(layer):
                return False
            scope = whole_scope(layer.data.shape) if force_3d else self._scope(layer)
            z = scope.z
            if z is None and layer.ndim >= 3:
                return self._apply_in_worker(layer, description, operation)
            after = run_on_scope(np.asarray(layer.data[scope.region]), z, operation)
            patch = history_for(layer).apply(scope.region, after, description)
        except (ValueError, TypeError) as err:
            notify_error(err, description)
            return False
        if patch is None:
            show_info(f"{description}: nothing changed")
            self.status.setText(f"{description}: nothing changed.")
            return False
        if z is not None:
            set_corrected_slices(layer, with_slice(corrected_slices(layer), z))
        self.status.setText(f"{description} ({scope.where(layer.ndim)}). Ctrl+Z undoes it.")
        return True

    def _apply_in_worker(self, layer: Any, description: str, operation: Operation) -> bool:
        """Whole-stack ``operation`` in a napari worker; the layer gets the result (a new array,
        no copy on the main thread) in the callback. If the layer is painted or changed while
        the operation runs, the result is dropped: the paint is never lost."""
        from napari.utils import progress

        history = history_for(layer)
        history._check_free()
        data = layer.data  # the array itself: the worker only reads it
        history.busy = description
        self._job = EditJob(layer=layer, data=data, description=description,
                            paints=history.paint_count, start=time.perf_counter(), history=history)
        self._pbar = progress(total=0, desc=f"{description} ({layer.name})")
        self.progress_bar.setRange(0, 0)
        for widget in self.buttons.values():
            widget.setEnabled(False)
        self.status.setText(f"{description} (whole stack) running in the background…")
        self.worker = start_job(whole_stack_job(data, operation, description),
                                on_yield=self._on_job_step, on_return=self._on_job_result,
                                on_error=self._on_job_error, on_finish=self._on_job_finish)
        return True

    def _on_job_step(self, stage: str) -> None:
        job = self._job
        self.status.setText(f"{job.description} (whole stack): {stage}… {job.seconds():.1f} s")

    def _on_job_result(self, result: np.ndarray | None) -> None:
        job = self._job
        layer, history, description = job.layer, job.history, job.description
        job.ok = False
        if history.paint_count != job.paints or layer.data is not job.data:
            self.status.setText(f"{description}: the labels changed while it ran, so its result "
                                "was not applied (your edits are kept). Run it again.")
            return
        if result is None:
            self.status.setText(f"{description}: nothing changed.")
            return
        history.busy = None
        history.replace(result, description)
        job.ok = True
        self.status.setText(f"{description} (whole stack) in {job.seconds():.1f} s. "
                            "Ctrl+Z undoes it.")

    def _on_job_error(self, err: BaseException) -> None:
        self.status.setText(notify_error(err, self._job.description if self._job else "Edit"))

    def _on_job_finish(self) -> None:
        history = self._job.history if self._job is not None else None
        if history is not None:
            history.busy = None
        self.worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        try:
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(1)
            for widget in self.buttons.values():
                widget.setEnabled(True)
        except RuntimeError:  # dock closed
            pass

    # operations -------------------------------------------------------------------------------
    def merge(self) -> bool:
        layer = self.labels_combo.layer()
        if self._off_axis(layer):
            return False
        ids = self._ids(layer, self._scope(layer)) if layer is not None else []
        if len(set(ids) - {0}) < 2:
            notify_error(ValueError("list at least two label ids, e.g. '3, 7', or put a seed on "
                                    "each label"), "Merge")
            return False
        ok = self._apply(f"Merge {sorted(set(ids))}", lambda a: edits.merge_labels(a, ids))
        if ok:
            self._clear_seeds()
        return ok

    def split(self) -> bool:
        layer = self.labels_combo.layer()
        if layer is None:
            notify_error(ValueError("no labels layer"), "Split")
            return False
        if self._off_axis(layer):
            return False
        z = self._scope(layer).z
        seeds = self._seeds(layer, z)
        text = self.ids_edit.text()
        try:
            under = labels_under_seeds(layer.data, seeds, z) if seeds and not text.strip() else []
            label_id = split_target(text, seeds, under, int(layer.selected_label))
        except (ValueError, IndexError):
            notify_error(ValueError("the seeds are not on a label"), "Split")
            return False
        spacing = scope_spacing(layer.scale, layer.ndim, z)
        local = seeds_on_label(layer.data, seeds_in_slice(seeds, z), z, label_id)
        how = f"{len(local)} seeds" if local else "automatic"

        def operation(block: np.ndarray) -> np.ndarray:
            return edits.split_label(block, label_id, local, sampling=spacing)

        ok = self._apply(f"Split label {label_id} ({how})", operation)
        if ok:
            self._clear_seeds()
        return ok

    def delete(self) -> bool:
        layer = self.labels_combo.layer()
        if self._off_axis(layer):
            return False
        try:
            ids = [i for i in self._ids(layer, self._scope(layer)) if i] if layer else []
        except ValueError as err:
            notify_error(err, "Delete")
            return False
        if not ids:
            notify_error(ValueError("no label to delete: type its id or select it"), "Delete")
            return False

        def operation(block: np.ndarray) -> np.ndarray:
            for label_id in ids:
                block = edits.delete_label(block, label_id)
            return block

        ok = self._apply(f"Delete {ids}", operation)
        if ok:
            self._clear_seeds()
        return ok

    def fill_holes(self) -> bool:
        return self._apply("Fill holes", edits.fill_holes)

    def remove_small(self) -> bool:
        size = self.min_size_spin.value()
        return self._apply(f"Remove objects < {size}",
                           lambda a: edits.remove_small_objects(a, size))

    def relabel(self) -> bool:
        def operation(block: np.ndarray) -> np.ndarray:
            # keep the layer's dtype (1..N always fits): a new dtype makes napari rebuild its
            # colormap texture on the main thread (a 90-200 ms stall on 100x1024x1024)
            return dtypes.relabel_sequential(block).astype(block.dtype, copy=False)

        return self._apply("Relabel 1..N", operation, force_3d=True)

    def to_instances(self) -> bool:
        layer = self.labels_combo.layer()
        if self._off_axis(layer):
            return False
        z = self._scope(layer).z if layer is not None else None

        def operation(block: np.ndarray) -> np.ndarray:
            out = edits.binary_to_instances(block > 0)
            if z is not None:  # new ids after those of the other slices
                out = offset_new_ids(out, slice_id_offset(layer.data, z), layer.data.dtype)
            return out

        return self._apply("Binary → instances", operation)

    def to_binary(self) -> bool:
        return self._apply("Instances → binary",
                           lambda a: edits.instances_to_binary(a).astype(np.uint8))

    def undo(self) -> None:
        try:
            what = history_for(self.layer()).undo()
        except ValueError as err:
            notify_error(err, "Undo")
            return
        self.status.setText(f"Undid: {what}." if what else "Nothing to undo.")

    def redo(self) -> None:
        try:
            what = history_for(self.layer()).redo()
        except ValueError as err:
            notify_error(err, "Redo")
            return
        self.status.setText(f"Redid: {what}." if what else "Nothing to redo.")

    # seeds ------------------------------------------------------------------------------------
    def add_seeds_layer(self) -> Any:
        layer = self.labels_combo.layer()
        if SEEDS_LAYER in self.viewer.layers:
            points = self.viewer.layers[SEEDS_LAYER]
        else:
            kwargs = {}
            if layer is not None:
                kwargs = {"scale": layer.scale, "translate": layer.translate}
            points = self.viewer.add_points(name=SEEDS_LAYER, ndim=layer.ndim if layer else 2,
                                            size=max(1.0, float(np.min(kwargs.get("scale", [1])) * 6)),
                                            face_color="yellow", **kwargs)
        self.seeds_combo.set_layer(points)
        points.mode = "add"
        self.viewer.layers.selection.active = points
        self.status.setText("Click one seed per piece on the label to split, then click Split.")
        return points

    def _clear_seeds(self) -> None:
        points = self.seeds_combo.layer()
        if points is not None and len(points.data):
            points.data = np.zeros((0, points.ndim))

    # slice lists ------------------------------------------------------------------------------
    def mark_current(self) -> None:
        """Mark the slice on screen as corrected."""
        self.lists.mark_current()

    def unmark_selected(self) -> None:
        self.lists.unmark_selected()

    def goto_selected(self) -> None:
        self.lists.goto_selected()

    def goto_suggested(self) -> None:
        """Show the selected suggested slice (the first one when none is selected)."""
        self.lists.goto_suggested()
