"""Seam-free tiled inference as a generator: yields :class:`Progress`, returns the result.

Tiles are read with a halo as large as the network's receptive field and only their centres
are kept, on the network's pooling grid, so the tiled result equals one untiled forward pass
(batch norm, eval mode). Inside a tile the network runs block by block on slabs
(:meth:`UNet.forward_low_memory`), which bounds memory without recomputation.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Iterator, Sequence

import numpy as np
import torch

from .checkpoint import SegmentationModel
from . import postprocess
from .models import UNet, fuse_for_inference
from .normalization import Normalizer, fit_normalizer
from .postprocess import DEFAULT_MIN_SIZE
from .precision import PrecisionPolicy, prepare_batch, resolve_precision
from .tiling import Tile, TilePlan, plan_run, plan_tiles

OUTPUTS = ("probabilities", "labels", "instances")
DEVICES = ("auto", "cpu", "cuda", "mps")


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


#: CPU working-set cap of one run's tiles: larger tiles compute fewer halo voxels, and past
#: this the halo overhead of the shipped models is small (see ``benchmarks/bench_inference.py``)
CPU_TILE_BUDGET = 8 * 2**30
#: Slices of a 2D model on a stack per forward pass on the CPU (more are no faster there and
#: delay the first results on screen)
CPU_MAX_SLICE_VOXELS = 2**22


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil ships with napari
        return 4 * 2**30


def bytes_per_voxel(network: UNet, device: torch.device, policy: PrecisionPolicy | None = None) -> float:
    """Working-set size per input voxel of one tile (measured: ``benchmarks/bench_inference.py``).

    The slab-wise CPU forward of a unet keeps the skip tensors and a few full-resolution
    temporaries, about 3.7 base-width values per voxel; the plain GPU forward holds about 10.
    Other architectures scale these (:meth:`UNetConfig.activation_widths`).
    """
    config = network.config
    policy = policy or resolve_precision("auto", device)
    value_bytes = 4 if policy.dtype is None else 2
    widths = config.activation_widths(low_memory=device.type == "cpu")
    return widths * config.base_channels * value_bytes + 8 * (config.in_channels + config.out_channels)


def tile_budget(device: torch.device, max_bytes: float | None = None) -> float:
    """Bytes one run's tiles may use: a quarter of free memory (capped on the CPU)."""
    budget = _available_memory(device) / 4
    if device.type == "cpu":
        budget = min(budget, CPU_TILE_BUDGET)
    if max_bytes is not None:
        budget = min(budget, float(max_bytes))
    return budget


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


