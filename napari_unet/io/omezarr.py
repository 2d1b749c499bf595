"""OME-Zarr (NGFF 0.5): an image with its label images under ``labels/``, as multiscale pyramids.

Written with the ``ome-zarr`` package's metadata writers; pixels are copied and downsampled a
chunk at a time, so memory stays bounded whatever the size. Read lazily (dask) with zarr.
"""

from __future__ import annotations

import math
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Iterator, Sequence

import numpy as np

from napari_unet.io.formats import ImageReadError, PathLike, normalize_unit
from napari_unet.progress import Progress

#: the suffix that asks for an OME-Zarr output (plain ``.zarr`` stays a plain zarr group)
OME_ZARR_SUFFIX = ".ome.zarr"
LABELS_GROUP = "labels"
#: a pyramid gets levels until every spatial axis is at most this long
MIN_LEVEL_SIZE = 128
MAX_LEVELS = 8
#: NGFF's unit names for the short spellings of :func:`normalize_unit`
NGFF_UNITS = {"um": "micrometer", "nm": "nanometer", "mm": "millimeter", "cm": "centimeter",
              "m": "meter", "pm": "picometer", "A": "angstrom", "Å": "angstrom"}
_SHORT_UNITS = {v: k for k, v in NGFF_UNITS.items() if k != "Å"}
#: RGBA of named classes in ``image-label`` metadata (matplotlib's tab10)
CLASS_COLORS = ((31, 119, 180, 255), (255, 127, 14, 255), (44, 160, 44, 255), (214, 39, 40, 255),
                (148, 103, 189, 255), (140, 86, 75, 255), (227, 119, 194, 255),
                (127, 127, 127, 255), (188, 189, 34, 255), (23, 190, 207, 255))


def require_ome_zarr() -> None:
    """Raise a one-line ImportError naming the extra when ``ome-zarr`` is not installed."""
    import importlib.util

    if importlib.util.find_spec("ome_zarr") is None:
        raise ImportError("OME-Zarr outputs need the optional package 'ome-zarr': "
                          "pip install 'napari-unet[ome]'")


def is_ome_zarr_name(path: PathLike) -> bool:
    """Whether ``path`` ends with ``.ome.zarr`` (an output written as OME-Zarr)."""
    return str(path).rstrip("/\\").lower().endswith(OME_ZARR_SUFFIX)


def ngff_unit(unit: str | None) -> str | None:
    """NGFF's name of a length unit (``um`` -> ``micrometer``); None when unknown."""
    short = normalize_unit(unit)
    if short is None:
        return None
    return NGFF_UNITS.get(short, short if short in _SHORT_UNITS else None)


def ngff_axes(axes: str, unit: str | None) -> list[dict[str, str]]:
    """NGFF axes for ``"CZYX"``-style letters: channel and space axes, lengths in ``unit``."""
    name = ngff_unit(unit)
    out = []
    for letter in axes.lower():
        if letter == "c":
            out.append({"name": "c", "type": "channel"})
        else:
            axis = {"name": letter, "type": "space"}
            if name:
                axis["unit"] = name
            out.append(axis)
    return out


def pyramid_factors(shape: Sequence[int], voxel_size: Sequence[float] | None, axes: str
                    ) -> list[tuple[int, ...]]:
    """The downsampling factor (1 or 2) per axis from each level to the next.

    Spatial axes are halved while longer than :data:`MIN_LEVEL_SIZE`; an axis much coarser
    than the finest (anisotropic stacks: z) waits until the others have caught up.
    """
    spatial = [i for i, a in enumerate(axes.upper()) if a != "C"]
    sizes = [float(v) for v in voxel_size] if voxel_size else [1.0] * len(spatial)
    current = [int(shape[i]) for i in spatial]
    factors: list[tuple[int, ...]] = []
    while len(factors) < MAX_LEVELS - 1 and max(current) > MIN_LEVEL_SIZE:
        finest = min(s for s, n in zip(sizes, current) if n > 1)
        halve = [n > 1 and s <= 1.5 * finest for s, n in zip(sizes, current)]
        step = [1] * len(shape)
        for k, i in enumerate(spatial):
            if halve[k]:
                step[i] = 2
                current[k] = math.ceil(current[k] / 2)
                sizes[k] *= 2
        factors.append(tuple(step))
    return factors


