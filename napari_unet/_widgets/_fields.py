"""The docks' form fields: magicgui widgets in the docks' forms, the layer choosers, the model
lists, and the fields whose values are remembered between sessions (see docs/CONTRIBUTING.md,
"Qt bindings and magicgui")."""

from __future__ import annotations

from typing import Any

from magicgui.widgets import CheckBox, ComboBox
from qtpy.QtWidgets import QAbstractSpinBox, QComboBox, QDoubleSpinBox, QFormLayout, QWidget

from napari_unet._widgets._state import connect_layer_list

#: Qt property set on a combo box whose choice came from the user (or their saved settings):
#: a dock's automatic choice (e.g. the output a model suggests) leaves it alone
USER_CHOICE = "napari_unet_user_choice"


def remember(widget: QWidget, key: str) -> None:
    """Restore ``widget``'s value from the saved settings (:mod:`napari_unet.settings`) and save
    what the user picks from now on.

    Combo boxes store the item data (else the text) of an item the user activated; spin boxes
    their value. A saved value the widget does not offer (a device not found here) is ignored.
    """
    from napari_unet.io.settings import get_setting, save_settings

    value = get_setting(key)
    if isinstance(widget, QComboBox):
        if value is not None:
            index = widget.findData(value)
            if index < 0:
                index = widget.findText(str(value))
            if index >= 0:
                widget.setCurrentIndex(index)
                widget.setProperty(USER_CHOICE, True)

        def save_choice(index: int) -> None:
            widget.setProperty(USER_CHOICE, True)
            data = widget.itemData(index)
            save_settings(**{key: data if data is not None else widget.itemText(index)})

        widget.activated.connect(save_choice)
    elif isinstance(widget, QAbstractSpinBox):  # Qt's, or magicgui's (superqt) for integers
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if widget.minimum() <= value <= widget.maximum():
                widget.setValue(float(value) if isinstance(widget, QDoubleSpinBox) else int(value))
        widget.valueChanged.connect(lambda number: save_settings(**{key: number}))
    else:
        raise TypeError(f"cannot remember a {type(widget).__name__}")


def is_user_choice(widget: QWidget) -> bool:
    """Whether the user (or their saved settings) chose ``widget``'s value."""
    return bool(widget.property(USER_CHOICE))


class LayerCombo(ComboBox):
    """A magicgui ``ComboBox`` of the viewer's layers of some types (the value: the layer).

    The choices follow the layer list (added, removed, renamed, moved layers): napari calls the
    dock's ``reset_choices`` (:class:`LayerChoices`), and the chooser also listens to the layer
    list itself, so that a dock that is not docked (a script, a test) follows too. A refresh
    keeps the chosen layer, renamed or moved; when it is gone, the active layer of the type is
    chosen, else the newest. ``allow_none`` adds ``(none)`` first. Qt's ``QComboBox`` API
    (``setCurrentText``, ``currentText``…) reaches the Qt combo box (``native``).
    """

    null_string = "(none)"

    def __init__(self, viewer: Any, layer_types: tuple[type, ...], tooltip: str,
                 allow_none: bool = False, label: str = ""):
        self._viewer = viewer
        self._types = layer_types
        super().__init__(choices=self._layer_choices, nullable=allow_none, tooltip=tooltip,
                         label=label)
        self.native.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.native.setMinimumContentsLength(12)
        connect_layer_list(viewer, self.reset_choices)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.native, name)

    def _layer_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in self.layers()]

    def layers(self) -> list[Any]:
        return [layer for layer in self._viewer.layers if isinstance(layer, self._types)]

    def reset_choices(self, *_: Any) -> None:
        combo = self.native
        try:
            shown = [(combo.itemText(i), id(combo.itemData(i))) for i in range(combo.count())]
        except RuntimeError:  # the Qt object is gone (dock closed)
            return
        before = self.value
        with self.changed.blocked():
            combo.blockSignals(True)
            try:
                super().reset_choices()
                layers = self.layers()
                # "(none)" chosen stays; so does a layer still there, renamed or not (magicgui
                # keeps a choice by its text and would pick the first one)
                kept = before in layers or (before is None and self._nullable and bool(shown))
                if kept:
                    self.value = before
                else:
                    active = self._viewer.layers.selection.active
                    if active in layers:
                        self.value = active
                    elif layers:  # the newest layer of this type is the most likely target
                        self.value = layers[-1]
            finally:
                combo.blockSignals(False)
        if shown != [(combo.itemText(i), id(combo.itemData(i))) for i in range(combo.count())]:
            # also when the last layer is gone (magicgui's own signal skips a value of None)
            self.changed.emit(self.value)

    def layer(self) -> Any | None:
        return self.value

    def set_layer(self, layer: Any) -> None:
        """Choose ``layer`` (None: ``(none)``); one this chooser does not list is ignored."""
        self.reset_choices()
        if layer in self.layers() or (layer is None and self._nullable):
            self.value = layer


class LayerChoices:
    """A dock whose layer choosers napari refreshes: napari calls ``reset_choices`` of a docked
    widget when layers are added, removed, moved or renamed; it reaches the dock's
    :class:`LayerCombo` choosers (magicgui's convention for widgets with choices)."""

    def reset_choices(self, *_: Any) -> None:
        try:
            combos = self.findChildren(QComboBox)  # type: ignore[attr-defined]
        except RuntimeError:  # the dock was closed: napari does not disconnect it
            return
        for combo in combos:
            chooser = getattr(combo, "_magic_widget", None)
            if isinstance(chooser, LayerCombo):
                chooser.reset_choices()


def add_fields(fields: QFormLayout, owner: Any, **widgets: Any) -> None:
    """Add magicgui ``widgets`` to the form ``fields``, a row each labelled with the widget's
    ``label`` (check boxes carry their own text), and make each one an attribute of ``owner``
    named by its keyword: a :class:`LayerCombo` itself, the others their Qt widget (the docks,
    their tests and scripts use them as Qt widgets: ``currentData()``, ``setValue()``,
    :func:`remember`)."""
    for name, widget in widgets.items():
        setattr(owner, name, widget if isinstance(widget, LayerCombo) else widget.native)
        fields.addRow("" if isinstance(widget, CheckBox) else widget.label, widget.native)


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


def precision_combo(tooltip: str) -> ComboBox:
    """The Precision choice shared by Segment and Fine-tune (the value: the name)."""
    from napari_unet.model.precision import PRECISIONS

    return ComboBox(label="Precision", choices=list(PRECISIONS), tooltip=tooltip)


def device_combo(tooltip: str) -> ComboBox:
    """The Device choice shared by Segment and Fine-tune: ``auto (<the first found>)``, then
    each device found here (the value: ``auto`` or the device); ``{found}`` in ``tooltip``
    becomes the list."""
    from napari_unet.engine.devices import available_devices

    found = available_devices()
    return ComboBox(label="Device", choices=[(f"auto ({found[0]})", "auto")] + [
        (name, name) for name in found], tooltip=tooltip.format(found=", ".join(found)))
