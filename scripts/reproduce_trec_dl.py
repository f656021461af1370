#!/usr/bin/env python
"""Distil DeepSeek-V3's recorded TREC DL 2019 grades into small students; compare them with NIST's humans.

Protocol:

1. Load the judged pairs (NIST human grades plus recorded LLM grades) and split them BY QUERY
   with a fixed seed (``--test-fraction`` held out, or ``--kfold`` folds); no query is on both sides.
2. The teacher's recorded grades of the training queries are the training records. The human
   grades are never used for training, only to score every labeler on the held-out queries.
3. Each student is trained (``labeler_utils.cross_encoder`` or ``labeler_utils.distill``) and
   labels the held-out pairs, zero-shot and distilled:

   * causal LMs (SmolLM2, Gemma 3): zero-shot = the base model through the same one-pass
     grade-token scoring as the distilled adapter;
   * MiniLM cross-encoder: an untrained classification head means nothing, so its zero-shot row
     is the bi-encoder cosine similarity of the same MiniLM, cut into grades at thresholds that
     reproduce the teacher's grade shares on the training pairs (teacher grades only, never the
     humans'); its expected relevance is ``3 * (cos + 1) / 2`` (ranking metrics only).

4. Each distilled student is also reported "share-calibrated": its expected relevance cut into grades at the
   quantiles that give the teacher's grade shares on the training pairs, instead of the arg-max grade.
5. On each evaluation set (all held-out pairs, and the per-query capped subsample of slow
   students) every labeler is scored against the human grades, DeepSeek-V3 on exactly the same
   pairs, with percentile bootstrap intervals over queries. Labels/s, training time and peak RSS
   are measured on this machine.

Models, predictions and timings go to ``--work-dir`` (git-ignored ``runs/``); a student whose
model (and predictions) are there already is reused unless ``--force``. The causal students'
training writes a checkpoint every 50 steps: running the same command again after a crash resumes
it (``--force`` too resumes a checkpoint of the very same training). Results go to
``--output``: ``results.json``, ``results.md`` and ``forest_<set>.png``.

Example (the MiniLM run of docs/results/trec_dl_2019):

    nice -n 10 .venv/bin/python scripts/reproduce_trec_dl.py --students minilm-cross-encoder
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from labeler_utils.artifacts import atomic_write, read_json, write_json  # noqa: E402
from labeler_utils.benchmarks import (  # noqa: E402
    GRADES,
    RECORDED_PREFIX,
    attach_predictions,
    load_benchmark,
    query_kfold,
    query_split,
    read_predictions,
    write_predictions,
)
from labeler_utils.evaluate import (  # noqa: E402
    NDCG_CUTOFF,
    bootstrap_ci,
    labeler_scores,
    paired_bootstrap,
    plot_forest,
    query_metric,
)
from labeler_utils.student import (  # noqa: E402
    ADAPTER_MANIFEST,
    PROMPT_FORMATS,
    grades_at_thresholds,
    load_labeler,
    share_matching_thresholds,
)
from labeler_utils.teacher import labels_from_frame  # noqa: E402
from labeler_utils.throughput import PeakMemory, load_average, machine_info  # noqa: E402

DEFAULT_PAIRS = REPO_ROOT.parent / "shared" / "benchmarks" / "trec-dl-2019" / "pairs.jsonl"
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "results" / "trec_dl_2019"
DEFAULT_WORK_DIR = REPO_ROOT / "runs" / "reproduce_trec_dl"
#: Metrics of evaluate.py (bootstrapped from per-query statistics) reported for every labeler.
GRADE_METRICS = ("accuracy", "kappa", "qwk", "kappa_binary_ge2")
RANKING_METRICS = (f"ndcg@{NDCG_CUTOFF}", "pairwise_accuracy")
SPEARMAN = "spearman_expected"  # of expected relevance; not a per-query sum, so bootstrapped on resampled tables
METRICS = (*GRADE_METRICS, SPEARMAN, *RANKING_METRICS)
METRIC_TITLES = {"accuracy": "acc", "kappa": "kappa", "qwk": "QWK", "kappa_binary_ge2": "kappa (>=2)",
                 SPEARMAN: "Spearman E[rel]", f"ndcg@{NDCG_CUTOFF}": f"nDCG@{NDCG_CUTOFF}",
                 "pairwise_accuracy": "pairwise acc"}  # fmt: skip


@dataclass(frozen=True)
class StudentSpec:
    """A student the script can train: its family, base model and default training settings."""

    family: str  # "cross_encoder" or "causal_lm"
    base_model: str | None  # None: the bundled MiniLM (cross-encoder default)
    epochs: float
    train_batch_size: int
    max_length: int
    objective: str = "classification"  # cross-encoder only
    zero_shot: str = ""
    class_balance: bool = False  # loss weighted by inverse grade frequency of the teacher's training grades
    prompt_format: str = PROMPT_FORMATS[0]  # causal LM only: see labeler_utils.student.PROMPT_FORMATS


CHECKPOINT_STEPS = 50  # causal students: a killed training resumes from its last checkpoint when rerun
BOOKKEEPING = {"save_steps", "logging_steps"}  # settings that do not change the trained model
CE_ZERO_SHOT = "bi-encoder cosine of the same MiniLM, thresholds matching the teacher's grade shares on the training pairs"
LM_ZERO_SHOT = "base model, same one-pass grade-token scoring"
STUDENTS: dict[str, StudentSpec] = {
    "minilm-cross-encoder": StudentSpec("cross_encoder", None, 2.0, 16, 256, "classification", CE_ZERO_SHOT),
    "minilm-cross-encoder-balanced": StudentSpec("cross_encoder", None, 2.0, 16, 256, "classification", CE_ZERO_SHOT,
                                                 class_balance=True),
    "minilm-cross-encoder-regression": StudentSpec("cross_encoder", None, 2.0, 16, 256, "regression", CE_ZERO_SHOT),
    "smollm2-135m-instruct": StudentSpec("causal_lm", "smollm2-135m-instruct", 2.0, 8, 256, zero_shot=LM_ZERO_SHOT),
    "gemma3-270m": StudentSpec("causal_lm", "gemma3-270m", 2.0, 8, 256, zero_shot=LM_ZERO_SHOT),
    "gemma3-270m-query-twice": StudentSpec("causal_lm", "gemma3-270m", 2.0, 8, 256, zero_shot=LM_ZERO_SHOT,
                                           prompt_format="query-document-query"),
}


@dataclass(frozen=True)
class Split:
    """One train/test division of the queries."""

    name: str
    train_ids: frozenset[str]
    test_ids: frozenset[str]


def query_splits(frame: pd.DataFrame, test_fraction: float, seed: int, kfold: int | None = None) -> list[Split]:
    """The hold-out split (or ``kfold`` folds) by query; raises if a query would be on both sides."""
    divisions = query_kfold(frame, kfold, seed) if kfold else [query_split(frame, test_fraction, seed)]
    splits = []
    for index, (train_ids, test_ids) in enumerate(divisions, start=1):
        shared = set(train_ids) & set(test_ids)
        if shared:
            raise AssertionError(f"queries {sorted(shared)[:5]} are in both the training and the test queries")
        splits.append(Split(f"fold{index}of{kfold}" if kfold else "holdout", frozenset(train_ids), frozenset(test_ids)))
    return splits


def evaluation_pairs(frame: pd.DataFrame, split: Split, max_pairs_per_query: int | None, seed: int) -> pd.DataFrame:
    """The split's held-out pairs; with a cap, at most that many per query, drawn at random with ``seed``."""
    held_out = frame[frame["query_id"].isin(split.test_ids)]
    if max_pairs_per_query is None:
        return held_out
    shuffled = held_out.sample(frac=1.0, random_state=seed)
    return shuffled.groupby("query_id", sort=False).head(max_pairs_per_query).sort_index()


