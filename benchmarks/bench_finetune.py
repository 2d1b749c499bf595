"""Human-in-the-loop simulation: segment, correct 3 slices, fine-tune 60 s, segment again.

For each case a shipped model segments data it was not trained on (instances, as the Segment
dock does); the ground truth of 3 slices is pasted, with fresh ids, into that prediction, as a
user paints corrections in the GUI; the model is fine-tuned on exactly those slices
(``Trainer`` with ``slices=``, CPU, default settings: with 3 corrected slices one is held out
for validation and the best-scoring weights are kept) and the stack is segmented again.
On the slices that were NOT corrected, before and after:

* pixel Dice of the model's mask (foreground, or membranes for membrane models) against the
  same mask made from the ground truth (slice by slice for a 2D model);
* object F1 at IoU 0.5 and the object count: a 2D model's objects are made and matched slice
  by slice, a 3D model's objects are matched in 3D with the corrected slices left out of both
  label images.

Cases (data from ../shared/data, which only exists on the project's machines; all held out
from the shipped models' training, see ``train_shipped_models.sh``):

* 2D series: ``em-membranes-2d`` (trained on ISBI EM) on the held-out confocal slab of
  ``cells3d_membrane`` (z 44-63), slice by slice; target = membranes between cells;
* 3D nuclei, held-out slab: ``nuclei-3d`` on ``nuclei3d_1135`` z 70-99 (its voxel size from
  the TIFF), the case of issue 9;
* 3D nuclei, other data set: ``nuclei-3d`` on the synthetic StarDist 3D sample;
* 3D cells: ``cells-3d`` on the held-out slab z 44-63 of ``cells3d_membrane`` (the model is
  weak there, membrane Dice ~0.42: exactly when a user would correct slices and fine-tune);
  instances at threshold 0.2 and minimum size 100, as its model card recommends.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_finetune.py [--seconds 60] [--seed 0] [--cases 2d,nuclei,...]

Each case prints one line; the last line sums up the 2D series and the 3D held-out nuclei:
``dice_2d=B->A f1_2d=B->A dice_3d=B->A f1_3d=B->A seconds=NN``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from napari_unet.engine.predict import probabilities_to_output, segment
from napari_unet.io.readers import read_image
from napari_unet.labels.metrics import dice, match_instances
from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.progress import drain
from napari_unet.training.config import TrainingConfig, TrainingPair
from napari_unet.training.targets import training_targets
from napari_unet.training.trainer import Trainer
from napari_unet.zoo.loading import load_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CASES = ("2d", "nuclei", "synthetic", "cells")


def corrected_slices(n: int, count: int = 3) -> list[int]:
    """``count`` slices spread evenly over the stack (away from its ends)."""
    return sorted({int(round(n * (i + 1) / (count + 1))) for i in range(count)})


def paste(prediction: np.ndarray, truth: np.ndarray, slices: list[int]) -> np.ndarray:
    """``truth`` on ``slices`` pasted into ``prediction`` with fresh ids (above its largest)."""
    out = prediction.astype(np.uint32)
    for z in slices:
        ids, inverse = np.unique(truth[z], return_inverse=True)
        fresh = np.where(ids == 0, 0, np.arange(len(ids)) + int(out.max()) + 1).astype(np.uint32)
        out[z] = fresh[inverse].reshape(truth[z].shape)
    return out


@dataclass
class Scores:
    """Scores on the untouched slices."""

    dice: float
    f1: float
    objects: int
    true_objects: int


def segment_stack(model: SegmentationModel, stack: np.ndarray, voxel_size: tuple[float, ...] | None,
                  threshold: float = 0.5, min_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Instances and the model's binary mask (foreground or membranes); a 2D model's objects
    are made slice by slice (``segment`` would connect them through the stack)."""
    sampling = voxel_size if voxel_size is not None and model.spatial_dims == 3 else None
    probs = drain(segment(stack, model, output="probabilities", device="cpu")).probabilities
    opts = dict(threshold=threshold, min_size=min_size)
    if model.spatial_dims == 2:
        instances = np.stack([probabilities_to_output(probs[:, z], model.task, "instances", **opts)
                              for z in range(stack.shape[0])])
    else:
        instances = probabilities_to_output(probs, model.task, "instances", voxel_size=sampling, **opts)
    mask = probabilities_to_output(probs, model.task, "labels", **opts) > 0
    return np.asarray(instances), mask


