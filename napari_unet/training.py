"""Training and human-in-the-loop fine-tuning, as a generator that yields :class:`TrainingStats`.

Typical use::

    trainer = Trainer(load_model("nuclei-3d"), [TrainingPair(stack, labels, slices=[3, 17])],
                      TrainingConfig(time_limit=60))
    new_model = drain(trainer.run())          # or: trainer.request_stop() from another thread

The loss only sees annotated voxels (a mask, or a list of corrected slices), so a 3D model can
be fine-tuned from a handful of corrected slices: patches are sampled around annotated voxels
and the rest of each patch is masked out. The model passed in is never modified; the result
is a new :class:`SegmentationModel` (version + 1, parent recorded, one history entry more).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Generator, Sequence

import numpy as np
import torch

from .augment import AugmentSettings, augment
from .checkpoint import TASKS, SegmentationModel, expected_channels
from .inference import autocast_dtype, predict_probabilities, select_device
from .losses import class_weights_from_counts, masked_loss, positive_weights
from .models import UNet, UNetConfig
from .normalization import Normalizer, fit_normalizer

DEFAULT_TIME_LIMIT = 60.0
LR_SCRATCH = 1e-3
# bench_finetune (60 s): lr 1e-3 vs 3e-4 gave Dice gains +0.036 vs +0.029 (3D), +0.200 vs +0.190 (2D)
LR_FINETUNE = 6e-4
_MAX_INDEX_SAMPLES = 200_000


# --------------------------------------------------------------------------------------------
# public data classes
# --------------------------------------------------------------------------------------------

@dataclass
class TrainingPair:
    """One image with its (corrected) labels.

    ``labels`` holds instance ids or semantic classes 1..K (0 = background). Only annotated
    voxels are trained on: ``annotated`` (nonzero = annotated) or ``slices`` (indices along axis 0
    of a stack); both None = everything.
    """

    image: np.ndarray
    labels: np.ndarray
    annotated: np.ndarray | None = None
    slices: Sequence[int] | None = None


@dataclass
class TrainingConfig:
    """How to train; every ``None`` means an automatic, sensible choice."""

    iterations: int | None = None
    time_limit: float | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    patch_shape: tuple[int, ...] | None = None
    augment: bool = True
    validation_fraction: float = 0.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    preview_image: np.ndarray | None = None
    preview_interval: float = 5.0
    log_every: int = 1
    #: batch-norm running statistics: frozen (eval mode) or updated; None = frozen when
    #: fine-tuning a trained model (after re-estimating them on the new data, see
    #: ``recalibrate_norm``), updated when training from scratch
    freeze_norm: bool | None = None
    #: with frozen batch norm: first re-estimate its statistics on patches of the new data
    #: (forward passes only), which adapts the model to new intensities/contrast
    recalibrate_norm: bool = True
    #: seconds between validation runs (when a validation split exists)
    validation_interval: float = 10.0
    #: fraction of patches centred on an annotated foreground voxel
    foreground_oversampling: float = 0.5
    augment_settings: AugmentSettings | None = None


@dataclass
class TrainingStats:
    """Progress of a training run, yielded after an iteration."""

    iteration: int
    total_iterations: int | None
    loss: float
    learning_rate: float
    elapsed: float
    samples_per_second: float
    time_limit: float | None
    validation_dice: float | None = None
    best_score: float | None = None
    preview: np.ndarray | None = None
    message: str = ""

    @property
    def fraction(self) -> float:
        """Progress 0..1, from the iteration count or the time budget."""
        parts = []
        if self.total_iterations:
            parts.append(self.iteration / self.total_iterations)
        if self.time_limit:
            parts.append(self.elapsed / self.time_limit)
        return float(min(1.0, max(parts))) if parts else 0.0


# --------------------------------------------------------------------------------------------
# models and targets
# --------------------------------------------------------------------------------------------

def new_model(spatial_dims: int, task: str, class_names: list[str] | None = None, *,
              base_channels: int = 16, depth: int = 4, norm: str = "batch",
              inplane_only_levels: Sequence[int] = (), name: str = "model",
              normalization: dict[str, Any] | None = None,
              voxel_size: Sequence[float] | None = None, description: str = "") -> SegmentationModel:
    """An untrained model (version 0) for ``task``; training it gives version 1."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if class_names is None:
        class_names = ["background", "class_1"] if task == "semantic" else ["background", "foreground"]
    if task == "semantic" and len(class_names) < 2:
        raise ValueError("a semantic model needs at least two classes (background and one more)")
    config = UNetConfig(spatial_dims=spatial_dims, in_channels=1,
                        out_channels=expected_channels(task, len(class_names)),
                        base_channels=base_channels, depth=depth, norm=norm,
                        inplane_only_levels=tuple(inplane_only_levels))
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    network = UNet(config)
    torch.random.set_rng_state(torch_state)
    return SegmentationModel(
        network=network, task=task, name=name, version=0, parent=None,
        class_names=list(class_names),
        normalization=dict(normalization or {"mode": "percentile", "low": 1.0, "high": 99.8}),
        voxel_size=None if voxel_size is None else [float(v) for v in voxel_size],
        description=description)


