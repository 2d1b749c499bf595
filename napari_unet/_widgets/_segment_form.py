"""The Segment dock's run options: output, scope, where to write, post-processing, stitching,
test-time augmentation and the uncertainty layer (form rows; the dock reads the widgets)."""

from __future__ import annotations

from typing import Any

from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, SpinBox
from qtpy.QtWidgets import QFormLayout

from napari_unet._widgets._fields import add_fields, remember
from napari_unet._widgets._object_size import ObjectSizeRow
from napari_unet.engine.regions import SLICE, VISIBLE, WHOLE
from napari_unet.labels.instances import DEFAULT_MIN_SIZE
from napari_unet.labels.stitch import DEFAULT_STITCH_THRESHOLD
from napari_unet.labels.writeback import KEEP, OVERWRITE

#: the Output choices and the core's outputs
OUTPUTS = {"instances": "instances", "binary / classes": "labels"}
#: the Scope choices and the core's scopes
SCOPES = {"whole stack": WHOLE, "current slice": SLICE, "visible region": VISIBLE}
#: where the result goes: the image's labels layer with the corrected slices left as they are
#: (default), a new labels layer, or the labels layer entirely (asks first when it has
#: corrected slices or edits)
NEW_LAYER = "new labels layer"
WRITE_MODES = {"keep corrected slices": KEEP, NEW_LAYER: "new", "overwrite all": OVERWRITE}


def add_run_fields(widget: Any, fields: QFormLayout) -> None:
    """Add the run options to ``fields`` as attributes of ``widget`` (``output_combo``,
    ``scope_combo``, ``write_combo``, ``threshold_spin``, ``min_size_spin``, ``stitch_spin``,
    ``object_size`` (:class:`ObjectSizeRow`), ``tta_check``, ``uncertainty_check``); edits of
    threshold or minimum size call ``widget._postprocess_edited``."""
    add_fields(
        fields, widget,
        output_combo=ComboBox(label="Output", choices=list(OUTPUTS), tooltip=(
            "instances: one id per object (nuclei, cells); binary / classes: foreground = 1, or "
            "class ids for multi-class models")),
        scope_combo=ComboBox(label="Scope", choices=list(SCOPES), tooltip=(
            "whole stack: everything; current slice: only the slice on screen (fast check); "
            "visible region: the part in view (all slices)")),
        write_combo=ComboBox(label="Write into", choices=list(WRITE_MODES), tooltip=(
            "keep corrected slices: the image's labels layer is rewritten except the slices "
            "marked corrected (Edit dock); new labels layer: your layer stays as it is; overwrite "
            "all: everything, corrected slices included (asks first). Ctrl+Z undoes a run")),
        threshold_spin=FloatSpinBox(label="Threshold", min=0.01, max=0.99, step=0.05, value=0.5,
                                    tooltip="Probability above which a pixel is foreground "
                                            "(lower = larger objects)"),
        min_size_spin=SpinBox(label="Min size", max=10_000_000, value=DEFAULT_MIN_SIZE,
                              tooltip="Remove objects smaller than this many pixels/voxels "
                                      "(0 = keep all)"),
        # a 2D model on a stack: link objects through z
        stitch_spin=FloatSpinBox(label="Stitch z", max=0.95, step=0.05,
                                 value=DEFAULT_STITCH_THRESHOLD, tooltip=(
            "Instances of a 2D model on a stack: objects of neighbouring slices overlapping with "
            "at least this IoU are one object (0 = per slice). 3D models ignore it")))
    widget.object_size = ObjectSizeRow(widget)  # resampling per tile (as Cellpose's diameter)
    fields.addRow("Object size", widget.object_size)
    add_fields(
        fields, widget,
        tta_check=CheckBox(text="Test-time augmentation", tooltip=(
            "Average the model over 8 flips and rotations of the image: smoother, often slightly "
            "better results, 8x slower")),
        uncertainty_check=CheckBox(text="Uncertainty layer", tooltip=(
            "Add (or update) an image layer '<image> uncertainty' where the model is unsure (0..1: "
            "entropy of the probabilities, with test-time augmentation also the disagreement "
            "between the augmentations). Toggle it like any layer")))
    remember(widget.output_combo, "output")
    widget.stitch_spin.setSpecialValueText("per slice")
    #: False while threshold and min size show the model's own (tuned) values; True once
    #: the user changes one, so their value wins over the model's
    widget.postprocess_edited = False
    for spin in (widget.threshold_spin, widget.min_size_spin):
        spin.valueChanged.connect(widget._postprocess_edited)
