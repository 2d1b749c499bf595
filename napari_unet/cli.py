"""Command line: ``napari-unet predict|models|...``.

Every command drains one of the core generators with a terminal progress bar. Bad arguments,
unreadable inputs and outputs that cannot be written (checked before the run) end with a
one-line error and exit code 2, never a traceback; a write that fails during the run (disk full)
with exit code 1, an interrupted run (SIGINT, SIGTERM) with 130. See :func:`main`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import numpy as np

    from .checkpoint import SegmentationModel
    from .io import LoadedImage

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(message)


def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 64,256,256, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 64,256,256, got {text!r}")
    return values


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def _finite_float(low: float | None = None, high: float | None = None, *,
                  low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in the given range (NaN and inf are refused)."""
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            if low is not None and high is not None:
                expected = (f"a number in {'(' if low_open else '['}{low:g}, {high:g}"
                            f"{')' if high_open else ']'}")
            elif low is not None:
                expected = "a positive number" if low == 0 and low_open else f"a number >= {low:g}"
            else:
                expected = "a finite number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


def _progress_bar(total: int, desc: str, unit: str = "tile"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=None)


# --- predict -------------------------------------------------------------------------------

def _add_predict(commands: argparse._SubParsersAction) -> None:
    from .postprocess import DEFAULT_MIN_SIZE

    parser = commands.add_parser("predict", help="segment an image or stack with a model",
                                 description="Segment a 2D image or 3D stack, tile by tile.")
    parser.add_argument("input", help="TIFF/OME-TIFF, PNG/JPEG, NIfTI file, DICOM series folder, "
                                      "zarr / OME-Zarr folder, or a folder of images (batch run)")
    parser.add_argument("-o", "--output-file", "--out", dest="output_file", required=True,
                        help="output file: .tif, or .zarr (streamed tile by tile with bounded "
                             "memory, resumable); for a batch run an output folder")
    parser.add_argument("--model", required=True,
                        help="shipped model name (see 'napari-unet models'), .pt file, or a "
                             "bioimage.io package (.zip or its rdf.yaml)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="auto: bf16 on CPUs with native bf16 and on GPUs, else fp32 (exact)")
    parser.add_argument("--output", default="labels", choices=["probabilities", "labels", "instances"],
                        help="probabilities, labels (binary or classes) or instances (one id per object)")
    parser.add_argument("--tile", type=_parse_ints, default=None,
                        help="largest tile read at once, e.g. 64,256,256 (default: from free memory)")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=None, help="tiles per forward pass")
    parser.add_argument("--max-tile-gb", type=float, default=None, metavar="GB",
                        help="memory for the tiles at once (default: a quarter of free memory; "
                             "1 GB for .zarr outputs); more memory means fewer halo voxels")
    parser.add_argument("--threshold", type=_finite_float(0, 1), default=None,
                        help="probability above which a voxel is foreground (0..1; default: the "
                             "model's tuned value, else 0.5)")
    parser.add_argument("--min-size", type=_int_at_least(0), default=None,
                        help="remove objects smaller than this (voxels; default: the model's tuned "
                             f"value, else {DEFAULT_MIN_SIZE})")
    parser.add_argument("--seed-threshold", type=_finite_float(0, 1), default=None,
                        help="instances: boundary (or membrane) probability below which a voxel "
                             "seeds an object (default: the model's tuned value, else --threshold; "
                             ".zarr outputs always use the model's)")
    parser.add_argument("--hu-window", type=_parse_window, default=None, metavar="CENTER,WIDTH",
                        help="CT: normalise with this Hounsfield window (e.g. 40,400) instead of the model's setting")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average over 8 flips and rotations (8x "
                             "slower, smoother)")
    big = parser.add_argument_group("big data (zarr output, dask, batch)")
    big.add_argument("--dask", nargs="?", const="local", default=None, metavar="SCHEDULER_ADDRESS",
                     help="run on dask: a LocalCluster on this machine, or the scheduler at this "
                          "address (e.g. tcp://host:8786 from dask-jobqueue)")
    big.add_argument("--workers", type=_int_at_least(1), default=None, help="LocalCluster workers (default: one per core)")
    big.add_argument("--save-probabilities", action="store_true",
                     help=".zarr output: also store the probabilities")
    big.add_argument("--overwrite", action="store_true",
                     help="replace a .zarr output made with another model or other settings")
    big.add_argument("--zarr-outputs", action="store_true",
                     help="batch run: write one streamed .zarr per input instead of a .tif")
    parser.set_defaults(handler=_run_predict)


