"""Live mode against the batch loop, with a simulated user (issue 20). Core part: no GUI.

For each case (held-out data of ``bench_hitl.py``: the same splits and helpers) a simulated
user starts from the shipped model's segmentation and corrects ``--corrections`` slices, the
worst first (lowest object F1, or Dice for EM, of the start model's segmentation on that
slice; for a 3D model away from the stack's ends and 2 apart), by pasting their truth:

* **live**: a :class:`~napari_unet.training.live.LiveSession` runs in a worker thread (as the
  dock's worker runs it). The user moves the view to the slice (``set_view``), paints for
  ``--paint-seconds`` while the session trains, then hands the corrected planes over
  (``submit_corrections``), and goes on to the next slice. After the last correction the
  session keeps training until the batch loop's wall time is over. The weights Apply would
  use (``current_model``) are taken every ``--checkpoint`` seconds and scored afterwards (the
  scoring never competes with the session for the CPU); a checkpoint's time includes the
  Apply (whole-stack segmentation) it would take.
* **batch**: the same corrections painted in the same time, then Fine-tune ``--finetune-seconds``
  (the dock's defaults) and Segment; its wall time is the painting plus both runs.

Scored on the voxels of no corrected slice (``bench_hitl.score``): object F1 at IoU 0.5 (Dice
for EM). Recorded: the F1 against wall time, the latency from each ``submit_corrections`` to
the first update whose weights trained on it (``corrections_version``), and the session's
timings (training steps, view predictions, rebuilds). ``--latency-3d`` adds a latency-only
run of nuclei-3d on a 100 x 256 x 256 stack (``nuclei3d_1135`` tiled in-plane: not held-out
data, so no F1 is claimed for it).

Run (torch threads: ``OMP_NUM_THREADS=1`` on a shared machine)::

    python benchmarks/bench_live.py [--cases nuclei-2d,em,nuclei-3d] [--corrections 3]
        [--paint-seconds 5] [--finetune-seconds 30] [--checkpoint 5] [--latency-3d]
        [--plot docs/bench_live.png] [--json results.json]

The last line is ``latency_median_s=… latency_p90_s=… max_stall_ms=… time_to_batch_f1_ratio=…``
(the ratio: live's time to the batch loop's final F1 over the batch loop's time, the worst
case; ``inf`` when live never reached it). ``max_stall_ms`` is measured by the dock run
(``--dock``, the GUI part); this core run prints ``nan``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hitl import (  # noqa: E402  (the same held-out cases, pasting and scoring)
    DATA,
    Case,
    corrected_labels,
    fine_tune,
    load_case,
    score,
    segment_like_the_dock,
)

from napari_unet.labels.metrics import dice, match_instances  # noqa: E402
from napari_unet.model.checkpoint import SegmentationModel  # noqa: E402
from napari_unet.training.live import LiveConfig, LiveSession, LiveView  # noqa: E402
from napari_unet.zoo.loading import load_model  # noqa: E402

CASES = ("nuclei-2d", "em", "nuclei-3d")


def metric(scores) -> float:
    """Object F1, or Dice where there are no objects (EM membranes)."""
    return scores.dice if math.isnan(scores.f1) else scores.f1


def worst_slices(case: Case, model: SegmentationModel, instances: np.ndarray, mask: np.ndarray,
                 count: int) -> list[int]:
    """The ``count`` slices a user corrects first: the worst of the start model's segmentation
    (object F1 per slice; Dice for EM); for a 3D model not within 2 slices of the stack's
    ends, and at least 2 apart."""
    depth = case.image.shape[0]
    edge = 2 if model.spatial_dims == 3 else 0
    values = []
    for z in range(edge, depth - edge):
        if case.key == "em":
            values.append((dice(mask[z], case.truth[z] > 0), z))
        else:
            m = match_instances(instances[z], case.truth[z])
            values.append((2 * m.true_positives / max(1, m.n_pred + m.n_gt), z))
    chosen: list[int] = []
    for _, z in sorted(values):
        if model.spatial_dims == 2 or all(abs(z - c) >= 2 for c in chosen):
            chosen.append(int(z))
        if len(chosen) == count:
            break
    return chosen


@dataclass
class Curve:
    """A method's metric against wall time, and what it took."""

    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def time_to(self, target: float) -> float:
        """The first time the metric reached ``target`` (inf: never)."""
        for t, v in zip(self.times, self.values):
            if v >= target - 1e-9:
                return t
        return math.inf


def batch_loop(case: Case, model: SegmentationModel, corrected: np.ndarray, slices: list[int], paint: float,
               seconds: float, start_value: float) -> Curve:
    """Paint every correction, Fine-tune ``seconds`` (the dock's defaults), Segment."""
    tuned, trainer, took = fine_tune(model, case, corrected, slices, seconds, seed=0)
    mark = time.perf_counter()
    instances, mask = segment_like_the_dock(tuned, case)
    segment_seconds = time.perf_counter() - mark
    value = metric(score(tuned, case, instances, mask, slices))
    wall = len(slices) * paint + took + segment_seconds
    entry = tuned.history[-1]
    return Curve([0.0, wall], [start_value, value], wall,
                 info=dict(iterations=entry["iterations"], finetune_s=round(took, 1),
                           segment_s=round(segment_seconds, 1), kept=entry["kept"]))


