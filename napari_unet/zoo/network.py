"""A network described by a bioimage.io package, rebuilt from its weights."""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from napari_unet.zoo.description import ZooError, _file_bytes, _first_line

# --- foreign models ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooNetConfig:
    """What the engine reads from a network's ``config``, for a Zoo model's network.

    ``divisor`` is the rdf's size step per spatial axis; ``context`` the rdf halo (cropped
    from every tile) plus the blended overlap, rounded up to the divisor.
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    step: tuple[int, ...]
    context: tuple[int, ...]
    base_channels: int = 32  # for the memory estimate only: a generous guess
    norm: str = "batch"  # no "inexact tiling" warning: the overlap is blended instead
    inplane_only_levels: tuple[int, ...] = ()

    def divisor(self) -> tuple[int, ...]:
        return self.step

    def halo(self) -> tuple[int, ...]:
        return self.context

    def receptive_radius(self) -> tuple[int, ...]:
        return self.context

    def activation_widths(self, low_memory: bool) -> float:
        """Working set per voxel in ``base_channels`` values: a plain forward's (see
        :meth:`napari_unet.model.config.UNetConfig.activation_widths`), whatever ``low_memory``."""
        return 10.0

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


class ZooNetwork(nn.Module):
    """A Zoo model's weights behind the engine's network interface.

    ``forward`` takes ``(batch, channels, [z,] y, x)``, pads it (edge values) to a size the
    model accepts, reorders the axes as the rdf describes them, runs the model, applies the
    rdf's postprocessing except a final sigmoid / softmax, and returns logits in our layout
    (probabilities are turned back into logits, so the engine's activation gives them back).
    """

    def __init__(self, module: Any, config: ZooNetConfig, *, in_layout: list[str],
                 out_layout: list[str], sizes: list[tuple[str, int, int]], per_item: bool,
                 postprocess: Callable[[torch.Tensor], torch.Tensor] | None,
                 output_is_probability: bool, softmax: bool, channel: int | None = None):
        super().__init__()
        self.module = module
        self.config = config
        self.in_layout, self.out_layout = in_layout, out_layout
        self.sizes = sizes
        self.per_item = per_item
        self.postprocess = postprocess
        self.output_is_probability = output_is_probability
        self.softmax = softmax
        self.channel = channel

    @property
    def spatial_dims(self) -> int:
        return self.config.spatial_dims

    def _valid(self, n: int, axis: int) -> int:
        kind, low, step = self.sizes[axis]
        if kind == "fixed":
            if n > low:
                raise ValueError(f"tile of {n} voxels is larger than the model's fixed size {low}")
            return low
        return low if n <= low else low + math.ceil((n - low) / step) * step

    def _to_model(self, x: torch.Tensor) -> torch.Tensor:
        canonical = ["batch", "channel", *("zyx"[3 - self.spatial_dims:])]
        if "channel" not in self.in_layout:
            x = x[:, 0]
            canonical.remove("channel")
        if "batch" not in self.in_layout:
            x = x[0]
            canonical.remove("batch")
        return x.permute(*[canonical.index(a) for a in self.in_layout])

    def _from_model(self, y: torch.Tensor) -> torch.Tensor:
        layout = list(self.out_layout)
        if "batch" not in layout:
            y, layout = y[None], ["batch", *layout]
        if "channel" not in layout:
            after = layout.index("batch") + 1
            y = y.unsqueeze(after)
            layout.insert(after, "channel")
        canonical = ["batch", "channel", *("zyx"[3 - self.spatial_dims:])]
        return y.permute(*[layout.index(a) for a in canonical])

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(self._to_model(x))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return self._from_model(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        shape = tuple(x.shape[2:])
        padding: list[int] = []
        for axis in reversed(range(self.spatial_dims)):
            padding += [0, self._valid(shape[axis], axis) - shape[axis]]
        if any(padding):
            x = F.pad(x, padding, mode="replicate")
        if self.per_item and x.shape[0] > 1:
            y = torch.cat([self._run(x[i:i + 1]) for i in range(x.shape[0])])
        else:
            y = self._run(x)
        y = y[(..., *(slice(0, s) for s in shape))].float()
        if self.postprocess is not None:
            y = self.postprocess(y)
        if self.channel is not None:
            y = y[:, self.channel:self.channel + 1]
        if self.output_is_probability:  # the engine applies sigmoid / softmax again
            y = y.clamp(1e-6, 1 - 1e-6)
            y = y.log() if self.softmax else torch.logit(y)
        return y

    def forward_low_memory(self, x: torch.Tensor, slab_voxels: int = 2**21) -> torch.Tensor:
        return self.forward(x)


def _load_weights(descr: Any, name: str) -> tuple[Any, str]:
    """The model's weights as something callable on torch tensors: TorchScript, then ONNX,
    then a PyTorch state dict with its architecture (which runs the package's Python code)."""
    w = descr.weights
    errors = []
    if w.torchscript is not None:
        try:
            module = torch.jit.load(io.BytesIO(_file_bytes(w.torchscript.source)), map_location="cpu")
            return module.eval(), "torchscript"
        except Exception as err:  # noqa: BLE001 - try the next format
            errors.append(f"torchscript: {_first_line(err)}")
    if w.onnx is not None:
        try:
            from napari_unet.zoo.onnx import OnnxModule

            return OnnxModule(_file_bytes(w.onnx.source)), "onnx"
        except Exception as err:  # noqa: BLE001
            errors.append(f"onnx: {_first_line(err)}")
    if w.pytorch_state_dict is not None:
        try:
            return _state_dict_module(w.pytorch_state_dict), "pytorch_state_dict"
        except Exception as err:  # noqa: BLE001
            errors.append(f"pytorch_state_dict: {_first_line(err)}")
    if errors:
        raise ZooError(f"{name}: no weights could be loaded ({'; '.join(errors)})")
    formats = [k for k, value in w if value is not None]
    raise ZooError(f"{name} has weights as {', '.join(formats) or 'nothing'}; napari-unet runs "
                   "torchscript, onnx and pytorch_state_dict weights")


def _state_dict_module(weights: Any) -> nn.Module:
    import importlib
    import types

    architecture = weights.architecture
    if hasattr(architecture, "import_from"):
        module = importlib.import_module(str(architecture.import_from))
    else:
        import hashlib
        import sys

        code = _file_bytes(architecture.source)
        # registered like an imported module (dataclasses look their module up there)
        name = f"_napari_unet_zoo_architecture_{hashlib.sha256(code).hexdigest()[:16]}"
        module = sys.modules.get(name)
        if module is None:
            module = types.ModuleType(name)
            sys.modules[name] = module
            try:
                exec(compile(code.decode("utf-8"), f"<{name}.py>", "exec"), module.__dict__)
            except BaseException:
                del sys.modules[name]
                raise
    network = getattr(module, str(architecture.callable))(**dict(architecture.kwargs or {}))
    state = torch.load(io.BytesIO(_file_bytes(weights.source)), map_location="cpu", weights_only=True)
    network.load_state_dict(state)
    return network.eval()
