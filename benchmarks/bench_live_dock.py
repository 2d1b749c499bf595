"""Live mode through the real dock: correction-to-view latency and event-loop stalls.

``bench_live.py --dock`` runs one case through this module (or run it alone). In a real napari
window (under Xvfb: ``xvfb-run -a -s "-screen 0 1600x1000x24"``) the Fine-tune dock's Live mode
runs while a simulated user corrects: each round the user goes to the worst part (a 2D image:
the tile of ``--tile`` pixels where the labels differ most from the truth, painted with the
truth; a stack: the slice with the largest error, shown, then painted with its truth), with real
napari paint events (``Labels.data_setitem``), and waits for the live prediction to show that
it has trained on it (or ``--round-timeout``) plus ``--think`` seconds. The event loop runs
throughout with bench_gui's 10 ms heartbeat.

Measured: the latency from each correction (its paint event) to the first live prediction on
screen trained on it (the dock's own record, see ``LiveRun.latencies``), and the longest stall
of the event loop (with the main thread's CPU time in it). Last line::

    dock: case=… latency_median_s=… latency_p90_s=… max_stall_ms=… rounds=…
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gui import Heartbeat, StallStacks, tiled, wait  # noqa: E402 - the benchmarks share bench_gui's tools

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def worst_tile(labels: np.ndarray, truth: np.ndarray, tile: int) -> tuple[slice, slice]:
    """The ``tile`` x ``tile`` window where ``labels`` differ most from ``truth`` (foreground)."""
    wrong = ((labels > 0) != (truth > 0)).astype(np.int64)
    best, where = -1, (slice(0, tile), slice(0, tile))
    for y in range(0, max(1, truth.shape[0] - tile + 1), tile // 2):
        for x in range(0, max(1, truth.shape[1] - tile + 1), tile // 2):
            n = int(wrong[y:y + tile, x:x + tile].sum())
            if n > best:
                best, where = n, (slice(y, y + tile), slice(x, x + tile))
    return where


def worst_slice(labels: np.ndarray, truth: np.ndarray, done: set[int]) -> int:
    """The slice not yet corrected where ``labels`` differ most from ``truth`` (foreground)."""
    wrong = ((labels > 0) != (truth > 0)).sum(axis=(1, 2))
    order = [int(z) for z in np.argsort(-wrong) if int(z) not in done]
    return order[0] if order else 0


def paint(layer: Any, region: tuple[Any, ...], values: np.ndarray) -> int:
    """Paint ``values`` into ``region`` of the labels layer as napari's tools do (one undo step,
    one paint event); returns the number of voxels changed."""
    shape = layer.data.shape
    mask = np.zeros(shape, bool)
    mask[region] = np.asarray(layer.data[region]) != values
    indices = np.nonzero(mask)
    if not len(indices[0]):
        return 0
    full = np.zeros(shape, layer.data.dtype)
    full[region] = values
    layer.data_setitem(indices, full[indices])
    return len(indices[0])


class Excluded:
    """The simulated user's own work (choosing where to correct, making the paint indices) and
    napari's synchronous handling of their actions (the paint call, slicing the layers at a
    move to another slice) are left out of the heartbeat's gaps; the paint calls are timed
    apart. What follows on the event loop (redraws, the dock's callbacks) is in."""

    def __init__(self, beat: Heartbeat):
        self.beat = beat

    def __enter__(self) -> "Excluded":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.beat._last, self.beat._last_cpu = time.perf_counter(), time.thread_time()


def timed(owner: Any, name: str, into: list[float]) -> None:
    """Record the seconds of each call of ``owner.name`` (a main-thread callback of the dock)."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        mark = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - mark)

    setattr(owner, name, wrapper)


def run_dock_case(name: str, image: np.ndarray, truth: np.ndarray, model: Any, *,
                  voxel_size: tuple[float, ...] | None = None, seconds: float = 90.0,
                  tile: int = 128, think: float = 1.0, round_timeout: float = 20.0,
                  start_labels: np.ndarray | None = None,
                  stall_stacks: bool = False) -> dict[str, Any]:
    """One case through the real Live dock; returns the latencies and stalls (see the module)."""
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_unet._widgets._finetune import FineTuneWidget
    from napari_unet._widgets._state import get_registry

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    dock = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Fine-tune")
    registry = get_registry()
    registry.add_model(model, source="file", key=f"{model.label} (bench)")
    dock.device_combo.setCurrentIndex(dock.device_combo.findData("cpu"))
    scale = voxel_size or (1.0,) * image.ndim
    viewer.add_image(image, name=name, scale=scale)
    labels0 = np.zeros(truth.shape, np.uint16) if start_labels is None else start_labels
    layer = viewer.add_labels(labels0.astype(np.uint16), name=f"{name} labels", scale=scale)
    dock.image_combo.set_layer(viewer.layers[name])
    dock.labels_combo.set_layer(layer)
    viewer.layers.selection.active = layer
    if image.ndim == 3:
        viewer.dims.set_current_step(0, image.shape[0] // 2)
    live = dock.live
    costs: dict[str, list[float]] = {"show": [], "submit": [], "tick": []}
    timed(live.live_layer, "show", costs["show"])
    for timer, slot in ((live._debounce, "_submit"), (live._clock, "_tick")):
        timed(live, slot, costs[slot[1:]])
        timer.timeout.disconnect()
        timer.timeout.connect(getattr(live, slot))
    beat = Heartbeat()
    wait(app, lambda: False, 1.0)
    beat.start()
    wait(app, lambda: False, 2.0)
    idle = beat.stop()
    t0 = time.perf_counter()
    live.start()
    ok = wait(app, lambda: live._run.shown_at is not None, 120.0)
    first_view = time.perf_counter() - t0
    beat.start()
    stacks = StallStacks(beat) if stall_stacks else None
    end = time.perf_counter() + seconds
    rounds, done = 0, set()
    paints: list[float] = []  # seconds of each paint (napari's data_setitem and its handlers)
    shown_late = 0
    while ok and time.perf_counter() < end:
        if image.ndim == 3:
            with Excluded(beat):
                z = worst_slice(np.asarray(layer.data), truth, done)
            done.add(z)
            with Excluded(beat):  # the user's own move: napari slices every layer there
                viewer.dims.set_current_step(0, z)
            wait(app, lambda z=z: live._run.update is not None and live._run.update.view.index == z,
                 round_timeout)
            with Excluded(beat):
                mark = time.perf_counter()
                n = paint(layer, (z, slice(None), slice(None)), truth[z].astype(layer.data.dtype))
                paints.append(time.perf_counter() - mark)
        else:
            with Excluded(beat):
                where = worst_tile(np.asarray(layer.data), truth, tile)
                mark = time.perf_counter()
                n = paint(layer, where, truth[where].astype(layer.data.dtype))
                paints.append(time.perf_counter() - mark)
        if not n:
            break
        rounds += 1
        before = len(live._run.latencies)
        if not wait(app, lambda b=before: len(live._run.latencies) > b, round_timeout):
            shown_late += 1
        wait(app, lambda: False, think)
    stall = beat.stop()
    if stacks is not None:
        stacks.report()
    busy = beat.max_busy()
    p99 = beat.percentile(99)
    live.stop()
    wait(app, lambda: live.worker is None, 60.0)
    latencies = list(live._run.latencies)
    viewer.close()
    result = {
        "case": name, "rounds": rounds, "first_view_s": first_view, "idle_stall_ms": idle,
        "max_stall_ms": stall, "stall_p99_ms": p99, "max_busy_ms": busy,
        "latencies": latencies, "late": shown_late,
        "max_paint_ms": 1000 * max(paints, default=0.0),
        "callbacks_ms": {k: (round(1000 * float(np.median(v)), 1) if v else None,
                             round(1000 * max(v), 1) if v else None) for k, v in costs.items()},
        "latency_median_s": float(np.median(latencies)) if latencies else float("nan"),
        "latency_p90_s": float(np.percentile(latencies, 90)) if latencies else float("nan"),
    }
    print(f"dock {name}: first live view after {first_view:.1f} s; {rounds} corrections, "
          f"{len(latencies)} shown trained on ({shown_late} not within {round_timeout:.0f} s); "
          f"latency median {result['latency_median_s']:.2f} s, p90 {result['latency_p90_s']:.2f} s; "
          f"max stall {stall:.0f} ms (p99 {p99:.0f} ms, main-thread CPU in it {busy:.0f} ms, "
          f"idle {idle:.0f} ms; longest paint call {result['max_paint_ms']:.0f} ms, left out); "
          f"dock callbacks median/max ms {result['callbacks_ms']}; "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    return result


def default_case(case: str) -> tuple[np.ndarray, np.ndarray, Any, tuple[float, ...] | None]:
    """(image, truth, start model, voxel size) of a case from ../shared/data."""
    import tifffile

    from napari_unet.zoo.loading import load_model

    if case == "nuclei2d":
        image = tifffile.imread(SHARED / "stardist_samples" / "img2d.tif")
        truth = tifffile.imread(SHARED / "stardist_samples" / "mask2d.tif")
        return image, truth, load_model("nuclei-2d"), None
    if case == "em2d":
        image = tifffile.imread(SHARED / "isbi2012_em" / "image.tif")[0]
        truth = tifffile.imread(SHARED / "isbi2012_em" / "membranes.tif")[0]
        return image, truth, load_model("em-membranes-2d"), None
    if case == "nuclei3d":
        image = tifffile.imread(SHARED / "nuclei3d_1135" / "image.tif")
        truth = tifffile.imread(SHARED / "nuclei3d_1135" / "labels.tif")
        return image, truth, load_model("nuclei-3d"), (0.28, 0.127, 0.127)
    if case == "nuclei3d_256":  # the 3D view size: 100x256x256 (mirrored copies)
        image, truth, model, voxel = default_case("nuclei3d")
        return tiled(image, (100, 256, 256)), tiled(truth, (100, 256, 256)), model, voxel
    raise ValueError(f"unknown case {case!r}")


def start_labels_for(image: np.ndarray, model: Any, voxel_size: Any) -> np.ndarray | None:
    """A 2D image starts from the start model's segmentation (the user corrects it); a stack
    from empty labels (only corrected slices count)."""
    if image.ndim == 3:
        return None
    from napari_unet.engine.live import default_output
    from napari_unet.engine.predict import segment
    from napari_unet.progress import drain

    result = drain(segment(image, model, output=default_output(model), voxel_size=voxel_size))
    return np.asarray(result.data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="nuclei2d", choices=("nuclei2d", "em2d", "nuclei3d", "nuclei3d_256"))
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--think", type=float, default=1.0,
                        help="seconds the simulated user looks before the next correction")
    parser.add_argument("--round-timeout", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--stall-stacks", action="store_true",
                        help="print where the main thread was during stalls (bench_gui.StallStacks)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    image, truth, model, voxel_size = default_case(args.case)
    start = start_labels_for(image, model, voxel_size)
    result = run_dock_case(args.case, image, truth, model, voxel_size=voxel_size,
                           seconds=args.seconds, tile=args.tile, think=args.think,
                           round_timeout=args.round_timeout, start_labels=start,
                           stall_stacks=args.stall_stacks)
    print(f"dock: case={args.case} latency_median_s={result['latency_median_s']:.2f} "
          f"latency_p90_s={result['latency_p90_s']:.2f} max_stall_ms={result['max_stall_ms']:.0f} "
          f"rounds={result['rounds']}")


if __name__ == "__main__":
    main()
