"""npe2 reader, writer and sample-data contributions (thin wrappers around :mod:`napari_unet.io`)."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

from napari_unet._widgets._state import SOURCE_KEY, UNIT_KEY
from napari_unet.io import lazy as io_lazy
from napari_unet.io.formats import SUPPORTED_SUFFIXES, ImageReadError, LoadedImage
from napari_unet.io.lazy import estimated_nbytes, is_zarr_path
from napari_unet.io.omezarr import is_ome_zarr, read_ome_zarr
from napari_unet.io.readers import read_image
from napari_unet.io.units import length_unit
from napari_unet.io.writers import write_labels_tiff

LayerData = tuple[Any, dict[str, Any], str]
#: file names that hold labels rather than intensities
LABEL_NAME = re.compile(r"(label|mask|seg|annot|organs|membranes|ground.?truth|_gt\b)", re.I)


# ----------------------------------------------------------------------------------------------
# reader
# ----------------------------------------------------------------------------------------------

def _is_dicom_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    for child in list(path.iterdir())[:50]:
        if child.suffix.lower() == ".dcm":
            return True
        if child.is_file() and child.suffix == "":
            try:
                with open(child, "rb") as handle:
                    handle.seek(128)
                    if handle.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader: our function for the files and folders :func:`napari_unet.io.read_image` opens."""
    if isinstance(path, list):
        if not path or not all(get_reader(p) for p in path):
            return None
        return read_layers
    p = Path(path)
    if p.is_dir():
        return read_layers if (is_zarr_path(p) or _is_dicom_folder(p)) else None
    return read_layers if p.name.lower().endswith(SUPPORTED_SUFFIXES) else None


def load(path: str | Path) -> LoadedImage:
    """The one place pixels are loaded: files above ``io.LAZY_SIZE_THRESHOLD`` and zarr stores
    open lazily as dask arrays, so opening is instant whatever their size."""
    size = estimated_nbytes(path)
    lazy = is_zarr_path(path) or (size is not None and size > io_lazy.LAZY_SIZE_THRESHOLD)
    return read_image(path, allow_channels=True, lazy=lazy)


def looks_like_labels(name: str, data: Any) -> bool:
    """Integer data whose file name says labels/mask/segmentation."""
    dtype = np.dtype(data.dtype)
    return (np.issubdtype(dtype, np.integer) or dtype == np.bool_) and bool(LABEL_NAME.search(name))


def find_label_map(path: Path) -> Path | None:
    """A ``*label_map.json`` next to a label file naming its ids: ``<name>_label_map.json``, or
    ``<prefix>_label_map.json`` for a prefix of its name (``ct_small_organs.nii.gz`` finds
    ``ct_small_label_map.json``), or ``label_map.json``."""
    stem = _name(path)
    parts = stem.split("_")
    for k in range(len(parts), 0, -1):
        candidate = path.with_name("_".join(parts[:k]) + "_label_map.json")
        if candidate.is_file():
            return candidate
    candidate = path.with_name("label_map.json")
    return candidate if candidate.is_file() else None


