"""Where the model is unsure: a per-voxel uncertainty map and the slices worth correcting first.

The map comes from the prediction that is already there (no extra inference): the entropy of
the probabilities, normalised to 0..1. With test-time augmentation it also takes the
disagreement between the augmentations (:func:`napari_unet.engine.predict.predict_probabilities`'s
``tta_spread``). :func:`rank_slices` scores every slice of a stack by its doubtful voxels near
objects and picks the slices where a correction reaches the most doubt (uncertainty and
coverage together, the ends of the stack last for 3D models); :func:`suggest` does it all for
an image and a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator, Sequence

import numpy as np
from scipy import ndimage

from napari_unet.engine.predict import SegmentationResult, segment
from napari_unet.progress import Progress

#: voxels processed at once: float32 temporaries stay small on big stacks, and in the Segment
#: dock's worker each step holds the GIL only briefly (~20 ms)
_CHUNK_VOXELS = 2**20
#: region of interest: voxels with at least this doubt (uncertainty above the background
#: level, rescaled; see :func:`slice_scores`) count even away from objects
ROI_UNCERTAINTY = 0.5
#: ... and the region around objects and doubtful voxels is widened by this many pixels (in-plane)
ROI_MARGIN = 2
_EPS = 1e-6


def _chunks(n: int, per_item: int) -> list[slice]:
    step = max(1, _CHUNK_VOXELS // max(1, per_item))
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


def _entropy_block(probs: np.ndarray, task: str, reduce: str) -> np.ndarray:
    """Normalised entropy (0..1) of one block of probabilities ``(C, ...)`` (float32)."""
    p = np.clip(probs.astype(np.float32, copy=False), _EPS, 1 - _EPS)
    if task == "semantic":
        if p.shape[0] < 2:
            return np.zeros(p.shape[1:], np.float32)
        h = -np.sum(p * np.log(p), axis=0)
        return np.clip(h / np.log(p.shape[0]), 0, 1).astype(np.float32)
    q = 1 - p
    h = -(p * np.log2(p) + q * np.log2(q))  # binary entropy in bits: 0..1 per channel
    h = h.max(axis=0) if reduce == "max" else h.mean(axis=0)
    return np.clip(h, 0, 1).astype(np.float32)


def entropy(probabilities: Any, task: str = "foreground", *, reduce: str = "max",
            dtype: Any = np.float32) -> np.ndarray:
    """Per-voxel entropy of a prediction, normalised to 0..1.

    Parameters
    ----------
    probabilities : array-like
        ``(C, *spatial)``, as :func:`napari_unet.engine.predict.predict_probabilities` returns them
        (float, or uint8 0..255).
    task : str
        ``semantic``: the softmax entropy divided by ``log C``; every other task: the binary
        entropy (bits) of each sigmoid channel, reduced over channels.
    reduce : str
        ``max`` (a voxel is as uncertain as its most uncertain channel) or ``mean``.
    dtype : numpy dtype
        Of the result.

    Returns
    -------
    numpy.ndarray
        Spatial shape, 0 = certain, 1 = a coin flip.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    probs = probabilities
    if probs.ndim < 2:
        raise ValueError(f"probabilities need a channel axis first, got shape {tuple(probs.shape)}")
    scale = 1 / 255 if np.dtype(probs.dtype) == np.uint8 else 1.0
    spatial = tuple(probs.shape[1:])
    out = np.empty(spatial, dtype=dtype)
    per_item = int(np.prod(spatial[1:], dtype=np.int64)) * probs.shape[0]
    for part in _chunks(spatial[0], per_item):
        block = np.asarray(probs[:, part], dtype=np.float32) * scale
        out[part] = _entropy_block(block, task, reduce)
    return out


def uncertainty_map(probabilities: Any, task: str = "foreground", spread: Any = None, *,
                    reduce: str = "max", dtype: Any = np.float32) -> np.ndarray:
    """Per-voxel uncertainty (0..1): :func:`entropy`, and with TTA the disagreement between the
    augmentations.

    ``spread`` is the standard deviation of the augmented probabilities (0..0.5, see
    ``tta_spread`` of :func:`~napari_unet.engine.predict.predict_probabilities`); it is doubled to
    0..1 and the larger of the two measures is kept, so a voxel is uncertain when the averaged
    prediction is a coin flip or when the augmentations disagree.
    """
    result = entropy(probabilities, task, reduce=reduce, dtype=dtype)
    if spread is not None:
        if tuple(spread.shape) != result.shape:
            raise ValueError(f"spread has shape {tuple(spread.shape)}, expected {result.shape}")
        per_item = int(np.prod(result.shape[1:], dtype=np.int64))
        for part in _chunks(result.shape[0], per_item):
            doubled = np.clip(2 * np.asarray(spread[part], dtype=np.float32), 0, 1)
            result[part] = np.maximum(result[part], doubled)
    return result


