"""Tiled inference vs MONAI sliding_window_inference vs one untiled forward pass (CPU).

Each method runs in its own subprocess on the same 3D UNet (base 16, depth 4, batch norm,
eval mode, random weights with non-trivial norm statistics) and the same 64x256x256 volume, so
peak memory (ru_maxrss) is measured per method. Run:

    python benchmarks/bench_inference.py

Last line: ``speedup_vs_monai=X.XX memory_vs_monai=X.XX vs_untiled=X.XX seam_max_abs=X.Xe-X``.
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

SHAPE = (64, 256, 256)


def build_network():
    import torch

    from napari_unet.models import UNet, UNetConfig

    torch.manual_seed(0)
    network = UNet(UNetConfig(spatial_dims=3, base_channels=16, depth=4, norm="batch"))
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return network.eval()


def make_volume() -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(0)
    volume = ndimage.gaussian_filter(rng.random(SHAPE, dtype=np.float32), 2)
    return (volume - volume.min()) / (volume.max() - volume.min())


def run_method(method: str, out_path: str) -> None:
    """Child process: run one method, save its probabilities, print JSON stats."""
    import torch

    network = build_network()
    volume = make_volume()
    start = time.perf_counter()
    if method == "ours":
        from napari_unet.checkpoint import SegmentationModel
        from napari_unet.inference import predict_probabilities
        from napari_unet.progress import drain

        model = SegmentationModel(network, normalization={"mode": "none"})
        probabilities = drain(predict_probabilities(volume, model, device="cpu", dtype=np.float32))[0]
    else:
        x = torch.from_numpy(volume)[None, None]
        with torch.inference_mode():
            if method == "monai":
                from monai.inferers import sliding_window_inference

                logits = sliding_window_inference(x, roi_size=(64, 128, 128), sw_batch_size=4,
                                                  predictor=network, overlap=0.25, mode="gaussian")
            else:
                logits = network(x)
            probabilities = torch.sigmoid(logits)[0, 0].numpy()
    seconds = time.perf_counter() - start
    np.save(out_path, probabilities.astype(np.float32))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": seconds, "peak_gb": peak_gb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["ours", "monai", "untiled"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        run_method(args.child, args.out)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("untiled", "monai", "ours"):
            out = str(Path(tmp) / f"{method}.npy")
            completed = subprocess.run([sys.executable, __file__, "--child", method, "--out", out],
                                       check=True, capture_output=True, text=True)
            results[method] = json.loads(completed.stdout.strip().splitlines()[-1])
            results[method]["probabilities"] = np.load(out)
            print(f"{method:8s} {results[method]['seconds']:7.2f} s  peak RSS {results[method]['peak_gb']:.2f} GB",
                  flush=True)
        reference = results["untiled"]["probabilities"]
        seam = float(np.abs(results["ours"]["probabilities"] - reference).max())
        monai_err = float(np.abs(results["monai"]["probabilities"] - reference).max())
    print(f"monai max abs difference to untiled: {monai_err:.1e}")
    speedup = results["monai"]["seconds"] / results["ours"]["seconds"]
    memory = results["ours"]["peak_gb"] / results["monai"]["peak_gb"]
    vs_untiled = results["ours"]["seconds"] / results["untiled"]["seconds"]
    print(f"speedup_vs_monai={speedup:.2f} memory_vs_monai={memory:.2f} "
          f"vs_untiled={vs_untiled:.2f} seam_max_abs={seam:.1e}")


if __name__ == "__main__":
    main()
