"""Running the tiled engine on a dask cluster: a LocalCluster, or any running dask scheduler.

* :func:`predict_dask` maps the engine over a dask array with :func:`dask.array.map_overlap`
  (depth = the network's halo, no padding at the borders, chunks = tile cores on the pooling
  grid): lazy, composable, equal to the in-memory result.
* :func:`predict_to_zarr_distributed` is :func:`napari_unet.bigdata.streaming.predict_to_zarr` with
  one task per tile on the cluster: every worker reads its tile (core + halo) from the input
  (reopened by path, or a scattered array), writes the core into its own chunks of the output
  zarr group and records the tile as done, so runs are resumable and memory per worker is one
  tile. Instance merging runs on the client afterwards (it only reads labels).
* :func:`predict_batch` segments a folder of files, one task per file.

Model weights travel once per worker (``client.scatter(..., broadcast=True)``); workers build
the network from them once and keep it for all their tasks.

Use :func:`dask_client` for a client: ``None``/``"local"`` starts a LocalCluster on this
machine, an address (``tcp://host:8786``, e.g. a dask-jobqueue SLURM cluster's scheduler)
connects to a running scheduler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Generator, Iterator, Sequence

import numpy as np
import torch

from napari_unet.bigdata.store import (
    ATTRS_KEY,
    DEFAULT_MAX_TILE_BYTES,
    StreamResult,
    StreamSettings,
    _normalizer_from_json,
    _normalizer_to_json,
    model_fingerprint,
    stored_plan,
)
from napari_unet.bigdata.streaming import (
    TileWriter,
    finish_stream,
    pending_tiles,
    start_stream,
    tta_note,
)
from napari_unet.engine.devices import select_device
from napari_unet.engine.planning import make_plan
from napari_unet.engine.predict import postprocess_settings
from napari_unet.engine.runner import TileRunner, _to_output_dtype, prepare_network
from napari_unet.engine.tiling import Tile, TilePlan
from napari_unet.labels.stitch import DEFAULT_STITCH_THRESHOLD
from napari_unet.model.checkpoint import (
    SegmentationModel,
    model_from_bytes,
    model_to_bytes,
)
from napari_unet.model.normalization import Normalizer, fit_normalizer
from napari_unet.model.precision import resolve_precision
from napari_unet.progress import Progress, drain

__all__ = [
    "dask_client",
    "model_from_payload",
    "model_payload",
    "predict_batch",
    "predict_dask",
    "predict_to_zarr_distributed",
    "worker_peak_rss",
]


# --- clients -------------------------------------------------------------------------------


@contextlib.contextmanager
def dask_client(address: str | None = None, *, n_workers: int | None = None,
                threads_per_worker: int = 1, **cluster_options: Any) -> Iterator[Any]:
    """A ``distributed.Client``: on a new LocalCluster (``address`` None or ``"local"``), or
    connected to the scheduler at ``address``. Closed (cluster too) on exit."""
    from distributed import Client, LocalCluster

    if address in (None, "", "local"):
        n_workers = n_workers or max(1, (os.cpu_count() or 2) // max(1, threads_per_worker))
        options = {"processes": True, "dashboard_address": None, **cluster_options}
        with LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                          **options) as cluster, Client(cluster) as client:
            yield client
    else:
        with Client(address) as client:
            yield client


def worker_peak_rss(client: Any) -> dict[str, int]:
    """Peak resident memory (bytes) of every worker process so far."""
    return client.run(_peak_rss)


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- model weights on the workers ----------------------------------------------------------


def model_payload(model: SegmentationModel) -> dict[str, Any]:
    """What workers rebuild ``model`` from: the checkpoint file's bytes (loaded as safely as a
    file) and a token naming them."""
    return {"checkpoint": model_to_bytes(model), "token": model_fingerprint(model)}


def model_from_payload(payload: dict[str, Any]) -> SegmentationModel:
    model = model_from_bytes(payload["checkpoint"])
    model.network.eval()
    return model


# per worker process: models built from payloads, opened images and output groups
_CACHE: dict[tuple[str, str], Any] = {}


def _cached(kind: str, key: str, build: Any) -> Any:
    if (kind, key) not in _CACHE:
        if len(_CACHE) > 32:
            _CACHE.clear()
        _CACHE[(kind, key)] = build()
    return _CACHE[(kind, key)]


def _worker_model(payload: dict[str, Any]) -> SegmentationModel:
    _limit_torch_threads()
    return _cached("model", payload["token"], lambda: model_from_payload(payload))


def _worker_network(payload: dict[str, Any], device: torch.device, precision: str) -> Any:
    """The worker's prepared network (folded batch norm, device, layout), built once."""
    model = _worker_model(payload)
    policy = resolve_precision(precision, device)
    return _cached("network", f"{payload['token']}:{device}:{policy.name}",
                   lambda: prepare_network(model.network, device, policy))


