"""The Fine-tune dock's "New model…" dialog: an untrained 2D or 3D model for the user's labels."""

from __future__ import annotations

from typing import Any

from magicgui.widgets import ComboBox, LineEdit, SpinBox
from qtpy.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QVBoxLayout,
    QWidget,
)

from napari_unet._widgets._fields import add_fields

from napari_unet.model.config import inplane_only_levels_for
from napari_unet.training.new_models import (
    CT_WINDOW_NORMALIZATION,
    NAME_COLUMNS,
    PERCENTILE_NORMALIZATION,
    NewModelSpec,
    class_list,
    class_names_from_columns,
    inplane_levels,
    model_name,
    parse_class_names,
    spec_for_labels,
)

__all__ = ["NewModelDialog", "NewModelSpec", "spec_for_layer", "layer_class_names", "class_list",
           "parse_class_names", "model_name", "TASK_CHOICES", "NORMALIZATIONS",
           "ARCHITECTURE_CHOICES", "NAME_COLUMNS"]

#: task shown in the dialog -> checkpoint task
TASK_CHOICES = {"foreground": "foreground", "foreground + boundary": "foreground_boundary",
                "membranes": "membranes", "classes": "semantic"}
#: normalisation shown in the dialog -> model normalisation settings
NORMALIZATIONS = {"percentile (1-99.8 %)": PERCENTILE_NORMALIZATION,
                  "CT window (HU 40 ± 200)": CT_WINDOW_NORMALIZATION}
#: architecture shown in the dialog -> ``UNetConfig.architecture``
ARCHITECTURE_CHOICES = {"UNet": "unet", "Residual UNet": "resunet", "Attention UNet": "attention",
                        "UNet++": "unetpp"}


def layer_class_names(layer: Any) -> dict[int, str]:
    """Class names of a labels layer by id, from its ``features`` (or ``properties``) table
    (see :func:`~napari_unet.training.new_models.class_names_from_columns`). Empty when the
    layer has none."""
    table = getattr(layer, "features", None)
    if table is not None and len(getattr(table, "columns", [])):
        columns = {str(c): list(table[c]) for c in table.columns}
    else:
        properties = getattr(layer, "properties", None) or {}
        columns = {str(k): list(v) for k, v in properties.items()}
    return class_names_from_columns(columns)


