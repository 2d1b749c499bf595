"""Reading an image file into a :class:`LoadedImage`: the dispatch on suffix and the common checks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from napari_unet.io.dicom import _read_dicom_file, _read_dicom_folder
from napari_unet.io.formats import (
    CHANNEL_AXES,
    CalibrationWarning,
    DICOM_SUFFIXES,
    NIFTI_SUFFIXES,
    PILLOW_SUFFIXES,
    SPATIAL_AXES,
    SUPPORTED_SUFFIXES,
    TIFF_SUFFIXES,
    ImageReadError,
    LoadedImage,
    PathLike,
    _RawImage,
    _short_reason,
    normalize_unit,
)
from napari_unet.io.tiff import _read_tiff

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
    from napari_unet.io.lazy import is_zarr_path, open_lazy  # it reads small files through here

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
            f"image has axes {described}: more than 3 spatial axes, and napari-unet cannot tell "
            "which are Z, time or channels; save it with its axes (ImageJ hyperstack or OME-TIFF, e.g. "
            "tifffile.imwrite(..., metadata={'axes': 'TZYX'})) or as 3D stacks of one time "
            "point and channel"
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

    if np.iscomplexobj(data):
        raise ImageReadError(
            f"cannot read {path}: it holds complex numbers ({data.dtype}); napari-unet segments "
            "real-valued images: save the magnitude (abs) or the real part")
    spatial = [axis for axis in axes if axis in SPATIAL_AXES]
    sizes = _repair_z_spacing(raw, spatial, path)
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


def _repair_z_spacing(raw: _RawImage, spatial: list[str], path: Path) -> list[float | None]:
    """The voxel size per spatial axis; an invalid Z spacing (zero, negative, NaN) next to
    valid Y / X sizes is replaced by the in-plane size, with a :class:`CalibrationWarning`,
    so that the valid calibration is kept."""
    import warnings

    sizes = [raw.spacing.get(axis) for axis in spatial]
    if raw.unit is None or "Z" not in spatial or "Z" not in raw.spacing:
        return sizes
    z = spatial.index("Z")
    in_plane = [s for a, s in zip(spatial, sizes) if a in "YX" and _valid_size(s)]
    if _valid_size(sizes[z]) or len(in_plane) != 2:
        return sizes
    sizes[z] = float(min(in_plane))
    warnings.warn(CalibrationWarning(
        f"{path.name}: the z spacing ({raw.spacing['Z']:g}) is not valid; using the pixel size "
        f"({sizes[z]:g} {raw.unit}) for z: set the real spacing in the file (ImageJ: "
        "Image > Properties)"), stacklevel=3)
    return sizes


def _valid_size(size: float | None) -> bool:
    return size is not None and math.isfinite(size) and size > 0


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
