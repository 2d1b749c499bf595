"""``napari-unet export``: export a model as ONNX or a bioimage.io package."""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_unet.cli.common import UsageError

# --- export --------------------------------------------------------------------------------

EXPORT_FORMATS = {".onnx": "onnx", ".zip": "bioimageio"}


def _add_export(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export", help="write a model as ONNX or as a bioimage.io Model Zoo package",
        description="Write MODEL (shipped name, .pt checkpoint or a package made by napari-unet) "
                    "as ONNX (.onnx: the network, dynamic batch and spatial axes, checked against "
                    "torch with onnxruntime) or as a bioimage.io model package (.zip, model spec "
                    "0.5: weights as PyTorch state dict, TorchScript and ONNX, test tensors, "
                    "cover, model card; validated with bioimageio.spec).")
    parser.add_argument("model", help="shipped model name (see 'napari-unet models') or model file")
    parser.add_argument("-o", "--output-file", "--out", dest="output_file", required=True,
                        help="NAME.onnx or NAME.zip")
    parser.add_argument("--format", choices=["auto", "onnx", "bioimageio"], default="auto",
                        help="auto: from the output's suffix (.onnx: onnx, .zip: bioimageio)")
    parser.add_argument("--test-image", default=None,
                        help="bioimageio: image for the package's test tensors (a centred crop; "
                             "default: the model's sample image)")
    parser.add_argument("--weights", default="pytorch_state_dict,torchscript,onnx",
                        help="bioimageio: weight formats, comma separated (pytorch_state_dict "
                             "always; torchscript, onnx)")
    parser.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from napari_unet.io.files import check_output_path
    from napari_unet.io.readers import read_image
    from napari_unet.model.checkpoint import check_not_shipped
    from napari_unet.zoo.loading import load_model

    output_path = Path(args.output_file)
    suffix = output_path.suffix.lower()
    fmt = EXPORT_FORMATS.get(suffix) if args.format == "auto" else args.format
    if fmt is None:
        raise UsageError(f"cannot tell the format from {output_path.name!r}: name it .onnx or "
                         ".zip, or give --format")
    wanted = {"onnx": ".onnx", "bioimageio": ".zip"}[fmt]
    if suffix != wanted:
        raise UsageError(f"--format {fmt} writes a {wanted} file, got {output_path.name!r}")
    check_not_shipped(output_path)
    check_output_path(output_path, create_parent=True)
    model = load_model(args.model)
    if getattr(model, "foreign", False):
        raise UsageError(f"{args.model} is a Zoo model made elsewhere; only napari-unet models "
                         "are exported")
    if fmt == "onnx":
        from napari_unet.zoo.onnx import export_onnx

        written = export_onnx(model, output_path)
        print(f"wrote {written} ({model.label}; checked against torch with onnxruntime)")
        return 0
    from napari_unet.zoo.export import export_bioimageio

    test_image = None
    if args.test_image is not None:
        test_image = read_image(args.test_image, allow_channels=model.config.in_channels > 1).data
    formats = [f.strip() for f in args.weights.split(",") if f.strip()]
    report = export_bioimageio(model, output_path, test_image=test_image, weight_formats=formats)
    print(f"wrote {report.path} ({model.label}; weights: {', '.join(report.weight_formats)}); "
          f"{report.summary()}")
    return 0
