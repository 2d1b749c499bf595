"""DICOM: one file or a folder of slices, stacked along the slice normal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from napari_unet.io.formats import SUPPORTED_SUFFIXES, ImageReadError, _RawImage

# --- DICOM ----------------------------------------------------------------------------------


def _read_dicom_file(path: Path) -> _RawImage:
    import pydicom

    dataset = pydicom.dcmread(path)
    if "PixelData" not in dataset:
        raise ImageReadError(f"cannot read {path}: DICOM file holds no pixel data")
    return _stack_dicom([dataset], path)


def _read_dicom_folder(folder: Path) -> _RawImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            dataset = pydicom.dcmread(file)
        except InvalidDicomError:
            try:  # old files without the 128-byte preamble
                dataset = pydicom.dcmread(file, force=True)
            except Exception:  # noqa: BLE001 - not DICOM: skip
                continue
        except Exception:  # noqa: BLE001 - unreadable: skip, like other non-DICOM files
            continue
        if "PixelData" in dataset and "Rows" in dataset:
            datasets.append(dataset)
    if not datasets:
        raise ImageReadError(
            f"cannot read {folder}: no DICOM image files found in the folder "
            f"(supported files: {', '.join(sorted(SUPPORTED_SUFFIXES))})"
        )
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise ImageReadError(
            f"cannot read {folder}: the folder holds {len(series)} DICOM series; "
            "put each series in its own folder"
        )
    return _stack_dicom(datasets, folder)


def _slice_normal(dataset: Any) -> np.ndarray:
    orientation = getattr(dataset, "ImageOrientationPatient", None)
    if orientation is not None and len(orientation) == 6:
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        if np.linalg.norm(normal) > 0:
            return normal / np.linalg.norm(normal)
    return np.array([0.0, 0.0, 1.0])


def _stack_dicom(datasets: list[Any], source: Path) -> _RawImage:
    """Sort slices along the slice normal, stack, rescale to modality values (e.g. HU)."""
    normal = _slice_normal(datasets[0])
    positions: list[float] | None = []
    for ds in datasets:
        position = getattr(ds, "ImagePositionPatient", None)
        if position is None or len(position) != 3:
            positions = None
            break
        positions.append(float(np.dot(np.asarray(position, float), normal)))
    if positions is not None:
        order = np.argsort(positions, kind="stable")
    else:
        numbers = [int(getattr(ds, "InstanceNumber", 0) or 0) for ds in datasets]
        order = np.argsort(numbers, kind="stable")
    datasets = [datasets[i] for i in order]

    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) > 1:
        raise ImageReadError(f"cannot read {source}: DICOM slices differ in size {sorted(shapes)}")

    slopes = [float(getattr(ds, "RescaleSlope", 1) or 1) for ds in datasets]
    intercepts = [float(getattr(ds, "RescaleIntercept", 0) or 0) for ds in datasets]
    planes = [ds.pixel_array for ds in datasets]
    if all(s == 1 for s in slopes) and all(i == 0 for i in intercepts):
        data = np.stack(planes) if len(planes) > 1 else planes[0]
    else:
        rescaled = [p.astype(np.float64) * s + i for p, s, i in zip(planes, slopes, intercepts)]
        data = np.stack(rescaled) if len(rescaled) > 1 else rescaled[0]
        integral = all(float(v).is_integer() for v in slopes + intercepts)
        fits_int16 = data.size == 0 or (data.min() >= -32768 and data.max() <= 32767)
        data = data.astype(np.int16 if integral and fits_int16 else np.float32)

    first = datasets[0]
    samples = int(getattr(first, "SamplesPerPixel", 1) or 1)
    frames = int(getattr(first, "NumberOfFrames", 1) or 1)
    if len(datasets) > 1:
        axes = "ZYX"
    else:
        axes = ("Z" if frames > 1 else "") + "YX"
    if samples > 1:
        axes += "S"

    spacing: dict[str, float] = {}
    pixel_spacing = getattr(first, "PixelSpacing", None)
    if pixel_spacing is not None and len(pixel_spacing) == 2:
        spacing["Y"], spacing["X"] = float(pixel_spacing[0]), float(pixel_spacing[1])
    if positions is not None and len(datasets) > 1:
        steps = np.diff(np.sort(positions))
        if np.any(np.isclose(steps, 0)):
            raise ImageReadError(
                f"cannot read {source}: several DICOM slices share one position "
                "(several acquisitions in one folder?)"
            )
        spacing["Z"] = float(np.median(steps))
    else:
        between = getattr(first, "SpacingBetweenSlices", None) or getattr(
            first, "SliceThickness", None
        )
        if between is not None:
            spacing["Z"] = float(between)
    return _RawImage(data, axes, spacing, "mm" if spacing else None, rgb_like=samples > 1)
