"""Patch augmentation for training, 2D and 3D, numpy only and deterministic given a seed.

Geometric transforms (flips, 90° rotations, elastic deformation) move the image and every
label-like array (targets, annotation mask) together: the image is interpolated linearly, the
others with nearest neighbour, so integer labels stay integers. Intensity transforms (scale,
shift, gamma, noise) touch the image only.

For anisotropic stacks (``anisotropic=True``) rotations stay in the y-x plane and the elastic
field does not move voxels along z.
"""

from __future__ import annotations

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
    noise_sigma: float = 0.05


def _rot_planes(spatial_dims: int, anisotropic: bool) -> list[tuple[int, int]]:
    """Planes (pairs of spatial axes) in which 90° rotations are allowed."""
    if spatial_dims == 2:
        return [(0, 1)]
    if anisotropic:
        return [(1, 2)]
    return [(1, 2), (0, 1), (0, 2)]


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
    """
    settings = settings or AugmentSettings()
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != spatial_dims:
        raise ValueError(f"image patch must have {spatial_dims} axes, got shape {image.shape}")
    spatial = image.shape
    others = [np.asarray(o) for o in others]
    for other in others:
        if other.shape[other.ndim - spatial_dims:] != spatial:
            raise ValueError(f"array of shape {other.shape} does not match the patch {spatial}")

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
            if spatial[p] != spatial[q]:
                continue  # a rotation would change the patch shape
            k = int(rng.integers(4))
            if k:
                move(lambda a, lead, p=p, q=q, k=k: np.rot90(a, k, axes=(lead + p, lead + q)))
    if settings.elastic_probability > 0 and rng.random() < settings.elastic_probability:
        coords = _elastic_coordinates(spatial, rng, settings.elastic_spacing,
                                      settings.elastic_magnitude, anisotropic and spatial_dims == 3)
        image = ndi.map_coordinates(image, coords, order=1, mode="reflect").astype(np.float32)
        others = [_warp_nearest(o, coords, spatial_dims) for o in others]
    image = np.ascontiguousarray(image, dtype=np.float32)
    if rng.random() < settings.intensity_probability:
        image = _intensity(image, rng, settings)
    if settings.noise_probability > 0 and rng.random() < settings.noise_probability:
        sigma = float(rng.uniform(0, settings.noise_sigma))
        image = image + rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    return image, [np.ascontiguousarray(o) for o in others]


def _elastic_coordinates(shape: tuple[int, ...], rng: np.random.Generator, spacing: int,
                         magnitude: float, fixed_z: bool) -> np.ndarray:
    """Sampling coordinates ``(ndim, *shape)``: identity plus a smooth random displacement."""
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    coarse = tuple(max(2, int(np.ceil(s / spacing)) + 1) for s in shape)
    coords = []
    for axis, g in enumerate(grid):
        if fixed_z and axis == 0:
            coords.append(g)
            continue
        field = rng.normal(0.0, magnitude, size=coarse).astype(np.float32)
        zoom = [s / c for s, c in zip(shape, coarse)]
        dense = ndi.zoom(field, zoom, order=3, mode="nearest", grid_mode=True)
        dense = dense[tuple(slice(0, s) for s in shape)]
        if dense.shape != shape:  # rounding of zoom; pad by edge values
            dense = np.pad(dense, [(0, s - d) for s, d in zip(shape, dense.shape)], mode="edge")
        coords.append(g + dense)
    return np.stack(coords)


def _warp_nearest(array: np.ndarray, coords: np.ndarray, spatial_dims: int) -> np.ndarray:
    lead = array.shape[:array.ndim - spatial_dims]
    flat = array.reshape((-1, *array.shape[array.ndim - spatial_dims:]))
    dtype = array.dtype
    work = flat.astype(np.uint8) if dtype == bool else flat
    out = np.stack([ndi.map_coordinates(c, coords, order=0, mode="reflect") for c in work])
    return out.astype(dtype, copy=False).reshape((*lead, *out.shape[1:]))


def _intensity(image: np.ndarray, rng: np.random.Generator, settings: AugmentSettings) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    span = high - low
    if span > 0 and rng.random() < 0.5:
        gamma = float(np.exp(rng.uniform(np.log(settings.gamma_range[0]), np.log(settings.gamma_range[1]))))
        image = ((image - low) / span) ** gamma * span + low
    scale = float(rng.uniform(*settings.scale_range))
    shift = float(rng.uniform(*settings.shift_range))
    return (image * scale + shift).astype(np.float32)
