"""The Zarr store of a streamed prediction: its settings, fingerprint and resumable state."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from napari_unet.engine.tiling import TilePlan
from napari_unet.io.omezarr import LABELS_GROUP, is_ome_zarr_name, require_ome_zarr
from napari_unet.labels.instances import DEFAULT_MIN_SIZE
from napari_unet.labels.stitch import DEFAULT_STITCH_THRESHOLD
from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.model.normalization import Normalizer, fit_normalizer

STORE_FORMAT = "napari-unet-stream/1"
ATTRS_KEY = "napari_unet"
#: Working-set budget of one tile (the engine's estimate), so peak memory stays below 2 GB
#: whatever the volume; a larger budget computes fewer halo voxels (``--max-tile-gb``).
DEFAULT_MAX_TILE_BYTES = 2**30
PROBABILITY_DTYPES = ("float32", "float16", "uint8")


# --- settings and store --------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSettings:
    """What is written for every tile (everything a worker needs besides the model and input)."""

    output: str = "labels"
    task: str = "foreground"
    probabilities: bool = False
    probability_dtype: str = "float32"
    threshold: float = 0.5
    method: str = "watershed"
    voxel_size: tuple[float, ...] | None = None
    min_size: int = DEFAULT_MIN_SIZE
    seed_threshold: float | None = None
    #: membranes: cell radius (units of ``voxel_size``) and border merge threshold, fixed for
    #: all chunks so that every chunk is post-processed alike
    object_radius: float | None = None
    merge_threshold: float | None = None
    #: a 2D model on a stack: instances per slice, stitched through z by IoU (0: per slice)
    per_slice: bool = False
    stitch_threshold: float = DEFAULT_STITCH_THRESHOLD
    #: test-time augmentation (:func:`napari_unet.engine.tta.tta_transforms`) for every tile
    tta: bool = False
    #: zoom per model axis before the network (:mod:`napari_unet.engine.resample`; None: none)
    object_scale: tuple[float, ...] | None = None

    def arrays(self) -> list[str]:
        names = []
        if self.output == "labels" or (self.output == "instances" and self.task == "semantic"):
            names.append("labels")  # instances of semantic models merge only within a class
        if self.output == "instances":
            names.append("_local")
        if self.probabilities or self.output == "probabilities":
            names.append("probabilities")
        return names


@dataclass
class StreamResult:
    """What :func:`predict_to_zarr` returns."""

    path: Path
    output: str
    arrays: dict[str, Any]
    tiles_total: int
    tiles_skipped: int = 0
    n_objects: int | None = None
    messages: list[str] = field(default_factory=list)

    @property
    def data(self) -> Any:
        """The requested output (a zarr array)."""
        return self.arrays[self.output]


def model_fingerprint(model: SegmentationModel) -> str:
    """A hash of what the model computes (config, task, normalisation, weights)."""
    digest = hashlib.sha1(repr(sorted(model.config.to_dict().items())).encode())
    digest.update(model.task.encode())
    digest.update(repr(sorted(model.normalization.items())).encode())
    for name, tensor in model.network.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class StreamMismatchError(FileExistsError):
    """An existing streamed output made from another image, model or settings.

    ``differences`` names what differs: ``input`` (another image, or the same file with other
    content), ``model``, or the :class:`StreamSettings` fields (``tta``, ``threshold``, ...).
    """

    def __init__(self, path: Path, differences: Sequence[str], detail: str = ""):
        self.path, self.differences, self.detail = Path(path), list(differences), detail
        if "input" in self.differences:
            what = f"another image{f' ({detail})' if detail else ''}"
        else:
            what = "another model or other settings (" + ", ".join(self.differences) + ")"
        super().__init__(f"{path} holds a prediction of {what}; pass overwrite=True to start "
                         "over, or choose another path")


#: blocks per axis hashed by :func:`input_fingerprint`, and their largest side in the last two
#: axes (planes: a lazy TIFF reads whole pages) and in the others
_SAMPLE_BLOCKS, _SAMPLE_SIDE, _SAMPLE_DEPTH = 3, 16, 4


def input_fingerprint(image: Any, path: str | Path | None) -> dict[str, Any]:
    """What identifies the input of a streamed run: its path, shape, dtype and a hash of a
    sample of its values (``3**ndim`` strided blocks of at most 4 planes of 16 x 16 voxels, so
    that it stays cheap for inputs of any size, lazy ones included: a few dozen planes read)."""
    shape = tuple(int(n) for n in image.shape)
    digest = hashlib.sha1(repr((shape, str(np.dtype(image.dtype)))).encode())
    starts_per_axis = []
    for axis, n in enumerate(shape):
        side = min(n, _SAMPLE_SIDE if axis >= len(shape) - 2 else _SAMPLE_DEPTH)
        starts = sorted({int(round(s)) for s in np.linspace(0, n - side, _SAMPLE_BLOCKS)})
        starts_per_axis.append([slice(s, s + side) for s in starts])
    blocks = [image[tuple(b)] for b in _product(starts_per_axis)]
    with local_dask():
        if hasattr(image, "dask"):  # one compute: each chunk is read once
            import dask

            blocks = list(dask.compute(*blocks))
        for block in blocks:
            digest.update(np.ascontiguousarray(np.asarray(block)).tobytes())
    return {"path": None if path is None else str(Path(path).expanduser().resolve()),
            "shape": list(shape), "dtype": str(np.dtype(image.dtype)), "sample": digest.hexdigest()}


def _product(options: list[list[slice]]) -> list[list[slice]]:
    import itertools

    return [list(p) for p in itertools.product(*options)]


def _input_difference(stored: dict[str, Any] | None, current: dict[str, Any]) -> str | None:
    """Why the stored input differs from the current one (None when it is the same)."""
    if not isinstance(stored, dict):
        return "the output does not record its input"
    if stored.get("path") != current["path"] and stored.get("path") and current["path"]:
        return f"made from {Path(stored['path']).name}"
    if stored.get("shape") != current["shape"] or stored.get("dtype") != current["dtype"]:
        return f"shape {tuple(stored.get('shape') or ())} {stored.get('dtype')}"
    if stored.get("sample") != current["sample"]:
        return "the input's content changed"
    return None


def _setting_differences(stored: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """The fingerprint entries that differ: ``model`` and the names of differing settings."""
    if not isinstance(stored, dict):
        return ["settings"]
    names = ["model"] if stored.get("model") != current["model"] else []
    old, new = stored.get("settings") or {}, current["settings"]
    names += [key for key in new if old.get(key) != new[key]]
    return names or ["settings"]


def _label_dtype(settings: StreamSettings, out_channels: int) -> np.dtype:
    if settings.task == "semantic":
        return np.dtype(np.uint8 if out_channels <= 256 else np.uint16)
    return np.dtype(np.uint8)


def _fingerprint(settings: StreamSettings, model_hash: str) -> dict[str, Any]:
    return {"settings": _jsonable(dataclasses.asdict(settings)), "model": model_hash}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def stream_info(path: str | Path) -> dict[str, Any] | None:
    """The ``napari_unet`` attribute of a streamed output, or None if ``path`` is not one."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:  # noqa: BLE001 - missing or not a zarr group
        return None
    info = dict(group.attrs).get(ATTRS_KEY)
    return info if isinstance(info, dict) and info.get("format") == STORE_FORMAT else None


