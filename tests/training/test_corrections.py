"""Training data from corrections: snapshots of the corrected slices, notes, hold-out, rows."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.training.config import TrainingPair
from napari_unet.training.corrections import (
    WHOLE_IMAGE_ROW,
    CorrectionSource,
    corrected_rows,
    correction_pair,
    gather_training_pairs,
    is_lazy,
    parts,
    slices_to_train,
    snapshot_labels,
    suggestion_rows,
    validation_expected,
    with_slice,
)


def _stack(n: int = 6) -> np.ndarray:
    labels = np.zeros((n, 8, 8), np.uint16)
    for z in range(n):
        labels[z, 2:5, 2:5] = z + 1
    return labels


def test_snapshot_copies_only_the_corrected_slices():
    labels = _stack()
    snap = snapshot_labels(labels, [1, 4, 99])
    assert not np.shares_memory(snap, labels) and snap.dtype == labels.dtype
    np.testing.assert_array_equal(snap[[1, 4]], labels[[1, 4]])
    assert not snap[[0, 2, 3, 5]].any()
    whole = snapshot_labels(labels, None)
    np.testing.assert_array_equal(whole, labels)
    assert not np.shares_memory(whole, labels)


def test_a_lazy_array_is_kept_as_it_is():
    da = pytest.importorskip("dask.array")
    lazy = da.zeros((4, 8, 8), dtype=np.uint8)
    assert is_lazy(lazy) and not is_lazy(np.zeros(3))
    assert snapshot_labels(lazy, [1]) is lazy


def test_slices_to_train():
    assert slices_to_train(3, [2, 5], True) == [2, 5]
    assert slices_to_train(3, [], True) is None
    assert slices_to_train(3, [2, 5], False) is None
    assert slices_to_train(2, [2, 5], True) is None


def test_pairs_and_notes():
    labels = _stack()
    image = np.zeros(labels.shape, np.float32)
    marked = CorrectionSource(image=image, labels=labels, name="stack labels", corrected=[2, 5])
    pair, note = correction_pair(marked, corrected_only=True)
    assert isinstance(pair, TrainingPair) and pair.image is image
    assert list(pair.slices) == [2, 5] and note == "stack labels: 2 corrected slice(s)"
    unmarked = CorrectionSource(image=image, labels=labels, name="other")
    pair, note = correction_pair(unmarked, corrected_only=True)
    assert pair.slices is None and "no corrected slices in 'other'" in note
    np.testing.assert_array_equal(pair.labels, labels)
    flat = CorrectionSource(image=image[0], labels=labels[0], name="flat", corrected=[1])
    pairs, notes = gather_training_pairs([marked, flat, unmarked], corrected_only=True)
    assert len(pairs) == 3 and len(notes) == 2  # 2D labels: no note
    pairs, notes = gather_training_pairs([marked], corrected_only=False)
    assert pairs[0].slices is None and notes == []
    with pytest.raises(ValueError, match="no training data"):
        gather_training_pairs([])


def test_parts_and_validation_expected():
    stack = _stack()
    one = TrainingPair(image=stack, labels=stack, slices=[3])
    three = TrainingPair(image=stack, labels=stack, slices=[1, 3, 5])
    whole = TrainingPair(image=stack, labels=stack)
    flat = TrainingPair(image=stack[0], labels=stack[0])
    assert [parts(p) for p in (one, three, whole, flat)] == [1, 3, 6, 1]
    assert not validation_expected([one])
    assert validation_expected([three]) and validation_expected([one, flat])
    assert not validation_expected([three], hold_out=False)
    assert not validation_expected([flat])


def test_list_rows():
    assert with_slice([3, 1], 5) == {1, 3, 5}
    assert corrected_rows(2, [1]) == [(WHOLE_IMAGE_ROW, None)]
    assert corrected_rows(3, [1, 4]) == [("z 1", 1), ("z 4", 4)]
    # slices seen along y and x: (axis, index), listed after the z slices
    assert with_slice([3, (1, 40)], (2, 7)) == {3, (1, 40), (2, 7)}
    assert corrected_rows(3, [(2, 7), 12, (1, 40)]) == [("z 12", 12), ("y 40", (1, 40)),
                                                        ("x 7", (2, 7))]
    rows = suggestion_rows([(7, 0.51234), (2, 0.25)], corrected=[2])
    assert rows == [("slice 7 · score 0.512", 7), ("slice 2 · score 0.250  (corrected)", 2)]
