"""bioimage.io Model Zoo packages (model spec 0.5) of napari-unet models.

:func:`export_bioimageio` writes a package that ``bioimageio.spec`` validates: the network as
``pytorch_state_dict`` (architecture: ``napari_unet/models.py``, which imports only torch, with
the checkpoint's config as ``UNet(**kwargs)``), TorchScript and ONNX weights, test input/output
tensors, a cover image, the model card as documentation, axes with the voxel size, the
normalisation as preprocessing (percentiles -> ``scale_range``, a CT window -> ``clip`` +
``scale_linear``) and sigmoid / softmax as postprocessing. The checkpoint's own settings ride
along in ``config.napari_unet``, so :func:`napari_unet.zoo.loading.load_zoo_model` gets the same model
back.

Needs the optional packages of the ``bioimageio`` extra; nothing here imports Qt or napari.
"""

from __future__ import annotations

import ast
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from napari_unet.io.files import atomic_write
from napari_unet.model.checkpoint import (
    SegmentationModel,
    list_pretrained,
    pretrained_card,
)
from napari_unet.model.unet import UNet
from napari_unet.zoo.description import (
    CONFIG_KEY,
    ZOO_FORMAT,
    ZooError,
    _first_line,
    _require_spec,
)

#: the sample image (``sample_data/<name>.tif``) of each shipped model, for its test tensors
SAMPLE_OF = {"em-membranes-2d": "em_2d", "nuclei-2d": "nuclei_2d", "nuclei-3d": "nuclei_3d",
             "cells-3d": "cells_3d"}
#: test tensor size (per spatial axis, at most; rounded down to the divisor)
TEST_SHAPE = {2: (256, 256), 3: (64, 128, 128)}
WEIGHT_FORMATS = ("pytorch_state_dict", "torchscript", "onnx")
_UNITS = {"um": "micrometer", "µm": "micrometer", "micron": "micrometer", "nm": "nanometer",
          "mm": "millimeter", "micrometer": "micrometer", "nanometer": "nanometer",
          "millimeter": "millimeter"}


@dataclass
class ExportReport:
    """What :func:`export_bioimageio` wrote and what ``bioimageio.spec`` says about it."""

    path: Path
    status: str
    warnings: list[str] = field(default_factory=list)
    weight_formats: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"bioimageio.spec {_spec_version()}: {self.status}"
        if self.warnings:
            text += f", {len(self.warnings)} warning(s): " + "; ".join(self.warnings)
        else:
            text += ", no warnings"
        return text


def _spec_version() -> str:
    try:
        from bioimageio.spec import __version__
    except ImportError:
        return "?"
    return str(__version__)


def _float32_state(network: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in network.state_dict().items()}


def sample_input(model: SegmentationModel, image: np.ndarray | None = None) -> np.ndarray:
    """A raw test input ``(channels, *spatial)`` (float32): a centred crop of ``image`` (default:
    the shipped sample of the model, else the sample of its dimensionality), whose sides are
    multiples of the network's divisor."""
    from napari_unet.io.readers import read_image

    if image is None:
        sample = SAMPLE_OF.get(model.name) or ("nuclei_2d" if model.spatial_dims == 2 else "nuclei_3d")
        root = Path(str(resources.files("napari_unet.sample_data")))
        image = read_image(root / f"{sample}.tif").data
    data = np.asarray(image)
    channels = model.config.in_channels
    if data.ndim == model.spatial_dims:
        data = np.repeat(data[None], channels, axis=0)
    if data.ndim != model.spatial_dims + 1 or data.shape[0] != channels:
        raise ZooError(f"the test image has shape {np.shape(image)}; the model takes "
                       f"{channels} channel(s) of {model.spatial_dims}D images")
    divisor = model.config.divisor()
    region = []
    for size, want, div in zip(data.shape[1:], TEST_SHAPE[model.spatial_dims], divisor):
        length = min(size, want) // div * div
        if length < div:
            raise ZooError(f"the test image is too small ({tuple(data.shape[1:])}) for the "
                           f"network's divisor {divisor}")
        start = (size - length) // 2
        region.append(slice(start, start + length))
    return np.ascontiguousarray(data[(slice(None), *region)], dtype=np.float32)


