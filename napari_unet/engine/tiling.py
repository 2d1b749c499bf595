"""Split an array into overlapping tiles whose cropped centres tile it exactly.

Each tile is read with a halo around its core and only the core is written back. Cores start
on multiples of the network's divisor and halos are multiples of it too, so every tile sees the
same pooling grid as the whole image: with a halo at least as large as the receptive field the
tiled result equals the untiled one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence


@dataclass(frozen=True)
class Tile:
    """One tile: ``read`` is the input region (core + halo), ``write`` the output region (core),
    ``crop`` the core's position inside the tile's own output."""

    read: tuple[slice, ...]
    write: tuple[slice, ...]

    @property
    def crop(self) -> tuple[slice, ...]:
        return tuple(
            slice(w.start - r.start, w.stop - r.start) for r, w in zip(self.read, self.write)
        )

    @property
    def read_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.read)

    @property
    def write_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.write)


def core_size(tile: int, halo: int, divisor: int, length: int) -> int:
    """Largest core (a multiple of ``divisor``) such that core + 2 * halo fits in ``tile``.

    A tile at least as long as the axis gives a single core covering it.
    """
    if tile >= length:
        return length
    core = (tile - 2 * halo) // divisor * divisor
    return max(divisor, core)


def plan_tiles(shape: Sequence[int], tile_shape: Sequence[int], halo: Sequence[int],
               divisor: Sequence[int] | None = None,
               region: Sequence[slice] | None = None) -> list[Tile]:
    """Tiles covering ``shape``; cores are disjoint and their union is the whole array.

    Parameters
    ----------
    shape : sequence of int
        Array shape.
    tile_shape : sequence of int
        Largest region read at once (core + both halos); values >= the axis length mean
        "no tiling along this axis".
    halo : sequence of int
        Overlap on each side of a core (clipped at the array border).
    divisor : sequence of int, optional
        Cores start on multiples of this (the network's pooling grid).
    region : sequence of slice, optional
        Only cover this part (its start must be a multiple of ``divisor``); halos still reach
        into the rest of the array.
    """
    if not (len(shape) == len(tile_shape) == len(halo)):
        raise ValueError(f"shape {shape}, tile_shape {tile_shape} and halo {halo} differ in length")
    divisor = divisor or (1,) * len(shape)
    if any(h % d for h, d in zip(halo, divisor)):
        raise ValueError(f"halo {tuple(halo)} must be a multiple of the divisor {tuple(divisor)}")
    region = region or tuple(slice(0, n) for n in shape)
    axes = []
    for length, tile, pad, div, part in zip(shape, tile_shape, halo, divisor, region):
        if tile < 1:
            raise ValueError(f"tile sizes must be positive, got {tuple(tile_shape)}")
        if part.start % div:
            raise ValueError(f"region start {part.start} is not a multiple of the divisor {div}")
        core = core_size(tile, pad, div, part.stop - part.start)
        spans = []
        for start in range(part.start, part.stop, core):
            stop = min(part.stop, start + core)
            spans.append((slice(max(0, start - pad), min(length, stop + pad)), slice(start, stop)))
        axes.append(spans)
    return [
        Tile(tuple(r for r, _ in combo), tuple(w for _, w in combo))
        for combo in _product(axes)
    ]


def _product(axes: list[list[tuple[slice, slice]]]) -> Iterator[tuple[tuple[slice, slice], ...]]:
    if not axes:
        yield ()
        return
    for head in axes[0]:
        for rest in _product(axes[1:]):
            yield (head, *rest)


# --- the plan of a whole run ---------------------------------------------------------------


def axis_read_per_written(length: int, core: int, halo: int) -> float:
    """Voxels read (core + halo, clipped at the borders) per voxel written, along one axis."""
    if core >= length:
        return 1.0
    read = sum(min(length, start + core + halo) - max(0, start - halo)
               for start in range(0, length, core))
    return read / length


def _core_candidates(length: int, halo: int, divisor: int) -> list[int]:
    """Useful core sizes along one axis: the smallest core (a multiple of ``divisor``) for each
    tile count, largest first. A core of ``length`` means one tile (no halo needed)."""
    candidates = {length}
    for count in range(2, math.ceil(length / divisor) + 1):
        core = math.ceil(math.ceil(length / count) / divisor) * divisor
        if core < length:
            candidates.add(core)
    return sorted(candidates, reverse=True)


def _read_length(length: int, core: int, halo: int) -> int:
    return length if core >= length else min(length, core + 2 * halo)


def choose_cores(shape: Sequence[int], halo: Sequence[int], divisor: Sequence[int],
                 max_voxels: int, max_core: Sequence[int] | None = None) -> tuple[int, ...]:
    """Core shape that computes the fewest voxels per voxel written, with tiles of at most
    ``max_voxels`` voxels (core + halo, clipped to the array).

    The cost of a plan is the product over axes of :func:`axis_read_per_written`. All axes but
    the last are searched over their useful core sizes; the last one takes the largest core
    that still fits. Ties go to fewer, then more even tiles. When not even the smallest tile
    fits, the smallest tile is returned (the caller's memory back-off takes over).
    """
    ndim = len(shape)
    max_core = tuple(max_core) if max_core is not None else tuple(shape)
    per_axis = [
        [c for c in _core_candidates(n, h, d) if c <= max(m, d)] or [d]
        for n, h, d, m in zip(shape, halo, divisor, max_core)
    ]
    best: tuple[float, int, tuple[int, ...]] | None = None
    axis_cost = [{c: axis_read_per_written(n, c, h) for c in cores}
                 for n, h, cores in zip(shape, halo, per_axis)]

    def consider(cores: tuple[int, ...]) -> None:
        nonlocal best
        cost = math.prod(costs[c] for costs, c in zip(axis_cost, cores))
        tiles = math.prod(math.ceil(n / c) for n, c in zip(shape, cores))
        key = (round(cost, 9), tiles, cores)
        if best is None or key[:2] < best[:2]:
            best = key

    def search(axis: int, cores: tuple[int, ...], voxels: int) -> None:
        if axis == ndim - 1:
            room = max_voxels // voxels
            last = per_axis[axis]
            fitting = [c for c in last if _read_length(shape[axis], c, halo[axis]) <= room]
            if fitting:
                consider((*cores, fitting[0]))
            return
        for core in per_axis[axis]:
            read = _read_length(shape[axis], core, halo[axis])
            if voxels * read > max_voxels:
                continue
            search(axis + 1, (*cores, core), voxels * read)

    search(0, (), 1)
    if best is None:  # nothing fits: the smallest cores
        return tuple(axis[-1] for axis in per_axis)
    return best[2]


@dataclass(frozen=True)
class TilePlan:
    """Tiles over an image's spatial axes: the one plan every run (in memory, streamed, dask)
    executes. ``core`` is the tile core (and a streamed output's chunk shape).

    ``tile_shape``, ``halo``, ``divisor``, ``core`` and ``grid`` are per spatial axis of the
    image (for a 2D model on a stack ``z`` has halo 0 and divisor 1, and a tile holds ``core[0]``
    slices run as one batch). ``batch_size`` tiles of the same shape run in one forward pass.

    ``scale`` (per spatial axis; ``None``: none) zooms the image before the network
    (:mod:`napari_unet.engine.resample`): ``halo`` and ``divisor`` are then those of the image
    grid (the halo enlarged by the zoom) and ``net_halo`` / ``net_divisor`` the network's.
    """

    spatial: tuple[int, ...]
    tile_shape: tuple[int, ...]
    halo: tuple[int, ...]
    divisor: tuple[int, ...]
    core: tuple[int, ...]
    slicewise: bool
    has_channels: bool
    batch_size: int = 1
    scale: tuple[float, ...] | None = None
    net_halo: tuple[int, ...] | None = None
    net_divisor: tuple[int, ...] | None = None

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(math.ceil(n / c) for n, c in zip(self.spatial, self.core))

    @property
    def n_tiles(self) -> int:
        return math.prod(self.grid)

    @property
    def read_per_written(self) -> float:
        """Voxels the network computes per output voxel (1.0 = no halo overhead)."""
        return math.prod(axis_read_per_written(n, c, h)
                         for n, c, h in zip(self.spatial, self.core, self.halo))

    def tile(self, index: int) -> Tile:
        """Tile number ``index`` (row-major over :attr:`grid`) without planning all of them."""
        position = []
        for size in reversed(self.grid):
            index, rest = divmod(index, size)
            position.append(rest)
        read, write = [], []
        for g, n, c, h in zip(reversed(position), self.spatial, self.core, self.halo):
            start, stop = g * c, min(n, (g + 1) * c)
            write.append(slice(start, stop))
            read.append(slice(max(0, start - h), min(n, stop + h)))
        return Tile(tuple(read), tuple(write))

    def tiles(self) -> list[Tile]:
        """All tiles, in row-major order of :attr:`grid`."""
        return [self.tile(i) for i in range(self.n_tiles)]

    def index_at(self, point: Sequence[int]) -> int:
        """Index of the tile whose core contains ``point`` (clipped into the array)."""
        index = 0
        for p, n, c, g in zip(point, self.spatial, self.core, self.grid):
            index = index * g + min(g - 1, max(0, int(p)) // c)
        return index

    def order(self, start_at: Sequence[int] | None = None,
              indices: Sequence[int] | None = None) -> list[int]:
        """Tile indices (all, or ``indices``) to run: row-major, or nearest to ``start_at`` first."""
        todo = list(range(self.n_tiles)) if indices is None else [int(i) for i in indices]
        if start_at is None:
            return todo
        if len(start_at) != len(self.spatial):
            raise ValueError(f"start_at {tuple(start_at)} does not match the image's "
                             f"{len(self.spatial)} axes")
        first = self.index_at(start_at)

        def distance(index: int) -> tuple[int, float]:
            tile = self.tile(index)
            centre = [(s.start + s.stop) / 2 for s in tile.write]
            return (index != first, sum((c - p) ** 2 for c, p in zip(centre, start_at)))

        return sorted(todo, key=distance)

    def describe(self) -> str:
        """One line for a progress message, e.g. ``12 tiles of (64, 256, 256), 1.31 read/written``
        (with a zoom: ``, resampled x0.5`` or per axis)."""
        text = (f"{self.n_tiles} tile{'s' if self.n_tiles != 1 else ''} of "
                f"{tuple(self.tile_shape)}, {self.read_per_written:.2f} read/written")
        if self.scale is not None:
            zooms = sorted(set(self.scale))
            shown = (f"{zooms[0]:.3g}" if len(zooms) == 1
                     else "(" + ", ".join(f"{s:.3g}" for s in self.scale) + ")")
            text += f", resampled x{shown}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TilePlan":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in known.items()})


def plan_run(spatial: Sequence[int], halo: Sequence[int], divisor: Sequence[int], *,
             max_voxels: int, slicewise: bool, has_channels: bool,
             tile_shape: Sequence[int] | None = None, max_batch: int = 8,
             max_slices: int | None = None) -> TilePlan:
    """The :class:`TilePlan` for an image: ``tile_shape`` when given (core = what fits in it,
    never silently below it), else the tiles of :func:`choose_cores` within ``max_voxels``.

    ``max_slices`` caps the slices per tile of a 2D model on a stack (bigger batches are no
    faster on a CPU and delay the first results).
    """
    spatial = tuple(int(n) for n in spatial)
    halo, divisor = tuple(int(h) for h in halo), tuple(int(d) for d in divisor)
    if tile_shape is not None:
        tile = tuple(int(t) for t in tile_shape)
        if len(tile) != len(spatial):
            raise ValueError(f"tile_shape {tile} does not match the image's {len(spatial)} axes")
        if any(t < 1 for t in tile):
            raise ValueError(f"tile sizes must be positive, got {tile}")
        core = tuple(core_size(t, h, d, n) for t, h, d, n in zip(tile, halo, divisor, spatial))
    else:
        cap = list(spatial)
        if slicewise and max_slices is not None:
            cap[0] = max(1, min(cap[0], max_slices))
        core = choose_cores(spatial, halo, divisor, max_voxels, max_core=cap)
    read = tuple(_read_length(n, c, h) for n, c, h in zip(spatial, core, halo))
    batch = 1
    if not slicewise:
        batch = max(1, min(max_batch, max_voxels // max(1, math.prod(read))))
    return TilePlan(spatial, read, halo, divisor, core, slicewise, has_channels, batch_size=batch)
