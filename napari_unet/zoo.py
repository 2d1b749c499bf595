"""bioimage.io Model Zoo packages (model spec 0.5) as models for the tiled engine.

:func:`load_zoo_model` (used by :func:`napari_unet.checkpoint.load_model` for ``.zip`` and
``rdf.yaml`` paths; the export is :mod:`napari_unet.zoo_export`): a package made by napari-unet
becomes the same
:class:`~napari_unet.checkpoint.SegmentationModel` again (same weights, loaded with
``weights_only``). Any other Zoo model with one image input and one output of the same size
becomes a :class:`ForeignModel`: :func:`segment_model` runs it through the tile runner of
:mod:`napari_unet.inference` with blended overlapping tiles (the rdf's halo is cropped first),
its preprocessing fitted on the whole image.

Needs the optional packages of the ``bioimageio`` extra (``bioimageio.spec``, ``onnx``,
``onnxruntime``); nothing here imports Qt or napari.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, SegmentationModel
from .models import UNet, UNetConfig

ZOO_FORMAT = "napari-unet-bioimageio/1"
CONFIG_KEY = "napari_unet"
#: a foreign model's tiles overlap by this much per side (voxels, beyond its halo); the
#: overlap is blended with linear ramps
DEFAULT_OVERLAP = 16
_SHORT_UNITS = {"micrometer": "um", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm",
                "meter": "m", "angstrom": "A"}


class ZooError(CheckpointError):
    """A Zoo package that cannot be read, run or written; the message is one line."""


def _require_spec() -> Any:
    try:
        import bioimageio.spec as spec
    except ImportError:
        raise ZooError("bioimage.io packages need the optional package 'bioimageio.spec': "
                       "pip install 'napari-unet[bioimageio]'") from None
    return spec


def _first_line(text: Any, limit: int = 220) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit].rstrip() + " ..."


# ============================================================================================
# import
# ============================================================================================

def _load_description(source: str | os.PathLike) -> Any:
    spec = _require_spec()
    path = Path(source)
    if not path.exists():
        raise ZooError(f"model file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            descr = spec.load_description(str(path), perform_io_checks=False)
    except Exception as err:  # a zip that is no package, unreadable YAML, ...
        raise ZooError(f"{path.name} is not a bioimage.io package: {_first_line(err)}") from err
    if getattr(descr, "type", None) != "model" or not hasattr(descr, "weights"):
        errors = [e for d in descr.validation_summary.details for e in (d.errors or [])]
        reason = (f"{'.'.join(map(str, errors[0].loc))}: {_first_line(errors[0].msg)}"
                  if errors else f"its type is {getattr(descr, 'type', '?')!r}")
        raise ZooError(f"{path.name} is not a valid bioimage.io model ({reason})")
    if not str(descr.format_version).startswith("0.5"):
        try:
            from bioimageio.spec import update_format

            descr = update_format(descr)
        except Exception as err:
            raise ZooError(f"{path.name}: model spec {descr.format_version} could not be "
                           f"read as 0.5 ({_first_line(err)})") from err
    return descr


def _file_bytes(file_source: Any) -> bytes:
    """The bytes of a file a description refers to (inside the package or next to the rdf)."""
    from bioimageio.spec.utils import get_reader

    return get_reader(file_source).read()


def _file_bytes_io(file_source: Any) -> io.BytesIO:
    return io.BytesIO(_file_bytes(file_source))


def load_zoo_model(source: str | os.PathLike) -> SegmentationModel:
    """A Zoo package (``.zip``) or its ``rdf.yaml`` as a model for the tiled engine.

    Raises
    ------
    ZooError
        One line: not a package, not a model, an unsupported layout or weight format, or
        damaged weights.
    """
    descr = _load_description(source)
    name = Path(source).name
    ours = (descr.config.model_extra or {}).get(CONFIG_KEY) if descr.config is not None else None
    try:
        if isinstance(ours, dict) and ours.get("format") == ZOO_FORMAT:
            return _our_model(descr, ours, name)
        return _foreign_model(descr, name, str(source))
    except ZooError:
        raise
    except Exception as err:  # damaged weights, an architecture that does not load, ...
        raise ZooError(f"{name} cannot be used: {_first_line(err)}") from err


def _our_model(descr: Any, settings: dict[str, Any], name: str) -> SegmentationModel:
    """A package written by :func:`export_bioimageio`: the original checkpoint again."""
    weights = descr.weights.pytorch_state_dict
    if weights is None:
        raise ZooError(f"{name} has no pytorch_state_dict weights")
    config = UNetConfig.from_dict(dict(weights.architecture.kwargs or settings["config"]))
    state = torch.load(io.BytesIO(_file_bytes(weights.source)), map_location="cpu",
                       weights_only=True)
    network = UNet(config)
    network.load_state_dict(state)
    network.eval()
    fields = {f.name for f in dataclasses.fields(SegmentationModel)} - {"network"}
    meta = {k: v for k, v in (settings.get("metadata") or {}).items() if k in fields}
    return SegmentationModel(network=network, **copy.deepcopy(meta))


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
        :meth:`napari_unet.models.UNetConfig.activation_widths`), whatever ``low_memory``."""
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