def make_plan(image: Any, model: SegmentationModel, *, device: str | torch.device = "cpu",
              precision: str = "auto", tile_shape: Sequence[int] | None = None,
              halo: Sequence[int] | None = None, max_bytes: float | None = None,
              batch_size: int | None = None) -> TilePlan:
    """The tile plan for running ``model`` on ``image`` (anything with ``shape``/``ndim``).

    Without ``tile_shape`` the planner picks the tiles that compute the fewest voxels per voxel
    written (:func:`napari_unet.tiling.choose_cores`) within the device's memory budget
    (:func:`tile_budget`, at most ``max_bytes``). ``tile_shape`` is per spatial axis of the
    image; for a 2D model on a stack ``(y, x)`` or ``(slices, y, x)``.
    """
    network = model.network
    slicewise, has_channels = _work_layout(image, network)
    spatial = tuple(int(n) for n in (image.shape[1:] if has_channels else image.shape))
    config = network.config
    net_halo = tuple(int(h) for h in halo) if halo is not None else config.halo()
    if len(net_halo) != config.spatial_dims:
        raise ValueError(f"halo {tuple(net_halo)} does not match the model's {config.spatial_dims} axes")
    work_halo = (0, *net_halo) if slicewise else net_halo
    work_div = (1, *config.divisor()) if slicewise else config.divisor()
    torch_device = select_device(device)
    policy = resolve_precision(precision, torch_device)
    budget = tile_budget(torch_device, max_bytes)
    max_voxels = max(4096, int(budget / bytes_per_voxel(network, torch_device, policy)))
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    max_slices = None
    if slicewise:  # a tile of a stack is a batch of slices
        if batch_size is not None:
            max_slices = int(batch_size)
        elif torch_device.type == "cpu":
            max_slices = max(1, CPU_MAX_SLICE_VOXELS // max(1, spatial[1] * spatial[2]))
    tile = None
    if tile_shape is not None:
        tile = tuple(int(t) for t in tile_shape)
        if slicewise and len(tile) == 2:
            tile = (max_slices or 1, *tile)
    plan = plan_run(spatial, work_halo, work_div, max_voxels=max_voxels, slicewise=slicewise,
                    has_channels=has_channels, tile_shape=tile, max_slices=max_slices)
    if batch_size is not None and not slicewise:
        plan = dataclasses.replace(plan, batch_size=int(batch_size))
    return plan


def prepare_network(network: UNet, device: torch.device, policy: PrecisionPolicy,
                    fuse: bool = True) -> UNet:
    """An eval-mode copy (batch norm folded when ``fuse``) on ``device`` in the policy's layout."""
    net = fuse_for_inference(network) if fuse else network.eval()
    return net.to(device=device, memory_format=policy.memory_format(net.config.spatial_dims))


class TileRunner:
    """Runs tiles of one image through one prepared network: the engine every run shares.

    Parameters
    ----------
    source : array-like
        The image (numpy, zarr, dask, a lazy TIFF): only tile regions are read.
    network : UNet
        Prepared with :func:`prepare_network` (or any eval-mode network).
    normalizer : Normalizer
        Fitted once on the whole image, so tiles agree.
    device, policy
        Where and in which precision to run.
    task : str
        The model's task (``semantic`` gives softmax, everything else sigmoid).
    plan : TilePlan
        Halo, divisor and layout of the tiles.

    tta : bool
        Test-time augmentation: every batch runs under the :func:`tta_transforms` and the
        probabilities are averaged (see :meth:`_forward`); 8 times the work.
    on_spread : callable, optional
        With ``tta``: ``on_spread(tile, spread)`` for every core, the per-voxel disagreement
        between the augmentations (the uncertainty map uses it).

    :meth:`run` predicts a list of tiles and hands each finished core to a ``write`` callback:
    in-memory runs write into an array, streamed runs into zarr chunks, dask blocks into their
    own output. Out of memory, it halves the batch, then the tile, then moves to the CPU.
    """

    def __init__(self, source: Any, network: UNet, normalizer: Normalizer, device: torch.device,
                 policy: PrecisionPolicy, task: str, plan: TilePlan, tta: bool = False,
                 on_spread: Callable[[Tile, np.ndarray], None] | None = None):
        self.source, self.network, self.normalizer = source, network, normalizer
        self.device, self.policy, self.task, self.plan = device, policy, task, plan
        self.tta = bool(tta)
        #: with TTA, receives ``(tile, spread)`` for every core: the standard deviation of the
        #: probabilities over the augmentations, the largest over channels (``(1, *core)``)
        self.on_spread = on_spread
        self.messages: list[str] = []

    # -- one batch --------------------------------------------------------------------------

    def _read(self, tile: Tile) -> np.ndarray:
        """Network input items ``(n, C, *tile)`` for one tile (``n`` > 1 = slices of a stack)."""
        index = ((slice(None),) if self.plan.has_channels else ()) + tile.read
        data = self.normalizer(np.asarray(self.source[index]))
        if not self.plan.has_channels:
            data = data[None]
        if self.plan.slicewise:  # (C, z, y, x) -> z items of (C, y, x)
            return np.moveaxis(data, 1, 0)
        return data[None]

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Probabilities of a batch, and with TTA (and ``on_spread``) their spread.

        TTA pads the batch to the network's pooling grid first (edge values at the far end,
        as the network itself pads), so every transformed copy sees the pooling grid of the
        whole image and tiles stay exact. Probabilities (after sigmoid / softmax, not logits)
        are averaged over the transforms.
        """
        if not self.tta:
            return self._probabilities(batch), None
        shape = tuple(batch.shape[2:])
        padded = _pad_to_grid(batch, self.network.config.divisor())
        crop = (..., *(slice(0, n) for n in shape))
        mean = squares = None
        transforms = tta_transforms(self.network.config.spatial_dims)
        for count, transform in enumerate(transforms, start=1):
            values = _untransform(self._probabilities(_transform(padded, transform)), transform)
            values = values[crop]
            if mean is None:
                mean = values.clone()
                squares = torch.zeros_like(mean) if self.on_spread is not None else None
                continue
            # Welford's running mean and sum of squared deviations (no cancellation)
            delta = values - mean
            mean += delta / count
            if squares is not None:
                squares += delta * (values - mean)
            del values, delta
        spread = None
        if squares is not None:
            spread = squares.div_(len(transforms)).sqrt_().amax(dim=1, keepdim=True)
        return mean, spread

    def _probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        batch = prepare_batch(batch, self.policy)
        with torch.inference_mode():
            with self.policy.autocast():
                if self.device.type == "cpu":
                    logits = self.network.forward_low_memory(batch, slab_voxels=2**20)
                else:
                    logits = self.network(batch)
            logits = logits.float()
            if self.task == "semantic":
                return torch.softmax(logits, dim=1)
            return logits.sigmoid_()

    def _run_batch(self, tiles: list[Tile], write: Callable[[Tile, np.ndarray], None]) -> None:
        items = [self._read(tile) for tile in tiles]
        counts = [len(item) for item in items]
        batch = torch.from_numpy(np.concatenate(items) if len(items) > 1 else items[0]).to(self.device)
        del items
        probabilities, spread = self._forward(batch)
        probabilities = probabilities.cpu().numpy()
        spread = spread.cpu().numpy() if spread is not None else None
        del batch
        start = 0
        for tile, count in zip(tiles, counts):
            values = probabilities[start:start + count]
            spread_values = spread[start:start + count] if spread is not None else None
            start += count
            if self.plan.slicewise:  # z items of (C, y, x) -> (C, z, y, x)
                values = np.moveaxis(values, 0, 1)
                if spread_values is not None:
                    spread_values = np.moveaxis(spread_values, 0, 1)
                crop = (slice(None), *tile.crop[1:])
            else:
                values = values[0]
                spread_values = spread_values[0] if spread_values is not None else None
                crop = tile.crop
            if spread_values is not None and self.on_spread is not None:
                self.on_spread(tile, spread_values[(slice(None), *crop)])
            write(tile, values[(slice(None), *crop)])

    # -- many tiles, with memory back-off ---------------------------------------------------

    def run(self, tiles: Sequence[Tile], write: Callable[[Tile, np.ndarray], None]
            ) -> Generator[RunnerEvent, None, None]:
        """Predict ``tiles`` in batches of ``plan.batch_size`` (same read shape), calling
        ``write(tile, probabilities)`` for every finished core (float32, channels first).

        Yields a :class:`RunnerEvent` after every batch and every memory back-off.
        """
        pending: list[tuple[list[Tile], int]] = [
            (batch, 0) for batch in _batches(list(tiles), self.plan.batch_size)]
        fell_back = False
        while pending:
            batch, halvings = pending.pop(0)
            try:
                self._run_batch(batch, write)
            except torch.OutOfMemoryError:
                self.free_memory()
                added = 0
                if len(batch) > 1:  # smaller batch first
                    half = len(batch) // 2
                    pending[:0] = [(batch[:half], halvings), (batch[half:], halvings)]
                    message = f"out of memory: tile batch reduced to {half}"
                elif halvings < _MAX_TILE_HALVINGS and _can_shrink(batch[0], self.plan.divisor):
                    sub = self._split(batch[0], halvings + 1)
                    pending[:0] = [([t], halvings + 1) for t in sub]
                    message = f"out of memory: tile reduced to {sub[0].read_shape}"
                    added = len(sub) - 1
                elif not fell_back:
                    fell_back = True
                    message = self.fall_back_to_cpu("out of memory")
                    pending.insert(0, (batch, halvings))
                else:
                    raise MemoryError("not enough memory to run the model even on the smallest "
                                      "tiles; close other programs or use a smaller model") from None
                self.messages.append(message)
                yield RunnerEvent([], added, message)
                continue
            yield RunnerEvent(batch, 0, "")

    def predict_core(self, tile: Tile) -> np.ndarray:
        """float32 probabilities ``(C, *core)`` of one tile (a streamed chunk, a dask block)."""
        values = np.empty((self.network.config.out_channels, *tile.write_shape), np.float32)
        origin = [s.start for s in tile.write]

        def write(part: Tile, probabilities: np.ndarray) -> None:
            # a memory back-off may deliver the core in sub-tiles
            inner = tuple(slice(s.start - o, s.stop - o) for s, o in zip(part.write, origin))
            values[(slice(None), *inner)] = probabilities

        for _ in self.run([tile], write):
            pass
        return values

    def _split(self, tile: Tile, halvings: int) -> list[Tile]:
        """Sub-tiles of ``tile``'s core, each ``2**halvings`` times smaller per axis."""
        plan = self.plan
        smaller = tuple(max(d, min(t, n) >> halvings)
                        for t, n, d in zip(plan.tile_shape, plan.spatial, plan.divisor))
        return plan_tiles(plan.spatial, smaller, plan.halo, plan.divisor, region=tile.write)

    def free_memory(self) -> None:
        """Give cached accelerator memory back after an out-of-memory error."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def fall_back_to_cpu(self, reason: str) -> str:
        """Move the network to the CPU (in a precision it supports); returns what to tell the user."""
        previous = self.device
        self.device = torch.device("cpu")
        try:
            self.policy = resolve_precision(self.policy.requested, self.device)
        except ValueError:
            self.policy = resolve_precision("auto", self.device)
        layout = self.policy.memory_format(self.network.config.spatial_dims)
        self.network = self.network.to(device=self.device, memory_format=layout)
        if previous.type == "cuda":
            torch.cuda.empty_cache()
        return f"{reason} on {previous.type.upper()}; continuing on the CPU (slower)"


#: a test-time augmentation: (quarter turns in the y-x plane, flip x first, flip z)
Transform = tuple[int, bool, bool]


def tta_transforms(spatial_dims: int) -> list[Transform]:
    """The 8 test-time augmentations: the symmetries of the square in the y-x plane (4 quarter
    turns, each with and without an x flip).

    In 3D, z is flipped for the odd quarter turns too: the 8 transforms stay a group (so the
    averaged prediction is exactly invariant under them) at the cost of 8 passes, not 16.
    """
    return [(turns, flip, spatial_dims == 3 and turns % 2 == 1)
            for flip in (False, True) for turns in range(4)]


def _pad_to_grid(batch: torch.Tensor, divisor: Sequence[int]) -> torch.Tensor:
    """``batch`` padded with edge values at the far end of every spatial axis to a multiple of
    ``divisor``: what the network does to its input, done before a transform moves the end."""
    padding: list[int] = []
    for size, div in zip(reversed(batch.shape[2:]), reversed(tuple(divisor))):
        padding += [0, (-size) % div]
    if not any(padding):
        return batch
    return torch.nn.functional.pad(batch, padding, mode="replicate")


def _transform(batch: torch.Tensor, transform: Transform) -> torch.Tensor:
    turns, flip, flip_z = transform
    if flip:
        batch = torch.flip(batch, (-1,))
    if turns:
        batch = torch.rot90(batch, turns, (-2, -1))
    if flip_z:
        batch = torch.flip(batch, (-3,))
    return batch


def _untransform(batch: torch.Tensor, transform: Transform) -> torch.Tensor:
    turns, flip, flip_z = transform
    if flip_z:
        batch = torch.flip(batch, (-3,))
    if turns:
        batch = torch.rot90(batch, -turns, (-2, -1))
    if flip:
        batch = torch.flip(batch, (-1,))
    return batch


@dataclass
class RunnerEvent:
    """What :meth:`TileRunner.run` yields: ``finished`` tiles (their cores are written), tiles
    ``added`` by a memory back-off (sub-tiles), and a ``message`` ("" when there is none)."""

    finished: list[Tile]
    added: int
    message: str


_MAX_TILE_HALVINGS = 4


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


def _can_shrink(tile: Tile, divisor: Sequence[int]) -> bool:
    """Whether a tile's core is larger than the divisor along some axis."""
    return any(size > d for size, d in zip(tile.write_shape, divisor))


