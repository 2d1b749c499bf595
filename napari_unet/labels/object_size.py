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


# --- the data's object size and the resampling it asks for ------------------------------------

#: units of an object size: pixels (voxels), or micrometres
SIZE_UNITS = ("px", "um")
#: a default scale from voxel sizes closer to 1 than this is not worth resampling for
SCALE_TOLERANCE = 0.05
#: zooms beyond this factor (either way) are refused: a typo, or data the model cannot serve
MAX_ZOOM = 16.0


def parse_object_size(text: str | float) -> tuple[float, str | None]:
    """``(diameter, unit)`` of an object size such as ``12``, ``12px``, ``12um`` or ``12µm``
    (unit ``None``: µm when the image has a voxel size, pixels otherwise).

    Raises ``ValueError`` (one line) on anything else, zero, negative or non-finite sizes."""
    if isinstance(text, (int, float)):
        value, unit = float(text), None
    else:
        raw = str(text).strip().lower().replace("µ", "u").replace("μ", "u")
        unit = next((u for u in ("px", "um") if raw.endswith(u)), None)
        number = raw[: -len(unit)].strip() if unit else raw
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"expected an object diameter like 12, 12px or 12um, got {text!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"the object diameter must be a positive number, got {text!r}")
    return value, unit


def _anisotropy(image_voxel: Sequence[float] | None, model_voxel: Sequence[float] | None,
                ndim: int) -> np.ndarray:
    """Per-axis ratio of the image's voxel size to the model's, with geometric mean 1 (ones
    when either is unknown)."""
    if image_voxel is None or model_voxel is None or len(model_voxel) != ndim:
        return np.ones(ndim)
    ratio = np.asarray(image_voxel[-ndim:], float) / np.asarray(model_voxel, float)
    return ratio / float(np.prod(ratio)) ** (1 / ndim)


def network_scale(object_size: dict[str, Any] | None, model_voxel_size: Sequence[float] | None,
                  ndim: int, image_voxel_size: Sequence[float] | None,
                  size: tuple[float, str | None] | None = None
                  ) -> tuple[tuple[float, ...] | None, str]:
    """Zoom factors (network voxels per image voxel, per model axis) that bring the image's
    objects to the size the model was trained on, and where they come from (one line).

    Parameters
    ----------
    object_size : dict
        The model's ``object_size`` (:func:`measure_object_size`).
    model_voxel_size, image_voxel_size : sequence of float, optional
        Training and image voxel sizes (the image's last ``ndim`` axes are used).
    size : (diameter, unit), optional
        The data's object diameter (:func:`parse_object_size`). ``px`` is the equivalent
        diameter in voxels (as ``diameter_voxels``); ``um`` needs the image's voxel size.
        Without it the scale is the image's voxel size over the model's when both are known
        (``None`` when they agree within :data:`SCALE_TOLERANCE` or one is unknown).
    """
    image_voxel = None if image_voxel_size is None else tuple(float(v) for v in image_voxel_size)
    if image_voxel is not None and len(image_voxel) < ndim:
        image_voxel = None
    model_voxel = None if model_voxel_size is None else tuple(float(v) for v in model_voxel_size)
    if size is None:
        if image_voxel is None or model_voxel is None or len(model_voxel) != ndim:
            return None, "the model's object size (no voxel sizes to compare)"
        scale = np.asarray(image_voxel[-ndim:]) / np.asarray(model_voxel)
        if np.all(np.abs(scale - 1) < SCALE_TOLERANCE):
            return None, "the model's object size (the voxel size matches its training data)"
        return _rounded(scale), "the image's voxel size against the model's training voxel size"
    diameter, unit = size
    if unit is None:
        unit = "um" if image_voxel is not None else "px"
    if not object_size or not object_size.get("diameter_voxels"):
        raise ValueError("this model does not store the size of its training objects, so it "
                         "cannot be given an object size")
    if unit == "px":
        ratio = float(object_size["diameter_voxels"]) / diameter
        scale = ratio * _anisotropy(image_voxel, model_voxel, ndim)
        return _rounded(scale), f"object diameter {diameter:g} px"
    if unit != "um":
        raise ValueError(f"unknown unit {unit!r}; choose px or um")
    if image_voxel is None:
        raise ValueError(f"an object size in µm ({diameter:g}um) needs the image's voxel size; "
                         "give it in pixels (e.g. 12px)")
    voxel = np.asarray(image_voxel[-ndim:])
    if object_size.get("diameter_um") and model_voxel is not None and len(model_voxel) == ndim:
        scale = float(object_size["diameter_um"]) / diameter * voxel / np.asarray(model_voxel)
    else:  # training objects known in voxels only (isotropic training data assumed)
        scale = float(object_size["diameter_voxels"]) * voxel / diameter
    return _rounded(scale), f"object diameter {diameter:g} µm"


def _rounded(scale: np.ndarray) -> tuple[float, ...]:
    zoom = tuple(round(float(s), 6) for s in scale)
    if any(not (1 / MAX_ZOOM <= s <= MAX_ZOOM) for s in zoom):
        shown = ", ".join(f"{s:.3g}" for s in zoom)
        raise ValueError(f"that object size means resampling the image by ({shown}), beyond "
                         f"1/{MAX_ZOOM:g}..{MAX_ZOOM:g}: check the size and its unit (px or um)")
    return zoom


def scaled_volume(object_size: dict[str, Any] | None, scale: Sequence[float]) -> float | None:
    """The training objects' median volume in voxels of an image that reaches the network
    zoomed by ``scale`` (:func:`network_scale`)."""
    if not object_size or object_size.get("volume_voxels") is None:
        return None
    return float(object_size["volume_voxels"]) / float(np.prod(scale))


def scaled_radius(object_size: dict[str, Any] | None, scale: Sequence[float],
                  sampling: Sequence[float] | None) -> float | None:
    """The training objects' median radius on an image zoomed by ``scale``, in the units of
    ``sampling`` (voxels without it)."""
    if not object_size or not object_size.get("diameter_voxels"):
        return None
    radius = float(object_size["diameter_voxels"]) / 2 / float(np.prod(scale)) ** (1 / len(scale))
    if sampling is not None:
        radius *= float(np.prod(sampling)) ** (1 / len(sampling))
    return radius
