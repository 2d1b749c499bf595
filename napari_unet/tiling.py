"""Split an array into overlapping tiles whose cropped centres tile it exactly.

Each tile is read with a halo around its core and only the core is written back. Cores start
on multiples of the network's divisor and halos are multiples of it too, so every tile sees the
same pooling grid as the whole image: with a halo at least as large as the receptive field the
tiled result equals the untiled one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence


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


def count_tiles(shape: Sequence[int], tile_shape: Sequence[int], halo: Sequence[int],
                divisor: Sequence[int] | None = None) -> int:
    """Number of tiles :func:`plan_tiles` makes, without making them."""
    divisor = divisor or (1,) * len(shape)
    return math.prod(
        math.ceil(length / core_size(tile, pad, div, length))
        for length, tile, pad, div in zip(shape, tile_shape, halo, divisor)
    )