def first_tiles(plan: TilePlan, start_at: Sequence[int] | None,
                indices: Sequence[int] | None = None) -> list[Tile]:
    """The plan's tiles in run order: nearest to ``start_at`` first.

    For a 2D model on a stack the slice under ``start_at`` runs alone first (a batch of one),
    then the rest of its tile, so the first result is on screen after one slice.
    """
    order = plan.order(start_at, indices)
    tiles = [plan.tile(i) for i in order]
    if start_at is None or not plan.slicewise or not tiles or tiles[0].write_shape[0] == 1:
        return tiles
    first = tiles.pop(0)
    z = min(max(int(start_at[0]), first.write[0].start), first.write[0].stop - 1)
    parts = []
    for lo, hi in ((z, z + 1), (first.write[0].start, z), (z + 1, first.write[0].stop)):
        if hi > lo:
            parts.append(Tile((slice(lo, hi), *first.read[1:]), (slice(lo, hi), *first.write[1:])))
    return parts + tiles


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
        ``fp32`` (exact), ``bf16`` or ``fp16``; see :mod:`napari_unet.precision`.
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
        over channels; 0..0.5), e.g. for :func:`napari_unet.uncertainty.uncertainty_map`.

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
                         tile_shape=tile_shape, halo=halo, max_bytes=max_bytes, batch_size=batch_size)
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


