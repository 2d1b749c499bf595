"""Model zoo v2: select an architecture and loss per task, train the shipped models, and score
them against a MONAI BasicUNet peer and a classical baseline on held-out data.

Tasks and splits (data from ../shared/data; the test part is never trained or tuned on):

=========  =========================  ==============  ==============  ===============
task       data                       train           validation      test
=========  =========================  ==============  ==============  ===============
em         ISBI 2012 EM (membranes)   slices 0-19     slices 20-23    slices 24-29
nuclei2d   BBBC039 (sorted names)     fields 0-63     fields 64-79    fields 80-99
nuclei3d   nuclei3d_1135              z 0-55          z 58-69         z 70-99
cells3d    cells3d_membrane           z 0-31          z 34-43         z 44-63
=========  =========================  ==============  ==============  ===============

Scores: EM pixel Dice of the membrane mask; the others object F1 at IoU 0.5 (2D: objects
pooled over the fields). Post-processing (threshold, seed threshold, minimum size) is tuned on
the validation split for every method alike (:mod:`napari_unet.labels.tuning`).

Budgets are CPU seconds of the training process (``--cpu-seconds``; robust to other jobs on the
machine, unlike wall time): a short calibration (10 steps) measures each method's CPU cost per
step and the run gets as many steps as fit, with the learning-rate schedule over exactly those
steps. The peer trains on the same batches (our patch sampler: same patch size, batch size and
augmentation), with the same loss, optimizer, schedule and precision (bf16 autocast and
channels-last on this CPU); it is larger and slower per step, so it gets fewer steps.

Commands (every one appends to ``$WORK/results.jsonl``; WORK defaults to
/tmp/napari-unet-models)::

    python benchmarks/bench_models.py select --task nuclei2d --cpu-seconds 60
    python benchmarks/bench_models.py train --task nuclei2d --architecture unet --loss bce_dice --cpu-seconds 600
    python benchmarks/bench_models.py peer --task nuclei2d --cpu-seconds 600
    python benchmarks/bench_models.py classical --task nuclei2d
    python benchmarks/bench_models.py report

``train`` writes ``$WORK/models/<shipped name>.pt`` with its tuned post-processing.
``--augment robust`` / ``robust-intensity`` trains with a stronger augmentation preset
(:data:`napari_unet.training.augment.PRESETS`; recorded with the run, and ``card`` / ``report``
with the same ``--augment`` take the shipped model from those runs); ``train --from FILE``
goes on training a checkpoint (phase ``final-continued``), e.g. the shipped model with
``--augment robust-intensity --cpu-seconds 300``. The robustness runs of issue 21 (item 5) are
in ``benchmarks/results/bench_models_robust.jsonl``.
``report`` prints the table of every result and, last, the line
``em_dice=X nuclei2d_f1=X nuclei3d_f1=X cells3d_f1=X beats_peer=N/4 beats_classical=N/2``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tifffile
import torch

from napari_unet.engine.predict import predict_probabilities
from napari_unet.labels.instances import to_instances, to_semantic
from napari_unet.labels.metrics import match_instances
from napari_unet.labels.tuning import tune_postprocessing
from napari_unet.model.checkpoint import SegmentationModel, save_checkpoint
from napari_unet.model.normalization import fit_normalizer
from napari_unet.progress import drain
from napari_unet.training.config import TrainingConfig, TrainingPair
from napari_unet.training.augment import PRESETS
from napari_unet.training.trainer import Trainer, new_model

DATA = Path(os.environ.get("DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
WORK = Path(os.environ.get("WORK", "/tmp/napari-unet-models"))
ARCHITECTURES = ("unet", "resunet", "attention", "unetpp")
LOSSES = ("bce_dice", "focal_dice", "tversky", "boundary_bce")


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the shipped model's name
    dims: int
    task: str
    base_channels: int
    patch: tuple[int, ...]
    batch_size: int
    instances: bool  # score object F1 (else pixel Dice of the first output)
    description: str
    inplane_only_levels: tuple[int, ...] = ()
    percentiles: tuple[float, float] = (1.0, 99.8)
    voxel_size: tuple[float, ...] | None = None


SPECS = {
    "em": TaskSpec("em-membranes-2d", 2, "membranes", 16, (128, 128), 8, False,
                   "EM membranes, 2D (ISBI 2012 serial-section TEM); instances = cells"),
    "nuclei2d": TaskSpec("nuclei-2d", 2, "foreground_boundary", 16, (128, 128), 8, True,
                         "Fluorescent nuclei, 2D (BBBC039 U2OS Hoechst); splits touching nuclei"),
    "nuclei3d": TaskSpec("nuclei-3d", 3, "foreground_boundary", 8, (16, 64, 64), 2, True,
                         "Nuclei in 3D confocal stacks (anisotropic z), foreground + boundary",
                         inplane_only_levels=(0,), voxel_size=(0.28, 0.127, 0.127)),
    "cells3d": TaskSpec("cells-3d", 3, "membranes", 8, (32, 64, 64), 2, True,
                        "Membrane-stained cells in 3D confocal stacks; instances = cells",
                        percentiles=(1.0, 95.0)),
}


@dataclass
class Split:
    """Images and ground truth of one part of a data set (lists: one entry per image)."""

    images: list[np.ndarray]
    truths: list[np.ndarray]  # instance labels, or the binary membrane mask (em)


def load_splits(key: str) -> dict[str, Split]:
    """train / val / test parts of task ``key`` (see the module docstring)."""
    if key == "em":
        image = tifffile.imread(DATA / "isbi2012_em/image.tif")
        mem = tifffile.imread(DATA / "isbi2012_em/membranes.tif")
        parts = {"train": slice(0, 20), "val": slice(20, 24), "test": slice(24, 30)}
        return {k: Split([image[s]], [mem[s]]) for k, s in parts.items()}
    if key == "nuclei2d":
        files = sorted((DATA / "bbbc039_nuclei/images").glob("*.tif"))
        parts = {"train": files[:64], "val": files[64:80], "test": files[80:]}
        return {k: Split([tifffile.imread(f) for f in fs],
                         [tifffile.imread(DATA / "bbbc039_nuclei/labels" / f.name) for f in fs])
                for k, fs in parts.items()}
    folder = {"nuclei3d": "nuclei3d_1135", "cells3d": "cells3d_membrane"}[key]
    image = tifffile.imread(DATA / folder / "image.tif")
    labels = tifffile.imread(DATA / folder / "labels.tif")
    parts = ({"train": slice(0, 56), "val": slice(58, 70), "test": slice(70, 100)} if key == "nuclei3d"
             else {"train": slice(0, 32), "val": slice(34, 44), "test": slice(44, 64)})
    return {k: Split([image[s]], [labels[s]]) for k, s in parts.items()}


def training_pairs(key: str, split: Split) -> list[TrainingPair]:
    """Training pairs (EM: the binary membrane mask is the target itself)."""
    return [TrainingPair(image=image, labels=truth) for image, truth in zip(split.images, split.truths)]


# -- scoring ------------------------------------------------------------------------------------

def score(key: str, probabilities: list[np.ndarray], split: Split, settings: dict[str, Any]) -> float:
    """EM: Dice of the membrane mask; others: object F1 at IoU 0.5 (pooled)."""
    spec = SPECS[key]
    if not spec.instances:
        inter = total = 0
        for p, truth in zip(probabilities, split.truths):
            pred = to_semantic(p, spec.task, threshold=settings.get("threshold", 0.5)) != 0
            pred = pred[0] if pred.ndim > truth.ndim else pred
            inter += int(np.count_nonzero(pred & (truth != 0)))
            total += int(pred.sum() + (truth != 0).sum())
        return 2 * inter / max(total, 1)
    counts = np.zeros(3, np.int64)
    for p, truth in zip(probabilities, split.truths):
        pred = to_instances(p, spec.task, threshold=settings.get("threshold", 0.5),
                            min_size=settings.get("min_size", 30),
                            seed_threshold=settings.get("seed_threshold"),
                            merge_threshold=settings.get("merge_threshold"))
        m = match_instances(pred, truth)
        counts += (m.true_positives, m.n_pred, m.n_gt)
    return float(2 * counts[0] / max(counts[1] + counts[2], 1))


def tuned_scores(key: str, predict: Callable[[np.ndarray], np.ndarray],
                 splits: dict[str, Split]) -> dict[str, Any]:
    """Tune post-processing on val with ``predict``'s probabilities, then score val and test."""
    spec = SPECS[key]
    val = [predict(image) for image in splits["val"].images]
    truths = splits["val"].truths
    tuned = tune_postprocessing(val, truths if spec.instances else [t != 0 for t in truths],
                                spec.task, instances=spec.instances)
    start = time.perf_counter()
    test = [predict(image) for image in splits["test"].images]
    seconds = time.perf_counter() - start
    return {"settings": tuned.settings, "val": tuned.score, "val_default": tuned.default_score,
            "test": score(key, test, splits["test"], tuned.settings),
            "test_default": score(key, test, splits["test"], {}), "predict_seconds": seconds,
            "tuning": tuned}


