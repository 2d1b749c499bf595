"""Helpers for the project's long jobs, which are generators that yield progress and return a result."""

from __future__ import annotations

from typing import Callable, Generator, TypeVar

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
