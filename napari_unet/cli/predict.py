"""``napari-unet predict``: segment images, in memory, streamed to Zarr, in batch or on dask."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from napari_unet.cli.common import (
    OutputWriteError,
    UsageError,
    _check_image_values,
    _drain_with_bar,
    _finite_float,
    _int_at_least,
    _os_reason,
    _parse_ints,
    _progress_bar,
    _require,
)
from napari_unet.progress import Progress, drain

# --- predict -------------------------------------------------------------------------------

def _add_predict(commands: argparse._SubParsersAction) -> None:
    from napari_unet.labels.instances import DEFAULT_MIN_SIZE
    from napari_unet.labels.stitch import DEFAULT_STITCH_THRESHOLD

    parser = commands.add_parser("predict", help="segment an image or stack with a model",
                                 description="Segment a 2D image or 3D stack, tile by tile.")
    parser.add_argument("input", help="TIFF/OME-TIFF, PNG/JPEG, NIfTI file, DICOM series folder, "
                                      "zarr / OME-Zarr folder, or a folder of images (batch run)")
    parser.add_argument("-o", "--output-file", "--out", dest="output_file", required=True,
                        help="output file: .tif, .zarr (streamed tile by tile with bounded "
                             "memory, resumable) or .ome.zarr (the same, written as OME-Zarr: "
                             "the image with its labels under labels/, multiscale); for a batch "
                             "run an output folder")
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
    parser.add_argument("--stitch-threshold", type=_finite_float(0, 1), default=None,
                        help="instances of a 2D model on a stack: objects of neighbouring slices "
                             "with IoU at least this are one object (default "
                             f"{DEFAULT_STITCH_THRESHOLD}); 0 keeps the objects per slice")
    parser.add_argument("--object-size", type=_object_size, default=None, metavar="DIAMETER",
                        help="expected object diameter, e.g. 12 (µm when the image has a voxel "
                             "size, else pixels), 12px or 12um, or 'auto' (estimated on a first "
                             "pass); each tile is resampled so objects reach the model at its "
                             "training size, and labels come back on the image's grid (default: "
                             "the image's voxel size against the model's, else no resampling)")
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


def _stitch_option(args: argparse.Namespace) -> dict:
    """``stitch_threshold`` when given (else the default of :func:`segment`)."""
    value = getattr(args, "stitch_threshold", None)
    return {} if value is None else {"stitch_threshold": float(value)}


def _object_size(text: str) -> tuple[float, str | None] | str:
    """``--object-size``: ``auto`` or ``(diameter, unit)``."""
    from napari_unet.labels.object_size import parse_object_size

    if text.strip().lower() == "auto":
        return "auto"
    try:
        return parse_object_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _object_scale(args: argparse.Namespace, model, data, voxel_size, unit
                  ) -> tuple[float, ...] | None:
    """The zoom of ``--object-size`` (or its default) for ``model`` on ``data`` with
    ``voxel_size`` in ``unit``; says which."""
    from napari_unet.engine.resample import scale_for_model
    from napari_unet.io.formats import voxel_size_um

    voxel_size = voxel_size_um(voxel_size, unit)  # sizes are compared in µm

    size = getattr(args, "object_size", None)
    if size is not None and getattr(model, "foreign", False):
        raise UsageError("--object-size needs a napari-unet model (a Zoo model made elsewhere "
                         "does not store the size of its training objects)")
    if getattr(model, "foreign", False):
        return None
    try:
        if size == "auto":
            from napari_unet.engine.estimate import estimate_object_size, zoom_from_estimate

            diameter = drain(estimate_object_size(data, model, voxel_size=voxel_size,
                                                  device=args.device, precision=args.precision))
            scale, source = zoom_from_estimate(model, voxel_size, diameter)
        else:
            scale, source = scale_for_model(model, voxel_size, size)
    except ValueError as err:
        raise UsageError(f"--object-size: {err}") from None
    if scale is not None:
        shown = ", ".join(f"{s:.3g}" for s in scale)
        print(f"napari-unet: resampling tiles x({shown}) for the model: {source}", file=sys.stderr)
    elif size is not None:
        print(f"napari-unet: no resampling: {source}", file=sys.stderr)
    return scale


def _parse_window(text: str) -> dict:
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CENTER,WIDTH like 40,400, got {text!r}") from None
    if width <= 0:
        raise argparse.ArgumentTypeError(f"window width must be positive, got {width:g}")
    return {"mode": "window", "center": center, "width": width}


def _run_predict(args: argparse.Namespace) -> int:
    from napari_unet.io.files import check_output_path
    from napari_unet.io.readers import read_image
    from napari_unet.io.writers import write_image_tiff, write_labels_tiff
    from napari_unet.model.normalization import NonFiniteValuesWarning, fit_normalizer
    from napari_unet.zoo.loading import load_model

    output_path = Path(args.output_file)
    if _is_big_data_run(args):
        return _run_predict_big(args)
    if output_path.suffix.lower() not in (".tif", ".tiff"):
        raise UsageError(f"output must be a .tif or .zarr file, got {output_path.name!r}")
    _refuse_input_as_output(output_path, Path(args.input).expanduser())
    check_output_path(output_path)
    model = load_model(args.model)
    image = read_image(args.input, allow_channels=model.config.in_channels > 1)
    nonfinite = _check_image_values(image, model)
    warnings.filterwarnings("ignore", category=NonFiniteValuesWarning)  # counted exactly above
    normalizer = fit_normalizer(image.data, args.hu_window) if args.hu_window else None
    scale = _object_scale(args, model, image.data, image.voxel_size, image.unit)
    # a Zoo model made elsewhere runs with blended tiles
    from napari_unet.zoo.predict import segment_model

    job = segment_model(image.data, model, output=args.output, device=args.device,
                        precision=args.precision, tile_shape=args.tile,
                        max_bytes=_max_tile_bytes(args), batch_size=args.batch_size,
                        threshold=args.threshold, min_size=args.min_size,
                        seed_threshold=args.seed_threshold, voxel_size=image.voxel_size,
                        normalizer=normalizer, tta=args.tta, scale=scale, **_stitch_option(args))
    bar = None

    def show(update: Progress) -> None:
        nonlocal bar
        if bar is None:
            bar = _progress_bar(update.total, f"{model.label}")
        if update.stage == "plan":
            bar.set_postfix_str(update.message)
            return
        if update.stage == "postprocess":
            bar.set_postfix_str("post-processing")
        else:
            bar.total = update.total
            bar.n = update.done
            bar.refresh()
        if update.message:
            bar.write(f"note: {update.message}")

    try:
        result = drain(job, show)
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


def _refuse_input_as_output(output: Path, source: Path | None) -> None:
    """Refuse an output that is the input: the same path, a link, or a hard link to it."""
    import os

    if source is None:
        return
    same = output.resolve() == Path(source).resolve()
    if not same and output.exists():
        try:
            same = os.path.samefile(output, source)
        except OSError:
            same = False
    if same:
        raise UsageError(f"refusing to overwrite the input image: {output} is the input image "
                         "(the same file or a link to it); choose another output file")


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


#: the options of ``predict`` behind each setting a streamed output stores
_SETTING_OPTIONS = {
    "model": "--model", "task": "--model", "output": "--output",
    "probabilities": "--save-probabilities", "probability_dtype": "--save-probabilities",
    "threshold": "--threshold", "min_size": "--min-size", "seed_threshold": "--seed-threshold",
    "tta": "--tta", "voxel_size": "the voxel size", "object_scale": "--object-size", "method": "the instance method",
    "settings": "the settings",
}


def _mismatch_message(error: Exception) -> str:
    """A :class:`StreamMismatchError` in the words of the command line."""
    path = error.path
    if "input" in error.differences:
        what = f"another image ({error.detail})" if error.detail else "another image"
        return (f"{path} holds a prediction of {what}; --overwrite starts over, or choose "
                "another output")
    names = list(dict.fromkeys(_SETTING_OPTIONS.get(d, d) for d in error.differences))
    verb = "differs" if len(names) == 1 else "differ"
    return (f"{path} was made with other settings ({', '.join(names)} {verb}); run again with "
            "the same ones to resume, or --overwrite starts over")


def _max_tile_bytes(args: argparse.Namespace) -> float | None:
    if args.max_tile_gb is None:
        return None
    if not args.max_tile_gb > 0:
        raise UsageError(f"--max-tile-gb must be positive, got {args.max_tile_gb:g}")
    return args.max_tile_gb * 2**30


def _is_batch_input(path: Path) -> bool:
    from napari_unet.bigdata.cluster import batch_inputs
    from napari_unet.io.lazy import is_zarr_path

    return path.is_dir() and not is_zarr_path(path) and bool(batch_inputs(path))


def _is_big_data_run(args: argparse.Namespace) -> bool:
    """Streamed (.zarr output), dask or batch runs; plain .tif runs keep the in-memory path."""
    return (Path(args.output_file).suffix.lower() == ".zarr" or args.dask is not None
            or _is_batch_input(Path(args.input).expanduser()))


def _run_predict_big(args: argparse.Namespace) -> int:
    """``.zarr`` outputs (lazy input, streamed, resumable), ``--dask`` and folder batch runs."""
    import contextlib
    import dataclasses

    from napari_unet.bigdata.cluster import (
        batch_inputs,
        dask_client,
        predict_batch,
        predict_to_zarr_distributed,
    )
    from napari_unet.bigdata.store import StreamMismatchError
    from napari_unet.bigdata.streaming import predict_to_zarr
    from napari_unet.io.files import check_output_path
    from napari_unet.io.formats import ImageReadError
    from napari_unet.io.lazy import open_lazy
    from napari_unet.zoo.loading import load_model

    source, target = Path(args.input).expanduser(), Path(args.output_file).expanduser()
    if not source.exists():
        raise ImageReadError(f"file not found: {source}")
    batch = _is_batch_input(source)
    if not batch and target.suffix.lower() != ".zarr":
        raise UsageError(f"--dask needs a .zarr output for a single image (streamed by tiles), "
                         f"got {target.name!r}")
    if batch and target.suffix.lower() in (".tif", ".tiff", ".zarr"):
        raise UsageError("a folder of images is a batch run: -o must be an output folder")
    if not batch:
        _refuse_input_as_output(target, source)
    check_output_path(target, folder=True, create_parent=True)
    if args.dask is not None:
        _require("distributed", "--dask", "dask")
    if not batch and target.name.lower().endswith(".ome.zarr"):
        _require("ome_zarr", "an .ome.zarr output", "ome")
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
                if args.object_size == "auto":
                    raise UsageError("--object-size auto is for one image; give the diameter "
                                     "for a batch run (e.g. 12px)")
                job = predict_batch(batch_inputs(source), model, target, client=client,
                                    suffix=".zarr" if args.zarr_outputs else ".tif",
                                    output=args.output, threshold=args.threshold,
                                    min_size=args.min_size, device=args.device,
                                    tile_shape=args.tile, overwrite=args.overwrite,
                                    precision=args.precision, tta=args.tta,
                                    object_size=args.object_size)
                written = _drain_with_bar(job, f"{model.label} batch", unit="file")
                print(f"wrote {len(written)} files to {target}")
                return 0
            options = dict(output=args.output, probabilities=args.save_probabilities,
                           threshold=args.threshold, min_size=args.min_size, device=args.device,
                           precision=args.precision, tile_shape=args.tile, overwrite=args.overwrite,
                           tta=args.tta, **_stitch_option(args))
            if args.max_tile_gb is not None:
                options["max_tile_bytes"] = _max_tile_bytes(args)
            image = open_lazy(source, allow_channels=allow_channels)
            options["scale"] = _object_scale(args, model, image.data, image.voxel_size,
                                             image.unit)
            if client is not None:
                job = predict_to_zarr_distributed(client, str(source), model, target,
                                                  voxel_size=image.voxel_size, unit=image.unit,
                                                  allow_channels=allow_channels, **options)
            else:
                job = predict_to_zarr(image.data, model, target, voxel_size=image.voxel_size,
                                      unit=image.unit, input_path=source, **options)
            result = _drain_with_bar(job, model.label)
        except StreamMismatchError as err:
            raise UsageError(_mismatch_message(err)) from None
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
