"""Tiled prediction and segmentation of an in-memory image, as generators of :class:`Progress`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Generator, Sequence

import numpy as np
import torch

from napari_unet.engine.devices import select_device
from napari_unet.engine.planning import _plan_warnings, make_plan
from napari_unet.engine.runner import (
    TileRunner,
    _to_output_dtype,
    first_tiles,
    prepare_network,
    runner_progress,
)
from napari_unet.engine.tiling import Tile, TilePlan
from napari_unet.engine.tta import tta_transforms
from napari_unet.labels import edits, instances
from napari_unet.labels.instances import DEFAULT_MIN_SIZE
from napari_unet.labels.object_size import (
    median_volume,
    object_radius,
    scaled_radius,
    scaled_volume,
)
from napari_unet.labels.stitch import DEFAULT_STITCH_THRESHOLD, stitch_slices
from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.model.normalization import Normalizer, fit_normalizer
from napari_unet.model.precision import resolve_precision
from napari_unet.progress import Progress, relay

OUTPUTS = ("probabilities", "labels", "instances")


@dataclass
class SegmentationResult:
    """What :func:`segment` returns: ``data`` is the requested output."""

    data: np.ndarray
    output: str
    probabilities: np.ndarray
    task: str
    class_names: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def predict_probabilities(
    image: Any,
    model: SegmentationModel,
    *,
    device: str | torch.device = "auto",
    precision: str = "auto",
    tile_shape: Sequence[int] | None = None,
    batch_size: int | None = None,
    halo: Sequence[int] | None = None,
    dtype: Any = np.float16,
    out: Any = None,
    normalizer: Normalizer | None = None,
    fuse: bool = True,
    start_at: Sequence[int] | None = None,
    max_bytes: float | None = None,
    plan: TilePlan | None = None,
    tta: bool = False,
    tta_spread: Any = None,
    scale: Sequence[float] | None = None,
) -> Generator[Progress, None, Any]:
    """Predict per-voxel probabilities tile by tile.

    Parameters
    ----------
    image : array-like
        2D image or 3D stack (numpy, or any sliceable array such as zarr/dask); channel axis first
        when the model takes several channels. A 2D model on a stack runs slice by slice, with
        slices batched.
    model : SegmentationModel
    device : str
        ``auto`` (CUDA > MPS > CPU), ``cpu``, ``cuda`` or ``mps``.
    precision : str
        ``auto`` (bf16 on CPUs with native bf16 and on CUDA, fp16 on older GPUs, else fp32),
        ``fp32`` (exact), ``bf16`` or ``fp16``; see :mod:`napari_unet.model.precision`.
    tile_shape : sequence of int, optional
        Largest region (core + halo) run at once, per spatial axis of the image (for a 2D model
        on a stack: ``(y, x)``). Default: the planner's choice within the device's free memory.
    batch_size : int, optional
        Tiles per forward pass, or for a 2D model on a stack slices per forward pass
        (default: what fits).
    halo : sequence of int, optional
        Overlap per tile side; default the receptive field, which makes tiling seam-free.
    dtype : numpy dtype
        ``float16`` (default), ``float32`` or ``uint8`` (0..255) for the output.
    out : array-like, optional
        Preallocated output of shape ``(channels, *spatial)`` (e.g. a zarr array).
    start_at : sequence of int, optional
        A voxel (spatial axes of the image), e.g. the slice or view on screen: its tile runs
        first (for a 2D model on a stack: that slice alone), then the nearest ones.
    max_bytes : float, optional
        Cap of the tiles' working set.
    plan : TilePlan, optional
        A plan made by :func:`make_plan` (overrides ``tile_shape``, ``halo``, ``batch_size``).
    tta : bool
        Test-time augmentation: average the probabilities over the 8 flips and quarter turns
        of :func:`tta_transforms` (8 times slower, smoother; tiles stay exact).
    tta_spread : array-like, optional
        With ``tta``: preallocated ``spatial``-shaped output for the disagreement between the
        augmentations (per voxel, the standard deviation of the probabilities, the largest
        over channels; 0..0.5), e.g. for :func:`napari_unet.engine.uncertainty.uncertainty_map`.
    scale : sequence of float, optional
        Zoom per model axis (network voxels per image voxel, e.g. from
        :func:`napari_unet.labels.object_size.network_scale`): each tile is resampled so the
        objects reach the network at the size it was trained on, and the probabilities come
        back on the image's grid (same shape; tiling stays exact).

    Yields
    ------
    Progress
        After each tile, with the region just finished.

    Returns
    -------
    array
        Probabilities ``(channels, *spatial)``: sigmoid per channel, or softmax for semantic models.
    """
    network = model.network
    config = network.config
    torch_device = select_device(device)
    policy = resolve_precision(precision, torch_device)
    if plan is None:
        plan = make_plan(image, model, device=torch_device, precision=precision,
                         tile_shape=tile_shape, halo=halo, max_bytes=max_bytes, batch_size=batch_size,
                         scale=scale)
    spatial = plan.spatial
    if out is None:
        out = np.empty((config.out_channels, *spatial), dtype=dtype)
    elif tuple(out.shape) != (config.out_channels, *spatial):
        raise ValueError(f"output array has shape {tuple(out.shape)}, expected {(config.out_channels, *spatial)}")
    on_spread = None
    if tta_spread is not None:
        if not tta:
            raise ValueError("tta_spread needs tta=True (it is the disagreement between augmentations)")
        if tuple(tta_spread.shape) != tuple(spatial):
            raise ValueError(f"tta_spread has shape {tuple(tta_spread.shape)}, expected {tuple(spatial)}")

        def write_spread(tile: Tile, values: np.ndarray) -> None:
            tta_spread[tile.write] = values[0].astype(tta_spread.dtype, copy=False)

        on_spread = write_spread

    normalizer = normalizer or fit_normalizer(image, model.normalization)
    runner = TileRunner(image, prepare_network(network, torch_device, policy, fuse), normalizer,
                        torch_device, policy, model.task, plan, tta=tta, on_spread=on_spread)

    def write(tile: Tile, values: np.ndarray) -> None:
        out[(slice(None), *tile.write)] = _to_output_dtype(values, out.dtype)

    start = time.perf_counter()
    tiles = first_tiles(plan, start_at)
    total = len(tiles)
    augmented = f", TTA x{len(tta_transforms(config.spatial_dims))}" if tta else ""
    yield Progress(0, total, 0.0, message=f"{policy.label()}, {plan.describe()}{augmented}",
                   stage="plan")
    for warning in _plan_warnings(config, plan):
        runner.messages.append(warning)
        yield Progress(0, total, 0.0, message=warning)
    def view(tile: Tile) -> tuple[tuple[slice, ...], np.ndarray | None]:
        values = out[(slice(None), *tile.write)] if isinstance(out, np.ndarray) else None
        return tile.write, values

    yield from runner_progress(runner, tiles, write, view, start)
    return out


def postprocess_settings(model: SegmentationModel, threshold: float | None = None,
                         min_size: int | None = None, seed_threshold: float | None = None,
                         voxel_size: Sequence[float] | None = None,
                         scale: Sequence[float] | None = None
                         ) -> tuple[float, int, float | None]:
    """``(threshold, min_size, seed_threshold)``: the values given, else the model's tuned
    ones (:attr:`SegmentationModel.postprocess`), else the built-in defaults (0.5,
    :data:`~napari_unet.labels.instances.DEFAULT_MIN_SIZE`, the threshold).

    A tuned ``min_size_fraction`` (of the median training object volume, see
    :mod:`napari_unet.labels.object_size`) wins over a stored ``min_size``: it becomes voxels
    of an image with ``voxel_size``, so the minimum keeps its physical size; with ``scale``
    (the zoom that brings the image's objects to the training size) of the image's objects."""
    if threshold is None:
        threshold = float(model.postprocess_default("threshold", 0.5))
    if min_size is None:
        fraction = model.postprocess_default("min_size_fraction", None)
        if scale is not None:
            volume = scaled_volume(getattr(model, "object_size", None), scale)
        else:
            volume = median_volume(getattr(model, "object_size", None), voxel_size,
                                   getattr(model, "voxel_size", None))
        if fraction is not None and volume is not None:
            min_size = int(round(float(fraction) * volume))
        else:
            min_size = int(model.postprocess_default("min_size", DEFAULT_MIN_SIZE))
    if seed_threshold is None:
        seed_threshold = model.postprocess_default("seed_threshold", None)
    return float(threshold), int(min_size), None if seed_threshold is None else float(seed_threshold)


def shape_settings(model: Any, voxel_size: Sequence[float] | None = None,
                   merge_threshold: float | None = None,
                   scale: Sequence[float] | None = None) -> dict[str, float | None]:
    """``object_radius`` (units of ``voxel_size``, else voxels; ``None``: unknown) and
    ``merge_threshold`` (given, else the model's tuned one, else ``None``) for membrane
    instances."""
    postprocess = getattr(model, "postprocess", {}) or {}
    if merge_threshold is None and postprocess.get("merge_threshold") is not None:
        merge_threshold = float(postprocess["merge_threshold"])
    if scale is not None:  # the image's objects: the training ones over the zoom
        radius = scaled_radius(getattr(model, "object_size", None), scale, voxel_size)
    else:
        radius = object_radius(getattr(model, "object_size", None), voxel_size,
                               getattr(model, "voxel_size", None))
    return {"object_radius": radius, "merge_threshold": merge_threshold}


def model_scale(scale: Sequence[float], dims: int) -> tuple[float, ...]:
    """A zoom per model axis (one value: the same on every axis)."""
    zoom = tuple(float(s) for s in scale)
    return zoom * dims if len(zoom) == 1 else zoom[-dims:]


def probabilities_to_output(probabilities: np.ndarray, task: str, output: str, *,
                            threshold: float = 0.5, min_size: int = DEFAULT_MIN_SIZE,
                            voxel_size: Sequence[float] | None = None,
                            seed_threshold: float | None = None,
                            object_radius: float | None = None,
                            merge_threshold: float | None = None, per_slice: bool = False,
                            stitch_threshold: float = DEFAULT_STITCH_THRESHOLD) -> np.ndarray:
    """Turn probabilities into ``labels`` (binary or class ids) or ``instances``
    (``object_radius``, ``merge_threshold``: see :func:`shape_settings`).

    ``per_slice`` (a 2D model's probabilities of a stack, ``(C, Z, Y, X)``): instances are
    made slice by slice (``voxel_size``: that of a slice, or of the stack) and stitched
    through z where neighbouring objects overlap with IoU >= ``stitch_threshold``
    (:func:`~napari_unet.labels.stitch.stitch_slices`; 0 keeps them per slice)."""
    probs = np.asarray(probabilities)
    if probs.dtype == np.uint8:
        probs = probs.astype(np.float32) / 255
    if output == "probabilities":
        return probs
    if output == "labels":
        labels = instances.to_semantic(probs, task, threshold=threshold)
        if not min_size or task == "semantic":  # class ids are not objects
            return labels
        return edits.remove_small_objects(labels.astype(bool), min_size).astype(labels.dtype)
    if output == "instances" and per_slice and probs.ndim == 4:
        plane = None if voxel_size is None else tuple(voxel_size)[-2:]
        slices = [instances.to_instances(probs[:, z], task, threshold=threshold,
                                         min_size=min_size, sampling=plane,
                                         seed_threshold=seed_threshold,
                                         object_radius=object_radius,
                                         merge_threshold=merge_threshold)
                  for z in range(probs.shape[1])]
        return stitch_slices(np.stack([s.astype(np.int64) for s in slices]), stitch_threshold)
    if output == "instances":
        return instances.to_instances(probs, task, threshold=threshold, min_size=min_size,
                                        sampling=voxel_size, seed_threshold=seed_threshold,
                                        object_radius=object_radius,
                                        merge_threshold=merge_threshold)
    raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")


def segment(image: Any, model: SegmentationModel, *, output: str = "labels",
            threshold: float | None = None, min_size: int | None = None,
            voxel_size: Sequence[float] | None = None, seed_threshold: float | None = None,
            stitch_threshold: float = DEFAULT_STITCH_THRESHOLD, scale: Sequence[float] | None = None,
            **predict_options: Any) -> Generator[Progress, None, SegmentationResult]:
    """Predict and post-process: the whole Segment job, as one generator.

    Yields the prediction's :class:`Progress` and one more step for post-processing;
    returns a :class:`SegmentationResult`. ``threshold``, ``min_size`` and ``seed_threshold``
    default to the model's tuned values (:func:`postprocess_settings`). A 2D model's
    instances of a stack are made per slice and stitched through z with ``stitch_threshold``
    (IoU; 0 keeps them per slice). ``scale``: the per-tile zoom of
    :func:`predict_probabilities`; sizes of the post-processing follow it.
    """
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    predictor = predict_probabilities(image, model, scale=scale, **predict_options)
    return (yield from postprocessed(predictor, model, output=output, threshold=threshold,
                                     min_size=min_size, voxel_size=voxel_size,
                                     seed_threshold=seed_threshold,
                                     stitch_threshold=stitch_threshold, scale=scale))


def postprocessed(predictor: Generator[Progress, None, np.ndarray], model: Any, *, output: str,
                  threshold: float | None = None, min_size: int | None = None,
                  voxel_size: Sequence[float] | None = None, seed_threshold: float | None = None,
                  stitch_threshold: float = DEFAULT_STITCH_THRESHOLD,
                  scale: Sequence[float] | None = None
                  ) -> Generator[Progress, None, SegmentationResult]:
    """Drain a probability ``predictor`` (passing its progress on), then post-process its
    result into ``output`` with ``model``'s settings (:func:`postprocess_settings`): the second
    half of :func:`segment`, shared with other predictors (e.g. bioimage.io models)."""
    sampling = voxel_size if voxel_size is not None and model.spatial_dims == len(voxel_size) else None
    if voxel_size is not None and model.spatial_dims == 2 and len(voxel_size) == 3:
        sampling = tuple(voxel_size)[-2:]  # a 2D model on a stack: post-processed per slice
    zoom = None if scale is None else model_scale(scale, model.spatial_dims)
    threshold, min_size, seed_threshold = postprocess_settings(model, threshold, min_size,
                                                               seed_threshold, sampling, zoom)
    messages: list[str] = []
    last: Progress | None = None

    def note(update: Progress) -> None:
        nonlocal last
        last = update
        if update.message and update.stage != "plan":
            messages.append(update.message)

    probabilities = yield from relay(predictor, note)
    done = last.done if last else 0
    elapsed = last.elapsed if last else 0.0
    if output != "probabilities":
        yield Progress(done, done + 1, elapsed, message="post-processing", stage="postprocess")
    data = probabilities_to_output(probabilities, model.task, output, threshold=threshold,
                                   min_size=min_size, voxel_size=sampling,
                                   seed_threshold=seed_threshold,
                                   **shape_settings(model, sampling, scale=zoom),
                                   per_slice=model.spatial_dims == 2 and probabilities.ndim == 4,
                                   stitch_threshold=stitch_threshold)
    return SegmentationResult(data=data, output=output, probabilities=probabilities,
                              task=model.task, class_names=list(model.class_names), messages=messages)
