"""Seam-free tiled inference as a generator: yields :class:`Progress`, returns the result.

Tiles are read with a halo as large as the network's receptive field and only their centres
are kept, on the network's pooling grid, so the tiled result equals one untiled forward pass
(batch norm, eval mode). Inside a tile the network runs block by block on slabs
(:meth:`UNet.forward_low_memory`), which bounds memory without recomputation.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Generator, Iterator, Sequence

import numpy as np
import torch

from .checkpoint import SegmentationModel
from . import postprocess
from .models import UNet, fuse_for_inference
from .normalization import Normalizer, fit_normalizer
from .postprocess import DEFAULT_MIN_SIZE
from .tiling import Tile, count_tiles, plan_tiles

OUTPUTS = ("probabilities", "labels", "instances")
DEVICES = ("auto", "cpu", "cuda", "mps")
_MIN_TILE_HALVINGS = 4


@dataclass
class Progress:
    """One step of a long job.

    ``region`` is the part of the output (spatial slices) finished by this step, ``probabilities``
    a view of the finished probabilities there (channels first), so a viewer can show it at once.
    """

    done: int
    total: int
    elapsed: float
    region: tuple[slice, ...] | None = None
    probabilities: np.ndarray | None = None
    message: str = ""
    stage: str = "predict"

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    @property
    def eta(self) -> float | None:
        """Seconds left, estimated from the pace so far."""
        if not self.done or self.done >= self.total:
            return None if not self.done else 0.0
        return self.elapsed / self.done * (self.total - self.done)


@dataclass
class SegmentationResult:
    """What :func:`segment` returns: ``data`` is the requested output."""

    data: np.ndarray
    output: str
    probabilities: np.ndarray
    task: str
    class_names: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def available_devices() -> list[str]:
    """Devices usable here, best first (``cpu`` always)."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def select_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable explicit choice is an error."""
    if isinstance(device, torch.device):
        return device
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    found = available_devices()
    if device == "auto":
        return torch.device(found[0])
    if device not in found:
        raise ValueError(f"device {device!r} is not available here (found: {', '.join(found)})")
    return torch.device(device)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision used on ``device``: bf16 where CUDA supports it, else fp16; none on CPU/MPS."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil ships with napari
        return 4 * 2**30


def _bytes_per_voxel(network: UNet, device: torch.device) -> float:
    """Rough working-set size per input voxel of one tile, measured on this architecture."""
    config = network.config
    # low-memory forward on CPU keeps the skip tensors (about 1.3x the base width);
    # the plain forward on GPU holds about 10 base-width tensors at full resolution
    features = 1.4 * config.base_channels if device.type == "cpu" else 10 * config.base_channels
    bytes_per_value = 2 if autocast_dtype(device) else 4
    return bytes_per_value * features + 8 * (config.in_channels + config.out_channels)


