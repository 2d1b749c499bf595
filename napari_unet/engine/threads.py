"""How many torch threads a long job uses, chosen by measurement while it runs.

On a small shared machine (2 cores, napari drawing beside the job, another process busy)
OpenMP threads that spin-wait for each other lose badly: measured here under load, one
fine-tuning step of the 3D nuclei model took 0.65 s with one thread and 5 s with two. On a
quiet machine two threads are faster. Neither choice is right everywhere, and the load changes
while the job runs, so :class:`ThreadTuner` times the job's own steps with each thread count,
keeps the faster one, and probes the other one again from time to time.

:func:`flush_denormals` switches off denormal arithmetic for a job's duration: tiny fp32
gradients made some training steps 3-10x slower on this CPU (measured with the shipped 3D
nuclei model), and values below 1e-38 do not matter to a segmentation network.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator, Sequence

import torch

__all__ = ["ThreadTuner", "flush_denormals", "thread_choices"]

#: a probe of another thread count is dropped at once when its step takes this much longer
#: than the current median (no need to finish a probe that is clearly losing)
_ABORT_RATIO = 1.5
#: the other count must beat the current one by this factor to be taken (noise margin)
_SWITCH_RATIO = 0.9


def thread_choices(cores: int | None = None) -> list[int]:
    """The thread counts worth trying: 1 and the usable cores (at most 8; just one on a
    one-core machine). ``OMP_NUM_THREADS`` set by the user fixes the count."""
    fixed = os.environ.get("OMP_NUM_THREADS")
    if fixed and fixed.isdigit() and int(fixed) > 0:
        return [int(fixed)]
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
    cores = max(1, min(8, int(cores)))
    return [1] if cores == 1 else [1, cores]


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[None]:
    """Treat denormal floats as zero inside the block (CPU), then restore the old setting."""
    if not enabled:
        yield
        return
    # torch has no getter for the flag: it is off unless someone turned it on
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


class ThreadTuner:
    """Choose the torch thread count of a loop of similar steps by timing the steps.

    Call :meth:`before_step` before each step and :meth:`after_step` after it. The tuner
    starts with one thread, times a few steps with each choice, keeps the faster one
    and probes the others again every ``probe_interval`` seconds (doubled each time a probe
    loses, reset when one wins). A probe whose step is clearly slower is dropped after one
    step, so a bad choice costs at most one slow step per probe.

    Parameters
    ----------
    choices
        Thread counts to choose from (default :func:`thread_choices`).
    steps_per_probe
        Timed steps per choice (the first step after a switch is a warm-up and not timed).
    probe_interval
        Seconds between probes of the other counts.
    enabled
        False: the thread count is left as it is and nothing is timed. With a single choice
        (e.g. ``TrainingConfig.threads``) that count is used, and nothing is timed.
    """

    def __init__(self, choices: Sequence[int] | None = None, *, steps_per_probe: int = 3,
                 probe_interval: float = 8.0, enabled: bool = True) -> None:
        self.choices = list(choices) if choices else thread_choices()
        self.enabled = enabled and len(self.choices) > 1
        fixed = enabled and len(self.choices) == 1
        self.steps_per_probe = max(1, int(steps_per_probe))
        self.base_interval = float(probe_interval)
        self.interval = self.base_interval
        self._saved = torch.get_num_threads()
        #: the thread count in use for the steps (the chosen one, or the one being probed)
        # one thread first: on a loaded machine a probe of two costs a few slow steps, on a
        # quiet one a probe of one costs little
        self.current = self.choices[0] if self.enabled or fixed else self._saved
        self.chosen = self.current
        #: recent step seconds per thread count
        self.times: dict[int, list[float]] = {c: [] for c in self.choices}
        self.switches = 0
        self._probing: int | None = None
        self._warm = False
        self._start = 0.0
        self._last_probe = time.perf_counter()
        self._queue: list[int] = list(self.choices) if self.enabled else []
        self._apply(self.current)

    # -- public ---------------------------------------------------------------------

    def before_step(self) -> None:
        """Set the thread count for the next step and start its clock."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._probing is None:
            if not self._queue and now - self._last_probe >= self.interval:
                self._queue = [c for c in self.choices if c != self.chosen]
            if self._queue:
                self._begin_probe(self._queue.pop(0))
        self._start = time.perf_counter()

    def after_step(self, work: float = 1.0) -> None:
        """Record the step's time (per unit of ``work``, e.g. voxels, for steps of unequal
        size); end a probe when it has its steps or clearly loses."""
        if not self.enabled:
            return
        took = (time.perf_counter() - self._start) / max(float(work), 1e-12)
        if self._probing is None:
            self._record(self.chosen, took)
            return
        reference = self._median(self.chosen) if self._probing != self.chosen else None
        if not self._warm:  # the first step after a switch warms caches and thread pools
            self._warm = True
            if reference is not None and took > 2 * _ABORT_RATIO * reference:
                self._record(self._probing, took)
                self._end_probe()  # far slower even for a warm-up step
            return
        self._record(self._probing, took)
        losing = reference is not None and took > _ABORT_RATIO * reference
        probe_times = self.times[self._probing][-self.steps_per_probe:]
        if losing or len(probe_times) >= self.steps_per_probe and self._probe_complete():
            self._end_probe()

    def close(self) -> None:
        """Restore the thread count found at the start."""
        self._apply(self._saved)

    def summary(self) -> str:
        """The choice in words, e.g. ``1 thread, 0.61 s/step (2 threads: 4.90 s/step)``."""
        def named(count: int) -> str:
            return f"{count} thread{'s' if count > 1 else ''}"

        text = named(self.chosen)
        median = self._median(self.chosen)
        if median is not None:
            text += f", {median:.2f} s/step"
        others = [f"{named(c)}: {self._median(c):.2f} s/step" for c in self.choices
                  if c != self.chosen and self._median(c) is not None]
        return text + (f" ({'; '.join(others)})" if others else "")

    # -- internals ------------------------------------------------------------------

    def _probe_complete(self) -> bool:
        return len(self.times[self._probing]) >= self.steps_per_probe

    def _begin_probe(self, count: int) -> None:
        self._probing = count
        self._warm = count == self.current  # no switch: no warm-up step needed
        self.times[count] = []  # a fresh measurement: the load may have changed
        self._apply(count)

    def _end_probe(self) -> None:
        self._probing = None
        if self._queue:  # the next choice of this round
            return
        measured = {c: self._median(c) for c in self.choices if self._median(c) is not None}
        best = min(measured, key=measured.get) if measured else self.chosen
        if best != self.chosen and measured[best] <= _SWITCH_RATIO * measured.get(self.chosen, float("inf")):
            self.chosen = best
            self.switches += 1
            self.interval = self.base_interval
        else:
            self.interval = min(8 * self.base_interval, 2 * self.interval)
        self._last_probe = time.perf_counter()
        self._apply(self.chosen)

    def _record(self, count: int, seconds: float) -> None:
        times = self.times[count]
        times.append(seconds)
        del times[:-2 * self.steps_per_probe]

    def _median(self, count: int) -> float | None:
        times = self.times.get(count) or []
        if not times:
            return None
        ordered = sorted(times[-self.steps_per_probe:])
        return ordered[len(ordered) // 2]

    def _apply(self, count: int) -> None:
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
        self.current = count
