"""TIFF and OME-TIFF: structure checks, reading, and the calibration stored in the tags or the OME XML."""

from __future__ import annotations

import contextlib
import logging
import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Iterator

import tifffile

from napari_unet.io.formats import (
    _UNIT_IN_UM,
    SPATIAL_AXES,
    ImageReadError,
    _RawImage,
    normalize_unit,
)

# --- TIFF -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _tifffile_log() -> Iterator[list[str]]:
    """Collect tifffile's log messages instead of printing them (they become part of our error)."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("tifffile")
    handler = _Collect(logging.WARNING)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


_TIFF_DAMAGE_HINTS = ("invalid page offset", "truncated")


def _check_tiff_structure(tif: tifffile.TiffFile, path: Path, messages: list[str]) -> None:
    """Refuse a truncated or damaged TIFF before any pixel is read.

    tifffile opens such files with a log message and a series that is shorter than the file
    claims (or pages whose data lie past the end of the file); reading then fails much later
    or silently returns the wrong shape.
    """
    damage = [m for m in messages if any(hint in m.lower() for hint in _TIFF_DAMAGE_HINTS)]
    if damage:
        reason = damage[-1].split("> ", 1)[-1].strip()
        raise ImageReadError(f"cannot read {path}: the TIFF file is truncated or damaged ({reason})")
    size = os.path.getsize(path)
    series = tif.series[0]
    if series.dataoffset is not None:
        end = int(series.dataoffset) + int(series.nbytes)
    else:
        end = 0
        for page in series.pages:
            if page is None:
                continue
            for offset, count in zip(page.dataoffsets, page.databytecounts):
                end = max(end, int(offset) + int(count))
    if end > size:
        raise ImageReadError(
            f"cannot read {path}: the TIFF file is truncated or damaged (its image data end at "
            f"byte {end}, the file has {size} bytes)")


def _read_tiff(path: Path) -> _RawImage:
    with _tifffile_log() as messages, tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ImageReadError(f"cannot read {path}: TIFF holds no image")
        _check_tiff_structure(tif, path, messages)
        series = tif.series[0]
        data = series.asarray()
        axes = series.axes
        page = series.pages[0] if series.pages and series.pages[0] is not None else tif.pages[0]
        spacing, unit = _tiff_calibration(tif, page)
    return _RawImage(data, axes, spacing, unit, rgb_like="S" in axes)


def _tiff_resolution_sizes(page: Any) -> dict[str, float]:
    """Pixel sizes from the X/YResolution tags (pixels per unit), in the file's unit."""
    sizes = {}
    for axis, tag in (("X", "XResolution"), ("Y", "YResolution")):
        if tag in page.tags:
            value = page.tags[tag].value
            numerator, denominator = value if isinstance(value, tuple) else (value, 1)
            if numerator and denominator:
                sizes[axis] = float(denominator) / float(numerator)
    return sizes


def _tiff_calibration(tif: tifffile.TiffFile, page: Any) -> tuple[dict[str, float], str | None]:
    # 1. ImageJ: unit and z spacing in the description, x/y in the resolution tags.
    if tif.is_imagej and tif.imagej_metadata is not None:
        meta = tif.imagej_metadata
        unit = normalize_unit(meta.get("unit"))
        if unit is None:
            return {}, None
        spacing = _tiff_resolution_sizes(page)
        spacing["Z"] = float(meta.get("spacing", 1.0))
        return spacing, unit
    # 2. OME-XML: PhysicalSizeX/Y/Z with per-axis units (default micrometre).
    if tif.is_ome and tif.ome_metadata:
        return _ome_calibration(tif.ome_metadata)
    # 3. tifffile's JSON description (written here for labels ImageJ cannot store).
    if tif.is_shaped and tif.shaped_metadata:
        meta = tif.shaped_metadata[0]
        unit = normalize_unit(meta.get("unit"))
        if unit is None:
            return {}, None
        axes = str(meta.get("axes", ""))
        if "voxel_size" in meta and axes:
            spatial = [axis for axis in axes.upper() if axis in SPATIAL_AXES]
            if len(spatial) == len(meta["voxel_size"]):
                return dict(zip(spatial, map(float, meta["voxel_size"]))), unit
        spacing = _tiff_resolution_sizes(page)
        if "spacing" in meta:
            spacing["Z"] = float(meta["spacing"])
        return spacing, unit
    # 4. Plain TIFF: trust the resolution tags only when given per centimetre (inch values
    # are usually print dpi, meaningless for microscopy).
    if page.resolutionunit == tifffile.RESUNIT.CENTIMETER:
        sizes = _tiff_resolution_sizes(page)
        return {axis: size * _UNIT_IN_UM["cm"] for axis, size in sizes.items()}, "um"
    return {}, None


def _ome_calibration(ome_xml: str) -> tuple[dict[str, float], str | None]:
    root = ElementTree.fromstring(ome_xml)
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return {}, None
    sizes: dict[str, float] = {}
    units: dict[str, str] = {}
    for axis in SPATIAL_AXES:
        value = pixels.get(f"PhysicalSize{axis}")
        if value is not None:
            sizes[axis] = float(value)
            units[axis] = normalize_unit(pixels.get(f"PhysicalSize{axis}Unit", "µm")) or "um"
    if not sizes:
        return {}, None
    # Express every axis in the unit of X (or of the first axis given).
    unit = units.get("X", next(iter(units.values())))
    for axis, axis_unit in units.items():
        if axis_unit != unit:
            if axis_unit not in _UNIT_IN_UM or unit not in _UNIT_IN_UM:
                return {}, None
            sizes[axis] *= _UNIT_IN_UM[axis_unit] / _UNIT_IN_UM[unit]
    return sizes, unit
