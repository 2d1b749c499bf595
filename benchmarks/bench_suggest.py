"""Does correcting the suggested slices help fine-tuning more than evenly spaced or random ones?

For each 3D data set with ground truth (held out from the shipped model's training, see
``train_shipped_models.sh``), the shipped model segments the stack and its uncertainty ranks the
slices (:func:`napari_unet.engine.uncertainty.rank_slices`, as the Segment dock and ``napari-unet
suggest`` do). Three ways to pick 3 slices to correct:

* **suggested**: the 3 slices ``rank_slices`` suggests (its default strategy, ``coverage``:
  as much doubt as possible within reach of the corrected slices, the ends last for 3D models;
  ``--strategy`` picks another);
* **even**: 3 evenly spaced slices (as ``bench_finetune.py`` corrects);
* **random**: 3 random slices (a new draw per seed).

For each choice and seed the ground truth of those slices is pasted, with fresh ids, into the
model's own instances (as a user corrects them in the GUI), the model is fine-tuned on exactly
those slices for the same fixed number of iterations (``Trainer`` with ``slices=``; all three
slices trained on, no validation split, so every choice gets the same budget) and the stack is
segmented again. Scores are taken on the same slices for all three choices: those that none of
them corrected in that seed (pixel Dice of the model's mask, foreground or membranes, and object
F1 at IoU 0.5 of the 3D objects, with the excluded slices left out of both label images).

Cases (data from ../shared/data; skipped with a message when missing):

* nuclei-3d on nuclei3d_1135 z 70-99 (voxel size from the TIFF), instances at min size 30;
* cells-3d on cells3d_membrane z 44-63, instances at threshold 0.2 and min size 100 (its card).

Run (about 8 minutes with one torch thread)::

    OMP_NUM_THREADS=1 python benchmarks/bench_suggest.py [--iterations 150] [--seeds 3] [--tta]
        [--strategy coverage|stratified|top]

It prints a table (mean and standard deviation over the seeds) and a last line
``suggested_f1=X even_f1=X random_f1=X suggested_dice=X even_dice=X random_dice=X beats_even=yes|no``
(means over cases and seeds; "beats" = higher mean of F1 + Dice).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from napari_unet.engine.predict import predict_probabilities, probabilities_to_output
from napari_unet.engine.uncertainty import STRATEGIES as RANKINGS
from napari_unet.engine.uncertainty import default_edge, rank_slices, uncertainty_map
from napari_unet.io.readers import read_image
from napari_unet.labels.metrics import dice, match_instances
from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.progress import drain
from napari_unet.training.config import TrainingConfig, TrainingPair
from napari_unet.training.targets import training_targets
from napari_unet.training.trainer import Trainer
from napari_unet.zoo.loading import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_finetune import corrected_slices, paste  # noqa: E402  (the same slices and pasting)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STRATEGIES = ("suggested", "even", "random")


@dataclass
class Case:
    title: str
    model: str
    image: np.ndarray
    truth: np.ndarray
    voxel_size: tuple[float, ...] | None
    threshold: float
    min_size: int




def predict(model: SegmentationModel, case: Case, tta: bool = False,
            spread: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, instances, mask) of ``model`` on the case's stack."""
    probs = drain(predict_probabilities(case.image, model, device="cpu", tta=tta, tta_spread=spread,
                                        dtype=np.float32))
    sampling = case.voxel_size if model.spatial_dims == 3 else None
    instances = probabilities_to_output(probs, model.task, "instances", threshold=case.threshold,
                                        min_size=case.min_size, voxel_size=sampling)
    mask = probabilities_to_output(probs, model.task, "labels", threshold=case.threshold,
                                   min_size=case.min_size) > 0
    return probs, np.asarray(instances), mask


def scores(instances: np.ndarray, mask: np.ndarray, case: Case, reference: np.ndarray,
           keep: list[int]) -> tuple[float, float]:
    """(Dice, object F1) on the slices ``keep``."""
    on = np.zeros(case.image.shape[0], bool)
    on[keep] = True
    m = match_instances(np.where(on[:, None, None], instances, 0),
                        np.where(on[:, None, None], case.truth, 0))
    return dice(mask[keep], reference[keep]), m.f1


