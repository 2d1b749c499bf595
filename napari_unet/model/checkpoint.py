"""Checkpoints that carry their own architecture, inference settings and history.

A checkpoint is a ``torch.save`` of plain data and tensors only, so it loads with
``torch.load(weights_only=True)``; files that need pickled code are refused."""

from __future__ import annotations

import copy
import datetime as _dt
import io
import os
import pickle
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from napari_unet.io.files import atomic_write
from napari_unet.model.config import UNetConfig
from napari_unet.model.unet import UNet

FORMAT = "napari-unet/1"
TASKS = ("foreground", "foreground_boundary", "membranes", "semantic")
PRETRAINED_PACKAGE = "napari_unet.pretrained"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, unsafe or does not fit the data."""


@dataclass
class SegmentationModel:
    """A network plus everything inference and fine-tuning need to use it.

    Parameters
    ----------
    network : UNet
    task : str
        What the output channels mean: ``foreground`` (1 channel), ``foreground_boundary``
        (foreground and touching-boundary channels), ``membranes`` (1 channel) or ``semantic``
        (softmax over ``class_names``, index 0 = background).
    normalization : dict
        ``{"mode": "percentile", "low": 1, "high": 99.8}``, ``{"mode": "window",
        "center": c, "width": w}`` (CT, Hounsfield units) or ``{"mode": "none"}``.
    postprocess : dict
        Post-processing defaults tuned on a validation split (see :mod:`napari_unet.labels.tuning`):
        ``threshold``, ``seed_threshold``, ``min_size``, plus how they were found. predict and
        Segment use them unless the user sets their own; empty = the built-in defaults.
        ``min_size_fraction`` (of the median training object volume) takes over from
        ``min_size`` when ``object_size`` is known, so it travels to other resolutions.
    object_size : dict
        The training objects' size (:func:`napari_unet.labels.object_size.measure_object_size`):
        median equivalent diameter in µm (``diameter_um``, ``None`` without a voxel size)
        and in voxels (``diameter_voxels``); empty when unknown.
    """

    network: UNet
    task: str = "foreground"
    name: str = "model"
    version: int = 1
    parent: str | None = None
    class_names: list[str] = field(default_factory=lambda: ["background", "foreground"])
    normalization: dict[str, Any] = field(
        default_factory=lambda: {"mode": "percentile", "low": 1.0, "high": 99.8})
    voxel_size: list[float] | None = None
    unit: str | None = None
    description: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    postprocess: dict[str, Any] = field(default_factory=dict)
    object_size: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise CheckpointError(f"unknown task {self.task!r}; expected one of {TASKS}")
        expected = expected_channels(self.task, len(self.class_names))
        if self.network.config.out_channels != expected:
            raise CheckpointError(
                f"task {self.task!r} needs {expected} output channels, the network has "
                f"{self.network.config.out_channels}")

    @property
    def config(self) -> UNetConfig:
        return self.network.config

    @property
    def spatial_dims(self) -> int:
        return self.network.config.spatial_dims

    @property
    def label(self) -> str:
        """``name v<version>``, as shown in model lists."""
        return f"{self.name} v{self.version}"

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "parent": self.parent, "task": self.task,
            "class_names": list(self.class_names), "normalization": dict(self.normalization),
            "voxel_size": None if self.voxel_size is None else [float(v) for v in self.voxel_size],
            "unit": self.unit, "description": self.description,
            "history": copy.deepcopy(self.history),
            "postprocess": copy.deepcopy(self.postprocess),
            "object_size": copy.deepcopy(self.object_size),
        }

    def postprocess_default(self, key: str, fallback: Any) -> Any:
        """The tuned post-processing value ``key`` (``threshold``, ``seed_threshold``,
        ``min_size``), or ``fallback`` when the model has none."""
        value = self.postprocess.get(key)
        return fallback if value is None else value

    def copy(self) -> "SegmentationModel":
        """An independent copy (own weights), e.g. to fine-tune without touching the parent."""
        network = UNet(self.network.config)
        network.load_state_dict(self.network.state_dict())
        return SegmentationModel(network=network, **copy.deepcopy(self.metadata()))


def expected_channels(task: str, n_classes: int) -> int:
    """Output channels a network needs for ``task``."""
    if task == "semantic":
        return n_classes
    return 2 if task == "foreground_boundary" else 1


def _payload(model: SegmentationModel) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "config": model.network.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.network.state_dict().items()},
        "metadata": {**model.metadata(), "saved": _dt.datetime.now(_dt.timezone.utc).isoformat()},
    }


def save_checkpoint(model: SegmentationModel, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically (temporary file, then rename).

    Raises
    ------
    CheckpointError
        ``path`` is in the folder of the shipped models (see :func:`check_not_shipped`).
    OSError
        The file cannot be written; the error names ``path``.
    """
    path = Path(path)
    check_not_shipped(path)
    payload = _payload(model)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        try:
            with open(tmp, "wb") as handle:
                torch.save(payload, handle)
        except RuntimeError as err:
            raise _torch_write_error(err, tmp) from err

    return atomic_write(path, write)


