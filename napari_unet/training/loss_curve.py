"""The numbers of the Fine-tune dock's live curve: training loss relative to its first value,
and validation Dice, against seconds (a time limit) or iterations.

The axes are fixed for a run and only grow when a point falls outside them, so a plot of a
:class:`LossCurve` redraws its lines, not its axes. No plotting here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: the x axis of a run without a time limit or iteration count (seconds)
DEFAULT_SPAN = 60.0
#: room past the plan on the x axis (the last iteration may end after the time limit)
X_MARGIN = 1.15
#: the y axis (loss / first loss) at the start of a run
START_Y_MAX = 1.25


@dataclass
class LossCurve:
    """Points of one run and the axes that hold them."""

    #: x is seconds (True) or iterations (False)
    by_time: bool = True
    x_max: float = DEFAULT_SPAN
    y_max: float = 1.0
    x: list[float] = field(default_factory=list)
    #: loss / first loss, at ``x``
    losses: list[float] = field(default_factory=list)
    dice_x: list[float] = field(default_factory=list)
    dice: list[float] = field(default_factory=list)
    first_loss: float | None = None
    #: new points since the last :meth:`taken`
    dirty: bool = False

    @property
    def axes(self) -> tuple[bool, float, float]:
        """``(by_time, x_max, y_max)``: a plot whose axes equal these need not redraw them."""
        return (self.by_time, self.x_max, self.y_max)

    def reset(self, time_limit: float | None = None, iterations: int | None = None) -> None:
        """Empty, for a run of ``time_limit`` seconds or else ``iterations`` iterations."""
        self.x, self.losses, self.dice_x, self.dice = [], [], [], []
        self.by_time = iterations is None or bool(time_limit)
        span = float(time_limit or DEFAULT_SPAN) if self.by_time else float(iterations or 100)
        self.x_max = X_MARGIN * span
        self.y_max = START_Y_MAX
        self.first_loss = None
        self.dirty = False

    def add(self, stats: Any) -> None:
        """Add one iteration's :class:`~napari_unet.training.config.TrainingStats` (a loss
        that is not finite and positive is left out; the Dice only when it was measured)."""
        x = stats.elapsed if self.by_time else stats.iteration
        if np.isfinite(stats.loss) and stats.loss > 0:
            if self.first_loss is None:
                self.first_loss = float(stats.loss)
            self.x.append(x)
            self.losses.append(stats.loss / self.first_loss)
        if stats.validation_dice is not None:
            self.dice_x.append(x)
            self.dice.append(stats.validation_dice)
        self.dirty = True

    def taken(self) -> bool:
        """Whether there are new points to show (and from now on, none)."""
        dirty, self.dirty = self.dirty, False
        return dirty

    def grow_y(self) -> bool:
        """Raise ``y_max`` above the largest loss when one is past it; whether it grew."""
        if self.losses and max(self.losses) > self.y_max:
            self.y_max = max(self.losses) * 1.2
            return True
        return False

    def grow_x(self) -> bool:
        """Double the x axis past the last point when the run went beyond the plan (e.g. no
        limit given); whether it grew."""
        if self.x and self.x[-1] > self.x_max:
            self.x_max = self.x[-1] * 2
            return True
        return False