def parse_per_student(text: str | None, students: Sequence[str], cast: Callable[[str], Any]) -> dict[str, Any]:
    """``"N"`` (every student) or ``"name=N,name=M"`` -> {student: value}; students not named are absent."""
    if not text:
        return {}
    if "=" not in text:
        return {name: cast(text) for name in students}
    values = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in students:
            raise SystemExit(f"{name.strip()!r} is not one of the chosen students {list(students)}")
        values[name.strip()] = cast(value)
    return values


# --------------------------------------------------------------------------------------------
# Training and labelling, each cached in the work folder
# --------------------------------------------------------------------------------------------


def _student_config(spec: StudentSpec, epochs: float, seed: int, soft_labels: bool, bf16: bool) -> Any:
    if spec.family == "cross_encoder":
        from labeler_utils.cross_encoder import CrossEncoderConfig

        base = {} if spec.base_model is None else {"base_model": spec.base_model}
        return CrossEncoderConfig(**base, objective=spec.objective, soft_labels=soft_labels, epochs=epochs,
                                  batch_size=spec.train_batch_size, max_length=spec.max_length, seed=seed,
                                  class_balance=spec.class_balance)  # fmt: skip
    from labeler_utils.distill import DistillConfig

    return DistillConfig(base_model=spec.base_model, qlora=None, epochs=epochs, batch_size=spec.train_batch_size,
                         max_length=spec.max_length, soft_label_weight=0.5 if soft_labels else 0.0, seed=seed,
                         bf16=bf16 or None, save_steps=CHECKPOINT_STEPS, class_balance=spec.class_balance,
                         prompt_format=spec.prompt_format)  # fmt: skip


