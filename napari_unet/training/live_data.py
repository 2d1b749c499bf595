"""Training data of a live session, rebuilt from each snapshot of the corrected planes.

The image is normalised once per session (:class:`LiveImage`); a snapshot only makes the
targets of its planes, so a rebuild costs what was corrected, not the stack (well under a
second for a 100 x 256 x 256 stack with a few corrected planes). The held-out planes (the
guard's judge) are chosen when a plane first appears and never trained on
(:func:`held_out_planes`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from napari_unet.labels.slices import Plane, plane, plane_key, plane_name, plane_region
from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.model.normalization import Normalizer, fit_normalizer
from napari_unet.training.data import class_stats
from napari_unet.training.sampling import _Item, auto_batch_size, auto_patch_shape, make_item
from napari_unet.training.targets import _is_binary, check_labels, training_targets
from napari_unet.training.validation import validation_views

#: the key of the one "plane" of a 2D image
WHOLE = None


class LiveImage:
    """The session's image, normalised once with the normaliser fitted on the whole of it.

    A 3D model trains on the whole normalised stack; a 2D model on planes, normalised when
    first used (and cached).
    """

    def __init__(self, image: np.ndarray, model: SegmentationModel):
        self.raw = image
        self.normalizer: Normalizer = fit_normalizer(image, model.normalization)
        self._whole: np.ndarray | None = None
        self._planes: dict[Plane | None, np.ndarray] = {}

    @property
    def whole(self) -> np.ndarray:
        if self._whole is None:
            self._whole = np.ascontiguousarray(self.normalizer(np.asarray(self.raw)), dtype=np.float32)
        return self._whole

    def plane(self, p: Plane | None) -> np.ndarray:
        """The normalised plane ``p`` (the whole image for a 2D image)."""
        if p is WHOLE:
            return self.whole
        if self._whole is not None:
            return self._whole[plane_region(p)]
        if p not in self._planes:
            self._planes[p] = np.ascontiguousarray(
                self.normalizer(np.asarray(self.raw[plane_region(p)])), dtype=np.float32)
        return self._planes[p]


def plane_shape(shape: Sequence[int], p: Plane | None) -> tuple[int, ...]:
    """The shape of plane ``p`` of an image of ``shape`` (a 2D image: its own)."""
    if p is WHOLE:
        return tuple(shape)
    axis = plane_key(p)[0]
    return tuple(int(n) for a, n in enumerate(shape) if a != axis)


def check_planes(planes: Mapping[Any, Any], shape: Sequence[int]) -> dict[Plane | None, np.ndarray]:
    """The submitted planes with normalised keys (a 2D image: one entry, key None or 0);
    ValueError for planes outside the image or of the wrong shape."""
    out: dict[Plane | None, np.ndarray] = {}
    for key, labels in planes.items():
        if len(shape) == 2:
            if key not in (None, 0):
                raise ValueError(f"a 2D image has one plane (key None), not {key!r}")
            p = WHOLE
        else:
            p = plane(key)
            axis, index = plane_key(p)
            if not 0 <= index < shape[axis]:
                raise ValueError(f"{plane_name(p)} is outside the stack ({shape[axis]} along {plane_name(p)[0]})")
        expected = plane_shape(shape, p)
        if np.shape(labels) != expected:
            raise ValueError(f"the labels of {'the image' if p is WHOLE else plane_name(p)} have shape "
                             f"{np.shape(labels)}, expected {expected}")
        out[p] = labels
    return out


def held_out_planes(order: Mapping[Plane | None, int], every: int) -> set[Plane | None]:
    """The planes the guard holds out: by order of first appearance (``order``: plane ->
    0, 1, 2, ...), every ``every``-th one (the 5th, 10th, ... for 5; 0 = none), as Fine-tune
    holds out a fifth. A plane is held out (or not) from its first appearance on, so weights
    are never judged on a plane they trained on, and the first ``every - 1`` corrections are
    all trained on."""
    if every < 2:
        return set()
    return {p for p, n in order.items() if p is not WHOLE and n % every == every - 1}


@dataclass
class LiveData:
    """One snapshot as training items and held-out items."""

    version: int
    items: list[_Item]
    probabilities: np.ndarray
    patch_shape: tuple[int, ...]
    batch_size: int
    pos_weight: list[float] | None
    class_weights: list[float] | None
    #: held-out items cut to what scoring reads (:func:`validation.validation_views`)
    val_views: list[_Item] = field(default_factory=list)
    held_out: list[Plane | None] = field(default_factory=list)
    #: objects in the held-out planes (0 without instance labels)
    held_out_objects: int = 0
    #: whether the labels hold instances (objects can be counted)
    instances: bool = False
    trained_planes: list[Plane | None] = field(default_factory=list)
    annotated_voxels: int = 0

    def summary(self) -> dict[str, Any]:
        """What the history entry says about the data."""
        def name(p: Plane | None) -> Any:
            return "image" if p is WHOLE else (p if isinstance(p, int) else list(p))

        return {"planes": [name(p) for p in self.trained_planes],
                "held_out": [name(p) for p in self.held_out],
                "annotated_voxels": int(self.annotated_voxels),
                "held_out_objects": int(self.held_out_objects)}


def _plane_annotation(labels: np.ndarray, sparse: bool, background: int | None
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """The labels to learn (the background label made 0) and the annotated voxels (None: all)."""
    labels = check_labels(labels)
    if not sparse:
        return labels, None
    painted = labels != 0
    if background is not None:
        labels = np.where(labels == background, 0, labels)
    return labels, painted


def build_data(model: SegmentationModel, image: LiveImage, planes: Mapping[Plane | None, np.ndarray],
               version: int, held_out: set[Plane | None], *, sparse: bool = False,
               background_label: int | None = None, seed: int = 0,
               device: torch.device | None = None) -> LiveData | None:
    """The training and held-out items of a snapshot; None when nothing is left to train on
    (no plane, or every painted voxel held out).

    Each plane's targets are made within the plane (as for a corrected slice). A 2D model
    gets one item per plane; a 3D model one item, the whole stack annotated on its planes.
    ``sparse``: only painted voxels (label != 0) count, ``background_label`` being the
    background.
    """
    task, dims = model.task, model.spatial_dims
    device = device or torch.device("cpu")
    annotated: dict[Plane | None, tuple[np.ndarray, np.ndarray | None]] = {}
    for p in sorted(planes, key=lambda q: (-1, -1) if q is WHOLE else plane_key(q)):
        labels, mask = _plane_annotation(planes[p], sparse, background_label)
        if mask is not None and not mask.any():
            continue  # nothing painted on it (yet)
        annotated[p] = (labels, mask)
    if not annotated:
        return None
    values = [lab if m is None else lab[m] for lab, m in annotated.values()]
    binary = all(_is_binary(v) for v in values if v.size)
    instances = task != "semantic" and not binary
    if task == "semantic":
        largest = max(int(v.max()) if v.size else 0 for v in values)
        if largest >= len(model.class_names):
            raise ValueError(f"label value {largest} but the model has only {len(model.class_names)} "
                             f"classes ({', '.join(model.class_names)})")
    targets = {p: training_targets(lab, task, m, binary=binary) for p, (lab, m) in annotated.items()}
    train_planes = [p for p in annotated if p not in held_out]
    val_planes = [p for p in annotated if p in held_out]
    if not train_planes:
        return None
    items: list[_Item] = []
    val_items: list[_Item] = []
    n_annotated = sum(int(lab.size if m is None else m.sum())
                      for p, (lab, m) in annotated.items() if p in train_planes)
    if dims == 2 or image.raw.ndim == 2:
        shapes = [plane_shape(image.raw.shape, p) for p in train_planes]
        patch = auto_patch_shape(model, shapes, device)
        for p in train_planes:
            items.append(make_item(image.plane(p), targets[p], annotated[p][1], patch, task, seed))
            items[-1].source = (0, p)
        for p in val_planes:
            labels, mask = annotated[p]
            valid = np.ones(labels.shape, bool) if mask is None else mask
            val_items.append(_Item(image=image.plane(p), target=targets[p], mask=None, valid=valid,
                                   labels=np.where(valid, labels, 0) if instances else None, source=(0, p)))
    else:
        shape = image.raw.shape
        patch = auto_patch_shape(model, [shape], device)
        lead = () if task == "semantic" else (next(iter(targets.values())).shape[0],)
        dtype = next(iter(targets.values())).dtype
        target = np.zeros((*lead, *shape), dtype)
        mask = np.zeros(shape, bool)
        def at(p: Plane) -> tuple:  # plane p of the targets (after their channel axis)
            return plane_region(p) if task == "semantic" else (slice(None), *plane_region(p))

        for p in train_planes:
            labels, m = annotated[p]
            where = plane_region(p)
            target[at(p)] = np.maximum(target[at(p)], targets[p])
            mask[where] |= True if m is None else m
        items.append(make_item(image.whole, target, mask, patch, task, seed))
        items[-1].source = (0, None)
        for p in val_planes:
            labels, m = annotated[p]
            where = plane_region(p)
            valid = np.zeros(shape, bool)
            valid[where] = True if m is None else m
            t = np.zeros((*lead, *shape), dtype)
            t[at(p)] = targets[p]
            ids = None
            if instances:
                ids = np.zeros(shape, labels.dtype)
                ids[where] = labels if m is None else np.where(m, labels, 0)
            val_items.append(_Item(image=image.whole, target=t, mask=None, valid=valid, labels=ids,
                                   source=(0, p)))
    weights = np.array([item.weight for item in items], dtype=float)
    class_weights, pos_weight = class_stats(items, task, len(model.class_names))
    views = validation_views(val_items, model.network.config) if val_items else []
    objects = 0
    for item in views:
        if item.labels is not None:
            objects += int(np.count_nonzero(np.unique(item.labels[item.valid])))
    return LiveData(version=version, items=items, probabilities=weights / weights.sum(), patch_shape=patch,
                    batch_size=auto_batch_size(model, patch, device), pos_weight=pos_weight,
                    class_weights=class_weights, val_views=views, held_out=val_planes,
                    held_out_objects=objects, instances=instances, trained_planes=train_planes,
                    annotated_voxels=n_annotated)


def model_with(parent: SegmentationModel, network: torch.nn.Module) -> SegmentationModel:
    """``parent``'s metadata around ``network`` (not copied: for prediction only)."""
    return SegmentationModel(network=network, **copy.deepcopy(parent.metadata()))
