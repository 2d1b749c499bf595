"""Precision policy: what ``auto`` picks per device, and the exact fp32 mode."""

from __future__ import annotations

import pytest
import torch

from napari_unet.model import precision
from napari_unet.model.precision import PRECISIONS, prepare_batch, resolve_precision


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend this CPU has (or lacks) native bf16."""

    def set_flags(native: bool) -> None:
        precision.cpu_has_native_bf16.cache_clear()
        monkeypatch.setattr(precision, "_cpu_flags",
                            lambda: {"avx512f", "avx512_bf16"} if native else {"avx2"})
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True,
                            raising=False)

    yield set_flags
    precision.cpu_has_native_bf16.cache_clear()


def test_auto_on_cpu_follows_native_bf16(cpu_with):
    cpu_with(True)
    policy = resolve_precision("auto", "cpu")
    assert policy.name == "bf16" and policy.dtype == torch.bfloat16
    assert policy.label() == "bf16 (auto: native bf16 CPU)"
    cpu_with(False)
    policy = resolve_precision("auto", "cpu")
    assert policy.name == "fp32" and policy.dtype is None and policy.exact
    assert "no native bf16" in policy.label()


def test_unreadable_cpu_flags_fall_back_to_timing(monkeypatch):
    precision.cpu_has_native_bf16.cache_clear()
    monkeypatch.setattr(precision, "_cpu_flags", lambda: None)
    monkeypatch.setattr(precision, "_bf16_conv_is_faster", lambda: True)
    try:
        assert precision.cpu_has_native_bf16()
    finally:
        precision.cpu_has_native_bf16.cache_clear()


def test_explicit_choices_on_cpu():
    assert resolve_precision("fp32", "cpu").name == "fp32"
    assert resolve_precision("bf16", "cpu").dtype == torch.bfloat16
    assert resolve_precision("fp16", "cpu").dtype == torch.float16
    assert not resolve_precision("fp16", "cpu").needs_grad_scaler  # only fp16 on CUDA needs one
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8", "cpu")
    assert set(PRECISIONS) == {"auto", "fp32", "bf16", "fp16"}


def test_cuda_auto_is_bf16_or_fp16_with_a_grad_scaler(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda").name == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    policy = resolve_precision("auto", "cuda")
    assert policy.name == "fp16" and policy.needs_grad_scaler
    with pytest.raises(ValueError, match="no bf16 support"):
        resolve_precision("bf16", "cuda")


def test_mps_runs_fp32():
    assert resolve_precision("auto", "mps").name == "fp32"
    with pytest.raises(ValueError, match="MPS"):
        resolve_precision("bf16", "mps")


def test_autocast_runs_in_the_policy_dtype():
    conv = torch.nn.Conv2d(1, 2, 3)
    x = torch.randn(1, 1, 8, 8)
    with resolve_precision("bf16", "cpu").autocast():
        assert conv(x).dtype == torch.bfloat16
    with resolve_precision("fp32", "cpu").autocast():
        assert conv(x).dtype == torch.float32


def test_batches_take_the_channels_last_layout():
    policy = resolve_precision("fp32", "cpu")
    batch2d = prepare_batch(torch.randn(2, 3, 8, 8), policy)
    assert batch2d.is_contiguous(memory_format=torch.channels_last)
    batch3d = prepare_batch(torch.randn(2, 3, 4, 8, 8), policy)
    assert batch3d.is_contiguous(memory_format=torch.channels_last_3d)
    gpu_fp32 = precision.PrecisionPolicy("fp32", "cuda", channels_last=False)
    assert prepare_batch(torch.randn(2, 3, 8, 8), gpu_fp32).is_contiguous()
