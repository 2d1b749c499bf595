"""Prediction with a foreign bioimage.io model: blended tiles through the tile runner."""

from __future__ import annotations

import time
from typing import Any, Generator, Sequence

import numpy as np
import torch

from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.zoo.foreign import ForeignModel
from napari_unet.zoo.preprocessing import fit_preprocessing

# --- running a foreign model: blended tiles ----------------------------------------------------

def _ramp(region: Sequence[slice], spatial: Sequence[int], overlap: Sequence[int]) -> np.ndarray:
    """Blending weights over ``region``: linear ramps over ``2 * overlap`` at each side that
    has a neighbour (not at the image border), 1 elsewhere; never 0."""
    weights = None
    for axis, (part, n, o) in enumerate(zip(region, spatial, overlap)):
        length = part.stop - part.start
        w = np.ones(length, np.float32)
        if o > 0:
            position = np.arange(length, dtype=np.float32) + 0.5
            if part.start > 0:
                w = np.minimum(w, position / (2 * o))
            if part.stop < n:
                w = np.minimum(w, (length - position) / (2 * o))
        shape = [1] * len(region)
        shape[axis] = length
        w = w.reshape(shape)
        weights = w if weights is None else weights * w
    return weights


def predict_foreign(image: Any, model: ForeignModel, *, device: str | torch.device = "auto",
                    precision: str = "auto", tile_shape: Sequence[int] | None = None,
                    batch_size: int | None = None, start_at: Sequence[int] | None = None,
                    max_bytes: float | None = None, normalizer: Any = None, tta: bool = False,
                    **_ignored: Any) -> Generator[Any, None, np.ndarray]:
    """Probabilities of a Zoo model on ``image``, tile by tile with blended overlaps.

    Tiles are planned and run by the engine (:func:`napari_unet.engine.planning.make_plan`,
    :class:`~napari_unet.engine.runner.TileRunner`, with its memory back-off): each tile is read
    with the rdf's halo plus the overlap around its core, the halo is cropped, and the core
    plus overlap is added with linear blending weights. ``precision="auto"`` is fp32 (how a
    foreign model behaves in bf16 is unknown). Yields :class:`~napari_unet.progress.Progress`,
    returns float32 probabilities ``(channels, *spatial)``.
    """
    from napari_unet.engine.devices import select_device
    from napari_unet.engine.planning import make_plan
    from napari_unet.engine.runner import TileRunner, first_tiles, runner_progress
    from napari_unet.engine.tiling import Tile
    from napari_unet.model.precision import resolve_precision
    from napari_unet.progress import Progress

    torch_device = select_device(device)
    if precision == "auto":
        precision = "fp32"
    policy = resolve_precision(precision, torch_device)
    if tile_shape is None and model.fixed_tile is not None:
        spatial_shape = image.shape[-model.spatial_dims:]
        tile_shape = tuple(f if f else min(n, 512) for f, n in zip(model.fixed_tile, spatial_shape))
        if image.ndim - (model.config.in_channels > 1) > model.spatial_dims:
            tile_shape = tile_shape[-2:]
    plan = make_plan(image, model, device=torch_device, precision=precision, tile_shape=tile_shape,
                     max_bytes=max_bytes, batch_size=batch_size)
    normalizer = normalizer or fit_preprocessing(image, model.preprocessing, plan.has_channels)
    network = model.network.eval().to(torch_device)
    runner = TileRunner(image, network, normalizer, torch_device, policy, model.task, plan)
    overlap = (0, *model.overlap) if plan.slicewise else tuple(model.overlap)
    spatial = plan.spatial
    channels = model.config.out_channels
    total_values = np.zeros((channels, *spatial), np.float32)
    total_weight = np.zeros(spatial, np.float32)

    def widen(tile: Tile) -> Tile:
        write = tuple(slice(max(r.start, w.start - o), min(r.stop, w.stop + o))
                      for r, w, o in zip(tile.read, tile.write, overlap))
        return Tile(tile.read, write)

    def write(tile: Tile, values: np.ndarray) -> None:
        weight = _ramp(tile.write, spatial, overlap)
        total_values[(slice(None), *tile.write)] += values * weight
        total_weight[tile.write] += weight

    cores = first_tiles(plan, start_at)
    tiles = [widen(t) for t in cores]
    core_of = {id(t): c.write for t, c in zip(tiles, cores)}
    start = time.perf_counter()
    total = len(tiles)
    yield Progress(0, total, 0.0, message=f"{policy.label()}, {plan.describe()}, blended "
                   f"overlap {tuple(overlap)} + halo {tuple(model.halo)}", stage="plan")
    for note in model.notes[1:] + (["test-time augmentation is not used with Zoo models made "
                                     "elsewhere"] if tta else []):
        yield Progress(0, total, 0.0, message=note)

    def view(tile: Tile) -> tuple[tuple[slice, ...], np.ndarray]:
        region = core_of.get(id(tile), tile.write)
        weight = np.maximum(total_weight[region], 1e-12)
        return region, total_values[(slice(None), *region)] / weight

    yield from runner_progress(runner, tiles, write, view, start)
    np.maximum(total_weight, 1e-12, out=total_weight)
    total_values /= total_weight
    return total_values


def segment_foreign(image: Any, model: ForeignModel, *, output: str = "labels",
                    threshold: float | None = None, min_size: int | None = None,
                    voxel_size: Sequence[float] | None = None, seed_threshold: float | None = None,
                    stitch_threshold: float | None = None,
                    **predict_options: Any) -> Generator[Any, None, Any]:
    """:func:`napari_unet.engine.predict.segment` for a :class:`ForeignModel` (blended tiles)."""
    from napari_unet.engine.predict import OUTPUTS, postprocessed

    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    predictor = predict_foreign(image, model, **predict_options)
    stitch = {} if stitch_threshold is None else {"stitch_threshold": stitch_threshold}
    return (yield from postprocessed(predictor, model, output=output, threshold=threshold,
                                     min_size=min_size, voxel_size=voxel_size,
                                     seed_threshold=seed_threshold, **stitch))


def segment_model(image: Any, model: SegmentationModel, **options: Any) -> Generator[Any, None, Any]:
    """:func:`napari_unet.engine.predict.segment`, or :func:`segment_foreign` for a Zoo model made
    elsewhere: the one entry point of the CLI and the Segment dock."""
    if isinstance(model, ForeignModel):
        if options.pop("scale", None) is not None:
            raise ValueError("a Zoo model made elsewhere does not store the size of its "
                             "training objects: it cannot be run at another object size")
        return segment_foreign(image, model, **options)
    from napari_unet.engine.predict import segment

    return segment(image, model, **options)
