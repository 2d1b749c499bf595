"""Reading images and writing results, without any GUI dependency.

:func:`read_image` opens TIFF / OME-TIFF (tifffile), PNG / JPEG (Pillow), NIfTI (nibabel) and
DICOM series (a folder of files, pydicom) and returns a :class:`LoadedImage`: the pixel data with
singleton axes removed, spatial axes in ``Z, Y, X`` order, and the voxel size when the file
records one. Images with a time axis, several channels (unless ``allow_channels=True``) or more
than three spatial axes are refused with an :class:`ImageReadError` that names the axes found.

:func:`write_labels_tiff` and :func:`write_tiff_atomic` write ImageJ-compatible TIFFs (Fiji and
napari read the voxel size back) through :func:`atomic_write`: the data goes to a temporary file
in the destination folder, which replaces the destination only once it is complete, so a failed
or interrupted write never leaves a truncated file nor touches an existing one. Writing over the
input image is refused.

nibabel, pydicom and Pillow are imported only when a file of their kind is read.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import tempfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tifffile

__all__ = [
    "ImageReadError",
    "LoadedImage",
    "OutputPathError",
    "check_output_path",
    "SUPPORTED_SUFFIXES",
    "atomic_write",
    "read_image",
    "smallest_label_dtype",
    "write_image_tiff",
    "write_labels_tiff",
    "write_tiff_atomic",
    "LAZY_SIZE_THRESHOLD",
    "estimated_nbytes",
    "is_zarr_path",
    "open_lazy",
]

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


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def read_image(path: PathLike, *, allow_channels: bool = False, lazy: bool = False) -> LoadedImage:
    """Open an image file, or a folder holding one DICOM series.

    Parameters
    ----------
    path : str or os.PathLike
        ``.tif``, ``.tiff``, ``.ome.tif``, ``.ome.tiff``, ``.png``, ``.jpg``, ``.jpeg``,
        ``.nii``, ``.nii.gz``, ``.dcm``, or a folder of DICOM files.
    allow_channels : bool
        Keep a channel axis (``C`` or RGB samples ``S``) of length > 1, moved first and named
        ``C``. By default such images are refused, since the models take one channel.
    lazy : bool
        Return a dask array that reads on demand (see :func:`open_lazy`) instead of numpy.
        Zarr / OME-Zarr folders are read as well, lazily or not.

    Returns
    -------
    LoadedImage

    Raises
    ------
    ImageReadError
        The file is missing, of an unsupported type, unreadable, or has axes the models cannot
        take (time series; several channels unless ``allow_channels``; > 3 spatial axes).
    """
    path = Path(path).expanduser()
    if lazy or is_zarr_path(path):
        image = open_lazy(path, allow_channels=allow_channels)
        if not lazy:
            image.data = np.ascontiguousarray(image.data.compute())
        return image
    if not path.exists():
        raise ImageReadError(f"file not found: {path}")
    if path.is_dir():
        reader: Callable[[Path], _RawImage] = _read_dicom_folder
    else:
        reader = _reader_for_suffix(path)
    try:
        raw = reader(path)
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - every library failure becomes one clear message
        raise ImageReadError(f"cannot read {path}: {_short_reason(exc)}") from exc
    return _finalize(raw, path, allow_channels=allow_channels)


def _reader_for_suffix(path: Path) -> Callable[[Path], _RawImage]:
    name = path.name.lower()
    if name.endswith(TIFF_SUFFIXES):
        return _read_tiff
    if name.endswith(PILLOW_SUFFIXES):
        return _read_with_pillow
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti
    if name.endswith(DICOM_SUFFIXES):
        return _read_dicom_file
    suffix = "".join(path.suffixes[-2:]) if name.endswith(".gz") else path.suffix
    shown = f"'{suffix}'" if suffix else "(no extension)"
    raise ImageReadError(
        f"unsupported file type {shown} for {path.name} "
        f"(supported: {', '.join(sorted(SUPPORTED_SUFFIXES))}, or a folder of DICOM files)"
    )


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


def _finalize(raw: _RawImage, path: Path, *, allow_channels: bool) -> LoadedImage:
    """Squeeze singleton axes, refuse unsupported axes, order axes as (C,) (Z,) Y, X."""
    data, axes = raw.data, raw.axes.upper()
    if data.ndim != len(axes):
        raise ImageReadError(f"cannot read {path}: axes '{axes}' do not match shape {data.shape}")
    if "Y" not in axes or "X" not in axes:
        raise ImageReadError(f"cannot read {path}: no Y and X axes found (axes {axes})")

    keep = [i for i, axis in enumerate(axes) if data.shape[i] > 1 or axis in "YX"]
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    described = _describe_axes(axes, data.shape, raw.rgb_like)

    # A stack of pages of unknown meaning (tifffile: I, Q, ...) is taken as Z when Z is absent.
    unknown = [axis for axis in axes if axis not in SPATIAL_AXES + CHANNEL_AXES + "T"]
    if len(unknown) == 1 and "Z" not in axes:
        axes = axes.replace(unknown[0], "Z")
        unknown = []

    if "T" in axes:
        raise ImageReadError(
            f"image has axes {described}: time series are not supported; open one time point"
        )
    if unknown:
        raise ImageReadError(
            f"image has axes {described}: more than 3 spatial axes are not supported"
        )
    channel_axes = [axis for axis in axes if axis in CHANNEL_AXES]
    if len(channel_axes) > 1:
        raise ImageReadError(
            f"image has axes {described}: more than one channel axis is not supported; "
            "pick one channel"
        )
    if channel_axes and not allow_channels:
        raise ImageReadError(
            f"image has axes {described}; napari-unet models take one channel: "
            "convert to grayscale or pick a channel"
        )

    order = [axes.index(axis) for axis in channel_axes + [a for a in SPATIAL_AXES if a in axes]]
    data = data.transpose(order)
    if isinstance(data, np.ndarray):  # lazy (dask) data stays lazy
        data = np.ascontiguousarray(data)
    axes = "".join("C" if axes[i] in CHANNEL_AXES else axes[i] for i in order)

    spatial = [axis for axis in axes if axis in SPATIAL_AXES]
    sizes = [raw.spacing.get(axis) for axis in spatial]
    voxel_size: tuple[float, ...] | None = None
    if raw.unit is not None and all(_valid_size(size) for size in sizes):
        voxel_size = tuple(float(size) for size in sizes)  # type: ignore[arg-type]
    return LoadedImage(
        data=data,
        axes=axes,
        voxel_size=voxel_size,
        unit=raw.unit if voxel_size is not None else None,
        path=path,
    )


def _describe_axes(axes: str, shape: Sequence[int], rgb_like: bool) -> str:
    """E.g. ``"TZYX (T=5, Z=10, Y=64, X=64)"`` or ``"YXS (RGB, 3 samples)"``."""
    if rgb_like and axes.endswith("S") and axes.count("S") == 1:
        samples = shape[axes.index("S")]
        kind = {2: "gray + alpha", 3: "RGB", 4: "RGBA"}.get(samples, "colour")
        others = [f"{a}={n}" for a, n in zip(axes, shape) if a not in "SYX"]
        extra = f", {', '.join(others)}" if others else ""
        return f"{axes} ({kind}, {samples} samples{extra})"
    return f"{axes} ({', '.join(f'{a}={n}' for a, n in zip(axes, shape))})"


def _valid_size(size: float | None) -> bool:
    return size is not None and math.isfinite(size) and size > 0


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


# --- PNG / JPEG -----------------------------------------------------------------------------


def _read_with_pillow(path: Path) -> _RawImage:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        if image.mode == "P":
            has_alpha = "transparency" in image.info
            image = image.convert("RGBA" if has_alpha else "RGB")
            rgb = np.asarray(image)
            if not has_alpha and (rgb[..., 0] == rgb[..., 1]).all() and (
                rgb[..., 1] == rgb[..., 2]
            ).all():
                return _RawImage(np.ascontiguousarray(rgb[..., 0]), "YX", {}, None)
        elif image.mode == "1":
            image = image.convert("L")
        data = np.asarray(image)
    if data.ndim == 2:
        return _RawImage(data, "YX", {}, None)
    return _RawImage(data, "YXS", {}, None, rgb_like=True)


# --- NIfTI ----------------------------------------------------------------------------------


def _read_nifti(path: Path) -> _RawImage:
    import nibabel

    image = nibabel.load(str(path))
    proxy = image.dataobj
    slope = getattr(proxy, "slope", 1.0)
    intercept = getattr(proxy, "inter", 0.0)
    if (slope == 1 or not np.isfinite(slope)) and (intercept == 0 or not np.isfinite(intercept)):
        data = np.asarray(proxy)  # stored dtype (e.g. int16 Hounsfield units)
    else:
        data = image.get_fdata(dtype=np.float32)
    # nibabel orders axes x, y, z, t, then vector components; _finalize reverses x/y/z.
    axes = "XYZTC"[: data.ndim] if data.ndim <= 5 else "XYZTC" + "Q" * (data.ndim - 5)
    zooms = image.header.get_zooms()
    spacing = {axis: float(zoom) for axis, zoom in zip("XYZ", zooms[:3])}
    header = image.header
    space_unit = header.get_xyzt_units()[0] if hasattr(header, "get_xyzt_units") else None
    unit = normalize_unit(space_unit) or "mm"  # NIfTI's unit when the header leaves it unknown
    return _RawImage(data, axes, spacing, unit)


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


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _current_umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def atomic_write(path: PathLike, write_fn: Callable[[Path], None]) -> Path:
    """Write a file through a temporary file in the same folder, then rename it into place.

    Parameters
    ----------
    path : str or os.PathLike
        Destination. Its folder must exist.
    write_fn : callable
        Called with the temporary path; must write the complete file there.

    Returns
    -------
    pathlib.Path
        The destination path.

    Notes
    -----
    On any exception (including KeyboardInterrupt) the temporary file is removed and the
    exception re-raised; an existing file at ``path`` is left untouched. The new file gets the
    permissions of the file it replaces, or the usual ``0o666 & ~umask``.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "it is a folder", str(path))
    ome = path.name.lower().endswith((".ome.tif", ".ome.tiff"))
    suffix = "".join(path.suffixes[-2:]) if ome else path.suffix
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix)
    except OSError as err:
        raise _os_error_for(err, path) from err
    tmp = Path(tmp_name)
    try:
        os.close(fd)
        write_fn(tmp)
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_current_umask()
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(err, OSError):
            raise _os_error_for(err, path) from err
        raise
    return path


