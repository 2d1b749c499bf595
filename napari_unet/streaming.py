"""Streamed inference for volumes larger than memory: lazy input, zarr output, resumable.

:func:`predict_to_zarr` uses the tile plan of the in-memory engine (:mod:`napari_unet.tiling`):
cores on the network's pooling grid, read with a halo as large as the receptive field, so the
streamed result equals :func:`napari_unet.inference.predict_probabilities` on the whole image.
Each tile is read on demand from the (lazy) input, run through the engine, and its core is
written into an output zarr group whose chunks *are* the tile cores. No two tiles ever write the
same chunk, so tiles can run in any order, in parallel (:mod:`napari_unet.cluster`), or again
after an interruption: every finished tile is recorded in the ``_done`` array (one chunk per
tile, written after the tile's data), and a rerun on the same output skips those tiles.

The input normalisation is fitted once for the whole volume (on a subsample) and stored with
the output, so every tile, worker and resumed run uses the same one (no seams).

Instance labels (``output="instances"``) are made consistent across chunks in three passes:
each chunk is labelled on its own (``_local``: ids ``1..n`` per chunk); the ids are made
globally unique with per-chunk offsets and objects that touch across a chunk face are merged
with a union-find over face-adjacent label pairs (:func:`merge_chunk_instances`); finally every
chunk is relabelled into ``instances`` through the resulting lookup table (``_lut``). Each pass
is restartable.

Output layout (a zarr group)::

    OUT.zarr/labels          (*spatial)     class map or 0/1 mask       output="labels"
    OUT.zarr/instances       (*spatial)     uint32 object ids           output="instances"
    OUT.zarr/probabilities   (C, *spatial)  optional (probabilities=True or output="probabilities")
    OUT.zarr/_done, _counts, _local, _lut, _relabeled   bookkeeping

with the run's settings, voxel size and state in the group attribute ``napari_unet``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Sequence

import numpy as np
import torch

from .checkpoint import SegmentationModel
from .inference import (
    postprocess_settings,
    OUTPUTS,
    Progress,
    TileRunner,
    _to_output_dtype,
    make_plan,
    prepare_network,
    select_device,
    tta_transforms,
)
from .normalization import Normalizer, fit_normalizer
from . import postprocess
from .postprocess import DEFAULT_MIN_SIZE
from .precision import resolve_precision
from .tiling import Tile, TilePlan

__all__ = [
    "DEFAULT_MAX_TILE_BYTES",
    "StreamResult",
    "StreamSettings",
    "make_plan",
    "merge_chunk_instances",
    "open_stream",
    "predict_to_zarr",
    "stream_info",
]

STORE_FORMAT = "napari-unet-stream/1"
ATTRS_KEY = "napari_unet"
#: Working-set budget of one tile (the engine's estimate), so peak memory stays below 2 GB
#: whatever the volume; a larger budget computes fewer halo voxels (``--max-tile-gb``).
DEFAULT_MAX_TILE_BYTES = 2**30
PROBABILITY_DTYPES = ("float32", "float16", "uint8")


# --- settings and store --------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSettings:
    """What is written for every tile (everything a worker needs besides the model and input)."""

    output: str = "labels"
    task: str = "foreground"
    probabilities: bool = False
    probability_dtype: str = "float32"
    threshold: float = 0.5
    method: str = "watershed"
    voxel_size: tuple[float, ...] | None = None
    min_size: int = DEFAULT_MIN_SIZE
    seed_threshold: float | None = None
    #: test-time augmentation (:func:`napari_unet.inference.tta_transforms`) for every tile
    tta: bool = False

    def arrays(self) -> list[str]:
        names = []
        if self.output == "labels" or (self.output == "instances" and self.task == "semantic"):
            names.append("labels")  # instances of semantic models merge only within a class
        if self.output == "instances":
            names.append("_local")
        if self.probabilities or self.output == "probabilities":
            names.append("probabilities")
        return names


@dataclass
class StreamResult:
    """What :func:`predict_to_zarr` returns."""

    path: Path
    output: str
    arrays: dict[str, Any]
    tiles_total: int
    tiles_skipped: int = 0
    n_objects: int | None = None
    messages: list[str] = field(default_factory=list)

    @property
    def data(self) -> Any:
        """The requested output (a zarr array)."""
        return self.arrays[self.output]


def model_fingerprint(model: SegmentationModel) -> str:
    """A hash of what the model computes (config, task, normalisation, weights)."""
    digest = hashlib.sha1(repr(sorted(model.config.to_dict().items())).encode())
    digest.update(model.task.encode())
    digest.update(repr(sorted(model.normalization.items())).encode())
    for name, tensor in model.network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _label_dtype(settings: StreamSettings, out_channels: int) -> np.dtype:
    if settings.task == "semantic":
        return np.dtype(np.uint8 if out_channels <= 256 else np.uint16)
    return np.dtype(np.uint8)


def _fingerprint(settings: StreamSettings, model_hash: str) -> dict[str, Any]:
    return {"settings": _jsonable(dataclasses.asdict(settings)), "model": model_hash}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def stream_info(path: str | Path) -> dict[str, Any] | None:
    """The ``napari_unet`` attribute of a streamed output, or None if ``path`` is not one."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:  # noqa: BLE001 - missing or not a zarr group
        return None
    info = dict(group.attrs).get(ATTRS_KEY)
    return info if isinstance(info, dict) and info.get("format") == STORE_FORMAT else None


