"""Post-processing tuned on validation data and stored with the model."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.engine.predict import postprocess_settings, segment
from napari_unet.labels.instances import DEFAULT_MIN_SIZE
from napari_unet.labels.tuning import tune_postprocessing
from napari_unet.model.checkpoint import load_checkpoint, save_checkpoint
from napari_unet.progress import drain
from napari_unet.training.trainer import new_model


def _discs(shape=(64, 64), centres=((16, 16), (16, 44), (44, 30)), radius=7) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    return labels


def test_threshold_is_tuned_to_where_the_objects_are():
    truth = _discs()
    # a model whose foreground probability is only 0.35 inside the objects: 0.5 finds nothing
    fg = np.where(truth > 0, 0.35, 0.05).astype(np.float32)
    probs = np.stack([fg, np.zeros_like(fg)])
    result = tune_postprocessing([probs], [truth], "foreground_boundary", instances=True)
    assert result.settings["threshold"] < 0.35
    assert result.score == pytest.approx(1.0)
    assert result.default_score == 0.0


def test_min_size_removes_small_false_objects():
    truth = _discs()
    fg = np.where(truth > 0, 0.9, 0.0).astype(np.float32)
    fg[2:4, 60:62] = 0.9  # a 4-pixel speck the truth does not have
    fg[58:61, 2:5] = 0.9  # and a 9-pixel one
    probs = np.stack([fg, np.zeros_like(fg)])
    result = tune_postprocessing([probs], [truth], "foreground_boundary", instances=True)
    assert result.score == pytest.approx(1.0)
    assert result.settings["min_size"] > 9
    # without a minimum size the specks count as false positives
    loose = tune_postprocessing([probs], [truth], "foreground_boundary", instances=True)
    assert any(s["min_size"] == 0 and score < 1.0 for s, score in loose.tried)


def test_seed_threshold_splits_touching_objects():
    truth = _discs(centres=((32, 22), (32, 41)), radius=10)  # two discs that touch
    fg = (truth > 0).astype(np.float32) * 0.95
    boundary = np.zeros_like(fg)
    # a weak boundary between them (0.45): seeds split only when seed threshold < 0.45
    touching = (truth[:, 1:] != truth[:, :-1]) & (truth[:, 1:] > 0) & (truth[:, :-1] > 0)
    ys, xs = np.nonzero(touching)
    for dx in (-1, 0, 1, 2):
        boundary[ys, xs + dx] = 0.45
    probs = np.stack([fg, boundary])
    result = tune_postprocessing([probs], [truth], "foreground_boundary", instances=True)
    assert result.settings["seed_threshold"] < 0.45
    assert result.score == pytest.approx(1.0)


def test_binary_masks_tune_the_dice_threshold():
    truth = np.zeros((32, 32), bool)
    truth[8:24, 8:24] = True
    p = np.where(truth, 0.62, 0.0).astype(np.float32)[None]
    p[0, 4:8, 8:24] = 0.55  # a margin that is not membrane
    result = tune_postprocessing([p], [truth], "membranes", instances=False)
    assert result.settings == {"threshold": 0.6}
    assert result.score == pytest.approx(1.0)
    assert result.default_score < 1.0


def test_semantic_models_have_nothing_to_tune():
    probs = np.full((3, 8, 8), 1 / 3, np.float32)
    assert tune_postprocessing([probs], [np.zeros((8, 8), int)], "semantic", instances=True).settings == {}


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="one ground truth per"):
        tune_postprocessing([np.zeros((1, 4, 4))], [], "foreground", instances=True)


def test_stored_defaults_round_trip_and_are_used(tmp_path):
    model = new_model(2, "foreground", base_channels=4, depth=2)
    assert postprocess_settings(model) == (0.5, DEFAULT_MIN_SIZE, None)
    model.postprocess = {"threshold": 0.3, "min_size": 7, "seed_threshold": 0.2, "tuned_on": "test"}
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "m.pt"))
    assert loaded.postprocess["tuned_on"] == "test"
    assert postprocess_settings(loaded) == (0.3, 7, 0.2)
    # what the user sets wins
    assert postprocess_settings(loaded, 0.8, 0, 0.6) == (0.8, 0, 0.6)
    # a fine-tuned copy keeps the parent's defaults
    assert loaded.copy().postprocess == loaded.postprocess


def test_segment_uses_the_models_threshold():
    model = new_model(2, "foreground", base_channels=4, depth=2)
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    probs = drain(segment(image, model, output="probabilities", precision="fp32")).data[0]
    cut = float(np.median(probs))
    model.postprocess = {"threshold": cut, "min_size": 0}
    labels = drain(segment(image, model, output="labels", precision="fp32")).data
    assert labels.astype(bool).sum() == np.count_nonzero(probs > cut)
    override = drain(segment(image, model, output="labels", precision="fp32", threshold=0.999,
                             min_size=0)).data
    assert override.astype(bool).sum() == np.count_nonzero(probs > 0.999)


def test_old_checkpoints_without_postprocess_load(tmp_path):
    import torch

    model = new_model(2, "foreground", base_channels=4, depth=2)
    path = save_checkpoint(model, tmp_path / "old.pt")
    payload = torch.load(path, weights_only=True)
    payload["metadata"].pop("postprocess")
    torch.save(payload, path)
    assert load_checkpoint(path).postprocess == {}
