"""Per-object measurements of a labels image: one row per label, in calibrated units.

The table is napari's convention for a labels layer's ``features``: a ``label`` column equal to
the pixel id, then one column per property. It comes from :func:`skimage.measure.regionprops_table`
with ``spacing`` (anisotropic voxels are respected). The 2D perimeter is scikit-image's for
square pixels and the length of the marching-squares contour otherwise (scikit-image's takes
isotropic pixels only). 3D objects get a solidity and no sphericity: the surface of a voxelised
object (marching cubes) is 10-15 % too large whatever its size, so a sphere would read 0.85.

A table is a ``dict`` of equal-length numpy arrays (napari, pandas and the CSV writer all take
it). :func:`measure_labels` is a generator (it yields :class:`~napari_unet.progress.Progress`
and returns the table); :func:`update_table` recomputes only the rows of the labels an edit
touched (:func:`touched_labels`).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Generator, Iterable, Sequence

import numpy as np

from napari_unet.progress import Progress

__all__ = ["AXES", "measure_labels", "measure", "update_table", "touched_labels", "column_units",
           "sort_rows", "row_of", "centroid_index", "labels_in_atoms"]

#: axis names of the centroid and bounding-box columns, last axes first
AXES = ("z", "y", "x")
#: labels measured per progress step
CHUNK = 64


def _axes(ndim: int) -> tuple[str, ...]:
    return AXES[-ndim:]


def column_units(ndim: int, unit: str = "um", intensity: bool = False) -> dict[str, str]:
    """Each column of a ``ndim`` table and its unit ("" for counts, pixel indices and ratios)."""
    axes = _axes(ndim)
    size = "volume" if ndim == 3 else "area"
    columns = {"label": "", "voxels" if ndim == 3 else "pixels": "", size: f"{unit}^{ndim}"}
    columns.update({f"centroid_{a}": unit for a in axes})
    columns.update({f"bbox_{a}_start": "" for a in axes})
    columns.update({f"bbox_{a}_stop": "" for a in axes})
    columns["equivalent_diameter"] = unit
    if intensity:
        columns.update({"mean_intensity": "", "min_intensity": "", "max_intensity": ""})
    if ndim == 3:
        columns["solidity"] = ""
    else:
        columns.update({"perimeter": unit, "eccentricity": "", "solidity": ""})
    return columns


def _empty(ndim: int, intensity: bool) -> dict[str, np.ndarray]:
    table = {name: np.zeros(0, dtype=np.float64) for name in column_units(ndim, intensity=intensity)}
    for name in table:
        if name in ("label", "voxels", "pixels") or name.startswith("bbox_"):
            table[name] = np.zeros(0, dtype=np.int64)
    return table


def _check(labels: np.ndarray, image: np.ndarray | None,
           spacing: Sequence[float] | None) -> tuple[float, ...]:
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels have {labels.ndim} axes; measurements take a 2D image or a 3D stack")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise ValueError(f"labels must be integers, not {labels.dtype}")
    if image is not None and tuple(image.shape) != tuple(labels.shape):
        raise ValueError(f"the image has shape {tuple(image.shape)} and the labels "
                         f"{tuple(labels.shape)}; measure with an image of the labels' shape")
    spacing = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * labels.ndim))
    if len(spacing) != labels.ndim or not all(s > 0 and np.isfinite(s) for s in spacing):
        raise ValueError(f"spacing {spacing} must be {labels.ndim} positive numbers")
    return spacing


def _contour_length(mask: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Perimeter of a 2D binary crop: length of its marching-squares contour, in ``spacing``
    units (for anisotropic pixels, which scikit-image's ``perimeter`` refuses)."""
    from skimage.measure import find_contours

    total = 0.0
    for contour in find_contours(np.pad(mask.astype(np.float32), 1), 0.5):
        steps = np.diff(contour, axis=0) * np.asarray(spacing)
        total += float(np.sqrt((steps ** 2).sum(axis=1)).sum())
    return total


#: the 8 corners of a voxel, as offsets from its index
_CORNERS = np.array([[z, y, x] for z in (0, 1) for y in (0, 1) for x in (0, 1)], dtype=np.int64)


