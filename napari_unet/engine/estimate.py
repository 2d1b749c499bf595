"""A quick estimate of an image's object size: the model's own objects on a central crop."""

from __future__ import annotations

from typing import Any, Generator, Sequence

import numpy as np

from napari_unet.engine.predict import segment
from napari_unet.engine.resample import scale_for_model
from napari_unet.labels.object_size import measure_object_size
from napari_unet.progress import Progress

#: largest crop side (y, x) and depth (z of a 3D model) of the estimate
CROP_SIDE, CROP_DEPTH = 384, 48
#: a second pass runs when the first one's zoom is further from 1 than this
REFINE_BEYOND = 0.2
#: an estimate this close to the model's own size is not worth resampling for: training
#: objects vary as much, and resampling blurs (nuclei-3d lost F1 0.93 -> 0.76 when zoomed by
#: 0.88 to its estimate, ``bench_generalize.py --zoom auto``)
AUTO_TOLERANCE = 0.25


def central_crop(image: Any, model: Any) -> np.ndarray:
    """The centre of ``image`` (spatial axes; a 2D model on a stack: its middle slice)."""
    channels = 1 if model.config.in_channels > 1 else 0
    spatial = tuple(image.shape[channels:])
    index: list[Any] = [slice(None)] * channels
    if model.spatial_dims == 2 and len(spatial) == 3:
        index.append(spatial[0] // 2)
        spatial = spatial[1:]
    limits = (CROP_DEPTH, CROP_SIDE, CROP_SIDE)[-len(spatial):]
    for n, limit in zip(spatial, limits):
        start = max(0, (n - limit) // 2)
        index.append(slice(start, start + min(n, limit)))
    return np.asarray(image[tuple(index)])


def _quiet(job: Generator[Progress, None, Any], message: str) -> Generator[Progress, None, Any]:
    """``job``'s steps without their regions (they are the crop's, not the image's)."""
    while True:
        try:
            update = next(job)
        except StopIteration as stop:
            return stop.value
        yield Progress(update.done, update.total, update.elapsed, message=message,
                       stage="estimate")


def _median_diameter(labels: np.ndarray) -> float | None:
    try:
        return float(measure_object_size([labels])["diameter_voxels"])
    except ValueError:  # no objects
        return None


def estimate_object_size(image: Any, model: Any, *, voxel_size: Sequence[float] | None = None,
                         **predict_options: Any) -> Generator[Progress, None, float]:
    """The median equivalent diameter, in voxels, of the objects ``model`` finds in the centre
    of ``image`` (:func:`central_crop`), as ``predict --object-size auto`` and the Segment
    dock's *Estimate* use it.

    A first pass runs at the model's own size; when its objects are far from the model's
    training size, a second pass runs zoomed to the size found and measures again (a model
    finds objects of other sizes less reliably). Raises ``ValueError`` when the model makes no
    instances (a semantic model) or finds no object.
    """
    if model.task == "semantic":
        raise ValueError("a semantic model makes no objects to estimate their size from")
    if not getattr(model, "object_size", None):
        raise ValueError("this model does not store the size of its training objects, so an "
                         "object size cannot be used with it")
    crop = central_crop(image, model)
    sampling = None
    if voxel_size is not None and len(voxel_size) >= model.spatial_dims:
        sampling = tuple(voxel_size)[-model.spatial_dims:]

    result = yield from _quiet(segment(crop, model, output="instances", voxel_size=sampling,
                                       **predict_options), "estimating the object size")
    diameter = _median_diameter(result.data)
    if diameter is None:
        raise ValueError("the model finds no object in the centre of the image to estimate "
                         "the object size from; give it (e.g. 12px)")
    scale, _ = scale_for_model(model, sampling, (diameter, "px"))
    if scale is not None and max(abs(np.log(scale))) > np.log1p(REFINE_BEYOND):
        result = yield from _quiet(segment(crop, model, output="instances", voxel_size=sampling,
                                           scale=scale, **predict_options),
                                   "estimating the object size (second pass)")
        diameter = _median_diameter(result.data) or diameter
    return round(diameter, 2)


def zoom_from_estimate(model: Any, voxel_size: Sequence[float] | None, diameter: float
                       ) -> tuple[tuple[float, ...] | None, str]:
    """``(zoom or None, where it comes from)`` for an estimated diameter (voxels): no zoom when
    it is within :data:`AUTO_TOLERANCE` of the model's training objects."""
    own = float(model.object_size["diameter_voxels"])
    if abs(np.log(diameter / own)) <= np.log1p(AUTO_TOLERANCE):
        return None, (f"estimated object diameter {diameter:g} px, within "
                      f"{AUTO_TOLERANCE:.0%} of the model's {own:g} px")
    scale, _ = scale_for_model(model, voxel_size, (diameter, "px"))
    return scale, f"estimated object diameter {diameter:g} px (the model's: {own:g} px)"