def declared_halo(exact: Sequence[int], divisor: Sequence[int],
                  test_shape: Sequence[int]) -> tuple[int, ...]:
    """The output halo written into the rdf: the exact one (tiles cropped by it give the
    untiled result), unless the test input is too small for it. The spec requires inputs of
    at least ``2 * halo + step``, and bioimage.io tools run the test input as it is, so where
    it is smaller (a stack of few slices) the halo is cut to what fits."""
    return tuple(int(min(h, (n - d) // 2 // d * d)) for h, d, n in zip(exact, divisor, test_shape))


def _normalize_test_input(model: SegmentationModel, raw: np.ndarray) -> np.ndarray:
    """``raw`` normalised as the package's preprocessing does (statistics of this sample)."""
    from napari_unet.model.normalization import fit_normalizer

    return fit_normalizer(raw, model.normalization)(raw)


def _activation(task: str, logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=1) if task == "semantic" else torch.sigmoid(logits)


def _channel_names(model: SegmentationModel) -> list[str]:
    if model.task == "semantic":
        names = [str(n) for n in model.class_names]
    elif model.task == "foreground_boundary":
        names = ["foreground", "boundary"]
    elif model.task == "membranes":
        names = ["membranes"]
    else:
        names = ["foreground"]
    return _unique_identifiers(names)


def _unique_identifiers(names: Sequence[str]) -> list[str]:
    """Names usable as bioimage.io channel names (identifiers, unique)."""
    out: list[str] = []
    for name in names:
        ident = "".join(c if c.isalnum() or c == "_" else "_" for c in str(name)) or "channel"
        if ident[0].isdigit():
            ident = f"c{ident}"
        base, n = ident, 2
        while ident in out:
            ident, n = f"{base}_{n}", n + 1
        out.append(ident)
    return out


def _preprocessing(spec_v: Any, model: SegmentationModel, axes: list[str]) -> list[Any]:
    """Our normalisation as bioimage.io preprocessing steps (after a cast to float32)."""
    steps: list[Any] = [spec_v.EnsureDtypeDescr(kwargs=spec_v.EnsureDtypeKwargs(dtype="float32"))]
    settings = model.normalization or {"mode": "percentile"}
    mode = settings.get("mode", "percentile")
    if mode == "percentile":
        steps.append(spec_v.ScaleRangeDescr(kwargs=spec_v.ScaleRangeKwargs(
            axes=[spec_v.AxisId(a) for a in axes],
            min_percentile=float(settings.get("low", 1.0)),
            max_percentile=float(settings.get("high", 99.8)))))
    elif mode == "window":
        center, width = float(settings["center"]), float(settings["width"])
        low = center - width / 2
        steps.append(spec_v.ClipDescr(kwargs=spec_v.ClipKwargs(min=low, max=low + width)))
        steps.append(spec_v.ScaleLinearDescr(kwargs=spec_v.ScaleLinearKwargs(
            gain=1.0 / width, offset=-low / width)))
    elif mode != "none":
        raise ZooError(f"normalisation {mode!r} has no bioimage.io preprocessing")
    return steps


def _cover(raw: np.ndarray, probabilities: np.ndarray, task: str, path: Path) -> None:
    """A 2:1 PNG: the (middle slice of the) test input, and its prediction in colour over it."""
    from PIL import Image

    image = raw[0]
    probs = probabilities[0]
    if image.ndim == 3:
        image, probs = image[image.shape[0] // 2], probs[:, probs.shape[1] // 2]
    low, high = np.percentile(image, [1, 99.8])
    gray = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    fg = 1.0 - probs[0] if task == "semantic" else probs[0]
    left = np.stack([gray] * 3, axis=-1)
    tint = np.array([1.0, 0.35, 0.1]) if task in ("membranes",) else np.array([0.1, 0.9, 0.3])
    right = left * (1 - 0.6 * fg[..., None]) + 0.6 * fg[..., None] * tint
    pair = np.concatenate([left, right], axis=1)
    picture = Image.fromarray(np.round(pair * 255).astype(np.uint8))
    height = max(128, min(512, picture.height))
    picture.resize((2 * height, height), Image.BILINEAR).save(path, format="PNG")


def _validation_section(model: SegmentationModel, test_shape: Sequence[int],
                        halo: Sequence[int] = ()) -> str:
    scores = [entry for entry in model.history if entry.get("best_score") is not None]
    lines = ["## Validation", ""]
    if scores:
        last = scores[-1]
        lines.append(f"Fine-tuning kept the weights that scored best on a held-out part of the "
                     f"corrections: Dice {last['best_score']:.3f}.")
    else:
        lines.append("See the accuracy on held-out data above, where given.")
    lines += ["", f"The package's test output is napari-unet's own fp32 prediction on the test "
              f"input (a {'x'.join(map(str, test_shape))} crop of the model's sample image, "
              "normalised with that crop's percentiles as the preprocessing does); "
              "`bioimageio.core` reproduces it with every weight format.", ""]
    exact = tuple(model.config.halo())
    if halo and tuple(halo) != exact:
        lines += [f"Tiling: the output halo in the rdf is {tuple(halo)} voxels, cut down so "
                  f"that the test input fits; tiles cropped by {exact} give exactly the untiled "
                  "result.", ""]
    return "\n".join(lines)


def _documentation(model: SegmentationModel, test_shape: Sequence[int] = (),
                   halo: Sequence[int] = ()) -> str:
    card = pretrained_card(model.name) if model.name in list_pretrained() else ""
    validation = _validation_section(model, test_shape, halo)
    if card and model.version == 1:
        return card.rstrip() + "\n\n" + validation
    lines = [f"# {model.name} v{model.version}", "", model.description or "", ""]
    if card:
        lines += [f"Fine-tuned from the shipped model `{model.name}`; its card follows.", ""]
    lines += [f"- **Task**: `{model.task}` (classes: {', '.join(map(str, model.class_names))})",
              f"- **Network**: {model.spatial_dims}D UNet {model.config.to_dict()}",
              f"- **Input normalisation**: {model.normalization}", ""]
    if model.history:
        lines += ["## History", ""]
        lines += [f"- {json.dumps(entry, default=str)}" for entry in model.history]
        lines.append("")
    lines += [validation, "Made with napari-unet (`napari-unet export MODEL -o NAME.zip "
              "--format bioimageio`).", ""]
    if card:
        lines += ["---", "", card]
    return "\n".join(lines)


def _napari_unet_config(model: SegmentationModel) -> dict[str, Any]:
    """The checkpoint's settings as plain YAML values (``config.napari_unet``)."""
    meta = json.loads(json.dumps(model.metadata(), default=str))
    return {"format": ZOO_FORMAT, "config": model.config.to_dict(), "metadata": meta,
            "exact_halo": list(model.config.halo())}


#: the modules of the UNet family, in the order they depend on each other
ARCHITECTURE_MODULES = ("config", "blocks", "unet")


def write_architecture_source(path: Path) -> Path:
    """Write the UNet family (``napari_unet.model``) as one file that imports nothing of ours.

    bioimage.io tools run the architecture file of a package on its own, so the imports
    between the model modules are dropped and the modules follow one another."""
    package = Path(__file__).resolve().parents[1] / "model"
    parts = ["from __future__ import annotations\n"]
    for name in ARCHITECTURE_MODULES:
        text = (package / f"{name}.py").read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        drop = set()
        for node in ast.parse(text).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("napari_unet", "__future__")):
                drop.update(range(node.lineno - 1, node.end_lineno))
        parts.append(f"\n# ---- napari_unet/model/{name}.py\n")
        parts.append("".join(line for i, line in enumerate(lines) if i not in drop))
    path.write_text("".join(parts), encoding="utf-8")
    return path


def build_description(model: SegmentationModel, folder: Path, *,
                      test_image: np.ndarray | None = None,
                      weight_formats: Sequence[str] = WEIGHT_FORMATS) -> Any:
    """The ``bioimageio.spec`` model description of ``model``, its files written to ``folder``."""
    from napari_unet.zoo.onnx import (
        OPSET,
        axis_names,
        example_input,
        exportable_network,
        trace_to_onnx,
    )

    _require_spec()
    from bioimageio.spec.model import v0_5 as v

    unknown = set(weight_formats) - set(WEIGHT_FORMATS)
    if unknown or "pytorch_state_dict" not in weight_formats:
        raise ZooError(f"weight formats must include pytorch_state_dict and come from "
                       f"{', '.join(WEIGHT_FORMATS)}; got {', '.join(weight_formats)}")
    network = UNet(model.config)
    network.load_state_dict(_float32_state(model.network))
    network.eval()
    dims = model.spatial_dims
    names = axis_names(dims)
    divisor, halo = model.config.divisor(), model.config.halo()

    raw = sample_input(model, test_image)[None]  # (1, C, *spatial)
    halo = declared_halo(halo, divisor, raw.shape[2:])
    with torch.no_grad():
        expected = _activation(model.task, network(torch.from_numpy(
            _normalize_test_input(model, raw)))).numpy().astype(np.float32)
    np.save(folder / "test_input.npy", raw)
    np.save(folder / "test_output.npy", expected)
    import tifffile

    # sample tensors (for display, FAIR): the same arrays as TIFF files
    tifffile.imwrite(folder / "sample_input.tif", raw)
    tifffile.imwrite(folder / "sample_output.tif", expected)
    _cover(raw[0], expected[0], model.task, folder / "cover.png")
    (folder / "README.md").write_text(_documentation(model, raw.shape[2:], halo), encoding="utf-8")

    voxel = list(model.voxel_size) if model.voxel_size and len(model.voxel_size) == dims else None
    unit = _UNITS.get(str(model.unit or "um").lower()) if voxel else None
    in_channels = [f"channel{i}" for i in range(model.config.in_channels)]
    if len(in_channels) == 1:
        in_channels = ["raw"]

    def space_in(i: int, name: str) -> Any:
        # sizes on the pooling grid, larger than the output halo cropped from both sides
        return v.SpaceInputAxis(id=v.AxisId(name), size=v.ParameterizedSize(
            min=2 * halo[i] + divisor[i], step=divisor[i]),
            scale=float(voxel[i]) if voxel else 1.0, unit=unit)

    def space_out(i: int, name: str) -> Any:
        common = dict(id=v.AxisId(name), scale=float(voxel[i]) if voxel else 1.0, unit=unit,
                      size=v.SizeReference(tensor_id=v.TensorId("raw"), axis_id=v.AxisId(name)))
        if halo[i] < 1:
            return v.SpaceOutputAxis(**common)
        return v.SpaceOutputAxisWithHalo(halo=int(halo[i]), **common)

    inputs = [v.InputTensorDescr(
        id=v.TensorId("raw"), description="image (raw intensities; normalised by the preprocessing)",
        axes=[v.BatchAxis(), v.ChannelAxis(channel_names=[v.Identifier(c) for c in in_channels]),
              *(space_in(i, n) for i, n in enumerate(names))],
        test_tensor=v.FileDescr(source=folder / "test_input.npy"),
        sample_tensor=v.FileDescr(source=folder / "sample_input.tif"),
        data=v.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=_preprocessing(v, model, ["channel", *names]))]
    postprocessing: list[Any] = [
        v.SoftmaxDescr(kwargs=v.SoftmaxKwargs(axis=v.AxisId("channel")))
        if model.task == "semantic" else v.SigmoidDescr()]
    outputs = [v.OutputTensorDescr(
        id=v.TensorId("probabilities"), description=f"{model.task} probabilities",
        axes=[v.BatchAxis(),
              v.ChannelAxis(channel_names=[v.Identifier(c) for c in _channel_names(model)]),
              *(space_out(i, n) for i, n in enumerate(names))],
        test_tensor=v.FileDescr(source=folder / "test_output.npy"),
        sample_tensor=v.FileDescr(source=folder / "sample_output.tif"),
        data=v.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        postprocessing=postprocessing)]

    torch.save(_float32_state(network), folder / "weights.pt")
    version = v.Version(torch.__version__.split("+")[0])
    weights: dict[str, Any] = {"pytorch_state_dict": v.PytorchStateDictWeightsDescr(
        source=folder / "weights.pt", pytorch_version=version,
        architecture=v.ArchitectureFromFileDescr(
            source=write_architecture_source(folder / "models.py"), callable=v.Identifier("UNet"),
            kwargs=model.config.to_dict()))}
    exportable = exportable_network(model)
    example = example_input(model)
    if "torchscript" in weight_formats:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(exportable, example, check_trace=False)
        traced.save(str(folder / "weights_torchscript.pt"))
        weights["torchscript"] = v.TorchscriptWeightsDescr(
            source=folder / "weights_torchscript.pt", pytorch_version=version,
            parent="pytorch_state_dict")
    if "onnx" in weight_formats:
        try:
            trace_to_onnx(exportable, example, folder / "weights.onnx", dims, OPSET)
        except Exception as err:  # noqa: BLE001 - onnx missing or not exportable: one line
            raise ZooError(f"ONNX weights could not be written ({_first_line(err)}); "
                           "pip install 'napari-unet-loop[onnx]', or leave out onnx") from err
        weights["onnx"] = v.OnnxWeightsDescr(source=folder / "weights.onnx", opset_version=OPSET,
                                             parent="pytorch_state_dict")

    cite = [v.CiteEntry(text="Ronneberger, Fischer, Brox: U-Net: Convolutional Networks for "
                             "Biomedical Image Segmentation (MICCAI 2015)",
                        doi=v.Doi("10.1007/978-3-319-24574-4_28"))]
    if dims == 3:
        cite.append(v.CiteEntry(text="Cicek et al.: 3D U-Net: Learning Dense Volumetric "
                                     "Segmentation from Sparse Annotation (MICCAI 2016)",
                                doi=v.Doi("10.1007/978-3-319-46723-8_49")))
    description = (model.description or f"{dims}D UNet ({model.task})").strip()
    return v.ModelDescr(
        name=_zoo_name(model), description=description[:1000],
        authors=[v.Author(name="napari-unet developers")],
        cite=cite, license=v.LicenseId("BSD-3-Clause"),
        documentation=v.FileDescr(source=folder / "README.md"),
        covers=[v.FileDescr(source=folder / "cover.png")],
        tags=["napari-unet", "unet", f"{dims}d", "segmentation", model.task.replace("_", "-"),
              "pytorch"],
        inputs=inputs, outputs=outputs, weights=v.WeightsDescr(**weights),
        config=v.Config(**{CONFIG_KEY: _napari_unet_config(model)}))


def _zoo_name(model: SegmentationModel) -> str:
    """A Zoo model name: letters, digits, ``-_. ()`` (at most 128 characters)."""
    text = f"napari-unet {model.name} v{model.version}"
    clean = "".join(c if c.isalnum() or c in " -_.()" else "-" for c in text)
    return clean[:128]


def export_bioimageio(model: SegmentationModel, path: str | os.PathLike, *,
                      test_image: np.ndarray | None = None,
                      weight_formats: Sequence[str] = WEIGHT_FORMATS,
                      validate: bool = True) -> ExportReport:
    """Write ``model`` as a bioimage.io package (``.zip``) to ``path``, atomically.

    Parameters
    ----------
    test_image : array, optional
        Image for the package's test tensors (a centred crop; default: the model's sample).
    weight_formats : sequence of str
        ``pytorch_state_dict`` (always) plus ``torchscript`` and/or ``onnx``.
    validate : bool
        Load the written package again with ``bioimageio.spec`` (file checks included) and
        report its status and warnings.

    Raises
    ------
    ZooError
        ``bioimageio.spec`` is missing, or the description it builds is invalid (one line).
    """
    spec = _require_spec()
    path = Path(path)
    if path.suffix.lower() != ".zip":
        raise ZooError(f"a bioimage.io package is a .zip file, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="napari-unet-zoo-") as tmp:
        folder = Path(tmp)
        try:
            descr = build_description(model, folder, test_image=test_image,
                                      weight_formats=weight_formats)
        except ZooError:
            raise
        except Exception as err:  # pydantic validation of the description
            raise ZooError(f"the bioimage.io description of {model.label} is invalid: "
                           f"{_validation_message(err)}") from err

        def write(target: Path) -> None:
            spec.save_bioimageio_package(descr, output_path=target)

        atomic_write(path, write)
        formats = [name for name in WEIGHT_FORMATS if getattr(descr.weights, name) is not None]
    if not validate:
        return ExportReport(path, "written (not validated)", weight_formats=formats)
    status, notes = validation_summary(path)
    return ExportReport(path, status, notes, weight_formats=formats)


def _validation_message(err: BaseException) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            return f"{where}: {first.get('msg')}"
        except Exception:  # noqa: BLE001 - fall back to the text
            pass
    return _first_line(err)


def validation_summary(source: str | os.PathLike) -> tuple[str, list[str]]:
    """``bioimageio.spec``'s verdict on a package (format and file checks, no model run):
    its status (e.g. ``valid-format``) and its warnings, one line each."""
    spec = _require_spec()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        descr = spec.load_description(str(source), perform_io_checks=True)
    summary = descr.validation_summary
    notes = []
    for detail in summary.details:
        for warning in getattr(detail, "warnings", []) or []:
            where = ".".join(str(p) for p in getattr(warning, "loc", ()) or ())
            notes.append(f"{where}: {_first_line(warning.msg)}" if where else _first_line(warning.msg))
        for error in getattr(detail, "errors", []) or []:
            where = ".".join(str(p) for p in getattr(error, "loc", ()) or ())
            notes.append(f"error {where}: {_first_line(error.msg)}")
    return str(summary.status), notes