def run_case(case: Case, iterations: int, seeds: int, tta: bool,
             ranking: str = RANKINGS[0]) -> dict[str, list[tuple[float, float]]]:
    model = load_model(case.model)
    n = case.image.shape[0]
    reference = (training_targets(case.truth, "membranes")[0] > 0 if model.task == "membranes"
                 else case.truth > 0)
    spread = np.zeros(case.image.shape, np.float32) if tta else None
    probs, instances, mask = predict(model, case, tta=tta, spread=spread)
    uncertainty = uncertainty_map(probs, model.task, spread)
    edge = default_edge(n, 3) if model.spatial_dims == 3 else 0  # as suggest() and the dock do
    picks = {name: rank_slices(uncertainty, probs, 3, task=model.task, threshold=case.threshold,
                               edge=edge, strategy=name) for name in RANKINGS}
    ranked = picks[ranking]
    chosen_suggested = sorted(z for z, _ in ranked)
    chosen_even = corrected_slices(n)  # evenly spaced, as in bench_finetune
    others = ", ".join(f"{name} {sorted(z for z, _ in picks[name])}" for name in RANKINGS if name != ranking)
    print(f"\n{case.title}: model {case.model}, stack {case.image.shape}; suggested slices "
          f"({ranking}) {chosen_suggested} (scores {', '.join(f'{s:.4f}' for _, s in ranked)}), "
          f"even {chosen_even} (other rankings, not run: {others}); "
          f"{iterations} iterations per fine-tune", flush=True)
    results: dict[str, list[tuple[float, float]]] = {s: [] for s in ("before", *STRATEGIES)}
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        chosen = {"suggested": chosen_suggested, "even": chosen_even,
                  "random": sorted(int(z) for z in rng.choice(n, 3, replace=False))}
        used = set().union(*chosen.values())
        keep = [z for z in range(n) if z not in used]
        results["before"].append(scores(instances, mask, case, reference, keep))
        for strategy in STRATEGIES:
            slices = chosen[strategy]
            trainer = Trainer(model, [TrainingPair(case.image, paste(instances, case.truth, slices),
                                                   slices=slices)],
                              TrainingConfig(iterations=iterations, seed=seed, device="cpu",
                                             validation_fraction=0.0))
            start = time.perf_counter()
            tuned = drain(trainer.run())
            took = time.perf_counter() - start
            _, tuned_instances, tuned_mask = predict(tuned, case)
            dice_value, f1_value = scores(tuned_instances, tuned_mask, case, reference, keep)
            results[strategy].append((dice_value, f1_value))
            print(f"  seed {seed} {strategy:9s} slices {slices}: dice {dice_value:.3f} f1 {f1_value:.3f} "
                  f"({took:.0f} s; scored on {len(keep)} slices)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--iterations", type=int, default=150, help="fine-tuning iterations per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tta", action="store_true", help="rank with test-time augmentation")
    parser.add_argument("--strategy", choices=RANKINGS, default=RANKINGS[0],
                        help=f"how rank_slices picks the suggested slices (default {RANKINGS[0]})")
    parser.add_argument("--cases", default="nuclei,cells", help="comma-separated subset of nuclei,cells")
    args = parser.parse_args(argv)
    data = args.data
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    folders = {"nuclei": "nuclei3d_1135", "cells": "cells3d_membrane"}
    missing = [folders[c] for c in wanted if not (data / folders[c]).is_dir()]
    if missing:
        print(f"skipped: no {', '.join(missing)} under {data} (this benchmark needs ../shared/data)")
        return 0
    cases = []
    if "nuclei" in wanted:
        loaded = read_image(data / "nuclei3d_1135/image.tif")
        cases.append(Case("3D nuclei (nuclei3d_1135 z 70-99)", "nuclei-3d", np.asarray(loaded.data)[70:],
                          tifffile.imread(data / "nuclei3d_1135/labels.tif")[70:], loaded.voxel_size,
                          threshold=0.5, min_size=30))
    if "cells" in wanted:
        cases.append(Case("3D cells (cells3d_membrane z 44-63)", "cells-3d",
                          tifffile.imread(data / "cells3d_membrane/image.tif")[44:],
                          tifffile.imread(data / "cells3d_membrane/labels.tif")[44:], None,
                          threshold=0.2, min_size=100))
    start = time.perf_counter()
    table = {case.model: run_case(case, args.iterations, args.seeds, args.tta, args.strategy)
             for case in cases}
    print("\n| case | slices | Dice (mean ± sd) | object F1 (mean ± sd) |\n|---|---|---|---|")
    for name, results in table.items():
        for strategy, values in results.items():
            d = np.array([v[0] for v in values])
            f = np.array([v[1] for v in values])
            label = "none (shipped model)" if strategy == "before" else strategy
            print(f"| {name} | {label} | {d.mean():.3f} ± {d.std():.3f} | {f.mean():.3f} ± {f.std():.3f} |")
    means = {}
    for strategy in STRATEGIES:
        values = [v for results in table.values() for v in results[strategy]]
        means[strategy] = (float(np.mean([v[0] for v in values])), float(np.mean([v[1] for v in values])))
    beats = sum(means["suggested"]) > sum(means["even"])
    print(f"total {time.perf_counter() - start:.0f} s")
    print(" ".join(f"{s}_f1={means[s][1]:.3f}" for s in STRATEGIES) + " "
          + " ".join(f"{s}_dice={means[s][0]:.3f}" for s in STRATEGIES)
          + f" beats_even={'yes' if beats else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
