"""Input intensity normalisation, fitted once per image and applied tile by tile."""

from __future__ import annotations

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
        out = np.asarray(data, dtype=np.float32)
        if self.clip is not None:
            out = np.clip(out, *self.clip)
        out = out - np.float32(self.offset)
        out *= np.float32(self.scale)
        return out


def _subsample(image: Any) -> np.ndarray:
    """At most about ``_PERCENTILE_SAMPLE`` voxels on a regular grid (works on lazy arrays)."""
    size = int(np.prod(image.shape))
    if size <= _PERCENTILE_SAMPLE:
        return np.asarray(image)
    step = int(np.ceil((size / _PERCENTILE_SAMPLE) ** (1 / image.ndim)))
    return np.asarray(image[(slice(None, None, step),) * image.ndim])


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
    sample = _subsample(image)
    low, high = np.percentile(sample, [float(settings.get("low", 1.0)), float(settings.get("high", 99.8))])
    span = float(high - low)
    if span <= 0:
        span = float(np.max(sample) - np.min(sample)) or 1.0
    return Normalizer(float(low), 1.0 / span)