def _regions(shape: Sequence[int], chunks: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    grid = [range(0, n, c) for n, c in zip(shape, chunks)]
    for starts in np.ndindex(*[len(g) for g in grid]):
        yield tuple(slice(g[s], min(g[s] + c, n))
                    for g, s, c, n in zip(grid, starts, chunks, shape))


def downsample(block: np.ndarray, factors: Sequence[int], labels: bool) -> np.ndarray:
    """One pyramid step of ``block``: every ``f``-th voxel for labels (ids stay ids), the mean
    of each ``f``-block for images (edges padded by repetition)."""
    if labels:
        return block[tuple(slice(None, None, f) for f in factors)]
    pad = [(0, (-n) % f) for n, f in zip(block.shape, factors)]
    if any(p for _, p in pad):
        block = np.pad(block, pad, mode="edge")
    shape = [v for n, f in zip(block.shape, factors) for v in (n // f, f)]
    mean = block.reshape(shape).mean(axis=tuple(range(1, len(shape), 2)), dtype=np.float64)
    if np.issubdtype(block.dtype, np.integer):
        info = np.iinfo(block.dtype)
        mean = np.clip(np.rint(mean), info.min, info.max)
    return mean.astype(block.dtype)


def copy_chunked(source: Any, target: Any, note: str = "") -> Generator[Progress, None, None]:
    """Copy ``source`` (numpy, dask, zarr) into the zarr array ``target``, a chunk at a time."""
    import dask

    regions = list(_regions(target.shape, target.chunks))
    start = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        for count, region in enumerate(regions):
            target[region] = np.asarray(source[region]).astype(target.dtype, copy=False)
            yield Progress(count + 1, len(regions), time.perf_counter() - start, stage="postprocess",
                           message=note if count == 0 else "")


def build_pyramid(group: Any, *, axes: str, voxel_size: Sequence[float] | None, unit: str | None,
                  labels: bool, name: str | None = None) -> Generator[Progress, None, int]:
    """Add levels ``1, 2, …`` below the level ``0`` of ``group`` and write its NGFF
    ``multiscales`` (axes with units, a scale per level); returns the number of levels.

    Each level is read from the one above it a chunk at a time (bounded memory); levels left
    from an earlier attempt are replaced.
    """
    from ome_zarr.writer import write_multiscales_metadata

    base = group["0"]
    factors = pyramid_factors(base.shape, voxel_size, axes)
    spatial = [i for i, a in enumerate(axes.upper()) if a != "C"]
    scale = [1.0] * base.ndim
    if voxel_size:
        for i, v in zip(spatial, voxel_size):
            scale[i] = float(v)
    datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(scale)}]}]
    above = base
    start = time.perf_counter()
    for level, step in enumerate(factors, start=1):
        shape = tuple(math.ceil(n / f) for n, f in zip(above.shape, step))
        chunks = tuple(min(c, n) for c, n in zip(base.chunks, shape))
        array = group.create_array(str(level), shape=shape, chunks=chunks, dtype=base.dtype,
                                   fill_value=0, overwrite=True,
                                   dimension_names=[a.lower() for a in axes])
        regions = list(_regions(shape, chunks))
        for count, region in enumerate(regions):
            source = tuple(slice(r.start * f, min(r.stop * f, n))
                           for r, f, n in zip(region, step, above.shape))
            array[region] = downsample(np.asarray(above[source]), step, labels)
            yield Progress(count + 1, len(regions), time.perf_counter() - start,
                           stage="postprocess",
                           message=f"pyramid level {level} of {name or 'image'}" if count == 0 else "")
        scale = [s * f for s, f in zip(scale, step)]
        datasets.append({"path": str(level),
                         "coordinateTransformations": [{"type": "scale", "scale": list(scale)}]})
        above = array
    units = {a["name"]: a["unit"] for a in ngff_axes(axes, unit) if "unit" in a}
    write_multiscales_metadata(group, datasets, axes=[a.lower() for a in axes],
                               axes_units=units or None, name=name)
    return len(datasets)


