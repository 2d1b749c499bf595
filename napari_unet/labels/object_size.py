"""The size of a model's training objects, and post-processing stated relative to it.

A model stores ``object_size`` (see :func:`measure_object_size`): the median equivalent
diameter of its training objects in µm (when the training data had a voxel size) and in
voxels. Post-processing parameters are then fractions of it (``min_size_fraction`` of the
median object volume, seed spacing relative to the radius), so they travel to images of
another resolution instead of being voxel counts of one training set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_unet.labels.membranes import equivalent_diameter


def measure_object_size(labels: Sequence[np.ndarray], voxel_size: Sequence[float] | None = None,
                        *, measured_on: str = "") -> dict[str, Any]:
    """Median object size of instance ``labels`` (all images pooled).

    Returns
    -------
    dict
        ``diameter_voxels`` (equivalent diameter of the median voxel count: disk in 2D, ball
        in 3D), ``diameter_um`` (of the median physical volume; ``None`` without
        ``voxel_size``), ``volume_voxels`` (the median voxel count), ``n_objects``,
        ``measured_on``.
    """
    sizes: list[np.ndarray] = []
    ndim = None
    for image in labels:
        image = np.asarray(image)
        ndim = image.ndim
        counts = np.bincount(image.ravel().astype(np.int64))[1:]
        sizes.append(counts[counts > 0])
    pooled = np.concatenate(sizes) if sizes else np.zeros(0)
    if not len(pooled) or ndim is None:
        raise ValueError("no objects to measure")
    median = float(np.median(pooled))
    diameter_um = None
    if voxel_size is not None:
        if len(voxel_size) != ndim:
            raise ValueError(f"voxel size {tuple(voxel_size)} does not fit {ndim}D labels")
        diameter_um = round(equivalent_diameter(median * float(np.prod(voxel_size)), ndim), 4)
    return {"diameter_um": diameter_um,
            "diameter_voxels": round(equivalent_diameter(median, ndim), 3),
            "volume_voxels": median, "n_objects": int(len(pooled)), "measured_on": measured_on}


def median_volume(object_size: dict[str, Any] | None, voxel_size: Sequence[float] | None,
                  model_voxel_size: Sequence[float] | None = None) -> float | None:
    """The training objects' median volume in voxels of an image with ``voxel_size``.

    With both the image's voxel size and the diameter in µm it is the physical volume over the
    voxel volume (objects keep their physical size); else the training voxel count."""
    if not object_size:
        return None
    volume = object_size.get("volume_voxels")
    diameter_um = object_size.get("diameter_um")
    if voxel_size is not None and diameter_um and model_voxel_size is not None:
        ndim = len(voxel_size)
        if ndim == 2:
            physical = np.pi / 4 * diameter_um ** 2
        else:
            physical = np.pi / 6 * diameter_um ** 3
        return float(physical / float(np.prod(voxel_size)))
    return None if volume is None else float(volume)


def object_radius(object_size: dict[str, Any] | None, sampling: Sequence[float] | None,
                  model_voxel_size: Sequence[float] | None = None) -> float | None:
    """The training objects' median radius in the units of ``sampling`` (voxels without it).

    In µm when both the image and the model have a voxel size; otherwise the training voxel
    count's radius, scaled by the voxel volume of ``sampling`` (so anisotropy is respected and
    the volume kept)."""
    if not object_size or not object_size.get("diameter_voxels"):
        return None
    if sampling is not None and object_size.get("diameter_um") and model_voxel_size is not None:
        return float(object_size["diameter_um"]) / 2
    radius = float(object_size["diameter_voxels"]) / 2
    if sampling is not None:
        radius *= float(np.prod(sampling)) ** (1 / len(sampling))
    return radius
