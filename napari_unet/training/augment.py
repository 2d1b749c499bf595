"""Patch augmentation for training, 2D and 3D, numpy only and deterministic given a seed.

Geometric transforms (flips, 90° rotations, elastic deformation, zoom, z rescaling) move the
image and every label-like array (targets, annotation mask) together: the image is interpolated
linearly, the others with nearest neighbour, so integer labels stay integers. Intensity
transforms (scale, shift, gamma, blur, noise) touch the image only.

For anisotropic stacks (``anisotropic=True``) rotations stay in the y-x plane, the elastic
field does not move voxels along z and blur stays in-plane.

:data:`ROBUST` is a stronger preset for training models that must hold up on other
microscopes (issue 21): wider gamma and intensity scale, noise of random strength, Gaussian
blur, zoom 0.6-1.6 per patch and, in 3D, a separate z scale (another z step). With the default
:class:`AugmentSettings` no extra random numbers are drawn: runs are as before.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class AugmentSettings:
    """Which augmentations run and how strong they are (probabilities per patch)."""

    flips: bool = True
    rotations: bool = True
    elastic_probability: float = 0.25
    elastic_spacing: int = 24  # pixels between control points of the deformation field
    elastic_magnitude: float = 2.5  # standard deviation of control point shifts, pixels
    intensity_probability: float = 0.8
    scale_range: tuple[float, float] = (0.8, 1.25)
    shift_range: tuple[float, float] = (-0.1, 0.1)
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_probability: float = 0.3
    noise_sigma: float = 0.05  # largest noise standard deviation (drawn uniformly from 0 to it)
    #: of the patches that get intensity changes, the share that also gets a gamma
    gamma_probability: float = 0.5
    blur_probability: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.5)  # Gaussian sigma in pixels, drawn uniformly
    zoom_probability: float = 0.0
    #: zoom factor (> 1: objects bigger), drawn log-uniformly, the same on every axis
    zoom_range: tuple[float, float] = (0.6, 1.6)
    anisotropy_probability: float = 0.0
    #: 3D only: an extra zoom of z alone (another z step), drawn log-uniformly
    anisotropy_range: tuple[float, float] = (0.5, 2.0)


#: stronger augmentation for the shipped models (``bench_models.py --augment robust``,
#: ``napari-unet train --augment robust``): they must hold up on other microscopes
ROBUST = AugmentSettings(
    intensity_probability=0.9, scale_range=(0.6, 1.6), shift_range=(-0.15, 0.25),
    gamma_range=(0.4, 2.5), gamma_probability=0.6, noise_probability=0.5, noise_sigma=0.15,
    blur_probability=0.25, blur_sigma=(0.5, 1.5), zoom_probability=0.5, zoom_range=(0.6, 1.6),
    anisotropy_probability=0.3, anisotropy_range=(0.5, 2.0))

#: :data:`ROBUST` without zoom and z scale: for models whose input is resampled to their
#: training object size (``--object-size``), where the geometry needs no widening
ROBUST_INTENSITY = dataclasses.replace(ROBUST, zoom_probability=0.0, anisotropy_probability=0.0)

#: the presets by name (``default``: what fine-tuning uses)
PRESETS = {"default": AugmentSettings(), "robust": ROBUST, "robust-intensity": ROBUST_INTENSITY}


def preset_name(settings: AugmentSettings | None) -> str:
    """The name of ``settings`` in :data:`PRESETS` (None: ``default``), else ``custom``."""
    settings = settings or AugmentSettings()
    return next((name for name, preset in PRESETS.items() if preset == settings), "custom")


def _rot_planes(spatial_dims: int, anisotropic: bool) -> list[tuple[int, int]]:
    """Planes (pairs of spatial axes) in which 90° rotations are allowed."""
    if spatial_dims == 2:
        return [(0, 1)]
    if anisotropic:
        return [(1, 2)]
    return [(1, 2), (0, 1), (0, 2)]


def elastic_margin(settings: AugmentSettings) -> int:
    """Voxels read on each side of a patch so that its elastic deformation samples real image
    content (four standard deviations of the control point shifts, and one more)."""
    return int(math.ceil(4 * settings.elastic_magnitude)) + 1


def augment(image: np.ndarray, others: Sequence[np.ndarray], rng: np.random.Generator, *,
            spatial_dims: int, anisotropic: bool = False,
            settings: AugmentSettings | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Augment one patch.

    Parameters
    ----------
    image : numpy.ndarray
        Spatial patch ``(Y, X)`` or ``(Z, Y, X)``, float, roughly in 0..1 (normalised).
    others : sequence of numpy.ndarray
        Label-like arrays over the same spatial axes, optionally with leading axes (e.g. target
        channels ``(C, *spatial)``). Moved with the image, nearest-neighbour interpolation.
    rng : numpy.random.Generator
        Source of randomness; the same seed gives the same result.
    spatial_dims : int
        2 or 3.
    anisotropic : bool
        In-plane rotations only, no elastic displacement along z.

    Returns
    -------
    (image, others)
        Same shapes and dtypes as the inputs.

    See Also
    --------
    augment_patch : the same for a patch of a larger image, read (and warped) from it directly.
    """
    image = np.asarray(image)
    return augment_patch(image, others, (0,) * image.ndim, image.shape, rng, spatial_dims=spatial_dims,
                         anisotropic=anisotropic, settings=settings)