def _same_training(trained: dict[str, Any], config: Any) -> bool:
    """Whether a manifest's config trains the same model as ``config`` (checkpoint and logging intervals aside).

    A setting missing from the manifest (added to the config class later) counts as its default.
    """
    defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    wanted = json.loads(json.dumps(asdict(config)))
    trained = {**defaults, **trained}
    return {k: v for k, v in trained.items() if k not in BOOKKEEPING} == {k: v for k, v in wanted.items() if k not in BOOKKEEPING}


def _finished_model(folder: Path) -> Path | None:
    return next((f for f in (folder / "model", folder / "adapter") if (f / ADAPTER_MANIFEST).exists()), None)


def train(spec: StudentSpec, records: list[dict[str, Any]], folder: Path, config: Any, data: dict[str, Any],
          force: bool) -> dict[str, Any]:  # fmt: skip
    """Train (or reuse) one student; returns its manifest plus measured wall time and peak RSS."""
    model_dir = _finished_model(folder)
    stats_path = folder / "train_stats.json"
    if model_dir is not None and not force:
        manifest = read_json(model_dir / ADAPTER_MANIFEST)
        if not _same_training(manifest["config"], config) or manifest["data"] != data:
            raise SystemExit(f"{model_dir} was trained with other settings or data; pass --force or another --work-dir")
        print(f"reusing {model_dir}")
        return {**manifest, **(read_json(stats_path) if stats_path.exists() else {})}
    if spec.family == "cross_encoder":
        from labeler_utils.cross_encoder import train_cross_encoder as trainer
    else:
        from labeler_utils.distill import train_student as trainer
    load_before, start = load_average(), time.perf_counter()
    with PeakMemory() as memory:
        manifest = trainer(records, folder, config, data)
    stats_record = {"wall_seconds": time.perf_counter() - start, "stopped_seconds": memory.stopped_seconds,
                    "train_active_seconds": manifest["train_seconds"] - memory.stopped_seconds,
                    "peak_rss_mb": round(memory.peak_mb, 1), "load_before": load_before, "load_after": load_average()}  # fmt: skip
    write_json(stats_path, stats_record)
    return {**manifest, **stats_record}


Labeling = Callable[[], list[dict[str, Any]]]


def timed_predictions(prepare: Callable[[], Labeling], path: Path, pairs: set[tuple[str, str]], batch_size: int,
                      force: bool) -> dict[str, Any]:  # fmt: skip
    """Reuse the predictions file at ``path`` (when it covers exactly ``pairs``), or ``prepare()`` a labeler
    (untimed) and time its labelling. Returns the timing (labels/s, batch size, peak RSS, load) saved beside it.
    """
    timing_path = path.with_suffix(".timing.json")
    if path.exists() and timing_path.exists() and not force:
        cached = read_predictions(path)
        if set(zip(cached["query_id"], cached["doc_id"])) != pairs:
            raise SystemExit(f"{path} labels other pairs (another seed or split?); pass --force or another --work-dir")
        return read_json(timing_path)
    label = prepare()
    load_before, start = load_average(), time.perf_counter()
    with PeakMemory() as memory:
        rows = label()
    seconds = time.perf_counter() - start - memory.stopped_seconds  # time stopped by a signal (job control) is not labeling
    write_predictions(path, pd.DataFrame(rows))
    timing = {"pairs": len(rows), "seconds": seconds, "stopped_seconds": memory.stopped_seconds,
              "labels_per_second": len(rows) / seconds, "batch_size": batch_size, "peak_rss_mb": round(memory.peak_mb, 1),
              "load_before": load_before, "load_after": load_average()}  # fmt: skip
    write_json(timing_path, timing)
    return timing


