"""The machine a measurement runs on: CPU, GPU, library versions, load, peak memory while timing, and
the share of its peak FLOP/s the single pass reaches (:func:`flops_report`).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..labeler import Labeler
from .cost import (
    attention_flops_per_pair,
    device_peak_tflops,
    estimate_cpu_peak_gflops,
    matmul_parameter_count,
    peak_fraction,
    prefill_flops_per_pair,
)

# ---------------------------------------------------------------------------------------------
# Machine, load and memory
# ---------------------------------------------------------------------------------------------


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages (other people's jobs share this machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


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


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_bytes(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except Exception:  # noqa: BLE001 - a process that went away has no memory
        return 0


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time a process has used (all threads, user + system; default: this one): unlike wall time, not slowed by
    other jobs. 0 for a process that went away."""
    pid = os.getpid() if pid is None else pid
    try:
        import psutil

        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    except Exception:  # noqa: BLE001
        return 0.0


def _is_stopped(pid: int) -> bool:
    try:
        import psutil

        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except Exception:  # noqa: BLE001
        return False


class PeakMemory:
    """Samples the resident memory of some processes in a thread; ``peak_mb`` is the largest sum seen.

    RSS is everything the process holds (weights, activations, Python), not only what labeling added.
    On CUDA the peak allocated device memory is recorded too.

    It also keeps ``stopped_seconds``: time during which a watched process was stopped by a signal
    (SIGSTOP, job control) — seen either as the process in
    state ``T`` or, for this process, as a gap of more than ``gap_seconds`` between two samples.
    That time is not labeling and is taken out of the throughput (and reported).
    """

    def __init__(self, pids: Sequence[int] | None = None, interval: float = 0.05, gap_seconds: float = 2.0):
        self.pids = list(pids) if pids else [os.getpid()]
        self.interval = interval
        self.gap_seconds = gap_seconds
        self.peak_mb = 0.0
        self.cuda_peak_mb: float | None = None
        self.stopped_seconds = 0.0
        self._last = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak_mb = max(self.peak_mb, sum(_rss_bytes(pid) for pid in self.pids) / 2**20)

    def _run(self) -> None:
        self._last = time.perf_counter()
        while not self._stop.wait(self.interval):
            now = time.perf_counter()
            elapsed, self._last = now - self._last, now
            if elapsed > self.gap_seconds:  # this process did not run at all for that long
                self.stopped_seconds += elapsed - self.interval
            elif any(_is_stopped(pid) for pid in self.pids if pid != os.getpid()):
                self.stopped_seconds += elapsed
            self._sample()

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        if torch.cuda.is_available():
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20


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
