"""Stated prices and device peaks, and the arithmetic of cost, ratios and FLOPs (pure functions)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------
# Stated prices and device peaks (assumptions: every number here is a parameter elsewhere)
# ---------------------------------------------------------------------------------------------

#: USD per million (input, output) tokens: list prices of hosted APIs (stated, not measured).
API_PRICES_PER_MILLION: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),  # OpenAI list price for gpt-4o (2024-08-06 and later snapshots)
    "gpt-4o-mini": (0.15, 0.60),
}
DEFAULT_API_MODEL = "gpt-4o"
#: USD per machine-hour (stated): on-demand prices of machines like the ones this runs on.
CPU_PRICE_PER_HOUR = 0.0765  # a 2-vCPU AMD EPYC (Milan) cloud instance, e.g. AWS c6a.large, us-east-1
GPU_PRICE_PER_HOUR = 3.00  # one H100 80GB rented by the hour (typical cloud price, 2025)
#: Stated throughput of a hosted GPT-4o-class teacher: 8 concurrent requests of ~2 s each
#: (about 1,100 prompt tokens and a short reasoned answer). Not measurable from this machine.
STATED_API_LABELS_PER_SECOND = 4.0

#: Dense (no sparsity) peak TFLOP/s in bf16/fp16 tensor-core math, from the vendors' data sheets.
DEVICE_PEAK_TFLOPS: dict[str, float] = {
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "L4": 121.0,
    "V100": 125.0,
    "T4": 65.0,
}

#: The targets this stage reports against (never asserted: they are what the numbers are read against).
TARGETS: dict[str, float] = {
    "single_pass_vs_naive_generate_speed": 20.0,
    "student_vs_teacher_speed": 17.0,
    "teacher_vs_student_cost": 19.0,
}


# ---------------------------------------------------------------------------------------------
# Arithmetic: cost, ratios, FLOPs (pure functions, tested on hand-computed numbers)
# ---------------------------------------------------------------------------------------------


def token_cost_per_1000(
    prompt_tokens_per_pair: float,
    completion_tokens_per_pair: float,
    price_in_per_million: float,
    price_out_per_million: float,
) -> float:
    """USD per 1,000 labels billed per token: ``1000 * (p * in + c * out) / 1e6``."""
    return (
        1000.0
        * (prompt_tokens_per_pair * price_in_per_million + completion_tokens_per_pair * price_out_per_million)
        / 1e6
    )


def machine_cost_per_1000(labels_per_second: float, price_per_hour: float) -> float:
    """USD per 1,000 labels on a machine rented by the hour: hours for 1,000 labels times the price."""
    if labels_per_second <= 0:
        return float("inf")
    return 1000.0 / labels_per_second / 3600.0 * price_per_hour


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def prefill_flops_per_pair(matmul_parameters: int, prompt_tokens: float) -> float:
    """Forward FLOPs of reading a prompt: ``2 * parameters * tokens`` (attention's own term left out)."""
    return 2.0 * matmul_parameters * prompt_tokens


def attention_flops_per_pair(layers: int, hidden_size: int, prompt_tokens: float) -> float:
    """Causal attention scores and mixing: ``2 * 2 * layers * hidden * T^2 / 2`` (QK^T and AV, half masked)."""
    return 2.0 * layers * hidden_size * prompt_tokens**2


def peak_fraction(flops_per_pair: float, labels_per_second: float, peak_tflops: float) -> float:
    """Achieved FLOP/s over the device's peak: ``flops * labels/s / (peak * 1e12)``."""
    return flops_per_pair * labels_per_second / (peak_tflops * 1e12)


def device_peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a known device from its name (e.g. ``NVIDIA H100 80GB HBM3``)."""
    name = device_name.upper()
    if "H100" in name:
        if "PCIE" in name:
            return DEVICE_PEAK_TFLOPS["H100 PCIe"]
        if "NVL" in name:
            return DEVICE_PEAK_TFLOPS["H100 NVL"]
        return DEVICE_PEAK_TFLOPS["H100 SXM"]
    for key in sorted(DEVICE_PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"\b{re.escape(key.upper())}\b", name):
            return DEVICE_PEAK_TFLOPS[key]
    return None


def matmul_parameter_count(model: Any) -> int:
    """Parameters that take part in a matrix product for every prompt token.

    The input embedding is a table lookup, and the vocabulary projection is applied at the last
    position only, so both are left out (for tied embeddings they are the same matrix).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings().weight
    output = base.get_output_embeddings().weight if base.get_output_embeddings() is not None else None
    skip = {embedding.data_ptr()} | ({output.data_ptr()} if output is not None else set())
    return sum(p.numel() for p in base.parameters() if p.data_ptr() not in skip)


def estimate_cpu_peak_gflops(cores: int | None = None, ghz: float | None = None) -> float | None:
    """Rough fp32 peak of this CPU: cores x GHz x FLOPs/cycle (32 with AVX2+FMA, 64 with AVX-512).

    The frequency comes from ``/proc/cpuinfo`` (``cpu MHz``, else BogoMIPS / 2); a stated estimate.
    """
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set(re.search(r"^flags\s*:\s*(.*)$", info, re.MULTILINE).group(1).split()) if "flags" in info else set()
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16
    if ghz is None:
        mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", info, re.MULTILINE)
        bogo = re.search(r"^bogomips\s*:\s*([0-9.]+)", info, re.MULTILINE | re.IGNORECASE)
        ghz = float(mhz.group(1)) / 1000 if mhz else float(bogo.group(1)) / 2000 if bogo else None
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not ghz or not cores:
        return None
    return cores * ghz * per_cycle