def _solidity_3d(mask: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Volume of a 3D object / volume of the convex hull of its voxels (their corners, so a box
    is 1 and the hull holds the whole object), from the surface voxels' corners with qhull."""
    from scipy import ndimage
    from scipy.spatial import ConvexHull, QhullError

    surface = mask & ~ndimage.binary_erosion(mask)
    corners = np.unique((np.argwhere(surface)[:, None, :] + _CORNERS[None]).reshape(-1, 3), axis=0)
    try:
        hull = ConvexHull(corners * np.asarray(spacing))
    except QhullError:
        return float("nan")
    return float(mask.sum() * np.prod(spacing) / hull.volume) if hull.volume > 0 else float("nan")


def _measure_some(labels: np.ndarray, image: np.ndarray | None, spacing: tuple[float, ...],
                  origin: tuple[float, ...]) -> dict[str, np.ndarray]:
    """The rows of every label > 0 in ``labels`` (already restricted to the wanted ones)."""
    from skimage.measure import regionprops_table

    def perimeter_table(crop: np.ndarray) -> dict[str, np.ndarray]:
        return regionprops_table(crop, properties=["perimeter"])

    ndim = labels.ndim
    props = ["label", "num_pixels", "area", "centroid", "bbox", "equivalent_diameter_area", "slice"]
    if ndim == 2:
        props.append("solidity")
    if image is not None:
        props += ["intensity_mean", "intensity_min", "intensity_max"]
    if ndim == 2:
        props.append("eccentricity")
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # a flat 2D object (one row) has no convex hull: qhull warns, solidity is NaN
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        raw = regionprops_table(labels, intensity_image=image, properties=props, spacing=spacing)
    if ndim == 2:
        solidity = raw["solidity"].astype(np.float64)
        solidity[~np.isfinite(solidity) | (solidity > 1 + 1e-9)] = np.nan
    else:  # scikit-image rasterises the 3D hull: minutes for a few large cells
        solidity = np.array([_solidity_3d(labels[where] == label, spacing)
                             for label, where in zip(raw["label"], raw["slice"])])
    axes = _axes(ndim)
    table: dict[str, np.ndarray] = {"label": raw["label"].astype(np.int64),
                                    "voxels" if ndim == 3 else "pixels": raw["num_pixels"].astype(np.int64),
                                    "volume" if ndim == 3 else "area": raw["area"].astype(np.float64)}
    for i, a in enumerate(axes):  # regionprops' centroid is in spacing units from the corner
        table[f"centroid_{a}"] = raw[f"centroid-{i}"].astype(np.float64) + origin[i]
    for i, a in enumerate(axes):
        table[f"bbox_{a}_start"] = raw[f"bbox-{i}"].astype(np.int64)
    for i, a in enumerate(axes):
        table[f"bbox_{a}_stop"] = raw[f"bbox-{ndim + i}"].astype(np.int64)
    table["equivalent_diameter"] = raw["equivalent_diameter_area"].astype(np.float64)
    if image is not None:
        for stat in ("mean", "min", "max"):
            table[f"{stat}_intensity"] = raw[f"intensity_{stat}"].astype(np.float64)
    if ndim == 3:
        table["solidity"] = solidity
    else:
        if spacing[0] == spacing[1]:
            perimeter = perimeter_table(labels)["perimeter"] * spacing[0]
        else:
            perimeter = np.array([_contour_length(labels[where] == label, spacing)
                                  for label, where in zip(raw["label"], raw["slice"])])
        table["perimeter"] = np.asarray(perimeter, dtype=np.float64)
        table["eccentricity"] = raw["eccentricity"].astype(np.float64)
        table["solidity"] = solidity
    return table


def _concat(parts: list[dict[str, np.ndarray]], ndim: int, intensity: bool) -> dict[str, np.ndarray]:
    empty = _empty(ndim, intensity)
    if not parts:
        return empty
    return {name: np.concatenate([p[name] for p in parts]).astype(empty[name].dtype)
            for name in empty}


def _only(labels: np.ndarray, ids: np.ndarray, bounds: tuple[slice, ...]) -> np.ndarray:
    """``labels`` inside ``bounds`` with every id not in ``ids`` set to 0."""
    crop = labels[bounds]
    return np.where(np.isin(crop, ids), crop, 0)


def measure_labels(labels: Any, image: Any = None, spacing: Sequence[float] | None = None,
                   origin: Sequence[float] | None = None, only: Iterable[int] | None = None,
                   chunk: int = CHUNK) -> Generator[Progress, None, dict[str, np.ndarray]]:
    """Measure each object of ``labels`` (a generator: yields progress, returns the table).

    Parameters
    ----------
    labels : 2D or 3D integer array (numpy or anything ``np.asarray`` reads, e.g. dask)
    image : optional array of the same shape; gives the intensity columns
    spacing : voxel size per axis (the layer's scale), default 1
    origin : physical position of voxel 0 (the layer's translate), added to the centroids
    only : measure only these labels (the rest of the table is someone else's business)

    Returns
    -------
    dict
        column name -> array, one row per label, sorted by label; units: :func:`column_units`.
    """
    labels = np.asarray(labels)
    image = None if image is None else np.asarray(image)
    spacing = _check(labels, image, spacing)
    origin = tuple(float(o) for o in (origin if origin is not None else (0.0,) * labels.ndim))
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if image is not None and image.dtype.kind == "f" and not np.isfinite(image).all():
        image = np.nan_to_num(image)  # a NaN would make the intensity columns NaN
    from scipy import ndimage

    boxes = ndimage.find_objects(labels) if labels.size else []
    present = np.array([i + 1 for i, box in enumerate(boxes) if box is not None], dtype=np.int64)
    if only is not None:
        present = np.intersect1d(present, np.fromiter((int(i) for i in only), dtype=np.int64))
    parts: list[dict[str, np.ndarray]] = []
    started = time.perf_counter()
    total = max(1, len(present))
    for start in range(0, len(present), chunk):
        ids = present[start:start + chunk]
        bounds = tuple(slice(min(boxes[i - 1][a].start for i in ids),
                             max(boxes[i - 1][a].stop for i in ids)) for a in range(labels.ndim))
        corner = tuple(b.start for b in bounds)
        part = _measure_some(_only(labels, ids, bounds),
                             None if image is None else image[bounds], spacing,
                             tuple(o + c * s for o, c, s in zip(origin, corner, spacing)))
        for i, a in enumerate(_axes(labels.ndim)):  # back to whole-array indices
            part[f"bbox_{a}_start"] += corner[i]
            part[f"bbox_{a}_stop"] += corner[i]
        parts.append(part)
        yield Progress(min(start + chunk, len(present)), total, time.perf_counter() - started,
                       stage="measure")
    return _concat(parts, labels.ndim, image is not None)


def measure(labels: Any, image: Any = None, spacing: Sequence[float] | None = None,
            origin: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """:func:`measure_labels` run to the end (for scripts and tests)."""
    from napari_unet.progress import drain

    return drain(measure_labels(labels, image, spacing, origin))


def touched_labels(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The labels (> 0) whose pixels changed between two versions of a region (an edit)."""
    before, after = np.asarray(before), np.asarray(after)
    changed = before != after
    ids = np.union1d(before[changed], after[changed])
    return ids[ids > 0].astype(np.int64)


def update_table(table: dict[str, np.ndarray], labels: Any, touched: Iterable[int],
                 image: Any = None, spacing: Sequence[float] | None = None,
                 origin: Sequence[float] | None = None
                 ) -> Generator[Progress, None, dict[str, np.ndarray]]:
    """``table`` with the rows of ``touched`` labels measured again (gone ones dropped, new
    ones added), the other rows as they were; sorted by label. A generator, as
    :func:`measure_labels`."""
    touched = np.unique(np.fromiter((int(i) for i in touched), dtype=np.int64))
    fresh = yield from measure_labels(labels, image, spacing, origin, only=touched)
    keep = ~np.isin(np.asarray(table["label"]), touched)
    names = list(fresh)
    merged = {n: np.concatenate([np.asarray(table[n])[keep], fresh[n]]) if n in table else fresh[n]
              for n in names}
    order = np.argsort(merged["label"], kind="stable")
    return {n: v[order] for n, v in merged.items()}


def row_of(table: dict[str, Any], label: int) -> int | None:
    """The row index of ``label`` in ``table`` (None if absent)."""
    hits = np.flatnonzero(np.asarray(table["label"]) == label)
    return int(hits[0]) if hits.size else None


def centroid_index(table: dict[str, Any], row: int, ndim: int) -> tuple[float, ...]:
    """The centroid of ``row`` in physical units, in axis order (for centring the view)."""
    return tuple(float(np.asarray(table[f"centroid_{a}"])[row]) for a in _axes(ndim))


def sort_rows(table: dict[str, Any], column: str, descending: bool = False) -> np.ndarray:
    """Row order of ``table`` by ``column`` (NaN last), stable."""
    values = np.asarray(table[column], dtype=np.float64)
    key = np.where(np.isnan(values), np.inf, -values if descending else values)
    return np.argsort(key, kind="stable")


def labels_in_atoms(atoms: Any) -> np.ndarray:
    """The labels (> 0) a napari paint step touched: the old values under its atoms and the
    painted values. An atom has ``old_values`` and ``new_value`` attributes (napari's masked
    atoms) or is ``(indices, old_values, new_values)``."""
    found: list[np.ndarray] = []
    for atom in atoms or []:
        if hasattr(atom, "old_values"):
            old, new = atom.old_values, atom.new_value
        elif isinstance(atom, tuple) and len(atom) == 3:
            _, old, new = atom
        else:
            continue
        found += [np.unique(np.asarray(old)).ravel(), np.unique(np.asarray(new)).ravel()]
    if not found:
        return np.zeros(0, dtype=np.int64)
    ids = np.unique(np.concatenate(found)).astype(np.int64)
    return ids[ids > 0]