def _os_error_for(err: OSError, path: Path) -> OSError:
    """The same kind of error, about ``path`` (the user's file) instead of a temporary file."""
    if err.errno is None:
        return OSError(f"cannot write {path}: {err}")
    return OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))


def _probe_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``: the surest test that writing there works."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".napari-unet-probe.")
    os.close(fd)
    os.unlink(name)


def check_output_path(path: PathLike, *, create_parent: bool = False, folder: bool = False) -> Path:
    """Check before a long computation that ``path`` can be written; returns it expanded.

    Parameters
    ----------
    path : str or os.PathLike
        The output the user asked for.
    create_parent : bool
        Missing parent folders will be created (their nearest existing ancestor must be a
        writable folder); otherwise the parent folder must exist.
    folder : bool
        The output is a folder (zarr store, batch output): an existing folder is fine, an
        existing file is not. Otherwise an existing folder is refused.

    Raises
    ------
    OutputPathError
        One line naming ``path``: it is a folder (or a file, for ``folder=True``), its folder
        does not exist, a parent is a file, or the folder cannot be written (permissions, a
        read-only file system).
    """
    path = Path(path).expanduser()
    if path.is_dir() and not folder:
        raise OutputPathError(f"cannot write {path}: it is a folder; give a file name")
    if folder and path.exists() and not path.is_dir():
        raise OutputPathError(f"cannot write {path}: a file of that name exists (expected a folder)")
    parent = path.parent
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot write {path}: {ancestor} is a file, not a folder")
    if ancestor != parent and not create_parent:
        raise OutputPathError(f"cannot write {path}: the folder {parent} does not exist")
    target = path if folder and path.is_dir() else ancestor
    try:
        _probe_writable(target)
    except OSError as err:
        reason = err.strerror or str(err)
        raise OutputPathError(f"cannot write {path}: {reason} ({target})") from None
    return path


