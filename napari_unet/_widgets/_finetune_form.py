"""The Fine-tune dock's input parts: the training data (image + labels pairs) and the run's
settings. The dock (:mod:`._finetune`) puts them in its layout and starts the run."""

from __future__ import annotations

from typing import Any, Mapping

from magicgui.widgets import CheckBox, FloatSpinBox
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFormLayout,
    QGroupBox,
    QListWidget,
    QSpinBox,
    QVBoxLayout,
)

from napari_unet._widgets._common import button, resolved_precision, row
from napari_unet._widgets._fields import (
    LayerCombo,
    add_fields,
    device_combo,
    precision_combo,
    remember,
)
from napari_unet._widgets._state import corrected_slices, notify_error
from napari_unet.training.config import TrainingConfig, TrainingPair
from napari_unet.training.corrections import (
    CorrectionSource,
    gather_training_pairs,
    validation_expected,
)
from napari_unet.training.finetune_setup import finetune_config

#: how a pair is written in the list: image name, this, labels name
PAIR_SEPARATOR = "  ↔  "


class TrainingData:
    """The "Training data" group: an image and its labels, or a list of such pairs."""

    def __init__(self, viewer: Any, layout: QVBoxLayout):
        from napari.layers import Image, Labels

        self.viewer = viewer
        pairs = QGroupBox("Training data")
        pairs_layout = QVBoxLayout(pairs)
        pair_form = QFormLayout()
        add_fields(pair_form, self,
                   image_combo=LayerCombo(viewer, (Image,), "Image the labels belong to",
                                          label="Image"),
                   labels_combo=LayerCombo(viewer, (Labels,), "Corrected labels for the image",
                                           label="Labels"))
        pairs_layout.addLayout(pair_form)
        self.pair_list = QListWidget()
        self.pair_list.setToolTip("Image + labels pairs to train on. Empty: the pair chosen above")
        self.pair_list.setMaximumHeight(70)
        pairs_layout.addWidget(row(
            button("Add pair", "Add the image + labels above to the list (several pairs allowed)",
                   self.add_pair),
            button("Remove pair", "Remove the selected pair from the list", self.remove_pair)))
        pairs_layout.addWidget(self.pair_list)
        self.corrected_only = CheckBox(
            text="Only corrected slices", value=True, tooltip="Stacks: train on the slices you "
            "corrected (Edit dock list); if none are marked, on the whole stack. 2D images: the "
            "whole image").native
        pairs_layout.addWidget(self.corrected_only)
        layout.addWidget(pairs)

    def add_pair(self) -> None:
        image, labels = self.image_combo.layer(), self.labels_combo.layer()
        if image is None or labels is None:
            notify_error(ValueError("choose an image and a labels layer"), "Add pair")
            return
        text = f"{image.name}{PAIR_SEPARATOR}{labels.name}"
        if not self.pair_list.findItems(text, Qt.MatchExactly):
            self.pair_list.addItem(text)

    def remove_pair(self) -> None:
        for item in self.pair_list.selectedItems():
            self.pair_list.takeItem(self.pair_list.row(item))

    def layers(self) -> list[tuple[Any, Any]]:
        """The (image, labels) layers to train on: the list, else the pair chosen above."""
        names = [self.pair_list.item(i).text() for i in range(self.pair_list.count())]
        pairs = []
        for text in names:
            image_name, labels_name = text.split(PAIR_SEPARATOR)
            if image_name in self.viewer.layers and labels_name in self.viewer.layers:
                pairs.append((self.viewer.layers[image_name], self.viewer.layers[labels_name]))
        if not names:
            image, labels = self.image_combo.layer(), self.labels_combo.layer()
            if image is not None and labels is not None:
                pairs.append((image, labels))
        if not pairs:
            raise ValueError("no training data: choose an image and its labels layer")
        return pairs

    def sources(self) -> list[CorrectionSource]:
        """The chosen pairs as arrays, with their lists of corrected slices."""
        return [CorrectionSource(image=image.data[0] if image.multiscale else image.data,
                                 labels=labels.data, name=labels.name,
                                 corrected=corrected_slices(labels))
                for image, labels in self.layers()]

    def training_pairs(self) -> tuple[list[TrainingPair], list[str]]:
        """TrainingPairs of the chosen layers (see
        :func:`~napari_unet.training.corrections.gather_training_pairs`) and notes."""
        return gather_training_pairs(self.sources(), self.corrected_only.isChecked())


class TrainingSettings:
    """The form of the run's settings: time limit, iterations, learning rate, hold-out, device,
    precision, live preview."""

    def __init__(self, layout: QVBoxLayout, preview_layer: str):
        settings = QFormLayout()
        # Qt spin boxes: magicgui's integer SpinBox (superqt's QLargeIntSpinBox) has no suffix
        # (" s") and does not show a special value text ("auto" at 0), see docs/CONTRIBUTING.md
        self.time_spin = QSpinBox()
        self.time_spin.setRange(0, 24 * 3600)
        self.time_spin.setValue(60)
        self.time_spin.setSuffix(" s")
        self.time_spin.setToolTip("Stop after this long (0 = no time limit; then set iterations)")
        settings.addRow("Time limit", self.time_spin)
        remember(self.time_spin, "time_limit")
        self.iterations_spin = QSpinBox()
        self.iterations_spin.setRange(0, 1_000_000)
        self.iterations_spin.setSpecialValueText("auto")
        self.iterations_spin.setToolTip("Stop after this many iterations (auto = by time limit)")
        settings.addRow("Iterations", self.iterations_spin)
        add_fields(
            settings, self,
            lr_spin=FloatSpinBox(label="Learning rate", max=0.1, step=0.0001, tooltip="Learning "
                                 "rate (auto = 3e-4 for fine-tuning)"),
            validation_check=CheckBox(text="Validate on a held-out part", value=True,
                                      tooltip=(
                "With 2 or more corrected slices or images, one part is kept aside to score the "
                "weights, and Stop and the end keep the best-scoring ones; with fewer, or "
                "unchecked, the last weights are kept")),
            device_combo=device_combo("Where training runs. Found here: {found}"),
            precision_combo=precision_combo(
                "Numeric precision of training: auto = bf16 on CPUs with native bf16 and on "
                "GPUs, fp16 (with loss scaling) on older GPUs, else fp32; fp32 = exact"),
            preview_check=CheckBox(text="Live preview (current slice)", value=True,
                                   tooltip="Every few seconds re-predict the slice on screen "
                                           f"into the '{preview_layer}' layer"))
        self.lr_spin.setDecimals(5)
        self.lr_spin.setSpecialValueText("auto")
        remember(self.device_combo, "device")
        layout.addLayout(settings)

    def precision_label(self) -> str:
        """The precision the run will use on the chosen device (``bf16``, …)."""
        return resolved_precision(self.precision_combo.currentData(),
                                  self.device_combo.currentData())

    def validation_expected(self, pairs: list[TrainingPair]) -> bool:
        """Whether a part can be held out (asked for, and 2 or more corrected slices or images)."""
        return validation_expected(pairs, self.validation_check.isChecked())

    def config(self, overrides: Mapping[str, Any] | None = None) -> TrainingConfig:
        """The run's config from the form (see
        :func:`~napari_unet.training.finetune_setup.finetune_config`)."""
        return finetune_config(
            iterations=self.iterations_spin.value(), time_limit=self.time_spin.value(),
            learning_rate=self.lr_spin.value(), hold_out=self.validation_check.isChecked(),
            device=self.device_combo.currentData(), precision=self.precision_combo.currentData(),
            overrides=overrides)
