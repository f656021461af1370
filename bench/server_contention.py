#!/usr/bin/env python
"""The embedded llama.cpp server on a shared CPU: stages 02 and 04, old thread settings against new.

Times the two stages that call the embedded server (``LocalLLMServer``) on demo-corpus documents,
through the stage functions themselves with the smoke profile's settings:

  * stage 02: ``query_synthesis.synthesize_queries`` on one document at a time (two queries each);
  * stage 04: ``TeacherLabeler.label_records`` on one (query, document) pair at a time (grade only);

for each server setting:

  * old: one thread per core (at most 8), OpenMP's default wait policy (threads spin at barriers);
  * passive: threads that fit the free cores (``free_cpu_threads``), ``OMP_WAIT_POLICY=PASSIVE``
    (a waiting thread sleeps at once);
  * new (the default): as passive, with ``GOMP_SPINCOUNT=20000`` (a brief spin before sleeping);

first with nothing added, then with one competing CPU-bound process that this script spawns
(``--competitor``: a Python busy loop, one thread; or torch matrix products on every core, like a
student's training). Each server is started afresh (so the new setting sees the load of the moment),
warmed up with one untimed item, and timed over ``--items`` items, stopping early once a row has
taken ``--budget`` seconds. Every call is a real one (a fresh response cache per row).

Other people's jobs count too: the load average before the whole run and before each row is
printed, and each row gives the CPU the *other* processes used while it was timed (all busy CPU
time less the server's, the competitor's and this script's), in cores.

    .venv/bin/python bench/server_contention.py             # about 8-12 minutes on a 2-core machine
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: the stages run one item at a time
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labeler_utils.core.config import DEMO_CORPUS_DIR, PROFILES  # noqa: E402
from labeler_utils.core.resources import load_average  # noqa: E402
from labeler_utils.documents import Document, document_card, load_corpus, select_documents  # noqa: E402
from labeler_utils.llm.client import LLMClient  # noqa: E402
from labeler_utils.llm.local_server import LocalLLMServer, free_cpu_threads  # noqa: E402
from labeler_utils.query_synthesis import GenerationSettings, read_queries, synthesize_queries  # noqa: E402
from labeler_utils.teacher import TeacherLabeler  # noqa: E402
from labeler_utils.throughput.machine import cpu_model  # noqa: E402

COMPETITORS = {
    "python": "while True: pass",  # one busy thread
    # a training-like job: matrix products on as many torch threads as cores, as a student's training runs
    "torch": "import torch\na = torch.randn(512, 512)\nwhile True: a @ a",
}


@dataclass
class Row:
    """One timed stage under one server setting."""

    stage: str
    setting: str
    threads: int
    wait_policy: str
    competitor: bool
    load_at_start: float
    other_cores: float
    items: int
    seconds: float

    @property
    def per_item(self) -> float:
        return self.seconds / self.items


STAGES = {"02 query synthesis": "document", "04 teacher labels": "pair"}


def stage_items(stage: str, client: LLMClient, documents: list[Document]) -> list[Callable[[], object]]:
    """One call of the stage per document, as the smoke profile runs it (the first is the warm-up)."""
    smoke = PROFILES["smoke"]
    if stage.startswith("02"):
        settings = GenerationSettings(queries_per_document=smoke.queries_per_document)
        examples = read_queries()
        return [lambda doc=doc: synthesize_queries(client, [doc], settings, examples) for doc in documents]
    teacher = TeacherLabeler(client, reasoning=False, max_tokens=12)
    return [
        lambda doc=doc: teacher.label_records([{"query": doc.title, "document": document_card(doc, 4000)}])
        for doc in documents
    ]


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


def time_stage(
    stage: str,
    setting: str,
    server: LocalLLMServer,
    documents: list[Document],
    competitor: subprocess.Popen | None,
    budget: float,
) -> Row:
    """Warm up on the first item, then time the others one at a time (at most ``budget`` seconds)."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as cache:
        client = LLMClient(
            server.endpoint(), Path(cache) / "cache.sqlite", max_concurrency=1, max_retries=0, timeout=600
        )
        warm_up, *timed = stage_items(stage, client, documents)
        warm_up()
        pids = [server._process.pid, os.getpid(), *([competitor.pid] if competitor else [])]
        busy_before, ours_before = busy_cpu_seconds(), process_cpu_seconds(*pids)
        start = time.perf_counter()
        done = 0
        for item in timed:
            item()
            done += 1
            if time.perf_counter() - start > budget:
                break
        seconds = time.perf_counter() - start
        others = (busy_cpu_seconds() - busy_before) - (process_cpu_seconds(*pids) - ours_before)
    return Row(
        stage,
        setting,
        server.n_threads,
        (server.wait_policy or "OpenMP default")
        + (f", spin {server.spin_count:,}" if server.wait_policy and server.spin_count is not None else ""),
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
    parser.add_argument("--items", type=int, default=3, help="timed items per stage and row (default: %(default)s)")
    parser.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="stop a row after the item that passes this many seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--competitor",
        choices=sorted(COMPETITORS),
        default="python",
        help="the competing process: a one-thread busy loop or torch on every core (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    documents = select_documents(load_corpus(DEMO_CORPUS_DIR), args.items + 1)
    old_threads = min(os.cpu_count() or 2, 8)
    settings = {
        "old": {"n_threads": old_threads, "wait_policy": None},
        "passive": {"spin_count": None},
        "new": {},
    }
    print(
        f"{cpu_model()}, {os.cpu_count()} logical cores, {len(os.sched_getaffinity(0))} usable; "
        f"load average before the run {load_average()}; free_cpu_threads() now {free_cpu_threads()}; "
        f"OMP_WAIT_POLICY in this environment: {os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"GOMP_SPINCOUNT: {os.environ.get('GOMP_SPINCOUNT', 'unset')}; "
        f"competitor: {args.competitor}",
        flush=True,
    )
    rows: list[Row] = []
    for contended in (False, True):
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITORS[args.competitor]]) if contended else None
        try:
            for name, options in settings.items():
                with LocalLLMServer(args.model, n_ctx=2048, **options) as server:
                    for stage in STAGES:
                        rows.append(time_stage(stage, name, server, documents, competitor, args.budget))
                        print(f"  {rows[-1]}", flush=True)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    quiet = {(row.stage, row.setting): row.per_item for row in rows if not row.competitor}
    print(f"\nload average after the run {load_average()}\n")
    print(
        "| stage | server setting | threads | wait policy | competing busy process | load avg at start | "
        "other processes' CPU while timed (cores) | items timed | s / item | vs no competitor |"
    )
    print("| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row.stage} ({STAGES[row.stage]}) | {row.setting} | {row.threads} | {row.wait_policy} | "
            f"{'yes' if row.competitor else 'no'} | {row.load_at_start:.2f} | {row.other_cores:.2f} | {row.items} | "
            f"{row.per_item:.2f} | {row.per_item / quiet[(row.stage, row.setting)]:.1f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
