"""Streamed inference on a volume larger than it should ever take in memory (CPU).

1. A synthetic uint16 volume of ``--volume-gb`` (default 4.0 GB) is written chunk by chunk to
   an uncompressed zarr in ``--cache-dir`` (reused while present, so reruns skip it).
2. It is streamed through the tiled engine (:func:`napari_unet.bigdata.streaming.predict_to_zarr`)
   into a zarr output (labels) with a very cheap 2-layer conv net, so the run measures the
   engine's memory and I/O, not network compute: a fixed 3x3x3 mean filter (``avg_pool3d``,
   i.e. a conv with uniform weights; PyTorch's CPU ``conv3d`` with one channel runs at only
   ~7 Mvox/s here) followed by a 1x1x1 conv. It goes through the same tile plan, halo, lazy
   reads, whole-volume normalisation and chunk-aligned writes as any model.
3. A real small 3D UNet (base 2, depth 2) streams a ``--crop-gb`` (0.25 GB) crop, in this
   process and then on a dask LocalCluster (2 workers x 1 thread), for throughput; the
   per-worker peak memory is printed.

Every stage runs in its own subprocess so its peak RSS (ru_maxrss) is its own. The big data is
deleted at the end unless ``--keep``. Run (about 6-9 minutes on 2 cores)::

    python benchmarks/bench_bigdata.py

Last line (the big run): ``volume_gb=X.X peak_rss_gb=X.XX mvox_per_s=X.XX``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

YX = (2048, 2048)
CHUNK = (32, 512, 512)
CROP_YX = (1024, 1024)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --- models --------------------------------------------------------------------------------


def cheap_model():
    """A 2-layer conv net the engine accepts: 3x3x3 mean filter, then a 1x1x1 conv (+ sigmoid)."""
    import torch
    import torch.nn.functional as F

    from napari_unet.model.checkpoint import SegmentationModel
    from napari_unet.model.config import UNetConfig
    from napari_unet.model.unet import UNet

    class CheapNet(UNet):
        # config of a depth-1 UNet: halo 2 >= this net's receptive radius 1, divisor 1
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            smooth = F.avg_pool3d(x, 3, stride=1, padding=1)  # zero padding, like conv3d
            # the 1x1x1 head conv (1 channel in and out) as the affine map it is
            return smooth.mul_(self.head.weight.reshape(())).add_(self.head.bias.reshape(()))

        def forward_low_memory(self, x: torch.Tensor, slab_voxels: int = 0) -> torch.Tensor:
            return self.forward(x)

    torch.manual_seed(0)
    network = CheapNet(UNetConfig(spatial_dims=3, base_channels=1, depth=1)).eval()
    with torch.no_grad():
        network.head.weight.fill_(8.0)
        network.head.bias.fill_(-4.0)
    return SegmentationModel(network, name="cheap-2-layer")


def small_unet():
    import torch

    from napari_unet.model.checkpoint import SegmentationModel
    from napari_unet.model.config import UNetConfig
    from napari_unet.model.unet import UNet

    torch.manual_seed(0)
    network = UNet(UNetConfig(spatial_dims=3, base_channels=2, depth=2, norm="batch"))
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    return SegmentationModel(network.eval(), name="unet-b2-d2")


# --- data ----------------------------------------------------------------------------------


def volume_shape(gigabytes: float, yx: tuple[int, int] = YX) -> tuple[int, int, int]:
    depth = math.ceil(gigabytes * 1e9 / (2 * yx[0] * yx[1]) / CHUNK[0]) * CHUNK[0]
    return (depth, *yx)


def make_volume(path: Path, shape: tuple[int, ...]) -> float:
    """Write a smooth pattern + noise chunk by chunk (uncompressed); returns seconds (0 if reused)."""
    import zarr

    if path.exists():
        try:
            existing = zarr.open_array(str(path), mode="r")
            if tuple(existing.shape) == shape and existing.attrs.get("complete"):
                return 0.0
        except Exception:  # noqa: BLE001 - damaged: rewrite
            pass
        shutil.rmtree(path)
    start = time.perf_counter()
    array = zarr.create_array(str(path), shape=shape, chunks=CHUNK, dtype="uint16",
                              compressors=None, fill_value=0)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 400, size=CHUNK, dtype=np.uint16)
    for z0 in range(0, shape[0], CHUNK[0]):
        z = np.arange(z0, min(shape[0], z0 + CHUNK[0]))
        pz = (1000 + 800 * np.sin(z / 23.0)).astype(np.uint16)
        for y0 in range(0, shape[1], CHUNK[1]):
            py = (1000 + 800 * np.sin(np.arange(y0, y0 + CHUNK[1]) / 37.0)).astype(np.uint16)
            for x0 in range(0, shape[2], CHUNK[2]):
                px = (1000 + 800 * np.cos(np.arange(x0, x0 + CHUNK[2]) / 41.0)).astype(np.uint16)
                block = pz[:, None, None] + py[None, :, None]
                block = block + px[None, None, :]
                block += noise[: len(z)]
                array[z0:z0 + len(z), y0:y0 + CHUNK[1], x0:x0 + CHUNK[2]] = block
                del block
    array.attrs["complete"] = True
    return time.perf_counter() - start


def make_crop(source: Path, path: Path, gigabytes: float) -> None:
    import zarr

    depth = max(1, round(gigabytes * 1e9 / (2 * CROP_YX[0] * CROP_YX[1])))
    shape = (depth, *CROP_YX)
    if path.exists():
        existing = zarr.open_array(str(path), mode="r")
        if tuple(existing.shape) == shape and existing.attrs.get("complete"):
            return
        shutil.rmtree(path)
    big = zarr.open_array(str(source), mode="r")
    crop = zarr.create_array(str(path), shape=shape, chunks=(32, 512, 512), dtype="uint16",
                             compressors=None, fill_value=0)
    for z0 in range(0, depth, 32):
        z1 = min(depth, z0 + 32)
        crop[z0:z1] = big[z0:z1, : CROP_YX[0], : CROP_YX[1]]
    crop.attrs["complete"] = True


# --- stages (each in its own process) ------------------------------------------------------


def stage_stream(source: str, output: str, which: str) -> dict:
    from napari_unet.bigdata.streaming import predict_to_zarr
    from napari_unet.io.lazy import open_lazy
    from napari_unet.progress import drain

    model = cheap_model() if which == "cheap" else small_unet()
    image = open_lazy(source)
    voxels = math.prod(image.data.shape)
    start = time.perf_counter()
    result = drain(predict_to_zarr(image.data, model, output, output="labels", device="cpu",
                                   overwrite=True, fuse=which != "cheap", input_path=source))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "mvox_per_s": voxels / seconds / 1e6, "tiles": result.tiles_total,
            "peak_rss_gb": _peak_rss_gb(), "shape": list(image.data.shape),
            "chunks": list(result.data.chunks)}


def stage_cluster(source: str, output: str, workers: int) -> dict:
    from napari_unet.bigdata.cluster import (
        dask_client,
        predict_to_zarr_distributed,
        worker_peak_rss,
    )
    from napari_unet.io.lazy import open_lazy
    from napari_unet.progress import drain

    model = small_unet()
    voxels = math.prod(open_lazy(source).data.shape)
    with dask_client(n_workers=workers, threads_per_worker=1, memory_limit="4GiB") as client:
        start = time.perf_counter()
        result = drain(predict_to_zarr_distributed(client, source, model, output, output="labels",
                                                   device="cpu", overwrite=True))
        seconds = time.perf_counter() - start
        peaks = worker_peak_rss(client)
    return {"seconds": seconds, "mvox_per_s": voxels / seconds / 1e6, "tiles": result.tiles_total,
            "worker_peak_rss_gb": sorted(v / 2**30 for v in peaks.values()),
            "client_peak_rss_gb": _peak_rss_gb()}


def run_stage(*args: str) -> dict:
    completed = subprocess.run([sys.executable, __file__, "--stage", *args], capture_output=True,
                               text=True, check=False)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout + completed.stderr)
        raise SystemExit(f"stage {args[0]} failed")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def du_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume-gb", type=float, default=4.0)
    parser.add_argument("--crop-gb", type=float, default=0.25)
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "napari_unet_bench"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-cluster", action="store_true", help="skip the LocalCluster run")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic volumes for reruns")
    parser.add_argument("--stage", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.stage:
        kind, *rest = args.stage
        if kind == "stream":
            stats = stage_stream(*rest)
        else:
            stats = stage_cluster(rest[0], rest[1], int(rest[2]))
        print(json.dumps(stats))
        return

    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(cache).free / 1e9
    shape = volume_shape(args.volume_gb)
    volume, crop = cache / "volume.zarr", cache / f"crop_{args.crop_gb:g}.zarr"
    outputs = [cache / "out_volume.zarr", cache / "out_crop.zarr", cache / "out_crop_cluster.zarr"]
    need_gb = 2 * 2 * math.prod(shape) / 1e9 * 0.8
    if not volume.exists() and free_gb < need_gb:
        raise SystemExit(f"not enough disk in {cache}: {free_gb:.1f} GB free, about {need_gb:.1f} GB needed")
    total_start = time.perf_counter()
    try:
        seconds = make_volume(volume, shape)
        volume_gb = 2 * math.prod(shape) / 1e9
        print(f"input: {volume} {shape} uint16, {du_gb(volume):.2f} GB on disk "
              f"({'written in %.0f s' % seconds if seconds else 'reused'})", flush=True)
        make_crop(volume, crop, args.crop_gb)

        big = run_stage("stream", str(volume), str(outputs[0]), "cheap")
        print(f"stream 2-layer conv net: {big['tiles']} tiles of chunk {big['chunks']}, "
              f"{big['seconds']:.0f} s, {big['mvox_per_s']:.2f} Mvox/s, peak RSS "
              f"{big['peak_rss_gb']:.2f} GB, output {du_gb(outputs[0]):.2f} GB", flush=True)

        small = run_stage("stream", str(crop), str(outputs[1]), "unet")
        print(f"stream small 3D UNet on crop {small['shape']} ({args.crop_gb:g} GB): "
              f"{small['tiles']} tiles, {small['seconds']:.0f} s, {small['mvox_per_s']:.2f} Mvox/s, "
              f"peak RSS {small['peak_rss_gb']:.2f} GB", flush=True)

        if not args.no_cluster:
            dist = run_stage("cluster", str(crop), str(outputs[2]), str(args.workers))
            peaks = ", ".join(f"{p:.2f}" for p in dist["worker_peak_rss_gb"])
            print(f"dask LocalCluster ({args.workers} workers x 1 thread), small 3D UNet on the crop: "
                  f"{dist['tiles']} tasks, {dist['seconds']:.0f} s, {dist['mvox_per_s']:.2f} Mvox/s, "
                  f"per-worker peak RSS [{peaks}] GB, client peak {dist['client_peak_rss_gb']:.2f} GB",
                  flush=True)
        print(f"total {time.perf_counter() - total_start:.0f} s")
        print(f"volume_gb={volume_gb:.1f} peak_rss_gb={big['peak_rss_gb']:.2f} "
              f"mvox_per_s={big['mvox_per_s']:.2f}")
    finally:
        for path in outputs:
            shutil.rmtree(path, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(volume, ignore_errors=True)
            shutil.rmtree(crop, ignore_errors=True)
            try:
                cache.rmdir()
            except OSError:
                pass


if __name__ == "__main__":
    main()
