"""Training targets from labels: boundaries, weight maps, and the mask of annotated voxels."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from napari_unet.labels.slices import (
    Plane,
    plane,
    plane_in_range,
    plane_key,
    plane_name,
    planes_mask,
    slice_list,
)
from napari_unet.model.checkpoint import TASKS
from napari_unet.training.config import TrainingPair


def _is_binary(labels: np.ndarray) -> bool:
    return bool(labels.size) and int(labels.max()) <= 1 and int(labels.min()) >= 0


def label_boundaries(labels: np.ndarray, annotated: np.ndarray | None = None,
                     axes: Sequence[int] | None = None) -> np.ndarray:
    """Voxels with a face neighbour of another label, looking only at annotated neighbours.

    Equals ``skimage.segmentation.find_boundaries(labels, connectivity=1, mode="thick")``
    when everything is annotated. A neighbour that is not annotated (or outside the image)
    is unknown and never makes a boundary, so the result inside the annotation does not
    depend on the labels outside it.

    Parameters
    ----------
    labels : numpy.ndarray
        Label ids.
    annotated : numpy.ndarray, optional
        Bool mask of annotated voxels (None = all); the result is False outside it.
    axes : sequence of int, optional
        Axes along which neighbours count (None = all); ``(1, 2)`` of a stack gives the
        boundaries of each slice on its own.

    Returns
    -------
    numpy.ndarray
        Bool array of ``labels.shape``.
    """
    labels = np.asarray(labels)
    boundary = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim) if axes is None else axes:
        if labels.shape[axis] < 2:
            continue
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        lo, hi = tuple(lo), tuple(hi)
        differ = labels[lo] != labels[hi]
        if annotated is not None:
            differ &= annotated[lo] & annotated[hi]
        boundary[lo] |= differ
        boundary[hi] |= differ
    return boundary


def training_targets(labels: np.ndarray, task: str, annotated: np.ndarray | None = None,
                     axes: Sequence[int] | None = None, binary: bool | None = None) -> np.ndarray:
    """Per-voxel training targets for ``task`` from a label image.

    Targets are computed within the annotated voxels only: boundaries and membranes of an
    annotated slice or region never depend on the labels outside it (see
    :func:`label_boundaries`), and every target is 0 outside it. So corrected slices give the
    same targets whether they were pasted into the ground truth or into a prediction with
    other ids.

    Parameters
    ----------
    labels : numpy.ndarray
        Instance ids or classes (0 = background).
    task : str
        One of :data:`TASKS`.
    annotated : numpy.ndarray, optional
        Bool mask of annotated voxels (None = all).
    axes : sequence of int, optional
        Axes along which boundaries are found (None = all); ``(1, 2)`` for a 2D model trained
        on the slices of a stack.
    binary : bool, optional
        Whether the labels are binary (membranes: the mask itself); None = whether the
        annotated labels hold only 0 and 1.

    Returns
    -------
    numpy.ndarray
        Sigmoid tasks: ``uint8`` 0/1 of shape ``(C, *labels.shape)``:

        * ``foreground``: ``labels > 0``;
        * ``foreground_boundary``: ``labels > 0`` and the inner boundary of every object (so
          touching objects are separated by two boundary voxels);
        * ``membranes``: binary labels (only 0/1 in the annotated voxels) are the membrane
          mask itself; instance labels give the boundaries between cells (thick, face
          connectivity).

        ``semantic``: the class ids, ``int64`` of shape ``labels.shape``.
    """
    labels = np.asarray(labels)
    if annotated is not None:
        annotated = np.asarray(annotated, dtype=bool)
        if annotated.shape != labels.shape:
            raise ValueError(f"annotation mask shape {annotated.shape} differs from labels shape {labels.shape}")
        if annotated.all():
            annotated = None
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    inside = labels if annotated is None else np.where(annotated, labels, 0)
    if task == "semantic":
        return inside.astype(np.int64)
    if task == "foreground":
        return (inside > 0)[None].astype(np.uint8)
    if task == "foreground_boundary":
        boundary = label_boundaries(labels, annotated, axes) & (inside > 0)
        return np.stack([inside > 0, boundary]).astype(np.uint8)
    # membranes
    if binary is None:
        binary = _is_binary(labels if annotated is None else labels[annotated])
    if binary:
        return (inside > 0)[None].astype(np.uint8)
    return label_boundaries(labels, annotated, axes)[None].astype(np.uint8)


def weight_map_objects(labels: np.ndarray, target: np.ndarray, task: str, annotated: np.ndarray | None = None,
                       per_slice: bool | int = False, binary: bool | None = None) -> np.ndarray:
    """The objects whose gaps the ``boundary_bce`` weight map (:func:`losses.unet_weight_map`)
    weights up, from the annotated labels and the training targets of ``task``:

    * ``foreground``: the instances (binary labels: their connected components);
    * ``foreground_boundary``: the instances without their boundary voxels, so the boundary
      voxels between touching objects lie in a narrow gap and weigh most;
    * ``membranes``: the cells without their membrane voxels (binary membrane labels: the
      connected components of the non-membrane voxels);
    * ``semantic``: the connected components of each class.

    Components are face-connected; ``per_slice``: within each slice of a stack only (True or
    0: slices along z; 1 or 2: slices along y or x). ``binary`` as in :func:`training_targets`.
    """
    labels = np.asarray(labels)
    known = np.ones(labels.shape, bool) if annotated is None else np.asarray(annotated, dtype=bool)
    inside = np.where(known, labels, 0)
    structure = ndi.generate_binary_structure(labels.ndim, 1)
    if per_slice is not False and per_slice is not None and labels.ndim == 3:
        axis = 0 if per_slice is True else int(per_slice)
        across = [slice(None)] * 3
        for end in (0, 2):  # no neighbours across the slices
            across[axis] = end
            structure[tuple(across)] = False

    def components(region: np.ndarray) -> np.ndarray:
        return ndi.label(region, structure=structure)[0]

    if task == "semantic":
        objects = np.zeros(labels.shape, np.int64)
        offset = 0
        for c in np.unique(inside[inside > 0]):
            ids, n = ndi.label(inside == c, structure=structure)
            objects[ids > 0] = ids[ids > 0] + offset
            offset += n
        return objects
    if binary is None:
        binary = _is_binary(labels[known])
    if task == "membranes":
        if binary:
            return components(known & (inside == 0))
        return np.where(target[0] > 0, 0, inside)
    objects = components(inside > 0) if binary else inside
    if task == "foreground_boundary":
        objects = np.where(target[1] > 0, 0, objects)
    return objects


# --------------------------------------------------------------------------------------------
# input checks and data preparation
# --------------------------------------------------------------------------------------------

def check_labels(labels: np.ndarray, what: str = "labels") -> np.ndarray:
    """Labels as an integer array; ValueError for non-integer or negative values."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(np.isfinite(labels)) \
                or not np.array_equal(labels, np.round(labels)):
            raise ValueError(f"{what} must hold integers (label ids), got values of type {labels.dtype}")
        labels = labels.astype(np.int64)
    if labels.size and int(labels.min()) < 0:
        raise ValueError(f"{what} must not be negative")
    return labels