def _refuse_input_overwrite(path: Path, input_path: PathLike | None) -> None:
    if input_path is None:
        return
    input_path = Path(input_path).expanduser()
    same = False
    try:
        same = os.path.samefile(path, input_path)
    except OSError:  # one of them does not exist (yet)
        pass
    if same or path.resolve() == input_path.resolve():
        raise ValueError(
            f"refusing to overwrite the input image {input_path}: choose another output file"
        )


def _check_voxel_size(
    voxel_size: Sequence[float] | None, n_spatial: int
) -> tuple[float, ...] | None:
    if voxel_size is None:
        return None
    sizes = tuple(float(v) for v in voxel_size)
    if len(sizes) != n_spatial:
        raise ValueError(
            f"voxel_size has {len(sizes)} values but the data has {n_spatial} spatial axes"
        )
    if not all(_valid_size(v) for v in sizes):
        raise ValueError(f"voxel_size must be positive and finite, got {sizes}")
    return sizes


def _default_axes(ndim: int) -> str:
    if ndim == 2:
        return "YX"
    if ndim == 3:
        return "ZYX"
    raise ValueError(f"data must be 2D (YX) or 3D (ZYX), got {ndim} dimensions; pass axes=")


def _imagej_compatible(data: np.ndarray) -> np.ndarray:
    """Cast to a dtype ImageJ stores (uint8, uint16, float32) without changing values."""
    if data.dtype in IMAGEJ_DTYPES:
        return data
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.floating):
        return data.astype(np.float32)
    if np.issubdtype(data.dtype, np.integer):
        low = int(data.min()) if data.size else 0
        high = int(data.max()) if data.size else 0
        for dtype in (np.uint8, np.uint16):
            info = np.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return data.astype(dtype)
        if -(2**24) <= low and high <= 2**24:  # float32 holds these integers exactly
            return data.astype(np.float32)
    raise ValueError(
        f"ImageJ TIFF cannot store {data.dtype} values in [{data.min()}, {data.max()}]; "
        "pass imagej=False"
    )


