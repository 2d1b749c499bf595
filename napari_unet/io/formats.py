"""What the readers and writers share: suffixes, axes, units, errors and :class:`LoadedImage`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

PathLike = str | os.PathLike

TIFF_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif")
PILLOW_SUFFIXES = (".png", ".jpeg", ".jpg")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
DICOM_SUFFIXES = (".dcm",)
SUPPORTED_SUFFIXES = TIFF_SUFFIXES + PILLOW_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES

SPATIAL_AXES = "ZYX"
CHANNEL_AXES = "CS"
# Formats ImageJ can store; anything else needs a plain (non-ImageJ) TIFF.
IMAGEJ_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32))

# Lengths in micrometres, to convert between the units files use.
_UNIT_IN_UM = {"nm": 1e-3, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}
_UNIT_ALIASES = {
    "micron": "um",
    "microns": "um",
    "micrometer": "um",
    "micrometre": "um",
    "µm": "um",  # micro sign
    "μm": "um",  # greek mu
    "\\u00b5m": "um",  # ImageJ escapes the micro sign this way
    "nanometer": "nm",
    "millimeter": "mm",
    "millimetre": "mm",
    "centimeter": "cm",
    "meter": "m",
    "metre": "m",
}


class CalibrationWarning(UserWarning):
    """The file's calibration is partly invalid (a zero, negative or NaN spacing); the valid
    part is kept. The message is one line."""


class ImageReadError(ValueError):
    """An image could not be opened; the message says why in one line."""


class OutputPathError(ValueError):
    """An output path that cannot be written (a folder, a missing or read-only folder, ...)."""


@dataclass
class LoadedImage:
    """Pixel data and calibration of an opened image.

    Attributes
    ----------
    data : numpy.ndarray
        Pixels, C-contiguous. ``(Y, X)`` or ``(Z, Y, X)`` for one-channel images; with
        ``allow_channels=True`` a channel axis may come first: ``(C, Y, X)`` or ``(C, Z, Y, X)``.
    axes : str
        One letter per axis of ``data``: ``"YX"``, ``"ZYX"``, ``"CYX"`` or ``"CZYX"``.
    voxel_size : tuple of float or None
        Size of a voxel along each spatial axis (``(z, y, x)`` or ``(y, x)``), in ``unit``;
        None when the file does not record it.
    unit : str or None
        Length unit of ``voxel_size`` (``"um"``, ``"mm"``, ...); None when unknown.
    path : pathlib.Path or None
        File or folder the image came from.
    """

    data: np.ndarray
    axes: str
    voxel_size: tuple[float, ...] | None = None
    unit: str | None = None
    path: Path | None = None

    def spatial_shape(self) -> tuple[int, ...]:
        """Sizes of the spatial axes (``Z, Y, X`` or ``Y, X``), channels left out."""
        return tuple(size for size, axis in zip(self.data.shape, self.axes) if axis in SPATIAL_AXES)

    @property
    def spatial_axes(self) -> str:
        """The spatial axis letters, e.g. ``"ZYX"``."""
        return "".join(axis for axis in self.axes if axis in SPATIAL_AXES)


def _short_reason(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


@dataclass
class _RawImage:
    """Data as stored, before axes are squeezed, checked and reordered."""

    data: np.ndarray
    axes: str  # one letter per data axis, tifffile's convention
    spacing: dict[str, float]  # spatial axis letter -> voxel size in `unit`
    unit: str | None
    rgb_like: bool = False  # the 'S' axis holds colour samples (RGB, RGBA, ...)


def voxel_size_um(voxel_size: Sequence[float] | None, unit: str | None
                  ) -> tuple[float, ...] | None:
    """``voxel_size`` in micrometres (``unit`` None: already µm); None when it is unknown or
    its unit is not a length."""
    if voxel_size is None:
        return None
    canonical = "um" if unit is None else normalize_unit(unit)
    factor = _UNIT_IN_UM.get(canonical) if canonical else None
    if factor is None:
        return None
    return tuple(float(v) * factor for v in voxel_size)


def normalize_unit(unit: str | None) -> str | None:
    """Canonical spelling of a length unit (``"micron"``, ``"µm"`` -> ``"um"``).

    Returns None for missing units and for ``"pixel"`` (an uncalibrated image).
    """
    if unit is None:
        return None
    text = str(unit).strip()
    if not text or text.lower() in ("pixel", "pixels", "unknown", "none"):
        return None
    return _UNIT_ALIASES.get(text.lower(), _UNIT_ALIASES.get(text, text))
