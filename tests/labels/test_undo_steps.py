"""Undo steps as data: sizes, trimming of a long history, which steps are the user's edits."""

from __future__ import annotations

import numpy as np

from napari_unet.labels.undo_steps import (
    NAPARI_STEP,
    Patch,
    Swap,
    is_user_edit,
    trim_steps,
)


def _patch(nbytes: int, name: str = "Merge") -> Patch:
    half = np.zeros(nbytes // 2, np.uint8)
    return Patch((slice(0, 1),), half, half.copy(), name)


def test_sizes():
    assert _patch(100).nbytes == 100
    assert Swap(None, np.zeros(30, np.uint16), "Segment").nbytes == 60
    assert Swap(None, None, "Segment").nbytes == 0  # type: ignore[arg-type]


def test_trim_by_count_and_by_bytes_keeps_the_newest():
    steps = [NAPARI_STEP] * 10
    trim_steps(steps, max_steps=4)
    assert len(steps) == 4
    steps = [_patch(100, "a"), NAPARI_STEP, _patch(100, "b"), _patch(100, "c")]
    trim_steps(steps, max_steps=50, max_bytes=250)
    assert [getattr(s, "description", s) for s in steps] == [NAPARI_STEP, "b", "c"]
    steps = [_patch(100, "a"), _patch(1000, "big")]
    trim_steps(steps, max_steps=50, max_bytes=10)
    assert [s.description for s in steps] == ["big"]  # the newest stays, whatever its size


def test_user_edits():
    assert is_user_edit(NAPARI_STEP)
    assert is_user_edit(_patch(10))
    assert is_user_edit(Swap(None, np.zeros(1), "Fill holes"))
    assert not is_user_edit(Swap(None, np.zeros(1), "Segment (tiny v1)"))