def annotation_mask(pair: TrainingPair, index: int = 0) -> np.ndarray | None:
    """Bool mask of annotated voxels of ``pair`` (None = everything annotated)."""
    shape = np.shape(pair.labels)
    what = f"training pair {index + 1}"
    if pair.annotated is not None and pair.slices is not None:
        raise ValueError(f"{what}: give either an annotation mask or a list of slices, not both")
    if pair.annotated is not None:
        mask = np.asarray(pair.annotated) != 0
        if mask.shape != shape:
            raise ValueError(f"{what}: annotation mask shape {mask.shape} differs from labels shape {shape}")
        if not mask.any():
            raise ValueError(f"{what}: the annotation mask marks nothing as annotated")
        return mask
    if pair.slices is not None:
        return planes_mask(shape, pair_planes(pair, index))
    return None


def pair_planes(pair: TrainingPair, index: int = 0) -> list[Plane] | None:
    """The annotated planes of ``pair`` (``pair.slices`` checked and sorted: z slices as
    ints, y and x slices as ``(axis, index)``), None without ``slices``; ValueError when they
    are empty, not planes, or outside the stack."""
    if pair.slices is None:
        return None
    shape = np.shape(pair.labels)
    what = f"training pair {index + 1}"
    if len(shape) < 3:
        raise ValueError(f"{what}: slices only apply to stacks (Z, Y, X), the labels are 2D")
    try:
        planes = slice_list(plane(p) for p in pair.slices)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: {err}") from None
    if not planes:
        raise ValueError(f"{what}: the list of annotated slices is empty")
    bad = [p for p in planes if isinstance(p, int) and not plane_in_range(p, shape)]
    if bad:
        raise ValueError(f"{what}: slices {bad} outside 0..{shape[-3] - 1}")
    for p in planes:
        if not plane_in_range(p, shape):
            axis = plane_key(p)[0]
            raise ValueError(f"{what}: {plane_name(p)} is outside the stack "
                             f"(0..{shape[len(shape) - 3 + axis] - 1} along {plane_name(p)[0]})")
    return planes


def has_cross_planes(planes: Sequence[Plane] | None) -> bool:
    """Whether ``planes`` hold a y or x plane (not only z slices)."""
    return planes is not None and any(not isinstance(p, int) for p in planes)


def plane_groups(shape: Sequence[int], planes: Sequence[Plane]) -> list[tuple[int, np.ndarray]]:
    """The planes grouped by the axis they are slices along: ``[(axis, mask), ...]`` with
    the bool mask of the group's planes, z first."""
    groups: dict[int, list[Plane]] = {}
    for p in slice_list(planes):
        groups.setdefault(plane_key(p)[0], []).append(p)
    return [(axis, planes_mask(shape, groups[axis])) for axis in sorted(groups)]


def plane_targets(labels: np.ndarray, task: str, planes: Sequence[Plane]
                  ) -> tuple[np.ndarray, list[tuple[int, np.ndarray, np.ndarray]]]:
    """Training targets of a stack annotated on ``planes`` (z, y or x slices): each plane's
    targets are made within that plane only (its boundaries from its own labels, as for a
    corrected z slice), and the targets of all planes are put together (their union).

    Returns
    -------
    target, groups
        The targets (as :func:`training_targets`, 0 outside the planes) and, per axis,
        ``(axis, mask, targets)`` of the planes along it.
    """
    labels = np.asarray(labels)
    union = planes_mask(labels.shape, planes)
    binary = _is_binary(labels[union])  # one answer for the pair, as for z slices
    target = None
    groups = []
    for axis, mask in plane_groups(labels.shape, planes):
        in_plane = tuple(a for a in range(3) if a != axis)
        along = training_targets(labels, task, mask, axes=in_plane, binary=binary)
        groups.append((axis, mask, along))
        target = along if target is None else np.maximum(target, along)
    return target, groups
