"""Training data preparation: checked pairs to padded, indexed items, weight maps, class balance."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from napari_unet.model.normalization import fit_normalizer
from napari_unet.training.config import TrainingPair
from napari_unet.training.holdout import split_validation
from napari_unet.training.losses import (
    UNET_SIGMA,
    UNET_W0,
    WEIGHTED_LOSSES,
    class_weights_from_counts,
    map_class_weights,
    positive_weights,
    unet_weight_map,
)
from napari_unet.training.sampling import (
    _Item,
    _pad_to,
    auto_batch_size,
    auto_patch_shape,
    index_item,
    make_item,
)
from napari_unet.labels.slices import plane_name, plane_region
from napari_unet.training.targets import (
    _is_binary,
    annotation_mask,
    check_labels,
    has_cross_planes,
    pair_planes,
    plane_targets,
    training_targets,
    weight_map_objects,
)

if TYPE_CHECKING:
    from napari_unet.training.trainer import Trainer

#: per pair, per group of planes: objects of the weight map, annotation mask, and the axis the
#: targets are made slice by slice along (None: in 3D)
_MapObjects = list[list[tuple[np.ndarray, np.ndarray | None, int | None]]]

#: a y or x slice of a stack is a training image of a 2D model when both its sides are at
#: least this long (thinner ones are no 2D image to learn from)
MIN_PLANE_SIDE = 16


def prepare(trainer: Trainer, pairs: Sequence[TrainingPair]) -> tuple[list[_Item], list[_Item]]:
    """Check ``pairs`` and turn them into training and validation items.

    Sets the trainer's ``_summary``, ``patch_shape``, ``batch_size``, ``keeps_best``,
    ``validation_message``, ``class_weights`` and ``pos_weight``.

    Returns
    -------
    items, val_items
        The training items and the items with held-out voxels (see
        :func:`holdout.split_validation`).

    Raises
    ------
    ValueError
        On input errors: differing shapes, empty labels, a 2D image for a 3D model, ...
    """
    model, dims, task, config = trainer.parent, trainer.parent.spatial_dims, trainer.task, trainer.config
    if len(pairs) == 0:
        raise ValueError("no training data: give at least one image with labels")
    raw: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple[int, int | None],
                    np.ndarray | None]] = []
    map_objects: _MapObjects = []  # boundary_bce
    planes_of: dict[int, list] = {}  # raw index: the y/x (and z) planes of a 3D item
    summary_pairs = []
    n_annotated = 0
    any_labels = False
    for index, pair in enumerate(pairs):
        what = f"training pair {index + 1}"
        image = np.asarray(pair.image)
        labels = check_labels(pair.labels, f"{what}: labels")
        if image.shape != labels.shape:
            raise ValueError(f"{what}: image shape {image.shape} differs from labels shape {labels.shape}")
        if image.ndim not in (2, 3):
            raise ValueError(f"{what}: expected a 2D image or 3D stack, got shape {image.shape}")
        if dims == 3 and image.ndim != 3:
            raise ValueError(f"{what}: a 3D model needs 3D stacks (Z, Y, X); got a 2D image")
        if not np.issubdtype(image.dtype, np.number) and image.dtype != bool:
            raise ValueError(f"{what}: image must be numeric, got {image.dtype}")
        mask = annotation_mask(pair, index)
        annotated_labels = labels if mask is None else labels[mask]
        # instance ids in the annotation: validation also scores objects (F1)
        objects = labels if task != "semantic" and not _is_binary(annotated_labels) else None
        any_labels = any_labels or bool(np.any(annotated_labels))
        if task == "semantic" and int(labels.max()) >= len(model.class_names):
            raise ValueError(f"{what}: label value {int(labels.max())} but the model has only "
                             f"{len(model.class_names)} classes ({', '.join(model.class_names)})")
        normalizer = fit_normalizer(image, model.normalization)
        norm_image = normalizer(image)
        # targets from the annotated voxels only, and slice by slice for a 2D model on a
        # stack and for corrected slices (each slice is corrected on its own: ids need not
        # agree between two corrected neighbours); y and x slices within their own plane
        planes = pair_planes(pair, index)
        if image.ndim == 3 and has_cross_planes(planes):
            target, groups = plane_targets(labels, task, planes)
            binary = _is_binary(annotated_labels)
            if config.loss in WEIGHTED_LOSSES:
                map_objects.append([(weight_map_objects(labels, along, task, group_mask, axis,
                                                        binary=binary), group_mask, axis)
                                    for axis, group_mask, along in groups])
        else:
            per_slice = (1, 2) if image.ndim == 3 and (dims == 2 or pair.slices is not None) else None
            target = training_targets(labels, task, mask, axes=per_slice)
            if config.loss in WEIGHTED_LOSSES:
                map_objects.append([(weight_map_objects(labels, target, task, mask, per_slice is not None),
                                     mask, 0 if per_slice is not None else None)])
        count = int(labels.size if mask is None else mask.sum())
        n_annotated += count
        info: dict[str, Any] = {"shape": list(image.shape), "annotated_voxels": count}
        if planes is not None:
            info["slices"] = [p if isinstance(p, int) else list(p) for p in planes]
        if task != "semantic" and not _is_binary(labels):
            info["objects"] = int(len(np.unique(annotated_labels)) - (0 in annotated_labels))
        summary_pairs.append(info)
        if dims == 2 and image.ndim == 3 and has_cross_planes(planes):
            # a 2D model learns from each corrected plane, seen along z, y or x
            for p in planes:
                where = plane_region(p)
                plane_image = norm_image[where]
                if min(plane_image.shape) < MIN_PLANE_SIDE:
                    raise ValueError(f"{what}: {plane_name(p)} is {plane_image.shape[0]} x "
                                     f"{plane_image.shape[1]} pixels, too thin to train a 2D "
                                     f"model on (at least {MIN_PLANE_SIDE} x {MIN_PLANE_SIDE}); "
                                     "correct z slices instead")
                t = target[where] if task == "semantic" else target[(slice(None), *where)]
                raw.append((plane_image, t, None, (index, p),
                            objects[where] if objects is not None else None))
        elif dims == 2 and image.ndim == 3:  # a 2D model learns from the annotated slices of a stack
            for z in range(image.shape[0]):
                if mask is None or mask[z].any():
                    m = None if mask is None or mask[z].all() else mask[z]
                    t = target[z] if task == "semantic" else target[:, z]
                    raw.append((norm_image[z], t, m, (index, z), objects[z] if objects is not None else None))
        else:
            m = None if mask is None or mask.all() else mask
            raw.append((norm_image, target, m, (index, None), objects))
            if has_cross_planes(planes):
                planes_of[len(raw) - 1] = planes
    if not any_labels:
        raise ValueError("the labels are empty: no object in the annotated region of any image"
                         if len(pairs) > 1 else "the labels are empty (no object in the annotated region)")
    trainer._summary = {"pairs": len(pairs), "annotated_voxels": n_annotated, "images": summary_pairs}
    maps = weight_maps(map_objects, model.voxel_size) if map_objects else None

    device = trainer.device
    shapes = [r[0].shape for r in raw]
    patch = tuple(config.patch_shape) if config.patch_shape else auto_patch_shape(model, shapes, device)
    if len(patch) != dims:
        raise ValueError(f"patch shape {patch} does not match the {dims}D model")
    trainer.patch_message = ""
    if config.patch_shape:
        patch, trainer.patch_message = clip_patch(patch, shapes, model.config.divisor())
    trainer.patch_shape = patch
    trainer.batch_size = config.batch_size or auto_batch_size(model, patch, device)

    items = []
    for k, (img, t, m, source, objects) in enumerate(raw):
        wmap = None
        if maps is not None:
            wmap = maps[source[0]] if source[1] is None else maps[source[0]][plane_region(source[1])]
        items.append(make_item(img, t, m, patch, task, config.seed, wmap))
        items[-1].source = source
        items[-1].planes = planes_of.get(k)
        if objects is not None:
            items[-1].labels = _pad_to(objects, patch, "constant")
    val_items, trainer.keeps_best, trainer.validation_message = split_validation(
        items, config.validation_fraction, config.validation_gap, config.seed,
        lambda item: index_item(item, task, config.seed),
        cross_planes_first=task == "membranes" and dims == 3)
    for item in val_items:  # only validation scores objects: a copy of its held-out ids
        if item.labels is not None:
            item.labels = np.where(item.valid, item.labels, 0)
    for item in items:
        if item.valid is None:
            item.labels = None
    trainer.class_weights, trainer.pos_weight = class_stats(items, task, len(model.class_names))
    return items, val_items


def clip_patch(patch: Sequence[int], shapes: Sequence[Sequence[int]], divisor: Sequence[int]
               ) -> tuple[tuple[int, ...], str]:
    """A requested patch shape clipped to the largest data (a multiple of the network's
    ``divisor``), so that a patch far larger than the data cannot allocate huge batches; and
    the one line that says so (empty when nothing was clipped)."""
    largest = [max(int(s[a]) for s in shapes) for a in range(len(patch))]
    clipped = tuple(int(p) if p <= n else (n // d * d if n >= d else d)
                    for p, n, d in zip(patch, largest, divisor))
    if clipped == tuple(patch):
        return clipped, ""
    return clipped, (f"the patch {','.join(map(str, patch))} is larger than the data "
                     f"({'x'.join(map(str, largest))}): training with patches of "
                     f"{','.join(map(str, clipped))}")


def weight_maps(map_objects: _MapObjects, voxel_size: Sequence[float] | None) -> list[np.ndarray]:
    """U-Net weight maps (:func:`losses.unet_weight_map`) of each pair's objects.

    The objects are those of :func:`targets.weight_map_objects`; the maps are made slice by
    slice where the targets are, with one class balance over the annotated voxels of all
    pairs and ``sigma`` in in-plane pixels (``voxel_size`` gives the other axes' scale).
    """
    n_objects = n_total = 0
    for groups in map_objects:
        for objects, mask, _ in groups:
            inside = objects > 0 if mask is None else (objects > 0)[mask]
            n_objects += int(np.count_nonzero(inside))
            n_total += inside.size
    balance = map_class_weights(n_objects / max(n_total, 1))

    def sampling(axes: Sequence[int], ndim: int) -> np.ndarray | None:
        if not voxel_size or len(voxel_size) < ndim:
            return None
        spacing = np.asarray(voxel_size[-ndim:], dtype=float)
        return spacing[list(axes)] / spacing[-2:].min()

    maps = []
    for groups in map_objects:
        weights = None
        for objects, mask, axis in groups:
            if axis is None:
                weights = unet_weight_map(objects, UNET_W0, UNET_SIGMA,
                                          sampling(range(objects.ndim), objects.ndim),
                                          class_weights=balance)
                continue
            if weights is None:
                weights = np.ones(objects.shape, np.float32)
            # z slices: the last two axes of the voxel size (a 2D model's has only those)
            in_plane = sampling((0, 1), 2) if axis == 0 else sampling([a for a in range(3) if a != axis], 3)
            for index in range(objects.shape[axis]):
                where = (slice(None),) * axis + (index,)
                if mask is None or mask[where].any():
                    weights[where] = unet_weight_map(objects[where], UNET_W0, UNET_SIGMA, in_plane,
                                                     class_weights=balance)
        maps.append(weights)
    return maps


def class_stats(items: list[_Item], task: str, n_classes: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Loss balance from the annotated voxels of ``items``.

    Returns
    -------
    class_weights, pos_weight
        Semantic tasks: the class weights (:func:`losses.class_weights_from_counts`) and
        None; other tasks: None and the positive weight of each output channel
        (:func:`losses.positive_weights`).
    """
    if task == "semantic":
        counts = np.zeros(n_classes)
        for item in items:
            values = item.target if item.mask is None else item.target[item.mask]
            counts += np.bincount(values.ravel(), minlength=len(counts))[:len(counts)]
        return class_weights_from_counts(counts), None
    channels = items[0].target.shape[0]
    pos = np.zeros(channels)
    total = 0
    for item in items:
        t = item.target.reshape(channels, -1)
        if item.mask is not None:
            t = t[:, item.mask.ravel()]
        pos += t.sum(axis=1)
        total += t.shape[1]
    return None, positive_weights(pos / max(total, 1))
