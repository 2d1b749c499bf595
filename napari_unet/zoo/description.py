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
    if path.suffix.lower() == ".zip":
        _check_zip(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            descr = spec.load_description(str(path), perform_io_checks=False)
    except Exception as err:  # a zip that is no package, unreadable YAML, ...
        raise ZooError(f"{path.name} is not a bioimage.io package: {_first_line(err)}") from err
    invalid = type(descr).__name__ == "InvalidDescr"  # e.g. ``weights: {}``, axes cut short
    if invalid or getattr(descr, "type", None) != "model" or not hasattr(descr, "weights"):
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


def _check_zip(path: Path) -> None:
    """Refuse a truncated or damaged zip in one line (before bioimage.io reads a part of it)."""
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as err:
        if not zipfile.is_zipfile(path) and not _starts_like_a_zip(path):
            return  # not a zip at all: bioimage.io says what it is
        raise ZooError(f"{path.name} is not a bioimage.io package: the zip is truncated or "
                       f"damaged ({_first_line(err)}); download or copy it again") from None
    if bad is not None:
        raise ZooError(f"{path.name} is not a bioimage.io package: the zip is truncated or "
                       f"damaged ({bad} fails its checksum); download or copy it again")


def _starts_like_a_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def check_weights_sha256(descr: Any, name: str) -> None:
    """Refuse weights whose bytes do not match the sha256 the rdf gives for them (a damaged
    download, or weights altered after the package was made)."""
    import hashlib

    weights = getattr(descr, "weights", None)
    for field_name in getattr(type(weights), "model_fields", {}):
        entry = getattr(weights, field_name, None)
        expected = getattr(entry, "sha256", None)
        if entry is None or expected is None or getattr(entry, "source", None) is None:
            continue
        actual = hashlib.sha256(_file_bytes(entry.source)).hexdigest()
        if actual != str(expected):
            raise ZooError(f"{name}: the {field_name} weights do not match their sha256 in "
                           "rdf.yaml (damaged or altered); get the package again from its source")


def _file_bytes(file_source: Any) -> bytes:
    """The bytes of a file a description refers to (inside the package or next to the rdf)."""
    from bioimageio.spec.utils import get_reader

    return get_reader(file_source).read()


def _file_bytes_io(file_source: Any) -> io.BytesIO:
    return io.BytesIO(_file_bytes(file_source))
