"""Test-time augmentation: its gain and its cost for the shipped models, on held-out data.

Each shipped model segments the held-out split of its data set (the splits of
``benchmarks/train_shipped_models.sh``, never trained on) without and with TTA (8 flips and
quarter turns, probabilities averaged), with the post-processing of the model (its tuned values
when it has them, else the settings of its model card):

* em-membranes-2d: ISBI 2012 EM slices 24-29, pixel Dice of the membranes;
* nuclei-2d: BBBC039, the first ``--fields`` (default 5) of the last 20 fields by sorted name,
  object F1 at IoU 0.5 (objects pooled over fields);
* nuclei-3d: nuclei3d_1135 z 70-99 (voxel size from the TIFF), object F1 in 3D;
* cells-3d: cells3d_membrane z 44-63, object F1 in 3D (and membrane Dice).

Cost = prediction time with TTA / without (post-processing not counted). Data come from
../shared/data; without it the benchmark says so and stops. Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_tta.py [--fields 5] [--precision auto]

Last line: ``tta_gain_em_dice=+0.004 tta_gain_nuclei2d_f1=... tta_gain_nuclei3d_f1=...
tta_gain_cells3d_f1=... tta_cost=7.9x``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

from napari_unet.engine.predict import predict_probabilities, probabilities_to_output
from napari_unet.io.readers import read_image
from napari_unet.labels.metrics import dice, match_instances
from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.progress import drain
from napari_unet.training.targets import training_targets
from napari_unet.zoo.loading import load_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: post-processing of the model cards (``train_shipped_models.sh eval``), for models that store
#: no tuned values of their own
CARD_SETTINGS = {"em-membranes-2d": {}, "nuclei-2d": {"min_size": 30}, "nuclei-3d": {"min_size": 30},
                 "cells-3d": {"min_size": 100, "threshold": 0.2}}


def settings(model: SegmentationModel, name: str) -> dict[str, float | None]:
    """threshold, min_size, seed_threshold: the model's tuned values, else its card's."""
    card = CARD_SETTINGS.get(name, {})
    tuned = getattr(model, "postprocess", None) or {}
    return {"threshold": tuned.get("threshold", card.get("threshold", 0.5)),
            "min_size": tuned.get("min_size", card.get("min_size", 16)),
            "seed_threshold": tuned.get("seed_threshold")}


def predict(image: np.ndarray, model: SegmentationModel, tta: bool, precision: str) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    probs = drain(predict_probabilities(image, model, device="cpu", precision=precision, tta=tta,
                                        dtype=np.float32))
    return probs, time.perf_counter() - start


def to_output(probs: np.ndarray, model: SegmentationModel, output: str, options: dict,
              voxel_size=None) -> np.ndarray:
    extra = {"seed_threshold": options["seed_threshold"]} if options["seed_threshold"] is not None else {}
    try:
        return probabilities_to_output(probs, model.task, output, threshold=options["threshold"],
                                       min_size=options["min_size"], voxel_size=voxel_size, **extra)
    except TypeError:  # an engine without seed_threshold
        return probabilities_to_output(probs, model.task, output, threshold=options["threshold"],
                                       min_size=options["min_size"], voxel_size=voxel_size)


def f1(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    tp = n_pred = n_gt = 0
    for pred, truth in pairs:
        m = match_instances(pred, truth)
        tp, n_pred, n_gt = tp + m.true_positives, n_pred + m.n_pred, n_gt + m.n_gt
    return 2 * tp / (n_pred + n_gt) if n_pred + n_gt else 1.0


def run_case(name: str, images: list[np.ndarray], masks: list[np.ndarray] | None = None,
             objects: list[np.ndarray] | None = None, precision: str = "auto",
             voxel_size=None) -> dict[str, float]:
    """Score and time one model without and with TTA: pixel Dice against ``masks`` and/or
    object F1 against the instance labels ``objects``."""
    model = load_model(name)
    options = settings(model, name)
    row: dict[str, float] = {}
    for tta in (False, True):
        key = "tta" if tta else "plain"
        seconds, masked, pairs = 0.0, [], []
        for index, image in enumerate(images):
            probs, took = predict(image, model, tta, precision)
            seconds += took
            if masks is not None:
                masked.append((to_output(probs, model, "labels", options) > 0, masks[index] > 0))
            if objects is not None:
                sampling = voxel_size if model.spatial_dims == 3 else None
                pairs.append((to_output(probs, model, "instances", options, sampling), objects[index]))
        if masks is not None:
            row[f"{key}_dice"] = dice(np.concatenate([p.ravel() for p, _ in masked]),
                                      np.concatenate([g.ravel() for _, g in masked]))
        if objects is not None:
            row[f"{key}_f1"] = f1(pairs)
        row[f"{key}_seconds"] = seconds
    for metric in ("dice", "f1"):
        if f"plain_{metric}" in row:
            before, after = row[f"plain_{metric}"], row[f"tta_{metric}"]
            label = "pixel Dice" if metric == "dice" else "object F1"
            print(f"{name:16s} {label:10s} plain {before:.4f} ({row['plain_seconds']:5.1f} s)   "
                  f"TTA {after:.4f} ({row['tta_seconds']:5.1f} s)   gain {after - before:+.4f}   "
                  f"cost {row['tta_seconds'] / row['plain_seconds']:.1f}x   "
                  f"[threshold {options['threshold']}, min size {options['min_size']}]", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--fields", type=int, default=5, help="BBBC039 held-out fields to use (of 20)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args(argv)
    data = args.data
    needed = ["isbi2012_em", "bbbc039_nuclei", "nuclei3d_1135", "cells3d_membrane"]
    missing = [d for d in needed if not (data / d).is_dir()]
    if missing:
        print(f"skipped: no {', '.join(missing)} under {data} (this benchmark needs ../shared/data)")
        return 0
    rows = {}
    em = tifffile.imread(data / "isbi2012_em/image.tif")[24:]
    em_truth = tifffile.imread(data / "isbi2012_em/membranes.tif")[24:]
    rows["em"] = run_case("em-membranes-2d", list(em), masks=list(em_truth), precision=args.precision)
    files = sorted((data / "bbbc039_nuclei/images").glob("*.tif"))[80:][:args.fields]
    rows["nuclei2d"] = run_case(
        "nuclei-2d", [tifffile.imread(f) for f in files],
        objects=[tifffile.imread(data / "bbbc039_nuclei/labels" / f.name) for f in files],
        precision=args.precision)
    loaded = read_image(data / "nuclei3d_1135/image.tif")
    rows["nuclei3d"] = run_case("nuclei-3d", [np.asarray(loaded.data)[70:]],
                                objects=[tifffile.imread(data / "nuclei3d_1135/labels.tif")[70:]],
                                precision=args.precision, voxel_size=loaded.voxel_size)
    cells = tifffile.imread(data / "cells3d_membrane/image.tif")[44:]
    cells_truth = tifffile.imread(data / "cells3d_membrane/labels.tif")[44:]
    rows["cells3d"] = run_case("cells-3d", [cells], masks=[training_targets(cells_truth, "membranes")[0]],
                               objects=[cells_truth], precision=args.precision)
    plain = sum(r["plain_seconds"] for r in rows.values())
    augmented = sum(r["tta_seconds"] for r in rows.values())

    def gain(key: str, metric: str) -> str:
        return f"{rows[key][f'tta_{metric}'] - rows[key][f'plain_{metric}']:+.4f}"

    print(f"tta_gain_em_dice={gain('em', 'dice')} tta_gain_nuclei2d_f1={gain('nuclei2d', 'f1')} "
          f"tta_gain_nuclei3d_f1={gain('nuclei3d', 'f1')} tta_gain_cells3d_f1={gain('cells3d', 'f1')} "
          f"tta_gain_cells3d_dice={gain('cells3d', 'dice')} tta_cost={augmented / plain:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
