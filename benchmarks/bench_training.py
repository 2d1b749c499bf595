"""Training throughput: fine-tunes of the shipped models, exact fp32 against ``auto`` precision.

Cases (sample data shipped in ``sample_data/``, as the Fine-tune dock runs them: default
settings, validation held out where the annotations allow, a live preview every 3 s):

* 2D: ``nuclei-2d`` on ``nuclei_2d.tif`` with its labels (the whole image annotated);
* 3D: ``nuclei-3d`` on ``nuclei_3d.tif`` with 3 corrected slices of ``nuclei_3d_labels.tif``
  (one held out for validation).

Each case trains for ``--seconds`` with ``precision="fp32"`` (exact; channels-last where the
policy finds it faster) and with ``"auto"`` (bf16 on CPUs with native bf16), in this one
process, and prints iterations per ``--seconds`` and where the time went (``Trainer.timings``):
patch sampling and augmentation, forward/backward (with the optimizer step), validation, live
preview, batch-norm recalibration. ``data_fraction`` is the share of a run outside
forward/backward, the largest over the ``auto`` runs. ``--rounds N`` repeats the pair N times,
the order swapped every other round (fp32, auto, auto, fp32, ...), and sums the iterations;
``--contiguous`` adds an fp32 run with contiguous tensors (the layout before channels-last),
printed for reference only.

Run::

    python benchmarks/bench_training.py [--seconds 60] [--threads N] [--cases 2d,3d] [--rounds 1]

Last line: ``train_speedup_2d=X.XX train_speedup_3d=X.XX data_fraction=X.XX``
(auto iterations / fp32 iterations in the same time). Timings on a shared machine are noisy:
compare the figures of one run, not of two.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import tifffile
import torch

from napari_unet.progress import drain
from napari_unet.training.config import TrainingConfig, TrainingPair
from napari_unet.training.trainer import Trainer
from napari_unet.zoo.loading import load_model

SAMPLES = Path(__file__).resolve().parents[1] / "sample_data"
PRECISIONS = ("fp32", "auto")
STAGES = ("sample", "step", "validation", "preview", "recalibration")


def case_data(case: str) -> tuple[str, list[TrainingPair], np.ndarray]:
    """Model name, training pairs and the preview input (what the dock shows) of a case."""
    if case == "2d":
        image = tifffile.imread(SAMPLES / "nuclei_2d.tif")
        labels = tifffile.imread(SAMPLES / "nuclei_2d_labels.tif")
        return "nuclei-2d", [TrainingPair(image, labels)], image
    if case == "3d":
        image = tifffile.imread(SAMPLES / "nuclei_3d.tif")
        labels = tifffile.imread(SAMPLES / "nuclei_3d_labels.tif")
        slices = [25, 50, 75]
        # the dock's preview of a 3D model: a slab of 8 slices around the slice on screen
        return "nuclei-3d", [TrainingPair(image, labels, slices=slices)], image[46:54]
    raise SystemExit(f"unknown case {case!r}; choose 2d or 3d")


def run_case(case: str, precision: str, seconds: float, seed: int,
             contiguous: bool = False) -> dict[str, float]:
    """One fine-tune; iterations scaled to ``seconds`` and the seconds per stage."""
    name, pairs, preview = case_data(case)
    config = TrainingConfig(time_limit=seconds, device="cpu", precision=precision, seed=seed,
                            preview_image=preview, preview_interval=3.0)
    trainer = Trainer(load_model(name), pairs, config)
    if contiguous:
        trainer.policy = dataclasses.replace(trainer.policy, channels_last=False)
    stats = []
    drain(trainer.run(), stats.append)
    last = stats[-1]
    timings = dict(trainer.timings)
    timings["iterations"] = last.iteration * seconds / max(last.elapsed, 1e-9)
    timings["outside"] = 1.0 - timings["step"] / max(timings["total"], 1e-9)
    shares = " ".join(f"{k}={timings[k] / timings['total']:.0%}" for k in STAGES)
    how = trainer.start_message.split("; ")[-1]  # e.g. "training in fp32, channels-last"
    print(f"{case} {name} {how}: {timings['iterations']:.0f} it / "
          f"{seconds:.0f} s (batch {trainer.batch_size} x {'x'.join(map(str, trainer.patch_shape))}), "
          f"{timings['total']:.1f} s in all: {shares}, outside forward/backward {timings['outside']:.0%}",
          flush=True)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training time per run (default 60)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--cases", default="2d,3d", help="comma separated: 2d, 3d")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each precision (default 1)")
    parser.add_argument("--contiguous", action="store_true",
                        help="also run fp32 with contiguous tensors (for reference)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.seconds:.0f} s per run",
          flush=True)
    speedups: dict[str, float] = {}
    outside: list[float] = []
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        iterations = dict.fromkeys(PRECISIONS, 0.0)
        for round_ in range(max(1, args.rounds)):
            for precision in PRECISIONS if round_ % 2 == 0 else PRECISIONS[::-1]:
                timings = run_case(case, precision, args.seconds, args.seed)
                iterations[precision] += timings["iterations"]
                if precision == "auto":
                    outside.append(timings["outside"])
        if args.contiguous:
            run_case(case, "fp32", args.seconds, args.seed, contiguous=True)
        speedups[case] = iterations["auto"] / max(iterations["fp32"], 1e-9)
    print(" ".join([f"train_speedup_{case}={speedups[case]:.2f}" for case in speedups]
                   + [f"data_fraction={max(outside):.2f}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