@dataclass
class ForeignModel(SegmentationModel):
    """A Zoo model made elsewhere; run by :func:`segment_model` (blended tiles).

    ``preprocessing`` holds the rdf's steps (fitted on the whole image at run time);
    ``overlap`` the blended overlap per spatial axis; ``halo`` the rdf's halo. It cannot be
    fine-tuned, saved as a checkpoint or run on a dask cluster.
    """

    preprocessing: list[dict[str, Any]] = field(default_factory=list)
    overlap: tuple[int, ...] = ()
    halo: tuple[int, ...] = ()
    fixed_tile: tuple[int, ...] | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)
    foreign: bool = True

    def copy(self) -> "ForeignModel":
        return dataclasses.replace(self, history=copy.deepcopy(self.history))


def _axis_kind(axis: Any) -> str:
    kind = getattr(axis, "type", "")
    if kind in ("batch", "channel"):
        return kind
    if kind == "space":
        return str(axis.id)
    raise ZooError(f"axis {axis.id!r} of type {kind!r} is not supported (napari-unet runs "
                   "models on 2D images and 3D stacks)")


def _space_layout(axes: Sequence[Any]) -> list[str]:
    """Axis kinds in rdf order; space axes named z/y/x (by id, else by position)."""
    kinds = [_axis_kind(a) for a in axes]
    space = [k for k in kinds if k not in ("batch", "channel")]
    if not set(space) <= {"x", "y", "z"} or len(set(space)) != len(space):
        names = iter("zyx"[3 - len(space):])
        kinds = [k if k in ("batch", "channel") else next(names) for k in kinds]
    return kinds


