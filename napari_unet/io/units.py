"""The length unit of an image as the GUI knows it: saved with the layer, or napari's ``units``."""

from __future__ import annotations

from typing import Any, Sequence

from napari_unet.io.formats import normalize_unit

#: what napari (pint) calls an uncalibrated axis
_NO_UNIT = ("px", "dimensionless")


def unit_text(unit: Any) -> str:
    """A unit as short text: pint units abbreviated (``micrometer`` -> ``µm``), others as is."""
    return f"{unit:~}" if hasattr(unit, "dimensionality") else str(unit)


def length_unit(saved: Any = None, units: Sequence[Any] | None = None, default: str = "um") -> str:
    """The length unit of an image: ``saved`` (the unit read from its file) when there is one,
    else the last of ``units`` (napari's per-axis units) spelled canonically (``"um"``), else
    ``default`` (also for ``pixel``: an uncalibrated image)."""
    if saved:
        return str(saved)
    if units:
        text = unit_text(units[-1]).strip()
        if text.lower() not in _NO_UNIT:
            unit = normalize_unit(text)
            if unit:
                return unit
    return default
