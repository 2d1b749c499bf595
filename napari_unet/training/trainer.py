"""The training loop: :class:`Trainer` and :func:`train`."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Generator, Sequence

import numpy as np
import torch

from napari_unet.engine.devices import select_device
from napari_unet.engine.predict import predict_probabilities
from napari_unet.engine.threads import ThreadTuner, flush_denormals
from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.model.precision import PrecisionPolicy, resolve_precision
from napari_unet.model.unet import UNet
from napari_unet.training.config import (
    DEFAULT_TIME_LIMIT,
    EVALUATION_SHARE,
    LR_FINETUNE,
    LR_FINETUNE_2D,
    LR_SCRATCH,
    MIN_TUNING_OBJECTS,
    TrainingConfig,
    TrainingPair,
    TrainingStats,
)
from napari_unet.training.data import prepare
from napari_unet.training.factory import new_model
from napari_unet.training.guard import decide_weights, tuning_allowed
from napari_unet.training.losses import LOSSES, distillation_loss, masked_loss
from napari_unet.training.optimisation import (DeviceBatch, device_batch, learning_rate_at, new_optimizer,
                                               optimizer_step, recalibrate_norm, set_train_mode)
from napari_unet.training.results import build_result, eval_model
from napari_unet.training.results import clone_state as _clone_state
from napari_unet.training.results import finite_state as _finite_state
from napari_unet.training.sampling import _Item, is_anisotropic, sample_patches
from napari_unet.training.teacher import Teacher, release_teacher, start_teacher
from napari_unet.training.validation import score, tune_on_held_out, validation_views

if TYPE_CHECKING:
    from napari_unet.labels.tuning import TuningResult

__all__ = ["Trainer", "new_model", "train"]


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
        #: ``recalibration`` (batch norm), ``teacher`` (its output predicted), ``total`` (all)
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
        #: set when a requested patch shape was clipped to the data (see ``data.clip_patch``)
        self.patch_message = ""
        #: (iteration, validation score) of every validation of the weights being trained
        self.validation_scores: list[tuple[int, float]] = []
        #: validation score of the model before fine-tuning: the start model is a candidate,
        #: kept unless the trained weights beat it by ``config.keep_margin``
        self.start_score: float | None = None
        #: which weights the result got (``start``, ``best`` or ``last``) and why, with numbers
        self.kept = "last"
        self.decision = ""
        #: what happened to the post-processing settings at the end, in words
        self.tuning_message = ""
        #: the thread count chosen by timing the steps (see :class:`ThreadTuner`), in words
        self.threads_message = ""
        self._teacher: Teacher | None = None
        self.best_iteration: int | None = None
        #: held-out object F1 of the last validation, of the start model and of the best weights
        self._last_f1 = self.start_f1 = self.best_f1 = None
        self._state = {"iteration": 0, "seconds": 0.0, "loss": float("nan")}
        self._result: SegmentationModel | None = None
        self._summary: dict[str, Any] = {}
        self._items, self._val_items = prepare(self, pairs)
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
        return "; ".join(m for m in (self.patch_message, self.validation_message, text) if m)

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
        if not self.fine_tune:
            return LR_SCRATCH
        return LR_FINETUNE_2D if self.parent.spatial_dims == 2 else LR_FINETUNE

    # -- patches ------------------------------------------------------------------------

    def _sample_batch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A batch of training patches: images ``(B, 1, *patch)`` float32, targets ``(B, C,
        *patch)`` (semantic: ``(B, *patch)``) and annotation masks ``(B, *patch)`` bool
        (:meth:`_sample_patches` without the weight maps)."""
        return self._sample_patches(rng)[:3]

    def _sample_patches(self, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """A batch of ``batch_size`` training patches with their loss weight maps and teacher
        probabilities (None without); items drawn in proportion to their annotated voxels, see
        :func:`sampling.sample_patches`."""
        config = self.config
        return sample_patches(self._items, self._item_probabilities, self.patch_shape, self.batch_size,
                              rng, augment=config.augment, settings=config.augment_settings,
                              foreground_oversampling=config.foreground_oversampling,
                              anisotropic=is_anisotropic(self.parent))

    # -- validation and preview ----------------------------------------------------------

    def _validation_views(self) -> list[_Item]:
        """The validation items cut to what scoring reads (cached; see
        :func:`validation.validation_views`)."""
        if self._val_views is None:
            self._val_views = validation_views(self._val_items, self.parent.network.config)
        return self._val_views

    def _validate(self, network: UNet) -> float:
        """Score of ``network`` on the held-out voxels (:func:`validation.score`); the object
        F1 alone is kept in ``_last_f1``."""
        value, self._last_f1 = score(self._validation_views(), eval_model(self.parent, network),
                                     self.task, self.device, self.policy.name)
        return value

    def _keep_if_best(self, network: UNet, value: float, iteration: int) -> None:
        """Record a validation score; keep the weights when they score best so far (ties: the
        later weights). Weights with non-finite values (a diverged run) are never kept."""
        self.validation_scores.append((int(iteration), float(value)))
        if not np.isfinite(value) or not _finite_state(network):
            return
        if self._best_score is None or value >= self._best_score:
            with self._lock:
                self._best_score, self.best_f1 = float(value), self._last_f1
                self._best_state = _clone_state(network)
                self.best_iteration = int(iteration)

    def _preview(self, network: UNet) -> np.ndarray | None:
        """Probabilities of ``network`` on ``config.preview_image``; None when it does not fit
        the model."""
        from napari_unet.progress import drain

        try:
            return drain(predict_probabilities(np.asarray(self.config.preview_image),
                                               eval_model(self.parent, network), device=self.device,
                                               precision=self.policy.name, dtype=np.float32))
        except ValueError:
            return None

    def tune_postprocessing(self, model: SegmentationModel) -> "TuningResult | None":
        """Tune ``model``'s post-processing (threshold, seed threshold, minimum size) on the
        held-out part and store it in ``model.postprocess``; None (nothing changed) without a
        held-out part or for semantic models. See :mod:`napari_unet.labels.tuning`."""
        views = self._validation_views() if self._val_items else []
        if not views or self.task == "semantic":
            return None
        return tune_on_held_out(views, model, self.task, self.device, self.policy.name)

    # -- state --------------------------------------------------------------------------

    def request_stop(self) -> None:
        """End training at the next iteration; :meth:`run` then returns the best model."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        """Whether :meth:`request_stop` was called (or ``"stop"`` sent)."""
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
            return build_result(self, state, final=False)

    # -- steps --------------------------------------------------------------------------

    def _freeze_norm(self) -> bool:
        if self.config.freeze_norm is not None:
            return bool(self.config.freeze_norm)
        return self.fine_tune

    def _set_train_mode(self, network: UNet) -> None:
        """Training mode, batch norms frozen when fine-tuning (see ``config.freeze_norm``)."""
        set_train_mode(network, self._freeze_norm())

    def _recalibrate_norm(self, network: UNet, rng: np.random.Generator, batches: int = 8) -> None:
        """Re-estimate batch-norm statistics on training patches (:func:`recalibrate_norm`)."""
        recalibrate_norm(network, lambda: self._sample_batch(rng)[0], self.policy, self.device, batches)

    @property
    def effective_batch_size(self) -> int:
        """Patches per optimizer step: ``batch_size * accumulate_steps``."""
        return int(self.batch_size) * int(self.config.accumulate_steps)

    def _device_batch(self, patches: tuple[np.ndarray, ...]) -> DeviceBatch:
        """:meth:`_sample_patches` arrays as tensors on the training device (images in the
        policy's memory layout)."""
        return device_batch(patches, self.policy, self.device)

    def _batch_loss(self, network: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, m: torch.Tensor,
                    w: torch.Tensor | None, pos_weight: torch.Tensor | None,
                    class_weights: torch.Tensor | None, teacher: torch.Tensor | None = None) -> torch.Tensor:
        """The configured loss of one batch; with deep supervision (``config.deep_supervision``)
        the mean over the network's full-resolution heads (``forward_heads``); plus the
        distillation toward the start model (``teacher``: its predicted probabilities of the
        batch, see :mod:`training.teacher`)."""
        def loss_of(logits: torch.Tensor) -> torch.Tensor:
            return masked_loss(logits.float(), t, m, self.task, pos_weight=pos_weight,
                               class_weights=class_weights, loss=self.config.loss, weight_map=w)

        deep = getattr(network.config, "deep_supervision", False)
        heads = network.forward_heads(x) if deep else [network(x)]
        loss = sum(loss_of(h) for h in heads) / len(heads)
        if self._teacher is not None:
            targets = self._teacher.targets(x, teacher)
            loss = loss + self.config.distillation * sum(
                distillation_loss(h.float(), g, m, self.task, probabilities=True)
                for h, g in zip(heads, targets)) / len(heads)
        return loss

    def _optimizer_step(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: "torch.amp.GradScaler | None", batches: Sequence[DeviceBatch],
                        pos_weight: torch.Tensor | None = None,
                        class_weights: torch.Tensor | None = None) -> float:
        """One optimizer step on the accumulated gradients of ``batches`` (micro-batches from
        :meth:`_device_batch`, see :func:`optimisation.optimizer_step`); a step with a
        non-finite gradient is skipped and counted in :attr:`skipped_steps`. Returns the mean
        loss."""
        def loss(x, t, m, w, teacher):
            return self._batch_loss(network, x, t, m, w, pos_weight, class_weights, teacher)

        value, skipped = optimizer_step(network, optimizer, scaler, batches, self.policy, loss)
        self.skipped_steps += int(skipped)
        return value

    # -- the loop -----------------------------------------------------------------------

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
        optimizer = new_optimizer(network, self.learning_rate)
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
        scaler = torch.amp.GradScaler(policy.device_type) if policy.needs_grad_scaler else None
        run_start = time.perf_counter()
        self.skipped_steps = 0
        timings = self.timings = dict.fromkeys(
            ("sample", "step", "validation", "preview", "recalibration", "teacher", "total"), 0.0)
        if self.fine_tune and config.distillation > 0:  # the start model's output, kept where unannotated
            self._teacher = start_teacher(self.parent.network, self._items, self.task, policy, device,
                                          budget=None if config.predict_teacher else 0)
            timings["teacher"] = time.perf_counter() - run_start
        pos_weight = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=device)
        class_weights = None if self.class_weights is None else torch.tensor(self.class_weights, device=device)
        time_limit, total = self.time_limit, config.iterations
        base_lr = self.learning_rate
        if self._val_items:  # the start model's score: it is a candidate (see start_score)
            mark = time.perf_counter()
            self.start_score, self.start_f1 = self._validate(network), self._last_f1
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
        # next to the try whose finally restores them (no error may leave them changed)
        tuner = ThreadTuner([config.threads] if config.threads else None, enabled=device.type == "cpu")
        flush = flush_denormals(device.type == "cpu")
        flush.__enter__()
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
                lr = learning_rate_at(base_lr, iteration, 20, fraction)  # 20-step warm-up
                for group in optimizer.param_groups:
                    group["lr"] = lr
                mark = time.perf_counter()
                batches = [self._device_batch(self._sample_patches(rng))
                           for _ in range(int(config.accumulate_steps))]
                self._set_train_mode(network)
                step_start = time.perf_counter()
                timings["sample"] += step_start - mark
                with self._lock:
                    tuner.before_step()
                    value = self._optimizer_step(network, optimizer, scaler, batches, pos_weight, class_weights)
                    tuner.after_step()
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
            tuner.close()
            flush.__exit__(None, None, None)
            self._teacher = None
            release_teacher(self._items)
            self.threads_message = tuner.summary() if tuner.enabled else ""
            if not finished:  # closed: keep the best weights obtainable
                with self._lock:
                    if self._best_state is None and iteration > 0:
                        self._best_state = _clone_state(network)
            timings["total"] = time.perf_counter() - run_start
        with self._lock:
            state = self._best_state if self._best_state is not None else _clone_state(network)
            self.kept, self.decision = decide_weights(self)
            if self.kept == "start":
                state = _clone_state(self.parent.network)
            if not _finite_state(state):  # diverged, nothing good kept: the model's own weights
                state = _clone_state(self.parent.network)
                self.kept = "start"
                self.decision = "the start model's weights (training diverged: non-finite weights)"
                self.validation_message += ("; training diverged (non-finite weights): "
                                            "the result keeps the model's own weights")
            self._state["seconds"] = time.perf_counter() - start
            result = build_result(self, state, final=True)
        self._finish_postprocessing(result)
        with self._lock:
            self._result = result
            return self._result.copy()

    def _finish_postprocessing(self, result: SegmentationModel) -> None:
        """Re-tune ``result``'s post-processing when the held-out part is large enough (see
        :func:`guard.tuning_allowed`), else keep the start model's values; says which in
        :attr:`tuning_message` and the history entry."""
        if self.task == "semantic":
            return
        if not self.config.tune_postprocessing:
            self.tuning_message = "post-processing: the start model's values (re-tuning off)"
        elif not self._val_items:
            self.tuning_message = "post-processing: the start model's values (nothing held out)"
        else:
            allowed, why = tuning_allowed(self._validation_views(), self.parent.spatial_dims,
                                          MIN_TUNING_OBJECTS)
            tuned = self.tune_postprocessing(result) if allowed else None
            if tuned is not None:
                values = ", ".join(f"{k} {v}" for k, v in tuned.settings.items())
                self.tuning_message = (f"post-processing re-tuned on {why}: {values} ({tuned.metric} "
                                       f"{tuned.score:.3f}; before {tuned.default_score:.3f})")
            else:
                self.tuning_message = f"post-processing: the start model's values ({why})"
        result.history[-1]["postprocessing"] = self.tuning_message


def train(model: SegmentationModel, pairs: Sequence[TrainingPair],
          config: TrainingConfig | None = None) -> Generator[TrainingStats, Any, SegmentationModel]:
    """Train a copy of ``model`` on ``pairs``: yields :class:`TrainingStats`, returns the new
    model. Input errors raise ``ValueError`` at once (before the first ``next``).

    See :class:`Trainer` for stopping early and getting the best model after ``close()``.
    """
    return Trainer(model, pairs, config).run()