def write_label_metadata(image_group: Any, name: str, classes: dict[int, str] | None = None) -> None:
    """Register ``labels/<name>`` in the image's ``labels`` list with its ``image-label``
    metadata (the source image, and class names as ``properties`` when there are any)."""
    from ome_zarr.writer import get_metadata, write_label_metadata as ome_write_label_metadata

    labels_group = image_group.require_group(LABELS_GROUP)
    listed = get_metadata(labels_group).get("labels", [])
    if name in listed:  # written again (a resumed run): keep the list as it is
        listed.remove(name)
        attrs = dict(labels_group.attrs.get("ome", {}))
        attrs["labels"] = listed
        labels_group.attrs["ome"] = attrs
    ids = sorted((classes or {}).items())
    properties = [{"label-value": int(i), "class": str(n)} for i, n in ids]
    # a colour per named class; none otherwise, so viewers keep their own (instances)
    colors = [{"label-value": int(i), "rgba": list(CLASS_COLORS[k % len(CLASS_COLORS)])}
              for k, (i, _) in enumerate(ids)]
    ome_write_label_metadata(labels_group, name, colors=colors, properties=properties or None,
                             source={"image": "../../"})
    attrs = dict(labels_group.attrs.get("ome", {}))
    if "version" not in attrs:  # NGFF 0.5 wants it on the labels group too
        labels_group.attrs["ome"] = {"version": _ome_attrs(image_group).get("version", "0.5"),
                                     **attrs}


def label_array(image_group: Any, name: str, shape: Sequence[int], chunks: Sequence[int],
                dtype: Any, axes: str) -> Any:
    """Create the full-resolution level of ``labels/<name>``."""
    return image_group.create_array(f"{LABELS_GROUP}/{name}/0", shape=tuple(shape),
                                    chunks=tuple(chunks), dtype=dtype, fill_value=0,
                                    overwrite=True, dimension_names=[a.lower() for a in axes])


def write_ome_zarr(path: PathLike, image: Any, labels: dict[str, Any], *, axes: str,
                   voxel_size: Sequence[float] | None, unit: str | None,
                   classes: dict[str, dict[int, str]] | None = None,
                   chunks: Sequence[int] | None = None) -> Generator[Progress, None, Path]:
    """Write ``image`` (axes ``axes``, e.g. ``"ZYX"`` or ``"CYX"``) and its ``labels`` (spatial
    arrays by name; ``classes``: their class names by id) as an OME-Zarr image with pyramids,
    atomically: built in a temporary folder beside ``path``, then renamed into place (an
    existing output is replaced)."""
    import zarr

    require_ome_zarr()
    path = Path(path)
    spatial_axes = "".join(a for a in axes.upper() if a != "C")
    spatial_shape = tuple(n for n, a in zip(image.shape, axes.upper()) if a != "C")
    for name, data in labels.items():
        if tuple(data.shape) != spatial_shape:
            raise ValueError(f"labels {name!r} of shape {tuple(data.shape)} do not match the "
                             f"image's {spatial_shape}")
    spatial_chunks = tuple(chunks) if chunks else _default_chunks(spatial_shape)
    image_chunks = tuple(n if a == "C" else spatial_chunks[spatial_axes.index(a)]
                         for n, a in zip(image.shape, axes.upper()))
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        root = zarr.open_group(str(temporary), mode="w", zarr_format=3)
        base = root.create_array("0", shape=tuple(image.shape), chunks=image_chunks,
                                 dtype=np.dtype(image.dtype), fill_value=0,
                                 dimension_names=[a.lower() for a in axes])
        yield from copy_chunked(image, base, "writing the image")
        yield from build_pyramid(root, axes=axes, voxel_size=voxel_size, unit=unit, labels=False,
                                 name=path.name.split(".")[0])
        for name, data in labels.items():
            label_array(root, name, spatial_shape, spatial_chunks, np.dtype(data.dtype),
                        spatial_axes)
            group = root[f"{LABELS_GROUP}/{name}"]
            yield from copy_chunked(data, group["0"], f"writing labels {name}")
            yield from build_pyramid(group, axes=spatial_axes, voxel_size=voxel_size, unit=unit,
                                     labels=True, name=name)
            write_label_metadata(root, name, (classes or {}).get(name))
        _replace(temporary, path)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return path


