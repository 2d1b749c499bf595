"""Setting up a fine-tuning run from the dock's choices: which models can be fine-tuned, and
the :class:`~napari_unet.training.config.TrainingConfig` of the run."""

from __future__ import annotations

from typing import Any, Mapping

from napari_unet.model.checkpoint import CheckpointError
from napari_unet.training.config import TrainingConfig

#: the time limit of a run given neither a time limit nor an iteration count (seconds)
FALLBACK_TIME_LIMIT = 60.0
#: seconds between live previews
PREVIEW_INTERVAL = 3.0


def check_finetunable(model: Any, key: str) -> None:
    """Raise CheckpointError for a model napari-unet cannot fine-tune (a foreign Zoo model)."""
    if getattr(model, "foreign", False):
        raise CheckpointError(f"{key} is a Zoo model made elsewhere: napari-unet fine-tunes its "
                              "own UNets only (it can still segment)")


def finetune_config(*, iterations: int = 0, time_limit: float = 0.0, learning_rate: float = 0.0,
                    hold_out: bool = True, device: str = "auto", precision: str = "auto",
                    overrides: Mapping[str, Any] | None = None) -> TrainingConfig:
    """The config of a run. Zeros mean automatic (the dock's spin boxes): ``iterations`` 0 =
    by the time limit, ``time_limit`` 0 = none, ``learning_rate`` 0 = the fine-tuning default.
    ``hold_out`` False: nothing is held out for validation (the last weights are kept).
    ``overrides`` set further fields (batch_size, patch_shape, …). Without a time limit and an
    iteration count the run stops after :data:`FALLBACK_TIME_LIMIT` seconds."""
    config = TrainingConfig(
        iterations=iterations or None,
        time_limit=float(time_limit) or None,
        learning_rate=learning_rate or None,
        validation_fraction=None if hold_out else 0.0,
        device=device,
        precision=precision,
        preview_image=None, preview_interval=PREVIEW_INTERVAL)
    for name, value in (overrides or {}).items():
        setattr(config, name, value)
    if config.iterations is None and config.time_limit is None:
        config.time_limit = FALLBACK_TIME_LIMIT
    return config
