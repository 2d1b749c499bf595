"""The OME-Zarr layout of a streamed output (``.ome.zarr``): the input image at the root, the
labels under ``labels/``, and the pyramids, built when the last tile is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Generator

from napari_unet.bigdata.store import ATTRS_KEY, _set_state, local_dask, stored_plan
from napari_unet.io.omezarr import (
    LABELS_GROUP,
    build_pyramid,
    copy_chunked,
    write_label_metadata,
)
from napari_unet.progress import Progress


def needs_ome_pyramids(group: Any) -> bool:
    """Whether ``group`` is an OME-Zarr output whose image and pyramids are still to write."""
    return dict(group.attrs[ATTRS_KEY]).get("ome") == "pending"


def write_ome_pyramids(group: Any, image: Any) -> Generator[Progress, None, None]:
    """Copy ``image`` (the input) to the root as level 0, build the image and label pyramids a
    chunk at a time, and write the NGFF metadata; done again from the start if interrupted."""
    info = dict(group.attrs[ATTRS_KEY])
    attrs = dict(group.attrs)
    voxel_size, unit = attrs.get("voxel_size"), attrs.get("unit")
    plan = stored_plan(group)
    spatial_axes = str(info["axes"])
    channels = image.ndim > len(plan.spatial)
    axes = ("C" if channels else "") + spatial_axes
    chunks = ((int(image.shape[0]),) if channels else ()) + tuple(int(c) for c in plan.core)
    base = group.create_array("0", shape=tuple(int(n) for n in image.shape), chunks=chunks,
                              dtype=image.dtype, fill_value=0, overwrite=True,
                              dimension_names=[a.lower() for a in axes])
    with local_dask():
        yield from copy_chunked(image, base, "copying the image into the OME-Zarr")
    yield from build_pyramid(group, axes=axes, voxel_size=voxel_size, unit=unit, labels=False,
                             name=Path(info["input"]).name if info.get("input") else "image")
    class_names = list(info.get("class_names") or [])
    for name, path in info.get("paths", {}).items():
        if path not in group:
            continue
        yield from build_pyramid(group[f"{LABELS_GROUP}/{name}"], axes=spatial_axes,
                                 voxel_size=voxel_size, unit=unit, labels=True, name=name)
        classes = None
        if name == "labels" and info.get("task") == "semantic":
            classes = {i: n for i, n in enumerate(class_names) if i > 0}
        write_label_metadata(group, name, classes)
    _set_state(group, ome="done")
