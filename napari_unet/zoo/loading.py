"""Loading any model: a shipped one by name, a checkpoint, or a bioimage.io package."""

from __future__ import annotations

import copy
import dataclasses
import io
import os
from pathlib import Path
from typing import Any

import torch

from napari_unet.model.checkpoint import (
    CheckpointError,
    SegmentationModel,
    list_pretrained,
    load_checkpoint,
)
from napari_unet.model.config import UNetConfig
from napari_unet.model.unet import UNet
from napari_unet.zoo.description import (
    CONFIG_KEY,
    ZOO_FORMAT,
    ZooError,
    _file_bytes,
    _first_line,
    _load_description,
    check_weights_sha256,
)
from napari_unet.zoo.foreign import _foreign_model


def load_model(name_or_path: str | os.PathLike) -> SegmentationModel:
    """A shipped model by name, a checkpoint file by path, or a bioimage.io package (``.zip``
    or its ``rdf.yaml``, see :func:`napari_unet.zoo.loading.load_zoo_model`)."""
    shipped = list_pretrained()
    if str(name_or_path) in shipped:
        return load_checkpoint(shipped[str(name_or_path)])
    path = Path(name_or_path)
    if path.suffix.lower() in (".zip", ".yaml", ".yml"):
        from napari_unet.zoo.loading import (
            load_zoo_model,  # lazily: bioimageio.spec is an optional extra
        )

        return load_zoo_model(path)
    if path.suffix or path.exists() or os.sep in str(name_or_path):
        return load_checkpoint(path)
    names = ", ".join(shipped) or "none installed"
    raise CheckpointError(f"unknown model {str(name_or_path)!r}: not a file and not a shipped model ({names})")


def load_zoo_model(source: str | os.PathLike) -> SegmentationModel:
    """A Zoo package (``.zip``) or its ``rdf.yaml`` as a model for the tiled engine.

    Raises
    ------
    ZooError
        One line: not a package, not a model, an unsupported layout or weight format, or
        damaged weights.
    """
    descr = _load_description(source)
    name = Path(source).name
    try:
        check_weights_sha256(descr, name)
    except ZooError:
        raise
    except Exception as err:  # a weights file that cannot be read
        raise ZooError(f"{name} cannot be used: {_first_line(err)}") from err
    ours = (descr.config.model_extra or {}).get(CONFIG_KEY) if descr.config is not None else None
    try:
        if isinstance(ours, dict) and ours.get("format") == ZOO_FORMAT:
            return _our_model(descr, ours, name)
        return _foreign_model(descr, name, str(source))
    except ZooError:
        raise
    except Exception as err:  # damaged weights, an architecture that does not load, ...
        raise ZooError(f"{name} cannot be used: {_first_line(err)}") from err


def _our_model(descr: Any, settings: dict[str, Any], name: str) -> SegmentationModel:
    """A package written by :func:`export_bioimageio`: the original checkpoint again."""
    weights = descr.weights.pytorch_state_dict
    if weights is None:
        raise ZooError(f"{name} has no pytorch_state_dict weights")
    config = UNetConfig.from_dict(dict(weights.architecture.kwargs or settings["config"]))
    state = torch.load(io.BytesIO(_file_bytes(weights.source)), map_location="cpu",
                       weights_only=True)
    network = UNet(config)
    network.load_state_dict(state)
    network.eval()
    fields = {f.name for f in dataclasses.fields(SegmentationModel)} - {"network"}
    meta = {k: v for k, v in (settings.get("metadata") or {}).items() if k in fields}
    return SegmentationModel(network=network, **copy.deepcopy(meta))
