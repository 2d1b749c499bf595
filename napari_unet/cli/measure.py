"""``napari-unet measure``: one row per object of a labels file, as CSV."""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_unet.cli.common import OutputWriteError, UsageError

# --- measure -------------------------------------------------------------------------------


def _voxel_size(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or not all(v > 0 and v != float("inf") for v in values):
        raise argparse.ArgumentTypeError(
            f"expected positive numbers like 0.28,0.127,0.127, got {text!r}")
    return values


def _add_measure(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "measure", help="measure each object of a labels file (CSV, calibrated units)",
        description="One row per object: label, voxel count, volume (area in 2D) in calibrated "
                    "units, centroid, bounding box, equivalent diameter, solidity (2D: also "
                    "perimeter and eccentricity), and with --image the mean/min/max intensity. "
                    "The voxel size comes from the labels file (or --voxel-size).")
    parser.add_argument("labels", help="labels file (TIFF/OME-TIFF, NIfTI, ...)")
    parser.add_argument("--image", default=None,
                        help="image of the same shape for the intensity columns")
    parser.add_argument("-o", "--output", required=True, help="CSV file to write")
    parser.add_argument("--voxel-size", type=_voxel_size, default=None,
                        help="voxel size z,y,x (y,x in 2D), overrides the file's")
    parser.add_argument("--unit", default=None,
                        help="length unit of the voxel size (default: the file's, else um)")
    parser.set_defaults(handler=_run_measure)


def _run_measure(args: argparse.Namespace) -> int:
    from napari_unet.cli.common import _drain_with_bar
    from napari_unet.io.files import check_output_path
    from napari_unet.io.readers import read_image
    from napari_unet.io.table import write_csv
    from napari_unet.labels.measure import column_units, measure_labels
    from napari_unet.labels.metrics import as_label_image

    output = check_output_path(args.output)
    loaded = read_image(args.labels)
    labels = as_label_image(loaded.data, f"labels {Path(args.labels).name}")
    image = None
    if args.image is not None:
        image = read_image(args.image).data
        if image.shape != labels.shape:
            raise UsageError(f"image {Path(args.image).name} has shape {image.shape}, labels "
                             f"{labels.shape}; give the image the labels were made from")
    spacing = args.voxel_size or loaded.voxel_size
    if spacing is not None and len(spacing) != labels.ndim:
        raise UsageError(f"--voxel-size has {len(spacing)} values for {labels.ndim}D labels")
    unit = args.unit or loaded.unit or ("um" if spacing is not None else "px")  # none: pixels
    table = _drain_with_bar(measure_labels(labels, image, spacing), "measure", unit="object")
    try:
        write_csv(output, table, column_units(labels.ndim, unit, intensity=image is not None))
    except OSError as err:
        raise OutputWriteError(output, err) from err
    size = "volume" if labels.ndim == 3 else "area"
    print(f"{len(table['label'])} objects measured ({size} in {unit}^{labels.ndim}): {output}")
    return 0
