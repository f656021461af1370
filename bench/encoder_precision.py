#!/usr/bin/env python
"""An untrained encoder's cosine in float32, bfloat16 and int8: speed, grades kept, and cost against the teacher.

On fold 1 of the 5-fold TREC DL split (the reproduction's folds, seed 0), each precision takes its cut points from
DeepSeek-V3's grade shares on ``--fit-pairs`` random training pairs (its own cosines, as a user of that copy would)
and labels ``--eval-pairs`` random held-out pairs. It prints each one's QWK with the human grades on the same pairs
(human grades only score; they set nothing), how often it gives float32's grade, labels per second with 1 and 2 torch
threads (the precisions in turn, same pairs), and the cost per 1,000 labels on a machine at the stated hourly price
against a hosted GPT-4o teacher at stated prices (its prompt tokens counted on these pairs with the encoder's
tokenizer, ``--teacher-answer-tokens`` stated). ``bfloat16`` is skipped on a CPU without AVX512-BF16 or AMX.

    .venv/bin/python bench/encoder_precision.py --pairs ../shared/benchmarks/trec-dl-2019/pairs.jsonl \\
        ../shared/benchmarks/trec-dl-2020/pairs.jsonl --encoder all-mpnet-base-v2
"""

from __future__ import annotations

import argparse
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
from labeler_utils.students.bi_encoder import CosineBaseline, cosines
from labeler_utils.teacher import labels_from_frame


def cut_at_own_cosines(labeler: CosineBaseline, fit: list[dict]) -> CosineBaseline:
    """The labeler with cut points from its own cosines of the fit pairs (the teacher's grade shares there)."""
    values = cosines(labeler.model, [r["query"] for r in fit], [r["document"] for r in fit])
    labeler.thresholds = share_matching_thresholds(values, grade_counts(fit))
    return labeler


def has_bfloat16_math() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere bfloat16 is emulated, slower."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, nargs="+", required=True)
    parser.add_argument("--encoder", default="all-mpnet-base-v2")
    parser.add_argument("--fit-pairs", type=int, default=1000)
    parser.add_argument("--eval-pairs", type=int, default=500)
    parser.add_argument("--timed-pairs", type=int, default=150, help="pairs timed at each thread count")
    parser.add_argument("--teacher-answer-tokens", type=float, default=60.0, help="stated answer tokens per pair")
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
    labelers = {"float32": plain}
    if has_bfloat16_math():
        labelers["bfloat16"] = cut_at_own_cosines(tp.in_precision(plain, torch.bfloat16), fit)
    labelers["int8"] = cut_at_own_cosines(tp.quantize_int8(plain), fit)

    grades, qwks = {}, {}
    for name, labeler in labelers.items():
        grades[name] = np.array(
            [row["grade"] for row in labeler.label_records(evaluation, progress=False, batch_size=32)]
        )
        qwks[name] = agreement(humans, grades[name].tolist())["qwk"]
        print(
            f"{name}: cut points {np.round(labeler.thresholds, 4).tolist()}, QWK with the human grades "
            f"{qwks[name]:.4f} ({qwks[name] - qwks['float32']:+.4f} against float32), "
            f"float32's grade on {np.mean(grades[name] == grades['float32']):.3f}"
        )

    timed = evaluation[: args.timed_pairs]
    pairs = [(r["query"], r["document"]) for r in timed]
    hosted = tp.stated_teacher(
        "gpt-4o hosted API (stated)",
        tp.STATED_API_LABELS_PER_SECOND,
        tp.rubric_prompt_tokens(plain.tokenizer, pairs, reasoning=True),
        args.teacher_answer_tokens,
        *tp.API_PRICES_PER_MILLION["gpt-4o"],
    )
    print(
        f"teacher {hosted.name}: {hosted.prompt_tokens_per_pair:.0f} prompt + {hosted.completion_tokens_per_pair:.0f} "
        f"answer tokens per pair, ${hosted.cost_per_1000_labels:.4f} per 1,000 labels"
    )
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, labeler in labelers.items():
            start, cpu = time.perf_counter(), time.process_time()
            labeler.label_records(timed, progress=False, batch_size=32)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            cost = tp.machine_cost_per_1000(len(timed) / seconds, tp.CPU_PRICE_PER_HOUR)
            print(
                f"{threads} thread(s), {name}: {len(timed) / seconds:.2f} labels/s, {len(timed) / cpu:.2f} per CPU "
                f"second, ${cost:.5f} per 1,000 labels at ${tp.CPU_PRICE_PER_HOUR}/hour "
                f"({hosted.cost_per_1000_labels / cost:.0f}x cheaper than the teacher); load {load_average()}"
            )


if __name__ == "__main__":
    main()
