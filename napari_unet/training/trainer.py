"""The training loop (:class:`Trainer`) and :func:`train`."""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import math
import threading
import time
from typing import TYPE_CHECKING, Any, Generator, Sequence

import numpy as np
import torch

from napari_unet.engine.devices import select_device
from napari_unet.engine.predict import predict_probabilities, probabilities_to_output
from napari_unet.model.checkpoint import TASKS, SegmentationModel, expected_channels
from napari_unet.model.config import UNetConfig
from napari_unet.model.normalization import Normalizer, fit_normalizer
from napari_unet.model.precision import (
    PrecisionPolicy,
    prepare_batch,
    resolve_precision,
)
from napari_unet.model.unet import UNet, init_weights
from napari_unet.training.augment import AugmentSettings, augment_patch
from napari_unet.training.losses import (
    LOSSES,
    UNET_SIGMA,
    UNET_W0,
    WEIGHTED_LOSSES,
    class_weights_from_counts,
    map_class_weights,
    masked_loss,
    positive_weights,
    unet_weight_map,
)

if TYPE_CHECKING:
    from napari_unet.labels.tuning import TuningResult
from napari_unet.training.config import (
    AUTO_VALIDATION_FRACTION,
    DEFAULT_TIME_LIMIT,
    EVALUATION_SHARE,
    LR_FINETUNE,
    LR_SCRATCH,
    TrainingConfig,
    TrainingPair,
    TrainingStats,
)
from napari_unet.training.sampling import (
    _Item,
    _pad_to,
    auto_batch_size,
    auto_patch_shape,
)
from napari_unet.training.targets import (
    _is_binary,
    annotation_mask,
    check_labels,
    training_targets,
    weight_map_objects,
)

_MAX_INDEX_SAMPLES = 200_000
#: objects of a held-out slice of a stack are made from the probabilities of this many slices
#: on each side of it (not the whole stack: cheaper, and nearly the same objects)
_OBJECT_Z_CONTEXT = 3


# --------------------------------------------------------------------------------------------
# models and targets
# --------------------------------------------------------------------------------------------