def live_loop(case: Case, model: SegmentationModel, corrected: np.ndarray, slices: list[int], paint: float,
              total: float, checkpoint: float, apply_seconds: float, config: LiveConfig,
              score_it: bool = True) -> Curve:
    """The live session with the simulated user (see the module docstring)."""
    session = LiveSession(model, case.image, config, voxel_size=case.voxel_size)
    arrivals: list[tuple[float, int, int]] = []  # (time, corrections_version, iteration)
    result: dict = {}
    start = time.perf_counter()

    def worker() -> None:  # the dock's worker thread: drives run(), hands updates over
        job = session.run()
        try:
            while True:
                update = next(job)
                arrivals.append((time.perf_counter() - start, update.corrections_version, update.iteration))
        except StopIteration as stop:
            result["model"] = stop.value
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            result["error"] = error

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    submitted: list[float] = []
    checkpoints: list[tuple[float, SegmentationModel]] = []
    events = []
    for k, z in enumerate(slices):
        events.append((k * paint, "view", k))
        events.append(((k + 1) * paint, "submit", k))
    t = checkpoint
    while t < total:
        events.append((t, "checkpoint", None))
        t += checkpoint
    events.sort(key=lambda e: (e[0], e[1] != "submit"))
    for when, kind, k in events:
        delay = start + when - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if "error" in result:
            raise result["error"]
        if kind == "view":
            session.set_view(LiveView(0, slices[k]))
        elif kind == "submit":
            planes = {int(z): np.array(corrected[z]) for z in slices[:k + 1]}
            session.submit_corrections(planes, version=k + 1)
            submitted.append(time.perf_counter() - start)
        else:
            checkpoints.append((time.perf_counter() - start, session.current_model()))
    delay = start + total - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    session.request_stop()
    thread.join(120)
    if "error" in result:
        raise result["error"]
    wall = time.perf_counter() - start
    checkpoints.append((wall, result["model"]))
    latencies = []
    for k, sent in enumerate(submitted):
        first = next((t for t, version, _ in arrivals if version >= k + 1), math.inf)
        latencies.append(first - sent)
    gaps = np.diff([t for t, _, _ in arrivals]) if len(arrivals) > 1 else np.zeros(1)
    timings = session.timings
    info = dict(iterations=session.iteration, updates=len(arrivals),
                step_s=round(timings["train"] / max(1, session.iteration), 3),
                predict_s=round(timings["predict"] / max(1, len(arrivals)), 2),
                rebuild_s=round(timings["rebuild"] / max(1, len(slices)), 3),
                validate_s=round(timings["validate"], 1), update_gap_median_s=round(float(np.median(gaps)), 2),
                kept=result["model"].history[-1]["kept"], threads=session.threads_message)
    curve = Curve(wall=wall, latencies=latencies, info=info)
    if score_it:
        for when, tuned in checkpoints:
            instances, mask = segment_like_the_dock(tuned, case)
            curve.times.append(when + apply_seconds)
            curve.values.append(metric(score(tuned, case, instances, mask, slices)))
    return curve


def large_3d_case(data: Path) -> Case:
    """nuclei3d_1135 (100 x 100 x 100) tiled in-plane to 100 x 256 x 256, ids kept apart: a
    view of the size the latency target names (not held-out data)."""
    base = load_case("nuclei-3d", data)
    import tifffile

    from napari_unet.io.readers import read_image

    loaded = read_image(data / "nuclei3d_1135/image.tif")
    image = np.asarray(loaded.data)
    truth = tifffile.imread(data / "nuclei3d_1135/labels.tif").astype(np.uint32)
    tiles_i, tiles_t = [], []
    for k in range(9):
        tiles_i.append(image)
        tiles_t.append(np.where(truth > 0, truth + k * (int(truth.max()) + 1), 0))
    rows_i = [np.concatenate(tiles_i[r * 3:r * 3 + 3], axis=2) for r in range(3)]
    rows_t = [np.concatenate(tiles_t[r * 3:r * 3 + 3], axis=2) for r in range(3)]
    big_i = np.concatenate(rows_i, axis=1)[:, :256, :256]
    big_t = np.concatenate(rows_t, axis=1)[:, :256, :256]
    return Case("nuclei-3d-256", base.model, np.ascontiguousarray(big_i), np.ascontiguousarray(big_t),
                base.voxel_size, base.corrected)