# -- training -----------------------------------------------------------------------------------

def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def our_model(key: str, architecture: str, base_channels: int | None = None) -> SegmentationModel:
    spec = SPECS[key]
    options = {} if architecture == "unet" else {"architecture": architecture,
                                                   "deep_supervision": architecture == "unetpp"}
    return new_model(spec.dims, spec.task, base_channels=base_channels or spec.base_channels, depth=4,
                     inplane_only_levels=spec.inplane_only_levels, name=spec.name,
                     normalization={"mode": "percentile", "low": spec.percentiles[0],
                                    "high": spec.percentiles[1]},
                     voxel_size=spec.voxel_size, description=spec.description, **options)


#: the augmentation preset (``--augment``: ``default`` or ``robust``, see
#: :data:`napari_unet.training.augment.PRESETS`)
AUGMENT = "default"


#: ``train --from``: a trained checkpoint to go on training (with the fine-tuning learning
#: rate, batch norm trained, no distillation: every voxel is annotated), else None
START_FROM: str | None = None


def training_config(key: str, steps: int, loss: str, seed: int) -> TrainingConfig:
    spec = SPECS[key]
    more = {"freeze_norm": False, "distillation": 0.0} if START_FROM else {}
    return TrainingConfig(iterations=steps, batch_size=spec.batch_size, patch_shape=spec.patch,
                          validation_fraction=0, seed=seed, device="cpu", loss=loss,
                          log_every=50, augment_settings=PRESETS[AUGMENT], **more)


