"""The network's configuration (:class:`UNetConfig`): architectures, the block graph and its geometry."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

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