def runner_progress(runner: TileRunner, tiles: Sequence[Tile],
                    write: Callable[[Tile, np.ndarray], None],
                    view: Callable[[Tile], tuple[tuple[slice, ...], np.ndarray | None]],
                    start: float) -> Generator[Progress, None, None]:
    """Run ``tiles`` through ``runner``: a :class:`Progress` per runner message and per finished
    tile, whose region and probabilities ``view(tile)`` gives (tiles added by an out-of-memory
    split count in the total)."""
    total, done = len(tiles), 0
    for event in runner.run(tiles, write):
        total += event.added
        if event.message:
            yield Progress(done, total, time.perf_counter() - start, message=event.message)
        for finished in event.finished:
            done += 1
            region, values = view(finished)
            yield Progress(done, total, time.perf_counter() - start, region=region,
                           probabilities=values)


#: above this many voxels computed per voxel written, a plan is worth a warning
_WASTEFUL_PLAN = 3.0


def _plan_warnings(config: Any, plan: TilePlan) -> list[str]:
    """What the user should know about a plan: inexact norms, tiles mostly made of halo."""
    warnings = []
    if config.norm != "batch" and plan.n_tiles > 1:
        # group and instance norm see a whole tile: tiled results differ from untiled ones
        warnings.append(f"this model uses {config.norm} norm, whose tiled result is not exact "
                        "(tile borders can differ); a tile as large as the image (--tile) avoids it")
    if plan.read_per_written > _WASTEFUL_PLAN:
        warnings.append(f"tiles of {plan.tile_shape} leave cores of {plan.core} after the halo "
                        f"{plan.halo}: {plan.read_per_written:.1f} voxels computed per voxel "
                        "written; larger tiles (or more memory) would be faster")
    return warnings


