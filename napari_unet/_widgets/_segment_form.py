"""The Segment dock's run options: output, scope, where to write, post-processing, stitching,
test-time augmentation and the uncertainty layer (form rows; the dock reads the widgets)."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QSpinBox

from napari_unet._widgets._common import remember
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
    ``object_size`` (:class:`ObjectSizeRow`), ``tta_check``, ``uncertainty_check``); edits of threshold or minimum size call
    ``widget._postprocess_edited``."""
    widget.output_combo = QComboBox()
    widget.output_combo.addItems(list(OUTPUTS))
    widget.output_combo.setToolTip("instances: one id per object (nuclei, cells); binary / "
                                   "classes: foreground = 1, or class ids for multi-class models")
    fields.addRow("Output", widget.output_combo)
    remember(widget.output_combo, "output")

    widget.scope_combo = QComboBox()
    widget.scope_combo.addItems(list(SCOPES))
    widget.scope_combo.setToolTip("whole stack: everything; current slice: only the slice on "
                                  "screen (fast check); visible region: the part in view (all "
                                  "slices)")
    fields.addRow("Scope", widget.scope_combo)

    widget.write_combo = QComboBox()
    widget.write_combo.addItems(list(WRITE_MODES))
    widget.write_combo.setToolTip("keep corrected slices: the image's labels layer is rewritten "
                                  "except the slices marked corrected (Edit dock); new labels "
                                  "layer: your layer stays as it is; overwrite all: everything, "
                                  "corrected slices included (asks first). Ctrl+Z undoes a run")
    fields.addRow("Write into", widget.write_combo)

    widget.threshold_spin = QDoubleSpinBox()
    widget.threshold_spin.setRange(0.01, 0.99)
    widget.threshold_spin.setSingleStep(0.05)
    widget.threshold_spin.setValue(0.5)
    widget.threshold_spin.setToolTip("Probability above which a pixel is foreground (lower = "
                                     "larger objects)")
    fields.addRow("Threshold", widget.threshold_spin)

    widget.min_size_spin = QSpinBox()
    widget.min_size_spin.setRange(0, 10_000_000)
    widget.min_size_spin.setValue(DEFAULT_MIN_SIZE)
    widget.min_size_spin.setToolTip("Remove objects smaller than this many pixels/voxels "
                                    "(0 = keep all)")
    fields.addRow("Min size", widget.min_size_spin)
    #: False while threshold and min size show the model's own (tuned) values; True once
    #: the user changes one, so their value wins over the model's
    widget.postprocess_edited = False
    for spin in (widget.threshold_spin, widget.min_size_spin):
        spin.valueChanged.connect(widget._postprocess_edited)

    widget.stitch_spin = QDoubleSpinBox()  # a 2D model on a stack: link objects through z
    widget.stitch_spin.setRange(0.0, 0.95)
    widget.stitch_spin.setSingleStep(0.05)
    widget.stitch_spin.setValue(DEFAULT_STITCH_THRESHOLD)
    widget.stitch_spin.setSpecialValueText("per slice")
    widget.stitch_spin.setToolTip("Instances of a 2D model on a stack: objects of neighbouring "
                                  "slices overlapping with at least this IoU are one object "
                                  "(0 = per slice). 3D models ignore it")
    fields.addRow("Stitch z", widget.stitch_spin)
    widget.object_size = ObjectSizeRow(widget)  # resampling per tile (as Cellpose's diameter)
    fields.addRow("Object size", widget.object_size)
    widget.tta_check = QCheckBox("Test-time augmentation")
    widget.tta_check.setToolTip("Average the model over 8 flips and rotations of the image: "
                                "smoother, often slightly better results, 8x slower")
    fields.addRow("", widget.tta_check)
    widget.uncertainty_check = QCheckBox("Uncertainty layer")
    widget.uncertainty_check.setToolTip(
        "Add (or update) an image layer '<image> uncertainty' where the model is unsure "
        "(0..1: entropy of the probabilities, with test-time augmentation also the "
        "disagreement between the augmentations). Toggle it like any layer")
    fields.addRow("", widget.uncertainty_check)
