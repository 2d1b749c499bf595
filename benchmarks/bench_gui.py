"""Responsiveness of the napari docks through the whole correct → fine-tune → segment loop.

A QTimer heartbeat (every 10 ms) records the longest gap of the Qt event loop ("stall") while

1. the Segment dock runs a 3D model on a 100x512x512 stack, first run in the process (cold);
2. the Segment dock runs a 2D model on a 20x1024x1024 stack (and the time from the click to the
   first labels on screen: the slice on screen runs first);
3. the same on a lazy (dask) layer of that stack, which the dock streams without loading it;
4. the Fine-tune dock fine-tunes a 3D model with the live preview on;
5. the Edit dock fills holes, relabels and splits on a whole 100x1024x1024 labels layer (in a
   worker; the layer is updated on the main thread when each is done).

Images are the shipped samples tiled to those sizes; models are the shipped ones when installed,
else untrained networks of the same size (the timings do not depend on the weights). Each
Segment case is cancelled after ``--segment-seconds``.

Run under a display, e.g.::

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/bench_gui.py

Last line: ``max_stall_ms=N first_labels_stack_s=X.X max_click_ms=N`` (targets: stalls <= 50 ms,
first labels <= 2 s, click handlers <= 100 ms): the longest event-loop gap after each click, over
all cases, and the longest click handler. The click handlers themselves (napari creating a layer,
the snapshot of the labels) are timed apart from the run's gaps, with the time from their return
to the next event-loop pass (the window's first repaint). Each case also gives the main thread's
own CPU time in its longest gap (what the code costs, less inflated by a loaded machine than the
wall-clock gap) and how many times the napari canvas was drawn. Stalls depend on the machine's
load: measure on a quiet machine (``uptime`` load < 1.5); ``--threads 1`` leaves a core to the
window on a 2-core machine, and ``OMP_WAIT_POLICY=PASSIVE`` in the environment stops idle torch
threads from spinning. Under Xvfb (software OpenGL) every repaint of the window costs ~15-20 ms
and a redraw of the napari canvas ~20 ms more.
"""

from __future__ import annotations

import argparse
import os
import time
from importlib import resources
from pathlib import Path

import numpy as np


class Heartbeat:
    """Longest gap between ticks of a 10 ms QTimer, i.e. how long the event loop was blocked.

    Also the main thread's own CPU time in each gap (``busy``): the work done on the main
    thread, which a loaded machine does not inflate as it does the wall-clock gap (GL drawing
    done in the driver's own threads is not in it)."""

    def __init__(self, interval_ms: int = 10):
        from qtpy.QtCore import QTimer

        self.interval = interval_ms / 1000
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.gaps: list[float] = []
        self.busy: list[float] = []
        self._last = None
        self._last_cpu = 0.0
        #: True between start() and stop() (read by StallStacks' thread: no Qt call there)
        self.running = False
        #: seconds from start() to the first tick (e.g. a click's first paint)
        self.first: float | None = None
        self._started = 0.0

    def _tick(self) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        if self._last is not None:
            if self.first is None:
                self.first = now - self._started
            self.gaps.append(now - self._last - self.interval)
            self.busy.append(cpu - self._last_cpu)
        self._last, self._last_cpu = now, cpu

    def start(self) -> None:
        self.gaps.clear()
        self.busy.clear()
        self.first = None
        self._started = self._last = time.perf_counter()
        self._last_cpu = time.thread_time()
        self.running = True
        self.timer.start()

    def max_busy(self) -> float:
        return max(self.busy, default=0.0) * 1000

    def stop(self) -> float:
        self.running = False
        self.timer.stop()
        self._tick()
        return max(self.gaps, default=0.0) * 1000

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.gaps, q) * 1000) if self.gaps else 0.0


class StallStacks:
    """Where the main thread is while the event loop is blocked (``--stall-stacks``): a thread
    samples the main thread's stack every 4 ms once the heartbeat is ``after_ms`` late; the
    most frequent stacks (their napari / vispy / Qt / napari-unet frames) are printed."""

    def __init__(self, beat: Heartbeat, after_ms: float = 35.0):
        import collections
        import threading

        self.beat, self.after = beat, after_ms / 1000
        self.counts: collections.Counter[str] = collections.Counter()
        self._main = threading.main_thread().ident
        self._stop = False
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        import sys
        import traceback

        while not self._stop:
            time.sleep(0.004)
            last = self.beat._last
            if last is None or not self.beat.running or time.perf_counter() - last < self.after:
                continue
            frame = sys._current_frames().get(self._main)
            if frame is None:
                continue
            names = [f"{Path(f.filename).name}:{f.name}" for f in traceback.extract_stack(frame)
                     if any(k in f.filename for k in ("napari", "vispy", "qt", "matplotlib"))]
            self.counts[" > ".join(names[-6:]) or "(in Qt, no Python frame: painting, X)"] += 1

    def report(self, top: int = 15) -> None:
        self._stop = True
        print(f"main-thread stacks while the event loop was blocked > {self.after * 1000:.0f} ms "
              "(samples of 4 ms):")
        for stack, n in self.counts.most_common(top):
            print(f"{n:5d}  {stack}")


