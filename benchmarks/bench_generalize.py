"""Robustness of the shipped models on data they never saw (issue 21, item 6).

For each shipped model, its held-out test split (``bench_models.load_splits``; never the
training or validation data) is scored unchanged and

* rescaled by 0.4x and 2.5x (image linearly, labels by nearest neighbour; the voxel size is
  set to match: the model's training voxel size / factor, else 1 / factor), which the
  post-processing sees (sizes relative to the stored object size, see
  ``napari_unet.labels.object_size``). ``--zoom`` says what the network sees (issue 21,
  item 3): ``none`` the rescaled objects as they are; ``given`` each tile resampled back to
  the training size (the object size read from the voxel size when the model has one, else
  given as the model's diameter x factor in px, as a user who knows it would); ``auto`` the
  object size estimated on each image (``--object-size auto``);
  the 2.5x rows of the 3D models see the central half in y and x only, and are compared with
  the unchanged central half (its own row);
* for a 3D model with a training voxel size, z alone rescaled by 0.5x and 2x (voxel size to
  match; with ``--zoom given`` the zoom comes from the voxel sizes, per axis);
* with gamma 0.5 and 2 (intensities min-max scaled to 0..1, raised, scaled back);
* with Gaussian noise of 10 % of the 1-99.8 percentile range added (seed 0);
* for nuclei-2d / nuclei-3d, the ``stardist_samples`` image of their kind.

Scores: object F1 at IoU 0.5 (objects pooled over images), for em-membranes-2d the pixel Dice
of the membrane mask, with the shipped post-processing (``segment`` with no overrides).

``--stitch`` also measures the z-stitching of a 2D model's instances on a stack (issue 21,
item 4): nuclei-2d, slice by slice, on the nuclei3d_1135 test slab (z 70-99) and the StarDist
3D sample, scored as 3D objects against their 3D labels, for several ``stitch_threshold``.

Affordable on a shared CPU (2 torch threads, ``nice -n 10``): the test splits are subsampled
(printed in each row): nuclei-2d fields 80, 85, 90, 95 of 80-99; em slices 24 and 27 of 24-29;
for the 2.5x rows of the 3D models the central half in y and x of the test slab.

Run::

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/bench_generalize.py [--models ...] [--stitch]
        [--zoom none|given|auto] [--rows unchanged rescaled ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import DATA, SPECS, load_splits  # noqa: E402

from napari_unet.engine.estimate import estimate_object_size, zoom_from_estimate  # noqa: E402
from napari_unet.engine.predict import predict_probabilities, probabilities_to_output, segment  # noqa: E402
from napari_unet.engine.resample import scale_for_model  # noqa: E402
from napari_unet.labels.metrics import match_instances  # noqa: E402
from napari_unet.progress import drain  # noqa: E402
from napari_unet.zoo.loading import load_model  # noqa: E402

KEYS = {"em-membranes-2d": "em", "nuclei-2d": "nuclei2d", "nuclei-3d": "nuclei3d",
        "cells-3d": "cells3d"}
SUBSAMPLE = {"nuclei2d": [0, 5, 10, 15], "em": [0, 3]}
FACTORS = (0.4, 2.5)
Z_FACTORS = (0.5, 2.0)
CENTRAL = " (central half in y, x)"


def _rescale(image: np.ndarray, truth: np.ndarray, factor: float, axes: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """``image`` and ``truth`` zoomed by ``factor`` on their last ``axes`` axes."""
    zoom = (1.0,) * (image.ndim - axes) + (factor,) * axes
    scaled = ndi.zoom(image.astype(np.float32), zoom, order=1)
    labels = ndi.zoom(truth, zoom, order=0)
    return scaled, labels


def _gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    unit = (image.astype(np.float32) - low) / max(high - low, 1e-6)
    return unit ** gamma * (high - low) + low


def _noise(image: np.ndarray, seed: int = 0) -> np.ndarray:
    low, high = np.percentile(image, (1, 99.8))
    rng = np.random.default_rng(seed)
    return image.astype(np.float32) + rng.normal(0, 0.1 * (high - low), image.shape).astype(np.float32)


def _central_half(array: np.ndarray) -> np.ndarray:
    y, x = array.shape[-2:]
    return array[..., y // 4: y // 4 + y // 2, x // 4: x // 4 + x // 2]


def zoom_for(model, image: np.ndarray, voxel_size, factor: float, mode: str):
    """The per-tile zoom of ``--zoom mode`` for one image rescaled by ``factor``."""
    if mode == "none" or (mode == "given" and factor == 1.0):
        return None
    if mode == "auto":
        diameter = drain(estimate_object_size(image, model, voxel_size=voxel_size, device="cpu"))
        return zoom_from_estimate(model, voxel_size, diameter)[0]
    if model.voxel_size is not None and voxel_size is not None:
        return scale_for_model(model, voxel_size)[0]  # read from the voxel size
    return scale_for_model(model, voxel_size, (model.object_size["diameter_voxels"] * factor, "px"))[0]


def score(model, images: list[np.ndarray], truths: list[np.ndarray],
          voxel_size: tuple[float, ...] | None, factor: float = 1.0, zoom: str = "none") -> float:
    """Object F1 at IoU 0.5 pooled over images, or (EM) pixel Dice of the membrane mask."""
    instances = SPECS[KEYS[model.name]].instances
    tp = n_pred = n_gt = inter = total = 0
    for image, truth in zip(images, truths):
        output = "instances" if instances else "labels"
        scale = zoom_for(model, image, voxel_size, factor, zoom)
        result = drain(segment(image, model, output=output, device="cpu", voxel_size=voxel_size,
                               scale=scale))
        if instances:
            m = match_instances(result.data, truth)
            tp, n_pred, n_gt = tp + m.true_positives, n_pred + m.n_pred, n_gt + m.n_gt
        else:
            pred, gt = result.data != 0, truth != 0
            inter += int(np.count_nonzero(pred & gt))
            total += int(pred.sum() + gt.sum())
    if instances:
        return 2 * tp / max(n_pred + n_gt, 1)
    return 2 * inter / max(total, 1)


def variants(name: str, rescaled: bool = True):
    """``(row, images, truths, voxel_size, factor)`` for every check of shipped model ``name``
    (``rescaled=False``: without the 0.4x and 2.5x rows)."""
    key = KEYS[name]
    spec = SPECS[key]
    test = load_splits(key)["test"]
    images, truths = test.images, test.truths
    if key in SUBSAMPLE:
        pick = SUBSAMPLE[key]
        if key == "em":  # one stack: pick slices
            images, truths = [images[0][pick]], [truths[0][pick]]
        else:
            images, truths = [images[i] for i in pick], [truths[i] for i in pick]
    axes = spec.dims
    base = tuple(spec.voxel_size) if getattr(spec, "voxel_size", None) else (1.0,) * axes
    known = getattr(spec, "voxel_size", None) is not None
    yield "unchanged", images, truths, base if known else None, 1.0
    if axes == 3 and rescaled:  # the reference of the 2.5x row, which sees only the central half
        yield (f"unchanged{CENTRAL}", [_central_half(i) for i in images],
               [_central_half(t) for t in truths], base if known else None, 1.0)
    for factor in FACTORS if rescaled else ():
        source = zip(images, truths)
        if factor > 1 and axes == 3:
            source = ((_central_half(i), _central_half(t)) for i, t in source)
        pairs = [_rescale(i, t, factor, axes) for i, t in source]
        crop = CENTRAL if factor > 1 and axes == 3 else ""
        yield (f"rescaled {factor}x{crop}", [p[0] for p in pairs], [p[1] for p in pairs],
               tuple(v / factor for v in base), factor)
    if axes == 3 and known:  # anisotropy: z alone rescaled, the voxel size set to match
        for factor in Z_FACTORS:
            zoom = (factor, 1.0, 1.0)
            yield (f"z rescaled {factor}x", [ndi.zoom(i.astype(np.float32), zoom, order=1) for i in images],
                   [ndi.zoom(t, zoom, order=0) for t in truths],
                   (base[0] / factor, *base[1:]), factor)
    for gamma in (0.5, 2.0):
        yield (f"gamma {gamma}", [_gamma(i, gamma) for i in images], truths,
               base if known else None, 1.0)
    yield "noise 10%", [_noise(i) for i in images], truths, base if known else None, 1.0
    if key in ("nuclei2d", "nuclei3d"):
        kind = "2d" if key == "nuclei2d" else "3d"
        image = tifffile.imread(DATA / f"stardist_samples/img{kind}.tif")
        truth = tifffile.imread(DATA / f"stardist_samples/mask{kind}.tif")
        yield f"stardist_samples {kind}", [image], [truth], None, 1.0


STITCHES = (0.0, 0.05, 0.1, 0.15, 0.25, 0.4, 0.6)


def _per_slice(labels: np.ndarray, min_size: int = 20) -> np.ndarray:
    """3D labels cut into independent 2D objects: connected components of each slice's ids
    (specks under ``min_size`` pixels dropped, as a 2D model's minimum size would)."""
    out = np.zeros(labels.shape, np.int64)
    for z, plane in enumerate(labels):
        offset = 0
        for label in np.unique(plane[plane > 0]):
            parts, n = ndi.label(plane == label)
            sizes = np.bincount(parts.ravel())
            parts[sizes[parts] < min_size] = 0
            out[z][parts > 0] = parts[parts > 0] + offset
            offset += n
    return out


def oracle_stitch_rows() -> None:
    """The stitching alone: true 3D labels cut into 2D objects per slice, stitched again."""
    from napari_unet.labels.stitch import stitch_slices

    cases = [("nuclei3d_1135 z 70-99", tifffile.imread(DATA / "nuclei3d_1135/labels.tif")[70:]),
             ("cells3d_membrane z 44-63 (dense cells)",
              tifffile.imread(DATA / "cells3d_membrane/labels.tif")[44:]),
             ("stardist_samples 3d", tifffile.imread(DATA / "stardist_samples/mask3d.tif"))]
    for where, truth in cases:
        slices = _per_slice(truth)
        scores = []
        for stitch in STITCHES:
            labels = stitch_slices(slices, stitch)
            scores.append(f"{stitch}: F1 {match_instances(labels, truth).f1:.3f}")
        print(f"| stitch, true 2D objects | {where} ({len(np.unique(truth)) - 1} 3D objects) | "
              + "; ".join(scores) + " |", flush=True)


def stitch_rows() -> None:
    """nuclei-2d slice by slice on 3D nuclei: 3D object F1 per stitch threshold."""
    model = load_model("nuclei-2d")
    cases = [("nuclei3d_1135 z 70-99",
              tifffile.imread(DATA / "nuclei3d_1135/image.tif")[70:],
              tifffile.imread(DATA / "nuclei3d_1135/labels.tif")[70:]),
             ("stardist_samples 3d", tifffile.imread(DATA / "stardist_samples/img3d.tif"),
              tifffile.imread(DATA / "stardist_samples/mask3d.tif"))]
    for where, image, truth in cases:
        probs = drain(predict_probabilities(image, model, device="cpu", dtype=np.float32))
        threshold = float(model.postprocess_default("threshold", 0.5))
        seed = model.postprocess_default("seed_threshold", None)
        scores = []
        for stitch in STITCHES:
            labels = probabilities_to_output(probs, model.task, "instances", threshold=threshold,
                                             min_size=int(model.postprocess_default("min_size", 16)),
                                             seed_threshold=seed, per_slice=True,
                                             stitch_threshold=stitch)
            m = match_instances(labels, truth)
            scores.append(f"{stitch}: F1 {m.f1:.3f} ({int(labels.max())} objects)")
        print(f"| stitch | nuclei-2d per slice on {where} ({len(np.unique(truth)) - 1} 3D objects) | "
              + "; ".join(scores) + " |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(KEYS),
                        help="shipped model names, or checkpoint files of them (e.g. a retrained "
                             "nuclei-3d.pt: scored as the model it is named)")
    parser.add_argument("--no-rescaled", action="store_true", help="skip the 0.4x and 2.5x rows")
    parser.add_argument("--stitch", action="store_true", help="also the z-stitching rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--zoom", choices=("none", "given", "auto"), default="given",
                        help="what the network sees of rescaled data (see above)")
    parser.add_argument("--rows", nargs="*", default=None,
                        help="only rows whose name starts with one of these (e.g. unchanged rescaled)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"zoom: {args.zoom}")
    print("| model | data | score | vs unchanged | seconds |")
    print("|---|---|---|---|---|")
    for name in args.models:
        model = load_model(name)
        metric = "Dice" if not SPECS[KEYS[model.name]].instances else "F1"
        references: dict[bool, float] = {}  # whole, central half: the unchanged scores
        for row, images, truths, voxel_size, factor in variants(model.name, not args.no_rescaled):
            if args.rows and not any(row.startswith(r) for r in args.rows):
                continue
            t0 = time.perf_counter()
            value = score(model, images, truths, voxel_size, factor, args.zoom)
            references.setdefault(CENTRAL in row, value)
            reference = references.get(CENTRAL in row, references[False])
            label = name if name in KEYS else f"{model.name} ({name})"
            print(f"| {label} | {row} ({len(images)} image(s)) | {metric} {value:.3f} | "
                  f"{value - reference:+.3f} | {time.perf_counter() - t0:.0f} |", flush=True)
    if args.stitch:
        oracle_stitch_rows()
        stitch_rows()
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