def _objects(probs: np.ndarray, task: str, threshold: float) -> np.ndarray:
    """Voxels the prediction calls object (or membrane, or a class) in a block ``(C, ...)``."""
    if task == "semantic":
        return np.argmax(probs, axis=0) > 0
    return (probs > threshold).any(axis=0)


def background_level(uncertainty: np.ndarray, probabilities: Any = None, *,
                     task: str = "foreground", threshold: float = 0.5,
                     samples: int = 2**20) -> float:
    """The stack's typical uncertainty in what it calls background (median over a sample).

    Models trained briefly are soft: a background probability of 0.08 is already 0.4 bits of
    entropy, everywhere. :func:`slice_scores` counts only the doubt above this level.
    """
    u = np.asarray(uncertainty)
    step = max(1, u.shape[0] * int(np.prod(u.shape[1:], dtype=np.int64)) // samples)
    flat = u.reshape(u.shape[0], -1)
    values = []
    for part in _chunks(u.shape[0], flat.shape[1]):
        block = np.asarray(flat[part], np.float32)
        if probabilities is not None:
            probs = np.asarray(probabilities[:, part], np.float32).reshape(probabilities.shape[0], len(block), -1)
            if np.dtype(probabilities.dtype) == np.uint8:
                probs /= 255
            block = block[~_objects(probs, task, threshold)]
        values.append(block.ravel()[::step])
    values = np.concatenate(values) if values else np.zeros(0, np.float32)
    return float(np.median(values)) if values.size else 0.0


def slice_scores(uncertainty: np.ndarray, probabilities: Any = None, *,
                 task: str = "foreground", threshold: float = 0.5,
                 margin: int = ROI_MARGIN) -> np.ndarray:
    """One score per slice (first axis) of a stack: the doubt above the stack's background
    level, summed over the slice's region of interest and divided by the slice's area.

    The doubt of a voxel is its uncertainty above :func:`background_level` ``b``, rescaled:
    ``(u - b) / (1 - b)``, 0 at or below it. The region of interest is what the prediction
    calls object (any channel above ``threshold``; for semantic models any class but
    background) and every voxel with a doubt of at least :data:`ROI_UNCERTAINTY`, widened by
    ``margin`` pixels in-plane: object borders, doubtful objects and missed ones, not the
    background. A slice scores high when it has many doubtful voxels there, i.e. where
    correcting it changes the most (the expected number of wrong voxels, per pixel).

    Parameters
    ----------
    uncertainty : numpy.ndarray
        ``(Z, Y, X)`` (or a 2D image: one slice), from :func:`uncertainty_map`.
    probabilities : array-like, optional
        ``(C, Z, Y, X)``; without it the region is the doubtful voxels alone.
    """
    u = np.asarray(uncertainty)
    if u.ndim == 2:
        u = u[None]
        if probabilities is not None:
            probabilities = probabilities[:, None]
    if u.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) uncertainty map, got shape {u.shape}")
    if probabilities is not None and tuple(probabilities.shape[1:]) != u.shape:
        raise ValueError(f"probabilities of shape {tuple(probabilities.shape)} do not match the "
                         f"uncertainty map {u.shape}")
    scale = None
    if probabilities is not None and np.dtype(probabilities.dtype) == np.uint8:
        scale = 1 / 255
    structure = np.zeros((1, 3, 3), bool)
    structure[0] = ndimage.generate_binary_structure(2, 1)
    area = u.shape[1] * u.shape[2]
    level = background_level(u, probabilities, task=task, threshold=threshold)
    scores = np.empty(u.shape[0], np.float64)
    for part in _chunks(u.shape[0], area * (1 + (probabilities.shape[0] if probabilities is not None else 0))):
        block = np.asarray(u[part], dtype=np.float32)
        if level > 0:
            block = np.clip((block - level) / max(1 - level, _EPS), 0, 1)
        roi = block >= ROI_UNCERTAINTY
        if probabilities is not None:
            probs = np.asarray(probabilities[:, part], dtype=np.float32)
            if scale is not None:
                probs *= scale
            roi |= _objects(probs, task, threshold)
        if margin > 0:
            roi = ndimage.binary_dilation(roi, structure, iterations=int(margin))
        scores[part] = np.where(roi, block, 0).sum(axis=(1, 2), dtype=np.float64) / area
    return scores


