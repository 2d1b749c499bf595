"""Post-processing tuned on a validation split and stored with the model.

The network's probabilities become labels or instances through a few numbers: the probability
``threshold``, the ``seed_threshold`` below which a boundary (or membrane) probability seeds an
object, and the ``min_size`` of an object. :func:`tune_postprocessing` picks them on held-out
data with ground truth (object F1 at IoU 0.5 for instance labels, Dice for binary masks);
:func:`napari_unet.engine.predict.postprocess_settings` makes them the model's defaults.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from napari_unet.labels.instances import DEFAULT_MIN_SIZE, to_instances, to_semantic
from napari_unet.labels.membranes import equivalent_diameter
from napari_unet.labels.metrics import match_instances

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
SEED_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6)
#: membranes: candidate thresholds of the mean border probability below which cells merge
MERGE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
#: candidate minimum object sizes, as fractions of the median true object size
MIN_SIZE_FRACTIONS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35)


@dataclass
class TuningResult:
    """The chosen settings, their validation score and every setting tried."""

    settings: dict[str, Any]
    score: float
    metric: str
    default_score: float
    tried: list[tuple[dict[str, Any], float]] = field(default_factory=list)

    def to_postprocess(self, where: str) -> dict[str, Any]:
        """The dict stored as :attr:`SegmentationModel.postprocess` (``where``: the data)."""
        return {**self.settings, "metric": self.metric, "score": round(float(self.score), 4),
                "default_score": round(float(self.default_score), 4), "tuned_on": where}


def _pooled_f1(counts: np.ndarray) -> float:
    tp, n_pred, n_gt = (int(c) for c in counts)
    return 1.0 if n_pred + n_gt == 0 else 2.0 * tp / (n_pred + n_gt)


def _median_object_size(truths: Sequence[np.ndarray]) -> float:
    sizes = []
    for truth in truths:
        counts = np.bincount(np.asarray(truth).ravel().astype(np.int64))[1:]
        sizes.extend(counts[counts > 0].tolist())
    return float(np.median(sizes)) if sizes else float(DEFAULT_MIN_SIZE) * 10


def tune_postprocessing(probabilities: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                        task: str, *, instances: bool,
                        voxel_size: Sequence[float] | None = None,
                        valid: Sequence[np.ndarray | None] | None = None) -> TuningResult:
    """Choose ``threshold``, ``seed_threshold``, ``min_size`` (also as ``min_size_fraction``
    of the median true object size) and, for membranes, ``merge_threshold`` on validation data.

    Parameters
    ----------
    probabilities : sequence of numpy.ndarray
        The model's ``(C, *spatial)`` probabilities, one per validation image.
    truths : sequence of numpy.ndarray
        Ground truth of the same spatial shapes: instance labels (``instances=True``) or
        binary masks of the task's first output (``instances=False``: membranes, foreground).
    task : str
        The model's task. ``semantic`` models have nothing to tune (argmax).
    instances : bool
        Score object F1 at IoU 0.5 of ``to_instances`` (objects pooled over the images);
        else the Dice of the binary labels (only the threshold is tuned).
    voxel_size : sequence of float, optional
        Spacing used by the instance post-processing.
    valid : sequence of numpy.ndarray or None, optional
        Per image, the voxels that count (others are ignored in the score).

    Returns
    -------
    TuningResult
        The best settings (ties go to the earlier, more conservative candidate).
    """
    if len(probabilities) != len(truths) or not probabilities:
        raise ValueError("give one ground truth per probability map (at least one)")
    valid = list(valid) if valid is not None else [None] * len(truths)
    if task == "semantic":
        return TuningResult(settings={}, score=float("nan"), metric="none", default_score=float("nan"))
    probs = [np.asarray(p, dtype=np.float32) for p in probabilities]
    truths = [np.asarray(t) for t in truths]
    tried: list[tuple[dict[str, Any], float]] = []
    if not instances:
        def dice_of(settings: dict[str, Any]) -> float:
            inter = total = 0
            for p, t, v in zip(probs, truths, valid):
                pred = to_semantic(p, task, threshold=settings["threshold"]) != 0
                if pred.ndim > t.ndim:
                    pred = pred[0]
                truth = t != 0
                if v is not None:
                    pred, truth = pred[v], truth[v]
                inter += int(np.count_nonzero(pred & truth))
                total += int(pred.sum() + truth.sum())
            return 1.0 if total == 0 else 2.0 * inter / total

        for t in THRESHOLDS:
            tried.append(({"threshold": t}, dice_of({"threshold": t})))
        best = max(tried, key=lambda item: item[1])
        default = dice_of({"threshold": 0.5})
        return TuningResult(settings=dict(best[0]), score=best[1], metric="dice",
                            default_score=default, tried=tried)

    def f1_of(settings: dict[str, Any]) -> float:
        counts = np.zeros(3, dtype=np.int64)
        for p, t, v in zip(probs, truths, valid):
            pred = to_instances(p, task, threshold=settings["threshold"],
                                min_size=settings["min_size"], sampling=voxel_size,
                                seed_threshold=settings.get("seed_threshold"),
                                merge_threshold=settings.get("merge_threshold"),
                                object_radius=radius)
            truth = t
            if v is not None:
                pred, truth = np.where(v, pred, 0), np.where(v, truth, 0)
            m = match_instances(pred, truth)
            counts += (m.true_positives, m.n_pred, m.n_gt)
        return _pooled_f1(counts)

    def best_of(candidates: list[dict[str, Any]]) -> tuple[dict[str, Any], float]:
        scored = []
        for settings in candidates:
            score = f1_of(settings)
            tried.append((settings, score))
            scored.append((settings, score))
        return max(scored, key=lambda item: item[1])

    median = _median_object_size(truths)
    # membranes: seeds are spaced by the true objects' radius (units of voxel_size)
    ndim = truths[0].ndim
    unit = float(np.prod(voxel_size)) if voxel_size is not None else 1.0
    radius = equivalent_diameter(median * unit, ndim) / 2 if task == "membranes" else None
    min_sizes = sorted({int(round(f * median)) for f in MIN_SIZE_FRACTIONS})
    start_size = min(min_sizes, key=lambda s: abs(s - min(DEFAULT_MIN_SIZE, 0.1 * median)))
    seeds: Sequence[float | None] = (None,) if task == "foreground" else SEED_THRESHOLDS
    grid = [{"threshold": t, "seed_threshold": s, "min_size": start_size}
            for t, s in itertools.product(THRESHOLDS, seeds)]
    best, score = best_of(grid)
    best, score = best_of([{**best, "min_size": size} for size in min_sizes])
    if len(seeds) > 1:  # the seed threshold once more, at the chosen size
        best, score = best_of([{**best, "seed_threshold": s} for s in seeds])
    if task == "membranes":  # merging of over-segmented cells along weak borders
        best, score = best_of([{**best, "merge_threshold": m} for m in MERGE_THRESHOLDS])
    default = f1_of({"threshold": 0.5, "seed_threshold": None, "min_size": DEFAULT_MIN_SIZE})
    settings = {k: v for k, v in best.items() if v is not None}
    if median > 0:  # the minimum size as a fraction of the object size travels to other scales
        settings["min_size_fraction"] = round(settings["min_size"] / median, 4)
    return TuningResult(settings=settings, score=score, metric="object_f1", default_score=default,
                        tried=tried)