class NewModelDialog(QDialog):
    """Ask for dimensions, task, class names, anisotropy and name of a new model."""

    def __init__(self, labels_layer: Any | None, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("New model")
        self.labels_layer = labels_layer
        layout = QVBoxLayout(self)
        fields = QFormLayout()
        layout.addLayout(fields)
        ndim = labels_layer.ndim if labels_layer is not None else 2

        self.layer_names = layer_class_names(labels_layer) if labels_layer is not None else {}
        add_fields(
            fields, self,
            dims_combo=ComboBox(label="Dimensions", value=3 if ndim >= 3 else 2, choices=[
                ("2D (images, or a stack slice by slice)", 2), ("3D (stacks)", 3)],
                tooltip="2D models see one slice at a time; 3D models see the stack"),
            task_combo=ComboBox(label="Task", choices=list(TASK_CHOICES),
                                value="foreground + boundary", tooltip=(
                "foreground: one mask; foreground + boundary: touching objects (nuclei) are "
                "separated; membranes: cell boundaries (EM, membrane stains); classes: one class "
                "per label id (organs)")),
            classes_edit=LineEdit(label="Class names", value=", ".join(
                class_list(self.layer_names)[1:]) if self.layer_names else "", tooltip=(
                "Classes only: the names of label ids 1, 2, … separated by commas. Filled from "
                "the labels layer's features when it has names")))
        self.classes_edit.setPlaceholderText("names for ids 1, 2, … e.g. liver, spleen")
        source = (f"{len(self.layer_names)} names from {labels_layer.name!r}" if self.layer_names
                  else "type them (the layer has no names)")
        self.classes_info = QLabel(source)
        fields.addRow("", self.classes_info)

        self.voxel_size: tuple[float, ...] | None = None
        if labels_layer is not None:
            self.voxel_size = tuple(float(s) for s in labels_layer.scale[-min(3, ndim):])
        depth = 4
        auto = len(inplane_only_levels_for(self.voxel_size, depth))
        add_fields(
            fields, self,
            base_spin=SpinBox(label="Base channels", min=4, max=64, value=16, tooltip=(
                "Channels of the first level (larger = slower, more capacity)")),
            architecture_combo=ComboBox(label="Architecture", choices=list(
                ARCHITECTURE_CHOICES.items()), tooltip=(
                "UNet: the classic; Residual UNet: residual blocks; Attention UNet: attention "
                "gates on the skip connections; UNet++: nested dense skips (more memory and "
                "time)")),
            depth_spin=SpinBox(label="Depth", min=2, max=6, value=depth,
                               tooltip="Resolution levels of the UNet"),
            aniso_spin=SpinBox(label="In-plane-only levels", max=5, value=auto, tooltip=(
                "3D only: pooling levels that pool y-x only, for stacks whose z spacing is "
                "coarser than in-plane (from the layer's scale)")))
        scale_text = ("voxel size " + " × ".join(f"{s:g}" for s in self.voxel_size)
                      if self.voxel_size else "no voxel size")
        self.aniso_info = QLabel(f"{scale_text}: {auto} level(s) pool in-plane only")
        fields.addRow("", self.aniso_info)
        add_fields(
            fields, self,
            norm_combo=ComboBox(label="Normalisation", choices=list(NORMALIZATIONS), tooltip=(
                "How intensities are scaled: percentiles of each image (microscopy), or a fixed "
                "Hounsfield window (CT)")),
            name_edit=LineEdit(label="Name", value=model_name(f"{labels_layer.name}-model")
                               if labels_layer is not None else "model",
                               tooltip="Name of the new model (its versions are name v1, v2, …)"))

        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        for button in buttons.buttons():
            button.setToolTip("Create the model" if buttons.buttonRole(button) ==
                              QDialogButtonBox.AcceptRole else "Close without a new model")
        layout.addWidget(buttons)
        self.dims_combo.currentIndexChanged.connect(self._update)
        self.task_combo.currentIndexChanged.connect(self._update)
        self._update()

    def _update(self, *_args: Any) -> None:
        classes = self.task_combo.currentText() == "classes"
        self.classes_edit.setEnabled(classes)
        self.aniso_spin.setEnabled(self.dims_combo.currentData() == 3)

    def spec(self) -> NewModelSpec:
        """What was chosen. Raises ValueError for classes without names."""
        dims = int(self.dims_combo.currentData())
        task = TASK_CHOICES[self.task_combo.currentText()]
        class_names = None
        if task == "semantic":
            names = parse_class_names(self.classes_edit.text())
            if not names:
                raise ValueError("classes need names: type the names of label ids 1, 2, … "
                                 "separated by commas")
            class_names = class_list(names)
        depth = self.depth_spin.value()
        levels = inplane_levels(dims, self.aniso_spin.value(), depth)
        voxel = self.voxel_size if self.voxel_size and len(self.voxel_size) == dims else None
        return NewModelSpec(spatial_dims=dims, task=task, class_names=class_names,
                            name=model_name(self.name_edit.text()), inplane_only_levels=levels,
                            base_channels=self.base_spin.value(), depth=depth,
                            normalization=dict(NORMALIZATIONS[self.norm_combo.currentText()]),
                            voxel_size=voxel, architecture=str(self.architecture_combo.currentData()))


def spec_for_layer(labels_layer: Any, spatial_dims: int, task: str,
                   class_names: list[str] | None = None, **options: Any) -> NewModelSpec:
    """The dialog's defaults for ``labels_layer`` without showing it (scripts and tests):
    class names from the layer when ``task`` is ``semantic`` and none are given, in-plane-only
    levels from the layer's scale (see :func:`~napari_unet.training.new_models.spec_for_labels`)."""
    names = layer_class_names(labels_layer) if task == "semantic" and class_names is None else None
    return spec_for_labels(labels_layer.name, labels_layer.scale, spatial_dims, task,
                           class_names, names, **options)
