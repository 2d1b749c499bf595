"""Input intensity normalisation, fitted once per image and applied tile by tile."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

# Above this many voxels the percentiles are estimated from a regular subsample.
_PERCENTILE_SAMPLE = 4_000_000


@dataclass(frozen=True)
class Normalizer:
    """Maps raw intensities to the network's input range: ``(x - offset) * scale``."""

    offset: float
    scale: float
    clip: tuple[float, float] | None = None

    def __call__(self, data: np.ndarray) -> np.ndarray:
        """Normalised ``float32`` copy of ``data``; NaN and infinite voxels become 0 (background)."""
        out = np.asarray(data, dtype=np.float32)
        nonfinite = None
        if np.issubdtype(np.asarray(data).dtype, np.inexact):
            nonfinite = ~np.isfinite(out)
            if not nonfinite.any():
                nonfinite = None
        if self.clip is not None:
            out = np.clip(out, *self.clip)
        out = out - np.float32(self.offset)
        out *= np.float32(self.scale)
        if nonfinite is not None:
            out[nonfinite] = 0.0
        return out


class NonFiniteValuesWarning(UserWarning):
    """The image holds NaN or infinite voxels; they are treated as background."""


class UnusableImageError(ValueError):
    """The image's values cannot be segmented (no finite voxel at all)."""


def _subsample(image: Any) -> tuple[np.ndarray, bool]:
    """At most about ``_PERCENTILE_SAMPLE`` voxels on a regular grid (works on lazy arrays), and
    whether that is every voxel. Bool images come back as ``uint8`` 0/1."""
    size = int(np.prod(image.shape))
    if size <= _PERCENTILE_SAMPLE:
        sample, complete = np.asarray(image), True
    else:
        step = int(np.ceil((size / _PERCENTILE_SAMPLE) ** (1 / image.ndim)))
        sample, complete = np.asarray(image[(slice(None, None, step),) * image.ndim]), False
    if sample.dtype == np.bool_:
        sample = sample.view(np.uint8)
    return sample, complete


def count_nonfinite(image: Any, slab_voxels: int = 1 << 24) -> int:
    """Number of NaN or infinite voxels in an in-memory ``image`` (0 for integer and bool data).

    Counted slab by slab along the first axis, so the temporary mask stays small.
    """
    array = np.asarray(image)
    if not np.issubdtype(array.dtype, np.inexact) or array.size == 0:
        return 0
    if array.ndim == 0:
        return int(not np.isfinite(array))
    rows = max(1, slab_voxels // max(1, array[0].size))
    return sum(int(np.count_nonzero(~np.isfinite(array[i:i + rows])))
               for i in range(0, len(array), rows))


def _finite_values(sample: np.ndarray, complete: bool) -> np.ndarray:
    """The finite voxels of ``sample``; warns (:class:`NonFiniteValuesWarning`) about the others
    and raises :class:`UnusableImageError` when there is no finite voxel."""
    if not np.issubdtype(sample.dtype, np.inexact):
        return sample
    finite = np.isfinite(sample)
    n_bad = int(finite.size - np.count_nonzero(finite))
    if n_bad == 0:
        return sample
    if n_bad == finite.size:
        raise UnusableImageError("the image has no finite values (every voxel is NaN or "
                                 "infinite): nothing to segment")
    if complete:
        what = f"{n_bad} of {finite.size} voxels {'are' if n_bad > 1 else 'is'}"
    else:
        what = f"about {n_bad / finite.size:.2%} of the voxels are"
    warnings.warn(f"{what} NaN or infinite; treated as background", NonFiniteValuesWarning,
                  stacklevel=3)
    return sample[finite]


def fit_normalizer(image: Any, settings: dict[str, Any] | None) -> Normalizer:
    """Build the :class:`Normalizer` for ``image`` from a model's normalisation settings.

    Parameters
    ----------
    image : array-like
        The whole image (numpy, dask or zarr); large ones are subsampled.
    settings : dict
        ``{"mode": "percentile", "low": 1, "high": 99.8}`` maps those percentiles to 0 and 1;
        ``{"mode": "window", "center": c, "width": w}`` clips to the (e.g. Hounsfield) window
        and maps it to 0..1; ``{"mode": "none"}`` leaves values as they are.

    Notes
    -----
    Percentiles ignore NaN and infinite voxels (a :class:`NonFiniteValuesWarning` says how
    many there are); the normaliser maps them to 0, i.e. background. Bool images are 0/1.

    Raises
    ------
    UnusableImageError
        Percentile mode and no finite voxel at all.
    """
    settings = settings or {"mode": "percentile"}
    mode = settings.get("mode", "percentile")
    if mode == "none":
        return Normalizer(0.0, 1.0)
    if mode == "window":
        center, width = float(settings["center"]), float(settings["width"])
        low, high = center - width / 2, center + width / 2
        return Normalizer(low, 1.0 / width, clip=(low, high))
    if mode != "percentile":
        raise ValueError(f"unknown normalisation mode {mode!r}")
    values = _finite_values(*_subsample(image))
    low, high = np.percentile(values, [float(settings.get("low", 1.0)), float(settings.get("high", 99.8))])
    span = float(high - low)
    if span <= 0:
        span = float(np.max(values)) - float(np.min(values)) or 1.0
    return Normalizer(float(low), 1.0 / span)
