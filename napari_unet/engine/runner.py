"""The one tile engine: batches of tiles through the network, OOM back-off, and its events."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator, Sequence

import numpy as np
import torch

from napari_unet.engine.resample import AxisWindow, tile_windows, to_image, to_network
from napari_unet.engine.threads import ThreadTuner
from napari_unet.engine.tiling import Tile, TilePlan, plan_tiles
from napari_unet.engine.tta import (
    _pad_to_grid,
    _transform,
    _untransform,
    tta_transforms,
)
from napari_unet.model.normalization import Normalizer
from napari_unet.model.precision import (
    PrecisionPolicy,
    prepare_batch,
    resolve_precision,
)
from napari_unet.model.unet import UNet, fuse_for_inference
from napari_unet.progress import Progress


#: a run of at least this many tile batches chooses its thread count by timing them
_TUNED_BATCHES = 6

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
    origin : sequence of int, optional
        Where ``source`` starts in the plan's coordinates (a dask block); default 0.

    :meth:`run` predicts a list of tiles and hands each finished core to a ``write`` callback:
    in-memory runs write into an array, streamed runs into zarr chunks, dask blocks into their
    own output. Out of memory, it halves the batch, then the tile, then moves to the CPU.
    """

    def __init__(self, source: Any, network: UNet, normalizer: Normalizer, device: torch.device,
                 policy: PrecisionPolicy, task: str, plan: TilePlan, tta: bool = False,
                 on_spread: Callable[[Tile, np.ndarray], None] | None = None,
                 origin: Sequence[int] | None = None):
        self.source, self.network, self.normalizer = source, network, normalizer
        #: the plan's coordinates of ``source``'s first voxel (a dask block of a larger image)
        self.origin = tuple(origin) if origin is not None else (0,) * len(plan.spatial)
        self.device, self.policy, self.task, self.plan = device, policy, task, plan
        self.tta = bool(tta)
        #: with TTA, receives ``(tile, spread)`` for every core: the standard deviation of the
        #: probabilities over the augmentations, the largest over channels (``(1, *core)``)
        self.on_spread = on_spread
        self.messages: list[str] = []

    # -- one batch --------------------------------------------------------------------------

    def _windows(self, tile: Tile) -> tuple[AxisWindow, ...] | None:
        """With a zoom: the read region, network window and core of every axis of ``tile``."""
        plan = self.plan
        if plan.scale is None:
            return None
        return tile_windows(tile.write, plan.spatial, plan.scale, plan.net_halo, plan.net_divisor)

    def _read(self, tile: Tile, windows: tuple[AxisWindow, ...] | None = None) -> np.ndarray:
        """Network input items ``(n, C, *tile)`` for one tile (``n`` > 1 = slices of a stack);
        with a zoom, the tile resampled to its network window."""
        region = tile.read if windows is None else tuple(w.read for w in windows)
        local = tuple(slice(r.start - o, r.stop - o) for r, o in zip(region, self.origin))
        shape = self.source.shape[-len(local):]
        if any(s.start < 0 or s.stop > n for s, n in zip(local, shape)):
            raise RuntimeError(f"tile {region} reaches outside its source {tuple(shape)} "
                               f"(origin {self.origin}): the halo is too small")
        index = ((slice(None),) if self.plan.has_channels else ()) + local
        data = self.normalizer(np.asarray(self.source[index]))
        if not self.plan.has_channels:
            data = data[None]
        if windows is not None:
            data = to_network(data, windows)
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
        windows = [self._windows(tile) for tile in tiles]
        items = [self._read(tile, w) for tile, w in zip(tiles, windows)]
        # a zoom can give tiles of one read shape network windows of different shapes
        groups: dict[tuple[int, ...], list[int]] = {}
        for number, item in enumerate(items):
            groups.setdefault(item.shape[1:], []).append(number)
        for numbers in groups.values():
            self._run_group([tiles[i] for i in numbers], [items[i] for i in numbers],
                            [windows[i] for i in numbers], write)

    def _run_group(self, tiles: list[Tile], items: list[np.ndarray],
                   windows: list[tuple[AxisWindow, ...] | None],
                   write: Callable[[Tile, np.ndarray], None]) -> None:
        counts = [len(item) for item in items]
        batch = torch.from_numpy(np.concatenate(items) if len(items) > 1 else items[0]).to(self.device)
        del items
        probabilities, spread = self._forward(batch)
        probabilities = probabilities.cpu().numpy()
        spread = spread.cpu().numpy() if spread is not None else None
        del batch
        start = 0
        for tile, count, tile_windows_ in zip(tiles, counts, windows):
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
            if tile_windows_ is not None:  # back on the image grid, the core only
                values = to_image(values, tile_windows_)
                if spread_values is not None:
                    spread_values = to_image(spread_values, tile_windows_)
                crop = ()
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
        # enough batches to time: the thread count is chosen by measurement (see ThreadTuner)
        tuner = ThreadTuner(enabled=self.device.type == "cpu" and len(pending) >= _TUNED_BATCHES)
        try:
            yield from self._run_pending(pending, write, tuner)
        finally:
            tuner.close()

    def _run_pending(self, pending: list[tuple[list[Tile], int]], write: Callable[[Tile, np.ndarray], None],
                     tuner: ThreadTuner) -> Generator[RunnerEvent, None, None]:
        fell_back = False
        while pending:
            batch, halvings = pending.pop(0)
            try:
                tuner.before_step()
                self._run_batch(batch, write)
                tuner.after_step(sum(math.prod(t.read_shape) for t in batch))
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