def stored_plan(group: Any) -> TilePlan:
    """The tile plan a streamed output was created with (its chunks are the plan's cores)."""
    return TilePlan.from_dict(dict(group.attrs[ATTRS_KEY])["plan"])


def open_stream(path: str | Path, *, plan: TilePlan, settings: StreamSettings,
                model: SegmentationModel, normalizer: Normalizer | None = None,
                image: Any = None, overwrite: bool = False, input_path: str | Path | None = None,
                voxel_size: Sequence[float] | None = None, unit: str | None = None
                ) -> tuple[Any, Normalizer, bool, TilePlan]:
    """Create the output group, or reopen a compatible one to resume.

    Returns ``(group, normalizer, resumed, plan)``. The normaliser is fitted on ``image`` once,
    when the store is created, and read back from the store when resuming. A resumed run
    continues with the stored plan (``plan`` is only used for a new store), so it can resume on
    another device or with less free memory.

    Raises
    ------
    FileExistsError
        ``path`` exists but is not a streamed output of the same model and settings
        (pass ``overwrite=True`` to replace a napari-unet output).
    ValueError
        ``path`` is the input.
    """
    import zarr

    path = Path(path)
    if input_path is not None and path.resolve() == Path(input_path).resolve():
        raise ValueError("refusing to overwrite the input image; choose another output")
    model_hash = model_fingerprint(model)
    fingerprint = _fingerprint(settings, model_hash)
    if path.exists():
        info = stream_info(path)
        if info is None:
            if overwrite and path.is_dir() and not any(path.iterdir()):
                path.rmdir()
            else:
                raise FileExistsError(f"{path} exists and is not a napari-unet output; choose another path")
        elif info.get("fingerprint") == fingerprint and not overwrite:
            group = zarr.open_group(str(path), mode="r+")
            return (group, Normalizer(**_normalizer_from_json(info["normalizer"])), True,
                    stored_plan(group))
        elif overwrite:
            shutil.rmtree(path)
        else:
            raise FileExistsError(f"{path} holds a prediction made with another model or other "
                                  "settings; pass --overwrite (overwrite=True) or choose another path")
    if normalizer is None:
        if image is None:
            raise ValueError("a normalizer or the image is needed to create the output")
        with local_dask():
            normalizer = fit_normalizer(image, model.normalization)
    group = zarr.open_group(str(path), mode="w")
    spatial_chunks = plan.core
    channels = model.config.out_channels
    for name in settings.arrays():
        if name == "probabilities":
            group.create_array(name, shape=(channels, *plan.spatial), chunks=(channels, *spatial_chunks),
                               dtype=settings.probability_dtype, fill_value=0,
                               dimension_names=["c", *_axis_names(len(plan.spatial))])
        elif name == "labels":
            group.create_array(name, shape=plan.spatial, chunks=spatial_chunks,
                               dtype=_label_dtype(settings, channels), fill_value=0,
                               dimension_names=_axis_names(len(plan.spatial)))
        else:  # _local
            group.create_array(name, shape=plan.spatial, chunks=spatial_chunks, dtype="uint32",
                               fill_value=0)
    group.create_array("_done", shape=plan.grid, chunks=(1,) * len(plan.grid), dtype="uint8",
                       fill_value=0)
    if settings.output == "instances":
        group.create_array("_counts", shape=plan.grid, chunks=(1,) * len(plan.grid),
                           dtype="uint32", fill_value=0)
    info = {
        "format": STORE_FORMAT, "fingerprint": fingerprint, "plan": plan.to_dict(),
        "state": "predicting",
        "run_id": uuid.uuid4().hex,
        "output": settings.output, "model": model.label, "task": model.task,
        "class_names": list(model.class_names), "axes": _axes_letters(len(plan.spatial)),
        "normalizer": _normalizer_to_json(normalizer),
        "input": None if input_path is None else str(input_path),
    }
    attrs: dict[str, Any] = {ATTRS_KEY: _jsonable(info)}
    if voxel_size is not None and unit is not None:
        attrs.update(voxel_size=[float(v) for v in voxel_size], unit=str(unit))
    group.attrs.update(attrs)
    return group, normalizer, False, plan