def _parse_window(text: str) -> dict:
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CENTER,WIDTH like 40,400, got {text!r}") from None
    if width <= 0:
        raise argparse.ArgumentTypeError(f"window width must be positive, got {width:g}")
    return {"mode": "window", "center": center, "width": width}


def _run_predict(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .io import check_output_path, read_image, write_image_tiff, write_labels_tiff
    from .normalization import NonFiniteValuesWarning, fit_normalizer

    output_path = Path(args.output_file)
    if _is_big_data_run(args):
        return _run_predict_big(args)
    if output_path.suffix.lower() not in (".tif", ".tiff"):
        raise UsageError(f"output must be a .tif or .zarr file, got {output_path.name!r}")
    check_output_path(output_path)
    model = load_model(args.model)
    image = read_image(args.input, allow_channels=model.config.in_channels > 1)
    if output_path.exists() and image.path is not None and output_path.resolve() == Path(image.path).resolve():
        raise UsageError("refusing to overwrite the input image; choose another output file")
    nonfinite = _check_image_values(image, model)
    warnings.filterwarnings("ignore", category=NonFiniteValuesWarning)  # counted exactly above
    normalizer = fit_normalizer(image.data, args.hu_window) if args.hu_window else None
    from .zoo import segment_model  # a Zoo model made elsewhere runs with blended tiles

    job = segment_model(image.data, model, output=args.output, device=args.device,
                        precision=args.precision, tile_shape=args.tile,
                        max_bytes=_max_tile_bytes(args), batch_size=args.batch_size,
                        threshold=args.threshold, min_size=args.min_size,
                        seed_threshold=args.seed_threshold, voxel_size=image.voxel_size,
                        normalizer=normalizer, tta=args.tta)
    bar = None
    result = None
    try:
        while True:
            try:
                update = next(job)
            except StopIteration as stop:
                result = stop.value
                break
            if bar is None:
                bar = _progress_bar(update.total, f"{model.label}")
            if update.stage == "plan":
                bar.set_postfix_str(update.message)
                continue
            if update.stage == "postprocess":
                bar.set_postfix_str("post-processing")
            else:
                bar.total = update.total
                bar.n = update.done
                bar.refresh()
            if update.message:
                bar.write(f"note: {update.message}")
    finally:
        if bar is not None:
            bar.close()
    if nonfinite is not None:  # NaN / inf voxels are background in every output
        result.data[(Ellipsis, nonfinite) if result.data.ndim > nonfinite.ndim else nonfinite] = 0
    try:
        if args.output == "probabilities":
            data = result.data if result.data.shape[0] > 1 else result.data[0]
            axes = ("C" if data.ndim > len(image.spatial_axes) else "") + image.spatial_axes
            write_image_tiff(output_path, data.astype("float32"), voxel_size=image.voxel_size,
                             unit=image.unit or "um", input_path=image.path, axes=axes)
        else:
            write_labels_tiff(output_path, result.data, voxel_size=image.voxel_size,
                              unit=image.unit or "um", input_path=image.path)
    except OSError as err:
        raise OutputWriteError(output_path, err) from err
    summary = f"wrote {output_path}"
    if args.output == "instances":
        summary += f" ({int(result.data.max())} objects)"
    print(summary)
    return 0


class OutputWriteError(Exception):
    """Writing the output failed (disk full, permissions, ...); one line naming the user's
    path, exit code 1."""

    def __init__(self, path: Path, error: OSError):
        self.path, self.error = path, error
        super().__init__(f"cannot write {path}: {_os_reason(error)}")


def _os_reason(error: OSError) -> str:
    """``No space left on device`` and the like, without the (temporary) file name."""
    import os

    if error.strerror:
        return error.strerror
    if error.errno:
        return os.strerror(error.errno)
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _streamed_output_error(error: OSError, target: Path) -> Exception:
    """An OSError of a streamed run as one line: about the output when it concerns the output
    (a file under it, disk full, read-only), else about the file it names."""
    import errno
    import os

    name = error.filename
    if name is not None:
        inside = os.path.abspath(name).startswith(os.path.abspath(target))
        if inside or Path(name).parent == target.parent:
            return OutputWriteError(target, error)
        return OSError(error.errno, _os_reason(error), name)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG):
        return OutputWriteError(target, error)
    return error


