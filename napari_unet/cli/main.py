"""The ``napari-unet`` command: the parser of all subcommands and the error handling around them."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Callable, Sequence

from napari_unet.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    OutputWriteError,
    UsageError,
    _os_reason,
    _Parser,
)
from napari_unet.cli.evaluate import _add_eval
from napari_unet.cli.export import _add_export
from napari_unet.cli.gui import _add_gui
from napari_unet.cli.measure import _add_measure
from napari_unet.cli.models import _add_models
from napari_unet.cli.predict import _add_predict
from napari_unet.cli.suggest import _add_suggest
from napari_unet.cli.train import _add_train

# --- entry point ---------------------------------------------------------------------------

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_predict, _add_models]
COMMANDS += [_add_train, _add_eval, _add_export]
COMMANDS += [_add_gui]
COMMANDS += [_add_suggest]
COMMANDS += [_add_measure]


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
    from napari_unet.io.formats import CalibrationWarning
    from napari_unet.model.normalization import NonFiniteValuesWarning

    if issubclass(category, (NonFiniteValuesWarning, CalibrationWarning)):
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
    from napari_unet.io.formats import CalibrationWarning, ImageReadError
    from napari_unet.model.checkpoint import CheckpointError
    from napari_unet.model.normalization import NonFiniteValuesWarning

    verbose = False
    with warnings.catch_warnings():
        warnings.simplefilter("always", NonFiniteValuesWarning)
        warnings.simplefilter("always", CalibrationWarning)
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