def stored_plan(group: Any) -> TilePlan:
    """The tile plan a streamed output was created with (its chunks are the plan's cores)."""
    return TilePlan.from_dict(dict(group.attrs[ATTRS_KEY])["plan"])


def open_stream(path: str | Path, *, plan: TilePlan, settings: StreamSettings,
                model: SegmentationModel, normalizer: Normalizer | None = None,
                image: Any = None, overwrite: bool = False, input_path: str | Path | None = None,
                voxel_size: Sequence[float] | None = None, unit: str | None = None
                ) -> tuple[Any, Normalizer, bool, TilePlan]:
    """Create the output group, or reopen a compatible one to resume.

    Returns ``(group, normalizer, resumed, plan)``. The normaliser is fitted on ``image`` once,
    when the store is created, and read back from the store when resuming. A resumed run
    continues with the stored plan (``plan`` is only used for a new store), so it can resume on
    another device or with less free memory.

    Raises
    ------
    FileExistsError
        ``path`` exists but is not a napari-unet output; :class:`StreamMismatchError` when it
        is one of another input (:func:`input_fingerprint`), model or settings (pass
        ``overwrite=True`` to replace it).
    ValueError
        ``path`` is the input (also through a hard link).
    """
    import zarr

    import os

    path = Path(path)
    if input_path is not None and (path.resolve() == Path(input_path).resolve() or (
            path.exists() and os.path.samefile(path, input_path))):
        raise ValueError(f"refusing to overwrite the input image: {path} is the input image; "
                         "choose another output")
    model_hash = model_fingerprint(model)
    fingerprint = _fingerprint(settings, model_hash)
    source = input_fingerprint(image, input_path) if image is not None else None
    if path.exists():
        info = stream_info(path)
        if info is None:
            if overwrite and path.is_dir() and not any(path.iterdir()):
                path.rmdir()
            else:
                raise FileExistsError(f"{path} exists and is not a napari-unet output; choose another path")
        elif overwrite:
            shutil.rmtree(path)
        elif info.get("fingerprint") != fingerprint:
            raise StreamMismatchError(path, _setting_differences(info.get("fingerprint"), fingerprint))
        else:
            why = None if source is None else _input_difference(info.get("source"), source)
            if why is not None:
                raise StreamMismatchError(path, ["input"], why)
            group = zarr.open_group(str(path), mode="r+")
            return (group, Normalizer(**_normalizer_from_json(info["normalizer"])), True,
                    stored_plan(group))
    if normalizer is None:
        if image is None:
            raise ValueError("a normalizer or the image is needed to create the output")
        with local_dask():
            normalizer = fit_normalizer(image, model.normalization)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    # an OME-Zarr output (.ome.zarr) keeps its label images under labels/<name>/0 (NGFF)
    paths = ome_label_paths() if is_ome_zarr_name(path) else {}
    if paths:
        require_ome_zarr()
    spatial_chunks = plan.core
    channels = model.config.out_channels
    for name in settings.arrays():
        if name == "probabilities":
            group.create_array(name, shape=(channels, *plan.spatial), chunks=(channels, *spatial_chunks),
                               dtype=settings.probability_dtype, fill_value=0,
                               dimension_names=["c", *_axis_names(len(plan.spatial))])
        elif name == "labels":
            group.create_array(paths.get(name, name), shape=plan.spatial, chunks=spatial_chunks,
                               dtype=_label_dtype(settings, channels), fill_value=0,
                               dimension_names=_axis_names(len(plan.spatial)))
        else:  # _local
            group.create_array(name, shape=plan.spatial, chunks=spatial_chunks, dtype="uint32",
                               fill_value=0)
    group.create_array("_done", shape=plan.grid, chunks=(1,) * len(plan.grid), dtype="uint8",
                       fill_value=0)
    if settings.output == "instances":
        group.create_array("_counts", shape=plan.grid, chunks=(1,) * len(plan.grid),
                           dtype="uint32", fill_value=0)
    info = {
        "format": STORE_FORMAT, "fingerprint": fingerprint, "plan": plan.to_dict(),
        "state": "predicting",
        "run_id": uuid.uuid4().hex,
        "output": settings.output, "model": model.label, "task": model.task,
        "class_names": list(model.class_names), "axes": _axes_letters(len(plan.spatial)),
        "normalizer": _normalizer_to_json(normalizer),
        "input": None if input_path is None else str(input_path),
        "source": source,
    }
    if paths:
        info.update(paths=paths, ome="pending")
    attrs: dict[str, Any] = {ATTRS_KEY: _jsonable(info)}
    if voxel_size is not None and unit is not None:
        attrs.update(voxel_size=[float(v) for v in voxel_size], unit=str(unit))
    group.attrs.update(attrs)
    return group, normalizer, False, plan