def postprocess_settings(model: SegmentationModel, threshold: float | None = None,
                         min_size: int | None = None, seed_threshold: float | None = None
                         ) -> tuple[float, int, float | None]:
    """``(threshold, min_size, seed_threshold)``: the values given, else the model's tuned
    ones (:attr:`SegmentationModel.postprocess`), else the built-in defaults (0.5,
    :data:`~napari_unet.postprocess.DEFAULT_MIN_SIZE`, the threshold)."""
    if threshold is None:
        threshold = float(model.postprocess_default("threshold", 0.5))
    if min_size is None:
        min_size = int(model.postprocess_default("min_size", DEFAULT_MIN_SIZE))
    if seed_threshold is None:
        seed_threshold = model.postprocess_default("seed_threshold", None)
    return float(threshold), int(min_size), None if seed_threshold is None else float(seed_threshold)


def probabilities_to_output(probabilities: np.ndarray, task: str, output: str, *,
                            threshold: float = 0.5, min_size: int = DEFAULT_MIN_SIZE,
                            voxel_size: Sequence[float] | None = None,
                            seed_threshold: float | None = None) -> np.ndarray:
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
                                        sampling=voxel_size, seed_threshold=seed_threshold)
    raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")


def segment(image: Any, model: SegmentationModel, *, output: str = "labels",
            threshold: float | None = None, min_size: int | None = None,
            voxel_size: Sequence[float] | None = None, seed_threshold: float | None = None,
            **predict_options: Any) -> Generator[Progress, None, SegmentationResult]:
    """Predict and post-process: the whole Segment job, as one generator.

    Yields the prediction's :class:`Progress` and one more step for post-processing;
    returns a :class:`SegmentationResult`. ``threshold``, ``min_size`` and ``seed_threshold``
    default to the model's tuned values (:func:`postprocess_settings`).
    """
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    predictor = predict_probabilities(image, model, **predict_options)
    return (yield from postprocessed(predictor, model, output=output, threshold=threshold,
                                     min_size=min_size, voxel_size=voxel_size,
                                     seed_threshold=seed_threshold))


