"""The UNet family (U-Net, residual, attention, UNet++) and what prepares it for training and inference."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from napari_unet.model.blocks import Down, Up, _block, _checkpoint_contexts, _conv
from napari_unet.model.config import INIT_SCHEMES, Key, Node, UNetConfig


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
