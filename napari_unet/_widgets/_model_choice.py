"""The Segment dock's first choice of model for the selected image (rules:
:mod:`napari_unet.zoo.choice`)."""

from __future__ import annotations

from typing import Any

from napari_unet._widgets._io import SAMPLE_KEY
from napari_unet._widgets._state import layer_unit
from napari_unet.zoo.choice import (
    Choice,
    DataTraits,
    choose_model,
    data_kind,
    model_traits,
    remember_choice,
    remembered_choice,
)

#: the combo item shown when no model fits the image (its data is None: Segment refuses)
NO_MODEL = "(no model fits this image: pick one)"


def layer_traits(layer: Any) -> DataTraits:
    """Dims, channels and kind of data of an image layer."""
    metadata = getattr(layer, "metadata", None) or {}
    ndim = layer.ndim - (1 if getattr(layer, "rgb", False) else 0)
    channels = 3 if getattr(layer, "rgb", False) else 1
    unit = layer_unit(layer, default="") if SAMPLE_KEY not in metadata else None
    return DataTraits(ndim=min(ndim, 3), channels=channels,
                      kind=data_kind(metadata.get(SAMPLE_KEY), unit))


def choose_for_layer(registry: Any, layer: Any) -> Choice:
    """The model to offer for ``layer`` (not yet selected)."""
    traits = layer_traits(layer)
    return choose_model(traits, model_traits(registry), remembered_choice(traits),
                        registry.current)


def note_model_used(registry: Any, layer: Any) -> None:
    """Remember the current model as the one for data like ``layer`` (Segment was clicked)."""
    key = registry.current
    if key and key in registry:
        remember_choice(layer_traits(layer), key,
                        persistent=registry.entry(key).source == "shipped")


def pick_model_for(layer: Any, registry: Any, combo: Any, info: Any) -> Choice:
    """Select the model for ``layer`` in ``registry`` (the dock's combo follows); when none
    fits, show :data:`NO_MODEL` in ``combo`` and the reason in ``info``."""
    choice = choose_for_layer(registry, layer)
    registry.current = choice.key
    if choice.key is None:
        combo.blockSignals(True)
        combo.insertItem(0, NO_MODEL, None)
        combo.setCurrentIndex(0)
        combo.blockSignals(False)
        info.setText(choice.reason)
    return choice