def _is_binary(labels: np.ndarray) -> bool:
    return bool(labels.size) and int(labels.max()) <= 1 and int(labels.min()) >= 0


def training_targets(labels: np.ndarray, task: str) -> np.ndarray:
    """Per-voxel training targets for ``task`` from a label image.

    Returns
    -------
    numpy.ndarray
        Sigmoid tasks: ``uint8`` 0/1 of shape ``(C, *labels.shape)``:

        * ``foreground``: ``labels > 0``;
        * ``foreground_boundary``: ``labels > 0`` and the inner boundary of every object (so
          touching objects are separated by two boundary voxels);
        * ``membranes``: binary labels (only 0/1) are the membrane mask itself; instance labels
          give the boundaries between cells (``find_boundaries`` mode ``thick``).

        ``semantic``: the class ids, ``int64`` of shape ``labels.shape``.
    """
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    if task == "semantic":
        return labels.astype(np.int64)
    if task == "foreground":
        return (labels > 0)[None].astype(np.uint8)
    if task == "foreground_boundary":
        boundary = find_boundaries(labels, connectivity=1, mode="inner") & (labels > 0)
        return np.stack([labels > 0, boundary]).astype(np.uint8)
    if task == "membranes":
        if _is_binary(labels):
            return (labels > 0)[None].astype(np.uint8)
        return find_boundaries(labels, connectivity=1, mode="thick")[None].astype(np.uint8)
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


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
        if len(shape) < 3:
            raise ValueError(f"{what}: slices only apply to stacks (Z, Y, X), the labels are 2D")
        slices = sorted({int(s) for s in pair.slices})
        if not slices:
            raise ValueError(f"{what}: the list of annotated slices is empty")
        bad = [s for s in slices if not 0 <= s < shape[0]]
        if bad:
            raise ValueError(f"{what}: slices {bad} outside 0..{shape[0] - 1}")
        mask = np.zeros(shape, dtype=bool)
        mask[slices] = True
        return mask
    return None


@dataclass
class _Item:
    """One training image, normalised and padded to at least the patch shape."""

    image: np.ndarray          # float32 (*spatial)
    target: np.ndarray         # (C, *spatial) uint8 or (*spatial) int64
    mask: np.ndarray | None    # bool (*spatial) or None = all annotated
    valid: np.ndarray | None = None  # bool (*spatial): validation voxels
    annotated_index: np.ndarray | None = None
    foreground_index: np.ndarray | None = None
    weight: float = 1.0


def _pad_to(array: np.ndarray, shape: Sequence[int], mode: str, lead: int = 0) -> np.ndarray:
    pads = [(0, 0)] * lead + [(0, max(0, s - a)) for s, a in zip(shape, array.shape[lead:])]
    if not any(p[1] for p in pads):
        return array
    if mode == "constant":
        return np.pad(array, pads, mode="constant")
    return np.pad(array, pads, mode="reflect" if all(a > 1 for a in array.shape[lead:]) else "edge")