def run_case(case: Case, args: argparse.Namespace, config: LiveConfig, rows: list[dict]) -> dict:
    model = load_model(case.model)
    mark = time.perf_counter()
    instances, mask = segment_like_the_dock(model, case)
    segment_seconds = time.perf_counter() - mark
    slices = worst_slices(case, model, instances, mask, args.corrections)
    corrected = corrected_labels(case, instances, mask, slices)
    latency_only = case.key.endswith("-256")
    before = float("nan") if latency_only else metric(score(model, case, instances, mask, slices))
    if latency_only:
        total = len(slices) * args.paint_seconds + args.tail
        live = live_loop(case, model, corrected, slices, args.paint_seconds, total, total, segment_seconds,
                         config, score_it=False)
        batch = Curve()
    else:
        batch = batch_loop(case, model, corrected, slices, args.paint_seconds, args.finetune_seconds, before)
        live = live_loop(case, model, corrected, slices, args.paint_seconds, batch.wall, args.checkpoint,
                         segment_seconds, config)
        live.times.insert(0, 0.0)  # the start model's segmentation, there before either begins
        live.values.insert(0, before)
    target = batch.values[-1] if batch.values else float("nan")
    reached = live.time_to(target) if batch.values else math.nan
    row = dict(case=case.key, model=case.model, slices=slices, shape=list(case.image.shape), before=before,
               batch_final=target, batch_wall=batch.wall, live_final=live.values[-1] if live.values else math.nan,
               live_time_to_batch=reached, ratio=reached / batch.wall if batch.values else math.nan,
               latencies=[round(v, 2) for v in live.latencies], live_info=live.info, batch_info=batch.info,
               live_curve=[list(map(float, p)) for p in zip(live.times, live.values)],
               batch_curve=[list(map(float, p)) for p in zip(batch.times, batch.values)],
               apply_s=round(segment_seconds, 1))
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("_curve")}, default=str), flush=True)
    return row


def table(rows: list[dict]) -> list[str]:
    lines = ["| case | view | slices | F1 before | batch: final F1 at s | live: F1 at that time (final) | "
             "live time to batch F1 (ratio) | latency median / max s | steps (s/step) | view prediction s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        view = "x".join(map(str, r["shape"][1:])) + (" slab" if "3d" in r["case"] else " plane")
        lat = r["latencies"]
        info = r["live_info"]
        at = float("nan")
        for t, v in r["live_curve"]:
            if t <= r["batch_wall"] + 1e-9:
                at = v
        ratio = f"{r['live_time_to_batch']:.0f} s ({r['ratio']:.2f})" if np.isfinite(r["ratio"]) else (
            "not reached" if r["batch_curve"] else "n/a")
        lines.append(
            f"| {r['case']} | {view} | {r['slices']} | {r['before']:.3f} | "
            + (f"{r['batch_final']:.3f} at {r['batch_wall']:.0f} | {at:.3f} ({r['live_final']:.3f}) | "
               if r["batch_curve"] else "n/a | n/a | ")
            + f"{ratio} | {np.median(lat):.2f} / {max(lat):.2f} | {info['iterations']} ({info['step_s']}) | "
              f"{info['predict_s']} |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["batch_curve"]]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), squeeze=False)
    for ax, r in zip(axes[0], shown):
        lt, lv = zip(*r["live_curve"])
        bt, bv = zip(*r["batch_curve"])
        ax.plot(lt, lv, "o-", label="live (Apply at t)")
        ax.step(bt, bv, where="post", label="batch (Fine-tune 30 s, Segment)")
        ax.axhline(r["batch_final"], color="grey", lw=0.5, ls=":")
        ax.set_title(f"{r['case']} ({r['model']})")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("Dice" if r["case"] == "em" else "object F1 (uncorrected slices)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"subset of {','.join(CASES)}")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--corrections", type=int, default=3)
    parser.add_argument("--paint-seconds", type=float, default=5.0, help="time a user takes to correct a slice")
    parser.add_argument("--finetune-seconds", type=float, default=30.0)
    parser.add_argument("--checkpoint", type=float, default=5.0, help="seconds between scored live weights")
    parser.add_argument("--tail", type=float, default=10.0, help="latency-only run: seconds after the last correction")
    parser.add_argument("--latency-3d", action="store_true", help="also nuclei-3d on a 100 x 256 x 256 stack")
    parser.add_argument("--round-seconds", type=float, default=None, help="LiveConfig.train_seconds_per_round")
    parser.add_argument("--learning-rate", type=float, default=None, help="LiveConfig.learning_rate")
    parser.add_argument("--plot", type=Path, default=None, help="F1 against wall time (PNG)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"no data at {args.data}; this benchmark needs ../shared/data", file=sys.stderr)
        return 1
    config = LiveConfig()
    if args.round_seconds is not None:
        config.train_seconds_per_round = args.round_seconds
    config.learning_rate = args.learning_rate
    rows: list[dict] = []
    for key in [k.strip() for k in args.cases.split(",") if k.strip()]:
        run_case(load_case(key, args.data), args, config, rows)
    if args.latency_3d:
        run_case(large_3d_case(args.data), args, config, rows)
    print("\n".join(table(rows)))
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    latencies = [v for r in rows for v in r["latencies"]]
    ratios = [r["ratio"] for r in rows if r["batch_curve"]]
    ratio = max(ratios) if ratios else math.nan
    print(f"latency_median_s={np.median(latencies):.2f} latency_p90_s={np.percentile(latencies, 90):.2f} "
          f"max_stall_ms=nan time_to_batch_f1_ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