def _check_image_values(image: LoadedImage, model: SegmentationModel) -> np.ndarray | None:
    """Refuse an image with nothing to segment; warn about NaN / infinite voxels.

    Returns the mask of non-finite voxels (spatial axes only), or None when there are none.
    A constant image is refused only when the model's dimensions fit it (otherwise the
    dimension error is the one that helps).
    """
    import numpy as np

    data = image.data
    spatial = len(image.spatial_axes)
    if spatial < model.spatial_dims or data.size == 0:
        return None
    mask = None
    if np.issubdtype(data.dtype, np.inexact):
        finite = np.isfinite(data)
        if finite.ndim > spatial:
            finite = finite.all(axis=0)
        n_bad = int(finite.size - np.count_nonzero(finite))
        if n_bad == finite.size:
            raise UsageError("the image has no finite values (every voxel is NaN or infinite): "
                             "nothing to segment")
        if n_bad:
            mask = ~finite
            verb = "is" if n_bad == 1 else "are"
            print(f"napari-unet: warning: {n_bad} of {finite.size} voxels {verb} NaN or infinite; "
                  "treated as background", file=sys.stderr)
    values = data[..., ~mask] if mask is not None else data
    low, high = values.min(), values.max()
    if low == high:
        shown = bool(low) if data.dtype == np.bool_ else f"{low:g}"
        raise UsageError(f"the image is constant (every voxel is {shown}): nothing to segment")
    return mask


def _max_tile_bytes(args: argparse.Namespace) -> float | None:
    if args.max_tile_gb is None:
        return None
    if not args.max_tile_gb > 0:
        raise UsageError(f"--max-tile-gb must be positive, got {args.max_tile_gb:g}")
    return args.max_tile_gb * 2**30


