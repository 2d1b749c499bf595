"""The building blocks of the UNet family; each takes ``spatial_dims`` so 2D and 3D share them."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn


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


class ResidualDoubleConv(nn.Module):
    """(3x3 conv, norm, ReLU, 3x3 conv, norm) plus a shortcut, then ReLU.

    The shortcut is the identity, or a 1x1 conv and norm where the channel count changes.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str):
        super().__init__()
        conv = _conv(spatial_dims)
        self.body = nn.Sequential(
            conv(in_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, spatial_dims, out_channels),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, spatial_dims, out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(conv(in_channels, out_channels, 1, bias=False),
                                          _norm(norm, spatial_dims, out_channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


def _block(residual: bool, spatial_dims: int, in_channels: int, out_channels: int,
           norm: str) -> nn.Module:
    cls = ResidualDoubleConv if residual else DoubleConv
    return cls(spatial_dims, in_channels, out_channels, norm)


class AttentionGate(nn.Module):
    """Additive attention gate: ``x * sigmoid(norm(psi(relu(norm(W_g g) + norm(W_x x)))))``.

    ``g`` (the upsampled decoder tensor) and ``x`` (the skip) have the same resolution, so the
    gate is pointwise (all 1x1 convs).
    """

    def __init__(self, spatial_dims: int, channels: int, inter_channels: int, norm: str):
        super().__init__()
        conv = _conv(spatial_dims)
        self.gate = nn.Sequential(conv(channels, inter_channels, 1, bias=False),
                                  _norm(norm, spatial_dims, inter_channels))
        self.skip = nn.Sequential(conv(channels, inter_channels, 1, bias=False),
                                  _norm(norm, spatial_dims, inter_channels))
        self.psi = nn.Sequential(nn.ReLU(inplace=True), conv(inter_channels, 1, 1, bias=False),
                                 _norm(norm, spatial_dims, 1), nn.Sigmoid())

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.psi(self.gate(g) + self.skip(x))


class Down(nn.Module):
    """Max pooling followed by a (residual) double conv."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str,
                 factor: tuple[int, ...], residual: bool = False):
        super().__init__()
        pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        self.factor = factor
        self.pool = pool(kernel_size=factor, stride=factor)
        self.conv = _block(residual, spatial_dims, in_channels, out_channels, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """Transposed-conv upsampling, concatenation with the skip(s), (residual) double conv.

    ``n_skips`` > 1 for the dense skips of UNet++; ``attention`` gates the (single) skip with
    the upsampled tensor first.
    """

    def __init__(self, spatial_dims: int, in_channels: int, skip_channels: int, out_channels: int,
                 norm: str, factor: tuple[int, ...], *, n_skips: int = 1, residual: bool = False,
                 attention: bool = False):
        super().__init__()
        up = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        self.factor = factor
        self.up = up(in_channels, skip_channels, kernel_size=factor, stride=factor)
        self.attention = (AttentionGate(spatial_dims, skip_channels, max(1, skip_channels // 2), norm)
                          if attention else None)
        self.conv = _block(residual, spatial_dims, (1 + n_skips) * skip_channels, out_channels, norm)

    def forward(self, low: torch.Tensor, *skips: torch.Tensor) -> torch.Tensor:
        g = self.up(low)
        if self.attention is not None:
            skips = tuple(self.attention(g, skip) for skip in skips)
        return self.conv(torch.cat([g, *skips], dim=1))


class _KeepNormStats:
    """Restore the batch-norm running statistics of ``module`` on exit.

    Gradient checkpointing re-runs the forward during backward; in training mode that would
    update the running statistics a second time.
    """

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.saved: list[list[torch.Tensor]] = []

    def __enter__(self) -> None:
        with torch.no_grad():
            self.saved = [[b.clone() for b in m.buffers()] for m in self.norms]

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for module, saved in zip(self.norms, self.saved):
                for buffer, value in zip(module.buffers(), saved):
                    buffer.copy_(value)
        self.saved = []


def _checkpoint_contexts(module: nn.Module) -> tuple[Any, Any]:
    return nullcontext(), _KeepNormStats(module)