def _foreign_model(descr: Any, name: str, source: str) -> ForeignModel:
    from bioimageio.spec.model import v0_5 as v

    if len(descr.inputs) != 1 or len(descr.outputs) != 1:
        raise ZooError(f"{name} has {len(descr.inputs)} inputs and {len(descr.outputs)} "
                       "outputs; napari-unet runs models with one input image and one output")
    tin, tout = descr.inputs[0], descr.outputs[0]
    in_layout, out_layout = _space_layout(tin.axes), _space_layout(tout.axes)
    space = [k for k in in_layout if k not in ("batch", "channel")]
    dims = len(space)
    if dims not in (2, 3):
        raise ZooError(f"{name} takes {dims} spatial axes; napari-unet runs 2D and 3D models")
    order = list("zyx"[3 - dims:])
    if sorted(space) != sorted(order):
        raise ZooError(f"{name}: spatial axes {space} are not (z,) y, x")
    by_kind = {k: a for k, a in zip(in_layout, tin.axes)}
    out_by_kind = {k: a for k, a in zip(out_layout, tout.axes)}
    if sorted(k for k in out_layout if k not in ("batch", "channel")) != sorted(order):
        raise ZooError(f"{name}: the output's spatial axes differ from the input's")
    in_channels = len(by_kind["channel"].channel_names) if "channel" in by_kind else 1
    out_channels = len(out_by_kind["channel"].channel_names) if "channel" in out_by_kind else 1
    per_item = "batch" not in by_kind or getattr(by_kind["batch"], "size", None) == 1

    sizes: list[tuple[str, int, int]] = []
    halo: list[int] = []
    for axis_name in order:
        axis, out_axis = by_kind[axis_name], out_by_kind[axis_name]
        size = axis.size
        if isinstance(size, int):
            sizes.append(("fixed", int(size), 1))
        elif isinstance(size, v.ParameterizedSize):
            sizes.append(("param", int(size.min), int(size.step)))
        else:
            raise ZooError(f"{name}: input axis {axis_name} has a size given by another tensor")
        out_size = out_axis.size
        same = (isinstance(out_size, v.SizeReference) and str(out_size.axis_id) == str(axis.id)
                and not out_size.offset and abs(float(out_axis.scale) - float(axis.scale)) < 1e-9)
        if not same and not (isinstance(out_size, int) and isinstance(size, int) and out_size == size):
            raise ZooError(f"{name}: the output's {axis_name} axis is not the size of the input's; "
                           "napari-unet runs models whose output matches the input")
        halo.append(int(getattr(out_axis, "halo", 0) or 0))

    channel_id = str(out_by_kind["channel"].id) if "channel" in out_by_kind else None
    postprocess, final = _postprocessing(list(tout.postprocessing or []), name, channel_id)
    softmax = final == "softmax"
    notes: list[str] = []
    channel = None
    if softmax:
        task = "semantic"
        names = [str(c) for c in out_by_kind["channel"].channel_names] if "channel" in out_by_kind \
            else ["background", "foreground"]
        class_names = names if len(names) >= 2 else ["background", *names]
        if out_channels < 2:
            raise ZooError(f"{name}: softmax over {out_channels} channel")
    else:
        class_names = ["background", "foreground"]
        task = "foreground" if out_channels != 2 else "foreground_boundary"
        if out_channels > 2:
            channel = 0
            notes.append(f"the model has {out_channels} output channels; channel 0 is taken as "
                         "the foreground")
    probability = final is None and _output_is_probability(tout)

    module, weight_format = _load_weights(descr, name)
    step = tuple(s[2] for s in sizes)
    fixed = any(s[0] == "fixed" for s in sizes)
    overlap = tuple(0 if s[0] == "fixed" and s[1] <= 2 * h + 1 else DEFAULT_OVERLAP
                    for s, h in zip(sizes, halo))
    context = tuple(_round_up(h + o, st) for h, o, st in zip(halo, overlap, step))
    overlap = tuple(c - h for c, h in zip(context, halo))
    config = ZooNetConfig(dims, in_channels, 1 if channel is not None else out_channels, step, context)
    network = ZooNetwork(module, config, in_layout=in_layout, out_layout=out_layout, sizes=sizes,
                         per_item=per_item, postprocess=postprocess,
                         output_is_probability=probability, softmax=softmax, channel=channel)
    voxel, unit = [], None
    for axis_name in order:
        axis = by_kind[axis_name]
        voxel.append(float(axis.scale))
        unit = unit or _SHORT_UNITS.get(str(getattr(axis, "unit", None) or ""), None)
    notes.insert(0, f"{weight_format} weights")
    model = ForeignModel(
        network=network, task=task, name=str(descr.name), version=1, parent=None,
        class_names=class_names, normalization={"mode": "none"},
        voxel_size=voxel if unit else None, unit=unit,
        description=_first_line(descr.description or descr.name),
        history=[{"bioimageio": source, "weights": weight_format}],
        preprocessing=[_step_dict(s) for s in (tin.preprocessing or [])],
        overlap=overlap, halo=tuple(halo),
        fixed_tile=tuple(s[1] if s[0] == "fixed" else 0 for s in sizes) if fixed else None,
        source=source, notes=notes)
    _check_preprocessing(model.preprocessing, name)
    return model


def _round_up(value: int, step: int) -> int:
    return int(math.ceil(value / step) * step) if step > 1 else int(value)


def _output_is_probability(tensor: Any) -> bool:
    """Whether a model's raw output is a probability (its data range, else its test output)."""
    data = getattr(tensor, "data", None)
    value_range = getattr(data, "range", None)
    if value_range and value_range[0] is not None and value_range[1] is not None:
        return float(value_range[0]) >= 0 and float(value_range[1]) <= 1
    if tensor.test_tensor is not None:
        try:
            values = np.load(io.BytesIO(_file_bytes(tensor.test_tensor.source)))
            return bool(np.nanmin(values) >= 0 and np.nanmax(values) <= 1)
        except Exception:  # noqa: BLE001 - no readable test tensor: assume logits
            return False
    return False


def _step_dict(step: Any) -> dict[str, Any]:
    kwargs = getattr(step, "kwargs", None)
    values = kwargs.model_dump(mode="json") if kwargs is not None else {}
    return {"id": str(step.id), **values}