def _require(module: str, what: str, extra: str) -> None:
    """Refuse ``what`` in one line when the optional ``module`` (of the extra ``extra``) is missing."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UsageError(f"{what} needs the optional package {module!r}: "
                         f"pip install 'napari-unet[{extra}]'")


def _is_batch_input(path: Path) -> bool:
    from .cluster import batch_inputs
    from .io import is_zarr_path

    return path.is_dir() and not is_zarr_path(path) and bool(batch_inputs(path))


def _is_big_data_run(args: argparse.Namespace) -> bool:
    """Streamed (.zarr output), dask or batch runs; plain .tif runs keep the in-memory path."""
    return (Path(args.output_file).suffix.lower() == ".zarr" or args.dask is not None
            or _is_batch_input(Path(args.input).expanduser()))


def _drain_with_bar(job, desc: str, unit: str = "tile"):
    """Run a core generator with a progress bar (a second one for merging); returns its result."""
    bar, stage, plan_note = None, None, ""
    try:
        while True:
            try:
                update = next(job)
            except StopIteration as stop:
                return stop.value
            if update.stage == "plan":  # precision and tiles: shown on the progress line
                plan_note = update.message
                if bar is not None:
                    bar.set_postfix_str(plan_note)
                continue
            if bar is None or update.stage != stage:
                if bar is not None:
                    bar.close()
                stage = update.stage
                merging = stage == "postprocess"
                bar = _progress_bar(update.total, f"{desc} (merging)" if merging else desc,
                                    "chunk" if merging else unit)
                if plan_note and not merging:
                    bar.set_postfix_str(plan_note)
            bar.total = update.total
            bar.n = update.done
            bar.refresh()
            if update.message and update.stage != "postprocess":
                bar.write(f"note: {update.message}")
    finally:
        if bar is not None:
            bar.close()


def _run_predict_big(args: argparse.Namespace) -> int:
    """``.zarr`` outputs (lazy input, streamed, resumable), ``--dask`` and folder batch runs."""
    import contextlib
    import dataclasses

    from .checkpoint import load_model
    from .cluster import batch_inputs, dask_client, predict_batch, predict_to_zarr_distributed
    from .io import ImageReadError, check_output_path, open_lazy
    from .streaming import predict_to_zarr

    source, target = Path(args.input).expanduser(), Path(args.output_file).expanduser()
    if not source.exists():
        raise ImageReadError(f"file not found: {source}")
    batch = _is_batch_input(source)
    if not batch and target.suffix.lower() != ".zarr":
        raise UsageError(f"--dask needs a .zarr output for a single image (streamed by tiles), "
                         f"got {target.name!r}")
    if batch and target.suffix.lower() in (".tif", ".tiff", ".zarr"):
        raise UsageError("a folder of images is a batch run: -o must be an output folder")
    if not batch and target.resolve() == source.resolve():
        raise UsageError("refusing to overwrite the input image; choose another output")
    check_output_path(target, folder=True, create_parent=True)
    if args.dask is not None:
        _require("distributed", "--dask", "dask")
    model = load_model(args.model)
    if getattr(model, "foreign", False):
        raise UsageError(f"{Path(args.model).name} is a Zoo model made elsewhere: it runs with a "
                         ".tif output (in memory), not streamed, batched or on dask")
    if getattr(args, "hu_window", None):
        model = dataclasses.replace(model, normalization=dict(args.hu_window))
    allow_channels = model.config.in_channels > 1
    context = (dask_client(args.dask, n_workers=args.workers) if args.dask is not None
               else contextlib.nullcontext(None))
    with context as client:
        if client is not None:
            workers = len(client.scheduler_info().get("workers", {}))
            print(f"dask: scheduler {client.scheduler.address}, {workers} workers", file=sys.stderr)
        try:
            if batch:
                job = predict_batch(batch_inputs(source), model, target, client=client,
                                    suffix=".zarr" if args.zarr_outputs else ".tif",
                                    output=args.output, threshold=args.threshold,
                                    min_size=args.min_size, device=args.device,
                                    tile_shape=args.tile, overwrite=args.overwrite,
                                    precision=args.precision, tta=args.tta)
                written = _drain_with_bar(job, f"{model.label} batch", unit="file")
                print(f"wrote {len(written)} files to {target}")
                return 0
            options = dict(output=args.output, probabilities=args.save_probabilities,
                           threshold=args.threshold, min_size=args.min_size, device=args.device,
                           precision=args.precision, tile_shape=args.tile, overwrite=args.overwrite,
                           tta=args.tta)
            if args.max_tile_gb is not None:
                options["max_tile_bytes"] = _max_tile_bytes(args)
            image = open_lazy(source, allow_channels=allow_channels)
            if client is not None:
                job = predict_to_zarr_distributed(client, str(source), model, target,
                                                  voxel_size=image.voxel_size, unit=image.unit,
                                                  allow_channels=allow_channels, **options)
            else:
                job = predict_to_zarr(image.data, model, target, voxel_size=image.voxel_size,
                                      unit=image.unit, input_path=source, **options)
            result = _drain_with_bar(job, model.label)
        except FileExistsError as err:
            raise UsageError(str(err)) from None
        except OSError as err:
            mapped = _streamed_output_error(err, target)
            if mapped is err:
                raise
            raise mapped from err
    summary = f"wrote {target}"
    if result.tiles_skipped:
        summary += f" (resumed: {result.tiles_skipped} of {result.tiles_total} tiles were already done)"
    if result.n_objects is not None:
        summary += f" ({result.n_objects} objects)"
    print(summary)
    return 0


# --- models --------------------------------------------------------------------------------

def _add_models(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("models", help="list the shipped models, one per line, name first")
    parser.set_defaults(handler=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from .checkpoint import list_pretrained, load_checkpoint

    for name, path in list_pretrained().items():
        model = load_checkpoint(path)
        print(f"{name}\t{model.spatial_dims}D\t{model.task}\t{model.description}")
    sys.stdout.flush()  # a closed pipe (| head -1) is reported here, inside main()
    return 0


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
    annotated.add_argument("--slices", type=_parse_slices, default=None,
                           help="annotated slices of each stack, e.g. 3,17,40 or 0-23")
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
                        help="keep the post-processing defaults (by default threshold, seed threshold "
                             "and minimum object size are tuned on the held-out part and stored)")
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

    from .checkpoint import check_not_shipped, list_pretrained, load_model
    from .io import check_output_path, read_image
    from .training import Trainer, TrainingConfig, TrainingPair, new_model

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
                            validation_fraction=args.validation_fraction, seed=args.seed,
                            device=args.device, precision=args.precision, freeze_norm=freeze,
                            loss=args.loss, accumulate_steps=args.accumulate,
                            gradient_checkpointing=args.gradient_checkpointing)
    trainer = Trainer(model, pairs, config)
    result, interrupted = _drain_training(trainer, model.label)
    if args.name:
        result.name = args.name
    if args.description is not None:
        result.description = args.description
    if parent_path is not None and Path(parent_path).suffix:
        result.parent = f"{model.label} ({Path(parent_path).name})"
    if args.tune and not interrupted:
        tuned = trainer.tune_postprocessing(result)
        if tuned is not None:
            values = ", ".join(f"{k} {v}" for k, v in tuned.settings.items())
            print(f"post-processing tuned on the held-out part: {values} ({tuned.metric} "
                  f"{tuned.score:.3f}; defaults {tuned.default_score:.3f})")
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
    from .checkpoint import save_checkpoint

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
    try:
        while True:
            try:
                stats = next(job)
            except StopIteration as stop:
                return stop.value, None
            if stats.message:
                bar.write(f"note: {stats.message}")
            bar.n = stats.iteration if total else min(int(stats.elapsed), int(round(limit)))
            postfix = f"loss={stats.loss:.4f} it={stats.iteration}"
            if stats.best_score is not None:
                postfix += f" val_dice={stats.best_score:.3f}"
            bar.set_postfix_str(postfix, refresh=False)
            bar.refresh()
    except KeyboardInterrupt as err:  # Ctrl+C, or SIGTERM (see _interrupt_on_signals)
        job.close()
        best = trainer.best_model()
        if best is None:
            raise
        return best, getattr(err, "signal_name", "SIGINT")
    finally:
        bar.close()


# --- eval ----------------------------------------------------------------------------------

def _add_eval(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("eval", help="score a segmentation against ground truth",
                                 description="Pixel Dice/IoU and, for instance labels, object "
                                             "precision/recall/F1 and mean IoU of matches.")
    parser.add_argument("pred", help="predicted labels (file)")
    parser.add_argument("gt", help="ground-truth labels (file)")
    parser.add_argument("--iou-threshold", type=_finite_float(0, 1), default=0.5)
    parser.add_argument("--instances", choices=["auto", "yes", "no"], default="auto",
                        help="also score objects (auto: when the ground truth has several ids)")
    parser.add_argument("--slices", type=_parse_slices, default=None,
                        help="score only these slices of a stack, e.g. 24-29")
    parser.add_argument("--threshold", type=_finite_float(0, 1), default=None,
                        help="the prediction is a probability map: foreground where it is above "
                             "this value (NaN = background)")
    parser.set_defaults(handler=_run_eval)


def _read_label_file(path: str, what: str):
    """A one-channel label image for ``eval``; other images are refused naming the file."""
    from .io import read_image

    image = read_image(path, allow_channels=True)
    if "C" in image.axes:
        raise UsageError(f"{what} {Path(path).name} has {image.data.shape[0]} channels (axes "
                         f"{image.axes}, e.g. an RGB picture); eval compares one-channel label images")
    return image.data


def _run_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from .metrics import as_label_image, evaluate, format_scores

    pred = _read_label_file(args.pred, "prediction")
    gt = _read_label_file(args.gt, "ground truth")
    if args.threshold is not None:
        if not np.issubdtype(pred.dtype, np.number) or pred.dtype == np.bool_:
            raise UsageError("--threshold applies to a probability map (float prediction), "
                             f"{Path(args.pred).name} holds {pred.dtype}")
        with np.errstate(invalid="ignore"):
            pred = np.asarray(pred > args.threshold)  # NaN > t is False: background
    pred = as_label_image(pred, f"prediction {Path(args.pred).name}")
    gt = as_label_image(gt, f"ground truth {Path(args.gt).name}")
    if pred.shape != gt.shape:
        raise UsageError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if args.slices is not None:
        if gt.ndim < 3:
            raise UsageError("--slices only applies to stacks")
        bad = [s for s in args.slices if not 0 <= s < gt.shape[0]]
        if bad:
            raise UsageError(f"slices {bad} outside 0..{gt.shape[0] - 1}")
        pred, gt = pred[args.slices], gt[args.slices]
    instances = {"auto": None, "yes": True, "no": False}[args.instances]
    print(format_scores(evaluate(pred, gt, instances=instances, iou_threshold=args.iou_threshold)))
    return 0


# --- export --------------------------------------------------------------------------------

EXPORT_FORMATS = {".onnx": "onnx", ".zip": "bioimageio"}


def _add_export(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export", help="write a model as ONNX or as a bioimage.io Model Zoo package",
        description="Write MODEL (shipped name, .pt checkpoint or a package made by napari-unet) "
                    "as ONNX (.onnx: the network, dynamic batch and spatial axes, checked against "
                    "torch with onnxruntime) or as a bioimage.io model package (.zip, model spec "
                    "0.5: weights as PyTorch state dict, TorchScript and ONNX, test tensors, "
                    "cover, model card; validated with bioimageio.spec).")
    parser.add_argument("model", help="shipped model name (see 'napari-unet models') or model file")
    parser.add_argument("-o", "--output-file", "--out", dest="output_file", required=True,
                        help="NAME.onnx or NAME.zip")
    parser.add_argument("--format", choices=["auto", "onnx", "bioimageio"], default="auto",
                        help="auto: from the output's suffix (.onnx: onnx, .zip: bioimageio)")
    parser.add_argument("--test-image", default=None,
                        help="bioimageio: image for the package's test tensors (a centred crop; "
                             "default: the model's sample image)")
    parser.add_argument("--weights", default="pytorch_state_dict,torchscript,onnx",
                        help="bioimageio: weight formats, comma separated (pytorch_state_dict "
                             "always; torchscript, onnx)")
    parser.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .checkpoint import check_not_shipped, load_model
    from .io import check_output_path, read_image

    output_path = Path(args.output_file)
    suffix = output_path.suffix.lower()
    fmt = EXPORT_FORMATS.get(suffix) if args.format == "auto" else args.format
    if fmt is None:
        raise UsageError(f"cannot tell the format from {output_path.name!r}: name it .onnx or "
                         ".zip, or give --format")
    wanted = {"onnx": ".onnx", "bioimageio": ".zip"}[fmt]
    if suffix != wanted:
        raise UsageError(f"--format {fmt} writes a {wanted} file, got {output_path.name!r}")
    check_not_shipped(output_path)
    check_output_path(output_path, create_parent=True)
    model = load_model(args.model)
    if getattr(model, "foreign", False):
        raise UsageError(f"{args.model} is a Zoo model made elsewhere; only napari-unet models "
                         "are exported")
    if fmt == "onnx":
        from .onnx_export import export_onnx

        written = export_onnx(model, output_path)
        print(f"wrote {written} ({model.label}; checked against torch with onnxruntime)")
        return 0
    from .zoo_export import export_bioimageio

    test_image = None
    if args.test_image is not None:
        test_image = read_image(args.test_image, allow_channels=model.config.in_channels > 1).data
    formats = [f.strip() for f in args.weights.split(",") if f.strip()]
    report = export_bioimageio(model, output_path, test_image=test_image, weight_formats=formats)
    print(f"wrote {report.path} ({model.label}; weights: {', '.join(report.weight_formats)}); "
          f"{report.summary()}")
    return 0


# --- gui -----------------------------------------------------------------------------------

def _add_gui(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("gui", help="open napari with the napari-unet docks",
                                 description="Open napari with the Segment, Edit, Fine-tune and "
                                             "Export docks and FILE loaded (a sample without FILE).")
    parser.add_argument("file", nargs="?", default=None,
                        help="image to open (TIFF/OME-TIFF, PNG/JPEG, NIfTI, DICOM folder)")
    parser.add_argument("--sample", default="nuclei_3d",
                        choices=["em_2d", "nuclei_2d", "nuclei_3d", "cells_3d", "ct_small"],
                        help="sample opened when no FILE is given (default: nuclei_3d)")
    parser.set_defaults(handler=_run_gui)


def _run_gui(args: argparse.Namespace) -> int:
    if args.file is not None and not Path(args.file).exists():
        raise UsageError(f"file not found: {args.file}")
    from ._widgets._launch import run_gui  # lazily: napari is imported only for this command

    run_gui(args.file, sample=args.sample)
    return 0


# --- suggest -------------------------------------------------------------------------------


def _add_suggest(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "suggest", help="rank the slices of a stack worth correcting first",
        description="Segment a stack and print the slices where the model is most uncertain "
                    "(index and score, best first): the ones to correct and fine-tune on.")
    parser.add_argument("input", help="3D stack (TIFF/OME-TIFF, NIfTI, zarr, DICOM series folder)")
    parser.add_argument("--model", required=True, help="shipped model name or .pt file (2D models run slice by slice)")
    parser.add_argument("-n", type=_int_at_least(1), default=5, help="slices to suggest (default 5)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: the disagreement between 8 flips and "
                             "rotations counts too (8x slower)")
    parser.add_argument("--min-gap", type=_int_at_least(1), default=None,
                        help="suggested slices are at least this far apart (default: the stack "
                             "depth / 2n; 1 = no spacing)")
    parser.add_argument("--exclude", type=_parse_slices, default=None,
                        help="slices never to suggest (e.g. already corrected), like 3,10-12")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--tile", type=_parse_ints, default=None, help="largest tile read at once")
    parser.add_argument("--threshold", type=_finite_float(0, 1), default=None,
                        help="foreground probability threshold (default: the model's, else 0.5)")
    parser.add_argument("--uncertainty", default=None, metavar="FILE.tif",
                        help="also write the uncertainty map (0..1, float32) to this file")
    parser.set_defaults(handler=_run_suggest)


def _run_suggest(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .io import check_output_path, read_image, write_image_tiff
    from .uncertainty import suggest

    target = Path(args.uncertainty) if args.uncertainty else None
    if target is not None:
        if target.suffix.lower() not in (".tif", ".tiff"):
            raise UsageError(f"--uncertainty must be a .tif file, got {target.name!r}")
        check_output_path(target)
    model = load_model(args.model)
    image = read_image(args.input, allow_channels=model.config.in_channels > 1)
    if len(image.spatial_axes) != 3:
        raise UsageError(f"suggest ranks the slices of a 3D stack; {Path(args.input).name} is "
                         f"a {len(image.spatial_axes)}D image")
    _check_image_values(image, model)
    job = suggest(image.data, model, args.n, tta=args.tta, min_gap=args.min_gap,
                  exclude=args.exclude or (), threshold=args.threshold, device=args.device,
                  precision=args.precision, tile_shape=args.tile)
    found = _drain_with_bar(job, model.label)
    if target is not None:
        try:
            write_image_tiff(target, found.uncertainty.astype("float32"), voxel_size=image.voxel_size,
                             unit=image.unit or "um", input_path=image.path, axes=image.spatial_axes)
        except OSError as err:
            raise OutputWriteError(target, err) from err
    print("slice\tscore")
    for z, score in found.slices:
        print(f"{z}\t{score:.4f}")
    return 0


# --- entry point ---------------------------------------------------------------------------

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_predict, _add_models]
COMMANDS += [_add_train, _add_eval, _add_export]
COMMANDS += [_add_gui]
COMMANDS += [_add_suggest]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="napari-unet", description="UNet segmentation for microscopy and CT.")
    parser.add_argument("--verbose", action="store_true", help="on errors, print the details")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add_command in COMMANDS:
        add_command(commands)
    for command in set(commands.choices.values()):  # also accepted after the command name
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="on errors, print the details")
    return parser


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by SIGINT / SIGTERM while a command runs."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


def _raise_interrupted(signum: int, frame: object) -> None:
    import signal

    raise Interrupted(signal.Signals(signum).name)


class _InterruptOnSignals:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` for the duration of a command, so a
    terminated ``train`` saves the best model so far and temporary files are removed."""

    def __enter__(self) -> "_InterruptOnSignals":
        import signal
        import threading

        self._saved: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._saved[signum] = signal.signal(signum, _raise_interrupted)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        for signum, handler in self._saved.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _first_line(text: str) -> str:
    """The first line of a message, with `` ...`` when there was more."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] + (" ..." if len(lines) > 1 else "")


def _report(err: BaseException, verbose: bool, prefix: str = "error: ") -> None:
    """The error as one line on stderr (with the traceback first under ``--verbose``)."""
    import traceback

    if verbose:
        traceback.print_exception(err, file=sys.stderr)
    if isinstance(err, OSError) and not isinstance(err, BrokenPipeError) and err.filename:
        text = f"{err.filename}: {_os_reason(err)}"
    else:
        text = _first_line(str(err)) or type(err).__name__
        if text.endswith(" ...") and not verbose:  # shortened: the traceback has it all
            text += " (--verbose for details)"
    print(f"napari-unet: {prefix}{text}", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None,
                  *, _original=warnings.showwarning) -> None:
    """napari-unet's own warnings (NaN voxels, ...) as one line; others as usual."""
    from .normalization import NonFiniteValuesWarning

    if issubclass(category, NonFiniteValuesWarning):
        print(f"napari-unet: warning: {_first_line(str(message))}", file=sys.stderr)
    else:
        _original(message, category, filename, lineno, file, line)


