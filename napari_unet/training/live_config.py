"""What a live session is given and what it yields: :class:`LiveConfig`, :class:`LiveView`,
:class:`LiveUpdate`, and the schedule's constants (see :mod:`napari_unet.training.live`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_unet.training.config import KEEP_MARGIN

#: training steps on a new snapshot before the view is predicted with it
FIRST_ROUND_STEPS = 1
#: in steady rounds, training gets at least this share of the time (the rest: predicting the view)
TRAIN_SHARE = 2 / 3
#: the guard scores the live weights at most this often (seconds) ...
VALIDATION_INTERVAL = 5.0
#: ... and with at most this share of the session's time
VALIDATION_SHARE = 0.15
#: seconds an idle session (no data yet, view unchanged) waits for news before looking again
IDLE_WAIT = 0.25


@dataclass
class LiveConfig:
    """How a live session trains, predicts and guards (``None``: automatic)."""

    precision: str = "auto"
    #: steps per steady round; None: rounds by time (``train_seconds_per_round``)
    steps_per_round: int | None = None
    #: the shortest steady round (seconds); a round is also at least ``TRAIN_SHARE`` of the time
    train_seconds_per_round: float = 0.8
    #: Learning-without-Forgetting weight on uncorrected voxels (an empty start has none)
    distillation: float = 1.0
    #: only painted voxels (label != 0) count, ``background_label`` meaning background
    sparse: bool = False
    background_label: int | None = None
    #: the guard scores held-out planes only once they hold this many objects
    min_heldout_objects: int = 30
    #: every ``holdout_every``-th corrected plane (by first appearance) is held out (0: none)
    holdout_every: int = 5
    keep_margin: float = KEEP_MARGIN
    #: seconds between two scorings of the live weights (also at most VALIDATION_SHARE of the time)
    validation_interval: float = VALIDATION_INTERVAL
    learning_rate: float | None = None
    device: str = "auto"
    seed: int = 0
    augment: bool = True
    #: a 3D model's slab (planes kept around the one on screen; None: automatic) and the
    #: context read on each side (None: live_view.VIEW_HALO_SHARE of the network's halo; at
    #: most the halo, which is exact)
    view_depth: int | None = None
    view_halo: int | None = None
    #: ``instances``, ``labels`` (None: as Segment's default for the model)
    output: str | None = None


@dataclass(frozen=True)
class LiveView:
    """What is on screen: plane ``index`` along ``axis`` (0 = z; ignored for a 2D image)."""

    axis: int = 0
    index: int = 0


@dataclass
class LiveUpdate:
    """Yielded by :meth:`LiveSession.run` after each view prediction."""

    view: LiveView
    region: tuple[slice, ...]
    prediction: np.ndarray | None
    probabilities: np.ndarray | None
    iteration: int
    corrections_version: int
    trained_on_latest: bool
    held_out_score: float | None
    start_score: float | None
    kept: str
    loss: float | None
    seconds: float
    #: what the session is doing or why not (no data yet, what is held out, a refused snapshot)
    message: str = ""
