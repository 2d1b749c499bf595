"""Which part of an image an interactive run predicts, and where its tiles go.

A run reads a region of the image (:attr:`PredictRegion.read`) and writes part of the result
(:attr:`PredictRegion.keep`, in the coordinates of the region read) into the labels: all of
it, except around a single slice predicted by a 3D model, which reads a slab of context (the
model's halo) and keeps the slice. Plain Python and numpy; no viewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: what to segment: the whole image, the slice on screen, or the part of the image in view
WHOLE, SLICE, VISIBLE = "whole", "slice", "visible"
SCOPES = (WHOLE, SLICE, VISIBLE)

Region = tuple[slice, ...]


def full_region(shape: Sequence[int]) -> Region:
    return tuple(slice(0, int(n)) for n in shape)


def covers(region: Region, shape: Sequence[int]) -> bool:
    """Whether ``region`` is the whole of an array of ``shape``."""
    return all(r.start == 0 and r.stop == n for r, n in zip(region, shape))


@dataclass(frozen=True)
class PredictRegion:
    """The region of the image read (``read``) and the part of the result kept (``keep``,
    relative to ``read``)."""

    read: Region
    keep: Region

    @property
    def offset(self) -> tuple[int, ...]:
        return tuple(s.start for s in self.read)

    @property
    def layer_region(self) -> Region:
        """Where the kept part goes in the labels (image coordinates)."""
        return tuple(slice(o + k.start, o + k.stop) for o, k in zip(self.offset, self.keep))

    def z_range(self, ndim: int) -> range:
        """The slices written (``range(1)`` for a 2D image)."""
        if ndim < 3:
            return range(1)
        first = self.layer_region[0]
        return range(first.start, first.stop)

    def reads_all(self, shape: Sequence[int]) -> bool:
        """Whether the whole image is read."""
        return covers(self.read, shape)

    def writes_all(self, shape: Sequence[int]) -> bool:
        """Whether the whole of the labels is written."""
        return covers(self.layer_region, shape)

    def to_layer(self, region: Region) -> tuple[Region, Region] | None:
        """Map a ``region`` of the run's output to (region in the labels, region in the output),
        the part of it that is kept; None when none is."""
        out_region, layer_region = [], []
        for r, k, o in zip(region, self.keep, self.offset):
            lo, hi = max(r.start, k.start), min(r.stop, k.stop)
            if hi <= lo:
                return None
            out_region.append(slice(lo, hi))
            layer_region.append(slice(o + lo, o + hi))
        return tuple(layer_region), tuple(out_region)

    def start_at(self, point: Sequence[int]) -> tuple[int, ...]:
        """An image index (e.g. the centre of the view) in the coordinates of the region read,
        clipped into it: where the run starts."""
        point = tuple(point)[-len(self.read):]
        return tuple(int(np.clip(p - r.start, 0, r.stop - r.start - 1))
                     for p, r in zip(point, self.read))


def slice_region(shape: Sequence[int], z: int, spatial_dims: int, halo: int = 0) -> PredictRegion:
    """Slice ``z`` of a stack of ``shape``: a 2D model reads the slice; a 3D model needs
    context, so it reads a slab of ``halo`` slices either side and keeps the slice."""
    full = full_region(shape)
    if spatial_dims == 2:
        return PredictRegion((slice(z, z + 1), *full[1:]), (slice(0, 1), *full[1:]))
    start, stop = max(0, z - halo), min(int(shape[0]), z + halo + 1)
    return PredictRegion((slice(start, stop), *full[1:]), (slice(z - start, z - start + 1), *full[1:]))


def visible_region(shape: Sequence[int], corners: Any, displayed: Sequence[int] = ()) -> PredictRegion:
    """The part of an image of ``shape`` in view: ``corners`` are the data indices of the
    view's corners (napari's ``corner_pixels``, 2 x ndim); the two displayed axes (and the
    last two) are cut to them, the others (all slices of a stack) are read whole."""
    corners = np.asarray(corners)
    region = list(full_region(shape))
    for axis in range(len(shape)):
        if axis in tuple(displayed)[-2:] or axis >= len(shape) - 2:
            lo = int(np.clip(np.floor(corners[0, axis]), 0, shape[axis] - 1))
            hi = int(np.clip(np.ceil(corners[1, axis]) + 1, lo + 1, shape[axis]))
            region[axis] = slice(lo, hi)
    read = tuple(region)
    return PredictRegion(read, tuple(slice(0, s.stop - s.start) for s in read))


def predict_region(scope: str, shape: Sequence[int], *, z: int | None = None,
                   spatial_dims: int = 2, halo: int = 0, corners: Any = None,
                   displayed: Sequence[int] = ()) -> PredictRegion:
    """The region a run in ``scope`` (:data:`SCOPES`) reads and keeps.

    :data:`SLICE` needs ``z`` (the slice on screen) and applies to stacks only (a 2D image is
    read whole); :data:`VISIBLE` needs ``corners`` (see :func:`visible_region`).
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if scope == SLICE and len(shape) == 3:
        if z is None:
            raise ValueError("a current-slice run needs the slice index")
        return slice_region(shape, z, spatial_dims, halo)
    if scope == VISIBLE:
        return visible_region(shape, corners, displayed)
    full = full_region(shape)
    return PredictRegion(full, full)