def write_tiff_atomic(
    path: PathLike,
    data: np.ndarray,
    *,
    voxel_size: Sequence[float] | None = None,
    unit: str = "um",
    input_path: PathLike | None = None,
    compression: str | None = "zlib",
    imagej: bool = True,
    axes: str | None = None,
) -> Path:
    """Write an array as a calibrated TIFF, atomically (see :func:`atomic_write`).

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    data : numpy.ndarray
        ``(Y, X)`` or ``(Z, Y, X)``; with ``axes`` also ``"CYX"`` / ``"CZYX"``. Never modified.
    voxel_size : sequence of float, optional
        One size per spatial axis (``(z, y, x)`` or ``(y, x)``), in ``unit``.
    unit : str
        Length unit of ``voxel_size``, e.g. ``"um"`` or ``"mm"``.
    input_path : str or os.PathLike, optional
        The image the data came from: writing to it is refused.
    compression : str or None
        tifffile compression (``"zlib"`` is read by Fiji, napari and tifffile); None for none.
    imagej : bool
        Write an ImageJ hyperstack (uint8, uint16 or float32; other dtypes are cast when the
        values fit, else ValueError). Otherwise a plain TIFF with the calibration in tifffile's
        JSON description and the resolution tags, read back by :func:`read_image`.
    axes : str, optional
        Axes of ``data``: ``"YX"``, ``"ZYX"``, ``"CYX"`` or ``"CZYX"``; default from ``ndim``.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    ValueError
        ``path`` is the input image; bad ``voxel_size``, ``axes`` or dtype.
    """
    path = Path(path).expanduser()
    _refuse_input_overwrite(path, input_path)
    data = np.asarray(data)
    axes = (axes or _default_axes(data.ndim)).upper()
    if axes not in ("YX", "ZYX", "CYX", "CZYX") or len(axes) != data.ndim:
        raise ValueError(
            f"axes must be YX, ZYX, CYX or CZYX matching data {data.shape}, got {axes!r}"
        )
    spatial = axes.replace("C", "")
    sizes = _check_voxel_size(voxel_size, len(spatial))
    unit_name = normalize_unit(unit) or "um"

    resolution_kwargs: dict[str, Any] = {}
    if sizes is not None:
        # tifffile's resolution is (X, Y) in pixels per unit.
        resolution_kwargs = {
            "resolution": (1.0 / sizes[-1], 1.0 / sizes[-2]),
            "resolutionunit": "NONE",
        }

    if imagej:
        out = _imagej_compatible(data)
        out_axes = axes
        if axes == "CZYX":  # ImageJ orders hyperstacks TZCYXS
            out = out.transpose(1, 0, 2, 3)
            out_axes = "ZCYX"
        metadata: dict[str, Any] = {"axes": out_axes}
        if sizes is not None:
            metadata["unit"] = unit_name
            if "Z" in spatial:
                metadata["spacing"] = sizes[0]
        writer_kwargs: dict[str, Any] = {"imagej": True, "metadata": metadata}
    else:
        out = data
        metadata = {"axes": axes}
        if sizes is not None:
            metadata.update(unit=unit_name, voxel_size=list(sizes))
            if "Z" in spatial:
                metadata["spacing"] = sizes[0]
        writer_kwargs = {"metadata": metadata, "bigtiff": out.nbytes > 2**31}

    def write(tmp: Path) -> None:
        tifffile.imwrite(
            tmp,
            out,
            photometric="minisblack",
            compression=compression,
            **resolution_kwargs,
            **writer_kwargs,
        )

    return atomic_write(path, write)


