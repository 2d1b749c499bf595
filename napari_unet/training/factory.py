"""Untrained models: :func:`new_model` (version 0, to be trained)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from napari_unet.model.checkpoint import TASKS, SegmentationModel, expected_channels
from napari_unet.model.config import UNetConfig
from napari_unet.model.unet import UNet, init_weights


def new_model(spatial_dims: int, task: str, class_names: list[str] | None = None, *,
              base_channels: int = 16, depth: int = 4, norm: str = "batch",
              inplane_only_levels: Sequence[int] = (), name: str = "model",
              normalization: dict[str, Any] | None = None,
              voxel_size: Sequence[float] | None = None, description: str = "",
              architecture: str = "unet", init: str = "kaiming",
              deep_supervision: bool = False) -> SegmentationModel:
    """An untrained model (version 0) for ``task``; training it gives version 1.

    ``architecture`` is one of :data:`napari_unet.models.ARCHITECTURES`; ``init`` the weight
    initialisation (:func:`napari_unet.models.init_weights`); ``deep_supervision`` (unetpp)
    trains every nested head. The weights are drawn with seed 0, the global torch random
    state is left as it was."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if class_names is None:
        class_names = ["background", "class_1"] if task == "semantic" else ["background", "foreground"]
    if task == "semantic" and len(class_names) < 2:
        raise ValueError("a semantic model needs at least two classes (background and one more)")
    config = UNetConfig(spatial_dims=spatial_dims, in_channels=1,
                        out_channels=expected_channels(task, len(class_names)),
                        base_channels=base_channels, depth=depth, norm=norm,
                        inplane_only_levels=tuple(inplane_only_levels),
                        architecture=architecture, deep_supervision=deep_supervision)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    network = init_weights(UNet(config), init)
    torch.random.set_rng_state(torch_state)
    return SegmentationModel(
        network=network, task=task, name=name, version=0, parent=None,
        class_names=list(class_names),
        normalization=dict(normalization or {"mode": "percentile", "low": 1.0, "high": 99.8}),
        voxel_size=None if voxel_size is None else [float(v) for v in voxel_size],
        description=description)
