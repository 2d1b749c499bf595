"""A bioimage.io model made elsewhere, as a :class:`SegmentationModel`."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.zoo.description import ZooError, _file_bytes, _first_line
from napari_unet.zoo.network import ZooNetConfig, ZooNetwork, _load_weights
from napari_unet.zoo.preprocessing import _apply_steps

#: a foreign model's tiles overlap by this much per side (voxels, beyond its halo); the
#: overlap is blended with linear ramps
DEFAULT_OVERLAP = 16
_SHORT_UNITS = {"micrometer": "um", "nanometer": "nm", "millimeter": "mm", "centimeter": "cm",
                "meter": "m", "angstrom": "A"}


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
