"""The Edit dock's two slice lists: the corrected slices (Fine-tune's training data) and the
slices suggested for correction after Segment.

A corrected slice is a slice along z, y or x (``z 12``, ``y 40``, ``x 7``): the one on screen,
whichever axes napari shows (its transpose and roll buttons). Going to a slice turns the view
so that it is seen."""

from __future__ import annotations

from typing import Any, Callable

from qtpy.QtWidgets import QGroupBox, QLayout, QListWidget, QListWidgetItem, QVBoxLayout

from napari_unet._widgets._common import button, row
from napari_unet._widgets._state import (
    corrected_slices,
    current_plane,
    set_corrected_slices,
    set_current_slice,
    suggested_slices,
)
from napari_unet.labels.slices import plane, plane_name
from napari_unet.training.corrections import corrected_rows, suggestion_rows, with_slice

#: item data role holding a row's slice (Qt.UserRole): z, or ``[axis, index]`` for y and x
SLICE_ROLE = 256


class SliceLists:
    """The two list boxes, added to a dock's ``layout``.

    ``current_layer`` gives the labels layer the lists show; ``say`` puts a line in the dock's
    status.
    """

    def __init__(self, viewer: Any, layout: QLayout, current_layer: Callable[[], Any],
                 say: Callable[[str], None]):
        self.viewer = viewer
        self.current_layer = current_layer
        self.say = say

        corrections = QGroupBox("Corrected slices")
        corrections.setToolTip("The slices you corrected: the training data for Fine-tune")
        box = QVBoxLayout(corrections)
        self.slice_list = QListWidget()
        self.slice_list.setToolTip("Slices you corrected, seen along z, y or x (painting marks the "
                                   "slice on screen). Double-click to go there")
        self.slice_list.itemDoubleClicked.connect(self.jump_to_item)
        box.addWidget(self.slice_list)
        self.mark_button = button("Mark current", "Mark the slice on screen as corrected (Alt+O)",
                                  self.mark_current)
        self.unmark_button = button("Unmark", "Remove the selected slices from the list",
                                    self.unmark_selected)
        self.goto_button = button("Go to", "Show the selected slice", self.goto_selected)
        box.addWidget(row(self.mark_button, self.unmark_button))  # two a row: a narrow dock
        box.addWidget(self.goto_button)
        layout.addWidget(corrections)

        suggestions = QGroupBox("Suggested slices to correct")
        box = QVBoxLayout(suggestions)
        self.suggestion_list = QListWidget()
        self.suggestion_list.setToolTip(
            "After Segment: uncertain slices spread over the stack (score = uncertain area near "
            "objects per pixel), corrected ones left out. Double-click to go there")
        self.suggestion_list.itemDoubleClicked.connect(self.jump_to_item)
        box.addWidget(self.suggestion_list)
        self.goto_suggested_button = button("Go to slice", "Show the selected suggested slice "
                                            "(the best one when none is selected)",
                                            self.goto_suggested)
        box.addWidget(row(self.goto_suggested_button))
        layout.addWidget(suggestions)

    def refresh(self) -> None:
        """Fill both lists for the current layer."""
        self.fill_slices()
        self.fill_suggestions()

    @staticmethod
    def _fill(widget: QListWidget, rows: list[tuple[str, int | None]]) -> None:
        for text, z in rows:
            item = QListWidgetItem(text)
            if z is not None:
                item.setData(SLICE_ROLE, z if isinstance(z, int) else list(z))
            widget.addItem(item)

    @staticmethod
    def _plane_of(item: QListWidgetItem) -> Any:
        """The slice of a row (z, or ``(axis, index)``); None for a row without one."""
        value = item.data(SLICE_ROLE)
        return None if value is None else plane(value)

    # corrected slices -------------------------------------------------------------------------
    def fill_slices(self) -> None:
        layer = self.current_layer()
        self.slice_list.clear()
        if layer is None:
            return
        self._fill(self.slice_list, corrected_rows(layer.ndim, corrected_slices(layer)))

    def mark_current(self) -> None:
        layer = self.current_layer()
        if layer is None or layer.ndim < 3:
            return
        z = current_plane(self.viewer, layer)
        set_corrected_slices(layer, with_slice(corrected_slices(layer), z))
        self.say(f"Slice {plane_name(z)} marked as corrected.")

    def unmark_selected(self) -> None:
        layer = self.current_layer()
        if layer is None:
            return
        chosen = {self._plane_of(item) for item in self.slice_list.selectedItems()} - {None}
        if chosen:
            set_corrected_slices(layer, set(corrected_slices(layer)) - chosen)
            self.say(f"Unmarked {len(chosen)} slice(s).")

    def goto_selected(self) -> None:
        items = self.slice_list.selectedItems()
        if items:
            self.jump_to_item(items[0])

    # suggested slices -------------------------------------------------------------------------
    def fill_suggestions(self) -> None:
        layer = self.current_layer()
        self.suggestion_list.clear()
        if layer is None or layer.ndim < 3:
            return
        self._fill(self.suggestion_list,
                   suggestion_rows(suggested_slices(layer), corrected_slices(layer)))

    def goto_suggested(self) -> None:
        """Show the selected suggested slice (the first one when none is selected)."""
        items = self.suggestion_list.selectedItems()
        if not items and self.suggestion_list.count():
            items = [self.suggestion_list.item(0)]
        if items:
            self.jump_to_item(items[0])

    def jump_to_item(self, item: QListWidgetItem) -> None:
        layer = self.current_layer()
        z = self._plane_of(item)
        if layer is not None and z is not None:
            set_current_slice(self.viewer, layer, z)