def cosine_baseline(train_records: list[dict[str, Any]], test_records: list[dict[str, Any]], name: str,
                    batch_size: int) -> Labeling:  # fmt: skip
    """Zero-shot MiniLM (see ``CosineBaseline``): thresholds fitted untimed, labelling timed."""
    from labeler_utils.cross_encoder import CosineBaseline

    baseline = CosineBaseline.fit(train_records, batch_size=batch_size)
    return partial(baseline.label_records, test_records, name, batch_size=batch_size)


def release_memory() -> None:
    """Free what the last phase left behind, so the next phase's peak RSS is its own (glibc: give heap back)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def student_predictions(
    name: str, spec: StudentSpec, split: Split, frame: pd.DataFrame, teacher: str, args: argparse.Namespace,
    settings: dict[str, dict[str, Any]],
) -> dict[str, Any]:  # fmt: skip
    """Label one split's evaluation pairs zero-shot, train the student, label them distilled.

    Returns the training record and, per stage, the labeler name, predictions path and timing.
    The cross-encoders' zero-shot baseline (bi-encoder cosine) is shared by every MiniLM variant.
    """
    folder = args.work_dir / name / split.name
    teacher_records = labels_from_frame(frame[frame["query_id"].isin(split.train_ids)], teacher, teacher)
    max_train = settings["max_train_pairs"].get(name)
    train_records = teacher_records
    if max_train is not None and max_train < len(teacher_records):
        train_records = random.Random(args.seed).sample(teacher_records, max_train)
    cap = settings["max_eval_pairs_per_query"].get(name)
    test_records = evaluation_pairs(frame, split, cap, args.seed).to_dict("records")
    eval_tag, batch = (f"cap{cap}" if cap else "all"), args.eval_batch_size
    outputs: dict[str, Any] = {"eval_set": eval_tag, "stages": {}}

    pairs = {(r["query_id"], r["doc_id"]) for r in test_records}

    def record(stage: str, labeler_name: str, path: Path, prepare: Callable[[], Labeling]) -> None:
        timing = timed_predictions(prepare, path, pairs, batch, args.force)
        outputs["stages"][stage] = {"labeler": labeler_name, "path": str(path), "timing": timing}
        release_memory()

    def prepare_student(source: str | Path, labeler_name: str, **kwargs: Any) -> Labeling:
        labeler = load_labeler(source, family=spec.family, **kwargs)
        return partial(labeler.label_records, test_records, labeler_name, batch_size=batch)

    if spec.family == "cross_encoder":
        cosine_name = "minilm bi-encoder cosine zero-shot"
        thresholds_from = teacher.removeprefix(RECORDED_PREFIX)  # the cut points come from the teacher's grade shares
        path = args.work_dir / "minilm-bi-encoder-cosine" / split.name / f"zero-shot.{thresholds_from}.{eval_tag}.predictions.jsonl"
        record("zero-shot", cosine_name, path, lambda: cosine_baseline(teacher_records, test_records, cosine_name, batch))
    else:
        path = folder / f"zero-shot.{eval_tag}.predictions.jsonl"
        record("zero-shot", f"{name} zero-shot", path,
               lambda: prepare_student(spec.base_model, f"{name} zero-shot", max_length=spec.max_length,
                                       prompt_format=spec.prompt_format))  # fmt: skip

    config = _student_config(spec, settings["epochs"].get(name, spec.epochs), args.seed, args.soft_labels, args.bf16)
    data = {"benchmark": str(args.pairs), "teacher": teacher, "split": split.name, "seed": args.seed,
            "test_fraction": None if args.kfold else args.test_fraction, "kfold": args.kfold,
            "train_queries": len(split.train_ids), "train_pairs": len(train_records), "max_train_pairs": max_train}  # fmt: skip
    trained = train(spec, train_records, folder, config, data, args.force)
    outputs["train"] = {key: trained.get(key) for key in (
        "train_seconds", "train_active_seconds", "stopped_seconds", "wall_seconds", "peak_rss_mb", "train_examples", "global_steps", "train_loss",
        "truncated_documents", "load_before", "load_after", "method", "max_length", "resumed_from")}  # fmt: skip
    outputs["config"] = trained["config"]
    release_memory()
    record("distilled", f"{name} distilled", folder / f"distilled.{eval_tag}.predictions.jsonl",
           lambda: prepare_student(folder, f"{name} distilled"))
    return outputs


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def share_calibrated(predictions: pd.DataFrame, frame: pd.DataFrame, splits: Sequence[Split], teacher: str) -> pd.DataFrame:
    """The predictions re-graded by calibrated thresholds instead of the arg-max.

    Per split, the labeler's expected relevance on the held-out pairs it labelled is cut at the
    quantiles that give the teacher's grade shares on that split's training pairs. Only the
    teacher's training grades and the labeler's own scores are used, never a human grade.
    """
    parts = []
    for split in splits:
        part = predictions[predictions["query_id"].isin(split.test_ids)].copy()
        counts = np.bincount(frame.loc[frame["query_id"].isin(split.train_ids), teacher].dropna().astype(int),
                             minlength=len(GRADES))  # fmt: skip
        scores = part["expected_relevance"].to_numpy()
        part["grade"] = pd.array(grades_at_thresholds(scores, share_matching_thresholds(scores, counts)), dtype="Int64")
        parts.append(part)
    return pd.concat(parts)


def spearman_of_scores(labeler: str) -> Callable[[pd.DataFrame], float]:
    """Spearman correlation of the labeler's expected relevance (else grade) with the human grades."""

    def metric(frame: pd.DataFrame) -> float:
        scores = labeler_scores(frame, labeler)
        graded = scores.notna().to_numpy()
        return float(stats.spearmanr(scores[graded], frame["human"][graded]).statistic)

    return metric


