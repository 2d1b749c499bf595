"""``napari-unet suggest``: which slices to correct first."""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_unet.cli.common import (
    OutputWriteError,
    UsageError,
    _check_image_values,
    _drain_with_bar,
    _finite_float,
    _int_at_least,
    _parse_ints,
)
from napari_unet.cli.predict import _object_scale, _object_size
from napari_unet.cli.train import _parse_slices

# --- suggest -------------------------------------------------------------------------------


def _add_suggest(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "suggest", help="rank the slices of a stack worth correcting first",
        description="Segment a stack and print the slices where the model is most uncertain "
                    "(index and score, best first): the ones to correct and fine-tune on.")
    parser.add_argument("input", help="3D stack (TIFF/OME-TIFF, NIfTI, zarr, DICOM series folder)")
    parser.add_argument("--model", required=True, help="shipped model name or .pt file (2D models run slice by slice)")
    parser.add_argument("-n", type=_int_at_least(1), default=5, help="slices to suggest (default 5)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: the disagreement between 8 flips and "
                             "rotations counts too (8x slower)")
    parser.add_argument("--min-gap", type=_int_at_least(1), default=None,
                        help="suggested slices are at least this far apart (default: the stack "
                             "depth / 2n; 1 = no spacing)")
    parser.add_argument("--exclude", type=_parse_slices, default=None,
                        help="slices never to suggest (e.g. already corrected), like 3,10-12")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--tile", type=_parse_ints, default=None, help="largest tile read at once")
    parser.add_argument("--threshold", type=_finite_float(0, 1), default=None,
                        help="foreground probability threshold (default: the model's, else 0.5)")
    parser.add_argument("--object-size", type=_object_size, default=None, metavar="DIAMETER",
                        help="expected object diameter, as for predict (12, 12px, 12um or auto)")
    parser.add_argument("--uncertainty", default=None, metavar="FILE.tif",
                        help="also write the uncertainty map (0..1, float32) to this file")
    parser.set_defaults(handler=_run_suggest)


def _run_suggest(args: argparse.Namespace) -> int:
    from napari_unet.engine.uncertainty import suggest
    from napari_unet.io.files import check_output_path
    from napari_unet.io.readers import read_image
    from napari_unet.io.writers import write_image_tiff
    from napari_unet.zoo.loading import load_model

    target = Path(args.uncertainty) if args.uncertainty else None
    if target is not None:
        if target.suffix.lower() not in (".tif", ".tiff"):
            raise UsageError(f"--uncertainty must be a .tif file, got {target.name!r}")
        check_output_path(target)
    model = load_model(args.model)
    image = read_image(args.input, allow_channels=model.config.in_channels > 1)
    if len(image.spatial_axes) != 3:
        raise UsageError(f"suggest ranks the slices of a 3D stack; {Path(args.input).name} is "
                         f"a {len(image.spatial_axes)}D image")
    _check_image_values(image, model)
    depth = int(image.data.shape[-3])
    if args.exclude and set(range(depth)) <= set(args.exclude):
        raise UsageError(f"no slices left to suggest: --exclude covers all {depth} slices of "
                         f"{Path(args.input).name}; exclude fewer slices")
    scale = _object_scale(args, model, image.data, image.voxel_size, image.unit)
    job = suggest(image.data, model, args.n, tta=args.tta, min_gap=args.min_gap,
                  exclude=args.exclude or (), threshold=args.threshold, device=args.device,
                  precision=args.precision, tile_shape=args.tile, scale=scale)
    found = _drain_with_bar(job, model.label)
    if target is not None:
        try:
            write_image_tiff(target, found.uncertainty.astype("float32"), voxel_size=image.voxel_size,
                             unit=image.unit or "um", input_path=image.path, axes=image.spatial_axes)
        except OSError as err:
            raise OutputWriteError(target, err) from err
    print("slice\tscore")
    for z, score in found.slices:
        print(f"{z}\t{score:.4f}")
    return 0
