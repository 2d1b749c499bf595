"""What every subcommand shares: argument parsing, errors, exit codes and the progress bar."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from napari_unet.progress import Progress, drain

if TYPE_CHECKING:
    import numpy as np

    from napari_unet.io.formats import LoadedImage
    from napari_unet.model.checkpoint import SegmentationModel

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


def _require(module: str, what: str, extra: str) -> None:
    """Refuse ``what`` in one line when the optional ``module`` (of the extra ``extra``) is missing."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UsageError(f"{what} needs the optional package {module!r}: "
                         f"pip install 'napari-unet-loop[{extra}]'")


def _drain_with_bar(job, desc: str, unit: str = "tile"):
    """Run a core generator with a progress bar (a second one for merging); returns its result."""
    bar, stage, plan_note = None, None, ""

    def show(update: Progress) -> None:
        nonlocal bar, stage, plan_note
        if update.stage == "plan":  # precision and tiles: shown on the progress line
            plan_note = update.message
            if bar is not None:
                bar.set_postfix_str(plan_note)
            return
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

    try:
        return drain(job, show)
    finally:
        if bar is not None:
            bar.close()