def write_image_tiff(
    path: PathLike,
    image: np.ndarray,
    *,
    voxel_size: Sequence[float] | None = None,
    unit: str = "um",
    input_path: PathLike | None = None,
    compression: str | None = "zlib",
    axes: str | None = None,
) -> Path:
    """Write an intensity image or probability map (float32 or uint8) as an ImageJ TIFF.

    float64/float16 are stored as float32. See :func:`write_tiff_atomic` for the parameters.
    """
    return write_tiff_atomic(
        path,
        image,
        voxel_size=voxel_size,
        unit=unit,
        input_path=input_path,
        compression=compression,
        imagej=True,
        axes=axes,
    )


def smallest_label_dtype(max_label: int) -> np.dtype:
    """The smallest unsigned integer dtype holding labels ``0..max_label``.

    Parameters
    ----------
    max_label : int
        Largest label value (>= 0).

    Returns
    -------
    numpy.dtype
        uint8, uint16, uint32 or uint64.
    """
    max_label = int(max_label)
    if max_label < 0:
        raise ValueError(f"labels must be >= 0, got max label {max_label}")
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"max label {max_label} does not fit in uint64")


def write_labels_tiff(
    path: PathLike,
    labels: np.ndarray,
    *,
    voxel_size: Sequence[float] | None = None,
    unit: str = "um",
    input_path: PathLike | None = None,
    compression: str | None = "zlib",
) -> Path:
    """Write a label image as a compressed TIFF in the smallest dtype that fits.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    labels : numpy.ndarray
        ``(Y, X)`` or ``(Z, Y, X)`` non-negative integers (or bool). Never modified.
    voxel_size, unit, input_path, compression
        As in :func:`write_tiff_atomic`.

    Returns
    -------
    pathlib.Path
        The written file.

    Notes
    -----
    Labels up to 65535 are written as an ImageJ hyperstack (uint8 or uint16), opened
    calibrated by Fiji and napari. ImageJ cannot store uint32/uint64, so larger labels go to a
    plain TIFF holding the same calibration in its resolution tags and tifffile's JSON
    description: :func:`read_image`, tifffile and napari read it back, Fiji (Bio-Formats) reads
    the pixels but may not show the z spacing.
    """
    labels = np.asarray(labels)
    if labels.dtype != np.bool_ and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got minimum {labels.min()}")
    max_label = int(labels.max()) if labels.size else 0
    dtype = smallest_label_dtype(max_label)
    return write_tiff_atomic(
        path,
        labels.astype(dtype, copy=False),  # a new array whenever the dtype changes
        voxel_size=voxel_size,
        unit=unit,
        input_path=input_path,
        compression=compression,
        imagej=dtype in IMAGEJ_DTYPES,
    )