def _torch_write_error(error: RuntimeError, tmp: Path) -> BaseException:
    """``torch.save`` reports a failed write (a full disk, a quota) as a RuntimeError of its
    zip writer (``inline_container.cc``); as an OSError, so that callers save elsewhere."""
    import errno
    import shutil

    text = str(error)
    if "inline_container" not in text and "PytorchStreamWriter" not in text:
        return error
    for cause in (error.__cause__, error.__context__):
        if isinstance(cause, OSError) and cause.errno:
            return OSError(cause.errno, os.strerror(cause.errno), str(tmp))
    try:
        full = shutil.disk_usage(tmp.parent).free < 16 * 2**20
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    return OSError(errno.EIO, "the model file could not be written (is the disk full?)", str(tmp))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SegmentationModel:
    """Load a checkpoint saved by :func:`save_checkpoint`, safely.

    Raises
    ------
    CheckpointError
        Missing file, corrupt file, a file that carries pickled code, or one that is not a
        napari-unet checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a model file (.pt)")
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise CheckpointError(f"cannot read model file {path.name}: {err.strerror or err}") from None
    _check_magic(head, path.name)
    return _load(path, path.name, map_location)


# torch.save writes a zip archive (legacy files: a pickle, protocol 2 or higher)
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


def _check_magic(head: bytes, name: str) -> None:
    """Refuse what is not a torch file at all (text, an image, ...) before unpickling it."""
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise CheckpointError(f"{name} is not a checkpoint (not a file saved by napari-unet or "
                              "torch.save)")


def _one_line(err: BaseException, limit: int = 240) -> str:
    """The first two lines of an error message as one, shortened (the full text stays in the
    exception chain, shown by ``--verbose``)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    text = " ".join(lines[:2])
    more = len(lines) > 2 or len(text) > limit
    text = text[:limit].rstrip(" :,.")
    return f"{text} ..." if more else text


def model_to_bytes(model: SegmentationModel) -> bytes:
    """``model`` as the bytes of a checkpoint file (e.g. to hand it to another process)."""
    buffer = io.BytesIO()
    torch.save(_payload(model), buffer)
    return buffer.getvalue()


def model_from_bytes(data: bytes, map_location: str | torch.device = "cpu") -> SegmentationModel:
    """The model in checkpoint bytes from :func:`model_to_bytes` (loaded as safely as a file)."""
    _check_magic(bytes(data[:4]), "model data")
    return _load(io.BytesIO(data), "model data", map_location)


def _load(source: Any, name: str, map_location: str | torch.device) -> SegmentationModel:
    try:
        payload = torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {name}: it contains pickled Python objects, which could run "
            "code; only checkpoints saved by napari-unet (tensors and plain data) are loaded"
        ) from err
    except Exception as err:  # zip/EOF/runtime errors from a damaged file
        raise CheckpointError(f"cannot read model file {name}: corrupt or not a checkpoint "
                              f"({type(err).__name__})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{name} is not a napari-unet checkpoint")
    try:
        network = UNet(UNetConfig.from_dict(payload["config"]))
        network.load_state_dict(payload["state_dict"])
        meta = {k: v for k, v in payload["metadata"].items() if k != "saved"}
        model = SegmentationModel(network=network, **meta)
    except CheckpointError:
        raise
    except Exception as err:
        raise CheckpointError(f"{name} is damaged: {_one_line(err)}") from err
    network.eval()
    return model


def _pretrained_dir() -> Path:
    return Path(str(resources.files(PRETRAINED_PACKAGE)))


def check_not_shipped(path: str | os.PathLike) -> None:
    """Refuse to write ``path`` when it is in the shipped models' folder or is a shipped model.

    Paths are compared after resolving links (and by inode for existing files), so another
    spelling of the same place is refused too.

    Raises
    ------
    CheckpointError
        One line naming the folder of the shipped models.
    """
    path = Path(path).expanduser()
    folder = _pretrained_dir()
    inside = os.path.realpath(path.parent) == os.path.realpath(folder)
    if not inside and path.exists():
        for shipped in folder.glob("*.pt"):
            try:
                if os.path.samefile(path, shipped):
                    inside = True
                    break
            except OSError:
                continue
    if inside:
        raise CheckpointError(f"refusing to write {path}: it is in the folder of the models "
                              f"shipped with napari-unet ({folder}); choose another file")


def list_pretrained() -> dict[str, Path]:
    """Shipped models by name."""
    folder = _pretrained_dir()
    return {p.stem: p for p in sorted(folder.glob("*.pt"))}


def pretrained_card(name: str) -> str:
    """The model card (Markdown) shipped next to a pretrained model."""
    card = _pretrained_dir() / f"{name}.md"
    return card.read_text(encoding="utf-8") if card.is_file() else ""
