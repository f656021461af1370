#!/usr/bin/env python
"""An untrained encoder's cosine in float32 and as an int8 copy (``throughput.quantize_int8``): speed and grades.

On fold 1 of the 5-fold TREC DL split (the reproduction's folds, seed 0), each labeler takes its cut points from
DeepSeek-V3's grade shares on ``--fit-pairs`` random training pairs (its own cosines: the int8 copy is cut at its
own quantiles, as a user of it would) and labels ``--eval-pairs`` random held-out pairs. It prints labels per second
on those pairs with 1 and 2 torch threads (float32 and int8 in turn, same pairs), how often the two give the same
grade, and each one's QWK with the human grades on the same pairs (human grades only score; they set nothing).

    .venv/bin/python bench/encoder_int8.py --pairs ../shared/benchmarks/trec-dl-2019/pairs.jsonl \\
        ../shared/benchmarks/trec-dl-2020/pairs.jsonl --encoder all-mpnet-base-v2
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from labeler_utils import throughput as tp
from labeler_utils.core.resources import load_average
from labeler_utils.evaluate.agreement_metrics import agreement
from labeler_utils.experiments import load_frame, query_splits, teacher_column
from labeler_utils.students.base import grade_counts, share_matching_thresholds
from labeler_utils.students.bi_encoder import CosineBaseline
from labeler_utils.teacher import labels_from_frame


def cosines_of(labeler: CosineBaseline, records: list[dict]) -> np.ndarray:
    """The labeler's cosines of the records (its expected relevance is ``3 * (cos + 1) / 2``)."""
    rows = labeler.label_records(records, progress=False, batch_size=32)
    return np.array([row["expected_relevance"] for row in rows]) * 2 / 3 - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, nargs="+", required=True)
    parser.add_argument("--encoder", default="all-mpnet-base-v2")
    parser.add_argument("--fit-pairs", type=int, default=1000)
    parser.add_argument("--eval-pairs", type=int, default=600)
    parser.add_argument("--timed-pairs", type=int, default=200, help="pairs timed at each thread count")
    args = parser.parse_args()

    teacher = teacher_column("deepseek_v3_umbrela")
    frame = load_frame(args.pairs, teacher)
    split = query_splits(frame, 0.5, 0, kfold=5)[0]
    fit = random.Random(0).sample(
        labels_from_frame(frame[frame["query_id"].isin(split.train_ids)], teacher, teacher), args.fit_pairs
    )
    held_out = frame[frame["query_id"].isin(split.test_ids) & frame[teacher].notna()]
    held_out = held_out.sample(n=args.eval_pairs, random_state=0)
    evaluation = labels_from_frame(held_out, teacher, teacher)
    humans = held_out["human"].astype(int).tolist()
    print(f"{split.name}: {len(fit)} fit pairs, {len(evaluation)} held-out pairs; load {load_average()}")

    plain = CosineBaseline.fit(fit, base_model=args.encoder)
    int8 = tp.quantize_int8(plain)
    int8.thresholds = share_matching_thresholds(cosines_of(int8, fit), grade_counts(fit))
    grades = {}
    for name, labeler in (("float32", plain), ("int8", int8)):
        rows = labeler.label_records(evaluation, progress=False, batch_size=32)
        grades[name] = [row["grade"] for row in rows]
        qwk = agreement(humans, grades[name])["qwk"]
        print(f"{name}: cut points {np.round(labeler.thresholds, 4).tolist()}, QWK with the human grades {qwk:.4f}")
    same = np.mean(np.array(grades["float32"]) == np.array(grades["int8"]))
    qwk_change = agreement(humans, grades["int8"])["qwk"] - agreement(humans, grades["float32"])["qwk"]
    print(f"same grade on {same:.3f} of the held-out pairs; QWK int8 - float32 {qwk_change:+.4f}")

    timed = evaluation[: args.timed_pairs]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, labeler in (("float32", plain), ("int8", int8)):
            start, cpu = time.perf_counter(), time.process_time()
            labeler.label_records(timed, progress=False, batch_size=32)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            print(
                f"{threads} thread(s), {name}: {len(timed) / seconds:.2f} labels/s, "
                f"{len(timed) / cpu:.2f} per CPU second; load {load_average()} (pid {os.getpid()})"
            )


if __name__ == "__main__":
    main()
