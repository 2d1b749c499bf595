"""Streaming prediction of a big image into a Zarr store, tile by tile, resumable."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Sequence

import numpy as np
import torch

from napari_unet.bigdata.merge import merge_chunk_instances
from napari_unet.bigdata.ome_output import needs_ome_pyramids, write_ome_pyramids
from napari_unet.bigdata.store import (
    ATTRS_KEY,
    DEFAULT_MAX_TILE_BYTES,
    PROBABILITY_DTYPES,
    StreamResult,
    StreamSettings,
    _set_state,
    local_dask,
    open_stream,
    stream_array,
)
from napari_unet.engine.devices import select_device
from napari_unet.engine.planning import make_plan
from napari_unet.engine.predict import (
    OUTPUTS,
    model_scale,
    postprocess_settings,
    shape_settings,
)
from napari_unet.engine.runner import TileRunner, _to_output_dtype, prepare_network
from napari_unet.engine.tiling import Tile, TilePlan
from napari_unet.engine.tta import tta_transforms
from napari_unet.labels import instances
from napari_unet.labels.stitch import DEFAULT_STITCH_THRESHOLD, stitch_slices
from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.model.normalization import Normalizer
from napari_unet.model.precision import resolve_precision
from napari_unet.progress import Progress


#: membranes: cell radius (voxels) of a streamed run whose model does not store its object size
FALLBACK_RADIUS = 8.0


class TileWriter:
    """Predicts single tiles of a plan with the shared :class:`~napari_unet.engine.runner.TileRunner`
    and writes them into the output group.

    Used by :func:`predict_to_zarr` in this process and by the dask workers of
    :mod:`napari_unet.bigdata.cluster` (each opens the group by path and keeps one writer).
    """

    def __init__(self, group: Any, image: Any, model: SegmentationModel, plan: TilePlan,
                 settings: StreamSettings, normalizer: Normalizer, device: str | torch.device = "cpu",
                 precision: str = "auto", fuse: bool = True):
        self.group, self.image, self.model, self.plan = group, image, model, plan
        self.settings, self.normalizer = settings, normalizer
        self.device = select_device(device)
        self.policy = resolve_precision(precision, self.device)
        network = prepare_network(model.network, self.device, self.policy, fuse)
        self.runner = TileRunner(image, network, normalizer, self.device, self.policy, model.task, plan,
                                 tta=settings.tta)
        self.arrays = {name: stream_array(group, name) for name in settings.arrays()}
        self.done = group["_done"]
        self.counts = group["_counts"] if settings.output == "instances" else None
        self.messages: list[str] = []

    def predict(self, tile: Tile) -> np.ndarray:
        """float32 probabilities ``(C, *core)`` of ``tile``, exactly as the whole-image engine."""
        seen = len(self.runner.messages)
        with local_dask():
            values = self.runner.predict_core(tile)
        self.messages.extend(self.runner.messages[seen:])
        return values

    def write(self, index: int, tile: Tile, probabilities: np.ndarray) -> None:
        settings = self.settings
        region = tile.write
        if "probabilities" in self.arrays:
            target = self.arrays["probabilities"]
            target[(slice(None), *region)] = _to_output_dtype(probabilities, target.dtype)
        if "labels" in self.arrays:
            labels = instances.to_semantic(probabilities, settings.task, threshold=settings.threshold)
            self.arrays["labels"][region] = labels.astype(self.arrays["labels"].dtype, copy=False)
        if "_local" in self.arrays:
            local = chunk_instances(probabilities, settings)
            self.arrays["_local"][region] = local.astype(np.uint32, copy=False)
            self.counts[np.unravel_index(index, self.plan.grid)] = int(local.max(initial=0))
        # recorded last: a tile interrupted half-written is simply done again on resume
        self.done[np.unravel_index(index, self.plan.grid)] = 1

    def run(self, index: int, tile: Tile | None = None) -> np.ndarray:
        tile = tile or self.plan.tile(index)
        probabilities = self.predict(tile)
        self.write(index, tile, probabilities)
        return probabilities


def chunk_instances(probabilities: np.ndarray, settings: StreamSettings) -> np.ndarray:
    """Instances of one chunk's core, before merging across chunks: as in memory, with the
    run's fixed settings (so every chunk is post-processed alike) and ``min_size`` applied only
    after merging. A 2D model's chunk of a stack is done per slice and stitched through z."""
    options = dict(threshold=settings.threshold, min_size=0,
                   min_seed_size=max(1, settings.min_size // 4),
                   seed_threshold=settings.seed_threshold, method=settings.method,
                   object_radius=settings.object_radius, merge_threshold=settings.merge_threshold)
    if settings.per_slice and probabilities.ndim == 4:
        plane = None if settings.voxel_size is None else tuple(settings.voxel_size)[-2:]
        slices = [instances.to_instances(probabilities[:, z], settings.task, sampling=plane,
                                         **options).astype(np.int64)
                  for z in range(probabilities.shape[1])]
        return stitch_slices(np.stack(slices), settings.stitch_threshold)
    return instances.to_instances(probabilities, settings.task, sampling=settings.voxel_size,
                                  **options)


def tta_note(model: SegmentationModel) -> str:
    """``, TTA xN`` for the plan line of a run with test-time augmentation."""
    return f", TTA x{len(tta_transforms(model.config.spatial_dims))}"


def pending_tiles(group: Any) -> np.ndarray:
    """Indices of the tiles not finished yet."""
    return np.flatnonzero(np.asarray(group["_done"][...]).ravel() == 0)


# --- the whole run -------------------------------------------------------------------------


def predict_to_zarr(
    image: Any,
    model: SegmentationModel,
    path: str | Path,
    *,
    output: str = "labels",
    probabilities: bool = False,
    probability_dtype: str = "float32",
    threshold: float | None = None,
    min_size: int | None = None,
    method: str = "watershed",
    min_overlap: float = 0.5,
    voxel_size: Sequence[float] | None = None,
    unit: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    tile_shape: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    max_tile_bytes: float | None = DEFAULT_MAX_TILE_BYTES,
    normalizer: Normalizer | None = None,
    overwrite: bool = False,
    input_path: str | Path | None = None,
    fuse: bool = True,
    max_tiles: int | None = None,
    start_at: Sequence[int] | None = None,
    tta: bool = False,
    stitch_threshold: float = DEFAULT_STITCH_THRESHOLD,
    scale: Sequence[float] | None = None,
) -> Generator[Progress, None, StreamResult]:
    """Predict a (lazy) image tile by tile straight into a zarr group; resumable.

    Parameters
    ----------
    image : array-like
        numpy, dask, zarr or any sliceable array (e.g. :func:`napari_unet.io.lazy.open_lazy`'s
        ``data``); only tiles (core + halo) are ever read.
    model : SegmentationModel
    path : str or Path
        Output zarr group (created; reopened to resume when it holds the same run).
    output : str
        ``labels`` (class map / 0-1 mask), ``instances`` (object ids consistent across chunks)
        or ``probabilities``.
    probabilities : bool
        Also store the probabilities ``(C, *spatial)`` (``probability_dtype``).
    threshold, method, voxel_size
        As for :func:`napari_unet.labels.instances.to_instances`.
    min_size : int
        ``instances``: remove objects (after merging across chunks) with fewer voxels.
    min_overlap : float
        ``instances``: two objects touching across a chunk face are merged when their contact
        area is at least this fraction of the smaller of their areas on that face (0 merges
        any contact, which reproduces whole-image connected components exactly; the default
        keeps touching neighbours that a watershed separated apart).
    device, precision, tile_shape, halo, normalizer, fuse, start_at
        As for :func:`napari_unet.engine.predict.predict_probabilities`; the tile is chosen so the
        working set fits ``max_tile_bytes``. A resumed run keeps the plan stored in the output.
    overwrite : bool
        Replace an existing napari-unet output made with other settings.
    max_tiles : int, optional
        Stop after this many tiles (the output is left resumable); for tests and time slicing.
    tta : bool
        Test-time augmentation, as for :func:`napari_unet.engine.predict.predict_probabilities`
        (8 times the work; the same result as in memory). Part of the stored settings: a
        resume with another ``tta`` is refused (or starts over with ``overwrite``).
    stitch_threshold : float
        ``instances`` of a 2D model on a stack: made per slice and joined through z where
        neighbouring objects overlap with IoU at least this (within and across chunks); 0
        keeps them per slice.
    scale : sequence of float, optional
        Zoom per model axis before the network, as for
        :func:`napari_unet.engine.predict.predict_probabilities` (part of the stored settings).

    Yields
    ------
    Progress
        After each tile (``region`` = its core, ``probabilities`` = its values), then the
        merge steps of instance outputs (``stage="postprocess"``).

    Returns
    -------
    StreamResult
    """
    run = start_stream(image, model, path, output=output, probabilities=probabilities,
                       probability_dtype=probability_dtype, threshold=threshold, min_size=min_size,
                       method=method, voxel_size=voxel_size, unit=unit, device=device,
                       precision=precision, tile_shape=tile_shape, halo=halo,
                       max_tile_bytes=max_tile_bytes, normalizer=normalizer, overwrite=overwrite,
                       input_path=input_path, tta=tta, stitch_threshold=stitch_threshold,
                       scale=scale)
    group, plan, result = run.group, run.plan, run.result
    if run.complete:
        return result
    if run.group.attrs[ATTRS_KEY].get("state") == "done":  # only the OME-Zarr pyramids are left
        result.tiles_skipped = plan.n_tiles
        return (yield from finish_stream(run, min_size=min_size, min_overlap=min_overlap))
    writer = TileWriter(group, image, model, plan, run.settings, run.normalizer, device, precision, fuse)
    todo = plan.order(start_at, pending_tiles(group))
    total = plan.n_tiles
    done = result.tiles_skipped = total - len(todo)
    start = time.perf_counter()
    messages = result.messages
    yield Progress(done, total, 0.0, message=f"{writer.policy.label()}, {plan.describe()}"
                   f"{tta_note(model) if run.settings.tta else ''}", stage="plan")
    if run.resumed and done:
        messages.append(f"resuming: {done} of {total} tiles already done")
        yield Progress(done, total, 0.0, message=messages[-1])
    for count, index in enumerate(todo):
        if max_tiles is not None and count >= max_tiles:
            break
        tile = plan.tile(int(index))
        probs = writer.run(int(index), tile)
        done += 1
        notes, writer.messages = writer.messages, []
        messages.extend(notes)
        yield Progress(done, total, time.perf_counter() - start, region=tile.write,
                       probabilities=probs, message="; ".join(notes))
        del probs
    if done < total:  # stopped early (max_tiles)
        result.arrays = {name: stream_array(group, name) for name in run.settings.arrays()}
        return result
    return (yield from finish_stream(run, min_size=min_size, min_overlap=min_overlap))


@dataclass
class StreamRun:
    """A streamed output opened for a run: its group, plan, settings and the result so far."""

    group: Any
    plan: TilePlan
    settings: StreamSettings
    normalizer: Normalizer
    resumed: bool
    result: StreamResult
    #: the input (an OME-Zarr output copies it next to its labels at the end)
    image: Any = None

    @property
    def complete(self) -> bool:
        """Whether the stored output was already finished (nothing left to run)."""
        return (self.resumed and self.group.attrs[ATTRS_KEY].get("state") == "done"
                and not needs_ome_pyramids(self.group))


def start_stream(image: Any, model: SegmentationModel, path: str | Path, *, output: str,
                 probabilities: bool, probability_dtype: str, threshold: float | None,
                 min_size: int | None, method: str, voxel_size: Sequence[float] | None, unit: str | None,
                 device: str | torch.device, precision: str, tile_shape: Sequence[int] | None,
                 halo: Sequence[int] | None, max_tile_bytes: float | None,
                 normalizer: Normalizer | None = None, overwrite: bool = False,
                 input_path: str | Path | None = None, tta: bool = False,
                 stitch_threshold: float = DEFAULT_STITCH_THRESHOLD,
                 scale: Sequence[float] | None = None) -> StreamRun:
    """Check the options, plan the tiles and open (or reopen) the output: the start shared by
    :func:`predict_to_zarr` and :func:`napari_unet.bigdata.cluster.predict_to_zarr_distributed`."""
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    if probability_dtype not in PROBABILITY_DTYPES:
        raise ValueError(f"probability_dtype must be one of {PROBABILITY_DTYPES}")
    plan = make_plan(image, model, device=device, precision=precision, tile_shape=tile_shape,
                     halo=halo, max_bytes=max_tile_bytes, scale=scale)
    zoom = None if plan.scale is None else model_scale(plan.scale, model.spatial_dims)
    sampling = None
    per_slice = model.spatial_dims == 2 and len(plan.spatial) == 3
    if voxel_size is not None and len(voxel_size) == len(plan.spatial) and (
            per_slice or len(voxel_size) == model.spatial_dims):
        sampling = tuple(float(v) for v in voxel_size)
    plane = sampling[-2:] if per_slice and sampling else sampling
    threshold, min_size, seed_threshold = postprocess_settings(model, threshold, min_size,
                                                               voxel_size=plane, scale=zoom)
    shape = shape_settings(model, plane, scale=zoom)
    if shape["object_radius"] is None and model.task == "membranes":
        # no stored object size: one fixed radius for all chunks rather than one per chunk
        scale = float(np.prod(plane)) ** (1 / len(plane)) if plane else 1.0
        shape["object_radius"] = FALLBACK_RADIUS * scale
    settings = StreamSettings(output=output, task=model.task, probabilities=probabilities,
                              probability_dtype=probability_dtype, threshold=float(threshold),
                              method=method, voxel_size=sampling, min_size=int(min_size),
                              seed_threshold=seed_threshold, tta=bool(tta), per_slice=per_slice,
                              stitch_threshold=float(stitch_threshold), object_scale=zoom,
                              **shape)
    group, normalizer, resumed, plan = open_stream(
        path, plan=plan, settings=settings, model=model, normalizer=normalizer, image=image,
        overwrite=overwrite, input_path=input_path, voxel_size=voxel_size, unit=unit)
    if tuple(plan.spatial) != tuple(int(n) for n in image.shape[-len(plan.spatial):]):
        raise ValueError(f"{path} was made for an image of shape {plan.spatial}, not {tuple(image.shape)}")
    run = StreamRun(group, plan, settings, normalizer, resumed,
                    StreamResult(Path(path), output, {}, plan.n_tiles, messages=[]), image)
    if run.complete:
        run.result.tiles_skipped = plan.n_tiles
        run.result.n_objects = group.attrs[ATTRS_KEY].get("n_objects")
        run.result.arrays = _public_arrays(group, settings)
        run.result.messages.append("already complete")
    return run


def finish_stream(run: StreamRun, *, min_size: int | None, min_overlap: float
                  ) -> Generator[Progress, None, StreamResult]:
    """After the last tile: merge instances across chunks (or mark the output done).
    ``min_size`` None: the run's own (the model's tuned value or the default)."""
    if min_size is None:
        min_size = run.settings.min_size
    if run.settings.output == "instances":
        run.result.n_objects = yield from merge_chunk_instances(run.group, min_size=min_size,
                                                                min_overlap=min_overlap)
    else:
        _set_state(run.group, state="done")
    if needs_ome_pyramids(run.group):
        yield from write_ome_pyramids(run.group, run.image)
    run.result.arrays = _public_arrays(run.group, run.settings)
    return run.result


def _public_arrays(group: Any, settings: StreamSettings) -> dict[str, Any]:
    names = [n for n in settings.arrays() if not n.startswith("_")]
    if settings.output == "instances":
        names.append("instances")
    return {name: stream_array(group, name) for name in names}
