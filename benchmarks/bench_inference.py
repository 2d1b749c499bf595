"""Our tiled engine (auto precision) vs MONAI ``sliding_window_inference`` vs one untiled pass.

Three cases, each method in its own subprocess (so peak memory, ru_maxrss, is its own):

* ``3d``: a 3D UNet (base 16, depth 4, batch norm, random weights with non-trivial statistics)
  on a smooth random 64x256x256 volume (the bench of the first wave);
* ``nuclei-3d``: the shipped nuclei-3d model on a 128x256x256 volume (the nuclei sample, tiled);
* ``em-2d``: the shipped em-membranes-2d model on a 2048x2048 image (the EM sample, tiled).

Methods: ``ours`` (auto precision and plan), MONAI as its users run it (fp32, roi 64x128x128 /
256x256, batch 4, overlap 0.25, gaussian), one untiled fp32 pass (the reference), one untiled
bf16 pass, and ours forced onto small tiles in fp32 and in bf16 (seams and label agreement).
The same run times a bf16 2048x2048 matmul (the machine's peak) and counts the network's FLOPs
with ``torch.utils.flop_counter``. Run::

    python benchmarks/bench_inference.py            # add --device cuda on a GPU machine

Last line: ``speedup_3d_vs_monai=X.XX speedup_2d_vs_monai=X.XX memory_vs_monai=X.XX
peak_fraction=X.XX seam_fp32=X.Xe-X label_agreement_bf16=X.XXXX read_per_written=X.XX``
(one line). ``speedup_3d`` is the smaller of the two 3D cases, ``memory`` the larger ratio of
the two 3D cases (in 2D both engines stay near the process's baseline; its ratio is printed on
the case's line), ``peak_fraction`` the lowest case, ``read_per_written`` the planner's worst.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = ("3d", "nuclei-3d", "em-2d")
METHODS = ("untiled", "untiled_bf16", "monai", "ours", "ours_fp32_tiled", "ours_bf16_tiled")
#: tiles that force seams in y and x (3 tiles per axis in 3D): core + halo must stay below the axis
FORCED_TILES = {"3d": (64, 224, 224), "nuclei-3d": (128, 224, 224), "em-2d": (512, 512)}
MONAI_ROI = {"3d": (64, 128, 128), "nuclei-3d": (64, 128, 128), "em-2d": (256, 256)}


def random_3d_model():
    import torch

    from napari_unet.model.checkpoint import SegmentationModel
    from napari_unet.model.config import UNetConfig
    from napari_unet.model.unet import UNet

    torch.manual_seed(0)
    network = UNet(UNetConfig(spatial_dims=3, base_channels=16, depth=4, norm="batch"))
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return SegmentationModel(network.eval(), normalization={"mode": "none"})


def load_case(case: str):
    """(model, normalised float32 image) of a case; normalisation is outside every timing."""
    import dataclasses

    import tifffile

    from napari_unet.model.normalization import fit_normalizer
    from napari_unet.zoo.loading import load_model

    if case == "3d":
        from scipy import ndimage

        volume = ndimage.gaussian_filter(np.random.default_rng(0).random((64, 256, 256), dtype=np.float32), 2)
        return random_3d_model(), (volume - volume.min()) / (volume.max() - volume.min())
    name, sample, reps, shape = {
        "nuclei-3d": ("nuclei-3d", "nuclei_3d", (2, 3, 3), (128, 256, 256)),
        "em-2d": ("em-membranes-2d", "em_2d", (4, 4), (2048, 2048)),
    }[case]
    model = load_model(name)
    image = np.tile(tifffile.imread(ROOT / "sample_data" / f"{sample}.tif"), reps)
    image = image[tuple(slice(0, n) for n in shape)]
    image = fit_normalizer(image, model.normalization)(image)
    return dataclasses.replace(model, normalization={"mode": "none"}), np.ascontiguousarray(image)


def _activation(logits, task: str):
    import torch

    return torch.softmax(logits, 1) if task == "semantic" else torch.sigmoid(logits)


def run_method(case: str, method: str, device: str, out_path: str) -> None:
    """Child process: one method on one case; saves probabilities, prints JSON stats."""
    import torch

    from napari_unet.engine.planning import make_plan
    from napari_unet.engine.predict import predict_probabilities
    from napari_unet.model.unet import fuse_for_inference
    from napari_unet.progress import drain

    model, image = load_case(case)
    network = model.network.eval().to(device)
    stats: dict = {}
    start = time.perf_counter()
    if method.startswith("ours"):
        precision = {"ours": "auto", "ours_fp32_tiled": "fp32", "ours_bf16_tiled": "bf16"}[method]
        tile = None if method == "ours" else FORCED_TILES[case]
        plan = make_plan(image, model, device=device, precision=precision, tile_shape=tile)
        probabilities = drain(predict_probabilities(image, model, device=device, precision=precision,
                                                    plan=plan, dtype=np.float32))
        stats.update(read_per_written=plan.read_per_written, tiles=plan.n_tiles)
    else:
        x = torch.from_numpy(image)[None, None].to(device)
        with torch.inference_mode():
            if method == "monai":
                from monai.inferers import sliding_window_inference

                logits = sliding_window_inference(x, roi_size=MONAI_ROI[case], sw_batch_size=4,
                                                  predictor=network, overlap=0.25, mode="gaussian")
            elif method == "untiled_bf16":
                fast = fuse_for_inference(network).to(
                    memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)
                with torch.autocast(x.device.type, dtype=torch.bfloat16):
                    logits = fast(x).float()
            else:
                logits = network(x)
            probabilities = _activation(logits, model.task)[0].float().cpu().numpy()
    stats["seconds"] = time.perf_counter() - start
    stats["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if method == "ours":
        stats["flops_per_voxel"] = flops_per_voxel(model)
    np.save(out_path, probabilities.astype(np.float32))
    print(json.dumps(stats))


def first_tile_seconds(device: str) -> float:
    """Seconds from the call to the first finished slice: em-membranes-2d on a 20x1024x1024
    stack, started at the slice on screen (what the Segment dock does)."""
    import tifffile

    from napari_unet.engine.predict import predict_probabilities
    from napari_unet.zoo.loading import load_model

    model = load_model("em-membranes-2d")
    stack = np.stack([np.tile(tifffile.imread(ROOT / "sample_data" / "em_2d.tif"), (2, 2))] * 20)
    start = time.perf_counter()
    job = predict_probabilities(stack, model, device=device, start_at=(10, 512, 512))
    for update in job:
        if update.region is not None:
            seconds = time.perf_counter() - start
            job.close()
            return seconds
    raise RuntimeError("no tile finished")


def forward_paths(device: str) -> list[str]:
    """Plain forward vs slab-wise ``forward_low_memory`` of the shipped models, bf16 autocast and
    channels-last, on tiles of a few million voxels (the CPU engine runs the slab-wise one)."""
    import torch

    from napari_unet.model.unet import fuse_for_inference
    from napari_unet.zoo.loading import load_model

    lines = []
    for name, shape in (("em-membranes-2d", (4, 1, 512, 512)), ("nuclei-3d", (1, 1, 64, 128, 128))):
        model = load_model(name)
        layout = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        network = fuse_for_inference(model.network).to(device=device, memory_format=layout)
        x = torch.randn(*shape, device=device).contiguous(memory_format=layout)
        seconds = {}
        for path, run in (("plain", network), ("slab-wise", lambda t: network.forward_low_memory(t, 2**20))):
            with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16):
                run(x)
                start = time.perf_counter()
                for _ in range(3):
                    run(x)
                seconds[path] = (time.perf_counter() - start) / 3
        lines.append(f"{name} {tuple(shape)}: plain {seconds['plain']:.3f} s, slab-wise "
                     f"{seconds['slab-wise']:.3f} s ({seconds['plain'] / seconds['slab-wise']:.2f}x)")
    return lines


def flops_per_voxel(model) -> float:
    """FLOPs of one forward pass per input voxel (counted on a moderate input)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    shape = (1, 1, 32, 128, 128) if model.spatial_dims == 3 else (1, 1, 512, 512)
    x = torch.zeros(shape)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.network.eval()(x)
    return counter.get_total_flops() / float(np.prod(shape))