_PREPROCESSING_STEPS = ("ensure_dtype", "scale_linear", "clip", "binarize", "sigmoid", "scale_range",
              "zero_mean_unit_variance", "fixed_zero_mean_unit_variance", "softmax")


def _check_preprocessing(steps: list[dict[str, Any]], name: str) -> None:
    for step in steps:
        if step["id"] not in _PREPROCESSING_STEPS or step.get("reference_tensor"):
            raise ZooError(f"{name}: preprocessing step {step['id']!r} is not supported")


def _postprocessing(steps: list[Any], name: str, channel_id: str | None
                    ) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str | None]:
    """The rdf's postprocessing before a final sigmoid / softmax (applied per tile, so only
    steps without statistics), and that final step's name (None when there is none).
    Casts at the end (``ensure_dtype``, which bioimageio.spec adds itself) are left out."""
    while steps and str(steps[-1].id) == "ensure_dtype":
        steps = steps[:-1]
    final = None
    if steps and str(steps[-1].id) in ("sigmoid", "softmax"):
        final = str(steps[-1].id)
        if final == "softmax":
            axis = str(getattr(steps[-1].kwargs, "axis", channel_id))
            if axis != channel_id:
                raise ZooError(f"{name}: softmax over axis {axis!r}, not the channels")
        steps = steps[:-1]
    dicts = [_step_dict(s) for s in steps]
    for step in dicts:
        if step["id"] not in ("ensure_dtype", "scale_linear", "clip", "binarize", "sigmoid"):
            raise ZooError(f"{name}: postprocessing step {step['id']!r} is not supported")
    if not dicts:
        return None, final

    def apply(y: torch.Tensor) -> torch.Tensor:
        array = _apply_steps(y.detach().cpu().numpy(), dicts, {}, channel_axis=1)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(y.device)

    return apply, final


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
            from .onnx_export import OnnxModule

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


# --- preprocessing fitted on the whole image --------------------------------------------------

def _sample_values(image: Any, has_channels: bool, max_voxels: int = 4_000_000) -> np.ndarray:
    """A regular subsample of ``image`` (channels first when ``has_channels``), as float64."""
    spatial = image.shape[1:] if has_channels else image.shape
    size = int(np.prod(spatial))
    step = max(1, int(np.ceil((size / max_voxels) ** (1 / len(spatial)))))
    index = (slice(None),) * has_channels + (slice(None, None, step),) * len(spatial)
    values = np.asarray(image[index], dtype=np.float64)
    return values if has_channels else values[None]


def _apply_steps(data: np.ndarray, steps: list[dict[str, Any]], stats: dict[int, Any],
                 channel_axis: int | None) -> np.ndarray:
    """Apply preprocessing ``steps`` to ``data``; ``stats[i]`` holds step ``i``'s fitted
    ``(offset, scale)`` arrays (per channel along ``channel_axis``)."""
    out = np.asarray(data, dtype=np.float32)

    def per_channel(values: Any) -> Any:
        values = np.asarray(values, dtype=np.float32)
        if values.ndim == 0 or channel_axis is None:
            return values.reshape(()) if values.size == 1 else values
        shape = [1] * out.ndim
        shape[channel_axis] = values.size
        return values.reshape(shape)

    for index, step in enumerate(steps):
        kind = step["id"]
        if kind == "ensure_dtype":
            continue
        if kind == "scale_linear":
            out = out * per_channel(step.get("gain", 1.0)) + per_channel(step.get("offset", 0.0))
        elif kind == "clip":
            low, high = stats.get(index, (step.get("min"), step.get("max")))
            out = np.clip(out, low if low is not None else -np.inf, high if high is not None else np.inf)
        elif kind == "binarize":
            out = (out > per_channel(step["threshold"])).astype(np.float32)
        elif kind == "sigmoid":
            out = 1.0 / (1.0 + np.exp(-out))
        elif kind == "softmax":
            shifted = np.exp(out - out.max(axis=channel_axis or 0, keepdims=True))
            out = shifted / shifted.sum(axis=channel_axis or 0, keepdims=True)
        elif kind == "fixed_zero_mean_unit_variance":
            out = (out - per_channel(step["mean"])) / per_channel(step["std"])
        else:  # scale_range, zero_mean_unit_variance: fitted
            offset, scale = stats[index]
            out = (out - per_channel(offset)) * per_channel(scale)
        out = out.astype(np.float32, copy=False)
    return out


