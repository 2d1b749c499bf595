"""``napari-unet eval``: score a segmentation against ground truth."""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_unet.cli.common import UsageError, _finite_float
from napari_unet.cli.train import _parse_slices

# --- eval ----------------------------------------------------------------------------------

def _add_eval(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="score a segmentation against ground truth",
                                 description="Pixel Dice/IoU and, for instance labels, object "
                                             "precision/recall/F1 and mean IoU of matches.")
    parser.add_argument("pred", help="predicted labels (file)")
    parser.add_argument("gt", help="ground-truth labels (file)")
    parser.add_argument("--iou-threshold", type=_finite_float(0, 1), default=0.5)
    parser.add_argument("--instances", choices=["auto", "yes", "no"], default="auto",
                        help="also score objects (auto: when the ground truth has several ids)")
    parser.add_argument("--slices", type=_parse_slices, default=None,
                        help="score only these slices of a stack, e.g. 24-29")
    parser.add_argument("--threshold", type=_finite_float(0, 1), default=None,
                        help="the prediction is a probability map: foreground where it is above "
                             "this value (NaN = background)")
    parser.set_defaults(handler=_run_eval)


def _read_label_file(path: str, what: str):
    """A one-channel label image for ``eval``; other images are refused naming the file."""
    from napari_unet.io.readers import read_image

    image = read_image(path, allow_channels=True)
    if "C" in image.axes:
        raise UsageError(f"{what} {Path(path).name} has {image.data.shape[0]} channels (axes "
                         f"{image.axes}, e.g. an RGB picture); eval compares one-channel label images")
    return image.data


def _run_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_unet.labels.metrics import as_label_image, evaluate, format_scores

    pred = _read_label_file(args.pred, "prediction")
    gt = _read_label_file(args.gt, "ground truth")
    if args.threshold is not None:
        if not np.issubdtype(pred.dtype, np.number) or pred.dtype == np.bool_:
            raise UsageError("--threshold applies to a probability map (float prediction), "
                             f"{Path(args.pred).name} holds {pred.dtype}")
        with np.errstate(invalid="ignore"):
            pred = np.asarray(pred > args.threshold)  # NaN > t is False: background
    pred = as_label_image(pred, f"prediction {Path(args.pred).name}")
    gt = as_label_image(gt, f"ground truth {Path(args.gt).name}")
    if pred.shape != gt.shape:
        raise UsageError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if args.slices is not None:
        if gt.ndim < 3:
            raise UsageError("--slices only applies to stacks")
        bad = [s for s in args.slices if not 0 <= s < gt.shape[0]]
        if bad:
            raise UsageError(f"slices {bad} outside 0..{gt.shape[0] - 1}")
        pred, gt = pred[args.slices], gt[args.slices]
    instances = {"auto": None, "yes": True, "no": False}[args.instances]
    print(format_scores(evaluate(pred, gt, instances=instances, iou_threshold=args.iou_threshold)))
    return 0
