"""Weight snapshots, their finiteness, and the trained model with its history entry."""

from __future__ import annotations

import copy
import datetime as _dt
import math
from typing import TYPE_CHECKING

import torch

from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.model.unet import UNet
from napari_unet.training.augment import preset_name

if TYPE_CHECKING:
    from napari_unet.training.trainer import Trainer


def clone_state(network: UNet) -> dict[str, torch.Tensor]:
    """A CPU copy of ``network``'s weights and buffers."""
    return {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}


def finite_state(source: UNet | dict[str, torch.Tensor]) -> bool:
    """True when every floating-point weight and buffer is finite."""
    state = source.state_dict() if isinstance(source, torch.nn.Module) else source
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def finite(value: float | None) -> float | None:
    """``value`` rounded to 5 decimals for the history; None when missing or not finite."""
    if value is None or not math.isfinite(float(value)):
        return None
    return round(float(value), 5)


def eval_model(parent: SegmentationModel, network: UNet) -> SegmentationModel:
    """A model with ``parent``'s metadata and a CPU snapshot of ``network``'s weights."""
    meta = copy.deepcopy(parent.metadata())
    snapshot = UNet(network.config)
    snapshot.load_state_dict(clone_state(network))
    return SegmentationModel(network=snapshot, **meta)


def build_result(trainer: Trainer, state: dict[str, torch.Tensor], final: bool) -> SegmentationModel:
    """The trained model: ``state`` as weights, the next version of the trainer's model,
    with a history entry of the run (``complete``: ``final``)."""
    parent, config = trainer.parent, trainer.config
    network = UNet(parent.network.config)
    network.load_state_dict(state)
    network.eval()
    meta = copy.deepcopy(parent.metadata())
    meta["version"] = parent.version + 1
    meta["parent"] = parent.label if trainer.fine_tune else None
    progress = trainer._state
    entry = {
        "kind": "fine-tune" if trainer.fine_tune else "train",
        "iterations": int(progress["iteration"]),
        "seconds": round(float(progress["seconds"]), 1),
        "final_loss": finite(progress["loss"]),
        "best_score": finite(trainer._best_score),
        "start_score": finite(trainer.start_score),
        "kept": trainer.kept if final else ("best" if trainer.keeps_best else "last"),
        "decision": trainer.decision if final else "",
        "threads": trainer.threads_message,
        "best_iteration": trainer.best_iteration,
        "validation": trainer.validation_message,
        "learning_rate": trainer.learning_rate,
        "batch_size": int(trainer.batch_size),
        "loss": config.loss,
        "accumulate_steps": int(config.accumulate_steps),
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "patch_shape": [int(p) for p in trainer.patch_shape],
        "augment": bool(config.augment),
        "augment_preset": preset_name(config.augment_settings) if config.augment else None,
        "device": trainer.device.type,
        "data": copy.deepcopy(trainer._summary),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": bool(final),
    }
    meta["history"] = list(meta.get("history", [])) + [entry]
    return SegmentationModel(network=network, **meta)