def read_label_map(path: Path) -> dict[int, str]:
    """``{"1": "spleen", ...}`` (or a list of names for ids 1, 2, ...) as ``{1: "spleen"}``;
    empty when the file is not such a map."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if isinstance(content, list):
        content = {str(i + 1): name for i, name in enumerate(content)}
    if not isinstance(content, dict):
        return {}
    names = {}
    for key, value in content.items():
        try:
            names[int(key)] = str(value)
        except (TypeError, ValueError):
            continue
    return {k: v for k, v in names.items() if k > 0}


def label_features(names: dict[int, str]) -> dict[str, list[Any]]:
    """A napari labels ``features`` table (``index``, ``name``) for class names by id."""
    ids = [0, *sorted(names)]
    return {"index": ids, "name": ["background", *(names[i] for i in ids[1:])]}


def layer_data(image: LoadedImage, name: str) -> LayerData:
    """napari layer data for an opened image: scale = voxel size, units, labels when labels."""
    kwargs: dict[str, Any] = {"name": name, "metadata": {}}
    if image.voxel_size is not None:
        kwargs["scale"] = tuple(float(v) for v in image.voxel_size)
    if image.unit:
        kwargs["metadata"][UNIT_KEY] = image.unit  # (napari's `units` warns when layers differ)
    if image.path is not None:
        kwargs["metadata"][SOURCE_KEY] = str(image.path)
    data = image.data
    if "C" in image.axes:
        kwargs["channel_axis"] = image.axes.index("C")
        return data, kwargs, "image"
    if looks_like_labels(name, data):
        label_map = find_label_map(Path(image.path)) if image.path is not None else None
        names = read_label_map(label_map) if label_map is not None else {}
        if names:  # class names (e.g. organs) for the Fine-tune dock's New model…
            kwargs["features"] = label_features(names)
        return data, kwargs, "labels"
    return data, kwargs, "image"


def _name(path: Path) -> str:
    name = path.name
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_layers(path: str | list[str]) -> list[LayerData]:
    """Open one path (or several) as napari layers; unreadable files raise one-line errors."""
    paths = path if isinstance(path, list) else [path]
    layers = []
    for item in paths:
        if is_zarr_path(item) and is_ome_zarr(item):
            layers.extend(ome_zarr_layers(Path(item)))
            continue
        image = load(item)
        layers.append(layer_data(image, _name(Path(item))))
    return layers


def ome_zarr_layers(path: Path) -> list[LayerData]:
    """An OME-Zarr image (its pyramid when it has one) and its label images, all lazy, with the
    voxel size of their scale transforms and the class names of their ``image-label``."""
    stem = re.sub(r"(\.ome)?\.zarr$", "", path.name.rstrip("/"), flags=re.I)
    image = load(path)  # level 0, with the checks and axis order of every image
    data, kwargs, kind = layer_data(image, stem)
    pyramid, labels = read_ome_zarr(path)
    if (len(pyramid.levels) > 1 and image.axes == pyramid.axes
            and tuple(image.data.shape) == tuple(pyramid.levels[0].shape)):
        data = pyramid.levels
    layers = [(data, kwargs, kind)]
    for label in labels:
        spatial = [s for s, a in zip(label.scale, label.axes) if a in "ZYX"]
        meta: dict[str, Any] = {SOURCE_KEY: str(path)}
        if label.unit:
            meta[UNIT_KEY] = label.unit
        label_kwargs: dict[str, Any] = {"name": f"{stem} {label.name}", "metadata": meta,
                                        "scale": tuple(spatial)}
        properties = label.metadata.get("image-label", {}).get("properties") or []
        names = {int(p["label-value"]): str(p.get("class", p.get("name", "")))
                 for p in properties if "label-value" in p}
        if names:
            label_kwargs["features"] = label_features(names)
        levels = label.levels if len(label.levels) > 1 else label.levels[0]
        layers.append((levels, label_kwargs, "labels"))
    return layers


# ----------------------------------------------------------------------------------------------
# writer
# ----------------------------------------------------------------------------------------------

def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 writer for a labels layer: calibrated, compressed, atomic TIFF."""
    from napari_unet._widgets._journal import mark_saved_data

    layer_data = data
    data = np.asarray(data)
    if data.ndim not in (2, 3):
        raise ValueError(f"labels must be 2D or 3D to write a TIFF, got {data.ndim} axes")
    if not path.lower().endswith((".tif", ".tiff")):
        path = path + ".tif"
    scale = attributes.get("scale")
    voxel_size = tuple(float(s) for s in scale[-data.ndim:]) if scale is not None else None
    metadata = attributes.get("metadata") or {}
    unit = length_unit(metadata.get(UNIT_KEY), attributes.get("units"))
    written = write_labels_tiff(path, data, voxel_size=voxel_size, unit=unit,
                                input_path=metadata.get(SOURCE_KEY))
    mark_saved_data(layer_data)  # File > Save: the journal of this layer is clean
    return [str(written)]


# ----------------------------------------------------------------------------------------------
# sample data
# ----------------------------------------------------------------------------------------------

#: on a sample's image layer: the sample's key (``nuclei_3d``, ...)
SAMPLE_KEY = "napari_unet_sample"


def _sample(filename: str, name: str, **extra: Any) -> list[LayerData]:
    path = resources.files("napari_unet.sample_data") / filename
    try:
        image = load(Path(str(path)))
    except ImageReadError as err:  # a broken install: say so in napari, in one line
        raise ImageReadError(f"sample {filename} is missing or unreadable: {err}") from err
    data, kwargs, kind = layer_data(image, name)
    kwargs["metadata"][SAMPLE_KEY] = name  # which sample: the Segment dock picks its model
    kwargs.update(extra)
    return [(data, kwargs, kind)]


def sample_em_2d() -> list[LayerData]:
    """2D electron microscopy (ISBI 2012), 512x512."""
    return _sample("em_2d.tif", "em_2d")


def sample_nuclei_2d() -> list[LayerData]:
    """2D fluorescent nuclei (BBBC039), 520x696."""
    return _sample("nuclei_2d.tif", "nuclei_2d")


def sample_nuclei_3d() -> list[LayerData]:
    """3D confocal nuclei, 100^3, anisotropic voxels."""
    return _sample("nuclei_3d.tif", "nuclei_3d")


def sample_cells_3d() -> list[LayerData]:
    """3D membrane-stained cells, 32x200x200."""
    return _sample("cells_3d.tif", "cells_3d")


def sample_ct_small() -> list[LayerData]:
    """Small abdominal CT (Hounsfield units, 3 mm voxels), soft-tissue window."""
    return _sample("ct_small.nii.gz", "ct_small", contrast_limits=(-160.0, 240.0), colormap="gray")
