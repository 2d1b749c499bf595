"""Fixtures for the GUI tests: tiny models saved to tmp, a clean model registry, notifications."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_unet.model.checkpoint import SegmentationModel, save_checkpoint
from napari_unet.model.config import UNetConfig
from napari_unet.model.unet import UNet

pytestmark = pytest.mark.gui


def make_tiny_model(spatial_dims: int = 2, task: str = "foreground", seed: int = 0,
                    in_channels: int = 1, name: str = "tiny") -> SegmentationModel:
    torch.manual_seed(seed)
    out = 2 if task == "foreground_boundary" else 1
    network = UNet(UNetConfig(spatial_dims=spatial_dims, in_channels=in_channels,
                              out_channels=out, base_channels=4, depth=2))
    network.eval()
    return SegmentationModel(network=network, task=task, name=name)


def blobs(shape: tuple[int, ...], n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with round bright objects, and its instance labels."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape)
    labels = np.zeros(shape, dtype=np.uint16)
    for k in range(1, n + 1):
        centre = [rng.uniform(0.2, 0.8) * s for s in shape]
        radius = rng.uniform(0.08, 0.14) * min(shape[-2:])
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
        labels[(dist < radius) & (labels == 0)] = k
    image = (labels > 0) * 200.0 + rng.normal(20, 10, shape)
    return image.astype(np.float32), labels


@pytest.fixture
def registry():
    from napari_unet._widgets._state import get_registry

    reg = get_registry()
    reg.reset()
    yield reg
    reg.reset()


@pytest.fixture
def model_2d_path(tmp_path: Path) -> Path:
    return save_checkpoint(make_tiny_model(2), tmp_path / "tiny2d.pt")


@pytest.fixture
def model_3d_path(tmp_path: Path) -> Path:
    return save_checkpoint(make_tiny_model(3, name="tiny3d"), tmp_path / "tiny3d.pt")


@pytest.fixture
def notifications(monkeypatch):
    """Messages shown with napari's notifications: list of (severity, message)."""
    from napari.utils import notifications as module

    seen: list[tuple[str, str]] = []

    def capture(severity: str):
        def show(message, *args, **kwargs):
            seen.append((severity, str(message)))
        return show

    for name, severity in (("show_error", "error"), ("show_warning", "warning"),
                           ("show_info", "info")):
        monkeypatch.setattr(module, name, capture(severity))
    return seen


def wait_idle(qtbot, widget, timeout: int = 60_000) -> None:
    """Wait until the dock's worker is done (its finished signal has been handled)."""
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


def click(qtbot, widget, text: str) -> None:
    """Click the dock's button labelled ``text`` like a user."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QPushButton

    matches = [b for b in widget.findChildren(QPushButton) if b.text() == text]
    assert matches, f"no button {text!r} in {type(widget).__name__}"
    assert matches[0].isEnabled(), f"button {text!r} is disabled"
    qtbot.mouseClick(matches[0], Qt.LeftButton)
