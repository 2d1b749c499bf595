"""Numeric precision and memory layout used to run a network on a device.

``auto`` picks bf16 on CPUs with native bf16 instructions (AVX512-BF16 or AMX) and on CUDA GPUs
that support it, fp16 on older CUDA GPUs (with a gradient scaler in training) and exact fp32
everywhere else. ``fp32`` is always available and is the exact mode.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@dataclass(frozen=True)
class PrecisionPolicy:
    """What a job runs in: ``name`` is the resolved precision (``fp32``, ``bf16`` or ``fp16``).

    ``requested`` is what the user asked for and ``reason`` says why ``auto`` chose ``name``.
    """

    name: str
    device_type: str
    requested: str = "auto"
    reason: str = ""
    channels_last: bool = True

    @property
    def dtype(self) -> torch.dtype | None:
        """Autocast dtype, or ``None`` for exact fp32."""
        return _DTYPES.get(self.name)

    @property
    def exact(self) -> bool:
        return self.name == "fp32"

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling (bf16 has fp32's range)."""
        return self.name == "fp16" and self.device_type == "cuda"

    def autocast(self) -> ContextManager[Any]:
        """Context manager running the enclosed forward pass in this precision."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def memory_format(self, spatial_dims: int) -> torch.memory_format:
        """Layout for a network and its batches: channels-last where it is faster."""
        if not self.channels_last:
            return torch.contiguous_format
        return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d

    def label(self) -> str:
        """Short text for a progress line or a dock, e.g. ``bf16 (auto: native bf16 CPU)``."""
        if self.requested == "auto" and self.reason:
            return f"{self.name} (auto: {self.reason})"
        return self.name


def _cpu_flags() -> set[str] | None:
    """CPU feature flags from ``/proc/cpuinfo`` (Linux), or ``None`` where that is unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def _bf16_conv_is_faster() -> bool:
    """Time a small conv in fp32 and bf16 autocast: fallback where CPU flags are unreadable."""
    conv = torch.nn.Conv2d(32, 32, 3, padding=1).eval()
    x = torch.randn(1, 32, 96, 96)

    def timed(context: ContextManager[Any]) -> float:
        with torch.inference_mode(), context:
            conv(x)  # warm-up
            start = time.perf_counter()
            for _ in range(3):
                conv(x)
            return time.perf_counter() - start

    fp32 = timed(contextlib.nullcontext())
    bf16 = timed(torch.autocast("cpu", dtype=torch.bfloat16))
    return bf16 < 0.8 * fp32


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), detected once per process."""
    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if mkldnn_bf16 is not None and not mkldnn_bf16():
        return False
    flags = _cpu_flags()
    if flags is not None:
        return bool(flags & _CPU_BF16_FLAGS)
    return _bf16_conv_is_faster()


def _cuda_bf16_supported() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_precision(requested: str, device: torch.device | str) -> PrecisionPolicy:
    """The :class:`PrecisionPolicy` for ``requested`` (one of :data:`PRECISIONS`) on ``device``.

    Raises
    ------
    ValueError
        For an unknown name, or a precision the device cannot run (bf16 on a CUDA GPU without
        bf16, half precision on MPS).
    """
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if requested == "fp32":
        return PrecisionPolicy("fp32", kind, requested, channels_last=kind == "cpu")
    if kind == "mps":
        if requested != "auto":
            raise ValueError(f"{requested} is not supported on MPS here; use fp32 or auto")
        return PrecisionPolicy("fp32", kind, requested, "MPS runs fp32", channels_last=False)
    if kind == "cuda":
        if requested == "bf16" and not _cuda_bf16_supported():
            raise ValueError("this GPU has no bf16 support; use fp16, fp32 or auto")
        if requested == "auto":
            if _cuda_bf16_supported():
                return PrecisionPolicy("bf16", kind, requested, "GPU supports bf16")
            return PrecisionPolicy("fp16", kind, requested, "GPU without bf16")
        return PrecisionPolicy(requested, kind, requested)
    # CPU
    if requested == "auto":
        if cpu_has_native_bf16():
            return PrecisionPolicy("bf16", kind, requested, "native bf16 CPU")
        return PrecisionPolicy("fp32", kind, requested, "no native bf16 on this CPU")
    return PrecisionPolicy(requested, kind, requested)


def prepare_batch(batch: torch.Tensor, policy: PrecisionPolicy) -> torch.Tensor:
    """``batch`` in the memory layout the policy's network expects."""
    spatial_dims = batch.ndim - 2
    if spatial_dims not in (2, 3):
        return batch
    return batch.contiguous(memory_format=policy.memory_format(spatial_dims))