def _divisor_multiple(size: int, divisor: int) -> int:
    return max(divisor, size // divisor * divisor)


def auto_patch_shape(model: SegmentationModel, shapes: Sequence[Sequence[int]],
                     device: torch.device) -> tuple[int, ...]:
    """Training patch shape: as large as the data allows, capped for speed, multiples of the
    network's divisor."""
    divisor = model.config.divisor()
    gpu = device.type == "cuda"
    if model.spatial_dims == 2:
        cap = [256, 256] if gpu else [128, 128]
    else:
        aniso = bool(model.config.inplane_only_levels)
        cap = ([32, 128, 128] if aniso else [64, 96, 96]) if gpu else ([16, 64, 64] if aniso else [32, 48, 48])
    largest = [max(s[a] for s in shapes) for a in range(model.spatial_dims)]
    patch = []
    for size, c, d in zip(largest, cap, divisor):
        c = max(c, d)
        patch.append(_divisor_multiple(min(size, c), d) if size >= d else d)
    if model.spatial_dims == 3 or len(patch) == 2:  # square in-plane patches allow rotations
        side = min(patch[-1], patch[-2])
        patch[-1] = patch[-2] = side
    return tuple(patch)


def auto_batch_size(model: SegmentationModel, patch: Sequence[int], device: torch.device) -> int:
    voxels = math.prod(patch)
    budget = (2**20 if device.type == "cuda" else 2**16) * 16 / max(8, model.config.base_channels)
    return int(np.clip(budget // voxels, 2, 32))


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
        self.task = model.task
        self.fine_tune = model.version > 0 or bool(model.history)
        self.device = select_device(self.config.device)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._best_state: dict[str, torch.Tensor] | None = None
        self._best_score: float | None = None
        self._state = {"iteration": 0, "seconds": 0.0, "loss": float("nan")}
        self._result: SegmentationModel | None = None
        self._summary: dict[str, Any] = {}
        self._items, self._val_items = self._prepare(pairs)
        self.network: UNet | None = None

    # -- configuration ------------------------------------------------------------------

    def _check_config(self) -> None:
        c = self.config
        if c.iterations is not None and c.iterations < 1:
            raise ValueError("iterations must be at least 1")
        if c.time_limit is not None and c.time_limit <= 0:
            raise ValueError("time limit must be positive")
        if not 0 <= c.validation_fraction < 1:
            raise ValueError("validation fraction must be in [0, 1)")
        if c.learning_rate is not None and c.learning_rate <= 0:
            raise ValueError("learning rate must be positive")
        if c.batch_size is not None and c.batch_size < 1:
            raise ValueError("batch size must be at least 1")

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
        raw: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
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
            any_labels = any_labels or bool(np.any(annotated_labels))
            if self.task == "semantic" and int(labels.max()) >= len(model.class_names):
                raise ValueError(f"{what}: label value {int(labels.max())} but the model has only "
                                 f"{len(model.class_names)} classes ({', '.join(model.class_names)})")
            normalizer = fit_normalizer(image, model.normalization)
            norm_image = normalizer(image)
            target = training_targets(labels, self.task)
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
                        raw.append((norm_image[z], t, m))
            else:
                m = None if mask is None or mask.all() else mask
                raw.append((norm_image, target, m))
        if not any_labels:
            raise ValueError("the labels are empty: no object in the annotated region of any image"
                             if len(pairs) > 1 else "the labels are empty (no object in the annotated region)")
        self._summary = {"pairs": len(pairs), "annotated_voxels": n_annotated, "images": summary_pairs}

        device = self.device
        shapes = [r[0].shape for r in raw]
        patch = tuple(self.config.patch_shape) if self.config.patch_shape else auto_patch_shape(model, shapes, device)
        if len(patch) != dims:
            raise ValueError(f"patch shape {patch} does not match the {dims}D model")
        self.patch_shape = patch
        self.batch_size = self.config.batch_size or auto_batch_size(model, patch, device)

        items = [self._make_item(img, t, m, patch) for img, t, m in raw]
        val_items: list[_Item] = []
        if self.config.validation_fraction > 0:
            val_items = self._split_validation(items)
        self._class_stats(items)
        return items, val_items

    def _make_item(self, image: np.ndarray, target: np.ndarray, mask: np.ndarray | None,
                   patch: Sequence[int]) -> _Item:
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

    def _split_validation(self, items: list[_Item]) -> list[_Item]:
        """Move a fraction of the annotated slices (or images, or of a single image: a strip)
        out of training into validation."""
        rng = np.random.default_rng(self.config.seed + 11)
        units: list[tuple[int, int | None]] = []
        for i, item in enumerate(items):
            if item.image.ndim == 3:
                zs = range(item.image.shape[0]) if item.mask is None else np.flatnonzero(item.mask.any(axis=(1, 2)))
                units += [(i, int(z)) for z in zs]
            else:
                units.append((i, None))
        val_items: list[_Item] = []
        if len(units) >= 2:
            n_val = min(len(units) - 1, max(1, round(self.config.validation_fraction * len(units))))
            chosen = [units[k] for k in rng.choice(len(units), n_val, replace=False)]
            for i, z in chosen:
                item = items[i]
                full = np.ones(item.image.shape, bool) if item.mask is None else item.mask.copy()
                if z is None:
                    item.valid = full
                    item.mask = np.zeros_like(full)
                else:
                    valid = np.zeros_like(full)
                    valid[z] = full[z]
                    item.valid = valid if item.valid is None else item.valid | valid
                    train_mask = full.copy()
                    train_mask[z] = False
                    item.mask = train_mask
            kept = []
            for item in items:
                if item.valid is not None:
                    val_items.append(item)
                if item.mask is None or item.mask.any():
                    self._index(item)
                    kept.append(item)
            items[:] = kept
        else:  # one 2D image: hold out a strip along the last axis
            item = items[0]
            full = np.ones(item.image.shape, bool) if item.mask is None else item.mask.copy()
            columns = np.flatnonzero(full.any(axis=tuple(range(full.ndim - 1))))
            cut = columns[int(len(columns) * (1 - self.config.validation_fraction))]
            valid = full.copy()
            valid[..., :cut] = False
            full[..., cut:] = False
            if not full.any() or not valid.any():
                return []
            item.mask, item.valid = full, valid
            self._index(item)
            val_items.append(item)
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
        items = self._items
        weights = np.array([it.weight for it in items])
        images, targets, masks = [], [], []
        anisotropic = self._anisotropic()
        settings = self.config.augment_settings or AugmentSettings()
        dims = self.parent.spatial_dims
        for _ in range(self.batch_size):
            item = items[int(rng.choice(len(items), p=weights / weights.sum()))]
            shape = item.image.shape
            use_fg = item.foreground_index.size and rng.random() < self.config.foreground_oversampling
            if use_fg:
                centre = np.unravel_index(int(rng.choice(item.foreground_index)), shape)
            elif item.annotated_index is not None:
                centre = np.unravel_index(int(rng.choice(item.annotated_index)), shape)
            else:
                centre = tuple(int(rng.integers(s)) for s in shape)
            start = []
            for c, s, p in zip(centre, shape, self.patch_shape):
                lo = int(c) - p // 2 + int(rng.integers(-(p // 4), p // 4 + 1))
                start.append(int(np.clip(lo, 0, s - p)))
            region = tuple(slice(a, a + p) for a, p in zip(start, self.patch_shape))
            image = item.image[region]
            target = item.target[region] if self.task == "semantic" else item.target[(slice(None), *region)]
            mask = np.ones(self.patch_shape, bool) if item.mask is None else item.mask[region]
            if self.config.augment:
                image, (target, mask) = augment(image, [target, mask], rng, spatial_dims=dims,
                                                anisotropic=anisotropic, settings=settings)
            images.append(image)
            targets.append(target)
            masks.append(mask)
        return np.stack(images)[:, None], np.stack(targets), np.stack(masks)

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
        """The best model so far (by validation Dice, else the latest weights); None before
        the first iteration."""
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
            "learning_rate": self.learning_rate,
            "batch_size": int(self.batch_size),
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
            network(torch.from_numpy(images).to(self.device))
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
            m.eval()

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
        network.to(device)
        self.network = network
        optimizer = torch.optim.AdamW(network.parameters(), lr=self.learning_rate, weight_decay=1e-4)
        amp_dtype = autocast_dtype(device) if config.amp else None
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        pos_weight = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=device)
        class_weights = None if self.class_weights is None else torch.tensor(self.class_weights, device=device)
        time_limit, total = self.time_limit, config.iterations
        base_lr = self.learning_rate
        warmup = 10 if self.fine_tune else 20
        if self._freeze_norm() and config.recalibrate_norm:
            self._recalibrate_norm(network, rng)

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
                images, targets, masks = self._sample_batch(rng)
                x = torch.from_numpy(images).to(device)
                t = torch.from_numpy(targets).to(device)
                m = torch.from_numpy(masks).to(device)
                self._set_train_mode(network)
                context = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                           else contextlib.nullcontext())
                with self._lock:
                    optimizer.zero_grad(set_to_none=True)
                    with context:
                        logits = network(x)
                    loss = masked_loss(logits.float(), t, m, self.task, pos_weight=pos_weight,
                                       class_weights=class_weights)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        loss.backward()
                        optimizer.step()
                    iteration += 1
                    value = float(loss.detach())
                    ema = value if ema is None else 0.9 * ema + 0.1 * value
                    now = time.perf_counter()
                    self._state.update(iteration=iteration, seconds=now - start, loss=ema)
                elapsed = now - start
                ending = ((total is not None and iteration >= total)
                          or (time_limit is not None and elapsed >= time_limit) or self._stop.is_set())
                val_dice = None
                if self._val_items and (ending or now - last_val >= config.validation_interval):
                    val_dice = self._validate(network)
                    last_val = time.perf_counter()
                    if self._best_score is None or val_dice >= self._best_score:
                        with self._lock:
                            self._best_score = val_dice
                            self._best_state = _clone_state(network)
                preview = None
                if config.preview_image is not None and (now - last_preview >= config.preview_interval or ending):
                    preview = self._preview(network)
                    last_preview = time.perf_counter()
                if iteration % max(1, config.log_every) == 0 or val_dice is not None or preview is not None or ending:
                    stats = TrainingStats(
                        iteration=iteration, total_iterations=total, loss=float(ema), learning_rate=lr,
                        elapsed=elapsed, samples_per_second=iteration * self.batch_size / max(elapsed, 1e-9),
                        time_limit=time_limit, validation_dice=val_dice, best_score=self._best_score,
                        preview=preview)
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
        with self._lock:
            state = self._best_state if self._best_state is not None else _clone_state(network)
            self._state["seconds"] = time.perf_counter() - start
            self._result = self._build_result(state, final=True)
            return self._result.copy()

    # -- validation and preview ----------------------------------------------------------

    def _eval_model(self, network: UNet) -> SegmentationModel:
        meta = copy.deepcopy(self.parent.metadata())
        snapshot = UNet(network.config)
        snapshot.load_state_dict(_clone_state(network))
        return SegmentationModel(network=snapshot, **meta)

    def _validate(self, network: UNet) -> float:
        from .progress import drain

        model = self._eval_model(network)
        scores = []
        for item in self._val_items:
            probs = drain(predict_probabilities(item.image, model, device=self.device,
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
            else:
                p = probs[0][valid] > 0.5
                g = item.target[0][valid] > 0
                denom = p.sum() + g.sum()
                scores.append(1.0 if denom == 0 else 2 * np.count_nonzero(p & g) / denom)
        return float(np.mean(scores))

    def _preview(self, network: UNet) -> np.ndarray | None:
        from .progress import drain

        try:
            return drain(predict_probabilities(np.asarray(self.config.preview_image), self._eval_model(network),
                                               device=self.device, dtype=np.float32))
        except ValueError:
            return None


def train(model: SegmentationModel, pairs: Sequence[TrainingPair],
          config: TrainingConfig | None = None) -> Generator[TrainingStats, Any, SegmentationModel]:
    """Train a copy of ``model`` on ``pairs``: yields :class:`TrainingStats`, returns the new
    model. Input errors raise ``ValueError`` at once (before the first ``next``).

    See :class:`Trainer` for stopping early and getting the best model after ``close()``.
    """
    return Trainer(model, pairs, config).run()


def train_job(checkpoint: bytes, pairs: Sequence[TrainingPair], config: TrainingConfig | None = None,
              num_threads: int | None = None) -> Generator[TrainingStats, Any, bytes]:
    """:meth:`Trainer.run` for a model given as checkpoint bytes, returning checkpoint bytes.

    The body of :func:`train_in_subprocess` (it runs in the child process): models cross the
    process boundary as :func:`checkpoint.model_to_bytes` data, never as pickled objects.
    ``send("stop")`` ends training early with the best weights, as for :meth:`Trainer.run`.
    ``num_threads``: ``torch.set_num_threads`` here (the parent's setting; None = torch's default).
    """
    from .checkpoint import model_from_bytes, model_to_bytes

    if num_threads:
        torch.set_num_threads(int(num_threads))
    trainer = Trainer(model_from_bytes(checkpoint), pairs, config)
    model = yield from trainer.run()
    return model_to_bytes(model)


def train_in_subprocess(model: SegmentationModel, pairs: Sequence[TrainingPair],
                        config: TrainingConfig | None = None, *, nice: int = 0, grace: float = 30.0):
    """:func:`train` in a child process, so the caller's process (a GUI) never waits for the
    interpreter lock: yields :class:`TrainingStats`, returns the new model.

    Input errors (``ValueError``) are raised when iterating (the data is prepared in the child).
    ``job.request_stop()`` (thread-safe) ends training at the next iteration and the job
    returns the best model; ``job.close()`` stops the child (its best model, if it arrives
    within ``grace`` seconds, is in ``job.result``). See :mod:`napari_unet.subprocess_job`.
    The child uses as many torch threads as this process (``torch.get_num_threads()``);
    ``nice`` lowers its priority (POSIX) so that a busy GUI wins the CPU.
    The model is encoded here, so call this off the GUI thread for large models.
    """
    from .checkpoint import model_from_bytes, model_to_bytes
    from .subprocess_job import run_in_subprocess

    return run_in_subprocess(train_job, model_to_bytes(model), list(pairs), config,
                             torch.get_num_threads(), stop_command="stop",
                             decode=model_from_bytes, nice=nice, grace=grace)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _clone_state(network: UNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), 5)
