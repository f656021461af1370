#!/usr/bin/env python
"""The embedded server's weights: the bundled SmolLM2's Q4_1 file against its float16 copy.

The local server serves a float16 copy of a bundled GGUF (``core.models.float16_gguf``, made once by
``prepare-models``). This script measures what that buys and what it changes, on the same demo-corpus items,
through the stage functions with the smoke profile's settings:

  * stage 02: ``synthesize_queries`` on one document at a time (two queries each);
  * stage 04: ``TeacherLabeler.label_records`` on one (title, document) pair at a time, grade only, top 10
    log-probabilities, as notebook 04 runs in the smoke profile;

for each file, in alternating rounds (Q4_1, float16, Q4_1, float16, ...), each server started afresh with a
fresh response cache, warmed up on one untimed item. It prints seconds per item, the load average before each
row, and how often the two files gave the same stage-04 grade and the same stage-02 queries.

    .venv/bin/python bench/server_weights.py    # about 10 minutes on a 2-core machine
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: the stages run one item at a time
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labeler_utils.core.config import CACHE_DIR, DEMO_CORPUS_DIR, PROFILES  # noqa: E402
from labeler_utils.core.models import bundled_gguf_path, float16_gguf  # noqa: E402
from labeler_utils.core.resources import load_average  # noqa: E402
from labeler_utils.documents import document_card, load_corpus, select_documents  # noqa: E402
from labeler_utils.llm.client import LLMClient  # noqa: E402
from labeler_utils.llm.local_server import LocalLLMServer  # noqa: E402
from labeler_utils.query_synthesis import GenerationSettings, read_queries, synthesize_queries  # noqa: E402
from labeler_utils.teacher import TeacherLabeler  # noqa: E402
from labeler_utils.throughput.machine import cpu_model  # noqa: E402

MODEL = "smollm2-135m-instruct"


def run_items(gguf: Path, documents: list, stage: str) -> tuple[float, list]:
    """Seconds per item after one untimed warm-up item, and each timed item's result."""
    with tempfile.TemporaryDirectory() as cache, LocalLLMServer(str(gguf), n_ctx=2048) as server:
        client = LLMClient(server.endpoint(), Path(cache) / "cache.sqlite", max_concurrency=1, max_retries=0)
        if stage == "02":
            settings = GenerationSettings(queries_per_document=PROFILES["smoke"].queries_per_document)
            examples = read_queries()

            def item(doc):
                return [q["query"] for q in synthesize_queries(client, [doc], settings, examples)[0]]
        else:
            teacher = TeacherLabeler(client, reasoning=False, max_tokens=12, top_logprobs=10)

            def item(doc):
                record = {"query": doc.title, "document": document_card(doc, 4000)}
                return teacher.label_records([record], progress=False)[0]["grade"]

        item(documents[0])
        start = time.perf_counter()
        results = [item(doc) for doc in documents[1:]]
        return (time.perf_counter() - start) / (len(documents) - 1), results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=8, help="timed items per stage and row (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both files (default: %(default)s)")
    args = parser.parse_args(argv)
    source = bundled_gguf_path(MODEL)
    files = {"Q4_1 (bundled)": source, "float16 copy": float16_gguf(source, CACHE_DIR / "gguf" / f"{MODEL}.f16.gguf")}
    documents = select_documents(load_corpus(DEMO_CORPUS_DIR), args.items + 1)
    print(f"{cpu_model()}, {os.cpu_count()} logical cores; load average before the run {load_average()}")
    print("| round | stage | weights | seconds per item | load average before |")
    print("| --- | --- | --- | ---: | --- |")
    results: dict[tuple[str, str], list] = {}
    times: dict[tuple[str, str], list[float]] = {}
    for round_ in range(1, args.rounds + 1):
        for stage in ("04", "02"):
            for name, gguf in files.items():
                load = load_average()
                seconds, items = run_items(gguf, documents, stage)
                results[stage, name] = items
                times.setdefault((stage, name), []).append(seconds)
                print(f"| {round_} | {stage} | {name} | {seconds:.2f} | {load} |", flush=True)
    print()
    for stage in ("04", "02"):
        q4, f16 = (sum(times[stage, name]) for name in files)
        same = sum(a == b for a, b in zip(*(results[stage, name] for name in files)))
        what = "grades" if stage == "04" else "documents' queries"
        print(
            f"stage {stage}: float16 {q4 / f16:.2f}x faster over {args.rounds} rounds; same {what} {same}/{args.items}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
