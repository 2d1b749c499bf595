"""``napari-unet train``: train or fine-tune a model on image/label pairs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:

    from napari_unet.model.checkpoint import SegmentationModel
    from napari_unet.training.config import TrainingPair
from napari_unet.cli.common import (
    EXIT_INTERRUPTED,
    OutputWriteError,
    UsageError,
    _finite_float,
    _int_at_least,
    _parse_ints,
    _progress_bar,
)
from napari_unet.progress import drain
from napari_unet.training.augment import PRESETS
from napari_unet.training.config import TrainingStats

# --- train ---------------------------------------------------------------------------------

#: ``models.ARCHITECTURES``, repeated so that ``--help`` does not import torch
ARCHITECTURE_CHOICES = ("unet", "resunet", "attention", "unetpp")
_IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".nii", ".nii.gz", ".dcm")


def _parse_slices(text: str) -> list[int]:
    values: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                values.extend(range(int(lo), int(hi) + 1))
            else:
                values.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected slice numbers like 3,17,40 or 0-23, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected slice numbers like 3,17,40, got {text!r}")
    return values


def _parse_planes(text: str) -> list:
    """``--slices`` of ``train``: z slices as ints (``3,17``, ``0-23``), slices along any axis
    as ``axis:index`` (``z:3,y:40,x:12``, ``y:40-42``); y and x slices become ``(axis, index)``."""
    from napari_unet.labels.slices import AXIS_NAMES, slice_list

    planes: list = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        axis = 0
        if ":" in part:
            name, part = (v.strip() for v in part.split(":", 1))
            if name.lower() not in AXIS_NAMES:
                raise argparse.ArgumentTypeError(
                    f"unknown axis {name!r} in --slices {text!r}: use z, y or x, e.g. z:3,y:40,x:12")
            axis = AXIS_NAMES.index(name.lower())
        try:
            indices = _parse_slices(part)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(
                f"expected slices like 3,17 (z) or z:3,y:40,x:12 or y:40-42, got {text!r}") from None
        if any(i < 0 for i in indices):
            raise argparse.ArgumentTypeError(f"slice numbers start at 0, got {text!r}")
        planes.extend(i if axis == 0 else (axis, i) for i in indices)
    if not planes:
        raise argparse.ArgumentTypeError(f"expected slices like 3,17 or z:3,y:40,x:12, got {text!r}")
    return slice_list(planes)


def _check_planes(pair: TrainingPair, name: str) -> None:
    """UsageError when ``--slices`` do not fit the stack ``name`` (2D, or out of range)."""
    from napari_unet.training.targets import pair_planes

    try:
        pair_planes(pair)
    except ValueError as err:
        raise UsageError(f"--slices: {name}: {str(err).split(': ', 1)[-1]}") from None


def _add_train(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train", help="train or fine-tune a model on images with (corrected) labels",
        description="Train a new model (--dims) or fine-tune one (--from) on image/label pairs. "
                    "Only annotated voxels count: --mask (nonzero = annotated) or --slices; "
                    "default everything. --image/--labels may be folders of files with the same names.")
    parser.add_argument("--image", action="append", required=True,
                        help="image file (or folder of images); repeat for several")
    parser.add_argument("--labels", action="append", required=True,
                        help="label file (or folder) for the --image at the same position")
    annotated = parser.add_mutually_exclusive_group()
    annotated.add_argument("--mask", action="append", help="annotation mask per --image (nonzero = annotated)")
    annotated.add_argument("--slices", type=_parse_planes, default=None,
                           help="annotated (corrected) slices of each stack: z slices 3,17,40 or "
                                "0-23, or slices along any axis z:3,y:40,x:12 (y:40-42)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="source", help="model to fine-tune: shipped name or .pt file")
    source.add_argument("--dims", type=int, choices=[2, 3], help="train a new 2D or 3D model from scratch")
    parser.add_argument("--task", choices=["foreground", "foreground_boundary", "membranes", "semantic"],
                        default=None, help="what a new model predicts (default foreground_boundary)")
    parser.add_argument("--classes", default=None,
                        help="semantic: class names for 1..K, comma separated (default class_1..K)")
    parser.add_argument("--base-channels", type=_int_at_least(1), default=16)
    parser.add_argument("--depth", type=_int_at_least(1), default=4)
    parser.add_argument("--architecture", choices=ARCHITECTURE_CHOICES, default=None,
                        help="new models: unet (default), resunet (residual blocks), attention "
                             "(attention-gated skips) or unetpp (UNet++ nested skips); a "
                             "fine-tuned model keeps its parent's")
    parser.add_argument("--init", choices=["kaiming", "default"], default=None,
                        help="new models: weight initialisation (default kaiming; default = torch's)")
    parser.add_argument("--deep-supervision", action="store_true",
                        help="new unetpp models: a head on every nested decoder column, their "
                             "losses averaged (allows pruned inference)")
    parser.add_argument("--percentiles", default=None, metavar="LOW,HIGH",
                        help="new models: intensity percentiles mapped to 0 and 1 (default 1,99.8)")
    parser.add_argument("--anisotropic", type=_int_at_least(0), default=None, metavar="LEVELS",
                        help="3D: pool only in y/x for the first LEVELS poolings "
                             "(default: from the voxel size, 1 when z spacing >= 1.7x the pixel size)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--time-limit", type=_finite_float(0, low_open=True), default=None, help="seconds of training (default 60)")
    budget.add_argument("--iterations", type=_int_at_least(1), default=None, help="number of training iterations")
    parser.add_argument("--learning-rate", type=_finite_float(0, low_open=True), default=None)
    parser.add_argument("--batch-size", type=_int_at_least(1), default=None)
    parser.add_argument("--patch", type=_parse_ints, default=None, help="training patch shape, e.g. 16,64,64")
    parser.add_argument("--validation-fraction", type=_finite_float(0, 1, high_open=True), default=None,
                        help="part of the annotations held out to keep the best weights (default: "
                             "automatic, with 2 or more corrected slices or images; 0 = off)")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--augment", choices=sorted(PRESETS), default="default",
                        help="augmentation preset: default; robust (wider gamma and intensity, "
                             "noise, blur, zoom 0.6-1.6 and for 3D a z scale: for models that must "
                             "hold up on other microscopes; slower to converge); robust-intensity "
                             "(robust without zoom and z scale)")
    parser.add_argument("--loss", choices=["bce_dice", "focal_dice", "tversky", "boundary_bce"],
                        default="bce_dice",
                        help="bce_dice (default); focal_dice: focal loss + Dice; tversky: BCE + "
                             "Tversky (recall-weighted); boundary_bce: BCE weighted by the U-Net "
                             "map of the gaps between objects + Dice")
    parser.add_argument("--accumulate", type=_int_at_least(1), default=1, metavar="N",
                        help="gradient accumulation: N batches per optimizer step (effective batch "
                             "N x batch size; --iterations counts optimizer steps)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass: less memory, slower")
    parser.add_argument("--freeze-norm", choices=["auto", "yes", "no"], default="auto",
                        help="keep batch-norm statistics fixed (auto: when fine-tuning)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16 on CPUs with native bf16 and on GPUs (fp16 with loss "
                             "scaling on GPUs without bf16), else fp32")
    parser.add_argument("--name", default=None, help="model name (default: the parent's, or the file name)")
    parser.add_argument("--description", default=None, help="one line shown by 'napari-unet models'")
    parser.add_argument("--half", action="store_true", help="store the weights as float16 (half the file size)")
    parser.add_argument("--no-tune", dest="tune", action="store_false",
                        help="keep the model's post-processing (by default threshold, seed threshold and "
                             "minimum object size are re-tuned on the held-out part when it has enough "
                             "objects, annotated in 3D for a 3D model)")
    parser.add_argument("-o", "--output-file", "--out", dest="output_file", required=True, help="new model (.pt)")
    parser.set_defaults(handler=_run_train)


def _expand_pairs(images: list[str], labels: list[str]) -> list[tuple[Path, Path]]:
    if len(images) != len(labels):
        raise UsageError(f"got {len(images)} --image but {len(labels)} --labels; give one --labels per --image")
    pairs: list[tuple[Path, Path]] = []
    for image, label in zip(images, labels):
        ip, lp = Path(image), Path(label)
        if ip.is_dir() and not _is_dicom_dir(ip):
            if not lp.is_dir():
                raise UsageError(f"--image {ip} is a folder, so --labels must be one too")
            files = sorted(p for p in ip.iterdir() if p.name.lower().endswith(_IMAGE_SUFFIXES))
            if not files:
                raise UsageError(f"no image files in {ip}")
            for f in files:
                if not (lp / f.name).is_file():
                    raise UsageError(f"no labels for {f.name} in {lp}")
                pairs.append((f, lp / f.name))
        else:
            pairs.append((ip, lp))
    return pairs


def _is_dicom_dir(path: Path) -> bool:
    return any(p.suffix.lower() == ".dcm" for p in path.iterdir())


def _run_train(args: argparse.Namespace) -> int:
    import numpy as np

    from napari_unet.io.files import check_output_path
    from napari_unet.io.readers import read_image
    from napari_unet.model.checkpoint import check_not_shipped, list_pretrained
    from napari_unet.training.config import TrainingConfig, TrainingPair
    from napari_unet.training.trainer import Trainer, new_model
    from napari_unet.zoo.loading import load_model

    output_path = Path(args.output_file)
    if output_path.suffix.lower() != ".pt":
        raise UsageError(f"output must be a .pt file, got {output_path.name!r}")
    check_not_shipped(output_path)
    check_output_path(output_path, create_parent=True)  # before training, not after
    parent_path = None
    if args.source is not None:
        shipped = list_pretrained()
        parent_path = shipped.get(args.source, Path(args.source))
        if output_path.resolve() == Path(parent_path).resolve():
            raise UsageError("refusing to overwrite the model being fine-tuned; choose another -o file")
        new_only = [flag for flag, value in (("--architecture", args.architecture), ("--init", args.init),
                                             ("--deep-supervision", args.deep_supervision)) if value]
        if new_only:
            raise UsageError(f"{', '.join(new_only)} only apply to new models (--dims); a fine-tuned "
                             "model keeps its parent's architecture")
    elif args.deep_supervision and args.architecture != "unetpp":
        raise UsageError("--deep-supervision needs --architecture unetpp")
    file_pairs = _expand_pairs(args.image, args.labels)
    masks = args.mask or []
    if masks and len(masks) != len(file_pairs):
        raise UsageError(f"got {len(masks)} --mask for {len(file_pairs)} images; give one --mask per image")

    pairs = []
    voxel_size = None
    for index, (image_path, label_path) in enumerate(file_pairs):
        image = read_image(image_path)
        labels = read_image(label_path)
        if image.data.shape != labels.data.shape:
            raise UsageError(f"{image_path.name} has shape {image.data.shape} but {label_path.name} "
                             f"has {labels.data.shape}")
        if not np.issubdtype(labels.data.dtype, np.integer) and labels.data.dtype != bool:
            raise UsageError(f"{label_path.name}: labels must be integers, got {labels.data.dtype}")
        if len(file_pairs) == 1 and not labels.data.any():
            raise UsageError(f"{label_path.name}: the labels are empty (all zero)")
        annotated = None
        if masks:
            annotated = read_image(masks[index]).data
        voxel_size = voxel_size or image.voxel_size
        pairs.append(TrainingPair(image=image.data, labels=labels.data, annotated=annotated,
                                  slices=args.slices))
        if args.slices is not None:
            _check_planes(pairs[-1], label_path.name)

    if args.source is not None:
        model = load_model(args.source)
        if args.task is not None and args.task != model.task:
            raise UsageError(f"--task {args.task} differs from the model's task {model.task}; "
                             "train a new model with --dims instead")
    else:
        task = args.task or "foreground_boundary"
        class_names = None
        if task == "semantic":
            n_classes = int(max(int(p.labels.max()) for p in pairs))
            names = [c.strip() for c in args.classes.split(",")] if args.classes else \
                [f"class_{i}" for i in range(1, n_classes + 1)]
            if len(names) < n_classes:
                raise UsageError(f"labels go up to {n_classes} but only {len(names)} class names were given")
            class_names = ["background", *names]
        levels: tuple[int, ...] = ()
        if args.dims == 3:
            n_aniso = args.anisotropic
            if n_aniso is None:
                n_aniso = 0
                if voxel_size and len(voxel_size) == 3 and voxel_size[0] >= 1.7 * min(voxel_size[1:]):
                    n_aniso = 1
            levels = tuple(range(min(n_aniso, args.depth - 1)))
        normalization = None
        if args.percentiles:
            try:
                low, high = (float(v) for v in args.percentiles.split(","))
            except ValueError:
                raise UsageError(f"--percentiles expects two numbers like 1,99.8, got {args.percentiles!r}") from None
            if not 0 <= low < high <= 100:
                raise UsageError(f"--percentiles must satisfy 0 <= low < high <= 100, got {args.percentiles!r}")
            normalization = {"mode": "percentile", "low": low, "high": high}
        model = new_model(args.dims, task, class_names, base_channels=args.base_channels, depth=args.depth,
                          normalization=normalization,
                          inplane_only_levels=levels, name=args.name or output_path.stem,
                          architecture=args.architecture or "unet", init=args.init or "kaiming",
                          deep_supervision=args.deep_supervision,
                          voxel_size=voxel_size if voxel_size and len(voxel_size) == args.dims else None)
    freeze = {"auto": None, "yes": True, "no": False}[args.freeze_norm]
    config = TrainingConfig(iterations=args.iterations, time_limit=args.time_limit,
                            learning_rate=args.learning_rate, batch_size=args.batch_size,
                            patch_shape=args.patch, augment=not args.no_augment,
                            augment_settings=PRESETS[args.augment],
                            validation_fraction=args.validation_fraction, seed=args.seed,
                            device=args.device, precision=args.precision, freeze_norm=freeze,
                            loss=args.loss, accumulate_steps=args.accumulate,
                            gradient_checkpointing=args.gradient_checkpointing,
                            tune_postprocessing=args.tune)
    trainer = Trainer(model, pairs, config)
    result, interrupted = _drain_training(trainer, model.label)
    if args.name:
        result.name = args.name
    if args.description is not None:
        result.description = args.description
    if parent_path is not None and Path(parent_path).suffix:
        result.parent = f"{model.label} ({Path(parent_path).name})"
    if not interrupted:
        for line in (f"kept {trainer.decision}" if trainer.decision else "", trainer.tuning_message,
                     f"torch threads: {trainer.threads_message}" if trainer.threads_message else ""):
            if line:
                print(line)
    if args.half:
        result.network.half()
    written, failure = _save_trained(result, output_path)
    entry = result.history[-1]
    score = "" if entry.get("best_score") is None else f", validation dice {entry['best_score']:.3f}"
    if written is not None:
        print(f"wrote {written} ({result.label}, {entry['iterations']} iterations in "
              f"{entry['seconds']:.0f} s, loss {entry['final_loss']}{score})")
    what = "the best model so far" if interrupted else "the trained model"
    parts = [f"interrupted by {interrupted}"] if interrupted else []
    if failure is not None:
        parts.append(str(failure))
        parts.append(f"{what} was saved to {written} instead" if written is not None
                     else f"{what} could not be saved anywhere else either")
    elif interrupted:
        parts.append(f"saved {what} to {written}")
    if parts:
        print(f"napari-unet: {'error: ' if failure is not None and not interrupted else ''}"
              f"{'; '.join(parts)}", file=sys.stderr)
    if interrupted:
        return EXIT_INTERRUPTED
    return 1 if failure is not None else 0


def _fallback_paths(output_path: Path) -> list[Path]:
    """Where a trained model goes when ``output_path`` cannot be written: next to it, then in
    the user's cache folder (``$XDG_CACHE_HOME/napari-unet`` or ``~/.cache/napari-unet``)."""
    import datetime
    import os

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{output_path.stem}-recovered-{stamp}{output_path.suffix}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "napari-unet"
    return [output_path.with_name(name), cache / name]


