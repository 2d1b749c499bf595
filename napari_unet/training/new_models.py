"""What a new, untrained model is made of (:class:`NewModelSpec`), the defaults for a labels
array (class names, in-plane-only levels from the voxel size), and building it.

The Fine-tune dock's "New model…" dialog fills a spec; :func:`build_new_model` makes the model
(:func:`napari_unet.training.trainer.new_model`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from napari_unet.model.config import inplane_only_levels_for

#: intensity normalisation of microscopy models: percentiles of each image
PERCENTILE_NORMALIZATION: dict[str, Any] = {"mode": "percentile", "low": 1.0, "high": 99.8}
#: intensity normalisation of CT models: a fixed Hounsfield window
CT_WINDOW_NORMALIZATION: dict[str, Any] = {"mode": "window", "center": 40.0, "width": 400.0}
#: columns of a labels table that may hold class names, in order of preference
NAME_COLUMNS = ("name", "names", "class", "class_name", "label_name", "organ", "structure")


@dataclass
class NewModelSpec:
    """What a new model is made of; :func:`build_new_model` builds it."""

    spatial_dims: int
    task: str
    class_names: list[str] | None = None
    name: str = "model"
    inplane_only_levels: tuple[int, ...] = ()
    base_channels: int = 16
    depth: int = 4
    #: the model's normalisation settings, as stored in its checkpoint
    normalization: dict[str, Any] = field(default_factory=lambda: dict(PERCENTILE_NORMALIZATION))
    voxel_size: tuple[float, ...] | None = None
    architecture: str = "unet"

    @property
    def description(self) -> str:
        return f"new {self.spatial_dims}D {self.task} model made in napari"


def class_names_from_columns(columns: Mapping[str, Sequence[Any]]) -> dict[int, str]:
    """Class names by id from a labels table (column name → values): an ``index`` column (else
    the row number) and a name column (see :data:`NAME_COLUMNS`, else the first text column).
    Empty when there is none."""
    if not columns:
        return {}
    lower = {c.lower(): c for c in columns}
    name_column = next((lower[c] for c in NAME_COLUMNS if c in lower), None)
    if name_column is None:
        name_column = next((c for c, v in columns.items()
                            if c.lower() != "index" and v and isinstance(v[0], str)), None)
    if name_column is None:
        return {}
    names = list(columns[name_column])
    index = list(columns.get(lower.get("index", ""), range(len(names))))
    found = {}
    for i, name in zip(index, names):
        try:
            key = int(i)
        except (TypeError, ValueError):
            continue
        if key > 0 and isinstance(name, str) and name.strip():
            found[key] = name.strip()
    return found


def class_list(names: dict[int, str] | list[str]) -> list[str]:
    """``["background", name of 1, name of 2, …]``; ids without a name get ``class_<id>``."""
    if isinstance(names, list):
        return ["background", *names]
    largest = max(names, default=0)
    return ["background", *(names.get(i, f"class_{i}") for i in range(1, largest + 1))]


def parse_class_names(text: str) -> list[str]:
    """``"liver, spleen"`` → ``["liver", "spleen"]`` (names for ids 1, 2, …)."""
    return [part.strip() for part in re.split(r"[,;\n]+", text) if part.strip()]


def model_name(text: str) -> str:
    """A model name from a layer name: letters, digits, ``-`` and ``_`` only."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", text.strip()).strip("-")
    return name or "model"


def inplane_levels(spatial_dims: int, count: int, depth: int) -> tuple[int, ...]:
    """The first ``count`` pooling levels pool in-plane only (3D models; at most ``depth - 1``)."""
    return tuple(range(min(count, depth - 1))) if spatial_dims == 3 else ()


def spec_for_labels(labels_name: str, scale: Sequence[float], spatial_dims: int, task: str,
                    class_names: list[str] | None = None,
                    names_by_id: dict[int, str] | None = None, **options: Any) -> NewModelSpec:
    """The defaults for labels called ``labels_name`` with voxel size ``scale``: class names
    from ``names_by_id`` (the labels' table) when ``task`` is ``semantic`` and none are given,
    in-plane-only levels from the voxel size. ``options``: further spec fields."""
    depth = int(options.pop("depth", 4))
    voxel = tuple(float(s) for s in scale[-spatial_dims:])
    if task == "semantic" and class_names is None:
        if not names_by_id:
            raise ValueError(f"{labels_name!r} has no class names; give them")
        class_names = class_list(names_by_id)
    elif class_names is not None and class_names[:1] != ["background"]:
        class_names = class_list(list(class_names))
    levels = inplane_only_levels_for(voxel, depth) if spatial_dims == 3 else ()
    return NewModelSpec(spatial_dims=spatial_dims, task=task, class_names=class_names,
                        name=model_name(options.pop("name", f"{labels_name}-model")),
                        inplane_only_levels=levels, depth=depth, voxel_size=voxel, **options)


def build_new_model(spec: NewModelSpec) -> Any:
    """The untrained model (version 0) ``spec`` describes; ValueError for a bad spec."""
    from napari_unet.training.trainer import new_model

    return new_model(spec.spatial_dims, spec.task, spec.class_names,
                     base_channels=spec.base_channels, depth=spec.depth,
                     inplane_only_levels=spec.inplane_only_levels, name=spec.name,
                     normalization=spec.normalization, voxel_size=spec.voxel_size,
                     architecture=spec.architecture, description=spec.description)


def new_model_text(key: str, spec: NewModelSpec) -> str:
    """The status line after the model of ``spec`` was added as ``key``."""
    aniso = (f", in-plane-only pooling at level(s) {list(spec.inplane_only_levels)}"
             if spec.inplane_only_levels else "")
    classes = f", {len(spec.class_names) - 1} classes" if spec.class_names else ""
    return (f"New model {key}: {spec.spatial_dims}D {spec.task}{classes}{aniso}. "
            "Fine-tune trains it on your corrected slices.")
