"""Which torch devices are available and which one a run uses."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """Devices usable here, best first (``cpu`` always)."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found + ["cpu"]


def select_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable explicit choice is an error."""
    if isinstance(device, torch.device):
        return device
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    found = available_devices()
    if device == "auto":
        return torch.device(found[0])
    if device not in found:
        raise ValueError(f"device {device!r} is not available here (found: {', '.join(found)})")
    return torch.device(device)
