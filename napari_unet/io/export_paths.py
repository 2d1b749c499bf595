"""Where the docks write files: the labels TIFF an export suggests, the probability map next
to it, and model checkpoints. Paths only; nothing is written here."""

from __future__ import annotations

from pathlib import Path

#: suffixes a labels export may have (the first is added when none is given); ``.ome.zarr``
#: writes an OME-Zarr image with the labels under ``labels/``
LABEL_SUFFIXES = (".tif", ".tiff")
OME_ZARR_SUFFIX = ".ome.zarr"
#: suffixes of napari-unet checkpoints (the first is added otherwise)
CHECKPOINT_SUFFIXES = (".pt", ".pth")
#: what a written probability map is called: ``<labels name>`` + this
PROBABILITY_SUFFIX = "_probabilities.tif"
DEFAULT_EXPORT_NAME = "labels.tif"


def probability_path(path: Path) -> Path:
    """The probability map written next to the labels ``path``: ``<name>_probabilities.tif``."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", OME_ZARR_SUFFIX):
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)] + PROBABILITY_SUFFIX)
    return path.with_name(name + PROBABILITY_SUFFIX)


def file_stem(name: str) -> str:
    """A layer or model name as a file name stem (spaces become ``_``)."""
    return name.replace(" ", "_")


def default_export_path(layer_name: str, source: str | Path | None,
                        folder: str | Path | None = None) -> Path:
    """The file an export of ``layer_name`` suggests: next to the image it was read from
    (``source``), else in ``folder`` (default: the working folder)."""
    where = Path(source).parent if source else Path(folder) if folder else Path.cwd()
    return where / f"{file_stem(layer_name)}.tif"


def export_path(text: str | Path | None) -> Path:
    """The output file from the user's text (``~`` expanded; empty: ``labels.tif``)."""
    return Path(str(text or "").strip() or DEFAULT_EXPORT_NAME).expanduser()


def is_ome_zarr_export(path: Path) -> bool:
    """Whether a labels export to ``path`` is written as OME-Zarr."""
    return path.name.lower().endswith(OME_ZARR_SUFFIX)


def check_label_suffix(path: Path) -> Path:
    """``path`` when it names a TIFF or an OME-Zarr; raises ValueError otherwise."""
    if path.suffix.lower() not in LABEL_SUFFIXES and not is_ome_zarr_export(path):
        raise ValueError(f"export to a .tif file or an .ome.zarr folder, got {path.name!r}")
    return path


def checkpoint_path(path: str | Path) -> Path:
    """``path`` as a checkpoint file: ``.pt`` added unless it ends with ``.pt`` or ``.pth``."""
    path = Path(path)
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        path = path.with_suffix(CHECKPOINT_SUFFIXES[0])
    return path


def checkpoint_file_name(key: str | None) -> str:
    """The file name a save of model ``key`` suggests."""
    return file_stem(f"{key or 'model'}.pt")
