"""ONNX fp32 vs onnxruntime dynamic INT8 quantisation of the shipped models, on the sample data.

For each shipped model: export to ONNX (``napari-unet export --format onnx``), quantise the
weights to int8 (``onnxruntime.quantization.quantize_dynamic``), run both on the model's sample
image (3D: the first 32 slices) in one CPU thread, and compare speed and the thresholded labels.
INT8 export is offered only if it is faster and the labels agree on >= 99% of the voxels for
every model. Last line: ``int8_speedup_min=... int8_label_agreement_min=...``.

    OMP_NUM_THREADS=1 python benchmarks/bench_onnx_int8.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from napari_unet.io.readers import read_image
from napari_unet.labels import instances
from napari_unet.model.normalization import fit_normalizer
from napari_unet.zoo.loading import load_model
from napari_unet.zoo.onnx import export_onnx, session

SAMPLES = {"em-membranes-2d": "em_2d", "nuclei-2d": "nuclei_2d", "nuclei-3d": "nuclei_3d",
           "cells-3d": "cells_3d"}
ROOT = Path(__file__).resolve().parent.parent


def best_time(path: Path, x: np.ndarray, repeats: int = 3) -> tuple[np.ndarray, float]:
    runner = session(path, threads=1)
    name = runner.get_inputs()[0].name
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = runner.run(None, {name: x})[0]
        best = min(best, time.perf_counter() - start)
    return out, best


def labels(model, logits: np.ndarray) -> np.ndarray:
    tensor = torch.from_numpy(logits[0])
    probs = torch.softmax(tensor, 0) if model.task == "semantic" else torch.sigmoid(tensor)
    return instances.to_semantic(probs.numpy(), model.task, threshold=0.5)


def main() -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.set_num_threads(1)
    speedups, agreements = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, sample in SAMPLES.items():
            model = load_model(name)
            fp32 = export_onnx(model, Path(tmp) / f"{name}.onnx")
            int8 = Path(tmp) / f"{name}.int8.onnx"
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
            image = read_image(ROOT / "sample_data" / f"{sample}.tif").data
            if model.spatial_dims == 3:
                image = image[:32]
            x = fit_normalizer(image, model.normalization)(image)[None, None]
            out32, t32 = best_time(fp32, x)
            out8, t8 = best_time(int8, x)
            agree = float(np.mean(labels(model, out32) == labels(model, out8)))
            speedups.append(t32 / t8)
            agreements.append(agree)
            print(f"{name} {tuple(x.shape[2:])}: fp32 {t32:.3f} s, int8 {t8:.3f} s "
                  f"(speed-up {t32 / t8:.2f}x), labels agree on {agree:.2%}, file "
                  f"{fp32.stat().st_size / 1e6:.2f} -> {int8.stat().st_size / 1e6:.2f} MB", flush=True)
    print(f"int8_speedup_min={min(speedups):.2f} int8_label_agreement_min={min(agreements):.4f}")


if __name__ == "__main__":
    main()
