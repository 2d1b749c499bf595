"""One UNet for 2D and 3D images, built from blocks that take ``spatial_dims``.

Besides the usual ``forward``, :meth:`UNet.forward_low_memory` runs the same network
slab by slab at every resolution level. Every block is local (3x3 convolutions, 2x2 pooling,
2x2 transposed convolutions; batch norm in eval mode is a per-channel affine map), so computing
each block on overlapping slabs and cropping the overlap gives the same numbers as the plain
forward pass while the large full-resolution temporaries never exist all at once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "group", "instance")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet`.

    Parameters
    ----------
    spatial_dims : int
        2 for images, 3 for volumes.
    in_channels, out_channels : int
        Channels of the input image and of the network output (logits).
    base_channels : int
        Feature channels at full resolution; doubled at every level.
    depth : int
        Number of resolution levels (``depth - 1`` poolings).
    norm : str
        ``"batch"``, ``"group"`` or ``"instance"``.
    inplane_only_levels : tuple of int
        3D only: pooling steps (0 = first pooling) that pool y and x but keep z, for stacks whose
        z spacing is coarser than their pixel size.
    """

    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 16
    depth: int = 4
    norm: str = "batch"
    inplane_only_levels: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.depth < 1:
            raise ValueError(f"depth must be at least 1, got {self.depth}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.inplane_only_levels and self.spatial_dims != 3:
            raise ValueError("inplane_only_levels only applies to 3D networks")
        bad = [lvl for lvl in self.inplane_only_levels if not 0 <= lvl < self.depth - 1]
        if bad:
            raise ValueError(f"inplane_only_levels {bad} outside 0..{self.depth - 2}")
        object.__setattr__(self, "inplane_only_levels", tuple(sorted(set(self.inplane_only_levels))))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, safe to store in a checkpoint."""
        data = asdict(self)
        data["inplane_only_levels"] = list(self.inplane_only_levels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UNetConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "inplane_only_levels" in known:
            known["inplane_only_levels"] = tuple(known["inplane_only_levels"])
        return cls(**known)

    def pool_factors(self) -> list[tuple[int, ...]]:
        """Pooling factor per axis for every pooling step."""
        factors = []
        for step in range(self.depth - 1):
            if self.spatial_dims == 3 and step in self.inplane_only_levels:
                factors.append((1, 2, 2))
            else:
                factors.append((2,) * self.spatial_dims)
        return factors

    def divisor(self) -> tuple[int, ...]:
        """Input sizes that are multiples of this need no padding."""
        total = [1] * self.spatial_dims
        for factor in self.pool_factors():
            total = [t * f for t, f in zip(total, factor)]
        return tuple(total)

    def receptive_radius(self) -> tuple[int, ...]:
        """Upper bound, per axis, of how far (in pixels) an output depends on its input."""
        radius = [0] * self.spatial_dims
        scale = [1] * self.spatial_dims
        for factor in self.pool_factors():
            for ax in range(self.spatial_dims):
                # encoder and decoder double convs, pooling and transposed conv at this level
                radius[ax] += 4 * scale[ax] + 2 * (factor[ax] - 1) * scale[ax]
                scale[ax] *= factor[ax]
        for ax in range(self.spatial_dims):
            radius[ax] += 2 * scale[ax]  # bottleneck double conv
        return tuple(radius)

    def halo(self) -> tuple[int, ...]:
        """Overlap per tile side that makes tiled inference equal the untiled result."""
        return tuple(
            math.ceil(r / d) * d for r, d in zip(self.receptive_radius(), self.divisor())
        )


def _conv(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        cls = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        return cls(channels, affine=True)
    return nn.GroupNorm(math.gcd(8, channels), channels)


class DoubleConv(nn.Sequential):
    """(3x3 conv, norm, ReLU) twice."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str):
        conv = _conv(spatial_dims)
        super().__init__(
            conv(in_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, spatial_dims, out_channels),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, spatial_dims, out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Module):
    """Max pooling followed by a double conv."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str,
                 factor: tuple[int, ...]):
        super().__init__()
        pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        self.factor = factor
        self.pool = pool(kernel_size=factor, stride=factor)
        self.conv = DoubleConv(spatial_dims, in_channels, out_channels, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """Transposed-conv upsampling, concatenation with the skip connection, double conv."""

    def __init__(self, spatial_dims: int, in_channels: int, skip_channels: int, out_channels: int,
                 norm: str, factor: tuple[int, ...]):
        super().__init__()
        up = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        self.factor = factor
        self.up = up(in_channels, skip_channels, kernel_size=factor, stride=factor)
        self.conv = DoubleConv(spatial_dims, 2 * skip_channels, out_channels, norm)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(low), skip], dim=1))


class UNet(nn.Module):
    """UNet for 2D (``spatial_dims=2``) or 3D (``spatial_dims=3``) inputs.

    Inputs of any size work: they are padded (edge values) up to a multiple of
    :meth:`UNetConfig.divisor` and the output is cropped back.
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = UNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a UNetConfig or keyword arguments, not both")
        self.config = config
        dims, norm = config.spatial_dims, config.norm
        widths = [config.base_channels * 2**level for level in range(config.depth)]
        factors = config.pool_factors()
        self.encoders = nn.ModuleList([DoubleConv(dims, config.in_channels, widths[0], norm)])
        for level in range(1, config.depth):
            self.encoders.append(Down(dims, widths[level - 1], widths[level], norm, factors[level - 1]))
        self.decoders = nn.ModuleList(
            Up(dims, widths[level + 1], widths[level], widths[level], norm, factors[level])
            for level in reversed(range(config.depth - 1))
        )
        self.head = _conv(dims)(widths[0], config.out_channels, 1)

    @property
    def spatial_dims(self) -> int:
        return self.config.spatial_dims

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        shape = tuple(x.shape[2:])
        if len(shape) != self.spatial_dims:
            raise ValueError(
                f"a {self.spatial_dims}D UNet needs (batch, channel, {'z, ' if self.spatial_dims == 3 else ''}"
                f"y, x) input, got shape {tuple(x.shape)}"
            )
        padding: list[int] = []
        for size, div in zip(reversed(shape), reversed(self.config.divisor())):
            padding += [0, (-size) % div]
        if any(padding):
            x = F.pad(x, padding, mode="replicate")
        return x, shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, shape = self._pad(x)
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        x = skips.pop()
        for decoder in self.decoders:
            x = decoder(x, skips.pop())
        x = self.head(x)
        return x[(..., *(slice(0, s) for s in shape))]

    @torch.no_grad()
    def forward_low_memory(self, x: torch.Tensor, slab_voxels: int = 2**21) -> torch.Tensor:
        """Same result as ``forward`` in eval mode with batch norm, using much less memory.

        Every block runs on slabs of about ``slab_voxels`` output voxels (per batch item and
        channel) along the longest spatial axis, with a 2-voxel overlap that is cropped away.
        """
        if self.training or self.config.norm != "batch":
            # instance/group norm see the whole tensor: slabs would change the result
            return self.forward(x)
        x, shape = self._pad(x)
        skips = []
        for level, encoder in enumerate(self.encoders):
            pool = encoder.factor if level else None
            x = _slabwise(encoder, [x], slab_voxels, out_scale=pool)
            skips.append(x)
        x = skips.pop()
        for index, decoder in enumerate(self.decoders):
            skip = skips.pop()
            if index == len(self.decoders) - 1:  # the head runs on the last decoder's slabs
                block: Callable[..., torch.Tensor] = partial(self._decode_with_head, decoder)
                out_channels: int | None = self.config.out_channels
            else:
                block, out_channels = decoder, None
            x = _slabwise(block, [x, skip], slab_voxels, up_factor=decoder.factor,
                          out_channels=out_channels)
            del skip
        if not self.decoders:
            x = self.head(x)
        return x[(..., *(slice(0, s) for s in shape))]

    def _decode_with_head(self, decoder: Up, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.head(decoder(low, skip))


def _slabwise(block: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
              slab_voxels: int, out_scale: tuple[int, ...] | None = None,
              up_factor: tuple[int, ...] | None = None, out_channels: int | None = None,
              overlap: int = 2) -> torch.Tensor:
    """Run a local ``block`` slab by slab along the longest spatial axis.

    Three block shapes occur: same resolution (neither factor given), pooling (``out_scale`` =
    pool factor: the output is coarser than the input), and upsampling (``up_factor``: the first
    input is coarser than the output, the second is the skip at output resolution).
    """
    ref = inputs[1] if up_factor is not None else inputs[0]
    spatial = list(ref.shape[2:])
    if out_scale is not None:
        spatial = [s // f for s, f in zip(spatial, out_scale)]
    per_row_voxels = ref.shape[0] * math.prod(spatial)
    axis = max(range(len(spatial)), key=lambda a: spatial[a])
    length = spatial[axis]
    per_row_voxels //= length
    step = max(1, slab_voxels // max(1, per_row_voxels))
    if up_factor is not None:
        step = max(up_factor[axis], step - step % up_factor[axis])
    if step >= length:
        return block(*inputs)
    dim = axis + 2
    out = None
    for start in range(0, length, step):
        stop = min(length, start + step)
        lo, hi = max(0, start - overlap), min(length, stop + overlap)
        if up_factor is not None:
            f = up_factor[axis]
            lo, hi = lo - lo % f, min(length, hi + (-hi) % f)
            pieces = [inputs[0].narrow(dim, lo // f, (hi - lo) // f), inputs[1].narrow(dim, lo, hi - lo)]
        elif out_scale is not None:
            f = out_scale[axis]
            pieces = [inputs[0].narrow(dim, lo * f, (hi - lo) * f)]
        else:
            pieces = [inputs[0].narrow(dim, lo, hi - lo)]
        result = block(*pieces).narrow(dim, start - lo, stop - start)
        if out is None:
            shape = list(result.shape)
            shape[dim] = length
            if out_channels is not None:
                shape[1] = out_channels
            out = result.new_empty(shape)
        out.narrow(dim, start, stop - start).copy_(result)
        del result, pieces
    assert out is not None
    return out


def build_model(config: UNetConfig | dict[str, Any]) -> UNet:
    """A UNet from a config or its dict form."""
    if isinstance(config, dict):
        config = UNetConfig.from_dict(config)
    return UNet(config)


def fuse_for_inference(network: UNet) -> UNet:
    """A copy of ``network`` in eval mode with every batch norm folded into its convolution.

    The result computes the same function (up to float rounding) with fewer passes over memory.
    Networks with group or instance norm are returned as an eval-mode copy, unfused.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = UNet(network.config)
    fused.load_state_dict(network.state_dict())
    fused.eval()
    if network.config.norm != "batch":
        return fused
    for module in fused.modules():
        if isinstance(module, DoubleConv):
            for conv_index in (0, 3):
                module[conv_index] = fuse_conv_bn_eval(module[conv_index], module[conv_index + 1])
                module[conv_index + 1] = nn.Identity()
    return fused


def inplane_only_levels_for(voxel_size: "tuple[float, ...] | list[float] | None",
                            depth: int) -> tuple[int, ...]:
    """Pooling levels of a 3D UNet that pool in-plane only, for voxels of ``voxel_size`` (z, y, x).

    Each in-plane-only level doubles the y-x spacing; there are as many as bring it closest to
    the z spacing: ``floor(log2(z / min(y, x)) + 0.25)`` (z spacing 1.7x the in-plane spacing or
    more gives one level, 3.4x two, ...), at most ``depth - 1``. Isotropic, unknown or 2D voxel
    sizes give none.
    """
    if voxel_size is None or len(voxel_size) != 3 or depth < 2:
        return ()
    z, y, x = (float(v) for v in voxel_size)
    if min(z, y, x) <= 0:
        return ()
    ratio = z / min(y, x)
    if ratio <= 1:
        return ()
    count = int(math.floor(math.log2(ratio) + 0.25))
    return tuple(range(max(0, min(count, depth - 1))))