def wait(app, condition, timeout: float) -> bool:
    end = time.perf_counter() + timeout
    while not condition() and time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.002)
    return condition()


def model_for(name: str, spatial_dims: int, task: str):
    from napari_unet.model.checkpoint import SegmentationModel, list_pretrained
    from napari_unet.model.config import UNetConfig
    from napari_unet.model.unet import UNet
    from napari_unet.zoo.loading import load_model

    if name in list_pretrained():
        return load_model(name)
    out = 2 if task == "foreground_boundary" else 1
    config = UNetConfig(spatial_dims=spatial_dims, out_channels=out, base_channels=16, depth=4,
                        inplane_only_levels=(0,) if spatial_dims == 3 else ())
    return SegmentationModel(network=UNet(config).eval(), task=task, name=f"{name}-untrained")


def tiled(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``array`` repeated (mirrored every other time, so there are no seams) to ``shape``."""
    out = array
    for axis, size in enumerate(shape):
        reps = -(-size // out.shape[axis])
        parts = [out if k % 2 == 0 else np.flip(out, axis) for k in range(reps)]
        out = np.concatenate(parts, axis=axis)
    return np.ascontiguousarray(out[tuple(slice(0, s) for s in shape)])


def with_holes(labels: np.ndarray) -> np.ndarray:
    """A copy with a 3-voxel cavity in the middle of every object large enough for one."""
    from scipy import ndimage as ndi

    out = labels.copy()
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        centre = tuple((s.start + s.stop) // 2 for s in box)
        cube = tuple(slice(c - 1, c + 2) for c in centre)
        around = tuple(slice(c - 2, c + 3) for c in centre)
        if (labels[around] == index).all():
            out[cube] = 0
    return out


def tiled_labels(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Instance labels repeated to ``shape``, each copy with its own ids (uint32)."""
    reps = [-(-s // n) for s, n in zip(shape, labels.shape)]
    step = int(labels.max()) + 1
    out = np.zeros([r * n for r, n in zip(reps, labels.shape)], dtype=np.uint32)
    k = 0
    for index in np.ndindex(*reps):
        block = labels.astype(np.uint32)
        block = np.where(block > 0, block + k * step, 0)
        region = tuple(slice(i * n, (i + 1) * n) for i, n in zip(index, labels.shape))
        out[region] = block
        k += 1
    return np.ascontiguousarray(out[tuple(slice(0, s) for s in shape)])


class Bench:
    def __init__(self, args: argparse.Namespace):
        import napari
        from qtpy.QtWidgets import QApplication

        from napari_unet._widgets._edit import EditWidget
        from napari_unet._widgets._finetune import FineTuneWidget
        from napari_unet._widgets._segment import SegmentWidget
        from napari_unet._widgets._state import get_registry

        self.args = args
        self.viewer = napari.Viewer(show=True)
        self.app = QApplication.instance()
        self.segment = SegmentWidget(self.viewer)
        self.edit = EditWidget(self.viewer)
        self.finetune = FineTuneWidget(self.viewer)
        self.viewer.window.add_dock_widget(self.segment, name="Segment")
        self.viewer.window.add_dock_widget(self.edit, name="Edit", tabify=True)
        self.viewer.window.add_dock_widget(self.finetune, name="Fine-tune", tabify=True)
        self.registry = get_registry()
        self.beat = Heartbeat()
        self.stalls: dict[str, float] = {}
        #: how long each click handler blocked (napari creating a layer, mostly): reported apart
        self.clicks: dict[str, float] = {}
        self.samples = Path(str(resources.files("napari_unet.sample_data")))
        self.segment.device_combo.setCurrentIndex(self.segment.device_combo.findData("cpu"))
        self.finetune.device_combo.setCurrentIndex(self.finetune.device_combo.findData("cpu"))

    def idle(self) -> None:
        wait(self.app, lambda: False, 1.0)  # let the window settle
        self.beat.start()  # noise floor of this machine: the heartbeat with nothing running
        wait(self.app, lambda: False, 3.0)
        print(f"idle: max stall {self.beat.stop():.0f} ms, p99 {self.beat.percentile(99):.0f} ms",
              flush=True)

    def add_image(self, data, name: str, scale=None):
        layer = self.viewer.add_image(data, name=name, scale=scale,
                                      contrast_limits=(float(np.min(data[0])), float(np.max(data[0]))))
        self.viewer.layers.selection.active = layer
        self.viewer.dims.set_point(0, int(np.shape(data)[0] // 2) * (scale[0] if scale else 1))
        return layer

    def run_segment(self, case: str, image_name: str, model, output: str) -> float | None:
        """Segment ``image_name`` (cancelled after --segment-seconds); returns the first-labels time."""
        seg = self.segment
        # the image first: selecting it picks a fitting model (the last one used for this kind
        # of data), which the benchmark then overrides with its own
        seg.image_combo.setCurrentText(image_name)
        self.registry.current = self.registry.add_model(model)
        seg.output_combo.setCurrentText(output)
        seg.write_combo.setCurrentText("new labels layer")
        draws = self.draw_counter()
        t0, cpu0 = time.perf_counter(), time.thread_time()
        seg.segment()
        click_ms = (time.perf_counter() - t0) * 1000
        click_cpu = (time.thread_time() - cpu0) * 1000
        self.beat.start()
        finished = wait(self.app, lambda: seg.worker is None, self.args.segment_seconds)
        if not finished:
            seg.cancel()
            wait(self.app, lambda: seg.worker is None, 300)
        stall = self.beat.stop()
        self.stalls[case], self.clicks[case] = stall, click_ms
        first = seg.first_tile_seconds
        settle = (self.beat.first or 0.0) * 1000
        print(f"{case}: {'finished' if finished else 'cancelled'} after "
              f"{time.perf_counter() - t0:.1f} s, {seg._run.done}/{seg._run.total} tiles, "
              f"first labels {first if first is not None else float('nan'):.1f} s, "
              f"click handler {click_ms:.0f} ms (main-thread CPU {click_cpu:.0f} ms, then "
              f"{settle:.0f} ms to the next event-loop pass), max stall {stall:.0f} ms "
              f"(main-thread CPU {self.beat.max_busy():.0f} ms), "
              f"p99 {self.beat.percentile(99):.0f} ms, canvas draws {draws()}; {seg._run.model.label}: {seg._run.plan}",
              flush=True)
        layer = seg.labels_layer
        if layer is not None and layer in self.viewer.layers:
            self.viewer.layers.remove(layer)
        return first

    def draw_counter(self):
        """A function returning how many times the napari canvas was drawn since this call."""
        count = [0]
        canvas = getattr(getattr(self.viewer.window, "_qt_viewer", None), "canvas", None)
        scene = getattr(canvas, "_scene_canvas", None)
        if scene is None:
            return lambda: -1

        def drawn(_event) -> None:
            count[0] += 1

        scene.events.draw.connect(drawn)

        def read() -> int:
            scene.events.draw.disconnect(drawn)
            return count[0]

        return read

    def run_finetune(self, image_name: str, labels_name: str) -> None:
        ft = self.finetune
        ft.image_combo.setCurrentText(image_name)
        ft.labels_combo.setCurrentText(labels_name)
        ft.time_spin.setValue(int(self.args.finetune_seconds))
        ft.iterations_spin.setValue(0)
        ft.preview_check.setChecked(True)
        draws = self.draw_counter()
        t0 = time.perf_counter()
        ft.fine_tune()
        click_ms = (time.perf_counter() - t0) * 1000
        self.beat.start()
        wait(self.app, lambda: ft.worker is None, self.args.finetune_seconds + 300)
        stall = self.beat.stop()
        self.stalls["fine-tune"], self.clicks["fine-tune"] = stall, click_ms
        stats = ft.last_stats
        print(f"fine-tune (live preview): {stats.iteration if stats else 0} iterations in "
              f"{time.perf_counter() - t0:.1f} s, click handler {click_ms:.0f} ms, "
              f"max stall {stall:.0f} ms (main-thread CPU {self.beat.max_busy():.0f} ms), "
              f"p99 {self.beat.percentile(99):.0f} ms, canvas draws {draws()}", flush=True)

    def run_edit(self, operation: str, labels_layer) -> None:
        edit = self.edit
        edit.labels_combo.set_layer(labels_layer)
        edit.scope_combo.setCurrentText("whole stack (3D)")
        t0 = time.perf_counter()
        getattr(edit, operation)()
        click_ms = (time.perf_counter() - t0) * 1000
        self.beat.start()
        wait(self.app, lambda: edit.worker is None, 900)
        stall = self.beat.stop()
        self.stalls[f"edit {operation}"] = stall
        self.clicks[f"edit {operation}"] = click_ms
        print(f"edit {operation} (whole {'x'.join(map(str, labels_layer.data.shape))}): "
              f"{time.perf_counter() - t0:.1f} s, click handler {click_ms:.0f} ms, max stall "
              f"{stall:.0f} ms, p99 {self.beat.percentile(99):.0f} ms · {edit.status.text()}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segment-seconds", type=float, default=30.0,
                        help="measure each Segment case for at most this long, then cancel")
    parser.add_argument("--finetune-seconds", type=float, default=20.0,
                        help="fine-tuning time limit")
    parser.add_argument("--edit-shape", default="100,1024,1024",
                        help="shape of the labels layer for the whole-stack edits")
    parser.add_argument("--skip", default="",
                        help="comma-separated cases to skip: 3d, 2d, lazy, finetune, edit")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--stall-stacks", action="store_true",
                        help="sample the main thread's stack during stalls and print the most "
                             "frequent ones at the end (napari's share vs the dock's)")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    import dask.array as da
    import torch

    from napari_unet.io.readers import read_image

    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    samples = bench.samples
    print(f"load {os.getloadavg()[0]:.2f}, torch threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}", flush=True)
    bench.idle()
    stacks = StallStacks(bench.beat) if args.stall_stacks else None

    # 1. a 3D model on a 100x512x512 stack, the first run in this process (cold)
    if "3d" not in skip:
        nuclei = read_image(samples / "nuclei_3d.tif")
        stack3d = tiled(np.asarray(nuclei.data), (100, 512, 512))
        bench.add_image(stack3d, "nuclei 100x512x512", scale=nuclei.voxel_size)
        bench.run_segment("segment 3D 100x512x512 (cold)", "nuclei 100x512x512",
                          model_for("nuclei-3d", 3, "foreground_boundary"), "instances")

    # 2. a 2D model on a 20x1024x1024 stack: time to the first labels
    em = np.asarray(read_image(samples / "em_2d.tif").data)
    stack2d = np.stack([np.roll(tiled(em, (1024, 1024)), 17 * z, axis=1) for z in range(20)])
    first_stack = float("nan")
    if "2d" not in skip:
        bench.add_image(stack2d, "em 20x1024x1024")
        first = bench.run_segment("segment 2D 20x1024x1024", "em 20x1024x1024",
                                  model_for("em-membranes-2d", 2, "membranes"), "binary / classes")
        first_stack = first if first is not None else float("nan")

    # 3. the same stack as a lazy (dask) layer: streamed by the worker
    if "lazy" not in skip:
        lazy = da.from_array(stack2d, chunks=(1, 512, 512))
        bench.add_image(lazy, "em lazy")
        bench.run_segment("segment 2D lazy (dask) 20x1024x1024", "em lazy",
                          model_for("em-membranes-2d", 2, "membranes"), "binary / classes")

    # 4. fine-tune a 3D model with the live preview
    if "finetune" not in skip:
        nuclei = read_image(samples / "nuclei_3d.tif")
        labels = np.asarray(read_image(samples / "nuclei_3d_labels.tif").data)
        bench.add_image(np.asarray(nuclei.data), "nuclei_3d", scale=nuclei.voxel_size)
        corrected = bench.viewer.add_labels(labels, name="nuclei_3d corrected",
                                            scale=nuclei.voxel_size)
        corrected.metadata["napari_unet_corrected_slices"] = [20, 50, 80]
        bench.registry.current = bench.registry.add_model(model_for("nuclei-3d", 3,
                                                                    "foreground_boundary"))
        bench.run_finetune("nuclei_3d", "nuclei_3d corrected")

    # 5. whole-stack edits on a big labels layer
    if "edit" not in skip:
        shape = tuple(int(s) for s in args.edit_shape.split(","))
        base = with_holes(np.asarray(read_image(samples / "nuclei_3d_labels.tif").data))
        big = tiled_labels(base, shape)
        layer = bench.viewer.add_labels(big, name="big labels")
        bench.viewer.dims.set_point(0, shape[0] // 2)
        bench.run_edit("fill_holes", layer)
        bench.run_edit("relabel", layer)
        bench.edit.ids_edit.setText(str(int(np.max(layer.data[shape[0] // 2]))))
        bench.run_edit("split", layer)

    bench.viewer.close()
    if stacks is not None:
        stacks.report()
    worst = max(bench.stalls.values(), default=float("nan"))
    case, click = max(bench.clicks.items(), key=lambda kv: kv[1], default=("-", float("nan")))
    print(f"longest click handler {click:.0f} ms ({case}); load {os.getloadavg()[0]:.2f}")
    print(f"max_stall_ms={worst:.0f} first_labels_stack_s={first_stack:.1f} "
          f"max_click_ms={click:.0f}")


if __name__ == "__main__":
    main()
