#!/usr/bin/env python
"""Write a large pair file for the label-at-scale measurement: every query against every passage.

Dense labeling (each query x each document of a collection) is what a labeler at scale is for. From
the TREC DL 2019 judged pairs (read by path, never copied into the project) this takes the 43 queries
and the distinct passages and writes the first ``--pairs`` query x passage combinations, passages in
file order, as JSONL with ``query_id, query, doc_id, document`` (the input of ``labeler_utils label``).

    .venv/bin/python bench/scale_pairs.py --pairs 100000 --out runs/scale/pairs.jsonl
    .venv/bin/python -m labeler_utils label --model <student> --input runs/scale/pairs.jsonl --output runs/scale/labels
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

DEFAULT_PAIRS = Path(__file__).resolve().parent.parent.parent / "shared" / "benchmarks" / "trec-dl-2019" / "pairs.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_PAIRS, help="TREC DL pairs.jsonl (default: %(default)s)")
    parser.add_argument("--pairs", type=int, default=100_000, help="pairs to write (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="output JSONL")
    args = parser.parse_args(argv)
    queries: dict[str, str] = {}
    passages: dict[str, str] = {}
    with args.source.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
                queries.setdefault(str(record["qid"]), record["query"])
                passages.setdefault(str(record["docid"]), record["passage"])
            except (json.JSONDecodeError, KeyError) as exc:
                raise SystemExit(f"{args.source}:{line_no}: not a pair record ({exc})") from exc
    available = len(queries) * len(passages)
    if args.pairs > available:
        raise SystemExit(
            f"{args.source} gives {len(queries)} x {len(passages)} = {available} pairs, fewer than {args.pairs}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    combinations = itertools.islice(((d, q) for d in passages for q in queries), args.pairs)
    with args.out.open("w", encoding="utf-8") as out:
        for doc_id, query_id in combinations:
            out.write(
                json.dumps(
                    {"query_id": query_id, "query": queries[query_id], "doc_id": doc_id, "document": passages[doc_id]},
                    ensure_ascii=False,
                )
                + "\n"
            )
    print(
        f"wrote {args.pairs} pairs ({len(queries)} queries x {-(-args.pairs // len(queries))} passages) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