@dataclass
class ZooPreprocessing:
    """A Zoo model's preprocessing with its statistics taken from the whole image (the rdf's
    sample), applied tile by tile; NaN and infinite voxels become 0, as with our normaliser."""

    steps: list[dict[str, Any]]
    stats: dict[int, Any]
    has_channels: bool

    def __call__(self, data: np.ndarray) -> np.ndarray:
        array = np.asarray(data)
        nonfinite = ~np.isfinite(array) if np.issubdtype(array.dtype, np.inexact) else None
        out = _apply_steps(array, self.steps, self.stats, 0 if self.has_channels else None)
        if nonfinite is not None and nonfinite.any():
            out[nonfinite] = 0.0
        return out


def fit_preprocessing(image: Any, steps: list[dict[str, Any]], has_channels: bool) -> ZooPreprocessing:
    """Fit the statistics of ``steps`` (percentiles, mean and standard deviation) on ``image``."""
    stats: dict[int, Any] = {}
    sample = None
    values = None
    for index, step in enumerate(steps):
        kind = step["id"]
        needs = kind in ("scale_range", "zero_mean_unit_variance") or (
            kind == "clip" and (step.get("min_percentile") is not None
                                or step.get("max_percentile") is not None))
        if not needs:
            continue
        if sample is None:
            sample = _sample_values(image, has_channels)
        # statistics of the data as it is at this step (earlier steps applied)
        values = _apply_steps(sample, steps[:index], stats, 0).astype(np.float64)
        axes = step.get("axes")
        per_channel = has_channels and axes is not None and "channel" not in [str(a) for a in axes]
        flat = values.reshape(values.shape[0], -1) if per_channel else values.reshape(1, -1)
        flat = [row[np.isfinite(row)] for row in flat]
        if kind == "scale_range":
            low = np.array([np.percentile(r, step.get("min_percentile", 0.0)) for r in flat])
            high = np.array([np.percentile(r, step.get("max_percentile", 100.0)) for r in flat])
            stats[index] = (low, 1.0 / (high - low + float(step.get("eps", 1e-6))))
        elif kind == "zero_mean_unit_variance":
            mean = np.array([r.mean() for r in flat])
            std = np.array([r.std() for r in flat])
            stats[index] = (mean, 1.0 / (std + float(step.get("eps", 1e-6))))
        else:
            low = step.get("min")
            high = step.get("max")
            if step.get("min_percentile") is not None:
                low = float(np.percentile(np.concatenate(flat), step["min_percentile"]))
            if step.get("max_percentile") is not None:
                high = float(np.percentile(np.concatenate(flat), step["max_percentile"]))
            stats[index] = (low, high)
        if not per_channel:
            stats[index] = tuple(np.asarray(s).reshape(()) if not isinstance(s, (float, int, type(None)))
                                 else s for s in stats[index])
    return ZooPreprocessing(steps, stats, has_channels)


# --- running a foreign model: blended tiles ----------------------------------------------------

def _ramp(region: Sequence[slice], spatial: Sequence[int], overlap: Sequence[int]) -> np.ndarray:
    """Blending weights over ``region``: linear ramps over ``2 * overlap`` at each side that
    has a neighbour (not at the image border), 1 elsewhere; never 0."""
    weights = None
    for axis, (part, n, o) in enumerate(zip(region, spatial, overlap)):
        length = part.stop - part.start
        w = np.ones(length, np.float32)
        if o > 0:
            position = np.arange(length, dtype=np.float32) + 0.5
            if part.start > 0:
                w = np.minimum(w, position / (2 * o))
            if part.stop < n:
                w = np.minimum(w, (length - position) / (2 * o))
        shape = [1] * len(region)
        shape[axis] = length
        w = w.reshape(shape)
        weights = w if weights is None else weights * w
    return weights


