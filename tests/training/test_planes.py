"""Corrections in any plane: training targets, masks and held-out parts of y and x slices."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.labels.slices import planes_mask
from napari_unet.training.config import TrainingConfig, TrainingPair
from napari_unet.training.holdout import describe, validation_parts
from napari_unet.training.targets import annotation_mask, plane_targets, training_targets
from napari_unet.training.trainer import Trainer, new_model

TINY = dict(base_channels=4, depth=2)


def balls(shape=(16, 32, 32), n=10, radius=5, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.indices(shape)
    labels = np.zeros(shape, np.uint16)
    for i in range(1, n + 1):
        centre = [rng.integers(radius, s - radius) for s in shape]
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
        labels[inside & (labels == 0)] = i
    image = (labels > 0) * 100.0 + rng.normal(10, 5, shape)
    return image.astype(np.float32), labels


def config(**kwargs):
    return TrainingConfig(**{"iterations": 1, "batch_size": 2, "device": "cpu",
                             "validation_fraction": 0, **kwargs})


def other_ids(truth):
    """The same objects with other ids and merged neighbours (as a prediction would be)."""
    out = np.where(truth > 0, (truth * 7) % 5 + 1, 0).astype(np.uint16)
    return out


@pytest.mark.parametrize("task", ["foreground_boundary", "membranes"])
def test_a_y_slice_trains_a_3d_model_on_exactly_that_plane(task):
    image, truth = balls()
    trainer = Trainer(new_model(3, task, **TINY), [TrainingPair(image, truth, slices=[(1, 12)])],
                      config())
    item = trainer._items[0]
    expected = np.zeros(truth.shape, bool)
    expected[:, 12, :] = True
    assert np.array_equal(item.mask[:16, :32, :32], expected)
    # the targets of the plane are those of the plane on its own, 0 elsewhere
    plane = training_targets(truth[:, 12, :], task)
    assert np.array_equal(item.target[:, :16, 12, :32], plane)
    assert not item.target[:, :16, :12].any() and not item.target[:, :16, 13:32].any()
    assert trainer._summary["images"][0]["slices"] == [[1, 12]]


def test_plane_targets_do_not_depend_on_the_labels_outside_the_planes():
    _, truth = balls()
    planes = [4, (1, 12), (2, 20)]
    # outside the corrected planes the labels are a prediction with other ids
    pasted = other_ids(truth)
    mask = planes_mask(truth.shape, planes)
    pasted[mask] = truth[mask]
    a, _ = plane_targets(truth, "foreground_boundary", planes)
    b, _ = plane_targets(pasted, "foreground_boundary", planes)
    assert np.array_equal(a, b)
    # targets from the whole stack would differ there (the check can fail)
    assert not np.array_equal(training_targets(truth, "foreground_boundary")[:, mask],
                              training_targets(pasted, "foreground_boundary")[:, mask])
    # each plane's boundaries are its own, away from the other planes
    x_plane = training_targets(truth[:, :, 20], "foreground_boundary")
    away = np.ones(truth.shape[:2], bool)
    away[4, :] = False
    away[:, 12] = False
    assert np.array_equal(a[:, :, :, 20][:, away], x_plane[:, away])
    assert not a[:, ~mask].any()


def test_mixed_planes_mask_is_their_union():
    _, truth = balls()
    pair = TrainingPair(truth, truth, slices=[3, ("y", 12), (2, 30), (0, 9)])
    mask = annotation_mask(pair)
    expected = np.zeros(truth.shape, bool)
    expected[[3, 9]] = True
    expected[:, 12] = True
    expected[:, :, 30] = True
    assert np.array_equal(mask, expected)


@pytest.mark.parametrize("slices,message", [([(1, 40)], "y 40 is outside the stack"),
                                            ([(3, 1)], "axis 3"), ([("w", 1)], "unknown axis"),
                                            ([40], "slices [40] outside")])
def test_bad_planes_are_clear_errors(slices, message):
    image, truth = balls()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Trainer(new_model(3, "foreground", **TINY), [TrainingPair(image, truth, slices=slices)],
                config())


def test_a_2d_model_trains_on_y_and_x_slices_as_images():
    image, truth = balls((20, 32, 24))
    trainer = Trainer(new_model(2, "foreground_boundary", **TINY),
                      [TrainingPair(image, truth, slices=[5, (1, 10), (2, 7)])], config())
    sources = [it.source for it in trainer._items]
    assert sources == [(0, 5), (0, (1, 10)), (0, (2, 7))]
    y_item = trainer._items[1]
    assert y_item.mask is None or y_item.mask[:20, :24].all()
    expected = training_targets(truth[:, 10, :], "foreground_boundary")
    assert np.array_equal(y_item.target[:, :20, :24], expected)
    x_item = trainer._items[2]
    assert np.array_equal(x_item.target[:, :20, :32],
                          training_targets(truth[:, :, 7], "foreground_boundary"))


def test_a_2d_model_refuses_a_plane_too_thin_to_be_an_image():
    image, truth = balls((6, 32, 32), radius=2)
    with pytest.raises(ValueError, match="y 10 is 6 x 32 pixels"):
        Trainer(new_model(2, "foreground", **TINY), [TrainingPair(image, truth, slices=[(1, 10)])],
                config())


def test_planes_are_held_out_and_described():
    image, truth = balls((16, 32, 32))
    planes = [2, (1, 4), (1, 5), (1, 20), (2, 9)]
    trainer = Trainer(new_model(3, "foreground_boundary", **TINY),
                      [TrainingPair(image, truth, slices=planes)],
                      config(validation_fraction=None, validation_gap=1))
    # runs along each axis: z 2 | y 4-5 | y 20 | x 9
    assert trainer.keeps_best
    item = trainer._val_items[0]
    held = item.valid[:16, :32, :32]
    trained = item.mask[:16, :32, :32]
    union = planes_mask(truth.shape, planes)
    assert np.array_equal(held | trained, union)
    assert not (held & trained).any()
    # what is held out is whole planes, named in the message
    message = trainer.validation_message
    names = {"slice 2": [2], "y 4-5": [(1, 4), (1, 5)], "y 20": [(1, 20)], "x 9": [(2, 9)]}
    chosen = [name for name in names if f"{name} of image 1" in message]
    assert chosen
    assert np.array_equal(held, planes_mask(truth.shape, sum((names[n] for n in chosen), [])))


def test_validation_parts_group_planes_by_axis():
    image, truth = balls((16, 32, 32))
    trainer = Trainer(new_model(3, "foreground", **TINY),
                      [TrainingPair(image, truth, slices=[(1, 4), (1, 5), 7, (2, 9), (2, 30)])],
                      config())
    parts = validation_parts(trainer._items, gap=1)
    assert [describe(trainer._items, part) for part in parts] == [
        "slice 7 of image 1", "y 4-5 of image 1", "x 9 of image 1", "x 30 of image 1"]


def test_weight_maps_of_planes():
    image, truth = balls()
    trainer = Trainer(new_model(3, "foreground_boundary", **TINY),
                      [TrainingPair(image, truth, slices=[3, (1, 12)])], config(loss="boundary_bce"))
    weights = trainer._items[0].weight_map[:16, :32, :32]
    # weights are made on the planes: the gaps between objects of the y plane weigh more
    assert weights[:, 12].max() > 1.5
    # and off the planes (y 11 away from z 3) nothing is weighted
    assert np.all(np.delete(weights[:, 11], 3, axis=0) == 1)
    assert weights[3, 11].max() > 1.5


def test_validation_counts_objects_within_a_held_out_y_plane():
    from napari_unet.training.sampling import _Item
    from napari_unet.training.validation import object_counts

    labels = np.zeros((12, 20, 30), np.uint16)
    labels[2:10, 4:16, 3:9] = 1
    labels[2:10, 4:16, 12:20] = 2
    labels[2:10, 4:16, 23:28] = 3
    valid = np.zeros(labels.shape, bool)
    valid[:, 10] = True  # the y plane 10 is held out
    item = _Item(image=np.zeros(labels.shape, np.float32), target=np.zeros((1, *labels.shape), np.uint8),
                 mask=None, valid=valid, labels=np.where(valid, labels, 0))
    perfect = (labels > 0).astype(np.float32)[None]
    assert list(object_counts(item, perfect, "foreground", min_size=1)) == [3, 3, 3]
    merged = perfect.copy()
    merged[0, 2:10, 4:16, 9:12] = 1  # objects 1 and 2 touch: one predicted object
    assert list(object_counts(item, merged, "foreground", min_size=1)) == [1, 2, 3]
