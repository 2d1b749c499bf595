"""Live mode: the model trains while the user paints, and the prediction in view follows.

:class:`LiveSession` is one background job (a generator, run by the dock's worker thread; it
starts no thread itself) that alternates:

a. when a new snapshot of the corrected planes arrived (:meth:`LiveSession.submit_corrections`,
   from the main thread), rebuild the training data from it (:mod:`live_data`: the targets of
   the planes only; the network and the optimizer state carry on);
b. a training round (the Fine-tune loss, with distillation toward the start model on the
   voxels nobody corrected);
c. a prediction of the region in view with the latest weights (:mod:`live_view`: batch norm
   folded, eval mode, no gradients, bf16 where the engine uses it; the model's own
   post-processing), yielded as a :class:`LiveUpdate`.

A new snapshot or a new view ends the running round at the next step: a snapshot is trained
on for a short round and shown at once, a new view is predicted at once.

The guard is Fine-tune's (:mod:`guard`): every ``holdout_every``-th corrected plane (the 5th,
10th, ...) is held out from its first appearance (never trained on); once the held-out planes
have ``min_heldout_objects`` objects (any held-out plane for labels without instances) the
live weights are scored on them from time to time, and the start model stays a candidate:
``kept`` says which weights Apply would use.

Schedule (constants in :mod:`live_config`), chosen by measurement on this 2-core CPU (bf16,
one torch thread, other jobs keeping the load at 2-7; ``benchmarks/bench_live.py`` and the
stage timings in :attr:`LiveSession.timings`):

* rebuilding the training data from a snapshot of 3 planes: 0.002-0.016 s (a 100 x 256 x 256
  stack included), so a snapshot is taken at the next step, never batched;
* a training step: 0.12-0.22 s (EM, 2D), 0.19 s (nuclei-2d), 0.27-0.5 s (nuclei-3d, UNet++);
* a view prediction with post-processing: 0.12-0.24 s (512 x 512 plane), 0.3 s (520 x 696
  plane), 0.16-0.3 s (3D slab of 8 planes of 100 x 100), 2.2-2.5 s (of 256 x 256; the exact
  halo took 4.2-6.6 s, see :data:`live_view.VIEW_HALO_SHARE`).

The latency of a correction is what runs when it arrives (half a step or half a prediction
on average) + :data:`FIRST_ROUND_STEPS` step + one prediction. One step is the least that
makes the update one trained on the correction (``trained_on_latest``); each more step adds
0.12-0.5 s to every latency. A snapshot that ends a steady round is trained on before the
view is predicted again. Measured (bench_live, 3 corrections per case): 0.5-0.9 s in 2D and
with 3D 100 x 100 views, 2.6-3.0 s with 3D 256 x 256 views (2.2 s of it the prediction).
Steady rounds last ``train_seconds_per_round`` (0.8 s) or twice the last prediction,
whichever is longer (:data:`TRAIN_SHARE`): training had 70-75 % of the time in 2D and with
100 x 100 slabs, half with 256 x 256 slabs (a correction every 5 s), and the view refreshes every 0.9-1.3 s (about 6 s with 256 x 256
slabs), besides at once after every correction and view change.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import threading
import time
from typing import Any, Generator, Mapping, Sequence

import numpy as np
import torch

from napari_unet.engine.devices import select_device
from napari_unet.engine.live import default_output
from napari_unet.engine.threads import ThreadTuner, flush_denormals
from napari_unet.labels.slices import Plane
from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.model.precision import resolve_precision
from napari_unet.model.unet import UNet, fuse_for_inference
from napari_unet.training.config import LR_FINETUNE, LR_SCRATCH
from napari_unet.training.guard import choose_weights, held_out_objects, keep_margin
from napari_unet.training.live_config import (
    FIRST_ROUND_STEPS,
    IDLE_WAIT,
    TRAIN_SHARE,
    VALIDATION_SHARE,
    LiveConfig,
    LiveUpdate,
    LiveView,
)
from napari_unet.training.live_data import LiveData, LiveImage, build_data, check_planes, held_out_planes
from napari_unet.training.live_view import ViewPrediction, predict_view, view_plan
from napari_unet.training.losses import training_loss
from napari_unet.training.optimisation import device_batch, learning_rate_at, optimizer_step, set_train_mode
from napari_unet.training.results import clone_state, eval_model, finite, finite_state
from napari_unet.training.sampling import is_anisotropic, sample_patches
from napari_unet.training.validation import score

__all__ = ["LiveConfig", "LiveSession", "LiveUpdate", "LiveView"]

class LiveSession:
    """Train on the user's corrections while they paint; predict the view with the latest
    weights. See the module docstring.

    Parameters
    ----------
    model
        The model to fine-tune; None for an empty start from ``new_model_spec``
        (:class:`~napari_unet.training.new_models.NewModelSpec`).
    image
        The image (2D, or a stack for a 2D or 3D model); never modified.
    config
        :class:`LiveConfig`.
    voxel_size
        The image's voxel size, for the post-processing (as Segment gets the layer's scale).
    """

    def __init__(self, model: SegmentationModel | None, image: np.ndarray, config: LiveConfig | None = None,
                 new_model_spec: Any = None, *, voxel_size: Sequence[float] | None = None):
        self.config = config = config or LiveConfig()
        if model is None:
            if new_model_spec is None:
                raise ValueError("an empty start needs a new-model spec")
            from napari_unet.training.new_models import build_new_model

            model = build_new_model(new_model_spec)
        if getattr(model, "foreign", False):
            raise ValueError(f"{model.label} is a Zoo model made elsewhere: live mode trains napari-unet's own UNets")
        self.parent = model
        self.fine_tune = model.version > 0 or bool(model.history)
        self.image = image if isinstance(image, np.ndarray) else np.asarray(image)
        if model.config.in_channels != 1:
            raise ValueError("live mode takes single-channel images")
        if self.image.ndim not in (2, 3) or (model.spatial_dims == 3 and self.image.ndim != 3):
            raise ValueError(f"a {model.spatial_dims}D model cannot run live on an image of shape {self.image.shape}")
        if config.sparse and config.background_label is None:
            raise ValueError("sparse painting needs a background label (the label id meaning background)")
        self.voxel_size = None if voxel_size is None else tuple(float(v) for v in voxel_size)
        self.output = config.output or default_output(model)
        self.device = select_device(config.device)
        self.policy = resolve_precision(config.precision, self.device)
        self.task = model.task
        self._lock = threading.Lock()      # the weights: steps, snapshots for current_model
        self._inbox = threading.Lock()     # what the main thread hands over
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending: tuple[dict, int] | None = None
        self._latest_version = -1
        self._view = LiveView(0, self.image.shape[0] // 2 if self.image.ndim == 3 else 0)
        self._order: dict[Plane | None, int] = {}
        self.data: LiveData | None = None
        self.network: UNet | None = None
        self.iteration = 0
        self._trained_version = -1
        self._steps_on_data = 0
        self._loss: float | None = None
        self._started = time.perf_counter()
        self._message = "no corrections yet: correct a slice (or paint) to start training"
        # the guard
        self._held_key: Any = None
        self.start_score: float | None = None
        self.start_f1: float | None = None
        self.held_out_score: float | None = None
        self._best_score: float | None = None
        self._best_f1: float | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        self._last_validation = 0.0
        self._validation_seconds = 0.0
        #: seconds of the last view prediction, and of each stage so far
        self.predict_seconds = 0.0
        self.timings = dict.fromkeys(("rebuild", "train", "validate", "predict"), 0.0)
        self.threads_message = ""

    # -- the main thread's side (cheap, thread-safe) ------------------------------------

    def submit_corrections(self, planes: Mapping[Any, np.ndarray], version: int) -> None:
        """Hand over the corrected planes' labels (copies: z slices as ints, y/x planes as
        ``(axis, index)``, a 2D image as one entry with key None) with a version number that
        increases. Replaces the previous snapshot; enters training at the next step.
        ValueError at once for planes outside the image or of the wrong shape."""
        checked = check_planes(planes, self.image.shape)
        with self._inbox:
            if version <= self._latest_version:
                raise ValueError(f"version {version} is not newer than {self._latest_version}")
            self._pending = (checked, int(version))
            self._latest_version = int(version)
        self._wake.set()

    def set_view(self, view: LiveView) -> None:
        """Re-target the prediction: the next one is of ``view`` (the running round ends)."""
        with self._inbox:
            self._view = view
        self._wake.set()

    def request_stop(self) -> None:
        """End :meth:`run` after the current step; it returns the kept weights."""
        self._stop.set()
        self._wake.set()

    @property
    def latest_version(self) -> int:
        return self._latest_version

    # -- the guard ----------------------------------------------------------------------

    def _guard_active(self) -> bool:
        data = self.data
        if data is None or not data.held_out:
            return False
        return not data.instances or data.held_out_objects >= self.config.min_heldout_objects

    def decision(self) -> tuple[str, str]:
        """``("start" | "live", why)``: which weights Apply would use now, and why."""
        if not self._guard_active():
            return "live", "the live weights (nothing held out to judge them by yet)"
        data = self.data
        objects = data.held_out_objects
        blind = (self.task == "membranes" and self.parent.spatial_dims == 3
                 and not held_out_objects(data.val_views, 3)[1])
        kept, why = choose_weights(self.start_score, self._best_score, True,
                                   keep_margin(self.config.keep_margin, objects), self.fine_tune,
                                   blind_to_z=blind, f1=(self.start_f1, self._best_f1))
        return ("start" if kept == "start" else "live"), why

    def _validate(self, network: UNet, now: float) -> None:
        """Score the live weights on the held-out planes when due (and the start model when
        the held-out planes changed); keep the best-scoring weights."""
        data = self.data
        if not self._guard_active():
            return
        digest = hashlib.blake2b(digest_size=16)
        for item in data.val_views:
            digest.update(np.ascontiguousarray(item.valid).tobytes())
            digest.update(np.ascontiguousarray(item.target).tobytes())
        key = (tuple(map(str, data.held_out)), digest.hexdigest())
        fresh = key != self._held_key
        if not fresh and (now - self._last_validation < self.config.validation_interval
                          or self._validation_seconds > VALIDATION_SHARE * (now - self._started)):
            return
        mark = time.perf_counter()
        if fresh:  # a new judge: every score so far is void
            self._held_key = key
            self._best_state = self._best_score = self._best_f1 = self.held_out_score = None
            self.start_score = self.start_f1 = None
            if self.fine_tune:
                self.start_score, self.start_f1 = score(data.val_views, self.parent, self.task, self.device,
                                                        self.policy.name)
        value, f1 = score(data.val_views, eval_model(self.parent, network), self.task, self.device,
                          self.policy.name)
        self.held_out_score = value
        if np.isfinite(value) and (self._best_score is None or value >= self._best_score) and finite_state(network):
            with self._lock:
                self._best_score, self._best_f1, self._best_state = float(value), f1, clone_state(network)
        self._last_validation = time.perf_counter()
        self._validation_seconds += self._last_validation - mark
        self.timings["validate"] += self._last_validation - mark

    # -- results ------------------------------------------------------------------------

    def current_model(self, final: bool = False) -> SegmentationModel:
        """The weights Apply would use now (see :meth:`decision`) as a new model version with
        a history entry; safe to call from the main thread while :meth:`run` runs."""
        with self._lock:
            kept, why = self.decision()
            network = self.network
            if kept == "start" or network is None or self.iteration == 0:
                state, kept = clone_state(self.parent.network), "start"
                if network is None or self.iteration == 0:
                    why = "the start model's weights (nothing trained yet)"
            elif self._guard_active() and self._best_state is not None:
                state = self._best_state
            else:
                state = clone_state(network)
            if not finite_state(state):
                state, kept = clone_state(self.parent.network), "start"
                why = "the start model's weights (training diverged: non-finite weights)"
            result = UNet(self.parent.network.config)
            result.load_state_dict(state)
            result.eval()
            entry = self._history_entry(kept, why, final)
        meta = self.parent.metadata()
        meta["version"] = self.parent.version + 1
        meta["parent"] = self.parent.label if self.fine_tune else None
        meta["history"] = list(meta.get("history", [])) + [entry]
        return SegmentationModel(network=result, **meta)

    def _history_entry(self, kept: str, why: str, final: bool) -> dict[str, Any]:
        data = self.data
        guarded = self._guard_active()
        return {
            "kind": "live",
            "iterations": int(self.iteration),
            "seconds": round(time.perf_counter() - self._started, 1),
            "final_loss": finite(self._loss),
            "best_score": finite(self._best_score) if guarded else None,
            "start_score": finite(self.start_score) if guarded else None,
            "kept": "start" if kept == "start" else ("best" if guarded else "last"),
            "decision": why,
            "threads": self.threads_message,
            "corrections_version": int(self._trained_version),
            "learning_rate": self.learning_rate,
            "batch_size": int(data.batch_size) if data else None,
            "patch_shape": [int(p) for p in data.patch_shape] if data else None,
            "precision": self.policy.name,
            "device": self.device.type,
            "data": data.summary() if data else {},
            "postprocessing": "the start model's values (live mode does not re-tune them)",
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "complete": bool(final),
        }

    @property
    def learning_rate(self) -> float:
        """The configured rate, else :data:`LR_SCRATCH` for an empty start and
        :data:`LR_FINETUNE` for every fine-tuned model. Fine-tune's 6e-4 for 2D models decays
        to a tenth over a run; live rounds go on at one rate, and at 6e-4 the live weights
        dipped below the start model (bench_live: EM Dice 0.821 -> 0.766 after two corrections,
        nuclei-2d F1 0.932 -> 0.923), at 2e-4 they did not, or less (0.803; never below 0.932)
        and ended higher (0.824 against 0.807; 0.950 against 0.943)."""
        if self.config.learning_rate is not None:
            return float(self.config.learning_rate)
        return LR_FINETUNE if self.fine_tune else LR_SCRATCH

    # -- the job ------------------------------------------------------------------------

    def _take_snapshot(self, image: LiveImage) -> bool:
        """Rebuild the training data when a new snapshot arrived; True when it did."""
        with self._inbox:
            pending, self._pending = self._pending, None
        if pending is None:
            return False
        planes, version = pending
        for p in planes:
            self._order.setdefault(p, len(self._order))
        mark = time.perf_counter()
        try:
            data = build_data(self.parent, image, planes, version,
                              held_out_planes(self._order, self.config.holdout_every),
                              sparse=self.config.sparse, background_label=self.config.background_label,
                              seed=self.config.seed, device=self.device)
        except ValueError as error:
            self._message = f"corrections {version} not used: {error}"
            return False
        finally:
            self.timings["rebuild"] += time.perf_counter() - mark
        if data is None:  # every plane unmarked (or nothing painted): nothing to train on
            self.data = None
            self._message = "nothing to train on: correct a slice (or paint objects and background)"
            return False
        self.data = data
        self._steps_on_data = 0
        held = ", ".join("image" if p is None else str(p) for p in data.held_out)
        self._message = (f"training on {len(data.trained_planes)} plane(s)"
                         + (f"; held out for the guard: {held} ({data.held_out_objects} objects)" if held else ""))
        return True

    def _interrupted(self, view: LiveView) -> bool:
        return self._stop.is_set() or self._pending is not None or self._view != view

    def _round_seconds(self) -> float:
        """A steady round: at least ``train_seconds_per_round``, and at least
        :data:`TRAIN_SHARE` of the time beside the view prediction."""
        return max(self.config.train_seconds_per_round,
                   TRAIN_SHARE / (1 - TRAIN_SHARE) * self.predict_seconds)

    def _update(self, prediction: ViewPrediction | None, view: LiveView) -> LiveUpdate:
        kept = self.decision()[0] if self.iteration else "start"
        guarded = self._guard_active()
        return LiveUpdate(
            view=view, region=prediction.region if prediction else (),
            prediction=prediction.labels if prediction else None,
            probabilities=prediction.probabilities if prediction else None,
            iteration=self.iteration, corrections_version=self._trained_version,
            trained_on_latest=self._trained_version >= 0 and self._trained_version == self._latest_version,
            held_out_score=self.held_out_score if guarded else None,
            start_score=self.start_score if guarded else None, kept=kept, loss=self._loss,
            seconds=time.perf_counter() - self._started, message=self._message)

    def run(self) -> Generator[LiveUpdate, None, SegmentationModel]:
        """Train and predict until :meth:`request_stop`; yields a :class:`LiveUpdate` after
        each view prediction, returns the kept weights as a new model version
        (:meth:`current_model`). Closing the generator ends it too."""
        config, device, policy, parent = self.config, self.device, self.policy, self.parent
        self._started = time.perf_counter()
        image = LiveImage(self.image, parent)
        network = UNet(parent.network.config)
        network.load_state_dict(parent.network.state_dict())
        network.to(device, memory_format=policy.memory_format(network.spatial_dims))
        teacher = None
        if self.fine_tune and config.distillation > 0:  # the start model, frozen, batch norm folded
            teacher = fuse_for_inference(parent.network).to(
                device, memory_format=policy.memory_format(network.spatial_dims)).requires_grad_(False)
        optimizer = torch.optim.AdamW(network.parameters(), lr=self.learning_rate, weight_decay=1e-4)
        scaler = torch.amp.GradScaler(policy.device_type) if policy.needs_grad_scaler else None
        rng = np.random.default_rng(config.seed)
        anisotropic = is_anisotropic(parent)
        with self._lock:
            self.network = network
        predicted: LiveView | None = None
        tuner = ThreadTuner(enabled=device.type == "cpu")
        flush = flush_denormals(device.type == "cpu")
        flush.__enter__()
        try:
            while not self._stop.is_set():
                self._wake.clear()
                fresh = self._take_snapshot(image)
                with self._inbox:
                    view = self._view
                data = self.data
                if data is None:
                    if view != predicted:
                        predicted = view
                        yield self._update(self._predict(network, image, view), view)
                    else:
                        self._wake.wait(IDLE_WAIT)
                    continue
                pos_weight = None if data.pos_weight is None else torch.tensor(data.pos_weight, device=device)
                class_weights = (None if data.class_weights is None
                                 else torch.tensor(data.class_weights, device=device))

                def batch_loss(x, t, m, w, _predicted=None):  # (no predicted teacher here)
                    return training_loss(network, x, t, m, w, self.task, pos_weight=pos_weight,
                                         class_weights=class_weights, teacher=teacher,
                                         distillation=config.distillation)

                mark = time.perf_counter()
                limit = self._round_seconds()
                steps = 0
                while fresh or view == predicted:  # a new view alone is predicted at once
                    patches = sample_patches(data.items, data.probabilities, data.patch_shape, data.batch_size,
                                             rng, augment=config.augment, settings=None,
                                             foreground_oversampling=0.5, anisotropic=anisotropic)
                    batch = device_batch(patches, policy, device)
                    lr = learning_rate_at(self.learning_rate, self.iteration, 20, 0.0)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    set_train_mode(network, self.fine_tune)
                    with self._lock:
                        tuner.before_step()
                        value, _ = optimizer_step(network, optimizer, scaler, [batch], policy, batch_loss)
                        tuner.after_step()
                        self.iteration += 1
                        steps += 1
                        self._steps_on_data += 1
                        self._trained_version = data.version
                        if np.isfinite(value):
                            self._loss = value if self._loss is None else 0.9 * self._loss + 0.1 * value
                    if self._interrupted(view):
                        break
                    if fresh and steps >= FIRST_ROUND_STEPS:
                        break
                    if not fresh and (steps >= config.steps_per_round if config.steps_per_round
                                      else time.perf_counter() - mark >= limit):
                        break
                network.eval()
                self.timings["train"] += time.perf_counter() - mark
                if self._stop.is_set():
                    break
                if self._pending is not None and not fresh:
                    continue  # a new snapshot: train on it first, then predict
                if not self._interrupted(view):
                    self._validate(network, time.perf_counter())
                with self._inbox:
                    view = self._view
                predicted = view
                yield self._update(self._predict(network, image, view), view)
        finally:
            network.eval()
            tuner.close()
            flush.__exit__(None, None, None)
            self.threads_message = tuner.summary() if tuner.enabled else ""
        return self.current_model(final=True)

    def _predict(self, network: UNet, image: LiveImage, view: LiveView) -> ViewPrediction:
        """The view's prediction with the latest weights."""
        mark = time.perf_counter()
        plan = view_plan(self.image.shape, view.axis, view.index, self.parent, self.config.view_depth,
                         self.config.view_halo)
        model = SegmentationModel(network=network, **self.parent.metadata())
        prediction = predict_view(self.image, model, plan, image.normalizer, device=self.device,
                                  precision=self.policy.name, output=self.output, voxel_size=self.voxel_size)
        self.predict_seconds = time.perf_counter() - mark
        self.timings["predict"] += self.predict_seconds
        return prediction
