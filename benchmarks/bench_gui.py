"""Responsiveness of the napari docks while the core works in background threads.

A QTimer heartbeat (every 10 ms) records the longest gap of the Qt event loop

* while the Segment dock segments a 3D stack (cells_3d sample, 32x200x200),
* while the Fine-tune dock fine-tunes a 3D model on it (live loss curve and preview on),

and the time from clicking Segment to the first tile on screen for a 2D 512x512 image on the
CPU (em_2d sample). Shipped models are used when installed, else untrained networks of the same
size (the timings do not depend on the weights).

Run under a display, e.g.::

    xvfb-run -a python benchmarks/bench_gui.py [--segment-seconds 30] [--finetune-seconds 20]

Last line: ``max_stall_ms_segment=N max_stall_ms_finetune=N first_tile_s=X.X`` (targets: stalls
<= 50 ms, first tile <= 1 s). ``--finetune-in-subprocess`` measures the Fine-tune dock training
in a child process (``in_subprocess``) instead of its worker thread.

Stalls depend on the machine's load: measure on a quiet machine (``uptime`` load < 1.5). Under
Xvfb (software OpenGL) every repaint of the window costs ~15-20 ms and a redraw of the napari
canvas ~20 ms more: keep the docks' updates to one repaint per event-loop pass.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

import numpy as np


class Heartbeat:
    """Longest gap between ticks of a 10 ms QTimer, i.e. how long the event loop was blocked."""

    def __init__(self, interval_ms: int = 10):
        from qtpy.QtCore import QTimer

        self.interval = interval_ms / 1000
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.gaps: list[float] = []
        self._last = None

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.gaps.append(now - self._last - self.interval)
        self._last = now

    def start(self) -> None:
        self.gaps.clear()
        self._last = time.perf_counter()
        self.timer.start()

    def stop(self) -> float:
        self.timer.stop()
        self._tick()
        return max(self.gaps, default=0.0) * 1000

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.gaps, q) * 1000) if self.gaps else 0.0


def wait(app, condition, timeout: float) -> bool:
    end = time.perf_counter() + timeout
    while not condition() and time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.002)
    return condition()


def model_for(name: str, spatial_dims: int, task: str):
    from napari_unet.checkpoint import SegmentationModel, list_pretrained, load_model
    from napari_unet.models import UNet, UNetConfig

    if name in list_pretrained():
        return load_model(name)
    out = 2 if task == "foreground_boundary" else 1
    config = UNetConfig(spatial_dims=spatial_dims, out_channels=out, base_channels=16, depth=4,
                        inplane_only_levels=(0,) if spatial_dims == 3 else ())
    return SegmentationModel(network=UNet(config).eval(), task=task, name=f"{name}-untrained")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segment-seconds", type=float, default=30.0,
                        help="measure Segment for at most this long, then cancel")
    parser.add_argument("--finetune-seconds", type=float, default=20.0,
                        help="fine-tuning time limit")
    parser.add_argument("--finetune-in-subprocess", action="store_true",
                        help="train in a child process (training.train_in_subprocess) instead of "
                             "the worker thread (the dock's default)")
    parser.add_argument("--nice", type=int, default=None,
                        help="with --finetune-in-subprocess: niceness of the training process "
                             "(default: the dock's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_unet._widgets._finetune import FineTuneWidget
    from napari_unet._widgets._segment import SegmentWidget
    from napari_unet._widgets._state import get_registry
    from napari_unet.io import read_image

    if args.threads:
        torch.set_num_threads(args.threads)
    samples = Path(str(resources.files("napari_unet.sample_data")))
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    segment = SegmentWidget(viewer)
    finetune = FineTuneWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment")
    viewer.window.add_dock_widget(finetune, name="Fine-tune", tabify=True)
    registry = get_registry()
    wait(app, lambda: False, 1.0)  # let the window settle
    beat = Heartbeat()
    beat.start()  # noise floor of this machine: the same heartbeat with nothing running
    wait(app, lambda: False, 3.0)
    idle = beat.stop()
    print(f"idle: max stall {idle:.0f} ms, p99 {beat.percentile(99):.0f} ms")

    # --- first tile on a 2D 512x512 image ------------------------------------------------------
    em = read_image(samples / "em_2d.tif")
    viewer.add_image(em.data, name="em_2d")
    registry.current = registry.add_model(model_for("em-membranes-2d", 2, "membranes"))
    segment.device_combo.setCurrentIndex(segment.device_combo.findData("cpu"))
    segment.output_combo.setCurrentText("binary / classes")
    segment.image_combo.setCurrentText("em_2d")
    for _ in range(2):  # the first run also pays one-off imports
        segment.segment()
        wait(app, lambda: segment.worker is None, 120)
    first_tile = segment.first_tile_seconds or float("nan")

    # --- Segment on a 3D stack -----------------------------------------------------------------
    cells = read_image(samples / "cells_3d.tif")
    labels = read_image(samples / "cells_3d_labels.tif").data
    viewer.add_image(cells.data, name="cells_3d", scale=cells.voxel_size)
    viewer.dims.set_point(0, 16)
    registry.current = registry.add_model(model_for("cells-3d", 3, "foreground_boundary"))
    segment.image_combo.setCurrentText("cells_3d")
    segment.output_combo.setCurrentText("instances")
    t0 = time.perf_counter()
    segment.segment()  # creates the labels layer (napari's own cost), then starts the worker
    click_ms = (time.perf_counter() - t0) * 1000
    beat.start()
    finished = wait(app, lambda: segment.worker is None, args.segment_seconds)
    if not finished:
        segment.cancel()
        wait(app, lambda: segment.worker is None, 120)
    stall_segment = beat.stop()
    p99_segment = beat.percentile(99)
    print(f"segment: {'finished' if finished else 'cancelled'} after "
          f"{time.perf_counter() - t0:.1f} s, {segment._run['done']}/{segment._run['total']} tiles, "
          f"click handler {click_ms:.0f} ms, max stall {stall_segment:.0f} ms, p99 {p99_segment:.0f} ms")

    # --- Fine-tune on the stack ----------------------------------------------------------------
    layer = viewer.add_labels(labels, name="cells_3d corrected", scale=cells.voxel_size)
    layer.metadata["napari_unet_corrected_slices"] = [8, 16, 24]
    finetune.image_combo.setCurrentText("cells_3d")
    finetune.labels_combo.setCurrentText("cells_3d corrected")
    finetune.time_spin.setValue(int(args.finetune_seconds))
    finetune.iterations_spin.setValue(0)
    finetune.device_combo.setCurrentIndex(finetune.device_combo.findData("cpu"))
    finetune.in_subprocess = args.finetune_in_subprocess
    if args.nice is not None:
        finetune.subprocess_nice = args.nice
    t0 = time.perf_counter()
    finetune.fine_tune()
    click_ms = (time.perf_counter() - t0) * 1000
    beat.start()
    wait(app, lambda: finetune.worker is None, args.finetune_seconds + 120)
    stall_finetune = beat.stop()
    p99_finetune = beat.percentile(99)
    stats = finetune.last_stats
    print(f"fine-tune ({'child process' if args.finetune_in_subprocess else 'thread'}): "
          f"{stats.iteration if stats else 0} iterations in "
          f"{time.perf_counter() - t0:.1f} s, click handler {click_ms:.0f} ms, "
          f"max stall {stall_finetune:.0f} ms, p99 {p99_finetune:.0f} ms")
    print(f"torch threads {torch.get_num_threads()}")
    viewer.close()
    print(f"max_stall_ms_segment={stall_segment:.0f} max_stall_ms_finetune={stall_finetune:.0f} "
          f"first_tile_s={first_tile:.1f}")


if __name__ == "__main__":
    main()
