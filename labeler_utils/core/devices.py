"""Where and in which precision models run: the device, and the half precision a GPU computes in."""

from __future__ import annotations

import torch

#: Compute precisions a labeler can run in; "auto" is the GPU's half precision with CUDA (bfloat16 from Ampere on,
#: float16 before) and float32 elsewhere.
PRECISIONS = ("auto", "float32", "bfloat16")


def gpu_half_precision() -> torch.dtype:
    """The 16-bit dtype the CUDA GPU computes natively: bfloat16 from compute capability 8.0 (Ampere) on, float16
    on older cards (T4, V100), where ``torch.cuda.is_bf16_supported()`` also counts bfloat16 emulated in float32."""
    major, _ = torch.cuda.get_device_capability()
    return torch.bfloat16 if major >= 8 else torch.float16


def default_dtype() -> torch.dtype:
    """The dtype a model is loaded in by default: the GPU's half precision with CUDA, float32 on a CPU."""
    return gpu_half_precision() if torch.cuda.is_available() else torch.float32


def resolve_dtype(precision: str) -> torch.dtype:
    """The torch dtype for a precision name (see :data:`PRECISIONS`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return default_dtype()
    return getattr(torch, precision)


def default_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