def bf16_matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of a bf16 ``a @ a`` (the machine's practical peak)."""
    import torch

    a = torch.randn(size, size, dtype=torch.bfloat16)
    a @ a
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def planner_ratios() -> dict[str, float]:
    """Voxels computed per voxel written on a 200x1024x1024 volume, shipped 3D models."""
    from napari_unet.bigdata.store import DEFAULT_MAX_TILE_BYTES
    from napari_unet.engine.planning import make_plan
    from napari_unet.zoo.loading import load_model

    class Shape:
        shape, ndim = (200, 1024, 1024), 3

    ratios = {}
    for name in ("nuclei-3d", "cells-3d"):
        model = load_model(name)
        for where, max_bytes in (("in memory", None), ("streamed", DEFAULT_MAX_TILE_BYTES)):
            plan = make_plan(Shape(), model, device="cpu", max_bytes=max_bytes)
            ratios[f"{name} {where}"] = plan.read_per_written
            print(f"planner {name:9s} {where:9s}: tile {plan.tile_shape}, core {plan.core}, "
                  f"{plan.n_tiles} tiles, {plan.read_per_written:.2f} read/written", flush=True)
    return ratios


def agreement(a: np.ndarray, b: np.ndarray, task: str) -> float:
    if task == "semantic":
        return float(np.mean(a.argmax(0) == b.argmax(0)))
    return float(np.mean((a > 0.5) == (b > 0.5)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("CASE", "METHOD"))  # or: first-tile -
    parser.add_argument("--out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "first-tile":
            print(json.dumps({"seconds": first_tile_seconds(args.device)}))
        elif args.child[0] == "paths":
            print(json.dumps({"lines": forward_paths(args.device)}))
        else:
            run_method(*args.child, args.device, args.out)
        return
    peak = bf16_matmul_peak()
    print(f"bf16 2048^2 matmul: {peak:.0f} GFLOP/s", flush=True)
    summary: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            results = {}
            for method in METHODS:
                out = str(Path(tmp) / f"{case}-{method}.npy")
                completed = subprocess.run(
                    [sys.executable, __file__, "--child", case, method, "--out", out, "--device", args.device],
                    check=True, capture_output=True, text=True)
                results[method] = json.loads(completed.stdout.strip().splitlines()[-1])
                results[method]["probabilities"] = np.load(out)
                print(f"{case:9s} {method:16s} {results[method]['seconds']:7.2f} s  "
                      f"peak RSS {results[method]['peak_gb']:.2f} GB", flush=True)
            task = "foreground"  # all three cases: sigmoid channels
            reference = results["untiled"]["probabilities"]
            ours = results["ours"]
            voxels = reference[0].size
            gflops = ours["flops_per_voxel"] * voxels * ours["read_per_written"] / ours["seconds"] / 1e9
            summary[case] = {
                "speedup": results["monai"]["seconds"] / ours["seconds"],
                "memory": ours["peak_gb"] / results["monai"]["peak_gb"],
                "gflops": gflops,
                "seam_fp32": float(np.abs(results["ours_fp32_tiled"]["probabilities"] - reference).max()),
                "bf16_tiled_vs_untiled": agreement(results["ours_bf16_tiled"]["probabilities"],
                                                   results["untiled_bf16"]["probabilities"], task),
                "bf16_vs_fp32": agreement(ours["probabilities"], reference, task),
                "monai_vs_untiled": agreement(results["monai"]["probabilities"], reference, task),
            }
            s = summary[case]
            print(f"{case:9s} speedup vs MONAI {s['speedup']:.2f}, memory {s['memory']:.2f}, "
                  f"{gflops:.0f} GFLOP/s ({gflops / peak:.2f} of peak), seam fp32 {s['seam_fp32']:.1e}, "
                  f"bf16 tiled/untiled labels {s['bf16_tiled_vs_untiled']:.4f}, bf16/fp32 "
                  f"{s['bf16_vs_fp32']:.4f} (MONAI/untiled {s['monai_vs_untiled']:.4f}); "
                  f"ours {ours['tiles']} tiles, {ours['read_per_written']:.2f} read/written", flush=True)
    completed = subprocess.run([sys.executable, __file__, "--child", "first-tile", "-", "--device", args.device],
                               check=True, capture_output=True, text=True)
    first = json.loads(completed.stdout.strip().splitlines()[-1])["seconds"]
    print(f"first slice of a 20x1024x1024 stack (em-membranes-2d, start at the view): {first:.2f} s",
          flush=True)
    completed = subprocess.run([sys.executable, __file__, "--child", "paths", "-", "--device", args.device],
                               check=True, capture_output=True, text=True)
    for line in json.loads(completed.stdout.strip().splitlines()[-1])["lines"]:
        print(f"forward paths, bf16 channels-last: {line}", flush=True)
    ratios = planner_ratios()
    three_d = [summary[c]["speedup"] for c in ("3d", "nuclei-3d") if c in summary]
    two_d = [summary[c]["speedup"] for c in ("em-2d",) if c in summary]
    print(f"speedup_3d_vs_monai={min(three_d) if three_d else float('nan'):.2f} "
          f"speedup_2d_vs_monai={min(two_d) if two_d else float('nan'):.2f} "
          f"memory_vs_monai={max([summary[c]['memory'] for c in ('3d', 'nuclei-3d') if c in summary] or [float('nan')]):.2f} "
          f"peak_fraction={min(s['gflops'] for s in summary.values()) / peak:.2f} "
          f"seam_fp32={max(s['seam_fp32'] for s in summary.values()):.1e} "
          f"label_agreement_bf16={min(s['bf16_tiled_vs_untiled'] for s in summary.values()):.4f} "
          f"read_per_written={max(ratios.values()):.2f}")


if __name__ == "__main__":
    main()