def _axis_names(ndim: int) -> list[str]:
    return list("zyx"[-ndim:])


def _axes_letters(ndim: int) -> str:
    return "ZYX"[-ndim:]


def _normalizer_to_json(normalizer: Normalizer) -> dict[str, Any]:
    return {"offset": float(normalizer.offset), "scale": float(normalizer.scale),
            "clip": None if normalizer.clip is None else [float(c) for c in normalizer.clip]}


def _normalizer_from_json(data: dict[str, Any]) -> dict[str, Any]:
    clip = data.get("clip")
    return {"offset": data["offset"], "scale": data["scale"],
            "clip": None if clip is None else tuple(clip)}


def _set_state(group: Any, **changes: Any) -> None:
    info = dict(group.attrs[ATTRS_KEY])
    info.update(_jsonable(changes))
    group.attrs[ATTRS_KEY] = info


# --- one tile ------------------------------------------------------------------------------


def local_dask() -> Any:
    """Compute dask inputs here with threads, even when a distributed client is the default
    (lazy TIFF stores cannot travel to a cluster; tiles are read where they are used)."""
    import dask

    return dask.config.set(scheduler="threads")



class TileWriter:
    """Predicts single tiles of a plan with the shared :class:`~napari_unet.inference.TileRunner`
    and writes them into the output group.

    Used by :func:`predict_to_zarr` in this process and by the dask workers of
    :mod:`napari_unet.cluster` (each opens the group by path and keeps one writer).
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
        self.arrays = {name: group[name] for name in settings.arrays()}
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
            labels = postprocess.to_semantic(probabilities, settings.task, threshold=settings.threshold)
            self.arrays["labels"][region] = labels.astype(self.arrays["labels"].dtype, copy=False)
        if "_local" in self.arrays:
            local = postprocess.to_instances(
                probabilities, settings.task, threshold=settings.threshold, min_size=0,
                min_seed_size=max(1, settings.min_size // 4), seed_threshold=settings.seed_threshold,
                sampling=settings.voxel_size, method=settings.method)
            self.arrays["_local"][region] = local.astype(np.uint32, copy=False)
            self.counts[np.unravel_index(index, self.plan.grid)] = int(local.max(initial=0))
        # recorded last: a tile interrupted half-written is simply done again on resume
        self.done[np.unravel_index(index, self.plan.grid)] = 1

    def run(self, index: int, tile: Tile | None = None) -> np.ndarray:
        tile = tile or self.plan.tile(index)
        probabilities = self.predict(tile)
        self.write(index, tile, probabilities)
        return probabilities


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
) -> Generator[Progress, None, StreamResult]:
    """Predict a (lazy) image tile by tile straight into a zarr group; resumable.

    Parameters
    ----------
    image : array-like
        numpy, dask, zarr or any sliceable array (e.g. :func:`napari_unet.io.open_lazy`'s
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
        As for :func:`napari_unet.postprocess.to_instances`.
    min_size : int
        ``instances``: remove objects (after merging across chunks) with fewer voxels.
    min_overlap : float
        ``instances``: two objects touching across a chunk face are merged when their contact
        area is at least this fraction of the smaller of their areas on that face (0 merges
        any contact, which reproduces whole-image connected components exactly; the default
        keeps touching neighbours that a watershed separated apart).
    device, precision, tile_shape, halo, normalizer, fuse, start_at
        As for :func:`napari_unet.inference.predict_probabilities`; the tile is chosen so the
        working set fits ``max_tile_bytes``. A resumed run keeps the plan stored in the output.
    overwrite : bool
        Replace an existing napari-unet output made with other settings.
    max_tiles : int, optional
        Stop after this many tiles (the output is left resumable); for tests and time slicing.
    tta : bool
        Test-time augmentation, as for :func:`napari_unet.inference.predict_probabilities`
        (8 times the work; the same result as in memory). Part of the stored settings: a
        resume with another ``tta`` is refused (or starts over with ``overwrite``).

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
                       input_path=input_path, tta=tta)
    group, plan, result = run.group, run.plan, run.result
    if run.complete:
        return result
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
        result.arrays = {name: group[name] for name in run.settings.arrays()}
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

    @property
    def complete(self) -> bool:
        """Whether the stored output was already finished (nothing left to run)."""
        return self.resumed and self.group.attrs[ATTRS_KEY].get("state") == "done"