def _silence_stdout() -> None:
    """After a closed pipe (``napari-unet models | head -1``): send the rest to /dev/null, so
    that flushing stdout at exit does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    0: done; 1: the run failed (disk full, out of memory, another OS error); 2: bad arguments
    or unreadable inputs; 130: interrupted (SIGINT / SIGTERM); 141: stdout was closed.
    Errors are one line on stderr; ``--verbose`` adds the traceback.
    """
    from .checkpoint import CheckpointError
    from .io import ImageReadError
    from .normalization import NonFiniteValuesWarning

    verbose = False
    with warnings.catch_warnings():
        warnings.simplefilter("always", NonFiniteValuesWarning)
        warnings.showwarning = _show_warning
        try:
            args = build_parser().parse_args(argv)
            verbose = bool(getattr(args, "verbose", False))
            if args.command == "gui":  # napari handles its own signals
                return int(args.handler(args) or 0)
            with _InterruptOnSignals():
                return int(args.handler(args) or 0)
        except (UsageError, CheckpointError, ImageReadError, ValueError, FileNotFoundError) as err:
            _report(err, verbose)
            return EXIT_USAGE
        except (OutputWriteError, MemoryError) as err:
            _report(err, verbose)
            return 1
        except BrokenPipeError:
            _silence_stdout()
            return 141
        except OSError as err:
            _report(err, verbose)
            return 1
        except KeyboardInterrupt as err:
            name = getattr(err, "signal_name", None)
            print(f"napari-unet: interrupted{f' by {name}' if name else ''}", file=sys.stderr)
            return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