CALIBRATION_STEPS = 10


def steps_for(budget: float, run_steps: Callable[[int], None]) -> int:
    """Steps that fit in ``budget`` CPU seconds, from the CPU time of a short run."""
    run_steps(2)  # warm-up (allocations, first-call costs)
    cpu = cpu_seconds()
    run_steps(CALIBRATION_STEPS)
    per_step = (cpu_seconds() - cpu) / CALIBRATION_STEPS
    return max(CALIBRATION_STEPS, int(budget / per_step))


def train_ours(key: str, architecture: str, loss: str, budget: float, seed: int,
               splits: dict[str, Split], base_channels: int | None = None
               ) -> tuple[SegmentationModel, dict[str, Any]]:
    if START_FROM:
        from napari_unet.model.checkpoint import load_checkpoint

        model = load_checkpoint(START_FROM)
    else:
        model = our_model(key, architecture, base_channels)
    pairs = training_pairs(key, splits["train"])
    steps = steps_for(budget, lambda n: drain(Trainer(model, pairs, training_config(key, n, loss, seed)).run()))
    trainer = Trainer(model, pairs, training_config(key, steps, loss, seed))
    cpu, wall = cpu_seconds(), time.perf_counter()
    result = drain(trainer.run())
    info = {"steps": steps, "cpu_seconds": cpu_seconds() - cpu, "seconds": time.perf_counter() - wall,
            "skipped_steps": trainer.skipped_steps, "parameters": sum(p.numel() for p in result.network.parameters())}
    return result, info


def ours_predictor(model: SegmentationModel) -> Callable[[np.ndarray], np.ndarray]:
    return lambda image: drain(predict_probabilities(image, model, device="cpu", dtype=np.float32))


