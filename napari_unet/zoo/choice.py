"""Which model the Segment dock offers first for an image.

The rules, in order (:func:`choose_model`):

1. only models that take the image: as many input channels, and a 3D model only for a stack;
2. the model the user last segmented similar data with (same dims, channels and kind of data;
   remembered in the settings, :func:`remember_choice`);
3. a model made for the image's kind of data (the sample it came from, or its unit: a stack in
   mm is a CT or MRI scan), with the image's number of dims before one that runs slice by slice;
4. for data of a kind no model is made for (CT: the shipped models are for microscopy) no
   model at all, with a message, rather than a model that gives nonsense;
5. otherwise the current model if it fits (a 2D model runs slice by slice on a stack), else the
   first of the image's dims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

#: the kind of data of each shipped sample (``napari_unet.sample_data``)
SAMPLE_KINDS = {"em_2d": "em", "nuclei_2d": "nuclei", "nuclei_3d": "nuclei",
                "cells_3d": "membranes", "ct_small": "ct"}
#: the kind of data each shipped model was trained on (see its model card)
MODEL_KINDS = {"em-membranes-2d": "em", "nuclei-2d": "nuclei", "nuclei-3d": "nuclei",
               "cells-3d": "membranes"}
#: kinds no microscopy model should be run on unasked
NOT_MICROSCOPY = {"ct": "CT"}
#: length units of medical scans (microscopy is in um or nm)
MEDICAL_UNITS = ("mm", "cm", "millimeter", "centimeter")
#: the settings key of the models used last, by data signature
SETTINGS_KEY = "model_for_data"

#: models remembered in this session, by data signature (also versions not saved to a file)
_SESSION: dict[str, str] = {}


@dataclass(frozen=True)
class DataTraits:
    """What matters about an image for the choice of a model."""

    ndim: int  # spatial dims: 2 or 3
    channels: int = 1
    kind: str | None = None  # "em", "nuclei", "membranes", "ct" or None (unknown)

    @property
    def signature(self) -> str:
        """Images with the same signature count as similar data."""
        return f"{self.ndim}D/{self.channels}ch/{self.kind or 'unknown'}"


@dataclass(frozen=True)
class ModelTraits:
    """What matters about a model for the choice: its dims, channels and kind of data."""

    key: str
    spatial_dims: int
    in_channels: int = 1
    kind: str | None = None


@dataclass(frozen=True)
class Choice:
    """The model to offer (None: none fits) and why, in a sentence for the dock."""

    key: str | None
    reason: str


def data_kind(sample: str | None = None, unit: str | None = None) -> str | None:
    """The kind of data of an image: from the sample it is, else from its unit (None: unknown)."""
    if sample in SAMPLE_KINDS:
        return SAMPLE_KINDS[sample]
    if unit and unit.strip().lower() in MEDICAL_UNITS:
        return "ct"
    return None


def _fits(model: ModelTraits, data: DataTraits) -> bool:
    return model.in_channels == data.channels and model.spatial_dims <= data.ndim


def choose_model(data: DataTraits, models: Sequence[ModelTraits], remembered: str | None = None,
                 current: str | None = None) -> Choice:
    """The model to offer first for ``data`` among ``models`` (rules: the module docstring).

    ``remembered``: the key used last for similar data; ``current``: the selected key now.
    """
    fits = [m for m in models if _fits(m, data)]
    keys = [m.key for m in fits]
    if remembered in keys:
        return Choice(remembered, f"{remembered}: the model you used last for {data.ndim}D "
                                  f"{data.kind or 'images'} like this one")
    made_for = sorted((m for m in fits if data.kind and m.kind == data.kind),
                      key=lambda m: m.spatial_dims != data.ndim)
    if made_for:
        m = made_for[0]
        return Choice(m.key, f"{m.key}: made for {data.ndim}D {data.kind} images")
    if data.kind in NOT_MICROSCOPY:
        name = NOT_MICROSCOPY[data.kind]
        return Choice(None, f"No model for {name} here: the shipped models are for microscopy "
                            f"and would give nonsense on {name}. Load a {name} model (Load model "
                            "file…: a checkpoint or a bioimage.io package), or paint a few slices "
                            "and train one in the Fine-tune dock (New model).")
    if current in keys:  # the user's model, e.g. a loaded file: kept while it fits
        return Choice(current, f"{current}: fits {data.ndim}D images")
    same_dims = [m for m in fits if m.spatial_dims == data.ndim]
    if same_dims or fits:
        m = (same_dims or fits)[0]
        return Choice(m.key, f"{m.key}: fits {data.ndim}D images")
    return Choice(None, f"No model in the list takes {data.ndim}D images with {data.channels} "
                        "channel(s); load one (Load model file…)")


def model_traits(registry: Any) -> list[ModelTraits]:
    """The traits of every model of a :class:`~napari_unet.zoo.registry.ModelRegistry` (shipped
    models are loaded: small checkpoints, and the first Segment needs one anyway). A model that
    fails to load is left out. Fine-tuned versions inherit their parent's kind of data."""
    from napari_unet.model.checkpoint import CheckpointError

    traits = []
    for entry in registry.entries():
        try:
            model = registry.get(entry.key)
        except (CheckpointError, OSError, ValueError):
            continue
        root = entry.key
        while root not in MODEL_KINDS and root in registry and registry.entry(root).parent_key:
            root = registry.entry(root).parent_key
        traits.append(ModelTraits(entry.key, int(model.spatial_dims),
                                  int(getattr(getattr(model, "config", None), "in_channels", 1)),
                                  MODEL_KINDS.get(root)))
    return traits


def remembered_choice(data: DataTraits) -> str | None:
    """The model key used last for data like ``data`` (this session first, then saved)."""
    if data.signature in _SESSION:
        return _SESSION[data.signature]
    from napari_unet.io.settings import get_setting

    saved = get_setting(SETTINGS_KEY) or {}
    return saved.get(data.signature) if isinstance(saved, dict) else None


def remember_choice(data: DataTraits, key: str, persistent: bool = True) -> None:
    """Remember ``key`` as the model for data like ``data`` (in the settings when
    ``persistent``: shipped models; a version held in memory is kept for this session only)."""
    _SESSION[data.signature] = key
    if not persistent:
        return
    from napari_unet.io.settings import get_setting, save_settings

    saved = get_setting(SETTINGS_KEY) or {}
    saved = dict(saved) if isinstance(saved, dict) else {}
    if saved.get(data.signature) != key:
        saved[data.signature] = key
        save_settings(**{SETTINGS_KEY: saved})


def forget_session() -> None:
    """Forget this session's choices (tests)."""
    _SESSION.clear()
