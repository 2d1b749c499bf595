"""Shared fixtures: tiny networks with non-trivial batch-norm statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_unet.model.checkpoint import SegmentationModel
from napari_unet.model.config import UNetConfig
from napari_unet.model.unet import UNet

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"


def randomize_batch_norm(network: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every batch norm running statistics and affine parameters far from identity."""
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
    return network


def tiny_model(spatial_dims: int = 2, *, depth: int = 3, base: int = 4, task: str = "foreground",
               seed: int = 0, **config) -> SegmentationModel:
    torch.manual_seed(seed)
    class_names = config.pop("class_names", None)
    out_channels = {"foreground": 1, "membranes": 1, "foreground_boundary": 2}.get(
        task, len(class_names or []))
    network = UNet(UNetConfig(spatial_dims=spatial_dims, out_channels=out_channels,
                              base_channels=base, depth=depth, **config))
    randomize_batch_norm(network, seed)
    network.eval()
    extra = {"class_names": class_names} if class_names else {}
    return SegmentationModel(network=network, task=task, name="tiny", **extra)


@pytest.fixture(autouse=True)
def _settings_in_a_tmp_folder(tmp_path_factory, monkeypatch):
    """Every test starts with no saved settings or journals and never touches the user's own."""
    monkeypatch.setenv("NAPARI_UNET_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))
    monkeypatch.setenv("NAPARI_UNET_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def needs_shared_data(*parts: str):
    """Skip unless ../shared/data/<parts> exists (only on the project's own machines)."""
    path = SHARED_DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"needs {path} (project machines only)")