class PeerTrainer(Trainer):
    """Our trainer's data, loss, optimizer, schedule and precision around a MONAI BasicUNet."""

    def __init__(self, model: SegmentationModel, pairs: list[TrainingPair], config: TrainingConfig):
        super().__init__(model, pairs, config)
        from monai.networks.nets import BasicUNet

        self.peer = BasicUNet(spatial_dims=model.spatial_dims, in_channels=1,
                              out_channels=model.config.out_channels)

    def train_peer(self) -> dict[str, Any]:
        from napari_unet.model.precision import prepare_batch
        from napari_unet.training.losses import masked_loss

        config, policy = self.config, self.policy
        rng = np.random.default_rng(config.seed)
        torch.manual_seed(config.seed)
        net = self.peer.to(memory_format=policy.memory_format(self.parent.spatial_dims))
        optimizer = torch.optim.AdamW(net.parameters(), lr=self.learning_rate, weight_decay=1e-4)
        pos_weight = None if self.pos_weight is None else torch.tensor(self.pos_weight)
        total = int(config.iterations)
        cpu, wall = cpu_seconds(), time.perf_counter()
        net.train()
        skipped = 0
        for iteration in range(total):
            fraction = iteration / total
            lr = self.learning_rate * min(1.0, (iteration + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * fraction)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, targets, masks = self._sample_batch(rng)
            x = prepare_batch(torch.from_numpy(images), policy)
            optimizer.zero_grad(set_to_none=True)
            with policy.autocast():
                logits = net(x)
                loss = masked_loss(logits.float(), torch.from_numpy(targets), torch.from_numpy(masks),
                                   self.task, pos_weight=pos_weight)
            loss.backward()
            if torch.isfinite(torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))):
                optimizer.step()
            else:
                skipped += 1
            if iteration % 500 == 0:
                print(f"  peer step {iteration}/{total} loss {loss.item():.4f}", file=sys.stderr, flush=True)
        net.eval()
        return {"steps": total, "cpu_seconds": cpu_seconds() - cpu, "seconds": time.perf_counter() - wall,
                "skipped_steps": skipped, "parameters": sum(p.numel() for p in net.parameters())}

    def predictor(self) -> Callable[[np.ndarray], np.ndarray]:
        from monai.inferers import sliding_window_inference

        # in-plane twice the training patch; in z the training depth (MONAI pads smaller images,
        # and BasicUNet's instance norm sees the padding, so it is replicated, not zeros)
        patch = tuple(self.patch_shape)
        roi = (patch[0], *(2 * p for p in patch[1:])) if len(patch) == 3 else tuple(2 * p for p in patch)
        net, policy, task = self.peer, self.policy, self.task
        normalization = self.parent.normalization

        @torch.no_grad()
        def predict(image: np.ndarray) -> np.ndarray:
            data = fit_normalizer(image, normalization)(np.asarray(image))
            x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
            if self.parent.spatial_dims == 2 and x.ndim == 3:  # a stack, slice by slice
                x = x[:, None]
                window = roi
            else:
                x = x[None, None]
                window = roi  # MONAI pads images smaller than the window
            with policy.autocast():
                logits = sliding_window_inference(x, window, 4, net, overlap=0.25, mode="gaussian",
                                                  padding_mode="replicate")
            probs = torch.sigmoid(logits.float()) if task != "semantic" else torch.softmax(logits.float(), 1)
            probs = probs.numpy()
            return probs.transpose(1, 0, 2, 3) if self.parent.spatial_dims == 2 and image.ndim == 3 else probs[0]

        return predict


# -- classical baseline ------------------------------------------------------------------------

