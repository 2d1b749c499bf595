"""Nothing lost: napari is killed (SIGKILL) while the user paints; a new napari restores the work.

Each trial:

1. a child process opens ``sample_data/nuclei_3d.tif`` in napari with the Segment, Edit and
   Fine-tune docks and a labels layer, and paints strokes (brush, 3-8 dabs each) at random
   places and random times (every 30-400 ms); every third trial also runs Segment (the shipped
   nuclei-3d model, whole stack) and every third a Fine-tune, while painting goes on. Each stroke
   (its voxels, value and time) is appended to a log as napari commits it;
2. the parent kills the child with SIGKILL at a random moment, 5-15 s after painting began
   (15-25 s in the fine-tune trials: the fine-tune's preparation takes ~10 s here);
3. a new process opens the same image (the Segment dock open); the dock offers the unsaved
   labels (answered Yes) and restores them; it saves what it restored and the time it took.

Lost voxels: voxels painted by strokes that ended more than 2 s before the kill whose restored
value is neither the last such stroke's value nor the value of a later stroke (which may or may
not have reached the journal). Each trial has its own cache folder (``NAPARI_UNET_CACHE_DIR``).

Run under a display, niced (each trial starts napari twice, ~20-30 s a trial)::

    nice -n 10 xvfb-run -a python benchmarks/bench_crash.py --trials 20

Last line: ``trials=N lost_voxels=N max_journal_lag_s=X restore_s=Y`` (max lag: the longest
time from a change to its journal commit, as the children reported it; restore_s: the slowest
restore, from opening the image to the labels back in the layer). The line before it says what
the journal cost: bytes written per hour of this (fast) painting, the journal's size on disk,
and the CPU share of the writer thread and of the main-thread timer.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "sample_data" / "nuclei_3d.tif"
MODES = ("paint", "segment", "finetune")
OLD_S = 2.0


# ----------------------------------------------------------------------------------------------
# the child: paint until killed
# ----------------------------------------------------------------------------------------------

def _plugin() -> str:
    from napari_unet._widgets._launch import PLUGIN

    return PLUGIN


def _viewer_with_docks(path: Path, finetune: bool = True):
    import napari

    from napari_unet._widgets._edit import EditWidget
    from napari_unet._widgets._finetune import FineTuneWidget
    from napari_unet._widgets._segment import SegmentWidget

    viewer = napari.Viewer(show=True)
    docks = {"segment": SegmentWidget(viewer), "edit": EditWidget(viewer)}
    if finetune:
        docks["finetune"] = FineTuneWidget(viewer)
    for name, dock in docks.items():
        viewer.window.add_dock_widget(dock, name=name)
    return viewer, docks


def child(args: argparse.Namespace) -> None:
    import torch
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_unet._widgets._journal import install_journal
    from napari_unet._widgets._state import SOURCE_KEY
    from napari_unet.engine.live import labels_name

    torch.set_num_threads(2)
    rng = np.random.default_rng(args.seed)
    viewer, docks = _viewer_with_docks(args.image)
    image = viewer.open(str(args.image), plugin=_plugin())[0]
    shape = image.data.shape
    labels = viewer.add_labels(np.zeros(shape, np.uint32), name=labels_name(image.name),
                               metadata={SOURCE_KEY: str(args.image)})
    labels.brush_size = 5
    manager = install_journal(viewer)
    log = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def record(**line) -> None:  # one write(): a SIGKILL leaves whole lines
        os.write(log, (json.dumps(line) + "\n").encode())

    def on_paint(event) -> None:
        flat, values = [], []
        for atom in event.value:
            if hasattr(atom, "slice_key"):  # napari's masked atom: a box and a mask
                box = np.indices([s.stop - s.start for s in atom.slice_key])
                box = [b + s.start for b, s in zip(box, atom.slice_key)]
                mask = np.ones(box[0].shape, bool) if atom.mask is None else atom.mask
                indices, new = tuple(b[mask] for b in box), atom.new_value
            else:
                indices, _, new = atom
            idx = np.ravel_multi_index(tuple(np.asarray(i) for i in indices), shape)
            flat.append(idx)
            values.append(np.broadcast_to(np.asarray(new), idx.shape))
        stats = dict(manager.stats)
        record(t=time.time(), flat=np.concatenate(flat).tolist(),
               values=np.concatenate(values).tolist(), lag=manager.max_lag, **stats,
               cpu=time.process_time())

    labels.events.paint.connect(on_paint)

    def stroke() -> None:
        z = int(rng.integers(0, shape[0]))
        point = rng.uniform(5, np.array(shape[1:]) - 5)
        value = int(rng.integers(1, 60))
        with labels.block_history():  # one stroke: one undo step, one paint event
            for _ in range(int(rng.integers(3, 9))):
                point = np.clip(point + rng.normal(0, 3, 2), 0, np.array(shape[1:]) - 1)
                labels.paint((z, *point), value)
        QTimer.singleShot(int(rng.integers(30, 400)), stroke)

    def start_segment() -> None:
        segment = docks["segment"]
        segment.registry.current = "nuclei-3d"
        segment.image_combo.setCurrentText(image.name)
        segment.segment()
        record(event="segment", t=time.time())

    def start_finetune() -> None:
        finetune = docks["finetune"]
        finetune.registry.current = "nuclei-3d"
        finetune.data.image_combo.setCurrentText(image.name)
        finetune.data.labels_combo.setCurrentText(labels.name)
        finetune.time_spin.setValue(120)
        finetune.config_overrides = {"batch_size": 1}
        finetune.fine_tune()
        record(event="finetune", t=time.time())

        def report() -> None:  # what the dock says, and whether its weights are kept yet
            rescue = getattr(finetune, "rescue", None)
            record(finetune_status=finetune.status.text(), t=time.time(),
                   checkpoints=rescue.saves if rescue is not None else 0)

        timer = QTimer(finetune)
        timer.timeout.connect(report)
        timer.start(1000)

    QApplication.processEvents()
    record(ready=time.time())
    QTimer.singleShot(0, stroke)
    if args.mode == "segment":
        QTimer.singleShot(500, start_segment)
    elif args.mode == "finetune":
        QTimer.singleShot(1500, start_finetune)  # after a few corrected slices
    import napari

    napari.run()


# ----------------------------------------------------------------------------------------------
# the new process: restore
# ----------------------------------------------------------------------------------------------

def restore(args: argparse.Namespace) -> None:
    from qtpy.QtWidgets import QApplication

    from napari_unet._widgets import _journal
    from napari_unet._widgets._state import corrected_slices
    from napari_unet.engine.live import labels_name

    asked = []
    _journal.ask_restore = lambda parent, text: asked.append(text) or True
    viewer, docks = _viewer_with_docks(args.image, finetune=False)
    recovered = [k for k in docks["segment"].registry.keys() if k.endswith("(recovered)")]
    start = time.perf_counter()
    image = viewer.open(str(args.image), plugin=_plugin())[0]
    name = labels_name(image.name)
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:
        QApplication.processEvents()
        if name in viewer.layers or (not asked and time.perf_counter() - start > 3):
            break
        time.sleep(0.002)
    seconds = time.perf_counter() - start
    out = {"asked": len(asked), "restore_s": seconds, "recovered_models": recovered}
    if name in viewer.layers:
        layer = viewer.layers[name]
        np.save(args.out + ".npy", np.asarray(layer.data))
        out["corrected"] = [int(z) if not isinstance(z, (tuple, list)) else list(z)
                            for z in corrected_slices(layer)]
    Path(args.out + ".json").write_text(json.dumps(out))
    viewer.close()


# ----------------------------------------------------------------------------------------------
# the parent
# ----------------------------------------------------------------------------------------------

def lost_voxels(strokes: list[dict], kill: float, restored: np.ndarray | None,
                shape: tuple[int, ...]) -> int:
    """Voxels of strokes older than OLD_S at the kill whose restored value is neither the last
    old stroke's nor a newer stroke's."""
    last_old: dict[int, int] = {}
    newer: dict[int, set[int]] = {}
    for stroke in sorted(strokes, key=lambda s: s["t"]):
        old = stroke["t"] < kill - OLD_S
        for index, value in zip(stroke["flat"], stroke["values"]):
            if old:
                last_old[index] = value
            else:
                newer.setdefault(index, set()).add(value)
    if not last_old:
        return 0
    flat = np.zeros(int(np.prod(shape)), np.int64) if restored is None else restored.ravel()
    return sum(1 for index, value in last_old.items()
               if int(flat[index]) != value and int(flat[index]) not in newer.get(index, ()))


def run_trial(trial: int, work: Path, rng: np.random.Generator, image: Path) -> dict:
    mode = MODES[trial % len(MODES)]
    env = {**os.environ, "NAPARI_UNET_CACHE_DIR": str(work / f"cache{trial}"),
           "NAPARI_UNET_CONFIG_DIR": str(work / "config"), "OMP_NUM_THREADS": "2"}
    log = work / f"trial{trial}.log"
    me = [sys.executable, str(Path(__file__).resolve())]
    proc = subprocess.Popen(me + ["--child", "--mode", mode, "--seed", str(trial), "--log",
                                  str(log), "--image", str(image)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and b"ready" in log.read_bytes()):
        if proc.poll() is not None:
            raise RuntimeError(f"trial {trial}: the child exited early ({proc.returncode})")
        time.sleep(0.1)
    ready = time.time()
    # a fine-tune needs ~10 s to prepare here before its first weights: killed later
    time.sleep(float(rng.uniform(5, 15)) + (10.0 if mode == "finetune" else 0.0))
    kill = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    strokes = [line for line in lines if "flat" in line]
    out = str(work / f"restored{trial}")
    subprocess.run(me + ["--restore", "--image", str(image), "--out", out], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
    result = json.loads(Path(out + ".json").read_text())
    restored = np.load(out + ".npy") if Path(out + ".npy").exists() else None
    import tifffile

    shape = tifffile.imread(image).shape
    last = strokes[-1] if strokes else {}
    cache = work / f"cache{trial}" / "journal"
    disk = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) if cache.exists() else 0
    return {"trial": trial, "mode": mode, "strokes": len(strokes),
            "old_strokes": sum(s["t"] < kill - OLD_S for s in strokes),
            "painting_s": kill - ready, "lost": lost_voxels(strokes, kill, restored, shape),
            "lag": last.get("lag", 0.0), "restore_s": result["restore_s"],
            "asked": result["asked"], "recovered_models": result["recovered_models"],
            "bytes": last.get("bytes", 0), "writer_cpu_s": last.get("writer_cpu_s", 0.0),
            "main_s": last.get("main_s", 0.0), "max_main_s": last.get("max_main_s", 0.0),
            "disk": disk,
            "events": [line["event"] for line in lines if "event" in line]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--image", type=Path, default=IMAGE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--restore", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="paint", help=argparse.SUPPRESS)
    parser.add_argument("--log", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.restore:
        return restore(args)
    rng = np.random.default_rng(args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_crash.") as tmp:
        for trial in range(args.trials):
            r = run_trial(trial, Path(tmp), rng, args.image)
            results.append(r)
            print(f"trial {trial:2d} {r['mode']:8s} painted {r['painting_s']:4.1f} s, "
                  f"{r['strokes']:3d} strokes ({r['old_strokes']} older than {OLD_S:g} s) "
                  f"lost={r['lost']} lag={r['lag']:.2f} s restore={r['restore_s']:.2f} s "
                  f"asked={r['asked']} {' '.join(r['events'])} "
                  f"recovered models: {r['recovered_models'] or '-'}", flush=True)
    painting = sum(r["painting_s"] for r in results)
    written = sum(r["bytes"] for r in results)
    cpu = sum(r["writer_cpu_s"] for r in results)
    main_s = sum(r["main_s"] for r in results)
    strokes = sum(r["strokes"] for r in results)
    print(f"cost: {written / painting * 3600 / 1e6:.1f} MB written per hour of painting "
          f"({strokes / painting * 60:.0f} strokes/min), journal on disk at most "
          f"{max(r['disk'] for r in results) / 1e3:.0f} kB, writer thread "
          f"{100 * cpu / painting:.2f}% of a core, main thread {100 * main_s / painting:.3f}% "
          f"(longest tick {1e3 * max(r['max_main_s'] for r in results):.1f} ms); median "
          f"journal lag {np.median([r['lag'] for r in results]):.2f} s, median restore "
          f"{np.median([r['restore_s'] for r in results]):.2f} s")
    tuned = [r for r in results if r["mode"] == "finetune"]
    print(f"fine-tune trials whose weights came back as a '(recovered)' model: "
          f"{sum(bool(r['recovered_models']) for r in tuned)} of {len(tuned)}")
    print(f"trials={len(results)} lost_voxels={sum(r['lost'] for r in results)} "
          f"max_journal_lag_s={max(r['lag'] for r in results):.2f} "
          f"restore_s={max(r['restore_s'] for r in results):.2f}")


if __name__ == "__main__":
    main()