def ome_label_paths() -> dict[str, str]:
    """Where the label outputs of an OME-Zarr output are stored (full resolution: level 0)."""
    return {name: f"{LABELS_GROUP}/{name}/0" for name in ("labels", "instances")}


def array_path(group: Any, name: str) -> str:
    """The path in ``group`` of the output array ``name`` (``labels/<name>/0`` in OME-Zarr)."""
    return dict(group.attrs[ATTRS_KEY]).get("paths", {}).get(name, name)


def stream_array(group: Any, name: str) -> Any:
    """The output array ``name`` of a streamed output, wherever its layout keeps it."""
    return group[array_path(group, name)]


def _axis_names(ndim: int) -> list[str]:
    return list("zyx"[-ndim:])


def _axes_letters(ndim: int) -> str:
    return "ZYX"[-ndim:]


def _normalizer_to_json(normalizer: Normalizer) -> dict[str, Any]:
    return {"offset": float(normalizer.offset), "scale": float(normalizer.scale),
            "clip": None if normalizer.clip is None else [float(c) for c in normalizer.clip]}


def _normalizer_from_json(data: dict[str, Any]) -> dict[str, Any]:
    clip = data.get("clip")
    return {"offset": data["offset"], "scale": data["scale"],
            "clip": None if clip is None else tuple(clip)}


def _set_state(group: Any, **changes: Any) -> None:
    info = dict(group.attrs[ATTRS_KEY])
    info.update(_jsonable(changes))
    group.attrs[ATTRS_KEY] = info



def local_dask() -> Any:
    """Compute dask inputs here with threads, even when a distributed client is the default
    (lazy TIFF stores cannot travel to a cluster; tiles are read where they are used)."""
    import dask

    return dask.config.set(scheduler="threads")
