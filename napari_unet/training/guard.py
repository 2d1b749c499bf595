"""The never-worse rules of fine-tuning.

* The start model is a candidate: trained weights replace it only when they beat it on the
  held-out part by a margin (:func:`choose_weights`).
* Post-processing is re-tuned only on enough held-out objects, and for a 3D model only on
  objects annotated in 3D, never from a slice (:func:`tuning_allowed`); otherwise the start
  model's values are kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from napari_unet.training.sampling import _Item

if TYPE_CHECKING:
    from napari_unet.training.trainer import Trainer

#: what a fine-tuned model keeps: the start model's weights, the best-scoring trained weights,
#: or the last ones (nothing held out to judge)
KEPT = ("start", "best", "last")


#: why a 3D membrane model judged on slices keeps its own weights
SLICES_CANNOT_JUDGE = ("the start model's weights: the held-out part is slices, which cannot show whether "
              "cells on either side of them stay apart (in bench_hitl, weights that a held-out z, y "
              "or x slice approved merged cells in 3D: object F1 0.418 -> 0.29); a 3D membrane model "
              "is replaced only when it is judged on cells annotated in 3D")


def sees_across_z(views: Sequence[_Item]) -> bool:
    """Whether a held-out part of a stack is a y or x plane (one that shows z)."""
    from napari_unet.training.validation import held_out_axis

    return any(item.valid is not None and item.valid.ndim == 3 and item.valid.any()
               and held_out_axis(item.valid) != 0 for item in views)


def choose_weights(start_score: float | None, best_score: float | None, keeps_best: bool,
                   margin: float, fine_tune: bool, blind_to_z: bool = False,
                   f1: tuple[float | None, float | None] = (None, None)) -> tuple[str, str]:
    """Which weights the result gets, and why, in words with the numbers. ``blind_to_z``: a
    3D membrane model whose held-out part shows no z (see :func:`sees_across_z`). ``f1``: the
    held-out object F1 of the start model and of the best weights; trained weights that lose
    objects are not kept, however their score (which averages in the pixel Dice) rose.

    Returns
    -------
    kept, reason
        ``kept`` is one of :data:`KEPT`.
    """
    if not keeps_best:
        return "last", "the last weights (nothing held out to compare them with the start model)"
    if not fine_tune or start_score is None:
        return "best", (f"the best-scoring weights (held-out score {best_score:.3f})"
                        if best_score is not None else "the best-scoring weights")
    if blind_to_z:
        return "start", SLICES_CANNOT_JUDGE + (f" (held-out score {best_score:.3f}, start {start_score:.3f})"
                                      if best_score is not None else "")
    if best_score is None or not np.isfinite(best_score):
        return "start", f"the start model's weights (no trained weights scored; start {start_score:.3f})"
    start_f1, best_f1 = f1
    if start_f1 is not None and best_f1 is not None and best_f1 < start_f1:
        return "start", (f"the start model's weights: fine-tuning scored {best_score:.3f} on the held-out "
                         f"part against {start_score:.3f}, but its held-out object F1 fell from "
                         f"{start_f1:.3f} to {best_f1:.3f}")
    if best_score >= start_score + margin:
        return "best", (f"the fine-tuned weights: held-out score {best_score:.3f} against the start "
                        f"model's {start_score:.3f} (+{best_score - start_score:.3f}, margin {margin:.3f})")
    return "start", (f"the start model's weights: fine-tuning scored {best_score:.3f} on the held-out "
                     f"part against the start model's {start_score:.3f}, not better by the margin "
                     f"{margin:.3f}")


def keep_margin(base: float, objects: int) -> float:
    """The margin trained weights must beat the start model by on the held-out part: ``base``,
    and at least one held-out object's worth of the score (the score averages Dice and object
    F1, and one object more or less moves F1 by about ``1 / objects``), so that a coin flip on
    a few objects of one slice never replaces the start model."""
    return max(float(base), 0.5 / objects) if objects > 0 else float(base)


def held_out_objects(views: Sequence[_Item], spatial_dims: int) -> tuple[int, bool]:
    """Objects in the held-out part, and whether they are annotated in 3D (for a 3D model:
    a held-out region deeper than one slice along every axis)."""
    count = 0
    in_3d = spatial_dims == 3
    for item in views:
        if item.labels is None or item.valid is None:
            continue
        if spatial_dims == 3:
            extent = [int(np.count_nonzero(item.valid.any(axis=tuple(a for a in range(3) if a != axis))))
                      for axis in range(3)]
            in_3d = in_3d and min(extent) > 1
        ids = np.unique(item.labels[item.valid])
        count += int(np.count_nonzero(ids))
    return count, in_3d and count > 0


def tuning_allowed(views: Sequence[_Item], spatial_dims: int, min_objects: int) -> tuple[bool, str]:
    """Whether the post-processing may be re-tuned on ``views``, and why (not)."""
    count, in_3d = held_out_objects(views, spatial_dims)
    if count == 0:
        return False, "no held-out objects"
    if spatial_dims == 3 and not in_3d:
        return False, (f"the held-out part has {count} objects on slices only: a 3D model's "
                       "post-processing is re-tuned only on objects annotated in 3D")
    if spatial_dims == 2 and sum(item.labels is not None for item in views) < 2:
        return False, (f"the held-out part is one image or slice ({count} objects): post-processing "
                       "is never re-tuned from one slice")
    if count < min_objects:
        return False, f"only {count} held-out objects (at least {min_objects} needed)"
    return True, f"{count} held-out objects"


def decide_weights(trainer: Trainer) -> tuple[str, str]:
    """:func:`choose_weights` for a finished run of ``trainer``: the margin from its held-out
    objects (:func:`keep_margin`), blind to z for a 3D membrane model judged on z slices."""
    views = trainer._validation_views() if trainer._val_items else []
    objects = held_out_objects(views, trainer.parent.spatial_dims)[0] if trainer.task != "semantic" else 0
    blind = (trainer.task == "membranes" and trainer.parent.spatial_dims == 3 and bool(views)
             and not held_out_objects(views, 3)[1])
    return choose_weights(trainer.start_score, trainer._best_score, trainer.keeps_best,
                          keep_margin(trainer.config.keep_margin, objects), trainer.fine_tune,
                          blind_to_z=blind, f1=(trainer.start_f1, trainer.best_f1))
