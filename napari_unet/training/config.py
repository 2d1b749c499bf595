"""What a training run is given: image/label pairs and :class:`TrainingConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from napari_unet.progress import Progress
from napari_unet.training.augment import AugmentSettings

DEFAULT_TIME_LIMIT = 60.0
LR_SCRATCH = 1e-3
# Adam moves every weight by about the learning rate per step whatever the gradient, so a
# few slices at 6e-4 moved the 3D nuclei model off its good weights within 10 steps
# (bench_hitl: object F1 on uncorrected slices 0.867 -> 0.750): 3D models 2e-4, with a 20-step
# warm-up. 2D models learn from whole corrected images and are judged on whole held-out ones:
# at 2e-4 the EM model hardly moved in 60 s (bench_hitl), at 6e-4 it gained (issue 19's table)
LR_FINETUNE = 2e-4
LR_FINETUNE_2D = 6e-4
#: automatic validation split: this fraction of the parts (corrected slices or images), at least one
AUTO_VALIDATION_FRACTION = 0.2
#: validation and the live preview together take at most this share of a run's time (besides
#: the validation and preview at its end): each runs at its interval, or later, when its time
#: so far plus its last measured cost would exceed its part of the share
EVALUATION_SHARE = 0.1
#: a fine-tuned model must beat the start model by this much on the held-out part to be kept
KEEP_MARGIN = 0.01
#: post-processing is re-tuned only on at least this many held-out objects (see
#: ``TrainingConfig.tune_postprocessing``)
MIN_TUNING_OBJECTS = 30


# --------------------------------------------------------------------------------------------
# public data classes
# --------------------------------------------------------------------------------------------

@dataclass
class TrainingPair:
    """One image with its (corrected) labels.

    ``labels`` holds instance ids or semantic classes 1..K (0 = background). Only annotated
    voxels are trained on: ``annotated`` (nonzero = annotated) or ``slices`` (the corrected
    slices of a stack: ints are z slices, indices along axis 0; ``(axis, index)`` pairs are
    slices along any axis, ``axis`` 0-2 or ``"z"``/``"y"``/``"x"``, e.g. ``(1, 40)`` = y 40);
    both None = everything. The targets of each slice are made within its plane.
    """

    image: np.ndarray
    labels: np.ndarray
    annotated: np.ndarray | None = None
    slices: Sequence[int | tuple[int | str, int]] | None = None


@dataclass
class TrainingConfig:
    """How to train; every ``None`` means an automatic, sensible choice."""

    iterations: int | None = None
    time_limit: float | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    patch_shape: tuple[int, ...] | None = None
    augment: bool = True
    #: part of the annotations held out to score the weights (the best-scoring ones are kept);
    #: None = automatic: held out when there are two or more corrected slices or images
    #: (see :meth:`napari_unet.training.holdout.split_validation`); 0 = never (the last weights are kept)
    validation_fraction: float | None = None
    #: annotated slices within this many slices of a validation slice are not trained on
    #: (adjacent slices have nearly the same labels, so training on them inflates the score)
    validation_gap: int = 1
    seed: int = 0
    device: str = "auto"
    #: ``auto`` (bf16 on CPUs with native bf16 and on CUDA, fp16 on older GPUs, else fp32),
    #: ``fp32``, ``bf16`` or ``fp16``; see :mod:`napari_unet.model.precision`
    precision: str = "auto"
    #: False: exact fp32 whatever ``precision`` says (the older switch for mixed precision)
    amp: bool = True
    preview_image: np.ndarray | None = None
    preview_interval: float = 5.0
    log_every: int = 1
    #: batch-norm running statistics: frozen (eval mode) or updated; None = frozen when
    #: fine-tuning a trained model (after re-estimating them on the new data, see
    #: ``recalibrate_norm``), updated when training from scratch
    freeze_norm: bool | None = None
    #: with frozen batch norm: first re-estimate its statistics on patches of the new data
    #: (forward passes only). Off by default: a few patches around the corrected slices
    #: shifted the statistics of the whole stack (bench_hitl), and it cost seconds of a run
    recalibrate_norm: bool = False
    #: seconds between validation runs (when a validation split exists)
    validation_interval: float = 10.0
    #: fraction of patches centred on an annotated foreground voxel
    foreground_oversampling: float = 0.5
    augment_settings: AugmentSettings | None = None
    #: one of :data:`losses.LOSSES`: ``bce_dice``, ``focal_dice``, ``tversky`` or
    #: ``boundary_bce`` (the U-Net weight map of the labels, computed once per image)
    loss: str = "bce_dice"
    #: micro-batches per optimizer step (effective batch ``batch_size * accumulate_steps``);
    #: ``iterations`` count optimizer steps, so each takes this many batches
    accumulate_steps: int = 1
    #: recompute activations in the backward pass instead of storing them (less memory,
    #: about a third more time; the same numbers)
    gradient_checkpointing: bool = False
    #: fine-tuning: weight of the distillation term (:func:`losses.distillation_loss`) that
    #: keeps the start model's output on the voxels nobody annotated; 0 = off
    distillation: float = 1.0
    #: predict the distillation teacher's output once for the training images before training
    #: (see :mod:`napari_unet.training.teacher`) instead of running it on every patch: a third
    #: less work per 3D UNet++ step, but the target is the start model's whole-image output of
    #: the clean image, not its output of the augmented patch, and in a side-by-side bench_hitl
    #: A/B (nuclei-3d, 3 slice choices x 4 seeds, 60 iterations) the 3 fine-tunes it kept were
    #: worse (F1 -0.036, -0.004; Dice -0.006) where the per-patch teacher's 2 gained: off by default
    predict_teacher: bool = False
    #: fine-tuning with a held-out part: the trained weights replace the start model only when
    #: they score at least this much better on it (one held-out slice is a noisy judge)
    keep_margin: float = KEEP_MARGIN
    #: re-tune the post-processing (threshold, seeds, minimum size) on the held-out part at the
    #: end, when it is large enough (:data:`MIN_TUNING_OBJECTS` objects annotated in 3D for a 3D
    #: model); otherwise the start model's values are kept
    tune_postprocessing: bool = True
    #: torch threads: None = chosen by timing the steps while training (see
    #: :class:`napari_unet.engine.threads.ThreadTuner`), else that many
    threads: int | None = None


@dataclass(init=False)
class TrainingStats(Progress):
    """The :class:`~napari_unet.progress.Progress` of a training run, yielded after an iteration.

    ``done`` counts iterations (also :attr:`iteration`), ``total`` is the iteration budget
    (:attr:`total_iterations`, None when only ``time_limit`` bounds the run).
    """

    loss: float
    learning_rate: float
    samples_per_second: float
    #: validation score of these weights: Dice on the held-out part (mean over the outputs,
    #: or classes), averaged with :attr:`validation_f1` when the labels are instances
    validation_dice: float | None
    best_score: float | None
    preview: np.ndarray | None
    #: True: a part is held out and the best-scoring weights are kept; False: the last ones
    keeps_best: bool
    #: object F1 (IoU 0.5) on the held-out part, slice by slice, when its labels are instances
    validation_f1: float | None
    #: validation score of the model before fine-tuning (compare with :attr:`best_score`)
    start_score: float | None

    def __init__(self, iteration: int, total_iterations: int | None, loss: float,
                 learning_rate: float, elapsed: float, samples_per_second: float,
                 time_limit: float | None, validation_dice: float | None = None,
                 best_score: float | None = None, preview: np.ndarray | None = None,
                 message: str = "", keeps_best: bool = False, validation_f1: float | None = None,
                 start_score: float | None = None) -> None:
        # ``message``: the first stats of a run say which weights are kept and why
        super().__init__(done=iteration, total=total_iterations, elapsed=elapsed, message=message,
                         stage="train", time_limit=time_limit)
        self.loss, self.learning_rate = loss, learning_rate
        self.samples_per_second = samples_per_second
        self.validation_dice, self.best_score, self.preview = validation_dice, best_score, preview
        self.keeps_best, self.validation_f1, self.start_score = keeps_best, validation_f1, start_score

    @property
    def iteration(self) -> int:
        return self.done

    @property
    def total_iterations(self) -> int | None:
        return self.total