def auto_tile_settings(network: UNet, work_shape: Sequence[int], device: torch.device,
                       slicewise: bool, max_bytes: float | None = None) -> tuple[tuple[int, ...], int]:
    """Tile shape (per work axis) and tile batch size that fit this device's free memory.

    Uses a quarter of free memory (at most 1.5 GB on the CPU, where larger tiles are no faster),
    and at most ``max_bytes`` when given (streamed inference bounds its working set this way).
    """
    budget = _available_memory(device) / 4
    if device.type == "cpu":
        budget = min(budget, 1.5 * 2**30)
    if max_bytes is not None:
        budget = min(budget, float(max_bytes))
    max_voxels = max(4096, int(budget / _bytes_per_voxel(network, device)))
    spatial = list(work_shape[1:] if slicewise else work_shape)
    divisor = network.config.divisor()
    tile = list(spatial)
    # shrink the longest axis until a tile fits, keeping multiples of the divisor
    while math.prod(tile) > max_voxels:
        axis = max(range(len(tile)), key=lambda a: tile[a] / divisor[a])
        if tile[axis] <= 2 * divisor[axis]:
            break
        tile[axis] = max(2 * divisor[axis], (tile[axis] // 2 + divisor[axis] - 1) // divisor[axis] * divisor[axis])
    if slicewise:
        batch = max(1, min(work_shape[0], max_voxels // max(1, math.prod(tile)), 64))
        return (1, *tile), batch
    batch = max(1, min(8, max_voxels // max(1, math.prod(tile))))
    return tuple(tile), batch


def _work_layout(image: Any, network: UNet) -> tuple[bool, bool]:
    """(slicewise, has_channels) for applying ``network`` to ``image``; clear errors otherwise."""
    dims, channels = network.config.spatial_dims, network.config.in_channels
    spatial_ndim = image.ndim - (1 if channels > 1 else 0)
    if channels > 1 and image.shape[0] != channels:
        raise ValueError(f"the model takes {channels} channels (channel axis first); "
                         f"got an image of shape {tuple(image.shape)}")
    if dims == 3 and spatial_ndim != 3:
        raise ValueError(f"this is a 3D model and needs a 3D stack (Z, Y, X); the image has "
                         f"shape {tuple(image.shape)}. Use a 2D model for single images.")
    if dims == 2 and spatial_ndim not in (2, 3):
        raise ValueError(f"a 2D model takes a 2D image or a stack of 2D slices; got shape "
                         f"{tuple(image.shape)}")
    return dims == 2 and spatial_ndim == 3, channels > 1


class _TileRunner:
    """Runs batches of tiles through the network, with OOM back-off and CPU fallback."""

    def __init__(self, image: Any, network: UNet, normalizer: Normalizer, device: torch.device,
                 amp: bool, task: str, out: Any, slicewise: bool, has_channels: bool):
        self.image, self.normalizer, self.task, self.out = image, normalizer, task, out
        self.slicewise, self.has_channels = slicewise, has_channels
        self.device = device
        self.amp = amp
        self.network = network.to(device)
        self.messages: list[str] = []

    def _read(self, tile: Tile) -> np.ndarray:
        index = ((slice(None),) if self.has_channels else ()) + tile.read
        data = self.normalizer(np.asarray(self.image[index]))
        if self.slicewise:  # a (1, y, x) tile of a stack is one 2D item; its z axis becomes channels
            return data[:, 0] if self.has_channels else data
        return data if self.has_channels else data[None]

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        dtype = autocast_dtype(self.device) if self.amp else None
        context = (torch.autocast(self.device.type, dtype=dtype) if dtype is not None
                   else contextlib.nullcontext())
        with torch.inference_mode(), context:
            if self.device.type == "cpu":
                logits = self.network.forward_low_memory(batch, slab_voxels=2**20)
            else:
                logits = self.network(batch)
            logits = logits.float()
            if self.task == "semantic":
                return torch.softmax(logits, dim=1)
            return torch.sigmoid(logits)

    def run(self, tiles: list[Tile]) -> None:
        """Predict ``tiles`` (same read shape) and write their centres to the output."""
        batch = torch.from_numpy(np.stack([self._read(t) for t in tiles])).to(self.device)
        probabilities = self._forward(batch).cpu().numpy()
        del batch
        for tile, tile_probs in zip(tiles, probabilities):
            crop = tile.crop[1:] if self.slicewise else tile.crop
            values = tile_probs[(slice(None), *crop)]
            if self.slicewise:
                values = values[:, None]
            self.out[(slice(None), *tile.write)] = _to_output_dtype(values, self.out.dtype)

    def free_memory(self) -> None:
        """Give cached accelerator memory back after an out-of-memory error."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def fall_back_to_cpu(self, reason: str) -> None:
        previous = self.device
        self.network = self.network.to("cpu")
        self.device = torch.device("cpu")
        if previous.type == "cuda":
            torch.cuda.empty_cache()
        self.messages.append(f"{reason} on {previous.type.upper()}; continuing on the CPU (slower)")


def _to_output_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.dtype(dtype) == np.uint8:
        return np.round(values * 255).astype(np.uint8)
    return values.astype(dtype, copy=False)


def _batches(tiles: list[Tile], batch_size: int) -> Iterator[list[Tile]]:
    batch: list[Tile] = []
    for tile in tiles:
        if batch and (len(batch) == batch_size or tile.read_shape != batch[0].read_shape):
            yield batch
            batch = []
        batch.append(tile)
    if batch:
        yield batch


def predict_probabilities(
    image: Any,
    model: SegmentationModel,
    *,
    device: str | torch.device = "auto",
    tile_shape: Sequence[int] | None = None,
    batch_size: int | None = None,
    halo: Sequence[int] | None = None,
    amp: bool = True,
    dtype: Any = np.float16,
    out: Any = None,
    normalizer: Normalizer | None = None,
    fuse: bool = True,
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
    tile_shape : sequence of int, optional
        Largest region (core + halo) run at once, per spatial axis of the image (for a 2D model
        on a stack: ``(y, x)``). Default: from the device's free memory.
    batch_size : int, optional
        Tiles (or slices) per forward pass. Default: from free memory.
    halo : sequence of int, optional
        Overlap per tile side; default the receptive field, which makes tiling seam-free.
    amp : bool
        Mixed precision on CUDA.
    dtype : numpy dtype
        ``float16`` (default), ``float32`` or ``uint8`` (0..255) for the output.
    out : array-like, optional
        Preallocated output of shape ``(channels, *spatial)`` (e.g. a zarr array).

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
    slicewise, has_channels = _work_layout(image, network)
    spatial = tuple(image.shape[1:] if has_channels else image.shape)
    torch_device = select_device(device)
    config = network.config
    net = fuse_for_inference(network) if fuse else network.eval()

    auto_tile, auto_batch = auto_tile_settings(net, spatial, torch_device, slicewise)
    if tile_shape is not None:
        tile = (1, *tuple(tile_shape)[-2:]) if slicewise else tuple(tile_shape)
        if len(tile) != len(spatial):
            raise ValueError(f"tile_shape {tuple(tile_shape)} does not match the image's {len(spatial)} axes")
    else:
        tile = auto_tile
    batch_size = batch_size or auto_batch
    net_halo = tuple(halo) if halo is not None else config.halo()
    net_div = config.divisor()
    work_halo = (0, *net_halo) if slicewise else net_halo
    work_div = (1, *net_div) if slicewise else net_div
    if len(work_halo) != len(spatial):
        raise ValueError(f"halo {tuple(net_halo)} does not match the model's {config.spatial_dims} axes")

    if out is None:
        out = np.empty((config.out_channels, *spatial), dtype=dtype)
    elif tuple(out.shape) != (config.out_channels, *spatial):
        raise ValueError(f"output array has shape {tuple(out.shape)}, expected {(config.out_channels, *spatial)}")
    normalizer = normalizer or fit_normalizer(image, model.normalization)
    runner = _TileRunner(image, net, normalizer, torch_device, amp, model.task, out, slicewise, has_channels)

    start = time.perf_counter()
    total = count_tiles(spatial, tile, work_halo, work_div)
    done = 0
    pending: list[tuple[list[Tile], int]] = [
        (batch, 0) for batch in _batches(plan_tiles(spatial, tile, work_halo, work_div), batch_size)
    ]
    fell_back = False
    while pending:
        tiles, halvings = pending.pop(0)
        try:
            runner.run(tiles)
        except torch.OutOfMemoryError:
            runner.free_memory()
            if len(tiles) > 1:  # smaller batch first
                half = len(tiles) // 2
                pending[:0] = [(tiles[:half], halvings), (tiles[half:], halvings)]
                runner.messages.append(f"out of memory: tile batch reduced to {half}")
            elif halvings < _MIN_TILE_HALVINGS and _can_shrink(tiles[0], work_div):
                smaller = tuple(max(d, min(t, n) >> (halvings + 1))
                                for t, n, d in zip(tile, spatial, work_div))
                sub = plan_tiles(spatial, smaller, work_halo, work_div, region=tiles[0].write)
                pending[:0] = [([t], halvings + 1) for t in sub]
                total += len(sub) - 1
                runner.messages.append(f"out of memory: tile reduced to {smaller}")
            elif not fell_back:
                fell_back = True
                runner.fall_back_to_cpu("out of memory")
                pending.insert(0, (tiles, halvings))
            else:
                raise MemoryError("not enough memory to run the model even on the smallest tiles; "
                                  "close other programs or use a smaller model") from None
            yield Progress(done, total, time.perf_counter() - start, message=runner.messages[-1])
            continue
        for finished in tiles:
            done += 1
            values = out[(slice(None), *finished.write)] if isinstance(out, np.ndarray) else None
            yield Progress(done, total, time.perf_counter() - start, region=finished.write,
                           probabilities=values)
    return out


def _can_shrink(tile: Tile, divisor: Sequence[int]) -> bool:
    """Whether a tile's core is larger than the divisor along some axis."""
    return any(size > d for size, d in zip(tile.write_shape, divisor))


def probabilities_to_output(probabilities: np.ndarray, task: str, output: str, *,
                            threshold: float = 0.5, min_size: int = DEFAULT_MIN_SIZE,
                            voxel_size: Sequence[float] | None = None) -> np.ndarray:
    """Turn probabilities into ``labels`` (binary or class ids) or ``instances``."""
    probs = np.asarray(probabilities)
    if probs.dtype == np.uint8:
        probs = probs.astype(np.float32) / 255
    if output == "probabilities":
        return probs
    if output == "labels":
        labels = postprocess.to_semantic(probs, task, threshold=threshold)
        if not min_size or task == "semantic":  # class ids are not objects
            return labels
        return postprocess.remove_small_objects(labels.astype(bool), min_size).astype(labels.dtype)
    if output == "instances":
        return postprocess.to_instances(probs, task, threshold=threshold, min_size=min_size,
                                        sampling=voxel_size)
    raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")


def segment(image: Any, model: SegmentationModel, *, output: str = "labels",
            threshold: float = 0.5, min_size: int = DEFAULT_MIN_SIZE,
            voxel_size: Sequence[float] | None = None,
            **predict_options: Any) -> Generator[Progress, None, SegmentationResult]:
    """Predict and post-process: the whole Segment job, as one generator.

    Yields the prediction's :class:`Progress` and one more step for post-processing;
    returns a :class:`SegmentationResult`.
    """
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    predictor = predict_probabilities(image, model, **predict_options)
    messages: list[str] = []
    last: Progress | None = None
    while True:
        try:
            last = next(predictor)
        except StopIteration as stop:
            probabilities = stop.value
            break
        if last.message:
            messages.append(last.message)
        yield last
    done = last.done if last else 0
    elapsed = last.elapsed if last else 0.0
    if output != "probabilities":
        yield Progress(done, done + 1, elapsed, message="post-processing", stage="postprocess")
    sampling = voxel_size if voxel_size is not None and model.spatial_dims == len(voxel_size) else None
    data = probabilities_to_output(probabilities, model.task, output, threshold=threshold,
                                   min_size=min_size, voxel_size=sampling)
    return SegmentationResult(data=data, output=output, probabilities=probabilities,
                              task=model.task, class_names=list(model.class_names), messages=messages)