def augment_patch(image: np.ndarray, others: Sequence[np.ndarray], start: Sequence[int],
                  shape: Sequence[int], rng: np.random.Generator, *, spatial_dims: int,
                  anisotropic: bool = False,
                  settings: AugmentSettings | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Cut the patch at ``start`` of size ``shape`` out of ``image`` and ``others`` and augment it.

    Only the patch is read, or with an elastic deformation the patch and a margin around it
    (:func:`elastic_margin`, clipped to the image), so the deformation moves real image content
    into the patch; its field is drawn on a coarse grid and upsampled to the patch only. The
    inputs are never modified and the outputs never share memory with them.

    Parameters
    ----------
    image : numpy.ndarray
        Spatial image ``(Y, X)`` or ``(Z, Y, X)``, float, roughly in 0..1 (normalised).
    others : sequence of numpy.ndarray
        Label-like arrays over the same spatial axes, optionally with leading axes.
    start, shape : sequence of int
        Corner and size of the patch (inside the image).
    rng, spatial_dims, anisotropic, settings
        As for :func:`augment`.

    Returns
    -------
    (image, others)
        Float32 image patch of ``shape``; the others cut the same way, dtypes kept.
    """
    settings = settings or AugmentSettings()
    image = np.asarray(image)
    if image.ndim != spatial_dims:
        raise ValueError(f"image patch must have {spatial_dims} axes, got shape {image.shape}")
    spatial = image.shape
    others = [np.asarray(o) for o in others]
    for other in others:
        if other.shape[other.ndim - spatial_dims:] != spatial:
            raise ValueError(f"array of shape {other.shape} does not match the patch {spatial}")
    start = tuple(int(a) for a in start)
    shape = tuple(int(s) for s in shape)
    if len(start) != spatial_dims or len(shape) != spatial_dims or any(
            a < 0 or s < 1 or a + s > n for a, s, n in zip(start, shape, spatial)):
        raise ValueError(f"patch at {start} of shape {shape} is not inside the image {spatial}")

    fixed_z = anisotropic and spatial_dims == 3
    elastic = settings.elastic_probability > 0 and rng.random() < settings.elastic_probability
    factors = _zoom_factors(rng, settings, spatial_dims)
    if factors is not None:
        displacement = None
        if elastic:
            displacement = elastic_displacement(shape, rng, settings.elastic_spacing,
                                                settings.elastic_magnitude, fixed_z)
        image, others = _resampled_patch(image, others, start, shape, factors, displacement)
    elif elastic:
        image, others = _elastic_patch(image, others, start, shape, rng, settings, fixed_z=fixed_z)
    else:
        region = tuple(slice(a, a + s) for a, s in zip(start, shape))
        image = image[region]
        others = [o[(Ellipsis, *region)] for o in others]

    def move(fn) -> None:
        nonlocal image, others
        image = fn(image, 0)
        others = [fn(o, o.ndim - spatial_dims) for o in others]

    if settings.flips:
        for axis in range(spatial_dims):
            if rng.random() < 0.5:
                move(lambda a, lead, ax=axis: np.flip(a, lead + ax))
    if settings.rotations:
        for p, q in _rot_planes(spatial_dims, anisotropic):
            if shape[p] != shape[q]:
                continue  # a rotation would change the patch shape
            k = int(rng.integers(4))
            if k:
                move(lambda a, lead, p=p, q=q, k=k: np.rot90(a, k, axes=(lead + p, lead + q)))
    image = np.array(image, dtype=np.float32, order="C")  # a copy: the input is never touched
    if rng.random() < settings.intensity_probability:
        image = _intensity(image, rng, settings)
    if settings.blur_probability > 0 and rng.random() < settings.blur_probability:
        sigma = float(rng.uniform(*settings.blur_sigma))
        image = ndi.gaussian_filter(image, [0.0 if fixed_z and axis == 0 else sigma
                                            for axis in range(spatial_dims)], mode="reflect")
    if settings.noise_probability > 0 and rng.random() < settings.noise_probability:
        sigma = float(rng.uniform(0, settings.noise_sigma))
        image += sigma * rng.standard_normal(size=image.shape, dtype=np.float32)
    return image, [np.array(o, order="C") for o in others]


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))


def _zoom_factors(rng: np.random.Generator, settings: AugmentSettings,
                  spatial_dims: int) -> tuple[float, ...] | None:
    """Per-axis zoom of this patch (> 1: objects bigger), or None when it is not zoomed. Draws
    nothing when both zoom probabilities are 0."""
    factors = [1.0] * spatial_dims
    if settings.zoom_probability > 0 and rng.random() < settings.zoom_probability:
        factors = [_log_uniform(rng, settings.zoom_range)] * spatial_dims
    if (spatial_dims == 3 and settings.anisotropy_probability > 0
            and rng.random() < settings.anisotropy_probability):
        factors[0] *= _log_uniform(rng, settings.anisotropy_range)
    return None if all(f == 1.0 for f in factors) else tuple(factors)


def _mirror(position: np.ndarray, size: int) -> np.ndarray:
    """Positions folded into ``0 .. size - 1`` by mirroring at the first and last voxel."""
    if size == 1:
        return np.zeros_like(position)
    period = 2 * (size - 1)
    folded = np.mod(position, period)
    return np.where(folded > size - 1, period - folded, folded)


def _resampled_patch(image: np.ndarray, others: list[np.ndarray], start: tuple[int, ...],
                     shape: tuple[int, ...], factors: tuple[float, ...],
                     displacement: np.ndarray | None) -> tuple[np.ndarray, list[np.ndarray]]:
    """The patch at ``start`` zoomed by ``factors`` about its centre (and warped by
    ``displacement``): the image linearly, the others with nearest neighbour, at the same points.
    Points beyond the image are mirrored back into it; only their bounding box is read."""
    dims = len(shape)
    coords = np.empty((dims, *shape), dtype=np.float32)
    for axis in range(dims):
        centre = start[axis] + shape[axis] / 2
        position = centre + (np.arange(shape[axis], dtype=np.float64) + 0.5 - shape[axis] / 2) \
            / factors[axis] - 0.5
        position = position.reshape([-1 if a == axis else 1 for a in range(dims)])
        moved = position if displacement is None else displacement[axis] + position
        coords[axis] = _mirror(np.broadcast_to(moved, shape), image.shape[axis])
    lo = [int(np.floor(c.min())) for c in coords]
    hi = [int(np.ceil(c.max())) + 1 for c in coords]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    for axis in range(dims):
        coords[axis] -= lo[axis]
    warped = ndi.map_coordinates(np.asarray(image[crop], dtype=np.float32), coords, order=1,
                                 mode="nearest", output=np.float32)
    nearest = tuple(np.rint(c).astype(np.intp) for c in coords)
    return warped, [o[(Ellipsis, *crop)][(Ellipsis, *nearest)] for o in others]


def _elastic_patch(image: np.ndarray, others: list[np.ndarray], start: tuple[int, ...],
                   shape: tuple[int, ...], rng: np.random.Generator, settings: AugmentSettings,
                   fixed_z: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """The patch at ``start`` warped by a smooth random field, read from the patch and a margin:
    the image interpolated linearly, the others with nearest neighbour."""
    dims = len(shape)
    margin = elastic_margin(settings)
    lo = [a if fixed_z and axis == 0 else max(0, a - margin) for axis, a in enumerate(start)]
    hi = [a + s if fixed_z and axis == 0 else min(n, a + s + margin)
          for axis, (a, s, n) in enumerate(zip(start, shape, image.shape))]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    displacement = elastic_displacement(shape, rng, settings.elastic_spacing,
                                        settings.elastic_magnitude, fixed_z)
    coords = np.empty((dims, *shape), dtype=np.float32)
    for axis in range(dims):
        position = np.arange(shape[axis], dtype=np.float32) + (start[axis] - lo[axis])
        position = position.reshape([-1 if a == axis else 1 for a in range(dims)])
        np.clip(displacement[axis] + position, 0, hi[axis] - lo[axis] - 1, out=coords[axis])
    warped = ndi.map_coordinates(np.asarray(image[crop], dtype=np.float32), coords, order=1,
                                 mode="nearest", output=np.float32)
    nearest = tuple(np.rint(c).astype(np.intp) for c in coords)
    return warped, [o[(Ellipsis, *crop)][(Ellipsis, *nearest)] for o in others]


def elastic_displacement(shape: Sequence[int], rng: np.random.Generator, spacing: int,
                         magnitude: float, fixed_z: bool = False) -> np.ndarray:
    """Smooth random displacement ``(ndim, *shape)``: normal shifts (standard deviation
    ``magnitude``) at control points ``spacing`` apart, cubic-spline interpolated.

    The interpolation is separable, one small matrix per axis (:func:`_spline_matrix`), and
    equals ``scipy.ndimage.zoom(coarse, order=3, mode="nearest", grid_mode=True)`` of the
    control points. ``fixed_z``: no displacement along axis 0.
    """
    shape = tuple(int(s) for s in shape)
    coarse = tuple(max(2, int(np.ceil(s / spacing)) + 1) for s in shape)
    out = np.zeros((len(shape), *shape), dtype=np.float32)
    for axis in range(len(shape)):
        if fixed_z and axis == 0:
            continue
        field = rng.normal(0.0, magnitude, size=coarse).astype(np.float32)
        for along, (c, s) in enumerate(zip(coarse, shape)):
            field = np.moveaxis(np.tensordot(_spline_matrix(c, s), field, axes=(1, along)), 0, along)
        out[axis] = field
    return out


@functools.lru_cache(maxsize=64)
def _spline_matrix(coarse: int, size: int) -> np.ndarray:
    """``(size, coarse)`` matrix that upsamples ``coarse`` control values to ``size`` samples
    (cubic spline, as ``scipy.ndimage.zoom`` with ``grid_mode=True``)."""
    matrix = ndi.zoom(np.eye(coarse), (size / coarse, 1), order=3, mode="nearest", grid_mode=True)
    if matrix.shape[0] < size:  # rounding of zoom; pad by edge values
        matrix = np.pad(matrix, [(0, size - matrix.shape[0]), (0, 0)], mode="edge")
    matrix = np.ascontiguousarray(matrix[:size], dtype=np.float32)
    matrix.setflags(write=False)
    return matrix


def _intensity(image: np.ndarray, rng: np.random.Generator, settings: AugmentSettings) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    span = high - low
    if span > 0 and rng.random() < settings.gamma_probability:
        gamma = _log_uniform(rng, settings.gamma_range)
        image = ((image - low) / span) ** gamma * span + low
    scale = float(rng.uniform(*settings.scale_range))
    shift = float(rng.uniform(*settings.shift_range))
    return (image * scale + shift).astype(np.float32)
