"""ONNX export of a model's network, and an ONNX file run as a torch module.

The exported graph takes the normalised image ``(batch, channels, [z,] y, x)`` (float32) and
returns the network's logits in the same layout; batch and spatial sizes are dynamic. Inputs of
any size work: the network's padding to a multiple of its pooling divisor (edge values) and the
crop back are part of the graph (traced from an example whose size is not a multiple of it, so
the padding is recorded for every size). Normalisation and the final sigmoid / softmax stay
outside the graph; the checkpoint's settings (task, classes, normalisation, voxel size) are
stored as JSON in the file's metadata (``napari_unet``).

Needs the optional packages ``onnx`` and ``onnxruntime`` (``pip install 'napari-unet-loop[onnx]'``).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from napari_unet.io.files import atomic_write
from napari_unet.model.checkpoint import CheckpointError, SegmentationModel
from napari_unet.model.unet import fuse_for_inference

#: ONNX opset of the exports (onnxruntime >= 1.13 runs it)
OPSET = 17
METADATA_KEY = "napari_unet"


class OnnxExportError(CheckpointError):
    """The export or its check failed, or an optional package is missing (one line)."""


def require(module: str, extra: str = "onnx") -> Any:
    """Import the optional ``module``, or raise a one-line :class:`OnnxExportError`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise OnnxExportError(f"this needs the optional package {module!r}: "
                              f"pip install 'napari-unet-loop[{extra}]'") from None


class _Logits(nn.Module):
    """The network's main output as one tensor (a network may return several)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def exportable_network(model: SegmentationModel) -> nn.Module:
    """An eval-mode float32 CPU copy of ``model``'s network, batch norm folded."""
    return _Logits(fuse_for_inference(model.network).float().cpu().eval())


def example_input(model: SegmentationModel, batch: int = 1) -> torch.Tensor:
    """A small input whose spatial size is not a multiple of the divisor (so tracing records
    the padding), deterministic."""
    divisor = model.config.divisor()
    shape = (batch, model.config.in_channels, *(d + 1 for d in divisor))
    generator = torch.Generator().manual_seed(0)
    return torch.rand(shape, generator=generator)


def axis_names(spatial_dims: int) -> list[str]:
    return ["z", "y", "x"][3 - spatial_dims:]


def trace_to_onnx(network: nn.Module, example: torch.Tensor, path: str | os.PathLike,
                  spatial_dims: int, opset: int = OPSET) -> None:
    """Write ``network`` as ONNX to ``path`` with dynamic batch and spatial axes."""
    dynamic = {0: "batch", **{2 + i: name for i, name in enumerate(axis_names(spatial_dims))}}
    with warnings.catch_warnings():
        # tracer warnings about shape arithmetic: the padding is recorded as graph ops
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": dynamic, "output": dynamic})


def export_onnx(model: SegmentationModel, path: str | os.PathLike, *, opset: int = OPSET,
                check: bool = True, tolerance: float = 1e-4) -> Path:
    """Write ``model``'s network to ``path`` (``.onnx``) atomically.

    With ``check`` the file is run with onnxruntime on two inputs of other sizes (one of them
    a batch of two) and compared with torch.

    Raises
    ------
    OnnxExportError
        ``onnx``/``onnxruntime`` missing, or the exported graph differs from torch by more
        than ``tolerance``.
    """
    onnx = require("onnx")
    path = Path(path)
    network = exportable_network(model)
    metadata = json.dumps({"format": "napari-unet-onnx/1", "config": model.config.to_dict(),
                           **model.metadata()}, default=str)

    def write(tmp: Path) -> None:
        trace_to_onnx(network, example_input(model), tmp, model.spatial_dims, opset)
        graph = onnx.load(str(tmp))
        entry = graph.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, metadata
        graph.producer_name = "napari-unet"
        onnx.save(graph, str(tmp))
        if check:
            difference = compare_with_torch(tmp, network, check_shapes(model))
            if not difference <= tolerance:
                raise OnnxExportError(f"the ONNX export differs from torch by {difference:.2g} "
                                      f"(more than {tolerance:g})")

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


def check_shapes(model: SegmentationModel) -> list[tuple[int, ...]]:
    """Input shapes of the export check: other sizes than the example, odd and even."""
    divisor = model.config.divisor()
    channels = model.config.in_channels
    return [(1, channels, *(2 * d + 3 for d in divisor)), (2, channels, *(3 * d for d in divisor))]


def session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for ``path``."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_with_torch(path: str | os.PathLike, network: nn.Module,
                       shapes: Sequence[Sequence[int]]) -> float:
    """Largest absolute difference between onnxruntime on ``path`` and ``network`` (torch, fp32)
    over random inputs of ``shapes``."""
    runner = session(path)
    name = runner.get_inputs()[0].name
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for shape in shapes:
        x = torch.rand(tuple(shape), generator=generator)
        with torch.no_grad():
            expected = network(x).numpy()
        got = runner.run(None, {name: x.numpy()})[0]
        if got.shape != expected.shape:
            raise OnnxExportError(f"the ONNX export gives shape {got.shape} for input "
                                  f"{tuple(shape)}, torch {expected.shape}")
        worst = max(worst, float(np.max(np.abs(got - expected))))
    return worst


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The napari-unet settings stored in an exported ``.onnx`` file (empty if none)."""
    onnx = require("onnx")
    graph = onnx.load(str(path), load_external_data=False)
    for entry in graph.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    return {}


class OnnxModule(nn.Module):
    """An ONNX file run by onnxruntime (CPU) behind a torch ``forward``: float32 tensors in
    and out, the model's first input and output."""

    def __init__(self, source: str | os.PathLike | bytes, threads: int | None = None):
        super().__init__()
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        threads = threads or torch.get_num_threads()
        options.intra_op_num_threads = int(threads)
        model = source if isinstance(source, bytes) else str(source)
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = x.detach().float().cpu().contiguous().numpy()
        out = self.session.run(None, {self.input_name: data})[0]
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(x.device)
