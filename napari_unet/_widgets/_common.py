"""Small Qt helpers shared by the docks (qtpy only)."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QComboBox, QFormLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton,
                            QSizePolicy, QWidget)

from ._state import connect_layer_list


class LayerCombo(QComboBox):
    """A combo box of the viewer's layers of some types, kept up to date, selection kept."""

    def __init__(self, viewer: Any, layer_types: tuple[type, ...], tooltip: str,
                 parent: QWidget | None = None, allow_none: bool = False):
        super().__init__(parent)
        self._viewer = viewer
        self._types = layer_types
        self._allow_none = allow_none
        self.setToolTip(tooltip)
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        connect_layer_list(viewer, self.refresh)
        self.refresh()

    def layers(self) -> list[Any]:
        return [layer for layer in self._viewer.layers if isinstance(layer, self._types)]

    def refresh(self, event: Any = None) -> None:
        try:
            current = self.currentText()
        except RuntimeError:  # the Qt object is gone (dock closed)
            return
        names = [layer.name for layer in self.layers()]
        if self._allow_none:
            names = ["(none)"] + names
        if names == [self.itemText(i) for i in range(self.count())]:
            return
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        else:
            active = self._viewer.layers.selection.active
            if active is not None and active.name in names:
                self.setCurrentText(active.name)
            elif names:
                # newest layer of this type is the most likely target
                self.setCurrentIndex(len(names) - 1)
        self.blockSignals(False)
        self.currentIndexChanged.emit(self.currentIndex())

    def layer(self) -> Any | None:
        name = self.currentText()
        for layer in self.layers():
            if layer.name == name:
                return layer
        return None

    def set_layer(self, layer: Any) -> None:
        self.refresh()
        self.setCurrentText(layer.name)


class ProgressBar(QProgressBar):
    """A QProgressBar whose ``setValue`` does not repaint at once.

    ``QProgressBar.setValue`` calls ``repaint()``: one more synchronous flush of the whole
    window per update (in napari with a software OpenGL stack, ~15 ms of blocked event loop).
    Here the bar is repainted with the window's other changes, in one flush.
    """

    def setValue(self, value: int) -> None:  # noqa: N802 - Qt API
        if value == self.value():
            return
        self.setUpdatesEnabled(False)
        try:
            super().setValue(value)
        finally:
            self.setUpdatesEnabled(True)  # schedules update() (no immediate repaint)


def fill_model_combo(combo: QComboBox, registry: Any, placeholder: str | None = None) -> bool:
    """List the registry's models (display text, key as item data) without emitting signals.

    Returns False when the combo is gone (its dock was closed).
    """
    try:
        combo.blockSignals(True)
    except RuntimeError:
        return False
    combo.clear()
    for entry in registry.entries():
        combo.addItem(entry.display, entry.key)
    if placeholder and not len(registry):
        combo.addItem(placeholder, None)
    combo.blockSignals(False)
    return True


def select_model_in_combo(combo: QComboBox, key: str) -> bool:
    """Show model ``key`` as the combo's current item without emitting signals.

    Returns False when the combo is gone (its dock was closed).
    """
    try:
        index = combo.findData(key) if key else -1
    except RuntimeError:
        return False
    if index >= 0 and index != combo.currentIndex():
        combo.blockSignals(True)
        combo.setCurrentIndex(index)
        combo.blockSignals(False)
    return True


def button(text: str, tooltip: str, slot: Any = None, parent: QWidget | None = None) -> QPushButton:
    widget = QPushButton(text, parent)
    widget.setToolTip(tooltip)
    if slot is not None:
        widget.clicked.connect(lambda _checked=False: slot())
    return widget


def row(*widgets: QWidget) -> QWidget:
    holder = QWidget()
    layout = QHBoxLayout(holder)
    layout.setContentsMargins(0, 0, 0, 0)
    for widget in widgets:
        layout.addWidget(widget)
    return holder


def status_label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextSelectableByMouse)
    label.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
    label.setToolTip("What the dock did last")
    return label


def form(parent: QWidget) -> QFormLayout:
    layout = QFormLayout()
    layout.setFieldGrowthPolicy(QFormLayout.AllNonFixedFieldsGrow)
    return layout


def connect_until_destroyed(widget: QWidget, signal: Any, slot: Any) -> None:
    """Connect a psygnal ``signal`` to ``slot`` and disconnect it when ``widget`` is deleted.

    The registry outlives the docks; a closed dock must not be called again.
    """
    signal.connect(slot)

    def disconnect(*_args: Any) -> None:
        try:
            signal.disconnect(slot)
        except (ValueError, RuntimeError):
            pass

    widget.destroyed.connect(disconnect)
