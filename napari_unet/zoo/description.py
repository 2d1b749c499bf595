"""Reading a bioimage.io model description (``rdf.yaml`` or ``.zip``)."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

from napari_unet.model.checkpoint import CheckpointError

ZOO_FORMAT = "napari-unet-bioimageio/1"
CONFIG_KEY = "napari_unet"


class ZooError(CheckpointError):
    """A Zoo package that cannot be read, run or written; the message is one line."""


def _require_spec() -> Any:
    try:
        import bioimageio.spec as spec
    except ImportError:
        raise ZooError("bioimage.io packages need the optional package 'bioimageio.spec': "
                       "pip install 'napari-unet-loop[bioimageio]'") from None
    return spec


def _first_line(text: Any, limit: int = 220) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit].rstrip() + " ..."


# ============================================================================================
# import
# ============================================================================================

def _load_description(source: str | os.PathLike) -> Any:
    spec = _require_spec()
    path = Path(source)
    if not path.exists():
        raise ZooError(f"model file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            descr = spec.load_description(str(path), perform_io_checks=False)
    except Exception as err:  # a zip that is no package, unreadable YAML, ...
        raise ZooError(f"{path.name} is not a bioimage.io package: {_first_line(err)}") from err
    if getattr(descr, "type", None) != "model" or not hasattr(descr, "weights"):
        errors = [e for d in descr.validation_summary.details for e in (d.errors or [])]
        reason = (f"{'.'.join(map(str, errors[0].loc))}: {_first_line(errors[0].msg)}"
                  if errors else f"its type is {getattr(descr, 'type', '?')!r}")
        raise ZooError(f"{path.name} is not a valid bioimage.io model ({reason})")
    if not str(descr.format_version).startswith("0.5"):
        try:
            from bioimageio.spec import update_format

            descr = update_format(descr)
        except Exception as err:
            raise ZooError(f"{path.name}: model spec {descr.format_version} could not be "
                           f"read as 0.5 ({_first_line(err)})") from err
    return descr


def _file_bytes(file_source: Any) -> bytes:
    """The bytes of a file a description refers to (inside the package or next to the rdf)."""
    from bioimageio.spec.utils import get_reader

    return get_reader(file_source).read()


def _file_bytes_io(file_source: Any) -> io.BytesIO:
    return io.BytesIO(_file_bytes(file_source))
