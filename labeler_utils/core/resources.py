"""What a process costs while it runs: CPU time, peak resident memory, load average, time stopped by a signal."""

from __future__ import annotations

import os
import resource
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages (other people's jobs share this machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


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
