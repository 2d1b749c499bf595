"""One UNet family for 2D and 3D images, built from blocks that take ``spatial_dims``.

Four architectures share the encoder (max pooling, double convs) and differ in their blocks
and skip pathways (``UNetConfig.architecture``):

* ``unet``: (3x3 conv, norm, ReLU) x 2 blocks, one skip per level;
* ``resunet``: residual double-conv blocks (a 1x1 conv + norm shortcut where channels change);
* ``attention``: additive attention gates on the skips (Oktay et al. 2018, MONAI
  ``AttentionUnet`` style: the gating signal is the upsampled decoder tensor, so every gate is
  pointwise and the network stays local);
* ``unetpp``: nested dense skip pathways (UNet++, Zhou et al. 2018), optional deep supervision
  and pruned inference at a shallower output node.

All of them are described by one block graph (:meth:`UNetConfig.nodes`): node ``X^{i,j}`` is
at resolution level ``i``; column 0 is the encoder, column ``j > 0`` a decoder block fed by the
upsampled ``X^{i+1,j-1}`` and its skips. The receptive radius (hence the tile halo) is computed
on that graph, and the forward passes walk it.

Besides the usual ``forward``, :meth:`UNet.forward_low_memory` runs the same network
slab by slab at every block. Every block is local (3x3 convolutions, 2x2 pooling,
2x2 transposed convolutions, 1x1 shortcuts and gates; batch norm in eval mode is a per-channel
affine map), so computing each block on overlapping slabs and cropping the overlap gives the
same numbers as the plain forward pass while the large full-resolution temporaries never exist
all at once.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NORMS = ("batch", "group", "instance")
ARCHITECTURES = ("unet", "resunet", "attention", "unetpp")
INIT_SCHEMES = ("kaiming", "default")

#: Working-set size of one tile, in base-width values per input voxel, per architecture:
#: (slab-wise CPU forward, plain forward). The unet figures are those measured by
#: ``benchmarks/bench_inference.py``; the others scale them by the worst ratio of peak RSS over
#: unet's (fused fp32 forward, base 16, depth 4, a fresh process each, 1024x1024 and
#: 64x128x128 inputs, slabs of 2**16 voxels), rounded up: resunet 1.26 / 0.88, attention
#: 1.05 / 1.13, unetpp 1.83 / 1.72 (it keeps every X^{0,j} until the last).
ACTIVATION_WIDTHS = {
    "unet": (3.7, 10.0),
    "resunet": (4.7, 10.0),
    "attention": (3.9, 11.5),
    "unetpp": (7.0, 17.5),
}

Key = tuple[int, int]


class Node(NamedTuple):
    """One block of the graph: ``X^{level,column}`` and the nodes it reads.

    Column 0 (encoder) reads the pooled finer encoder node (nothing for ``X^{0,0}``, which reads
    the image); a decoder node reads ``(coarser node, *skips)``.
    """

    level: int
    column: int
    inputs: tuple[Key, ...]

    @property
    def key(self) -> Key:
        return (self.level, self.column)


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
    architecture : str
        One of :data:`ARCHITECTURES`. Checkpoints without it are ``"unet"``.
    deep_supervision : bool
        ``unetpp`` only: a head on every node ``X^{0,1..depth-1}``; training averages their losses
        (:meth:`UNet.forward_heads`).
    output_level : int or None
        ``unetpp`` only: pruned inference with the head on ``X^{0,output_level}`` (1 ..
        ``depth - 1``; below ``depth - 1`` it needs ``deep_supervision``, which trains those
        heads). None: full depth.
    """

    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 16
    depth: int = 4
    norm: str = "batch"
    inplane_only_levels: tuple[int, ...] = field(default_factory=tuple)
    architecture: str = "unet"
    deep_supervision: bool = False
    output_level: int | None = None

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
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        object.__setattr__(self, "deep_supervision", bool(self.deep_supervision))
        if self.deep_supervision and self.architecture != "unetpp":
            raise ValueError("deep_supervision only applies to the unetpp architecture")
        if self.deep_supervision and self.depth < 2:
            raise ValueError("deep_supervision needs depth 2 or more (one head per decoder column)")
        if self.output_level is not None:
            if self.architecture != "unetpp":
                raise ValueError("output_level (pruned inference) only applies to the unetpp architecture")
            if not 1 <= self.output_level <= self.depth - 1:
                raise ValueError(f"output_level must be in 1..{self.depth - 1}, got {self.output_level}")
            if self.output_level < self.depth - 1 and not self.deep_supervision:
                raise ValueError("output_level below depth - 1 needs deep_supervision: only then does "
                                 "the network have (trained) heads on the shallower nodes")
            object.__setattr__(self, "output_level", int(self.output_level))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, safe to store in a checkpoint."""
        data = asdict(self)
        data["inplane_only_levels"] = list(self.inplane_only_levels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UNetConfig":
        """Inverse of :meth:`to_dict`; keys of older versions get their defaults (a plain unet)."""
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

    def final_level(self) -> int:
        """Column of the output node ``X^{0,L}``: ``output_level``, else ``depth - 1``."""
        return self.depth - 1 if self.output_level is None else self.output_level

    def nodes(self, level: int | None = None) -> list[Node]:
        """The block graph in evaluation order, pruned to what ``X^{0,level}`` needs.

        ``level`` defaults to :meth:`final_level`; ``depth - 1`` gives every node (the full
        network's modules). The order is by diagonals (``X^{d,0}``, ``X^{d-1,1}``, ...,
        ``X^{0,d}``), so a pruned UNet++ is a prefix.
        """
        level = self.final_level() if level is None else level
        nested = self.architecture == "unetpp"
        if not 0 <= level <= self.depth - 1 or (not nested and level != self.depth - 1):
            raise ValueError(f"no output node X^(0,{level}) in a depth-{self.depth} {self.architecture}")
        graph = [Node(0, 0, ())]
        for diagonal in range(1, self.depth):
            graph.append(Node(diagonal, 0, ((diagonal - 1, 0),)))
            for column in range(1, diagonal + 1):
                row = diagonal - column
                if nested:
                    skips = tuple((row, k) for k in range(column))
                elif diagonal == self.depth - 1:
                    skips = ((row, 0),)
                else:
                    continue
                graph.append(Node(row, column, ((row + 1, column - 1), *skips)))
        needed = {(0, level)}
        for node in reversed(graph):
            if node.key in needed:
                needed.update(node.inputs)
        return [node for node in graph if node.key in needed]

    def receptive_radius(self) -> tuple[int, ...]:
        """Per axis, how far (in pixels) an output can depend on its input: a tight upper bound.

        Computed on the block graph. Track, for every node at scale ``s`` (its pooling factor
        product), a radius ``r``: element ``c`` depends on input pixels within
        ``[c*s - r, c*s + s - 1 + r]``. A 3x3 conv adds ``s``; max pooling adds nothing (the
        coarse element covers exactly its block); a kernel-= stride-``f`` transposed conv to
        scale ``s`` adds ``(f - 1) * s``; a concatenation takes the maximum; 1x1 convs
        (shortcuts, attention gates, heads) and eval-mode batch norm add nothing. At the output
        (``s = 1``) that is ``[p - r, p + r]``.
        """
        dims = self.spatial_dims
        factors = self.pool_factors()
        scales = [(1,) * dims]
        for factor in factors:
            scales.append(tuple(s * f for s, f in zip(scales[-1], factor)))
        radius: dict[Key, tuple[int, ...]] = {}
        for node in self.nodes():
            scale = scales[node.level]
            if node.column == 0:
                reach = radius[node.inputs[0]] if node.inputs else (0,) * dims
            else:
                low, *skips = node.inputs
                factor = factors[node.level]
                reach = tuple(
                    max([radius[low][a] + (factor[a] - 1) * scale[a]] + [radius[k][a] for k in skips])
                    for a in range(dims))
            radius[node.key] = tuple(r + 2 * s for r, s in zip(reach, scale))  # two 3x3 convs
        return radius[(0, self.final_level())]

    def halo(self) -> tuple[int, ...]:
        """Overlap per tile side that makes tiled inference equal the untiled result."""
        return tuple(
            math.ceil(r / d) * d for r, d in zip(self.receptive_radius(), self.divisor())
        )

    def activation_widths(self, low_memory: bool) -> float:
        """Peak working set per input voxel, in values of ``base_channels`` width.

        ``low_memory``: the slab-wise forward (:meth:`UNet.forward_low_memory`), else the plain
        one. See :data:`ACTIVATION_WIDTHS`.
        """
        return ACTIVATION_WIDTHS[self.architecture][0 if low_memory else 1]


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


class UNet(nn.Module):
    """A network of the UNet family (``config.architecture``) for 2D or 3D inputs.

    Inputs of any size work: they are padded (edge values) up to a multiple of
    :meth:`UNetConfig.divisor` and the output is cropped back.

    Attributes
    ----------
    encoders : nn.ModuleList
        ``X^{i,0}``: the full-resolution block, then pooling + block per level.
    decoders : nn.ModuleList
        The decoder nodes in graph order (unet: deepest first).
    head : nn.Module
        1x1 conv on the output node ``X^{0,depth-1}``; with deep supervision ``aux_heads[j-1]``
        is the head on ``X^{0,j}``, ``j < depth - 1``.
    gradient_checkpointing : bool
        When True and training, every block runs under :func:`torch.utils.checkpoint.checkpoint`
        (its activations are recomputed in backward: less memory, about a third more compute).
        Not part of the config.
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = UNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a UNetConfig or keyword arguments, not both")
        self.config = config
        self.gradient_checkpointing = False
        dims, norm = config.spatial_dims, config.norm
        residual = config.architecture == "resunet"
        widths = [config.base_channels * 2**level for level in range(config.depth)]
        factors = config.pool_factors()
        self.encoders = nn.ModuleList([_block(residual, dims, config.in_channels, widths[0], norm)])
        for level in range(1, config.depth):
            self.encoders.append(Down(dims, widths[level - 1], widths[level], norm, factors[level - 1],
                                      residual=residual))
        self.decoders = nn.ModuleList()
        self._decoder_index: dict[Key, int] = {}
        for node in config.nodes(config.depth - 1):  # every node, whatever output_level
            if node.column:
                level = node.level
                self._decoder_index[node.key] = len(self.decoders)
                self.decoders.append(Up(dims, widths[level + 1], widths[level], widths[level], norm,
                                        factors[level], n_skips=len(node.inputs) - 1, residual=residual,
                                        attention=config.architecture == "attention"))
        self.head = _conv(dims)(widths[0], config.out_channels, 1)
        if config.deep_supervision:
            self.aux_heads = nn.ModuleList(_conv(dims)(widths[0], config.out_channels, 1)
                                           for _ in range(1, config.depth - 1))

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

    @staticmethod
    def _crop(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return x[(..., *(slice(0, s) for s in shape))]

    def _module(self, node: Node) -> nn.Module:
        if node.column == 0:
            return self.encoders[node.level]
        return self.decoders[self._decoder_index[node.key]]

    def _head(self, column: int) -> nn.Module:
        return self.head if column == self.config.depth - 1 or column == 0 else self.aux_heads[column - 1]

    def _call(self, module: nn.Module, inputs: list[torch.Tensor], node: Node) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *inputs, use_reentrant=False,
                              context_fn=partial(_checkpoint_contexts, module))
        return module(*inputs)

    def _graph(self, x: torch.Tensor, outputs: list[Key],
               run: Callable[[nn.Module, list[torch.Tensor], Node], torch.Tensor]) -> dict[Key, torch.Tensor]:
        """Walk the block graph up to the deepest of ``outputs``, freeing tensors after last use."""
        nodes = self.config.nodes(max(column for _, column in outputs))
        last_use = {key: index for index, node in enumerate(nodes) for key in node.inputs}
        values: dict[Key, torch.Tensor] = {}
        for index, node in enumerate(nodes):
            inputs = [values[key] for key in node.inputs] if node.inputs else [x]
            values[node.key] = run(self._module(node), inputs, node)
            del inputs
            for key in node.inputs:
                if last_use[key] == index and key not in outputs:
                    del values[key]
        return {key: values[key] for key in outputs}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, shape = self._pad(x)
        level = self.config.final_level()
        features = self._graph(x, [(0, level)], self._call)[(0, level)]
        return self._crop(self._head(level)(features), shape)

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The training outputs (full-resolution logits, cropped like :meth:`forward`).

        With deep supervision the heads on ``X^{0,1}`` .. ``X^{0,L}`` (the last is the output of
        :meth:`forward`); otherwise ``[forward(x)]``.
        """
        if not self.config.deep_supervision:
            return [self.forward(x)]
        x, shape = self._pad(x)
        columns = list(range(1, self.config.final_level() + 1))
        features = self._graph(x, [(0, c) for c in columns], self._call)
        return [self._crop(self._head(c)(features[(0, c)]), shape) for c in columns]

    @torch.no_grad()
    def forward_low_memory(self, x: torch.Tensor, slab_voxels: int = 2**21) -> torch.Tensor:
        """Same result as ``forward`` in eval mode with batch norm, using much less memory.

        Every block runs on slabs of about ``slab_voxels`` output voxels (per batch item and
        channel) along the longest spatial axis, with a 2-voxel overlap that is cropped away;
        the output node runs together with its head. UNet++ works the same way (its dense skips
        are more inputs at the block's resolution), but it must keep every ``X^{0,j}`` until the
        last one, so it saves less.
        """
        if self.training or self.config.norm != "batch":
            # instance/group norm see the whole tensor: slabs would change the result
            return self.forward(x)
        x, shape = self._pad(x)
        level = self.config.final_level()
        out_channels = self.config.out_channels

        def run(module: nn.Module, inputs: list[torch.Tensor], node: Node) -> torch.Tensor:
            last = node.key == (0, level)
            block: Callable[..., torch.Tensor] = partial(_with_head, module, self._head(level)) if last else module
            channels = out_channels if last else None
            if node.column:
                return _slabwise(block, inputs, slab_voxels, up_factor=module.factor, out_channels=channels)
            pool = module.factor if node.level else None
            return _slabwise(block, inputs, slab_voxels, out_scale=pool, out_channels=channels)

        return self._crop(self._graph(x, [(0, level)], run)[(0, level)], shape)


def _with_head(block: nn.Module, head: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    return head(block(*inputs))


def _slabwise(block: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
              slab_voxels: int, out_scale: tuple[int, ...] | None = None,
              up_factor: tuple[int, ...] | None = None, out_channels: int | None = None,
              overlap: int = 2) -> torch.Tensor:
    """Run a local ``block`` slab by slab along the longest spatial axis.

    Three block shapes occur: same resolution (neither factor given), pooling (``out_scale`` =
    pool factor: the output is coarser than the input), and upsampling (``up_factor``: the first
    input is coarser than the output, the others are skips at output resolution).
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
            pieces = [inputs[0].narrow(dim, lo // f, (hi - lo) // f),
                      *(skip.narrow(dim, lo, hi - lo) for skip in inputs[1:])]
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
    """A network from a config or its dict form."""
    if isinstance(config, dict):
        config = UNetConfig.from_dict(config)
    return UNet(config)


def init_weights(network: nn.Module, scheme: str = "kaiming") -> nn.Module:
    """Initialise ``network`` in place (and return it).

    ``"kaiming"``: every (transposed) convolution Kaiming-normal (fan out, ReLU gain) with zero
    bias, every norm weight 1 and bias 0. ``"default"``: torch's own initialisation, unchanged.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {INIT_SCHEMES}, got {scheme!r}")
    if scheme == "default":
        return network
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.modules.conv._ConvNd):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return network


def fuse_for_inference(network: UNet) -> UNet:
    """A copy of ``network`` in eval mode with every batch norm folded into its convolution.

    Every convolution directly followed by a batch norm inside an ``nn.Sequential`` (double
    convs, residual bodies and shortcuts, attention gates) is folded. The result computes the
    same function (up to float rounding) with fewer passes over memory. Networks with group or
    instance norm are returned as an eval-mode copy, unfused.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = UNet(network.config)
    fused.load_state_dict(network.state_dict())
    fused.eval()
    if network.config.norm != "batch":
        return fused
    for module in list(fused.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        for index in range(len(module) - 1):
            conv, norm = module[index], module[index + 1]
            if (isinstance(conv, (nn.Conv2d, nn.Conv3d))
                    and isinstance(norm, nn.modules.batchnorm._BatchNorm)):
                module[index] = fuse_conv_bn_eval(conv, norm)
                module[index + 1] = nn.Identity()
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