def default_min_gap(n_slices: int, n: int) -> int:
    """Suggested slices are at least this far apart: neighbouring slices look alike, so a
    spread of slices teaches a model more than a block of them."""
    return max(1, n_slices // max(1, 2 * n))


def default_edge(n_slices: int, n: int) -> int:
    """For 3D models: slices this close to the ends of the stack are suggested last. A 3D
    model sees no context beyond the ends, so its errors there are edge effects that a
    correction does not teach it (measured: ``benchmarks/bench_suggest.py``)."""
    return default_min_gap(n_slices, n) // 2


#: how :func:`rank_slices` picks slices; the first is the default
STRATEGIES = ("coverage", "stratified", "top")
#: ``coverage`` suggests no slice whose score is below this fraction of the average
COVERAGE_FLOOR = 0.5


def coverage_width(n_slices: int, n: int) -> float:
    """Reach of one corrected slice for the ``coverage`` strategy (the standard deviation of
    its Gaussian, in slices): half the spacing of ``n`` evenly spaced slices."""
    return max(1.0, n_slices / (2 * max(1, n)))


def _spaced(z: int, chosen: Sequence[int], gap: int) -> bool:
    return all(abs(z - c) >= gap for c in chosen)


def _pick_top(scores: np.ndarray, n: int, candidates: list[int], gap: int) -> list[int]:
    allowed = set(candidates)
    chosen: list[int] = []
    for z in np.argsort(-scores, kind="stable"):
        if len(chosen) == n:
            break
        if int(z) in allowed and _spaced(int(z), chosen, gap):
            chosen.append(int(z))
    return chosen


def _pick_stratified(scores: np.ndarray, n: int, candidates: list[int], gap: int,
                     excluded: set[int]) -> list[int]:
    # n equal blocks of the stack, the best slice of each; blocks are served best first so
    # that a clash with min_gap costs the weaker block
    allowed = set(candidates)
    blocks = [[int(z) for z in block if int(z) in allowed]
              for block in np.array_split(np.arange(len(scores)), n)]
    blocks = sorted((b for b in blocks if b), key=lambda b: -max(scores[z] for z in b))
    chosen: list[int] = []
    for block in blocks:
        spaced = [z for z in block if _spaced(z, [*chosen, *excluded], gap)]
        if spaced:
            chosen.append(max(spaced, key=lambda z: (scores[z], -z)))
    return chosen


def _pick_coverage(n: int, candidates: list[int], gap: int, excluded: set[int],
                   weights: np.ndarray) -> list[int]:
    # greedy maximum coverage: a corrected slice teaches the model about its neighbours
    # (Gaussian reach), so each pick adds the doubt of the slices it reaches that no pick
    # (nor a corrected slice) reaches yet (a coverage objective: diminishing returns)
    z_all = np.arange(len(weights), dtype=np.float64)
    width = coverage_width(len(weights), n)
    covered = np.zeros(len(weights))
    for c in excluded:
        if 0 <= c < len(weights):
            covered = np.maximum(covered, np.exp(-0.5 * ((z_all - c) / width) ** 2))
    chosen: list[int] = []
    for _ in range(n):
        free = [z for z in candidates if z not in chosen and _spaced(z, [*chosen, *excluded], gap)]
        if not free:
            break
        gains = np.empty(len(free))
        step = max(1, 2**20 // len(weights))  # (slices, candidates) blocks of bounded size
        for start in range(0, len(free), step):
            cand = np.asarray(free[start:start + step], np.float64)
            reach = np.exp(-0.5 * ((z_all[:, None] - cand[None, :]) / width) ** 2)
            gains[start:start + step] = (weights[:, None] * np.maximum(reach - covered[:, None], 0)).sum(0)
        best = free[int(np.argmax(gains))]  # ties: the first (lowest) slice
        chosen.append(best)
        covered = np.maximum(covered, np.exp(-0.5 * ((z_all - best) / width) ** 2))
    return chosen


def rank_slices(uncertainty: np.ndarray, probabilities: Any = None, n: int = 5, *,
                task: str = "foreground", threshold: float = 0.5,
                min_gap: int | None = None, edge: int = 0,
                exclude: Sequence[int] = (), strategy: str = "coverage") -> list[tuple[int, float]]:
    """The ``n`` slices most worth correcting: ``[(slice_index, score), ...]``, highest
    :func:`slice_scores` first.

    Parameters
    ----------
    uncertainty, probabilities, task, threshold
        As for :func:`slice_scores`.
    n : int
        Slices to suggest.
    min_gap : int, optional
        Suggested slices are at least this far apart (default :func:`default_min_gap`; 1 = no
        spacing).
    edge : int
        The ``edge`` outermost slices at each end are suggested last (for 3D models,
        :func:`default_edge`).
    exclude : sequence of int
        Slices never suggested: those already corrected. ``coverage`` and ``stratified`` keep
        ``min_gap`` from them, and ``coverage`` counts the slices they reach as covered.
    strategy : str
        How the slices are picked:

        * ``coverage`` (default): uncertainty and coverage together. A corrected slice
          teaches the model about the slices around it (a Gaussian reach of
          :func:`coverage_width`), so the slices are chosen greedily to reach as much doubt
          (slice scores, without the ``edge`` slices) as possible, with the corrected slices counted
          as reached already. Even doubt gives evenly spaced slices, doubt in one part of the
          stack draws more slices there, but never all of them onto one peak. Slices scoring
          below :data:`COVERAGE_FLOOR` times the average are not suggested (nothing to
          correct there).
        * ``stratified``: ``n`` equal blocks of the stack, the most uncertain slice of each.
        * ``top``: the highest scores, ``min_gap`` apart (the earlier default; on the
          shared 3D data it crowded the slices into the doubtful top of a stack and lost to
          evenly spaced ones, ``benchmarks/bench_suggest.py``).

        When the rules leave fewer than ``n`` slices (a short stack, a large ``min_gap``),
        the best of the rest come after them, the ends last.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    scores = slice_scores(uncertainty, probabilities, task=task, threshold=threshold)
    excluded = {int(z) for z in exclude}
    gap = default_min_gap(len(scores), n) if min_gap is None else max(1, int(min_gap))
    edge = max(0, int(edge))
    inner = [z for z in range(edge, len(scores) - edge) if z not in excluded]
    if strategy == "coverage":
        weights = np.maximum(scores, 0)
        weights[:edge] = 0  # a 3D model's doubt at the ends is no error a correction teaches
        weights[len(scores) - edge:] = 0
        if inner:  # a slice with little doubt of its own has little to correct
            floor = COVERAGE_FLOOR * float(np.mean(weights[inner]))
            inner = [z for z in inner if weights[z] > 0 and weights[z] >= floor]
        chosen = _pick_coverage(n, inner, gap, excluded, weights)
    elif strategy == "stratified":
        chosen = _pick_stratified(scores, n, inner, gap, excluded)
    else:
        chosen = _pick_top(scores, n, inner, gap)
    chosen = sorted(chosen, key=lambda z: (-scores[z], z))
    # too few by the rules: the best of the rest after them, the ends last
    rest = [int(z) for z in np.argsort(-scores, kind="stable") if int(z) not in chosen
            and int(z) not in excluded]
    inside = set(range(edge, len(scores) - edge))
    rest = [z for z in rest if z in inside] + [z for z in rest if z not in inside]
    chosen += rest[:max(0, n - len(chosen))]
    return [(z, float(scores[z])) for z in chosen]


@dataclass
class Suggestion:
    """What :func:`suggest` returns: the ranked ``slices``, the ``uncertainty`` map and the
    segmentation it came from."""

    slices: list[tuple[int, float]]
    uncertainty: np.ndarray
    result: SegmentationResult
    messages: list[str] = field(default_factory=list)


def suggest(image: Any, model: Any, n: int = 5, *, tta: bool = False, output: str = "labels",
            min_gap: int | None = None, exclude: Sequence[int] = (), strategy: str = "coverage",
            threshold: float | None = None, **options: Any) -> Generator[Progress, None, Suggestion]:
    """Segment a stack and rank its slices for proofreading (a generator, like ``segment``).

    Parameters
    ----------
    image : array-like
        A 3D stack ``(Z, Y, X)`` (a 2D model runs slice by slice, a 3D model on the stack).
    model : SegmentationModel
    n : int
        Slices to suggest.
    tta : bool
        Test-time augmentation: 8 times slower; the disagreement between augmentations is part
        of the uncertainty.
    min_gap, exclude, strategy
        As for :func:`rank_slices`.
    output, threshold, options
        As for :func:`napari_unet.engine.predict.segment` (``device``, ``precision``, ...).

    Returns
    -------
    Suggestion
    """
    shape = tuple(image.shape[1:] if model.config.in_channels > 1 else image.shape)
    if len(shape) != 3:
        raise ValueError(f"suggesting slices needs a 3D stack (Z, Y, X); got shape {tuple(image.shape)}")
    spread = np.zeros(shape, np.float16) if tta else None
    edge = default_edge(shape[0], n) if model.spatial_dims == 3 else 0
    if tta:
        options["tta_spread"] = spread
    result = yield from segment(image, model, output=output, tta=tta, threshold=threshold, **options)
    used = 0.5 if threshold is None else float(threshold)
    if threshold is None and hasattr(model, "postprocess_default"):
        used = float(model.postprocess_default("threshold", 0.5))
    uncertainty = uncertainty_map(result.probabilities, model.task, spread)
    ranked = rank_slices(uncertainty, result.probabilities, n, task=model.task, threshold=used,
                         min_gap=min_gap, edge=edge, exclude=exclude, strategy=strategy)
    return Suggestion(ranked, uncertainty, result, list(result.messages))