def predict_foreign(image: Any, model: ForeignModel, *, device: str | torch.device = "auto",
                    precision: str = "auto", tile_shape: Sequence[int] | None = None,
                    batch_size: int | None = None, start_at: Sequence[int] | None = None,
                    max_bytes: float | None = None, normalizer: Any = None, tta: bool = False,
                    **_ignored: Any) -> Generator[Any, None, np.ndarray]:
    """Probabilities of a Zoo model on ``image``, tile by tile with blended overlaps.

    Tiles are planned and run by the engine (:func:`napari_unet.inference.make_plan`,
    :class:`~napari_unet.inference.TileRunner`, with its memory back-off): each tile is read
    with the rdf's halo plus the overlap around its core, the halo is cropped, and the core
    plus overlap is added with linear blending weights. ``precision="auto"`` is fp32 (how a
    foreign model behaves in bf16 is unknown). Yields :class:`~napari_unet.inference.Progress`,
    returns float32 probabilities ``(channels, *spatial)``.
    """
    from .inference import (Progress, TileRunner, first_tiles, make_plan, runner_progress,
                            select_device)
    from .precision import resolve_precision
    from .tiling import Tile

    torch_device = select_device(device)
    if precision == "auto":
        precision = "fp32"
    policy = resolve_precision(precision, torch_device)
    if tile_shape is None and model.fixed_tile is not None:
        spatial_shape = image.shape[-model.spatial_dims:]
        tile_shape = tuple(f if f else min(n, 512) for f, n in zip(model.fixed_tile, spatial_shape))
        if image.ndim - (model.config.in_channels > 1) > model.spatial_dims:
            tile_shape = tile_shape[-2:]
    plan = make_plan(image, model, device=torch_device, precision=precision, tile_shape=tile_shape,
                     max_bytes=max_bytes, batch_size=batch_size)
    normalizer = normalizer or fit_preprocessing(image, model.preprocessing, plan.has_channels)
    network = model.network.eval().to(torch_device)
    runner = TileRunner(image, network, normalizer, torch_device, policy, model.task, plan)
    overlap = (0, *model.overlap) if plan.slicewise else tuple(model.overlap)
    spatial = plan.spatial
    channels = model.config.out_channels
    total_values = np.zeros((channels, *spatial), np.float32)
    total_weight = np.zeros(spatial, np.float32)

    def widen(tile: Tile) -> Tile:
        write = tuple(slice(max(r.start, w.start - o), min(r.stop, w.stop + o))
                      for r, w, o in zip(tile.read, tile.write, overlap))
        return Tile(tile.read, write)

    def write(tile: Tile, values: np.ndarray) -> None:
        weight = _ramp(tile.write, spatial, overlap)
        total_values[(slice(None), *tile.write)] += values * weight
        total_weight[tile.write] += weight

    cores = first_tiles(plan, start_at)
    tiles = [widen(t) for t in cores]
    core_of = {id(t): c.write for t, c in zip(tiles, cores)}
    start = time.perf_counter()
    total = len(tiles)
    yield Progress(0, total, 0.0, message=f"{policy.label()}, {plan.describe()}, blended "
                   f"overlap {tuple(overlap)} + halo {tuple(model.halo)}", stage="plan")
    for note in model.notes[1:] + (["test-time augmentation is not used with Zoo models made "
                                     "elsewhere"] if tta else []):
        yield Progress(0, total, 0.0, message=note)

    def view(tile: Tile) -> tuple[tuple[slice, ...], np.ndarray]:
        region = core_of.get(id(tile), tile.write)
        weight = np.maximum(total_weight[region], 1e-12)
        return region, total_values[(slice(None), *region)] / weight

    yield from runner_progress(runner, tiles, write, view, start)
    np.maximum(total_weight, 1e-12, out=total_weight)
    total_values /= total_weight
    return total_values


def segment_foreign(image: Any, model: ForeignModel, *, output: str = "labels",
                    threshold: float | None = None, min_size: int | None = None,
                    voxel_size: Sequence[float] | None = None, seed_threshold: float | None = None,
                    **predict_options: Any) -> Generator[Any, None, Any]:
    """:func:`napari_unet.inference.segment` for a :class:`ForeignModel` (blended tiles)."""
    from .inference import OUTPUTS, postprocessed

    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    predictor = predict_foreign(image, model, **predict_options)
    return (yield from postprocessed(predictor, model, output=output, threshold=threshold,
                                     min_size=min_size, voxel_size=voxel_size,
                                     seed_threshold=seed_threshold))


def segment_model(image: Any, model: SegmentationModel, **options: Any) -> Generator[Any, None, Any]:
    """:func:`napari_unet.inference.segment`, or :func:`segment_foreign` for a Zoo model made
    elsewhere: the one entry point of the CLI and the Segment dock."""
    if isinstance(model, ForeignModel):
        return segment_foreign(image, model, **options)
    from .inference import segment

    return segment(image, model, **options)