def new_model(spatial_dims: int, task: str, class_names: list[str] | None = None, *,
              base_channels: int = 16, depth: int = 4, norm: str = "batch",
              inplane_only_levels: Sequence[int] = (), name: str = "model",
              normalization: dict[str, Any] | None = None,
              voxel_size: Sequence[float] | None = None, description: str = "",
              architecture: str = "unet", init: str = "kaiming",
              deep_supervision: bool = False) -> SegmentationModel:
    """An untrained model (version 0) for ``task``; training it gives version 1.

    ``architecture`` is one of :data:`napari_unet.models.ARCHITECTURES`; ``init`` the weight
    initialisation (:func:`napari_unet.models.init_weights`); ``deep_supervision`` (unetpp)
    trains every nested head."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if class_names is None:
        class_names = ["background", "class_1"] if task == "semantic" else ["background", "foreground"]
    if task == "semantic" and len(class_names) < 2:
        raise ValueError("a semantic model needs at least two classes (background and one more)")
    config = UNetConfig(spatial_dims=spatial_dims, in_channels=1,
                        out_channels=expected_channels(task, len(class_names)),
                        base_channels=base_channels, depth=depth, norm=norm,
                        inplane_only_levels=tuple(inplane_only_levels),
                        architecture=architecture, deep_supervision=deep_supervision)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    network = init_weights(UNet(config), init)
    torch.random.set_rng_state(torch_state)
    return SegmentationModel(
        network=network, task=task, name=name, version=0, parent=None,
        class_names=list(class_names),
        normalization=dict(normalization or {"mode": "percentile", "low": 1.0, "high": 99.8}),
        voxel_size=None if voxel_size is None else [float(v) for v in voxel_size],
        description=description)


# --------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------

class Trainer:
    """Fine-tune (or train from scratch) a copy of ``model`` on ``pairs``.

    Input errors (shapes that differ, empty labels, nothing annotated, non-integer labels, a
    2D image for a 3D model, ...) raise ``ValueError`` here, before any training.

    :meth:`run` is the training generator; :meth:`request_stop` (thread-safe) ends it at the
    next iteration with a normal return of the best model; :meth:`best_model` gives the best
    model so far at any time, also after the generator was closed.
    """

    def __init__(self, model: SegmentationModel, pairs: Sequence[TrainingPair],
                 config: TrainingConfig | None = None):
        self.parent = model
        self.config = config or TrainingConfig()
        self._check_config()
        if self.config.gradient_checkpointing and not hasattr(model.network, "gradient_checkpointing"):
            raise ValueError(f"{type(model.network).__name__} does not support gradient checkpointing")
        self.task = model.task
        self.fine_tune = model.version > 0 or bool(model.history)
        self.device = select_device(self.config.device)
        #: precision and memory layout of training (``amp=False``: exact fp32)
        self.policy: PrecisionPolicy = resolve_precision(
            self.config.precision if self.config.amp else "fp32", self.device)
        #: seconds the last :meth:`run` spent per stage: ``sample`` (patches and augmentation),
        #: ``step`` (forward, loss, backward, optimizer), ``validation``, ``preview``,
        #: ``recalibration`` (batch-norm statistics) and ``total`` (the whole run)
        self.timings: dict[str, float] = {}
        #: optimizer steps skipped in the last :meth:`run` because a gradient was not finite
        self.skipped_steps = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._best_state: dict[str, torch.Tensor] | None = None
        self._best_score: float | None = None
        #: True when a part of the annotations is held out and the best-scoring weights are
        #: kept; False: the last weights are kept. :attr:`validation_message` says which and why.
        self.keeps_best = False
        self.validation_message = ""
        #: (iteration, validation score) of every validation of the weights being trained
        self.validation_scores: list[tuple[int, float]] = []
        #: validation score of the model before fine-tuning. Not a candidate for the result:
        #: one held-out slice is a noisy judge, and on it the starting model often ties with
        #: weights that are much better elsewhere (bench_finetune); the dock can show both,
        #: and Revert goes back to the model
        self.start_score: float | None = None
        self.best_iteration: int | None = None
        self._last_f1: float | None = None
        self._state = {"iteration": 0, "seconds": 0.0, "loss": float("nan")}
        self._result: SegmentationModel | None = None
        self._summary: dict[str, Any] = {}
        self._items, self._val_items = self._prepare(pairs)
        weights = np.array([item.weight for item in self._items], dtype=float)
        self._item_probabilities = weights / weights.sum()
        self._val_views: list[_Item] | None = None
        self.network: UNet | None = None

    # -- configuration ------------------------------------------------------------------

    def _check_config(self) -> None:
        c = self.config
        if c.iterations is not None and c.iterations < 1:
            raise ValueError("iterations must be at least 1")
        if c.time_limit is not None and c.time_limit <= 0:
            raise ValueError("time limit must be positive")
        if c.validation_fraction is not None and not 0 <= c.validation_fraction < 1:
            raise ValueError("validation fraction must be in [0, 1)")
        if c.learning_rate is not None and c.learning_rate <= 0:
            raise ValueError("learning rate must be positive")
        if c.batch_size is not None and c.batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if c.validation_gap < 0:
            raise ValueError("validation gap must not be negative")
        if c.loss not in LOSSES:
            raise ValueError(f"unknown loss {c.loss!r}; expected one of {', '.join(LOSSES)}")
        if int(c.accumulate_steps) != c.accumulate_steps or c.accumulate_steps < 1:
            raise ValueError("accumulate_steps must be a whole number of at least 1")

    @property
    def start_message(self) -> str:
        """The first stats' message: :attr:`validation_message` and the precision, e.g.
        ``...; training in bf16 (auto: native bf16 CPU), channels-last``."""
        layout = self.policy.memory_format(self.parent.spatial_dims)
        layout_text = "" if layout == torch.contiguous_format else ", channels-last"
        text = f"training in {self.policy.label()}{layout_text}"
        return f"{self.validation_message}; {text}" if self.validation_message else text

    @property
    def time_limit(self) -> float | None:
        c = self.config
        if c.time_limit is None and c.iterations is None:
            return DEFAULT_TIME_LIMIT
        return c.time_limit

    @property
    def learning_rate(self) -> float:
        if self.config.learning_rate is not None:
            return float(self.config.learning_rate)
        return LR_FINETUNE if self.fine_tune else LR_SCRATCH

    # -- data ---------------------------------------------------------------------------

    def _prepare(self, pairs: Sequence[TrainingPair]) -> tuple[list[_Item], list[_Item]]:
        model, dims = self.parent, self.parent.spatial_dims
        if len(pairs) == 0:
            raise ValueError("no training data: give at least one image with labels")
        raw: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple[int, int | None],
                        np.ndarray | None]] = []
        map_objects: list[tuple[np.ndarray, np.ndarray | None, bool]] = []  # boundary_bce
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
            objects = labels if self.task != "semantic" and not _is_binary(annotated_labels) else None
            any_labels = any_labels or bool(np.any(annotated_labels))
            if self.task == "semantic" and int(labels.max()) >= len(model.class_names):
                raise ValueError(f"{what}: label value {int(labels.max())} but the model has only "
                                 f"{len(model.class_names)} classes ({', '.join(model.class_names)})")
            normalizer = fit_normalizer(image, model.normalization)
            norm_image = normalizer(image)
            # targets from the annotated voxels only, and slice by slice for a 2D model on a
            # stack and for corrected slices (each slice is corrected on its own: ids need not
            # agree between two corrected neighbours)
            per_slice = (1, 2) if image.ndim == 3 and (dims == 2 or pair.slices is not None) else None
            target = training_targets(labels, self.task, mask, axes=per_slice)
            if self.config.loss in WEIGHTED_LOSSES:
                map_objects.append((weight_map_objects(labels, target, self.task, mask, per_slice is not None),
                                    mask, per_slice is not None))
            count = int(labels.size if mask is None else mask.sum())
            n_annotated += count
            info: dict[str, Any] = {"shape": list(image.shape), "annotated_voxels": count}
            if pair.slices is not None:
                info["slices"] = sorted({int(s) for s in pair.slices})
            if self.task != "semantic" and not _is_binary(labels):
                info["objects"] = int(len(np.unique(annotated_labels)) - (0 in annotated_labels))
            summary_pairs.append(info)
            if dims == 2 and image.ndim == 3:  # a 2D model learns from the annotated slices of a stack
                for z in range(image.shape[0]):
                    if mask is None or mask[z].any():
                        m = None if mask is None or mask[z].all() else mask[z]
                        t = target[z] if self.task == "semantic" else target[:, z]
                        raw.append((norm_image[z], t, m, (index, z), objects[z] if objects is not None else None))
            else:
                m = None if mask is None or mask.all() else mask
                raw.append((norm_image, target, m, (index, None), objects))
        if not any_labels:
            raise ValueError("the labels are empty: no object in the annotated region of any image"
                             if len(pairs) > 1 else "the labels are empty (no object in the annotated region)")
        self._summary = {"pairs": len(pairs), "annotated_voxels": n_annotated, "images": summary_pairs}
        weight_maps = self._weight_maps(map_objects) if map_objects else None

        device = self.device
        shapes = [r[0].shape for r in raw]
        patch = tuple(self.config.patch_shape) if self.config.patch_shape else auto_patch_shape(model, shapes, device)
        if len(patch) != dims:
            raise ValueError(f"patch shape {patch} does not match the {dims}D model")
        self.patch_shape = patch
        self.batch_size = self.config.batch_size or auto_batch_size(model, patch, device)

        items = []
        for img, t, m, source, objects in raw:
            wmap = None
            if weight_maps is not None:
                wmap = weight_maps[source[0]] if source[1] is None else weight_maps[source[0]][source[1]]
            items.append(self._make_item(img, t, m, patch, wmap))
            items[-1].source = source
            if objects is not None:
                items[-1].labels = _pad_to(objects, patch, "constant")
        val_items = self._split_validation(items)
        for item in val_items:  # only validation scores objects: a copy of its held-out ids
            if item.labels is not None:
                item.labels = np.where(item.valid, item.labels, 0)
        for item in items:
            if item.valid is None:
                item.labels = None
        self._class_stats(items)
        return items, val_items

    def _weight_maps(self, map_objects: list[tuple[np.ndarray, np.ndarray | None, bool]]) -> list[np.ndarray]:
        """U-Net weight maps (:func:`losses.unet_weight_map`) of each pair's objects (see
        :func:`weight_map_objects`), slice by slice where the targets are, with one class
        balance over the annotated voxels of all pairs and ``sigma`` in in-plane pixels."""
        n_objects = n_total = 0
        for objects, mask, _ in map_objects:
            inside = objects > 0 if mask is None else (objects > 0)[mask]
            n_objects += int(np.count_nonzero(inside))
            n_total += inside.size
        balance = map_class_weights(n_objects / max(n_total, 1))
        voxel_size = self.parent.voxel_size

        def sampling(ndim: int) -> np.ndarray | None:
            if not voxel_size or len(voxel_size) < ndim:
                return None
            spacing = np.asarray(voxel_size[-ndim:], dtype=float)
            return spacing / spacing[-2:].min()

        maps = []
        for objects, mask, per_slice in map_objects:
            if per_slice:
                weights = np.ones(objects.shape, np.float32)
                for z in range(objects.shape[0]):
                    if mask is None or mask[z].any():
                        weights[z] = unet_weight_map(objects[z], UNET_W0, UNET_SIGMA, sampling(2),
                                                     class_weights=balance)
            else:
                weights = unet_weight_map(objects, UNET_W0, UNET_SIGMA, sampling(objects.ndim),
                                          class_weights=balance)
            maps.append(weights)
        return maps

    def _make_item(self, image: np.ndarray, target: np.ndarray, mask: np.ndarray | None,
                   patch: Sequence[int], weight_map: np.ndarray | None = None) -> _Item:
        semantic = self.task == "semantic"
        lead = 0 if semantic else 1
        padded = any(s < p for s, p in zip(image.shape, patch))
        if padded and mask is None:
            mask = np.ones(image.shape, dtype=bool)
        image = _pad_to(image, patch, "reflect")
        target = _pad_to(target, patch, "constant", lead)
        if mask is not None:
            mask = _pad_to(mask, patch, "constant")
        item = _Item(image=np.ascontiguousarray(image, dtype=np.float32), target=target, mask=mask)
        if weight_map is not None:
            item.weight_map = np.ascontiguousarray(_pad_to(weight_map, patch, "constant"), dtype=np.float32)
        self._index(item)
        return item

    def _index(self, item: _Item) -> None:
        rng = np.random.default_rng(self.config.seed + 7)
        fg = item.target > 0 if self.task == "semantic" else item.target[0] > 0
        if item.mask is not None:
            fg = fg & item.mask
            idx = np.flatnonzero(item.mask)
            if idx.size > _MAX_INDEX_SAMPLES:
                idx = rng.choice(idx, _MAX_INDEX_SAMPLES, replace=False)
            item.annotated_index = idx
            item.weight = float(item.mask.sum())
        else:
            item.annotated_index = None
            item.weight = float(item.image.size)
        fidx = np.flatnonzero(fg)
        if fidx.size > _MAX_INDEX_SAMPLES:
            fidx = rng.choice(fidx, _MAX_INDEX_SAMPLES, replace=False)
        item.foreground_index = fidx

    def _validation_parts(self, items: list[_Item]) -> list[list[tuple[int, int | None]]]:
        """What can be held out: each 2D image, and each run of annotated slices of a stack in
        which consecutive slices are at most ``validation_gap`` apart (so a held-out run has
        no annotated slice within that distance). A part lists ``(item index, z)``; ``z`` is
        None for a whole 2D item (an image, or a slice of a stack for a 2D model)."""
        gap = max(0, int(self.config.validation_gap))
        parts: list[list[tuple[int, int | None]]] = []
        stacks: dict[int, list[tuple[int, int, int | None]]] = {}
        for i, item in enumerate(items):
            pair, z = item.source
            if item.image.ndim == 3:  # a stack for a 3D model
                annotated = item.mask.any(axis=(1, 2)) if item.mask is not None else \
                    np.ones(item.image.shape[0], bool)
                stacks.setdefault(pair, []).extend((int(k), i, int(k)) for k in np.flatnonzero(annotated))
            elif z is not None:  # one slice of a stack, for a 2D model
                stacks.setdefault(pair, []).append((int(z), i, None))
            else:
                parts.append([(i, None)])
        for pair in sorted(stacks):
            entries = sorted(stacks[pair])
            run = [entries[0]]
            for entry in entries[1:]:
                if entry[0] - run[-1][0] > gap:
                    parts.append([(i, k) for _, i, k in run])
                    run = []
                run.append(entry)
            parts.append([(i, k) for _, i, k in run])
        return parts

    def _describe(self, items: list[_Item], part: list[tuple[int, int | None]]) -> str:
        """A part in words: ``slices 15-17 of image 1``, ``image 2``."""
        pair = items[part[0][0]].source[0] + 1
        zs = [items[i].source[1] if k is None else k for i, k in part]
        if zs[0] is None:
            return f"image {pair}"
        zs = sorted(int(z) for z in zs)
        where = f"slice {zs[0]}" if len(zs) == 1 else (
            f"slices {zs[0]}-{zs[-1]}" if zs[-1] - zs[0] == len(zs) - 1 else f"slices {', '.join(map(str, zs))}")
        return f"{where} of image {pair}"

    def _hold_out(self, items: list[_Item], part: list[tuple[int, int | None]]) -> None:
        """Move ``part`` from training to validation (``item.valid``)."""
        for i, z in part:
            item = items[i]
            full = np.ones(item.image.shape, bool) if item.mask is None else item.mask.copy()
            if item.valid is None:
                item.valid = np.zeros_like(full)
            if z is None:
                item.valid |= full
                item.mask = np.zeros_like(full)
            else:
                item.valid[z] = full[z]
                full[z] = False
                item.mask = full

    def _split_validation(self, items: list[_Item]) -> list[_Item]:
        """Hold a part of the annotations out of training, for validation; sets
        :attr:`keeps_best` and :attr:`validation_message`.

        ``validation_fraction`` None (automatic): with two or more parts (annotated 2D images,
        or runs of annotated slices, see :meth:`_validation_parts`) a fifth of them (at least
        one) is held out; a single run of at least ``validation_gap + 2`` slices gives its
        last slices, with ``validation_gap`` slices between them and the training slices.
        An explicit fraction does the same, and else holds out a strip along the last axis
        (one 2D image). 0 never holds anything out.
        """
        fraction = self.config.validation_fraction
        auto = fraction is None
        frac = AUTO_VALIDATION_FRACTION if auto else float(fraction)
        gap = max(0, int(self.config.validation_gap))
        self.keeps_best = False
        if frac <= 0:
            self.validation_message = "validation is off: keeping the last weights"
            return []
        rng = np.random.default_rng(self.config.seed + 11)
        parts = self._validation_parts(items)
        described = ""
        changed: set[int] = set()  # items whose training mask changed, besides validation items
        if len(parts) >= 2:
            n_val = min(len(parts) - 1, max(1, round(frac * len(parts))))
            chosen = sorted(int(k) for k in rng.choice(len(parts), n_val, replace=False))
            for k in chosen:
                self._hold_out(items, parts[k])
            described = ", ".join(self._describe(items, parts[k]) for k in chosen)
        elif len(parts) == 1 and len(parts[0]) >= gap + 2:
            run = parts[0]  # one run of slices: its last ones, a gap, then the training slices
            n_val = min(len(run) - gap - 1, max(1, round(frac * len(run))))
            held, dropped = run[len(run) - n_val:], run[len(run) - n_val - gap:len(run) - n_val]
            self._hold_out(items, held)
            for i, z in dropped:
                item = items[i]
                changed.add(i)
                if z is None:
                    item.mask = np.zeros(item.image.shape, bool)
                else:
                    if item.mask is None:
                        item.mask = np.ones(item.image.shape, bool)
                    item.mask[z] = False
            described = self._describe(items, held)
            if dropped:
                described += f" ({self._describe(items, dropped)} not trained on)"
        elif not auto and len(items) == 1 and items[0].source[1] is None:  # one 2D image: a strip
            item = items[0]
            full = np.ones(item.image.shape, bool) if item.mask is None else item.mask.copy()
            columns = np.flatnonzero(full.any(axis=tuple(range(full.ndim - 1))))
            cut = columns[int(len(columns) * (1 - frac))]
            valid = full.copy()
            valid[..., :cut] = False
            full[..., cut:] = False
            if full.any() and valid.any():
                item.mask, item.valid = full, valid
                described = f"the strip x >= {cut} of image {item.source[0] + 1}"
        if not described:
            if len(parts[0]) > 1:
                what = f"only neighbouring annotated slices ({self._describe(items, parts[0])})"
            else:
                what = f"one annotated {'image' if items[0].source[1] is None and items[0].image.ndim == 2 else 'slice'}"
            self.validation_message = (f"{what}: nothing held out for validation, keeping the last weights "
                                       "(correct two or more slices or images, apart, to keep the best)")
            return []
        val_items: list[_Item] = []
        kept: list[_Item] = []
        for i, item in enumerate(items):
            if item.valid is not None:
                val_items.append(item)
            if item.mask is None or item.mask.any():
                if item.valid is not None or i in changed:
                    self._index(item)
                kept.append(item)
        items[:] = kept
        self.keeps_best = True
        self.validation_message = f"held out for validation: {described}; keeping the best-scoring weights"
        return val_items

    def _class_stats(self, items: list[_Item]) -> None:
        if self.task == "semantic":
            counts = np.zeros(len(self.parent.class_names))
            for item in items:
                values = item.target if item.mask is None else item.target[item.mask]
                counts += np.bincount(values.ravel(), minlength=len(counts))[:len(counts)]
            self.class_weights = class_weights_from_counts(counts)
            self.pos_weight = None
        else:
            channels = items[0].target.shape[0]
            pos = np.zeros(channels)
            total = 0
            for item in items:
                t = item.target.reshape(channels, -1)
                if item.mask is not None:
                    t = t[:, item.mask.ravel()]
                pos += t.sum(axis=1)
                total += t.shape[1]
            self.pos_weight = positive_weights(pos / max(total, 1))
            self.class_weights = None

    def _sample_batch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A batch of training patches: images ``(B, 1, *patch)`` float32, targets ``(B, C,
        *patch)`` (semantic: ``(B, *patch)``) and annotation masks ``(B, *patch)`` bool
        (:meth:`_sample_patches` without the weight maps)."""
        return self._sample_patches(rng)[:3]

    def _sample_patches(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                 np.ndarray | None]:
        """A batch of training patches: images ``(B, 1, *patch)`` float32, targets ``(B, C,
        *patch)`` (semantic: ``(B, *patch)``), annotation masks ``(B, *patch)`` bool, and the
        loss weight maps ``(B, *patch)`` float32 when the items have them (else None).

        Items are drawn in proportion to their annotated voxels, patch centres from the indices
        precomputed by :meth:`_index` (an annotated foreground voxel with probability
        ``foreground_oversampling``). Only each patch, with the margin of its elastic
        deformation, is read and augmented (:func:`augment.augment_patch`), straight into the
        batch arrays: nothing of the images' size is allocated. A weight map moves with the
        targets (nearest neighbour).
        """
        items = self._items
        patch = tuple(self.patch_shape)
        count = self.batch_size
        lead = items[0].target.shape[:items[0].target.ndim - len(patch)]
        images = np.empty((count, 1, *patch), dtype=np.float32)
        targets = np.empty((count, *lead, *patch), dtype=items[0].target.dtype)
        masks = np.empty((count, *patch), dtype=bool)
        weighted = items[0].weight_map is not None
        maps = np.empty((count, *patch), dtype=np.float32) if weighted else None
        probabilities = self._item_probabilities
        settings = self.config.augment_settings or AugmentSettings()
        anisotropic = self._anisotropic()
        for b in range(count):
            item = items[int(rng.choice(len(items), p=probabilities))]
            start = self._patch_start(item, rng)
            if self.config.augment:
                others = [item.target] if item.mask is None else [item.target, item.mask]
                if weighted:
                    others.append(item.weight_map)
                image, moved = augment_patch(item.image, others, start, patch, rng,
                                             spatial_dims=len(patch), anisotropic=anisotropic,
                                             settings=settings)
                images[b, 0], targets[b] = image, moved[0]
                masks[b] = True if item.mask is None else moved[1]
                if weighted:
                    maps[b] = moved[-1]
            else:
                region = tuple(slice(a, a + p) for a, p in zip(start, patch))
                images[b, 0], targets[b] = item.image[region], item.target[(Ellipsis, *region)]
                masks[b] = True if item.mask is None else item.mask[region]
                if weighted:
                    maps[b] = item.weight_map[region]
        return images, targets, masks, maps

    def _patch_start(self, item: _Item, rng: np.random.Generator) -> tuple[int, ...]:
        """Corner of a patch around a drawn centre voxel (jittered by up to a quarter patch)."""
        shape = item.image.shape
        use_fg = item.foreground_index.size and rng.random() < self.config.foreground_oversampling
        if use_fg:
            centre = np.unravel_index(int(item.foreground_index[rng.integers(item.foreground_index.size)]), shape)
        elif item.annotated_index is not None:
            centre = np.unravel_index(int(item.annotated_index[rng.integers(item.annotated_index.size)]), shape)
        else:
            centre = tuple(int(rng.integers(s)) for s in shape)
        start = []
        for c, s, p in zip(centre, shape, self.patch_shape):
            lo = int(c) - p // 2 + int(rng.integers(-(p // 4), p // 4 + 1))
            start.append(int(np.clip(lo, 0, s - p)))
        return tuple(start)

    def _anisotropic(self) -> bool:
        model = self.parent
        if model.spatial_dims != 3:
            return False
        if model.config.inplane_only_levels:
            return True
        vs = model.voxel_size
        return bool(vs and len(vs) == 3 and vs[0] > 1.5 * min(vs[1:]))

    # -- state --------------------------------------------------------------------------

    def request_stop(self) -> None:
        """End training at the next iteration; :meth:`run` then returns the best model."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def best_model(self) -> SegmentationModel | None:
        """The best model so far (by validation score when a part is held out, see
        :attr:`keeps_best`, else the latest weights); None before the first iteration."""
        with self._lock:
            if self._result is not None:
                return self._result.copy()
            if self._best_state is None and self.network is None:
                return None
            state = self._best_state if self._best_state is not None else _clone_state(self.network)
            if self._state["iteration"] == 0:
                return None
            return self._build_result(state, final=False)

    def _build_result(self, state: dict[str, torch.Tensor], final: bool) -> SegmentationModel:
        parent = self.parent
        network = UNet(parent.network.config)
        network.load_state_dict(state)
        network.eval()
        meta = copy.deepcopy(parent.metadata())
        meta["version"] = parent.version + 1
        meta["parent"] = parent.label if self.fine_tune else None
        entry = {
            "kind": "fine-tune" if self.fine_tune else "train",
            "iterations": int(self._state["iteration"]),
            "seconds": round(float(self._state["seconds"]), 1),
            "final_loss": _finite(self._state["loss"]),
            "best_score": _finite(self._best_score),
            "start_score": _finite(self.start_score),
            "kept": "best" if self.keeps_best else "last",
            "best_iteration": self.best_iteration,
            "validation": self.validation_message,
            "learning_rate": self.learning_rate,
            "batch_size": int(self.batch_size),
            "loss": self.config.loss,
            "accumulate_steps": int(self.config.accumulate_steps),
            "gradient_checkpointing": bool(self.config.gradient_checkpointing),
            "patch_shape": [int(p) for p in self.patch_shape],
            "augment": bool(self.config.augment),
            "device": self.device.type,
            "data": copy.deepcopy(self._summary),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "complete": bool(final),
        }
        meta["history"] = list(meta.get("history", [])) + [entry]
        return SegmentationModel(network=network, **meta)

    # -- the loop -----------------------------------------------------------------------

    def _freeze_norm(self) -> bool:
        if self.config.freeze_norm is not None:
            return bool(self.config.freeze_norm)
        return self.fine_tune

    def _set_train_mode(self, network: UNet) -> None:
        network.train()
        if self._freeze_norm():
            for module in network.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    @torch.no_grad()
    def _recalibrate_norm(self, network: UNet, rng: np.random.Generator, batches: int = 8) -> None:
        """Re-estimate batch-norm statistics on training patches (cumulative average), so that
        frozen statistics match the new data."""
        norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for _ in range(batches):
            images, _, _ = self._sample_batch(rng)
            with self.policy.autocast():
                network(prepare_batch(torch.from_numpy(images).to(self.device), self.policy))
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
            m.eval()

    @property
    def effective_batch_size(self) -> int:
        """Patches per optimizer step: ``batch_size * accumulate_steps``."""
        return int(self.batch_size) * int(self.config.accumulate_steps)

    def _device_batch(self, patches: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`_sample_patches` arrays as tensors on the training device (images in the
        policy's memory layout)."""
        images, targets, masks, maps = patches
        device = self.device
        return (prepare_batch(torch.from_numpy(images).to(device), self.policy),
                torch.from_numpy(targets).to(device), torch.from_numpy(masks).to(device),
                None if maps is None else torch.from_numpy(maps).to(device))

    def _batch_loss(self, network: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, m: torch.Tensor,
                    w: torch.Tensor | None, pos_weight: torch.Tensor | None,
                    class_weights: torch.Tensor | None) -> torch.Tensor:
        """The configured loss of one batch; with deep supervision (``config.deep_supervision``)
        the mean over the network's full-resolution heads (``forward_heads``)."""
        def loss_of(logits: torch.Tensor) -> torch.Tensor:
            return masked_loss(logits.float(), t, m, self.task, pos_weight=pos_weight,
                               class_weights=class_weights, loss=self.config.loss, weight_map=w)

        if getattr(network.config, "deep_supervision", False):
            heads = network.forward_heads(x)
            return sum(loss_of(h) for h in heads) / len(heads)
        return loss_of(network(x))

    def _optimizer_step(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: "torch.amp.GradScaler | None", batches: Sequence[tuple],
                        pos_weight: torch.Tensor | None = None,
                        class_weights: torch.Tensor | None = None) -> float:
        """One optimizer step on the gradients of ``batches`` (micro-batches from
        :meth:`_device_batch`), accumulated: each loss divided by their number, so the step
        follows the mean of their losses. A step whose gradient is not finite is skipped
        (counted in :attr:`skipped_steps`; with a GradScaler, it skips such steps itself).
        Returns that mean loss."""
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for x, t, m, w in batches:
            with self.policy.autocast():
                loss = self._batch_loss(network, x, t, m, w, pos_weight, class_weights) / len(batches)
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            total += float(loss.detach())
        if scaler is not None:
            scaler.step(optimizer)  # skips steps with non-finite gradients itself
            scaler.update()
        else:
            # a rare non-finite gradient (seen with bf16) would poison every weight: such a
            # step is skipped, as GradScaler does for fp16
            grad_norm = torch.nn.utils.clip_grad_norm_(network.parameters(), float("inf"))
            if torch.isfinite(grad_norm):
                optimizer.step()
            else:
                self.skipped_steps += 1
        return total

    def run(self) -> Generator[TrainingStats, Any, SegmentationModel]:
        """Train; yields :class:`TrainingStats`, returns the new :class:`SegmentationModel`.

        ``gen.send("stop")`` or :meth:`request_stop` ends training early with a normal return;
        ``gen.close()`` ends it too, and :meth:`best_model` still has the result.
        """
        config = self.config
        device = self.device
        rng = np.random.default_rng(config.seed)
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        network = UNet(self.parent.network.config)
        network.load_state_dict(self.parent.network.state_dict())
        torch.random.set_rng_state(torch_state)
        policy = self.policy
        network.to(device, memory_format=policy.memory_format(network.spatial_dims))
        self.network = network
        if config.gradient_checkpointing:
            network.gradient_checkpointing = True
        optimizer = torch.optim.AdamW(network.parameters(), lr=self.learning_rate, weight_decay=1e-4)
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
        scaler = torch.amp.GradScaler(policy.device_type) if policy.needs_grad_scaler else None
        run_start = time.perf_counter()
        self.skipped_steps = 0
        timings = self.timings = dict.fromkeys(
            ("sample", "step", "validation", "preview", "recalibration", "total"), 0.0)
        pos_weight = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=device)
        class_weights = None if self.class_weights is None else torch.tensor(self.class_weights, device=device)
        time_limit, total = self.time_limit, config.iterations
        base_lr = self.learning_rate
        warmup = 10 if self.fine_tune else 20
        if self._val_items:  # the model's own score, for comparison (not a candidate: see start_score)
            mark = time.perf_counter()
            self.start_score = self._validate(network)
            timings["validation"] += time.perf_counter() - mark
        if self._freeze_norm() and config.recalibrate_norm:
            mark = time.perf_counter()
            self._recalibrate_norm(network, rng)
            timings["recalibration"] += time.perf_counter() - mark
        evaluations = bool(self._val_items) + (config.preview_image is not None)
        share = EVALUATION_SHARE / max(1, evaluations)
        val_cost = timings["validation"]
        preview_cost = 0.0

        def affordable(stage: str, cost: float, now: float) -> bool:
            """Whether ``stage`` (cost: its last duration) stays within its share of the run."""
            return timings[stage] + cost <= share * (now - run_start + cost)

        start = time.perf_counter()
        last_val = start
        last_preview = start
        iteration = 0
        ema = None
        finished = False
        try:
            while True:
                elapsed = time.perf_counter() - start
                if self._stop.is_set():
                    break
                if total is not None and iteration >= total:
                    break
                if time_limit is not None and elapsed >= time_limit and iteration > 0:
                    break
                fraction = max(iteration / total if total else 0.0,
                               elapsed / time_limit if time_limit else 0.0)
                lr = base_lr * min(1.0, (iteration + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction))))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                mark = time.perf_counter()
                batches = [self._device_batch(self._sample_patches(rng))
                           for _ in range(int(config.accumulate_steps))]
                self._set_train_mode(network)
                step_start = time.perf_counter()
                timings["sample"] += step_start - mark
                with self._lock:
                    value = self._optimizer_step(network, optimizer, scaler, batches, pos_weight, class_weights)
                    iteration += 1
                    ema = value if ema is None else 0.9 * ema + 0.1 * value
                    now = time.perf_counter()
                    timings["step"] += now - step_start
                    self._state.update(iteration=iteration, seconds=now - start, loss=ema)
                elapsed = now - start
                ending = ((total is not None and iteration >= total)
                          or (time_limit is not None and elapsed >= time_limit) or self._stop.is_set())
                val_dice = None
                if self._val_items and (ending or (now - last_val >= config.validation_interval
                                                   and affordable("validation", val_cost, now))):
                    val_dice = self._validate(network)
                    last_val = time.perf_counter()
                    val_cost = last_val - now
                    timings["validation"] += val_cost
                    self._keep_if_best(network, val_dice, iteration)
                preview = None
                if config.preview_image is not None and (ending or (now - last_preview >= config.preview_interval
                                                                    and affordable("preview", preview_cost, now))):
                    mark = time.perf_counter()
                    preview = self._preview(network)
                    last_preview = time.perf_counter()
                    preview_cost = last_preview - mark
                    timings["preview"] += preview_cost
                if iteration % max(1, config.log_every) == 0 or val_dice is not None or preview is not None or ending:
                    stats = TrainingStats(
                        iteration=iteration, total_iterations=total, loss=float(ema), learning_rate=lr,
                        elapsed=elapsed,
                        samples_per_second=iteration * self.effective_batch_size / max(elapsed, 1e-9),
                        time_limit=time_limit, validation_dice=val_dice, best_score=self._best_score,
                        preview=preview, keeps_best=self.keeps_best,
                        validation_f1=self._last_f1 if val_dice is not None else None,
                        start_score=self.start_score,
                        message=self.start_message if iteration == 1 else "")
                    command = yield stats
                    if command == "stop":
                        self._stop.set()
            finished = True
        finally:
            network.eval()
            if not finished:  # closed: keep the best weights obtainable
                with self._lock:
                    if self._best_state is None and iteration > 0:
                        self._best_state = _clone_state(network)
            timings["total"] = time.perf_counter() - run_start
        with self._lock:
            state = self._best_state if self._best_state is not None else _clone_state(network)
            if not _finite_state(state):  # diverged, nothing good kept: the model's own weights
                state = _clone_state(self.parent.network)
                self.validation_message += ("; training diverged (non-finite weights): "
                                            "the result keeps the model's own weights")
            self._state["seconds"] = time.perf_counter() - start
            self._result = self._build_result(state, final=True)
            return self._result.copy()

    # -- validation and preview ----------------------------------------------------------

    def _keep_if_best(self, network: UNet, score: float, iteration: int) -> None:
        """Record a validation score; keep the weights when they score best so far (ties: the
        later weights). Weights with non-finite values (a diverged run) are never kept."""
        self.validation_scores.append((int(iteration), float(score)))
        if not math.isfinite(score) or not _finite_state(network):
            return
        if self._best_score is None or score >= self._best_score:
            with self._lock:
                self._best_score = float(score)
                self._best_state = _clone_state(network)
                self.best_iteration = int(iteration)

    def _eval_model(self, network: UNet) -> SegmentationModel:
        meta = copy.deepcopy(self.parent.metadata())
        snapshot = UNet(network.config)
        snapshot.load_state_dict(_clone_state(network))
        return SegmentationModel(network=snapshot, **meta)

    def _validate(self, network: UNet) -> float:
        """Score of ``network`` on the held-out voxels: Dice (mean over the outputs for sigmoid
        tasks, over the classes present for semantic ones), averaged with the object F1 of
        the held-out slices when their labels are instances (see :meth:`_object_counts`);
        the F1 alone is kept in ``_last_f1``."""
        from napari_unet.progress import drain

        model = self._eval_model(network)
        scores = []
        counts = np.zeros(3, dtype=np.int64)  # true positives, predicted, true objects
        for item in self._validation_views():
            probs = drain(predict_probabilities(item.image, model, device=self.device,
                                                precision=self.policy.name,
                                                normalizer=Normalizer(0.0, 1.0), dtype=np.float32))
            valid = item.valid
            if self.task == "semantic":
                pred = np.argmax(probs, axis=0)[valid]
                truth = item.target[valid]
                per_class = []
                for c in range(1, probs.shape[0]):
                    p, g = pred == c, truth == c
                    if p.any() or g.any():
                        per_class.append(2 * np.count_nonzero(p & g) / (p.sum() + g.sum()))
                scores.append(float(np.mean(per_class)) if per_class else 1.0)
            else:  # every output (foreground and boundary): boundaries decide how objects split
                per_channel = []
                for c in range(probs.shape[0]):
                    p = probs[c][valid] > 0.5
                    g = item.target[c][valid] > 0
                    denom = p.sum() + g.sum()
                    per_channel.append(1.0 if denom == 0 else 2 * np.count_nonzero(p & g) / denom)
                scores.append(float(np.mean(per_channel)))
            if item.labels is not None:
                counts += self._object_counts(item, probs)
        score = float(np.mean(scores))
        self._last_f1 = None
        if counts[1] + counts[2] > 0:
            self._last_f1 = float(2 * counts[0] / (counts[1] + counts[2]))
            score = 0.5 * (score + self._last_f1)
        return score

    def _validation_views(self) -> list[_Item]:
        """The validation items cut to what scoring reads: the box around their held-out voxels
        (for a stack with instance labels, with the slices its objects are made from), widened
        by the network's halo and started on its pooling grid. Tiled inference is exact, so the
        probabilities there equal those of the whole item, at a fraction of the cost."""
        if self._val_views is not None:
            return self._val_views
        config = self.parent.network.config
        halo, divisor = config.halo(), config.divisor()
        views = []
        for item in self._val_items:
            shape = item.valid.shape
            axes = tuple(range(len(shape)))
            box = []
            for axis in axes:
                along = np.flatnonzero(item.valid.any(axis=tuple(a for a in axes if a != axis)))
                need_lo, need_hi = int(along[0]), int(along[-1]) + 1
                if axis == 0 and len(shape) == 3 and item.labels is not None:
                    need_lo, need_hi = need_lo - _OBJECT_Z_CONTEXT, need_hi + _OBJECT_Z_CONTEXT
                lo = max(0, (need_lo - halo[axis]) // divisor[axis] * divisor[axis])
                box.append(slice(lo, min(shape[axis], need_hi + halo[axis])))
            box = tuple(box)
            if all(b.start == 0 and b.stop == s for b, s in zip(box, shape)):
                views.append(item)
                continue
            views.append(dataclasses.replace(
                item, image=item.image[box], target=item.target[(Ellipsis, *box)], valid=item.valid[box],
                mask=None if item.mask is None else item.mask[box],
                labels=None if item.labels is None else item.labels[box],
                annotated_index=None, foreground_index=None, weight_map=None))
        self._val_views = views
        return views

    def _object_counts(self, item: _Item, probs: np.ndarray) -> np.ndarray:
        """Objects matched at IoU 0.5 on the held-out part of ``item``, slice by slice (a
        held-out slice of a stack: its objects made from a few slices around it, as from the
        whole stack, which is faster): true positives, predicted and true object counts."""
        from napari_unet.labels.metrics import match_instances

        counts = np.zeros(3, dtype=np.int64)
        if item.image.ndim == 2:
            views = [(probs, item.labels, item.valid)]
        else:
            views = []
            depth = item.image.shape[0]
            for z in np.flatnonzero(item.valid.any(axis=tuple(range(1, item.valid.ndim)))):
                lo, hi = max(0, z - _OBJECT_Z_CONTEXT), min(depth, z + _OBJECT_Z_CONTEXT + 1)
                views.append((probs[:, lo:hi], item.labels[z], item.valid[z], z - lo))
        for view in views:
            p, truth, valid = view[:3]
            instances = probabilities_to_output(p, self.task, "instances")
            if len(view) == 4:
                instances = instances[view[3]]
            m = match_instances(np.where(valid, instances, 0), np.where(valid, truth, 0))
            counts += (m.true_positives, m.n_pred, m.n_gt)
        return counts

    def _preview(self, network: UNet) -> np.ndarray | None:
        from napari_unet.progress import drain

        try:
            return drain(predict_probabilities(np.asarray(self.config.preview_image), self._eval_model(network),
                                               device=self.device, precision=self.policy.name,
                                               dtype=np.float32))
        except ValueError:
            return None


    def tune_postprocessing(self, model: SegmentationModel) -> "TuningResult | None":
        """Tune ``model``'s post-processing (threshold, seed threshold, minimum size) on the
        held-out part and store it in ``model.postprocess``; None (nothing changed) without a
        held-out part or for semantic models. See :mod:`napari_unet.tuning`."""
        from napari_unet.labels.tuning import tune_postprocessing
        from napari_unet.progress import drain

        views = self._validation_views() if self._val_items else []
        if not views or self.task == "semantic":
            return None
        instances = all(item.labels is not None for item in views)
        probs, truths, valid = [], [], []
        for item in views:
            p = drain(predict_probabilities(item.image, model, device=self.device,
                                            precision=self.policy.name,
                                            normalizer=Normalizer(0.0, 1.0), dtype=np.float32))
            # score the box of the held-out voxels only
            box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(item.valid))
            probs.append(p[(slice(None), *box)])
            truths.append((item.labels if instances else item.target[0])[box])
            valid.append(item.valid[box])
        result = tune_postprocessing(probs, truths, self.task, instances=instances, valid=valid)
        where = (f"the held-out part of the training data ({sum(int(v.sum()) for v in valid)} "
                 "voxels)")
        model.postprocess = result.to_postprocess(where)
        return result


def train(model: SegmentationModel, pairs: Sequence[TrainingPair],
          config: TrainingConfig | None = None) -> Generator[TrainingStats, Any, SegmentationModel]:
    """Train a copy of ``model`` on ``pairs``: yields :class:`TrainingStats`, returns the new
    model. Input errors raise ``ValueError`` at once (before the first ``next``).

    See :class:`Trainer` for stopping early and getting the best model after ``close()``.
    """
    return Trainer(model, pairs, config).run()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _clone_state(network: UNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}


def _finite_state(source: UNet | dict[str, torch.Tensor]) -> bool:
    """True when every floating-point weight and buffer is finite."""
    state = source.state_dict() if isinstance(source, torch.nn.Module) else source
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), 5)
