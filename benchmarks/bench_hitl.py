"""The human-in-the-loop cycle for every shipped model: segment, correct, fine-tune, segment.

For each shipped model, on held-out data of its kind that it was never trained or tuned on
(splits of ``train_shipped_models.sh``), as a new user meets it:

1. segment the stack with the model's own settings (its stored post-processing; a 2D model
   makes its objects slice by slice), as the Segment dock does;
2. paste the ground truth of a few slices, with fresh ids, into that prediction, as a user's
   corrections land in the labels layer;
3. fine-tune for 60 s at the default settings (``Trainer`` with ``slices=`` as the Fine-tune
   dock and ``train --slices`` run it: default threads, bf16 on this CPU);
4. segment again with the result.

Scored on the slices nobody corrected, before and after: pixel Dice of the mask (foreground,
or membranes for membrane models), object F1 at IoU 0.5 (3D models: objects matched in 3D with
the corrected slices left out of both; 2D models: slice by slice) and the object count against
the true one. Each model runs 3 slice choices x 3 seeds.

Cases (../shared/data, held out from the shipped models' training):

* ``nuclei-2d``: BBBC039 test fields 80-99 (by sorted name) as a series of 20 images;
* ``em``: ``em-membranes-2d`` on the ISBI EM test slices 24-29 (2 corrected slices);
* ``nuclei-3d``: ``nuclei3d_1135`` z 70-99 with its voxel size;
* ``cells-3d``: ``cells3d_membrane`` z 44-63.

Extra rows: ``--interfaces cli,dock`` runs the first slice choice of the first model through
``napari-unet train`` (a subprocess) and through the real Fine-tune dock (Xvfb: ``xvfb-run -a``),
with napari redrawing beside it and the live preview on; both must agree with the core rows.

Run::

    python benchmarks/bench_hitl.py [--seconds 60] [--models nuclei-2d,em,nuclei-3d,cells-3d]
                                    [--choices 3] [--seeds 3] [--json results.jsonl]

The last line is ``worst_dice_delta=... worst_f1_delta=... mean_f1_gain_below_0.9=... runs=N``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile

from napari_unet.engine.predict import postprocess_settings, probabilities_to_output, segment
from napari_unet.io.readers import read_image
from napari_unet.labels.metrics import dice, match_instances
from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.progress import drain
from napari_unet.training.config import TrainingConfig, TrainingPair
from napari_unet.training.targets import training_targets
from napari_unet.training.trainer import Trainer
from napari_unet.zoo.loading import load_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODELS = {"nuclei-2d": "nuclei-2d", "em": "em-membranes-2d", "nuclei-3d": "nuclei-3d", "cells-3d": "cells-3d"}


@dataclass
class Case:
    """A held-out stack of one model's kind."""

    key: str
    model: str
    image: np.ndarray
    truth: np.ndarray
    voxel_size: tuple[float, ...] | None
    corrected: int  # slices a user corrects


def load_case(key: str, data: Path) -> Case:
    """The held-out data of ``key`` (see the module docstring)."""
    if key == "nuclei-2d":
        names = sorted((data / "bbbc039_nuclei/images").glob("*.tif"))[80:100]
        image = np.stack([tifffile.imread(f) for f in names])
        truth = np.stack([tifffile.imread(data / "bbbc039_nuclei/labels" / f.name) for f in names])
        return Case(key, MODELS[key], image, truth, None, 3)
    if key == "em":
        image = tifffile.imread(data / "isbi2012_em/image.tif")[24:]
        membranes = tifffile.imread(data / "isbi2012_em/membranes.tif")[24:]
        return Case(key, MODELS[key], image, membranes.astype(np.uint16), None, 2)
    if key == "nuclei-3d":
        loaded = read_image(data / "nuclei3d_1135/image.tif")
        truth = tifffile.imread(data / "nuclei3d_1135/labels.tif")[70:]
        return Case(key, MODELS[key], np.asarray(loaded.data)[70:], truth, tuple(loaded.voxel_size), 3)
    if key == "cells-3d":
        image = tifffile.imread(data / "cells3d_membrane/image.tif")[44:]
        truth = tifffile.imread(data / "cells3d_membrane/labels.tif")[44:]
        return Case(key, MODELS[key], image, truth, None, 3)
    raise ValueError(f"unknown case {key!r}")