def classical_instances(image: np.ndarray, min_distance: int, min_size: int,
                        sampling: tuple[float, ...] | None) -> np.ndarray:
    """Otsu threshold of the smoothed image, holes filled, distance-transform watershed."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.segmentation import watershed

    smooth = gaussian(image.astype(np.float32), sigma=1, preserve_range=True)
    mask = smooth > threshold_otsu(smooth)
    mask = ndi.binary_fill_holes(mask) if mask.ndim == 2 else np.stack([ndi.binary_fill_holes(s) for s in mask])
    labels, _ = ndi.label(mask)
    sizes = np.bincount(labels.ravel())
    mask &= sizes[labels] >= max(1, min_size)
    distance = ndi.distance_transform_edt(mask, sampling=sampling)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=ndi.label(mask)[0], exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-distance, markers, mask=mask)


def classical(key: str, splits: dict[str, Split]) -> dict[str, Any]:
    spec = SPECS[key]
    if spec.task != "foreground_boundary":
        raise SystemExit("the classical baseline (Otsu + distance watershed) is for nuclei only")

    def f1(split: Split, min_distance: int, min_size: int) -> float:
        counts = np.zeros(3, np.int64)
        for image, truth in zip(split.images, split.truths):
            m = match_instances(classical_instances(image, min_distance, min_size, spec.voxel_size), truth)
            counts += (m.true_positives, m.n_pred, m.n_gt)
        return float(2 * counts[0] / max(counts[1] + counts[2], 1))

    grid = [(d, s) for d in (3, 5, 7, 10, 14, 20, 28, 40) for s in (10, 30, 100, 300, 1000, 3000)]
    scored = [((d, s), f1(splits["val"], d, s)) for d, s in grid]
    (d, s), val = max(scored, key=lambda item: item[1])
    return {"method": "classical", "settings": {"min_distance": d, "min_size": s}, "val": val,
            "test": f1(splits["test"], d, s)}


# -- commands -----------------------------------------------------------------------------------

def record(entry: dict[str, Any]) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    entry = {k: v for k, v in entry.items() if k != "tuning"}
    entry["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(WORK / "results.jsonl", "a") as handle:
        handle.write(json.dumps(entry, default=float) + "\n")
    print(json.dumps(entry, default=float), flush=True)


def run_ours(key: str, architecture: str, loss: str, budget: float, seed: int, phase: str,
             save: bool, base_channels: int | None = None) -> dict[str, Any]:
    splits = load_splits(key)
    model, info = train_ours(key, architecture, loss, budget, seed, splits, base_channels)
    scores = tuned_scores(key, ours_predictor(model), splits)
    entry = {"task": key, "phase": phase, "method": "ours", "architecture": architecture, "loss": loss,
             "seed": seed, "augment": AUGMENT, **({"from": START_FROM} if START_FROM else {}),
             **info, **scores}
    if base_channels:
        entry["base_channels"] = base_channels
    if save:
        model.postprocess = scores["tuning"].to_postprocess(
            f"the validation split of bench_models.py ({key}: {VALIDATION_TEXT[key]})")
        model.history[-1]["architecture"] = architecture
        model.history[-1]["loss"] = loss
        suffix = (f"-base{base_channels}" if base_channels else "") + (
            f"-{AUGMENT}" if AUGMENT != "default" else "") + ("-continued" if START_FROM else "")
        path = WORK / "models" / f"{SPECS[key].name}{suffix}.pt"
        save_checkpoint(model, path)
        entry["file"] = str(path)
        entry["file_mb"] = path.stat().st_size / 2**20
    record(entry)
    return entry


VALIDATION_TEXT = {"em": "ISBI slices 20-23", "nuclei2d": "BBBC039 fields 64-79 by sorted name",
                   "nuclei3d": "nuclei3d_1135 z 58-69", "cells3d": "cells3d_membrane z 34-43"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["select", "train", "peer", "classical", "report", "card"])
    parser.add_argument("--task", choices=list(SPECS), action="append")
    parser.add_argument("--architecture", default="unet", choices=ARCHITECTURES)
    parser.add_argument("--loss", default="bce_dice", choices=LOSSES)
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES))
    parser.add_argument("--losses", default=",".join(LOSSES[1:]))
    parser.add_argument("--cpu-seconds", type=float, default=60.0,
                        help="training budget per run, CPU seconds of this process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-channels", type=int, default=None,
                        help="train: another width than the task's (an extra candidate, recorded "
                             "as phase final-baseN; choose between candidates on validation)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--from", dest="start_from", default=None,
                        help="train: go on training this checkpoint (e.g. the shipped model) instead "
                             "of a new network; --architecture/--loss must be its own")
    parser.add_argument("--augment", default="default", choices=sorted(PRESETS),
                        help="augmentation preset of select/train/peer runs (robust: wider gamma and "
                             "intensity, noise, blur, zoom, z rescaling)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    global AUGMENT, START_FROM
    AUGMENT, START_FROM = args.augment, args.start_from
    if args.command == "report":
        return report(None if args.augment == "default" else args.augment)
    if args.command == "card":
        for key in args.task or list(SPECS):
            write_card(key, None if args.augment == "default" else args.augment)
        return 0
    if not DATA.is_dir():
        print(f"no data in {DATA}: bench_models needs ../shared/data", file=sys.stderr)
        return 0
    for key in args.task or list(SPECS):
        if args.command == "select":
            for arch in [a for a in args.architectures.split(",") if a]:
                run_ours(key, arch, "bce_dice", args.cpu_seconds, args.seed, "select", False)
            # the losses on the best architecture so far (this run's and earlier recorded ones)
            candidates = [r for r in _rows(key) if r["phase"] == "select" and r["loss"] == "bce_dice"]
            if not candidates:
                continue
            best = max(candidates, key=lambda r: r["val"])["architecture"]
            for loss in [loss for loss in args.losses.split(",") if loss]:
                try:
                    run_ours(key, best, loss, args.cpu_seconds, args.seed, "select", False)
                except (ValueError, TypeError) as err:
                    record({"task": key, "phase": "select", "method": "ours", "architecture": best,
                            "loss": loss, "error": str(err)})
        elif args.command == "train":
            run_ours(key, args.architecture, args.loss, args.cpu_seconds, args.seed,
                     ("final" if args.base_channels is None else f"final-base{args.base_channels}")
                     + ("-continued" if START_FROM else ""), True,
                     args.base_channels)
        elif args.command == "peer":
            splits = load_splits(key)
            model, pairs = our_model(key, "unet"), training_pairs(key, splits["train"])

            def peer_steps(n: int) -> None:
                PeerTrainer(model, pairs, training_config(key, n, "bce_dice", args.seed)).train_peer()

            steps = steps_for(args.cpu_seconds, peer_steps)
            trainer = PeerTrainer(model, pairs, training_config(key, steps, "bce_dice", args.seed))
            info = trainer.train_peer()
            (WORK / "models").mkdir(parents=True, exist_ok=True)
            torch.save(trainer.peer.state_dict(), WORK / "models" / f"peer-{key}.pt")
            scores = tuned_scores(key, trainer.predictor(), splits)
            record({"task": key, "phase": "final", "method": "monai_basicunet", "augment": AUGMENT,
                    **info, **scores})
        elif args.command == "classical":
            record({"task": key, "phase": "final", **classical(key, load_splits(key))})
    return 0


SELECT_CPU, FINAL_CPU = 40, 600  # the budgets the shipped models were chosen and trained with
DATA_TEXT = {
    "em": ("ISBI 2012 EM (serial-section TEM of the Drosophila ventral nerve cord, 30x512x512 uint8, "
           "binary membrane labels)", "ISBI 2012 challenge (Cardona et al. 2010), via zhixuhao/unet (MIT)",
           "slices 0-19", "slices 24-29"),
    "nuclei2d": ("BBBC039 (U2OS nuclei, Hoechst, 520x696 uint16, instance labels)",
                 "BBBC039v1 (Caicedo et al. 2019), CC0", "fields 0-63 by sorted file name",
                 "fields 80-99 by sorted file name"),
    "nuclei3d": ("nuclei3d_1135 (3D confocal plant nuclei, 100x100x100 uint8, voxel 0.28x0.127x0.127 um, "
                 "hand-curated instance labels)", "GO-NUCLEAR / PlantSeg test data (MIT)", "z 0-55", "z 70-99"),
    "cells3d": ("cells3d_membrane (3D confocal, membrane-stained cells, 64x200x200 uint16, 106 densely "
                "labelled cells)", "pytorch-3dunet sample patch (MIT)", "z 0-31", "z 44-63"),
}
#: the models shipped before this script: (as shipped, untuned; with post-processing tuned on the
#: validation split like every method here; what was measured)
TODAY = {"em": ("0.776", "0.789", "membrane Dice"), "nuclei2d": ("0.820", "0.871", "F1"),
         "nuclei3d": ("0.706", "0.741", "F1"), "cells3d": ("0.073", "0.361", "F1")}


CONTINUE_CPU = 300  # CPU seconds of a continued (--from) run of the shipped models
AUGMENT_TEXT = {"robust-intensity": "the robust-intensity augmentation preset (`napari_unet.training."
                                    "augment.ROBUST_INTENSITY`: gamma 0.4-2.5, intensity scale 0.6-1.6, "
                                    "shift -0.15-0.25, noise of random strength, blur)",
                "robust": "the robust augmentation preset (`napari_unet.training.augment.ROBUST`: "
                          "gamma 0.4-2.5, intensity scale 0.6-1.6, noise of random strength, blur, "
                          "zoom 0.6-1.6, and for 3D an extra z scale 0.5-2)"}


def _all_rows() -> list[dict[str, Any]]:
    """Recorded results, the latest one per (task, phase, method, architecture, loss, seed,
    augmentation preset)."""
    path = WORK / "results.jsonl"
    rows = [json.loads(line) for line in open(path)] if path.exists() else []
    latest = {}
    for r in rows:
        latest[(r.get("task"), r.get("phase"), r.get("method"), r.get("architecture"), r.get("loss"),
                r.get("seed"), r.get("augment", "default"))] = r
    return list(latest.values())


def _rows(key: str) -> list[dict[str, Any]]:
    return [r for r in _all_rows() if r.get("task") == key and "error" not in r]


def shipped_candidate(rows: list[dict[str, Any]], augment: str | None = None) -> dict[str, Any]:
    """Of our final runs of one task (the selected setting, and any extra width), the one with
    the best validation score: the shipped model (the test part plays no role). ``augment``:
    only the runs with that augmentation preset (the robust models were chosen over the
    default ones on held-out robustness checks, ``bench_generalize.py``, not on validation)."""
    return max((r for r in rows if r["method"] == "ours" and r["phase"].startswith("final")
                and (augment is None or r.get("augment", "default") == augment)),
               key=lambda r: r["val"])


def write_card(key: str, augment: str | None = None) -> Path:
    """The model card of task ``key`` from the recorded results (``$WORK/cards/<name>.md``);
    ``augment``: the shipped model is the final run with that augmentation preset."""
    from napari_unet.model.checkpoint import load_checkpoint

    spec, rows = SPECS[key], _rows(key)
    final = {r["method"]: r for r in rows if r["phase"] == "final"}
    ours = shipped_candidate(rows, augment)
    continued = bool(ours.get("from"))
    first = next((r for r in rows if r["method"] == "ours" and r["phase"] == "final"
                  and r.get("augment", "default") == "default"), None) if continued else None
    kept = None if augment else next((r for r in rows if r["phase"] == "kept"), None)  # old weights, new defaults
    model = load_checkpoint((kept or ours)["file"])
    cfg = model.config
    metric = "pixel Dice of the membrane mask" if key == "em" else "object F1 at IoU 0.5"
    data, licence, train_text, test_text = DATA_TEXT[key]
    lines = [f"# {spec.name}", "", spec.description, "",
             f"- **Task**: `{spec.task}`.",
             f"- **Network**: {spec.dims}D `{cfg.architecture}` (napari-unet model family), base "
             f"{cfg.base_channels} channels, depth {cfg.depth}, batch norm"
             + (f", in-plane-only pooling at levels {list(cfg.inplane_only_levels)}" if cfg.inplane_only_levels else "")
             + f"; {sum(p.numel() for p in model.network.parameters()):,} parameters; file "
             f"{Path((kept or ours)['file']).stat().st_size / 2**20:.1f} MB; halo {list(cfg.halo())}.",
             *([] if kept else [f"- **Loss**: `{ours['loss']}`; Kaiming initialisation."]),
             f"- **Input normalisation**: {model.normalization}.",
             f"- **Post-processing defaults** (tuned on {VALIDATION_TEXT[key]}, stored in the checkpoint; "
             f"`predict --threshold/--min-size/--seed-threshold` override them): "
             + ", ".join(f"`{k}={v}`" for k, v in (kept or ours)["settings"].items()) + ".",
             "", "## Training data", "",
             f"{data}: train {train_text}; validation {VALIDATION_TEXT[key]} (for choosing the architecture "
             f"and loss and tuning the post-processing); test {test_text} (never trained or tuned on).", "",
             f"Licence: {licence}.", "", "## Command", "",
             "Selection and training (on a 2-core AMD EPYC CPU with native bf16; one torch thread per "
             "run, several runs at once; budgets in CPU seconds, see the script's docstring):", "",
             "```sh",
             f"python benchmarks/bench_models.py select --task {key} --cpu-seconds {SELECT_CPU}",
             f"python benchmarks/bench_models.py train --task {key} --architecture {ours['architecture']} "
             f"--loss {ours['loss']} --cpu-seconds {FINAL_CPU}"
             + (f" --base-channels {ours['base_channels']}" if ours.get("base_channels") else "")
             + (f" --augment {ours['augment']}" if ours.get("augment", "default") != "default"
                and not continued else ""),
             *([f"# then, from those weights (shipped before as {spec.name}.pt):",
                f"python benchmarks/bench_models.py train --task {key} --architecture {ours['architecture']} "
                f"--loss {ours['loss']} --cpu-seconds {CONTINUE_CPU} --from {ours['from']} "
                f"--augment {ours['augment']}"] if continued else []),
             f"python benchmarks/bench_models.py peer --task {key} --cpu-seconds {FINAL_CPU}",
             *([f"python benchmarks/bench_models.py classical --task {key}"] if "classical" in final else []),
             "```", "",
             *([f"**The weights are those shipped before** (trained with `napari-unet train` on z 0-43; "
                "see this card in the git history): the new candidate "
                f"({ours['architecture']}, {ours['loss']}) scored test {metric} {ours['test']:.3f}, "
                f"below the old weights' {kept['test']:.3f} under the same protocol, so, as the model-zoo "
                "issue asks, it is not shipped. New are the stored post-processing defaults, tuned on the "
                "validation split (which the old weights were trained on: their validation score is "
                "optimistic).", ""] if kept else []),
             *([f"Training: {first['steps']} optimizer steps with the default augmentation, "
                f"{first['cpu_seconds'] / 60:.1f} CPU-minutes, trained {first['when'][:10]}; then continued "
                "(fine-tuning learning rate, batch norm trained) as below. Together "
                f"{(first['cpu_seconds'] + ours['cpu_seconds']) / 60:.1f} CPU-minutes.", ""]
               if continued and first else []),
             f"Training{' of the candidate' if kept else ''}{', continued' if continued else ''}: "
             f"{ours['steps']} optimizer steps of {spec.batch_size} patches {spec.patch} with "
             f"{AUGMENT_TEXT.get(ours.get('augment', 'default'), 'augmentation')}, "
             f"{ours['cpu_seconds'] / 60:.1f} CPU-minutes ({ours['seconds'] / 60:.1f} min wall), "
             f"bf16 autocast, channels-last; {ours.get('skipped_steps', 0)} steps skipped for non-finite "
             f"gradients; trained {ours['when'][:10]}.", "",
             "## Accuracy", "",
             f"{metric}; validation = {VALIDATION_TEXT[key]}, test = {test_text}. Every method's "
             "post-processing is tuned on the validation split the same way.", "",
             "| method | phase | steps | CPU s | validation | test | test, untuned defaults |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["phase"] != "select"):
        if r["method"] == "classical":
            name = "classical: Otsu + distance-transform watershed"
        elif r["method"] == "shipped_before":
            name = "the weights shipped before, post-processing tuned on validation"
        elif r["method"] == "monai_basicunet":
            name = f"MONAI BasicUNet peer ({r['parameters']:,} parameters)"
        else:
            name = f"ours: {r['architecture']}, {r['loss']}" + (
                f", base {r['base_channels']}" if r.get("base_channels") else "") + (
                f", {r['augment']} augmentation" if r.get("augment", "default") != "default" else "")
        default = r.get("test_default")
        lines.append(f"| {name} | {'selection' if r['phase'] == 'select' else r['phase']} | {r.get('steps', '-')} | "
                     f"{r.get('cpu_seconds', 0):.0f} | {r['val']:.3f} | {r['test']:.3f} | "
                     f"{'-' if default is None else f'{default:.3f}'} |")
    untuned, tuned, what = TODAY[key]
    lines += ["", f"The model shipped before (trained on the validation part too, scored on the same test "
              f"part) had test {what} {untuned} with the built-in defaults and {tuned} with its "
              "post-processing tuned on the validation split.", "", "## Limitations", "",
              f"Small network trained for minutes on a single data set: expect to fine-tune it "
              f"(`napari-unet train --from {spec.name} ...` or the Fine-tune dock) on a few corrected "
              "slices of different data.", ""]
    path = WORK / "cards" / f"{spec.name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {path}")
    return path


def report(augment: str | None = None) -> int:
    """Print every result and the summary line; ``augment``: where a task has final runs with
    that augmentation preset, its shipped model is one of them."""
    rows = sorted(_all_rows(), key=lambda r: (r.get("task", ""), r.get("phase", "") != "select"))
    print("| task | phase | method | architecture | loss | steps | CPU s | val | test | settings |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['task']} | {r['phase']} | {r['method']} | {r.get('architecture', '')} | "
                  f"{r.get('loss', '')} | - | - | - | - | {r['error'][:60]} |")
            continue
        preset = "" if r.get("augment", "default") == "default" else ", " + r["augment"]
        print(f"| {r['task']} | {r['phase']} | {r['method']} | {r.get('architecture', '')} | "
              f"{r.get('loss', '')}{preset} | {r.get('steps', '')} | {r.get('cpu_seconds', 0):.0f} | "
              f"{r['val']:.3f} | {r['test']:.3f} | {r.get('settings', {})} |")
    final = {}
    for r in rows:  # the latest final result per (task, method)
        if r.get("phase") == "final" and "error" not in r:
            final[(r["task"], r["method"])] = r
    for key in SPECS:
        if any(r["task"] == key and r["method"] == "ours" for r in rows if "error" not in r
               and r.get("phase", "").startswith("final")):
            rows_of_key = _rows(key)
            kept = next((r for r in rows_of_key if r["phase"] == "kept"), None)
            chosen = [r for r in rows_of_key if r["method"] == "ours" and r["phase"].startswith("final")
                      and r.get("augment", "default") == augment]
            final[(key, "ours")] = (shipped_candidate(chosen) if augment and chosen
                                    else kept or shipped_candidate(rows_of_key))
    metric = {k: final.get((k, "ours"), {}).get("test", float("nan")) for k in SPECS}
    beats_peer = sum(1 for k in SPECS if (k, "ours") in final and (k, "monai_basicunet") in final
                     and final[(k, "ours")]["test"] >= final[(k, "monai_basicunet")]["test"] + 0.02)
    beats_classical = sum(1 for k in ("nuclei2d", "nuclei3d") if (k, "ours") in final and (k, "classical") in final
                          and final[(k, "ours")]["test"] >= final[(k, "classical")]["test"])
    print(f"em_dice={metric['em']:.3f} nuclei2d_f1={metric['nuclei2d']:.3f} "
          f"nuclei3d_f1={metric['nuclei3d']:.3f} cells3d_f1={metric['cells3d']:.3f} "
          f"beats_peer={beats_peer}/4 beats_classical={beats_classical}/2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