def score(model: SegmentationModel, stack: np.ndarray, truth: np.ndarray, others: list[int],
          voxel_size: tuple[float, ...] | None, **options: float) -> tuple[Scores, np.ndarray]:
    """Dice, object F1 and object count of the model on the slices ``others``."""
    instances, mask = segment_stack(model, stack, voxel_size, **options)
    per_slice = model.spatial_dims == 2
    if model.task == "membranes":
        reference = training_targets(truth, "membranes", axes=(1, 2) if per_slice else None)[0] > 0
    else:
        reference = truth > 0
    pixel = dice(mask[others], reference[others])
    if per_slice:  # objects of each slice
        tp = n_pred = n_gt = 0
        for z in others:
            m = match_instances(instances[z], truth[z])
            tp, n_pred, n_gt = tp + m.true_positives, n_pred + m.n_pred, n_gt + m.n_gt
    else:  # objects in 3D, the corrected slices left out of both
        keep = np.zeros(stack.shape[0], bool)
        keep[others] = True
        m = match_instances(np.where(keep[:, None, None], instances, 0), np.where(keep[:, None, None], truth, 0))
        tp, n_pred, n_gt = m.true_positives, m.n_pred, m.n_gt
    f1 = 2 * tp / (n_pred + n_gt) if n_pred + n_gt else 1.0
    return Scores(pixel, f1, n_pred, n_gt), instances


def run_case(title: str, model_name: str, image: np.ndarray, labels: np.ndarray, seconds: float,
             seed: int = 0, voxel_size: tuple[float, ...] | None = None,
             **options: float) -> tuple[Scores, Scores, float]:
    """One segment -> correct -> fine-tune -> segment cycle; prints its line. ``options``:
    ``threshold`` and ``min_size`` of the instances, before and after."""
    model = load_model(model_name)
    slices = corrected_slices(image.shape[0])
    others = [z for z in range(image.shape[0]) if z not in slices]
    before, prediction = score(model, image, labels, others, voxel_size, **options)
    corrected = paste(prediction, labels, slices)
    trainer = Trainer(model, [TrainingPair(image, corrected, slices=slices)],
                      TrainingConfig(time_limit=seconds, seed=seed, device="cpu"))
    start = time.perf_counter()
    tuned = drain(trainer.run())
    took = time.perf_counter() - start
    after, _ = score(tuned, image, labels, others, voxel_size, **options)
    entry = tuned.history[-1]
    if "diverged" in entry["validation"]:
        kept = "the model's own weights (training diverged)"
    elif entry["kept"] == "best":
        kept = f"best weights of iteration {entry['best_iteration']}"
    else:
        kept = "last weights"
    print(f"{title}: model {model_name}, stack {image.shape}, corrected slices {slices} ({entry['validation']}), "
          f"{entry['iterations']} iterations in {took:.0f} s, {kept}; on the other {len(others)} slices: "
          f"dice {before.dice:.3f} -> {after.dice:.3f} ({after.dice - before.dice:+.3f}), "
          f"object F1 {before.f1:.3f} -> {after.f1:.3f} ({after.f1 - before.f1:+.3f}), "
          f"objects {before.objects} -> {after.objects} (true {before.true_objects})", flush=True)
    return before, after, took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed (patch sampling, augmentation)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    data = args.data
    if not data.is_dir():
        print(f"no data at {data}; this benchmark needs ../shared/data", file=sys.stderr)
        return 1
    kw = dict(seed=args.seed)
    results = {}
    if "2d" in cases or "cells" in cases:
        cells_img = tifffile.imread(data / "cells3d_membrane/image.tif")[44:]
        cells_lab = tifffile.imread(data / "cells3d_membrane/labels.tif")[44:]
    if "2d" in cases:
        results["2d"] = run_case("2D series", "em-membranes-2d", cells_img, cells_lab, args.seconds, **kw)
    if "nuclei" in cases:
        loaded = read_image(data / "nuclei3d_1135/image.tif")
        nuc_lab = tifffile.imread(data / "nuclei3d_1135/labels.tif")[70:]
        results["nuclei"] = run_case("3D nuclei (nuclei3d_1135 held-out slab z 70-99)", "nuclei-3d",
                                     loaded.data[70:], nuc_lab, args.seconds, voxel_size=loaded.voxel_size, **kw)
    if "synthetic" in cases:
        sd_img = tifffile.imread(data / "stardist_samples/img3d.tif")
        sd_lab = tifffile.imread(data / "stardist_samples/mask3d.tif")
        results["synthetic"] = run_case("3D nuclei (synthetic, other data set)", "nuclei-3d", sd_img, sd_lab,
                                        args.seconds, **kw)
    if "cells" in cases:
        # threshold and minimum size as its model card recommends for cells
        results["cells"] = run_case("3D cells (cells3d_membrane held-out slab z 44-63, threshold 0.2, min size 100)",
                                    "cells-3d", cells_img, cells_lab, args.seconds, threshold=0.2, min_size=100, **kw)
    parts = []
    for key, name in (("2d", "2d"), ("nuclei", "3d")):
        if key in results:
            b, a, _ = results[key]
            parts += [f"dice_{name}={b.dice:.3f}->{a.dice:.3f}", f"f1_{name}={b.f1:.3f}->{a.f1:.3f}"]
    took = max(r[2] for r in results.values()) if results else 0.0
    print(" ".join(parts + [f"seconds={took:.0f}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