def _default_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    side = {2: 512, 3: 128}.get(len(shape), 64)
    return tuple(min(int(n), side) for n in shape)


def _replace(temporary: Path, path: Path) -> None:
    """Rename the finished ``temporary`` folder to ``path``; an old ``path`` goes only after."""
    if not path.exists():
        temporary.rename(path)
        return
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
    path.rename(old)
    temporary.rename(path)
    shutil.rmtree(old, ignore_errors=True)


# --- reading ---------------------------------------------------------------------------------


@dataclass
class OmeZarrLevels:
    """One multiscale image of an OME-Zarr: its levels (dask arrays, largest first)."""

    name: str
    levels: list[Any]
    axes: str
    scale: tuple[float, ...]
    unit: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


def _ome_attrs(node: Any) -> dict[str, Any]:
    attrs = dict(node.attrs)
    return dict(attrs.get("ome", attrs))


def _multiscale(node: Any, name: str) -> OmeZarrLevels:
    import dask.array as da

    attrs = _ome_attrs(node)
    image = attrs["multiscales"][0]
    axes_meta = image.get("axes") or []
    names = [a["name"] if isinstance(a, dict) else str(a) for a in axes_meta]
    levels = [da.from_zarr(node[d["path"]]) for d in image["datasets"]]
    if not names:
        names = list("tczyx"[-levels[0].ndim:])
    scale = [1.0] * levels[0].ndim
    for transforms in (image["datasets"][0].get("coordinateTransformations", []),
                       image.get("coordinateTransformations", [])):
        for transform in transforms:
            if transform.get("type") == "scale":
                scale = [s * float(v) for s, v in zip(scale, transform["scale"])]
    units = {normalize_unit(_SHORT_UNITS.get(a.get("unit"), a.get("unit")))
             for a in axes_meta if isinstance(a, dict) and a.get("type") == "space"}
    unit = units.pop() if len(units) == 1 else None
    metadata = {k: v for k, v in attrs.items() if k != "multiscales"}
    return OmeZarrLevels(name, levels, "".join(n.upper() for n in names), tuple(scale), unit,
                         metadata)


def is_ome_zarr(path: PathLike) -> bool:
    """Whether ``path`` is a zarr group with NGFF ``multiscales`` metadata."""
    import zarr

    try:
        node = zarr.open_group(str(path), mode="r")
    except Exception:  # noqa: BLE001 - not a zarr group
        return False
    return bool(_ome_attrs(node).get("multiscales"))


def read_ome_zarr(path: PathLike) -> tuple[OmeZarrLevels, list[OmeZarrLevels]]:
    """The image pyramid of an OME-Zarr and its label pyramids (``labels/``), all lazy.

    Raises
    ------
    ImageReadError
        ``path`` is not an OME-Zarr image.
    """
    import zarr

    path = Path(path).expanduser()
    try:
        root = zarr.open_group(str(path), mode="r")
        image = _multiscale(root, path.name.split(".")[0])
    except Exception as exc:  # noqa: BLE001 - any failure: not an OME-Zarr image
        raise ImageReadError(f"cannot read {path} as OME-Zarr: {exc}") from exc
    labels = []
    if LABELS_GROUP in root:
        for name in _ome_attrs(root[LABELS_GROUP]).get("labels", []):
            if name in root[LABELS_GROUP]:
                labels.append(_multiscale(root[LABELS_GROUP][name], name))
    return image, labels