def start_stream(image: Any, model: SegmentationModel, path: str | Path, *, output: str,
                 probabilities: bool, probability_dtype: str, threshold: float | None,
                 min_size: int | None, method: str, voxel_size: Sequence[float] | None, unit: str | None,
                 device: str | torch.device, precision: str, tile_shape: Sequence[int] | None,
                 halo: Sequence[int] | None, max_tile_bytes: float | None,
                 normalizer: Normalizer | None = None, overwrite: bool = False,
                 input_path: str | Path | None = None, tta: bool = False) -> StreamRun:
    """Check the options, plan the tiles and open (or reopen) the output: the start shared by
    :func:`predict_to_zarr` and :func:`napari_unet.cluster.predict_to_zarr_distributed`."""
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    if probability_dtype not in PROBABILITY_DTYPES:
        raise ValueError(f"probability_dtype must be one of {PROBABILITY_DTYPES}")
    plan = make_plan(image, model, device=device, precision=precision, tile_shape=tile_shape,
                     halo=halo, max_bytes=max_tile_bytes)
    sampling = None
    if voxel_size is not None and len(voxel_size) == model.spatial_dims == len(plan.spatial):
        sampling = tuple(float(v) for v in voxel_size)
    threshold, min_size, seed_threshold = postprocess_settings(model, threshold, min_size)
    settings = StreamSettings(output=output, task=model.task, probabilities=probabilities,
                              probability_dtype=probability_dtype, threshold=float(threshold),
                              method=method, voxel_size=sampling, min_size=int(min_size),
                              seed_threshold=seed_threshold, tta=bool(tta))
    group, normalizer, resumed, plan = open_stream(
        path, plan=plan, settings=settings, model=model, normalizer=normalizer, image=image,
        overwrite=overwrite, input_path=input_path, voxel_size=voxel_size, unit=unit)
    if tuple(plan.spatial) != tuple(int(n) for n in image.shape[-len(plan.spatial):]):
        raise ValueError(f"{path} was made for an image of shape {plan.spatial}, not {tuple(image.shape)}")
    run = StreamRun(group, plan, settings, normalizer, resumed,
                    StreamResult(Path(path), output, {}, plan.n_tiles, messages=[]))
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
    run.result.arrays = _public_arrays(run.group, run.settings)
    return run.result


def _public_arrays(group: Any, settings: StreamSettings) -> dict[str, Any]:
    names = [n for n in settings.arrays() if not n.startswith("_")]
    if settings.output == "instances":
        names.append("instances")
    return {name: group[name] for name in names}


# --- instances across chunks ---------------------------------------------------------------


def _face_pairs(low_side: np.ndarray, high_side: np.ndarray, min_overlap: float,
                same_class: np.ndarray | None = None) -> np.ndarray:
    """Pairs ``(a, b)`` of global ids that touch across a face and overlap enough."""
    touching = (low_side > 0) & (high_side > 0)
    if same_class is not None:
        touching &= same_class
    if not touching.any():
        return np.zeros((0, 2), dtype=np.int64)
    pairs, contacts = np.unique(np.stack([low_side[touching], high_side[touching]], axis=1),
                                axis=0, return_counts=True)
    if min_overlap <= 0:
        return pairs
    ids_a, area_a = np.unique(low_side[low_side > 0], return_counts=True)
    ids_b, area_b = np.unique(high_side[high_side > 0], return_counts=True)
    smaller = np.minimum(area_a[np.searchsorted(ids_a, pairs[:, 0])],
                         area_b[np.searchsorted(ids_b, pairs[:, 1])])
    return pairs[contacts >= min_overlap * smaller]