def slice_choices(depth: int, count: int, choices: int) -> list[list[int]]:
    """``choices`` sets of ``count`` slices: evenly spread first, then random ones (fixed
    seeds) at least 2 apart and away from the stack's ends."""
    sets = [sorted({int(round(depth * (i + 1) / (count + 1))) for i in range(count)})]
    rng = np.random.default_rng(1234)
    while len(sets) < choices:
        pick = sorted(rng.choice(np.arange(1, depth - 1), count, replace=False).tolist())
        if min(np.diff(pick), default=99) >= 2 and pick not in sets:
            sets.append([int(z) for z in pick])
    return sets


def _plane(slice_: int | tuple[int, int]) -> tuple[int, int]:
    """``(axis, index)`` of a corrected slice (a plain int is a z slice)."""
    return (0, int(slice_)) if isinstance(slice_, (int, np.integer)) else (int(slice_[0]), int(slice_[1]))


def paste(prediction: np.ndarray, truth: np.ndarray, slices: list) -> np.ndarray:
    """``truth`` on ``slices`` (z indices or ``(axis, index)`` planes) pasted into
    ``prediction`` with fresh ids (above its largest), as painted corrections land in the
    labels layer."""
    out = prediction.astype(np.uint32)
    for axis, k in map(_plane, slices):
        where = (slice(None),) * axis + (k,)
        ids, inverse = np.unique(truth[where], return_inverse=True)
        fresh = np.where(ids == 0, 0, np.arange(len(ids)) + int(out.max()) + 1).astype(np.uint32)
        out[where] = fresh[inverse].reshape(truth[where].shape)
    return out


def scored_voxels(shape: tuple[int, ...], slices: list) -> np.ndarray:
    """The voxels nobody corrected: all but the corrected planes."""
    keep = np.ones(shape, bool)
    for axis, k in map(_plane, slices):
        keep[(slice(None),) * axis + (k,)] = False
    return keep


def corrected_labels(case: Case, instances: np.ndarray, mask: np.ndarray, slices: list[int]) -> np.ndarray:
    """The labels layer after the user's corrections: the truth pasted on ``slices`` into the
    model's output (instances; for EM membranes, the membrane mask)."""
    if case.key == "em":
        corrected = np.isin(np.arange(case.image.shape[0]), slices)[:, None, None]
        return np.where(corrected, case.truth, mask).astype(np.uint16)
    return paste(instances, case.truth, slices)


