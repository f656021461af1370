"""The machine a measurement runs on: CPU, GPU, library versions, load, peak memory while timing, and
the share of its peak FLOP/s the single pass reaches (:func:`flops_report`).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..core.resources import load_average
from ..students.base import Labeler
from .cost import (
    attention_flops_per_pair,
    device_peak_tflops,
    estimate_cpu_peak_gflops,
    matmul_parameter_count,
    peak_fraction,
    prefill_flops_per_pair,
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch threads, GPU (if any), library versions, date and load."""
    import transformers

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": load_average(),
        "cpu_peak_gflops_estimate": estimate_cpu_peak_gflops(),
        "gpu": None,
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        info["gpu"] = {
            "name": name,
            "count": torch.cuda.device_count(),
            "peak_tflops_bf16": device_peak_tflops(name),
            "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        }
    return info


# ---------------------------------------------------------------------------------------------
# FLOPs of the single pass against the machine's peak
# ---------------------------------------------------------------------------------------------


def flops_report(
    student: Labeler, prompt_tokens_per_pair: float, labels_per_second: float | None, peak_tflops: float | None = None
) -> dict[str, Any]:
    """FLOPs per pair of the single pass and the fraction of peak reached (device peak, or this CPU's estimate)."""
    config = student.transformer().config
    params = matmul_parameter_count(student.transformer())
    linear = prefill_flops_per_pair(params, prompt_tokens_per_pair)
    attention = attention_flops_per_pair(config.num_hidden_layers, config.hidden_size, prompt_tokens_per_pair)
    report: dict[str, Any] = {
        "matmul_parameters": params,
        "prompt_tokens_per_pair": prompt_tokens_per_pair,
        "prefill_gflops_per_pair": linear / 1e9,
        "attention_gflops_per_pair": attention / 1e9,
        "formula": "2 x matmul parameters x prompt tokens (attention reported separately)",
    }
    if labels_per_second:
        report["achieved_gflops_per_second"] = (linear + attention) * labels_per_second / 1e9
    if torch.cuda.is_available():
        peak = peak_tflops or device_peak_tflops(torch.cuda.get_device_name(0))
        report["device"] = torch.cuda.get_device_name(0)
    else:
        cpu_peak = estimate_cpu_peak_gflops()
        peak = peak_tflops or (cpu_peak / 1000 if cpu_peak else None)
        report["device"] = f"CPU {cpu_model()} (fp32 peak estimated from flags and clock)"
    report["peak_tflops"] = peak
    if peak and labels_per_second:
        report["fraction_of_peak"] = peak_fraction(linear + attention, labels_per_second, peak)
    return report