def evaluate_set(frame: pd.DataFrame, labelers: Sequence[str], teacher: str, n_boot: int, seed: int) -> dict[str, Any]:
    """Every metric with its query-bootstrap interval, and each labeler's QWK minus the teacher's (paired)."""
    results: dict[str, Any] = {}
    for labeler in labelers:
        metrics = {name: bootstrap_ci(frame, query_metric(name, labeler), n_boot, seed)
                   for name in (*GRADE_METRICS, *RANKING_METRICS)}
        metrics[SPEARMAN] = bootstrap_ci(frame, spearman_of_scores(labeler), n_boot, seed)
        results[labeler] = {"n": int(frame[labeler].notna().sum()), "n_missing": int(frame[labeler].isna().sum()),
                            "metrics": {name: metrics[name] for name in METRICS}}  # fmt: skip
        if labeler != teacher:
            results[labeler]["qwk_minus_teacher"] = paired_bootstrap(frame, labeler, teacher, "qwk", n_boot, seed)
    return results


def _interval(result: dict[str, Any]) -> str:
    return f"{result['estimate']:.3f} [{result['ci_low']:.3f}, {result['ci_high']:.3f}]"


def _train_time(train: dict[str, Any]) -> str:
    """Training wall time; a training resumed from a checkpoint says which steps that time covers."""
    seconds = f"{train.get('train_active_seconds') or train['train_seconds']:.0f} s"
    if not train.get("resumed_from"):
        return seconds
    first = int(Path(train["resumed_from"]).name.rpartition("-")[2]) + 1
    return f"{seconds} for steps {first}-{train['global_steps']} (resumed from a checkpoint)"


