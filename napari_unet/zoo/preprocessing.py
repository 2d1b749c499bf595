"""The preprocessing steps of a bioimage.io model, fitted to an image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# --- preprocessing fitted on the whole image --------------------------------------------------

def _sample_values(image: Any, has_channels: bool, max_voxels: int = 4_000_000) -> np.ndarray:
    """A regular subsample of ``image`` (channels first when ``has_channels``), as float64."""
    spatial = image.shape[1:] if has_channels else image.shape
    size = int(np.prod(spatial))
    step = max(1, int(np.ceil((size / max_voxels) ** (1 / len(spatial)))))
    index = (slice(None),) * has_channels + (slice(None, None, step),) * len(spatial)
    values = np.asarray(image[index], dtype=np.float64)
    return values if has_channels else values[None]


def _apply_steps(data: np.ndarray, steps: list[dict[str, Any]], stats: dict[int, Any],
                 channel_axis: int | None) -> np.ndarray:
    """Apply preprocessing ``steps`` to ``data``; ``stats[i]`` holds step ``i``'s fitted
    ``(offset, scale)`` arrays (per channel along ``channel_axis``)."""
    out = np.asarray(data, dtype=np.float32)

    def per_channel(values: Any) -> Any:
        values = np.asarray(values, dtype=np.float32)
        if values.ndim == 0 or channel_axis is None:
            return values.reshape(()) if values.size == 1 else values
        shape = [1] * out.ndim
        shape[channel_axis] = values.size
        return values.reshape(shape)

    for index, step in enumerate(steps):
        kind = step["id"]
        if kind == "ensure_dtype":
            continue
        if kind == "scale_linear":
            out = out * per_channel(step.get("gain", 1.0)) + per_channel(step.get("offset", 0.0))
        elif kind == "clip":
            low, high = stats.get(index, (step.get("min"), step.get("max")))
            out = np.clip(out, low if low is not None else -np.inf, high if high is not None else np.inf)
        elif kind == "binarize":
            out = (out > per_channel(step["threshold"])).astype(np.float32)
        elif kind == "sigmoid":
            out = 1.0 / (1.0 + np.exp(-out))
        elif kind == "softmax":
            shifted = np.exp(out - out.max(axis=channel_axis or 0, keepdims=True))
            out = shifted / shifted.sum(axis=channel_axis or 0, keepdims=True)
        elif kind == "fixed_zero_mean_unit_variance":
            out = (out - per_channel(step["mean"])) / per_channel(step["std"])
        else:  # scale_range, zero_mean_unit_variance: fitted
            offset, scale = stats[index]
            out = (out - per_channel(offset)) * per_channel(scale)
        out = out.astype(np.float32, copy=False)
    return out


@dataclass
class ZooPreprocessing:
    """A Zoo model's preprocessing with its statistics taken from the whole image (the rdf's
    sample), applied tile by tile; NaN and infinite voxels become 0, as with our normaliser."""

    steps: list[dict[str, Any]]
    stats: dict[int, Any]
    has_channels: bool

    def __call__(self, data: np.ndarray) -> np.ndarray:
        array = np.asarray(data)
        nonfinite = ~np.isfinite(array) if np.issubdtype(array.dtype, np.inexact) else None
        out = _apply_steps(array, self.steps, self.stats, 0 if self.has_channels else None)
        if nonfinite is not None and nonfinite.any():
            out[nonfinite] = 0.0
        return out


def fit_preprocessing(image: Any, steps: list[dict[str, Any]], has_channels: bool) -> ZooPreprocessing:
    """Fit the statistics of ``steps`` (percentiles, mean and standard deviation) on ``image``."""
    stats: dict[int, Any] = {}
    sample = None
    values = None
    for index, step in enumerate(steps):
        kind = step["id"]
        needs = kind in ("scale_range", "zero_mean_unit_variance") or (
            kind == "clip" and (step.get("min_percentile") is not None
                                or step.get("max_percentile") is not None))
        if not needs:
            continue
        if sample is None:
            sample = _sample_values(image, has_channels)
        # statistics of the data as it is at this step (earlier steps applied)
        values = _apply_steps(sample, steps[:index], stats, 0).astype(np.float64)
        axes = step.get("axes")
        per_channel = has_channels and axes is not None and "channel" not in [str(a) for a in axes]
        flat = values.reshape(values.shape[0], -1) if per_channel else values.reshape(1, -1)
        flat = [row[np.isfinite(row)] for row in flat]
        if kind == "scale_range":
            low = np.array([np.percentile(r, step.get("min_percentile", 0.0)) for r in flat])
            high = np.array([np.percentile(r, step.get("max_percentile", 100.0)) for r in flat])
            stats[index] = (low, 1.0 / (high - low + float(step.get("eps", 1e-6))))
        elif kind == "zero_mean_unit_variance":
            mean = np.array([r.mean() for r in flat])
            std = np.array([r.std() for r in flat])
            stats[index] = (mean, 1.0 / (std + float(step.get("eps", 1e-6))))
        else:
            low = step.get("min")
            high = step.get("max")
            if step.get("min_percentile") is not None:
                low = float(np.percentile(np.concatenate(flat), step["min_percentile"]))
            if step.get("max_percentile") is not None:
                high = float(np.percentile(np.concatenate(flat), step["max_percentile"]))
            stats[index] = (low, high)
        if not per_channel:
            stats[index] = tuple(np.asarray(s).reshape(()) if not isinstance(s, (float, int, type(None)))
                                 else s for s in stats[index])
    return ZooPreprocessing(steps, stats, has_channels)
