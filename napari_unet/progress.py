"""The one progress type of every long job, and :func:`drain`, which runs a job to its end.

Every long job (inference, training, export, merge) is a generator that yields
:class:`Progress` and returns its result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, TypeVar

import numpy as np

Y = TypeVar("Y")
R = TypeVar("R")


def drain(job: Generator[Y, None, R], on_progress: Callable[[Y], None] | None = None) -> R:
    """Run ``job`` to the end, passing every yielded value to ``on_progress``; return its result."""
    while True:
        try:
            update = next(job)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(update)


def relay(job: Generator[Y, None, R], on_progress: Callable[[Y], None]) -> Generator[Y, None, R]:
    """Pass every update of ``job`` on, after ``on_progress`` has seen it; return its result.

    :func:`drain` for a job run inside another job: ``result = yield from relay(job, note)``.
    """
    while True:
        try:
            update = next(job)
        except StopIteration as stop:
            return stop.value
        on_progress(update)
        yield update


@dataclass
class Progress:
    """One step of a long job: how far it is, and what it has to show.

    A job is bounded by a number of steps (``total``), a time budget (``time_limit``) or both.
    ``region`` is the part of the output (spatial slices) finished by this step, ``probabilities``
    a view of the finished probabilities there (channels first), so a viewer can show it at once.
    Training yields :class:`~napari_unet.training.config.TrainingStats`, a ``Progress`` that
    also carries the loss and the validation scores.
    """

    done: int
    total: int | None
    elapsed: float
    region: tuple[slice, ...] | None = None
    probabilities: np.ndarray | None = None
    message: str = ""
    stage: str = "predict"
    time_limit: float | None = None

    @property
    def fraction(self) -> float:
        """Progress 0..1, from the step count or the time budget, whichever is further."""
        parts = []
        if self.total:
            parts.append(self.done / self.total)
        if self.time_limit:
            parts.append(self.elapsed / self.time_limit)
        if not parts:
            return 1.0 if self.total == 0 else 0.0
        return float(min(1.0, max(parts)))

    @property
    def eta(self) -> float | None:
        """Seconds left, estimated from the pace so far."""
        fraction = self.fraction
        if fraction <= 0.0 or (not self.done and not self.time_limit):
            return None
        if fraction >= 1.0:
            return 0.0
        return self.elapsed / fraction * (1.0 - fraction)