# --------------------------------------------------------------------------------------------
# lazy opening (big data)
# --------------------------------------------------------------------------------------------

#: Images larger than this (uncompressed bytes) are best opened with :func:`open_lazy`.
LAZY_SIZE_THRESHOLD = 1 << 30

_OME_AXIS_LETTERS = {"t": "T", "c": "C", "z": "Z", "y": "Y", "x": "X"}


def is_zarr_path(path: PathLike) -> bool:
    """Whether ``path`` is a zarr store (v2 or v3 array/group folder, or a ``.zarr`` folder)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return False
    if path.suffix.lower() == ".zarr":
        return True
    return any((path / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup"))


def estimated_nbytes(path: PathLike) -> int | None:
    """Uncompressed size of the image at ``path`` without reading pixels (TIFF, zarr); else None."""
    path = Path(path).expanduser()
    try:
        if is_zarr_path(path):
            array, _, _, _ = _open_zarr_array(path)
            return int(math.prod(array.shape)) * np.dtype(array.dtype).itemsize
        if path.is_file() and path.name.lower().endswith(TIFF_SUFFIXES):
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                return int(math.prod(series.shape)) * np.dtype(series.dtype).itemsize
    except Exception:  # noqa: BLE001 - unknown size: let the caller decide
        return None
    return None


def open_lazy(path: PathLike, *, allow_channels: bool = False) -> LoadedImage:
    """Open an image without reading its pixels: ``data`` is a dask array read on demand.

    TIFF / OME-TIFF files are read through tifffile's zarr store (tiles or pages on demand),
    zarr arrays, zarr groups and OME-Zarr images (level 0 of the multiscale pyramid, with the
    voxel size of its scale transform) through zarr. Other formats are read into memory and
    wrapped. Axes, squeezing, checks and the voxel size follow :func:`read_image`.

    Raises
    ------
    ImageReadError
        As :func:`read_image`.
    """
    import dask.array as da

    path = Path(path).expanduser()
    if not path.exists():
        raise ImageReadError(f"file not found: {path}")
    try:
        if is_zarr_path(path):
            array, axes, spacing, unit = _open_zarr_array(path)
            data = da.from_zarr(array)
            raw = _RawImage(data, axes, spacing, unit, rgb_like=False)
        elif path.is_file() and path.name.lower().endswith(TIFF_SUFFIXES):
            raw = _open_tiff_lazy(path)
        else:
            eager = read_image(path, allow_channels=allow_channels)
            eager.data = da.from_array(eager.data, chunks="auto")
            return eager
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - every library failure becomes one clear message
        raise ImageReadError(f"cannot read {path}: {_short_reason(exc)}") from exc
    if raw.data.ndim == len(raw.axes):
        # drop singleton axes by indexing, which keeps the dask chunks as they are
        keep = [n > 1 or a.upper() in "YX" for a, n in zip(raw.axes, raw.data.shape)]
        if not all(keep):
            raw.data = raw.data[tuple(slice(None) if k else 0 for k in keep)]
            raw.axes = "".join(a for a, k in zip(raw.axes, keep) if k)
    return _finalize(raw, path, allow_channels=allow_channels)


def _open_tiff_lazy(path: Path) -> _RawImage:
    import dask.array as da
    import zarr

    with _tifffile_log() as messages, tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ImageReadError(f"cannot read {path}: TIFF holds no image")
        _check_tiff_structure(tif, path, messages)
        series = tif.series[0]
        axes = series.axes
        page = series.pages[0] if series.pages and series.pages[0] is not None else tif.pages[0]
        spacing, unit = _tiff_calibration(tif, page)
    with _tifffile_log():
        store = tifffile.imread(path, aszarr=True, series=0, level=0)
    array = zarr.open(store, mode="r")
    if not hasattr(array, "shape"):  # a pyramid: level 0
        array = array["0"]
    return _RawImage(da.from_zarr(array), axes, spacing, unit, rgb_like="S" in axes)


def _open_zarr_array(path: Path) -> tuple[Any, str, dict[str, float], str | None]:
    """(zarr array, tifffile-style axes, spacing per axis letter, unit) of a zarr store."""
    import zarr

    node = zarr.open(str(path), mode="r")
    spacing: dict[str, float] = {}
    unit: str | None = None
    if hasattr(node, "shape"):  # a plain array
        array = node
        attrs = dict(array.attrs)
        axes = _zarr_array_axes(array, attrs)
        spacing, unit = _attrs_calibration(attrs, axes)
        return array, axes, spacing, unit
    attrs = dict(node.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if multiscales:
        image = multiscales[0]
        dataset = image["datasets"][0]
        array = node[dataset["path"]]
        ome_axes = image.get("axes")
        if ome_axes:
            names = [a["name"] if isinstance(a, dict) else str(a) for a in ome_axes]
            axes = "".join(_OME_AXIS_LETTERS.get(n.lower(), "Q") for n in names)
            units = {_OME_AXIS_LETTERS.get(a.get("name", "").lower(), "Q"): a.get("unit")
                     for a in ome_axes if isinstance(a, dict)}
        else:
            axes = _default_lazy_axes(array.ndim)
            units = {}
        scale = [1.0] * array.ndim
        for transforms in (dataset.get("coordinateTransformations", []),
                           image.get("coordinateTransformations", [])):
            for transform in transforms:
                if transform.get("type") == "scale":
                    scale = [s * float(v) for s, v in zip(scale, transform["scale"])]
        spatial_units = {normalize_unit(units.get(a)) for a in axes if a in SPATIAL_AXES}
        if len(spatial_units) == 1 and None not in spatial_units:
            unit = spatial_units.pop()
            spacing = {a: s for a, s in zip(axes, scale) if a in SPATIAL_AXES}
        return array, axes, spacing, unit
    # a plain group, e.g. a streamed prediction: its main array, else its only array
    names = sorted(name for name, _ in node.arrays())
    preferred = attrs.get("napari_unet", {}).get("output")
    if preferred not in names:
        public = [n for n in names if not n.startswith("_")]
        if len(public) != 1:
            raise ImageReadError(
                f"cannot read {path}: the zarr group holds arrays {public or names}; "
                "open one of them (e.g. {path}/<name>)")
        preferred = public[0]
    array = node[preferred]
    array_attrs = {**attrs, **dict(array.attrs)}
    axes = _zarr_array_axes(array, array_attrs)
    spacing, unit = _attrs_calibration(array_attrs, axes)
    return array, axes, spacing, unit


def _default_lazy_axes(ndim: int) -> str:
    return {2: "YX", 3: "ZYX", 4: "CZYX", 5: "TCZYX"}.get(ndim, "Q" * (ndim - 2) + "YX")


def _zarr_array_axes(array: Any, attrs: dict[str, Any]) -> str:
    names = attrs.get("axes") or attrs.get("_ARRAY_DIMENSIONS")
    if not names:
        names = getattr(getattr(array, "metadata", None), "dimension_names", None)
    if names and len(names) == array.ndim and all(names):
        if isinstance(names, str):
            return names.upper()
        return "".join(_OME_AXIS_LETTERS.get(str(n).lower(), str(n).upper()[:1]) for n in names)
    return _default_lazy_axes(array.ndim)


def _attrs_calibration(attrs: dict[str, Any], axes: str) -> tuple[dict[str, float], str | None]:
    """``voxel_size`` (per spatial axis) and ``unit`` attributes, as written by napari-unet."""
    sizes, unit = attrs.get("voxel_size"), normalize_unit(attrs.get("unit"))
    spatial = [a for a in axes if a in SPATIAL_AXES]
    if sizes is None or unit is None or len(sizes) != len(spatial):
        return {}, None
    return dict(zip(spatial, map(float, sizes))), unit
