#!/usr/bin/env python
"""The embedded llama.cpp server on a shared CPU: old thread settings against new, quiet and contended.

Times a fixed small batch of real chat completions (stage 04 rubric prompts, grade only, over demo
corpus documents) against the embedded server (``LocalLLMServer``), for each server setting:

  * old: one thread per core (at most 8), OpenMP's default wait policy (threads spin at barriers);
  * new: threads that fit the free cores (``free_cpu_threads``), ``OMP_WAIT_POLICY=PASSIVE``;

first with nothing added, then with one competing CPU-bound process that this script spawns (a
Python busy loop). Each server is started afresh (so the new setting sees the load of the moment),
warmed up with one untimed request, and timed over ``--requests`` requests, stopping early once a
batch has taken ``--budget`` seconds. Every request is a real one (a fresh response cache per run).

Other people's jobs count too: the load average before the whole run and before each row is
printed, and each row gives the CPU the *other* processes used while it was timed (all busy CPU
time less the server's, the competitor's and this script's), in cores.

    .venv/bin/python bench/server_contention.py             # about 3-5 minutes on a 2-core machine
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labeler_utils.config import DEMO_CORPUS_DIR  # noqa: E402
from labeler_utils.documents import document_card, load_corpus, select_documents  # noqa: E402
from labeler_utils.llm_client import LLMClient, Message  # noqa: E402
from labeler_utils.local_server import LocalLLMServer, free_cpu_threads  # noqa: E402
from labeler_utils.teacher import build_messages  # noqa: E402
from labeler_utils.throughput.machine import cpu_model, load_average  # noqa: E402

BUSY_LOOP = "while True: pass"


@dataclass
class Row:
    """One timed batch."""

    setting: str
    threads: int
    wait_policy: str
    competitor: bool
    load_at_start: float
    other_cores: float
    requests: int
    seconds: float

    @property
    def per_request(self) -> float:
        return self.seconds / self.requests


def conversations(n: int, document_chars: int) -> list[list[Message]]:
    """``n`` grade-only rubric prompts: each demo document (round robin over types) with its title as the query."""
    documents = select_documents(load_corpus(DEMO_CORPUS_DIR), n + 1)
    return [build_messages(doc.title, document_card(doc, document_chars), reasoning=False) for doc in documents]


def busy_cpu_seconds() -> float:
    """CPU time all processes spent busy since boot (user, system and the rest; not idle or I/O wait)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def process_cpu_seconds(*pids: int) -> float:
    """User and system CPU time of these processes (one that is gone counts nothing)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def time_batch(
    setting: str,
    server: LocalLLMServer,
    batch: list[list[Message]],
    competitor: subprocess.Popen | None,
    budget: float,
    max_tokens: int,
) -> Row:
    """Warm up on the first conversation, then time the others one at a time (at most ``budget`` seconds)."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as cache:
        client = LLMClient(
            server.endpoint(), Path(cache) / "cache.sqlite", max_concurrency=1, max_retries=0, timeout=600
        )
        client.chat(batch[0], max_tokens=max_tokens)
        pids = [server._process.pid, os.getpid(), *([competitor.pid] if competitor else [])]
        busy_before, ours_before = busy_cpu_seconds(), process_cpu_seconds(*pids)
        start = time.perf_counter()
        done = 0
        for messages in batch[1:]:
            client.chat(messages, max_tokens=max_tokens)
            done += 1
            if time.perf_counter() - start > budget:
                break
        seconds = time.perf_counter() - start
        others = (busy_cpu_seconds() - busy_before) - (process_cpu_seconds(*pids) - ours_before)
    return Row(
        setting,
        server.n_threads,
        server.wait_policy or "OpenMP default",
        competitor is not None,
        load,
        max(0.0, others) / seconds,
        done,
        seconds,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="bundled model or .gguf (default: %(default)s)"
    )
    parser.add_argument("--requests", type=int, default=3, help="timed requests per batch (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=8, help="answer tokens per request (default: %(default)s)")
    parser.add_argument(
        "--document-chars", type=int, default=800, help="document text per prompt (default: %(default)s)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=40.0,
        help="stop a batch after the request that passes this many seconds (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    batch = conversations(args.requests, args.document_chars)
    old_threads = min(os.cpu_count() or 2, 8)
    settings = {"old": {"n_threads": old_threads, "wait_policy": None}, "new": {}}
    print(
        f"{cpu_model()}, {os.cpu_count()} logical cores, {len(os.sched_getaffinity(0))} usable; "
        f"load average before the run {load_average()}; free_cpu_threads() now {free_cpu_threads()}; "
        f"OMP_WAIT_POLICY in this environment: {os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        flush=True,
    )
    rows: list[Row] = []
    for contended in (False, True):
        competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if contended else None
        try:
            for name, options in settings.items():
                with LocalLLMServer(args.model, n_ctx=2048, **options) as server:
                    rows.append(time_batch(name, server, batch, competitor, args.budget, args.max_tokens))
                print(f"  {rows[-1]}", flush=True)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    quiet = {row.setting: row.per_request for row in rows if not row.competitor}
    print(f"\nload average after the run {load_average()}\n")
    print(
        "| server setting | threads | wait policy | competing busy process | load avg at start | other processes' "
        "CPU while timed (cores) | requests timed | s / request | vs quiet |"
    )
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row.setting} | {row.threads} | {row.wait_policy} | {'yes' if row.competitor else 'no'} | "
            f"{row.load_at_start:.2f} | {row.other_cores:.2f} | {row.requests} | {row.per_request:.2f} | "
            f"{row.per_request / quiet[row.setting]:.1f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
