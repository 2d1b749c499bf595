"""A segmentation run as the GUI does it: its options, the names of its outputs, and what the
worker thread computes besides the labels (a thresholded preview of each tile, the uncertainty
map, the slices worth correcting), so the main thread only copies arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator, Sequence

import numpy as np

#: slices suggested to correct after a whole-stack run (listed in the Edit dock)
SUGGESTED_SLICES = 5


@dataclass
class PredictOptions:
    """Extra options of the prediction (None = automatic, the default)."""

    tile_shape: tuple[int, ...] | None = None
    batch_size: int | None = None

    def kwargs(self) -> dict[str, Any]:
        """The options set, as keyword arguments of :func:`~napari_unet.engine.predict.segment`."""
        return {k: v for k, v in (("tile_shape", self.tile_shape),
                                  ("batch_size", self.batch_size)) if v is not None}


def default_output(model: Any) -> str:
    """``instances`` for models of objects (nuclei, cells, foreground + boundary), else
    ``labels`` (binary masks or class ids)."""
    if model.task in ("foreground_boundary",) or "nuclei" in model.name or "cells" in model.name:
        return "instances"
    return "labels"


def labels_name(image_name: str) -> str:
    """The name of an image's labels layer."""
    return f"{image_name} labels"


def uncertainty_name(image_name: str) -> str:
    """The name of an image's uncertainty layer."""
    return f"{image_name} uncertainty"


@dataclass
class UncertaintyRequest:
    """What a run computes from its probabilities at the end: the uncertainty map (``show``),
    the slices to suggest (``rank``, whole-stack runs of a stack), the TTA ``spread`` filled
    tile by tile, the ``edge`` slices suggested last and the slices never suggested again."""

    show: bool = False
    rank: bool = False
    spread: np.ndarray | None = None
    edge: int = 0
    exclude: list[int] = field(default_factory=list)


def uncertainty_request(shape: Sequence[int], model: Any, *, show: bool, whole: bool, tta: bool,
                        input_shape: Sequence[int] = ()) -> UncertaintyRequest | None:
    """The uncertainty a run on an image of spatial ``shape`` computes (None: none).

    The slices are ranked after every whole-stack run (no extra cost); ``show`` asks for the
    map. With ``tta`` the disagreement between augmentations is kept in an array of the
    spatial shape of the run's input (``input_shape``, channels first for multi-channel
    models).
    """
    rank = len(shape) == 3 and whole
    if not (show or rank):
        return None
    # a 3D model's errors at the ends of the stack are edge effects: suggested last
    from napari_unet.engine.uncertainty import default_edge

    edge = default_edge(shape[0], SUGGESTED_SLICES) if model.spatial_dims == 3 else 0
    request = UncertaintyRequest(show=show, rank=rank, edge=edge)
    if tta:
        spatial = tuple(input_shape[1:] if model.config.in_channels > 1 else input_shape)
        request.spread = np.zeros(spatial, np.float16)
    return request


@dataclass
class RunExtras:
    """The uncertainty map (when asked) and the suggested slices ``[(z, score), ...]``."""

    uncertainty: np.ndarray | None = None
    suggested: list[tuple[int, float]] | None = None


@dataclass
class SegmentOutcome:
    """What the worker hands back: the result, its object count and largest id, the extras."""

    result: Any
    n_found: int
    largest: int
    extras: RunExtras = field(default_factory=RunExtras)


def uncertainty_extras(result: Any, task: str, threshold: float,
                       request: UncertaintyRequest | None) -> RunExtras:
    """The uncertainty map and the suggested slices, from the result's probabilities and the
    TTA spread (in the worker)."""
    if request is None:
        return RunExtras()
    from napari_unet.engine.uncertainty import rank_slices, uncertainty_map

    extras = RunExtras()
    uncertainty = uncertainty_map(result.probabilities, task, request.spread)
    if request.show:
        extras.uncertainty = uncertainty
    if request.rank:
        extras.suggested = rank_slices(uncertainty, result.probabilities, SUGGESTED_SLICES,
                                       task=task, threshold=threshold, edge=request.edge,
                                       exclude=request.exclude)
    return extras


def with_previews(job: Generator[Any, None, Any], task: str, threshold: float,
                  request: UncertaintyRequest | None = None
                  ) -> Generator[tuple[Any, np.ndarray | None], None, SegmentOutcome]:
    """Run ``job`` (a segmentation generator), yielding ``(update, preview)``: each update with
    its tile's thresholded preview (None without probabilities). Returns a
    :class:`SegmentOutcome`, with the uncertainty extras when ``request`` asks for them.

    Closing this generator closes ``job``.
    """
    from napari_unet.labels.instances import to_semantic

    while True:
        try:
            update = next(job)
        except StopIteration as stop:
            result = stop.value
            # count objects (and find the largest id) here, not on the main thread
            ids = np.unique(result.data) if result.output != "probabilities" else np.zeros(1)
            largest = int(ids[-1]) if ids.size and result.output != "probabilities" else 0
            extras = uncertainty_extras(result, task, threshold, request)
            return SegmentOutcome(result, int(np.count_nonzero(ids)), largest, extras)
        preview = None
        if update.region is not None and update.probabilities is not None:
            preview = to_semantic(np.asarray(update.probabilities, dtype=np.float32), task,
                                  threshold=threshold)
        try:
            yield update, preview
        except GeneratorExit:
            job.close()
            raise