def segment_like_the_dock(model: SegmentationModel, case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Instances as the Segment dock makes them (``segment``: the model's stored
    post-processing; a 2D model's objects slice by slice, stitched through z) and the binary
    mask at the model's threshold."""
    result = drain(segment(case.image, model, output="instances", voxel_size=case.voxel_size, device="cpu"))
    threshold = postprocess_settings(model)[0]
    mask = probabilities_to_output(result.probabilities, model.task, "labels", threshold=threshold,
                                   min_size=0) > 0
    return np.asarray(result.data), mask


@dataclass
class Scores:
    dice: float
    f1: float
    objects: int
    true_objects: int


def score(model: SegmentationModel, case: Case, instances: np.ndarray, mask: np.ndarray,
          slices: list) -> Scores:
    """Dice, object F1 and object count on the voxels outside the corrected ``slices``."""
    others = [z for z in range(case.image.shape[0]) if z not in slices]
    keep = scored_voxels(case.image.shape, slices)
    per_slice = model.spatial_dims == 2
    truth = case.truth
    if model.task == "membranes" and case.key == "em":
        reference = truth > 0  # the EM truth is a membrane mask already
    elif model.task == "membranes":
        reference = training_targets(truth, "membranes", axes=(1, 2) if per_slice else None)[0] > 0
    else:
        reference = truth > 0
    pixel = dice(mask[keep], reference[keep])
    if case.key == "em":  # membranes only: no objects to count
        return Scores(pixel, float("nan"), 0, 0)
    if per_slice:
        tp = n_pred = n_gt = 0
        for z in others:
            m = match_instances(instances[z], truth[z])
            tp, n_pred, n_gt = tp + m.true_positives, n_pred + m.n_pred, n_gt + m.n_gt
    else:
        m = match_instances(np.where(keep, instances, 0), np.where(keep, truth, 0))
        tp, n_pred, n_gt = m.true_positives, m.n_pred, m.n_gt
    f1 = 2 * tp / (n_pred + n_gt) if n_pred + n_gt else 1.0
    return Scores(pixel, f1, n_pred, n_gt)


def fine_tune(model: SegmentationModel, case: Case, corrected: np.ndarray, slices: list, seconds: float,
              seed: int) -> tuple[SegmentationModel, Trainer, float]:
    """60 s of the default fine-tuning on the corrected slices."""
    trainer = Trainer(model, [TrainingPair(case.image, corrected, slices=slices)],
                      TrainingConfig(time_limit=seconds, seed=seed, device="cpu"))
    start = time.perf_counter()
    tuned = drain(trainer.run())
    return tuned, trainer, time.perf_counter() - start


#: cells-3d corrected in mixed planes (one z, one y, one x slice each; y and x well inside)
MIXED_PLANES = ([10, (1, 66), (2, 133)], [5, (1, 100), (2, 50)], [15, (1, 150), (2, 90)])


def run_model(case: Case, seconds: float, choices: int, seeds: int, rows: list[dict],
              planes: bool = False) -> None:
    """Every slice choice x seed of one case (``planes``: the mixed-plane choices of
    :data:`MIXED_PLANES` instead); appends a row per run and prints it."""
    model = load_model(case.model)
    instances, mask = segment_like_the_dock(model, case)
    depth = case.image.shape[0]
    sets = [list(p) for p in MIXED_PLANES[:choices]] if planes else slice_choices(depth, case.corrected, choices)
    for slices in sets:
        before = score(model, case, instances, mask, slices)
        corrected = corrected_labels(case, instances, mask, slices)
        for seed in range(seeds):
            tuned, trainer, took = fine_tune(model, case, corrected, slices, seconds, seed)
            after = score(tuned, case, *segment_like_the_dock(tuned, case), slices)
            entry = tuned.history[-1]
            name = f"{case.model} (z, y, x planes)" if planes else case.model
            row = dict(model=name, case=case.key, slices=[s if isinstance(s, int) else list(s) for s in slices],
                       seed=seed,
                       before=asdict(before), after=asdict(after), iterations=entry["iterations"],
                       seconds=round(took, 1), rate=round(entry["iterations"] / max(took, 1e-9), 2),
                       kept=entry["kept"], decision=entry.get("decision", ""),
                       threads=entry.get("threads", ""), postprocessing=entry.get("postprocessing", ""))
            rows.append(row)
            print(format_row(row), flush=True)


def cli_row(case: Case, slices: list[int], seconds: float, workdir: Path) -> dict:
    """The same loop through ``napari-unet train`` (a subprocess, as a user types it)."""
    import re
    import subprocess

    model = load_model(case.model)
    instances, mask = segment_like_the_dock(model, case)
    before = score(model, case, instances, mask, slices)
    image_path, labels_path, out = workdir / "image.tif", workdir / "corrected.tif", workdir / "tuned.pt"
    tifffile.imwrite(image_path, case.image)
    tifffile.imwrite(labels_path, corrected_labels(case, instances, mask, slices))
    command = ["napari-unet", "train", "--image", str(image_path), "--labels", str(labels_path),
               "--slices", ",".join(map(str, slices)), "--from", case.model, "--time-limit", str(seconds),
               "-o", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    took = time.perf_counter() - start
    tuned = load_model(out)
    after = score(tuned, case, *segment_like_the_dock(tuned, case), slices)
    entry = tuned.history[-1]
    kept_line = next((line for line in done.stdout.splitlines() if line.startswith("kept ")), "")
    return dict(model=f"{case.model} (CLI)", case=case.key, slices=slices, seed=0, before=asdict(before),
                after=asdict(after), iterations=entry["iterations"], seconds=round(took, 1),
                rate=round(entry["iterations"] / max(entry["seconds"], 1e-9), 2), kept=entry["kept"],
                decision=re.sub(r"^kept ", "", kept_line), threads=entry.get("threads", ""),
                postprocessing=entry.get("postprocessing", ""))


def dock_row(case: Case, slices: list[int], seconds: float) -> dict:
    """The same loop through the real Fine-tune dock in napari (needs a display: Xvfb), with
    napari's own thread busy: the canvas is redrawn every 30 ms while the dock trains, and the
    dock's live preview is on."""
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_unet._widgets._finetune import FineTuneWidget
    from napari_unet._widgets._segment import SegmentWidget
    from napari_unet._widgets._state import get_registry, set_corrected_slices

    model = load_model(case.model)
    instances, mask = segment_like_the_dock(model, case)
    before = score(model, case, instances, mask, slices)
    viewer = napari.Viewer(show=True)
    scale = case.voxel_size or (1.0,) * case.image.ndim
    viewer.add_image(case.image, name="stack", scale=scale)
    layer = viewer.add_labels(corrected_labels(case, instances, mask, slices), name="stack labels", scale=scale)
    set_corrected_slices(layer, slices)
    segment, widget = SegmentWidget(viewer), FineTuneWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment")
    viewer.window.add_dock_widget(widget, name="Fine-tune")
    registry = get_registry()
    registry.current = case.model
    index = widget.model_combo.findData(case.model)
    widget.model_combo.setCurrentIndex(index)
    widget.time_spin.setValue(int(seconds))
    widget.preview_check.setChecked(True)
    zoom = [0]

    def redraw() -> None:  # napari in use: the canvas draws beside the training
        zoom[0] += 1
        viewer.camera.zoom *= 1.001 if zoom[0] % 2 else 1 / 1.001

    timer = QTimer()
    timer.timeout.connect(redraw)
    timer.start(30)
    start = time.perf_counter()
    widget.finetune_button.click()
    app = QApplication.instance()
    while widget.worker is not None or widget.result_key is None:
        app.processEvents()
        time.sleep(0.005)
        if time.perf_counter() - start > 10 * seconds + 120:
            raise TimeoutError("the Fine-tune dock did not finish")
    took = time.perf_counter() - start
    timer.stop()
    tuned = registry.get(widget.result_key)
    status = widget.status.text()
    viewer.close()
    after = score(tuned, case, *segment_like_the_dock(tuned, case), slices)
    entry = tuned.history[-1]
    return dict(model=f"{case.model} (dock)", case=case.key, slices=slices, seed=0, before=asdict(before),
                after=asdict(after), iterations=entry["iterations"], seconds=round(took, 1),
                rate=round(entry["iterations"] / max(entry["seconds"], 1e-9), 2), kept=entry["kept"],
                decision=status, threads=entry.get("threads", ""), postprocessing=entry.get("postprocessing", ""))


def format_row(row: dict) -> str:
    b, a = row["before"], row["after"]
    f1 = "" if np.isnan(b["f1"]) else (f" F1 {b['f1']:.3f}->{a['f1']:.3f} objects {b['objects']}->{a['objects']}"
                                       f" (true {b['true_objects']})")
    return (f"{row['model']} slices {row['slices']} seed {row['seed']}: Dice {b['dice']:.3f}->{a['dice']:.3f}{f1}; "
            f"{row['iterations']} it in {row['seconds']} s ({row['rate']} it/s, {row['threads']}); kept {row['kept']}")


def summary(rows: list[dict]) -> tuple[list[str], dict]:
    """A markdown table per model (before, after: mean and worst), and the overall figures."""
    lines = ["| model | runs | Dice before | Dice after (mean / min change) | object F1 before | "
             "F1 after (mean / min change) | objects before → after (true) | kept start / fine-tuned | it/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    worst_dice = worst_f1 = float("inf")
    gains = []
    count_worse = 0
    for name in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == name]
        db = np.array([r["before"]["dice"] for r in group])
        da = np.array([r["after"]["dice"] for r in group])
        fb = np.array([r["before"]["f1"] for r in group])
        fa = np.array([r["after"]["f1"] for r in group])
        worst_dice = min(worst_dice, float((da - db).min()))
        has_f1 = not np.isnan(fb).any()
        f1_text = ("n/a", "n/a", "n/a")
        if has_f1:
            worst_f1 = min(worst_f1, float((fa - fb).min()))
            if fb.mean() < 0.9:
                gains.append(float((fa - fb).mean()))
            f1_text = (f"{fb.mean():.3f}", f"{fa.mean():.3f} / {float((fa - fb).min()):+.3f}",
                       f"{np.mean([r['before']['objects'] for r in group]):.0f} → "
                       f"{np.mean([r['after']['objects'] for r in group]):.0f} ({group[0]['before']['true_objects']})")
            for r in group:
                truth = r["before"]["true_objects"]
                if abs(r["after"]["objects"] - truth) > abs(r["before"]["objects"] - truth):
                    count_worse += 1
        kept = sum(r["kept"] == "start" for r in group)
        lines.append(f"| {name} | {len(group)} | {db.mean():.3f} | {da.mean():.3f} / {float((da - db).min()):+.3f} | "
                     f"{f1_text[0]} | {f1_text[1]} | {f1_text[2]} | {kept} / {len(group) - kept} | "
                     f"{np.mean([r['rate'] for r in group]):.1f} |")
    figures = dict(worst_dice_delta=worst_dice, worst_f1_delta=worst_f1 if np.isfinite(worst_f1) else float("nan"),
                   mean_f1_gain_below_0_9=min(gains) if gains else float("nan"),
                   runs_with_count_further=count_worse, runs=len(rows))
    return lines, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    parser.add_argument("--choices", type=int, default=3, help="slice choices per model")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per slice choice")
    parser.add_argument("--json", type=Path, default=None, help="append each run as a JSON line")
    parser.add_argument("--planes", action="store_true", help="also cells-3d corrected in mixed planes")
    parser.add_argument("--interfaces", default="", help="cli,dock: the first slice choice of the first "
                        "model also through `napari-unet train` and the Fine-tune dock (Xvfb)")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"no data at {args.data}; this benchmark needs ../shared/data", file=sys.stderr)
        return 1
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    rows: list[dict] = []
    for key in keys:
        run_model(load_case(key, args.data), args.seconds, args.choices, args.seeds, rows)
        if args.json:
            with open(args.json, "a") as handle:
                for row in rows:
                    if row["case"] == key:
                        handle.write(json.dumps(row) + "\n")
    if args.planes:
        before = len(rows)
        run_model(load_case("cells-3d", args.data), args.seconds, args.choices, args.seeds, rows, planes=True)
        if args.json:
            with open(args.json, "a") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows[before:])
    interfaces = [k.strip() for k in args.interfaces.split(",") if k.strip()]
    if interfaces:
        import tempfile

        case = load_case(keys[0], args.data)
        slices = slice_choices(case.image.shape[0], case.corrected, 1)[0]
        extra = []
        if "cli" in interfaces:
            with tempfile.TemporaryDirectory() as folder:
                extra.append(cli_row(case, slices, args.seconds, Path(folder)))
        if "dock" in interfaces:
            extra.append(dock_row(case, slices, args.seconds))
        for row in extra:
            print(format_row(row), "|", row["decision"], flush=True)
        if args.json:
            with open(args.json, "a") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in extra)
        rows += extra
    lines, figures = summary(rows)
    print("\n".join(lines))
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
