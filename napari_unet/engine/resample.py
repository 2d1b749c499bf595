"""Per-tile resampling: the network sees the image zoomed so its objects have the size it was
trained on, and the probabilities come back on the image's own grid (issue 21, item 3).

Every axis with a zoom has one global resampled grid of ``M = round(N * scale)`` samples;
sample ``j`` sits at image coordinate ``(j + 0.5) * N / M - 0.5`` (pixel centres aligned, as
``align_corners=False``). A tile's core (image voxels) needs the network samples around it;
those are computed on a window of the global grid that starts on a multiple of the network's
divisor and reaches the network halo beyond them, from the image voxels that the linear
interpolation of the window touches. So every tile computes the values the whole image would
(tiling stays exact), and the probabilities are interpolated back linearly onto the core.
Axes without a zoom (``M == N``) keep the plain tiling rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def network_length(length: int, scale: float) -> int:
    """Samples of the resampled grid of an axis of ``length`` voxels."""
    return max(1, int(round(length * float(scale))))


def image_halo(net_halo: int, net_divisor: int, length: int, scale: float) -> int:
    """Image voxels each side of a core that hold every voxel its network window reads."""
    # left: (halo + divisor) / ratio + 1; right: (halo + 1.5) / ratio + 1 (the core's last
    # sample can be clamped half a sample up); both with room to spare
    ratio = network_length(length, scale) / length
    return int(math.ceil((net_halo + net_divisor + 2) / ratio)) + 2


@dataclass(frozen=True)
class AxisWindow:
    """One axis of a tile: the image voxels to read, the network samples computed from them,
    and the core written. ``resampled`` is False on an axis without a zoom (then the window
    is the read region)."""

    read: slice
    network: slice
    write: slice
    length: int
    network_length: int
    resampled: bool

    def input_positions(self) -> np.ndarray:
        """Image coordinates of the window's network samples."""
        j = np.arange(self.network.start, self.network.stop, dtype=np.float64)
        return _position(j, self.network_length, self.length)

    def output_positions(self) -> np.ndarray:
        """Network coordinates of the core's image voxels."""
        i = np.arange(self.write.start, self.write.stop, dtype=np.float64)
        return _position(i, self.length, self.network_length)


def axis_window(write: slice, length: int, scale: float, net_halo: int,
                net_divisor: int) -> AxisWindow:
    """The :class:`AxisWindow` of a core ``write`` along an axis of ``length`` voxels."""
    m = network_length(length, scale)
    if m == length:  # no zoom: the plain tile (core + halo, the start on the divisor grid)
        start = max(0, (write.start - net_halo) // net_divisor * net_divisor)
        read = slice(start, min(length, write.stop + net_halo))
        return AxisWindow(read, read, write, length, m, False)
    # the samples the linear interpolation touches (positions clamped as in _interpolate)
    low = math.floor(_clamp(_position(write.start, length, m), m))
    high = min(m - 1, math.floor(_clamp(_position(write.stop - 1, length, m), m)) + 1)
    j0 = max(0, (low - net_halo) // net_divisor * net_divisor)
    j1 = min(m, high + 1 + net_halo)
    a = math.floor(_clamp(_position(j0, m, length), length))
    b = min(length - 1, math.floor(_clamp(_position(j1 - 1, m, length), length)) + 1)
    return AxisWindow(slice(a, b + 1), slice(j0, j1), write, length, m, True)


def _position(index, length: int, other: int):
    """Coordinate on a grid of ``other`` samples of sample ``index`` of a grid of ``length``
    (both spanning the same extent, centres aligned); one formula for scalars and arrays, so
    that planned windows and interpolation agree to the last bit."""
    return (index + 0.5) * other / length - 0.5


def _clamp(position: float, length: int) -> float:
    return min(length - 1.0, max(0.0, position))


def tile_windows(write: Sequence[slice], spatial: Sequence[int], scale: Sequence[float],
                 net_halo: Sequence[int], net_divisor: Sequence[int]) -> tuple[AxisWindow, ...]:
    """The :class:`AxisWindow` of every axis of a tile's core."""
    return tuple(axis_window(w, n, s, h, d)
                 for w, n, s, h, d in zip(write, spatial, scale, net_halo, net_divisor))


def _interpolate(data: np.ndarray, axis: int, positions: np.ndarray, length: int,
                 offset: int) -> np.ndarray:
    """Linear interpolation of ``data`` (whose index 0 is global index ``offset`` of an axis of
    ``length``) at global ``positions`` along ``axis``, clamped to the axis."""
    position = np.clip(positions, 0, length - 1)
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, length - 1)
    weight = (position - below).astype(np.float32)
    shape = [1] * data.ndim
    shape[axis] = len(weight)
    weight = weight.reshape(shape)
    first = np.take(data, below - offset, axis=axis)
    second = np.take(data, above - offset, axis=axis)
    return first + (second - first) * weight


def to_network(data: np.ndarray, windows: Sequence[AxisWindow]) -> np.ndarray:
    """The network input of a tile: ``data`` ``(C, *read)`` resampled to ``(C, *network)``."""
    data = np.asarray(data, np.float32)
    for axis, window in enumerate(windows, start=1):
        if window.resampled:
            data = _interpolate(data, axis, window.input_positions(), window.length,
                                window.read.start)
    return data


def to_image(values: np.ndarray, windows: Sequence[AxisWindow]) -> np.ndarray:
    """Network output ``(C, *network)`` of a tile back on its core ``(C, *write)``."""
    for axis, window in enumerate(windows, start=1):
        if window.resampled:
            values = _interpolate(values, axis, window.output_positions(),
                                  window.network_length, window.network.start)
        else:
            start = window.write.start - window.network.start
            index = [slice(None)] * values.ndim
            index[axis] = slice(start, start + window.write.stop - window.write.start)
            values = values[tuple(index)]
    return np.ascontiguousarray(values, dtype=np.float32)


def scale_for_model(model: object, voxel_size: Sequence[float] | None,
                    size: tuple[float, str | None] | None = None
                    ) -> tuple[tuple[float, ...] | None, str]:
    """:func:`~napari_unet.labels.object_size.network_scale` for ``model`` (its stored object
    size and voxel size) on an image with ``voxel_size``: ``(zoom per model axis or None, where
    it comes from)``."""
    from napari_unet.labels.object_size import network_scale

    dims = int(getattr(model, "spatial_dims"))
    return network_scale(getattr(model, "object_size", None), getattr(model, "voxel_size", None),
                         dims, voxel_size, size)