def _save_trained(model: SegmentationModel, output_path: Path) -> tuple[Path | None, OutputWriteError | None]:
    """Save ``model`` to ``output_path``, else to a fallback path, so training is never lost.

    Returns the path written (None when nothing could be written) and the error of the
    requested path (None when it was written).
    """
    from napari_unet.model.checkpoint import save_checkpoint

    try:
        return save_checkpoint(model, output_path), None
    except OSError as err:
        failure = OutputWriteError(output_path, err)
    for candidate in _fallback_paths(output_path):
        try:
            return save_checkpoint(model, candidate), failure
        except OSError:
            continue
    return None, failure


def _drain_training(trainer, label: str):
    """Train with a progress bar; returns the model and the name of the signal that ended
    training early (``"SIGINT"``, ``"SIGTERM"``; None when it ran to its end)."""
    job = trainer.run()
    limit = trainer.time_limit
    total = trainer.config.iterations
    bar = _progress_bar(total if total else int(round(limit)), f"training {label}",
                        unit="it" if total else "s")

    def show(stats: TrainingStats) -> None:
        if stats.message:
            bar.write(f"note: {stats.message}")
        bar.n = stats.iteration if total else min(int(stats.elapsed), int(round(limit)))
        postfix = f"loss={stats.loss:.4f} it={stats.iteration}"
        if stats.best_score is not None:
            postfix += f" val_dice={stats.best_score:.3f}"
        bar.set_postfix_str(postfix, refresh=False)
        bar.refresh()

    try:
        return drain(job, show), None
    except KeyboardInterrupt as err:  # Ctrl+C, or SIGTERM (see _interrupt_on_signals)
        job.close()
        best = trainer.best_model()
        if best is None:
            raise
        return best, getattr(err, "signal_name", "SIGINT")
    finally:
        bar.close()