def postprocessed(predictor: Generator[Progress, None, np.ndarray], model: Any, *, output: str,
                  threshold: float | None = None, min_size: int | None = None,
                  voxel_size: Sequence[float] | None = None, seed_threshold: float | None = None
                  ) -> Generator[Progress, None, SegmentationResult]:
    """Drain a probability ``predictor`` (passing its progress on), then post-process its
    result into ``output`` with ``model``'s settings (:func:`postprocess_settings`): the second
    half of :func:`segment`, shared with other predictors (e.g. bioimage.io models)."""
    threshold, min_size, seed_threshold = postprocess_settings(model, threshold, min_size,
                                                               seed_threshold)
    messages: list[str] = []
    last: Progress | None = None
    while True:
        try:
            last = next(predictor)
        except StopIteration as stop:
            probabilities = stop.value
            break
        if last.message and last.stage != "plan":
            messages.append(last.message)
        yield last
    done = last.done if last else 0
    elapsed = last.elapsed if last else 0.0
    if output != "probabilities":
        yield Progress(done, done + 1, elapsed, message="post-processing", stage="postprocess")
    sampling = voxel_size if voxel_size is not None and model.spatial_dims == len(voxel_size) else None
    data = probabilities_to_output(probabilities, model.task, output, threshold=threshold,
                                   min_size=min_size, voxel_size=sampling,
                                   seed_threshold=seed_threshold)
    return SegmentationResult(data=data, output=output, probabilities=probabilities,
                              task=model.task, class_names=list(model.class_names), messages=messages)
