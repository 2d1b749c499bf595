"""Tests for :mod:`napari_unet.engine.threads`: the thread count chosen by timing steps."""

from __future__ import annotations

import torch

from napari_unet.engine import threads
from napari_unet.engine.threads import ThreadTuner, flush_denormals, thread_choices


class FakeClock:
    """perf_counter for the tuner: each step lasts what ``cost[threads]`` says."""

    def __init__(self, cost):
        self.now = 0.0
        self.cost = cost

    def __call__(self):
        return self.now

    def step(self, tuner):
        tuner.before_step()
        count = torch.get_num_threads()
        self.now += self.cost[count]
        tuner.after_step()
        return count


def run_steps(monkeypatch, cost, steps, **options):
    clock = FakeClock(cost)
    monkeypatch.setattr(threads.time, "perf_counter", clock)
    tuner = ThreadTuner([1, 2], **options)
    used = []
    for _ in range(steps):
        used.append(clock.step(tuner))
    return tuner, used, clock


def test_tuner_picks_one_thread_when_two_spin_under_load(monkeypatch):
    saved = torch.get_num_threads()
    tuner, used, _ = run_steps(monkeypatch, {1: 0.6, 2: 5.0}, 12)
    assert tuner.chosen == 1 and used[-1] == 1
    # the losing probe was cut short: one (warm-up) step of 2 threads
    assert used.count(2) == 1
    assert "1 thread, 0.60 s/step (2 threads: 5.00 s/step)" == tuner.summary()
    tuner.close()
    assert torch.get_num_threads() == saved


def test_tuner_keeps_two_threads_on_a_quiet_machine(monkeypatch):
    tuner, used, _ = run_steps(monkeypatch, {1: 0.2, 2: 0.12}, 12)
    assert tuner.chosen == 2 and used[-1] == 2
    # 1 thread is timed first (3 steps), then 2 threads win
    assert used[:3] == [1, 1, 1] and used.count(1) == 3
    tuner.close()


def test_tuner_follows_a_change_of_load(monkeypatch):
    clock = FakeClock({1: 0.2, 2: 0.12})
    monkeypatch.setattr(threads.time, "perf_counter", clock)
    tuner = ThreadTuner([1, 2], probe_interval=1.0)
    for _ in range(10):
        clock.step(tuner)
    assert tuner.chosen == 2
    clock.cost = {1: 0.6, 2: 5.0}  # another process starts
    for _ in range(20):
        clock.step(tuner)
    assert tuner.chosen == 1 and tuner.switches == 2
    tuner.close()


def test_fixed_or_disabled_tuner_changes_nothing(monkeypatch):
    saved = torch.get_num_threads()
    tuner = ThreadTuner([1, 2], enabled=False)
    tuner.before_step()
    tuner.after_step()
    assert torch.get_num_threads() == saved and tuner.summary().startswith(f"{saved} thread")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert thread_choices(4) == [1]
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert thread_choices(2) == [1, 2] and thread_choices(1) == [1]


def test_a_single_given_count_is_used_and_restored():
    saved = torch.get_num_threads()
    other = 1 if saved != 1 else 2
    tuner = ThreadTuner([other])  # e.g. TrainingConfig(threads=...)
    assert not tuner.enabled and torch.get_num_threads() == other
    tuner.before_step()
    tuner.after_step()
    assert torch.get_num_threads() == other and tuner.summary().startswith(f"{other} thread")
    tuner.close()
    assert torch.get_num_threads() == saved


def test_flush_denormals_block():
    tiny = torch.tensor([1e-39], dtype=torch.float32)
    with flush_denormals():
        flushed = float(tiny * 1.0)
    assert float(tiny * 1.0) == float(tiny)  # restored after the block
    if torch.set_flush_denormal(False):  # the CPU supports it
        assert flushed == 0.0