def merge_chunk_instances(group: Any, *, min_size: int = 0, min_overlap: float = 0.5
                          ) -> Generator[Progress, None, int]:
    """Turn per-chunk labels (``_local``) into globally consistent ``instances``; restartable.

    Chunk ``g``'s ids ``1..counts[g]`` become global ids ``offset[g] + 1 ..``; objects that
    touch across a chunk face (face connectivity; within one class for semantic models) are
    merged (union-find: connected components of the pair graph), objects smaller than
    ``min_size`` voxels are removed, and the rest are numbered ``1..N`` in order of first
    appearance. Memory: one chunk, one cross-section of faces, and a few numbers per object.

    Returns the number of objects ``N``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    info = dict(group.attrs[ATTRS_KEY])
    if info.get("state") == "done":
        return int(info.get("n_objects", 0))
    plan = stored_plan(group)
    local = group["_local"]
    classes = group["labels"] if info["task"] == "semantic" else None
    grid = plan.grid
    counts = np.asarray(group["_counts"][...], dtype=np.int64).ravel()
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    total = int(counts.sum())
    n_chunks = plan.n_tiles
    start = time.perf_counter()
    state = info.get("state")

    if state != "relabeling" or "_lut" not in group:
        _set_state(group, state="merging")
        sizes = np.zeros(total + 1, dtype=np.int64)
        high_faces: dict[tuple[tuple[int, ...], int], tuple[np.ndarray, np.ndarray | None]] = {}
        edges: list[np.ndarray] = []
        for index in range(n_chunks):
            position = tuple(int(p) for p in np.unravel_index(index, grid))
            region = plan.tile(index).write
            block = np.asarray(local[region]).astype(np.int64)
            n = int(counts[index])
            if n:
                sizes[offsets[index] + 1: offsets[index] + n + 1] += np.bincount(
                    block.ravel(), minlength=n + 1)[1:n + 1]
            block[block > 0] += offsets[index]
            cls = np.asarray(classes[region]) if classes is not None else None
            for axis in range(len(grid)):
                first = (slice(None),) * axis + (0,)
                last = (slice(None),) * axis + (-1,)
                if position[axis] > 0:
                    below = tuple(p - (a == axis) for a, p in enumerate(position))
                    low_side, low_cls = high_faces.pop((below, axis))
                    same = None if cls is None else low_cls == cls[first]
                    edges.append(_face_pairs(low_side, block[first], min_overlap, same))
                if position[axis] < grid[axis] - 1:
                    high_faces[(position, axis)] = (
                        block[last].copy(), None if cls is None else cls[last].copy())
            del block, cls
            yield Progress(index + 1, n_chunks, time.perf_counter() - start, stage="postprocess",
                           message="merging objects across chunks" if index == 0 else "")
        pairs = np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64)
        graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])),
                           shape=(total + 1, total + 1))
        n_comp, component = connected_components(graph, directed=False)
        comp_sizes = np.bincount(component, weights=sizes, minlength=n_comp)
        keep = comp_sizes >= max(1, min_size)
        keep[component[0]] = False  # background
        first_id = np.full(n_comp, total + 1, dtype=np.int64)
        np.minimum.at(first_id, component, np.arange(total + 1))
        kept = np.flatnonzero(keep)
        kept = kept[np.argsort(first_id[kept], kind="stable")]
        n_objects = len(kept)
        if n_objects > np.iinfo(np.uint32).max:
            raise ValueError(f"{n_objects} objects do not fit uint32 labels")
        final = np.zeros(n_comp, dtype=np.uint32)
        final[kept] = np.arange(1, n_objects + 1, dtype=np.uint32)
        lut = final[component]
        lut[0] = 0
        del sizes, pairs, graph, component
        if "_lut" in group:
            del group["_lut"]
        lut_array = group.create_array("_lut", shape=lut.shape, chunks=(min(len(lut), 1 << 22),),
                                       dtype="uint32", fill_value=0)
        lut_array[...] = lut
        if "instances" not in group:
            group.create_array("instances", shape=plan.spatial, chunks=plan.core, dtype="uint32",
                               fill_value=0, dimension_names=_axis_names(len(plan.spatial)))
        if "_relabeled" in group:
            del group["_relabeled"]
        group.create_array("_relabeled", shape=grid, chunks=(1,) * len(grid), dtype="uint8",
                           fill_value=0)
        _set_state(group, state="relabeling", n_objects=n_objects)
    else:
        lut = np.asarray(group["_lut"][...])
        n_objects = int(info.get("n_objects", int(lut.max(initial=0))))

    # pass 3: relabel every chunk from _local (idempotent, so an interruption is harmless)
    instances, relabeled = group["instances"], group["_relabeled"]
    todo = np.flatnonzero(np.asarray(relabeled[...]).ravel() == 0)
    for count, index in enumerate(todo):
        region = plan.tile(int(index)).write
        n, offset = int(counts[index]), int(offsets[index])
        if n:
            table = np.concatenate([[0], lut[offset + 1: offset + n + 1]]).astype(np.uint32)
            instances[region] = table[np.asarray(local[region])]
        relabeled[np.unravel_index(int(index), grid)] = 1
        yield Progress(count + 1, len(todo), time.perf_counter() - start, stage="postprocess",
                       message="relabelling chunks" if count == 0 else "")
    _set_state(group, state="done", n_objects=n_objects)
    # the per-chunk labels are not needed any more; keep the small bookkeeping arrays
    del group["_local"]
    return n_objects