def markdown(report: dict[str, Any]) -> str:
    """results.md: the agreement tables per evaluation set, then cost (training and labelling)."""
    settings, machine = report["settings"], report["machine"]
    lines = [
        "# TREC DL 2019: distilled students vs DeepSeek-V3, scored against NIST human grades",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {machine['date']}; machine: {machine['cpu']}, {machine['usable_cores']} cores, torch threads "
        f"{machine['torch_threads']}, no GPU; load average at start {machine['load_average']} (each timing "
        "keeps its own load average in results.json: a timing taken while other jobs ran is a lower bound).",
        "",
        f"Teacher: `{settings['teacher']}` (recorded grades of the training queries are the only training data). "
        f"Split by query, seed {settings['seed']}: {report['splits_summary']}. Intervals: 95% percentile bootstrap over "
        f"held-out queries, {settings['n_boot']} resamples; 'QWK - teacher' is paired (same resamples, same pairs).",
        "",
    ]
    for eval_set in report["evaluation_sets"]:
        lines += [f"## {eval_set['title']}", "",
                  f"{eval_set['pairs']} pairs, {eval_set['queries']} held-out queries; human grade counts "
                  f"{eval_set['human_grade_counts']}.", "",
                  "| labeler | n | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " | QWK - teacher |",
                  "|---|---|" + "---|" * (len(METRICS) + 1)]  # fmt: skip
        for labeler, result in eval_set["labelers"].items():
            diff = result.get("qwk_minus_teacher")
            diff_text = f"{diff['difference']:+.3f} [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]" if diff else "–"
            cells = [_interval(result["metrics"][m]) for m in METRICS]
            shown = f"{labeler} (teacher)" if labeler == report["settings"]["teacher"] else labeler
            lines.append(f"| {shown} | {result['n']} | " + " | ".join(cells) + f" | {diff_text} |")
        lines.append("")
    lines += ["## Cost on this CPU", "",
              "| labeler (split) | labels/s (batch) | labelled pairs | labelling peak RSS MB | train pairs x epochs | "
              "train steps | train time | train peak RSS MB |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    shown: set[str] = set()
    for student in report["students"].values():
        for split_name, result in student["splits"].items():
            train = result["train"]
            for stage, output in result["stages"].items():
                row = f"{output['labeler']} ({split_name})"
                if row in shown:
                    continue
                shown.add(row)
                timing = output["timing"]
                train_cells = ([f"{train['train_examples']} x {result['config']['epochs']:g}", str(train["global_steps"]),
                                _train_time(train), str(train["peak_rss_mb"])]
                               if stage == "distilled" else ["–"] * 4)  # fmt: skip
                lines.append(f"| {row} | {timing['labels_per_second']:.2f} ({timing['batch_size']}) | {timing['pairs']} | "
                             f"{timing['peak_rss_mb']} | " + " | ".join(train_cells) + " |")  # fmt: skip
    lines += ["", "Peak RSS is the whole process's resident memory during the phase (sampled every 50 ms), after "
              "freeing the previous phase. Labels/s include tokenisation; train time is the trainer's wall time. "
              "Time during which the job was stopped by a signal (job control) is taken out of both; the "
              "load average is recorded with every timing in results.json.", ""]
    zero_shot = {split["stages"]["zero-shot"]["labeler"]: student["zero_shot"]
                 for student in report["students"].values() for split in student["splits"].values()}  # fmt: skip
    lines += ["", "Zero-shot rows: " + "; ".join(f"{name}: {how}" for name, how in zero_shot.items()) + ".", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    per_student = "a number for every student, or name=value,name=value"
    parser.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS, help="TREC DL 2019 pairs.jsonl (default: %(default)s)")
    parser.add_argument("--teacher-column", default="deepseek_v3_umbrela",
                        help="recorded labeler whose grades are distilled (llm_labels.<name>; default: %(default)s)")
    parser.add_argument("--test-fraction", type=float, default=0.5, help="share of queries held out (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="split, subsample, training and bootstrap seed (default: %(default)s)")
    parser.add_argument("--kfold", type=int, default=None,
                        help="K folds by query instead of one hold-out split; metrics pool the K held-out folds")
    parser.add_argument("--students", default="minilm-cross-encoder",
                        help=f"comma list among {', '.join(STUDENTS)} (default: %(default)s)")
    parser.add_argument("--epochs", help=f"training epochs ({per_student}); default per student: "
                        + ", ".join(f"{n} {s.epochs:g}" for n, s in STUDENTS.items()))  # fmt: skip
    parser.add_argument("--max-train-pairs", help=f"random subsample of the training pairs ({per_student}); default all")
    parser.add_argument("--max-eval-pairs-per-query", help=f"random held-out pairs per query ({per_student}); default all. "
                        "DeepSeek-V3 and the other students are then also scored on exactly these pairs")  # fmt: skip
    parser.add_argument("--soft-labels", action="store_true",
                        help="train on the teacher's grade distributions where records have them (TREC DL's recorded "
                             "labels have none, so this changes nothing there)")  # fmt: skip
    parser.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast while training the causal LM students (a GPU, or a CPU with AVX512-BF16: "
                             "1.2x faster than float32 here); default: float32 on a CPU, bfloat16 for QLoRA on a GPU")  # fmt: skip
    parser.add_argument("--eval-batch-size", type=int, default=16, help="labelling batch size (default: %(default)s)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples over queries (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results folder (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="models, predictions and timings (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="retrain and relabel even when the work folder has results")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    students = [name.strip() for name in args.students.split(",") if name.strip()]
    unknown = [name for name in students if name not in STUDENTS]
    if unknown:
        raise SystemExit(f"unknown student(s) {unknown}; choose among {list(STUDENTS)}")
    settings = {"epochs": parse_per_student(args.epochs, students, float),
                "max_train_pairs": parse_per_student(args.max_train_pairs, students, int),
                "max_eval_pairs_per_query": parse_per_student(args.max_eval_pairs_per_query, students, int)}  # fmt: skip
    teacher = args.teacher_column if args.teacher_column.startswith(RECORDED_PREFIX) else RECORDED_PREFIX + args.teacher_column
    machine = machine_info()
    frame = load_benchmark(args.pairs)
    if teacher not in frame.columns:
        raise SystemExit(f"{args.pairs} has no recorded labeler {teacher!r}; it has {[c for c in frame if c.startswith(RECORDED_PREFIX)]}")
    splits = query_splits(frame, args.test_fraction, args.seed, args.kfold)

    report_students: dict[str, Any] = {}
    for name in students:
        spec = STUDENTS[name]
        report_students[name] = {"family": spec.family, "zero_shot": spec.zero_shot, "splits": {}}
        for split in splits:
            print(f"== {name}, {split.name}")
            report_students[name]["splits"][split.name] = student_predictions(name, spec, split, frame, teacher, args, settings)

    caps = sorted({settings["max_eval_pairs_per_query"].get(n) for n in students}, key=lambda c: (c is not None, c or 0))
    evaluation_sets = []
    for cap in caps:
        table = pd.concat([evaluation_pairs(frame, s, cap, args.seed) for s in splits])
        labelers = [teacher]
        for name in students:
            if settings["max_eval_pairs_per_query"].get(name) not in (None, cap):
                continue  # its predictions do not cover every pair of this set
            for stage in ("zero-shot", "distilled"):
                outputs = [report_students[name]["splits"][s.name]["stages"][stage] for s in splits]
                if outputs[0]["labeler"] in labelers:
                    continue  # the shared cosine baseline of the MiniLM variants
                predictions = pd.concat([read_predictions(output["path"]) for output in outputs])
                table = attach_predictions(table, predictions, outputs[0]["labeler"])
                labelers.append(outputs[0]["labeler"])
                if stage == "distilled":
                    calibrated = f"{outputs[0]['labeler']}, share-calibrated"
                    table = attach_predictions(table, share_calibrated(predictions, frame, splits, teacher), calibrated)
                    labelers.append(calibrated)
        title = "All held-out pairs" if cap is None else f"At most {cap} random held-out pairs per query"
        print(f"== evaluating: {title}")
        results = evaluate_set(table, labelers, teacher, args.n_boot, args.seed)
        tag = "all" if cap is None else f"cap{cap}"
        figure = plot_forest({n: r["metrics"] for n, r in results.items()}, METRICS)
        args.output.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.output / f"forest_{tag}.png", "wb") as handle:
            figure.savefig(handle, format="png", dpi=110)
        evaluation_sets.append({"tag": tag, "title": title, "pairs": len(table), "queries": int(table["query_id"].nunique()),
                                "human_grade_counts": np.bincount(table["human"], minlength=len(GRADES)).tolist(),
                                "labelers": results, "forest_plot": f"forest_{tag}.png"})  # fmt: skip

    report = {
        "command": "python scripts/reproduce_trec_dl.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "teacher": teacher,
                     "per_student": settings},  # fmt: skip
        "splits": [{"name": s.name, "train_queries": sorted(s.train_ids), "test_queries": sorted(s.test_ids),
                    "train_pairs": int(frame["query_id"].isin(s.train_ids).sum()),
                    "test_pairs": int(frame["query_id"].isin(s.test_ids).sum())} for s in splits],  # fmt: skip
        "splits_summary": "; ".join(f"{s.name}: {len(s.train_ids)} training queries "
                                    f"({int(frame['query_id'].isin(s.train_ids).sum())} pairs), {len(s.test_ids)} held out "
                                    f"({int(frame['query_id'].isin(s.test_ids).sum())} pairs)" for s in splits),  # fmt: skip
        "students": report_students,
        "evaluation_sets": evaluation_sets,
    }
    write_json(args.output / "results.json", report)
    with atomic_write(args.output / "results.md") as handle:
        handle.write(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
