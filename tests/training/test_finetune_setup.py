"""A fine-tuning run's config from the dock's choices."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from napari_unet.model.checkpoint import CheckpointError
from napari_unet.training.finetune_setup import (
    FALLBACK_TIME_LIMIT,
    PREVIEW_INTERVAL,
    check_finetunable,
    finetune_config,
)


def test_zeros_are_automatic():
    config = finetune_config(iterations=0, time_limit=0, learning_rate=0.0)
    assert config.iterations is None and config.learning_rate is None
    assert config.time_limit == FALLBACK_TIME_LIMIT == 60.0  # neither limit: a minute
    assert config.validation_fraction is None  # automatic hold-out
    assert config.preview_image is None and config.preview_interval == PREVIEW_INTERVAL


def test_choices_and_overrides():
    config = finetune_config(iterations=3, time_limit=0, learning_rate=1e-4, hold_out=False,
                             device="cpu", precision="fp32",
                             overrides={"batch_size": 2, "patch_shape": (32, 32)})
    assert config.iterations == 3 and config.time_limit is None
    assert config.learning_rate == 1e-4 and config.validation_fraction == 0.0
    assert config.device == "cpu" and config.precision == "fp32"
    assert config.batch_size == 2 and config.patch_shape == (32, 32)
    assert finetune_config(time_limit=5).time_limit == 5.0


def test_foreign_models_are_refused():
    check_finetunable(SimpleNamespace(), "tiny v1")
    with pytest.raises(CheckpointError, match="made elsewhere"):
        check_finetunable(SimpleNamespace(foreign=True), "zoo v1")