def _limit_torch_threads() -> None:
    """One torch thread per dask thread, so workers do not oversubscribe the cores."""
    try:
        from distributed import get_worker

        worker = get_worker()
        threads = getattr(getattr(worker, "state", None), "nthreads", None) or worker.nthreads
    except (ImportError, ValueError, AttributeError):
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(max(1, int(threads)))


def _open_input(spec: Any, allow_channels: bool) -> Any:
    """A worker's view of the input: a path is opened lazily (once per worker), arrays as is."""
    if isinstance(spec, (str, os.PathLike)):
        from napari_unet.io.lazy import open_lazy

        return _cached("image", f"{spec}:{allow_channels}",
                       lambda: open_lazy(spec, allow_channels=allow_channels).data)
    return spec


# --- map_overlap ---------------------------------------------------------------------------


def _aligned_chunks(length: int, core: int, depth: int) -> tuple[int, ...]:
    """Chunks of ``core`` (the last one absorbs a remainder thinner than ``depth``)."""
    chunks = [core] * (length // core)
    rest = length - sum(chunks)
    if rest:
        if chunks and rest < depth:
            chunks[-1] += rest
        else:
            chunks.append(rest)
    return tuple(chunks) or (length,)


def predict_dask(image: Any, model: SegmentationModel, *, output: str = "probabilities",
                 threshold: float | None = None, device: str = "cpu", precision: str = "auto",
                 tile_shape: Sequence[int] | None = None, halo: Sequence[int] | None = None,
                 normalizer: Normalizer | None = None,
                 max_tile_bytes: float | None = DEFAULT_MAX_TILE_BYTES, dtype: Any = np.float32,
                 client: Any = None, tta: bool = False,
                 scale: Sequence[float] | None = None) -> Any:
    """Lazy prediction of a dask array with :func:`dask.array.map_overlap`.

    The input is rechunked so chunks are tile cores (multiples of the network's divisor,
    from :func:`napari_unet.engine.planning.make_plan`); each block is read with ``depth`` = the
    receptive-field halo and no padding at the array border, exactly like the engine's tiles,
    so the result equals the in-memory prediction. The normalisation is fitted once on the
    whole (subsampled) array. With a ``client`` the weights are scattered to every worker
    once; otherwise they travel as one shared ``dask.delayed`` object. ``tta``: test-time
    augmentation in every block (8 times the work), equal to the in-memory TTA result.
    ``scale``: the per-tile zoom of :func:`~napari_unet.engine.predict.predict_probabilities`
    (blocks overlap by the enlarged halo; equal to the in-memory result).

    Returns
    -------
    dask.array.Array
        ``probabilities`` ``(C, *spatial)`` in ``dtype``, or ``labels`` ``(*spatial)`` uint8
        (class map / 0-1 mask). Chunk-aligned, ready for ``.to_zarr``.
    """
    import dask
    import dask.array as da

    if output not in ("probabilities", "labels"):
        raise ValueError("predict_dask computes probabilities or labels; instances need the "
                         "cross-chunk merge of predict_to_zarr_distributed")
    image = image if isinstance(image, da.Array) else da.from_array(image)
    plan = make_plan(image, model, device=device, precision=precision, tile_shape=tile_shape,
                     halo=halo, max_bytes=max_tile_bytes, scale=scale)
    normalizer = normalizer or fit_normalizer(image, model.normalization)
    # map_overlap needs chunks at least as thick as the overlap: cores of at least the halo
    cores = tuple(max(c, -(-h // d) * d) for c, h, d in zip(plan.core, plan.halo, plan.divisor))
    spatial_chunks = tuple(_aligned_chunks(n, c, h) for n, c, h in zip(plan.spatial, cores, plan.halo))
    depth = tuple(h if len(c) > 1 else 0 for h, c in zip(plan.halo, spatial_chunks))
    offset = 1 if plan.has_channels else 0
    image = image.rechunk(((image.shape[0],),) * offset + spatial_chunks)
    payload = model_payload(model)
    weights = client.scatter(payload, broadcast=True) if client is not None else dask.delayed(payload, pure=True)
    kwargs = dict(weights=weights, plan=plan, chunks_per_axis=spatial_chunks, halo_depth=depth,
                  normalizer=_normalizer_to_json(normalizer), kind=output,
                  threshold=float(postprocess_settings(model, threshold, None)[0]),
                  device=device, precision=precision,
                  out_dtype=np.dtype(dtype).str, tta=bool(tta))
    full_depth = ((0,) if offset else ()) + depth
    if output == "labels":
        return da.map_overlap(_predict_block, image, depth=full_depth, boundary="none", trim=False,
                              allow_rechunk=False, chunks=spatial_chunks, drop_axis=[0] if offset else [],
                              dtype=np.uint8, meta=np.empty((0,) * len(spatial_chunks), np.uint8),
                              **kwargs)
    channels = model.config.out_channels
    return da.map_overlap(_predict_block, image, depth=full_depth, boundary="none", trim=False,
                          allow_rechunk=False, chunks=((channels,), *spatial_chunks), new_axis=[] if offset else [0],
                          dtype=np.dtype(dtype),
                          meta=np.empty((0,) * (len(spatial_chunks) + 1), np.dtype(dtype)), **kwargs)


def _predict_block(block: np.ndarray, *, weights: dict[str, Any], plan: TilePlan,
                   chunks_per_axis: tuple[tuple[int, ...], ...], halo_depth: tuple[int, ...],
                   normalizer: dict[str, Any], kind: str, threshold: float, device: str,
                   precision: str, out_dtype: str, tta: bool = False,
                   block_info: dict | None = None) -> np.ndarray:
    """One dask block (core + overlap) through the shared tile runner: the block is one tile."""
    from napari_unet.labels import instances

    model = _worker_model(weights)
    torch_device = select_device(device)
    network = _worker_network(weights, torch_device, precision)
    location = block_info[None]["chunk-location"]
    spatial_location = location[-len(chunks_per_axis):]
    spatial_shape = block.shape[1:] if plan.has_channels else block.shape
    write, origin = [], []
    for index, chunks, pad in zip(spatial_location, chunks_per_axis, halo_depth):
        low = pad if index > 0 else 0
        write.append(slice(low, low + chunks[index]))
        origin.append(sum(chunks[:index]) - low)
    tile = Tile(tuple(slice(0, n) for n in spatial_shape), tuple(write))
    block_plan = dataclasses.replace(plan, spatial=tuple(spatial_shape), batch_size=1)
    if plan.scale is not None:  # the zoom's grid is the whole image's: global coordinates
        tile = Tile(tuple(slice(o, o + n) for o, n in zip(origin, spatial_shape)),
                    tuple(slice(o + w.start, o + w.stop) for o, w in zip(origin, write)))
        block_plan = dataclasses.replace(plan, batch_size=1)
    else:
        origin = None
    runner = TileRunner(block, network, Normalizer(**_normalizer_from_json(normalizer)),
                        torch_device, resolve_precision(precision, torch_device), model.task,
                        block_plan, tta=tta, origin=origin)
    core = runner.predict_core(tile)
    if kind == "labels":
        return instances.to_semantic(core, model.task, threshold=threshold).astype(np.uint8)
    return _to_output_dtype(core, np.dtype(out_dtype))


# --- one task per tile, into a zarr store --------------------------------------------------


def _tile_task(index: int, *, weights: dict[str, Any], image: Any, image_key: str, store: str,
               run_id: str, allow_channels: bool, device: str, precision: str) -> int:
    import zarr

    model = _worker_model(weights)

    def build_writer() -> TileWriter:
        group = zarr.open_group(store, mode="r+")
        info = dict(group.attrs[ATTRS_KEY])
        plan = stored_plan(group)
        settings_data = dict(info["fingerprint"]["settings"])
        if settings_data.get("voxel_size") is not None:
            settings_data["voxel_size"] = tuple(settings_data["voxel_size"])
        settings = StreamSettings(**settings_data)
        normalizer = Normalizer(**_normalizer_from_json(info["normalizer"]))
        source = _open_input(image, allow_channels)
        return TileWriter(group, source, model, plan, settings, normalizer, device, precision)

    writer = _cached("writer", f"{store}:{run_id}:{weights['token']}:{image_key}", build_writer)
    writer.run(int(index))
    return int(index)


def predict_to_zarr_distributed(
    client: Any,
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
    device: str = "cpu",
    precision: str = "auto",
    tile_shape: Sequence[int] | None = None,
    halo: Sequence[int] | None = None,
    max_tile_bytes: float | None = DEFAULT_MAX_TILE_BYTES,
    overwrite: bool = False,
    allow_channels: bool = False,
    tta: bool = False,
    stitch_threshold: float = DEFAULT_STITCH_THRESHOLD,
    scale: Sequence[float] | None = None,
) -> Generator[Progress, None, StreamResult]:
    """:func:`napari_unet.bigdata.streaming.predict_to_zarr` on a dask cluster, one task per tile.

    ``image`` is a path (TIFF, zarr, OME-Zarr; every worker opens it lazily, once) or an array
    that pickles (numpy, zarr; scattered once). ``path`` must be on storage every worker can
    write (a shared file system on a cluster). Same output, same resume, same parameters
    (``tta`` and ``scale`` are stored with the output, and the workers read them from there).
    """
    input_path = Path(image).expanduser().resolve() if isinstance(image, (str, os.PathLike)) else None
    local_image = _open_input(str(input_path), allow_channels) if input_path is not None else image
    run = start_stream(local_image, model, path, output=output, probabilities=probabilities,
                       probability_dtype=probability_dtype, threshold=threshold, min_size=min_size,
                       method=method, voxel_size=voxel_size, unit=unit, device=device,
                       precision=precision, tile_shape=tile_shape, halo=halo,
                       max_tile_bytes=max_tile_bytes, overwrite=overwrite, input_path=input_path,
                       stitch_threshold=stitch_threshold,
                       tta=tta, scale=scale)
    group, plan, result = run.group, run.plan, run.result
    if run.complete:
        return result
    todo = [int(i) for i in pending_tiles(group)]
    total = plan.n_tiles
    done = result.tiles_skipped = total - len(todo)
    start = time.perf_counter()
    yield Progress(done, total, 0.0, stage="plan",
                   message=plan.describe() + (tta_note(model) if run.settings.tta else ""))
    if todo:
        from distributed import as_completed

        weights = client.scatter(model_payload(model), broadcast=True)
        if input_path is not None:
            source = image_key = str(input_path)
        else:
            source = client.scatter(image, broadcast=False)
            image_key = source.key if isinstance(source.key, str) else repr(source.key)
        futures = client.map(_tile_task, todo, weights=weights, image=source, image_key=image_key,
                             store=str(Path(path).resolve()),
                             run_id=group.attrs[ATTRS_KEY].get("run_id", ""), allow_channels=allow_channels,
                             device=device, precision=precision, pure=False)
        try:
            for future in as_completed(futures):
                index = future.result()
                done += 1
                yield Progress(done, total, time.perf_counter() - start,
                               region=plan.tile(index).write)
        finally:
            client.cancel(futures)
    return (yield from finish_stream(run, min_size=min_size, min_overlap=min_overlap))


# --- batch: one task per file --------------------------------------------------------------


def _file_task(source: str, target: str, *, weights: dict[str, Any], options: dict[str, Any]) -> str:
    from napari_unet.engine.predict import segment
    from napari_unet.io.readers import read_image
    from napari_unet.io.writers import write_image_tiff, write_labels_tiff

    from napari_unet.engine.resample import scale_for_model
    from napari_unet.io.formats import voxel_size_um

    model = _worker_model(weights)
    output = options.get("output", "labels")

    def zoom(voxel_size: Any, unit: Any) -> Any:  # each file's own, from its voxel size (µm)
        return scale_for_model(model, voxel_size_um(voxel_size, unit),
                               options.get("object_size"))[0]

    if target.lower().endswith(".zarr"):
        from napari_unet.bigdata.streaming import predict_to_zarr
        from napari_unet.io.lazy import open_lazy

        image = open_lazy(source, allow_channels=model.config.in_channels > 1)
        drain(predict_to_zarr(image.data, model, target, output=output,
                              threshold=options.get("threshold"),
                              min_size=options.get("min_size"), voxel_size=image.voxel_size,
                              unit=image.unit, device=options.get("device", "cpu"),
                              precision=options.get("precision", "auto"),
                              tile_shape=options.get("tile_shape"), input_path=source,
                              overwrite=options.get("overwrite", False),
                              tta=options.get("tta", False),
                              scale=zoom(image.voxel_size, image.unit)))
        return target
    image = read_image(source, allow_channels=model.config.in_channels > 1)
    result = drain(segment(image.data, model, output=output, device=options.get("device", "cpu"),
                           precision=options.get("precision", "auto"),
                           tile_shape=options.get("tile_shape"), threshold=options.get("threshold"),
                           min_size=options.get("min_size"), voxel_size=image.voxel_size,
                           dtype=np.float32, tta=options.get("tta", False),
                           scale=zoom(image.voxel_size, image.unit)))
    if output == "probabilities":
        data = result.data if result.data.shape[0] > 1 else result.data[0]
        axes = ("C" if data.ndim > image.data.ndim else "") + image.spatial_axes
        write_image_tiff(target, data.astype(np.float32), voxel_size=image.voxel_size,
                         unit=image.unit or "um", input_path=source, axes=axes)
    else:
        write_labels_tiff(target, result.data, voxel_size=image.voxel_size,
                          unit=image.unit or "um", input_path=source)
    return target


def batch_inputs(folder: str | Path) -> list[Path]:
    """The images in ``folder`` (files of a supported type, and zarr stores), sorted."""
    from napari_unet.io.formats import SUPPORTED_SUFFIXES
    from napari_unet.io.lazy import is_zarr_path

    folder = Path(folder)
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and is_zarr_path(entry):
            found.append(entry)
        elif entry.is_file() and entry.name.lower().endswith(SUPPORTED_SUFFIXES) \
                and not entry.name.lower().endswith(".dcm"):
            found.append(entry)
    return found


def batch_output_path(source: Path, out_dir: Path, suffix: str = ".tif") -> Path:
    name = source.name
    for ending in (".ome.tiff", ".ome.tif", ".nii.gz", ".zarr", *(p for p in (source.suffix,) if p)):
        if name.lower().endswith(ending):
            name = name[: -len(ending)]
            break
    return out_dir / f"{name}{suffix}"


def predict_batch(files: Sequence[str | Path], model: SegmentationModel, out_dir: str | Path, *,
                  client: Any = None, suffix: str = ".tif", **options: Any
                  ) -> Generator[Progress, None, list[Path]]:
    """Segment many files, one task per file (on ``client``'s cluster, else here, in turn).

    Each output is ``out_dir/<name><suffix>`` (``.tif``: in memory per file; ``.zarr``:
    streamed). ``options``: ``output``, ``threshold``, ``min_size``, ``device``,
    ``precision``, ``tile_shape``, ``overwrite``, ``tta``, ``object_size`` (``(diameter,
    unit)``: each file is zoomed by its own voxel size). Returns the written paths, in input
    order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = [(str(Path(f)), str(batch_output_path(Path(f), out_dir, suffix))) for f in files]
    total = len(pairs)
    start = time.perf_counter()
    payload = model_payload(model)
    if client is None:
        for done, (source, target) in enumerate(pairs, 1):
            _file_task(source, target, weights=payload, options=options)
            yield Progress(done, total, time.perf_counter() - start, message=f"wrote {target}")
        return [Path(t) for _, t in pairs]
    from distributed import as_completed

    weights = client.scatter(payload, broadcast=True)
    futures = [client.submit(_file_task, source, target, weights=weights, options=options, pure=False)
               for source, target in pairs]
    try:
        for done, future in enumerate(as_completed(futures), 1):
            target = future.result()
            yield Progress(done, total, time.perf_counter() - start, message=f"wrote {target}")
    finally:
        client.cancel(futures)
    return [Path(t) for _, t in pairs]
