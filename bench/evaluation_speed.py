#!/usr/bin/env python
"""Time the TREC DL reproduction's evaluation: students' labelers on 3 evaluation sets of the 97 queries.

The input is what ``python -m labeler_utils reproduce --kfold 5`` evaluates, built from the shared
TREC DL 2019 + 2020 pairs (read by path, never copied into the project) without training anything:

* the teacher column is DeepSeek-V3's recorded grade;
* each stand-in student adds three labelers (zero-shot, distilled, share-calibrated), whose grades are
  the other recorded LLM judges' (in turn) and whose expected relevance is that grade plus seeded
  uniform noise in [-0.45, 0.45] (every score distinct, as a student's expected relevance is);
  the first student's zero-shot labeler is named as the untrained cosine, so the paired
  "minus cosine" comparisons run too;
* 5 query folds; evaluation sets: all held-out pairs, and at most 32 and 8 random pairs per query.

Each set is scored as the reproduction scores it (its ``evaluate_set`` and the per-fold QWK and Spearman
intervals, ``--n-boot`` resamples). The numbers are for timing only: the judges' labels stand in for
students. ``--out`` writes every result as JSON, to compare two implementations on the same input.

    OMP_NUM_THREADS=1 .venv/bin/python bench/evaluation_speed.py --out runs/evaluation_speed.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from labeler_utils.benchmarks.folds import kfold_splits, load_pair_files  # noqa: E402
from labeler_utils.evaluate import bootstrap_ci, query_metric  # noqa: E402
from labeler_utils.experiments.protocols import evaluation_pairs  # noqa: E402
from labeler_utils.experiments.scoring import evaluate_set  # noqa: E402
from labeler_utils.experiments.students import COSINE_LABELER  # noqa: E402

SHARED = REPO_ROOT.parent / "shared" / "benchmarks"
DEFAULT_PAIRS = [SHARED / "trec-dl-2019" / "pairs.jsonl", SHARED / "trec-dl-2020" / "pairs.jsonl"]
TEACHER = "recorded:deepseek_v3_umbrela"
STAGES = ("zero-shot", "distilled", "distilled, share-calibrated")


def stand_in_labelers(frame: pd.DataFrame, n_students: int, cosine_name: str, seed: int) -> tuple[pd.DataFrame, list]:
    """``frame`` with three labeler columns (grade and ``:expected``) per stand-in student, and the labeler names."""
    judges = [c for c in frame.columns if c.startswith("recorded:") and c != TEACHER]
    rng = np.random.default_rng(seed)
    columns: dict[str, Any] = {}
    names = []
    for student in range(n_students):
        for stage_number, stage in enumerate(STAGES):
            name = cosine_name if (student, stage_number) == (0, 0) else f"student {student} {stage}"
            grades = frame[judges[(student * len(STAGES) + stage_number) % len(judges)]]
            noise = rng.uniform(-0.45, 0.45, len(frame))
            columns[name] = grades
            columns[f"{name}:expected"] = np.clip(grades.astype("float64").to_numpy() + noise, 0.0, 3.0)
            names.append(name)
    return pd.concat([frame, pd.DataFrame(columns, index=frame.index)], axis=1), names


def evaluate_all(frame: pd.DataFrame, labelers: list, caps: list, args: argparse.Namespace) -> dict:
    """Every evaluation set scored as the reproduction scores it; seconds (wall and CPU) per set."""
    splits = kfold_splits(frame, args.folds, args.seed)
    sets = {}
    for cap in caps:
        wall, cpu = time.perf_counter(), time.process_time()
        table = pd.concat([evaluation_pairs(frame, s, cap, args.seed) for s in splits])
        results = evaluate_set(table, [TEACHER, *labelers], TEACHER, args.n_boot, args.seed, {})
        per_split = {
            s.name: {
                labeler: {
                    "qwk": bootstrap_ci(part, query_metric("qwk", labeler), args.n_boot, args.seed),
                    "spearman_expected": bootstrap_ci(
                        part, query_metric("spearman_expected", labeler), args.n_boot, args.seed
                    ),
                }
                for labeler in [TEACHER, *labelers]
            }
            for s in splits
            for part in [table[table["query_id"].isin(s.test_ids)]]
        }
        tag = "all" if cap is None else f"cap{cap}"
        seconds = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
        print(f"{tag}: {len(table)} pairs, {seconds['wall']:.1f} s wall, {seconds['cpu']:.1f} s CPU", flush=True)
        sets[tag] = {"pairs": len(table), "seconds": seconds, "labelers": results, "per_split": per_split}
    return sets


def _strict(value: Any) -> Any:
    """NaN as null, recursively, for strict JSON."""
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_strict(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, nargs="+", default=DEFAULT_PAIRS, help="default: %(default)s")
    parser.add_argument("--students", type=int, default=7, help="stand-in students (default: %(default)s)")
    parser.add_argument("--caps", default="all,32,8", help="evaluation sets: pairs per query (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write every result and timing here as JSON")
    args = parser.parse_args(argv)
    frame = load_pair_files(args.pairs)
    frame, labelers = stand_in_labelers(frame, args.students, COSINE_LABELER, args.seed)
    caps = [None if cap == "all" else int(cap) for cap in args.caps.split(",")]
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    sets = evaluate_all(frame, labelers, caps, args)
    total = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    load_after = os.getloadavg()[0]
    print(
        f"total: {len(labelers) + 1} labelers x {len(caps)} sets x {args.folds} folds, n_boot {args.n_boot}: "
        f"{total['wall']:.1f} s wall, {total['cpu']:.1f} s CPU (load average {load_before:.2f} -> {load_after:.2f})"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"settings": {**vars(args), "pairs": [str(p) for p in args.pairs], "out": str(args.out)}}
        args.out.write_text(json.dumps(_strict({**payload, "total_seconds": total, "sets": sets}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
