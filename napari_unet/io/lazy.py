"""Opening big TIFF and Zarr images lazily as dask arrays."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from napari_unet.io.formats import (
    SPATIAL_AXES,
    TIFF_SUFFIXES,
    ImageReadError,
    LoadedImage,
    PathLike,
    _RawImage,
    _short_reason,
    normalize_unit,
)
from napari_unet.io.readers import _finalize, read_image
from napari_unet.io.tiff import _check_tiff_structure, _tiff_calibration, _tifffile_log

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
