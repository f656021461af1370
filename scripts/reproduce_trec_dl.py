#!/usr/bin/env python
"""Distil DeepSeek-V3's recorded TREC DL grades into small students; compare them with NIST's humans.

Protocol:

1. Load the judged pairs of one or more files (``--pairs``: NIST human grades plus recorded LLM
   grades; TREC DL 2019 and 2020 together hold 97 queries) and split them BY QUERY with a fixed
   seed: ``--test-fraction`` held out, ``--kfold K`` folds over all queries (every query held out
   once), or ``--cross-source`` (train on one file's queries, test on another's). No query is on
   both sides. ``--max-train-pairs-per-query`` spends the training budget on distinct queries:
   at most N pairs of each query, drawn within each teacher grade in proportion to its share.
2. The teacher's recorded grades of the training queries are the training records. The human
   grades are never used for training, only to score every labeler on the held-out queries.
3. Each student is trained (``labeler_utils.students.cross_encoder`` or ``labeler_utils.students.causal_lm.train``) and
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

``--learning-curve`` then retrains the students on growing subsets of each split's training queries
(``--curve-queries``) and pairs per query (``--curve-pairs``) and plots held-out QWK and Spearman
against them; ``--final-model DIR`` trains the first student on every query of the given files, for
``python -m labeler_utils label --model DIR``. ``summary.json`` holds the headline numbers.

Models, predictions and timings go to ``--work-dir`` (git-ignored ``runs/``); a student whose
model (and predictions) are there already is reused unless ``--force``. The causal students'
training writes a checkpoint every 50 steps: running the same command again after a crash resumes
it (``--force`` too resumes a checkpoint of the very same training). Results go to
``--output``: ``results.json``, ``results.md`` and ``forest_<set>.png``.

Examples (docs/results/trec_dl_2019, and the 5-fold run over both years of docs/results/trec_dl_cv):

    .venv/bin/python scripts/reproduce_trec_dl.py --students minilm-cross-encoder
    .venv/bin/python scripts/reproduce_trec_dl.py --pairs ../shared/benchmarks/trec-dl-2019/pairs.jsonl \
        ../shared/benchmarks/trec-dl-2020/pairs.jsonl --kfold 5 --students minilm-cross-encoder,minilm-bi-encoder \
        --max-train-pairs-per-query 32 --output docs/results/trec_dl_cv
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
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from labeler_utils.benchmarks.folds import (  # noqa: E402
    SOURCE_COLUMN,
    Split,
    cap_pairs_per_query,
    cross_source_splits,
    holdout_split,
    kfold_splits,
    load_pair_files,
    nested_query_subsets,
)
from labeler_utils.benchmarks.loaders import RECORDED_PREFIX, recorded_labelers  # noqa: E402
from labeler_utils.benchmarks.predictions import attach_predictions, read_predictions, write_predictions  # noqa: E402
from labeler_utils.core.artifacts import atomic_write, read_json, write_json  # noqa: E402
from labeler_utils.core.config import Profile  # noqa: E402
from labeler_utils.core.records import GRADES  # noqa: E402
from labeler_utils.evaluate import (  # noqa: E402
    NDCG_CUTOFF,
    QueryMetric,
    bootstrap_ci,
    paired_bootstrap,
    plot_forest,
    plot_learning_curve,
    query_metric,
)
from labeler_utils.students.base import LABELER_MANIFEST, grades_at_thresholds, share_matching_thresholds  # noqa: E402
from labeler_utils.students.registry import distilled_student, get_family  # noqa: E402
from labeler_utils.teacher import add_committee, labels_from_frame  # noqa: E402
from labeler_utils.throughput import PeakMemory, load_average, machine_info  # noqa: E402

SHARED = REPO_ROOT.parent / "shared" / "benchmarks"
DEFAULT_PAIRS = [SHARED / "trec-dl-2019" / "pairs.jsonl"]
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "results" / "trec_dl_2019"
DEFAULT_WORK_DIR = REPO_ROOT / "runs" / "reproduce_trec_dl"
#: Metrics of evaluate.py (bootstrapped from per-query statistics) reported for every labeler.
GRADE_METRICS = ("accuracy", "kappa", "qwk", "kappa_binary_ge2")
RANKING_METRICS = (f"ndcg@{NDCG_CUTOFF}", "pairwise_accuracy")
SPEARMAN = "spearman_expected"  # of expected relevance (else grade)
METRICS = (*GRADE_METRICS, SPEARMAN, *RANKING_METRICS)
METRIC_TITLES = {
    "accuracy": "acc",
    "kappa": "kappa",
    "qwk": "QWK",
    "kappa_binary_ge2": "kappa (>=2)",
    SPEARMAN: "Spearman E[rel]",
    f"ndcg@{NDCG_CUTOFF}": f"nDCG@{NDCG_CUTOFF}",
    "pairwise_accuracy": "pairwise acc",
}


@dataclass(frozen=True)
class StudentSpec:
    """A student the script can train: its family, the family config's settings, and its zero-shot row.

    ``zero_shot`` names a baseline shared by several students (their predictions are computed
    once), or is empty for the student's own untrained model. ``labels`` is what it is trained on:
    empty for ``--teacher-column``, :data:`COMMITTEE` for the distribution of all recorded judges,
    or another recorded judge's name (a weaker teacher).
    """

    family: str
    settings: dict[str, Any] = field(default_factory=dict)
    zero_shot: str = ""
    description: str = ""
    labels: str = ""

    def label_column(self, teacher: str) -> str:
        """The frame column of the grades this student is trained on."""
        if not self.labels:
            return teacher
        return self.labels if self.labels == COMMITTEE else RECORDED_PREFIX + self.labels


COMMITTEE = (
    "committee"  # the per-pair distribution of every recorded judge's grade (labeler_utils.teacher.add_committee)
)
WEAK_TEACHER = "llama3_8b_umbrela"
CHECKPOINT_STEPS = 50  # causal students: a killed training resumes from its last checkpoint when rerun
BOOKKEEPING = {"save_steps", "logging_steps"}  # settings that do not change the trained model
COSINE = "minilm-bi-encoder-cosine"
COSINE_LABELER = "minilm bi-encoder cosine zero-shot"
COSINE_FIT_PAIRS = 2000  # the cosine's cut points: quantiles over at most this many random training pairs
ZERO_SHOT_DESCRIPTIONS = {
    COSINE: "bi-encoder cosine of the same MiniLM, thresholds matching the teacher's grade shares on the training pairs "
    f"(at most {COSINE_FIT_PAIRS} of them, drawn at random)",
    "": "base model, same one-pass grade-token scoring",
}
ENCODER = {"epochs": 2.0, "batch_size": 16, "max_length": 256}
CAUSAL = {"epochs": 2.0, "batch_size": 8, "max_length": 256, "qlora": None}
QUERY_TWICE = {**CAUSAL, "base_model": "gemma3-270m", "prompt_format": "query-document-query"}
STUDENTS: dict[str, StudentSpec] = {
    "minilm-cross-encoder": StudentSpec("cross_encoder", ENCODER, COSINE),
    "minilm-cross-encoder-balanced": StudentSpec("cross_encoder", {**ENCODER, "class_balance": True}, COSINE),
    "minilm-cross-encoder-regression": StudentSpec(
        "cross_encoder",
        {**ENCODER, "objective": "regression"},
        COSINE,
        "one logit, binary cross-entropy to the expected grade / 3",
    ),
    "minilm-cross-encoder-ordinal": StudentSpec(
        "cross_encoder",
        {**ENCODER, "objective": "ordinal"},
        COSINE,
        "cumulative-link head: three logits towards P(grade > k)",
    ),
    "minilm-bi-encoder": StudentSpec(
        "bi_encoder",
        {**ENCODER, "epochs": 1.0},
        COSINE,
        "CoSENT, each batch one query's pairs (ranking within a query)",
    ),
    "minilm-bi-encoder-mixed": StudentSpec(
        "bi_encoder", {**ENCODER, "epochs": 1.0, "batching": "random"}, COSINE, "CoSENT, batches mixing queries"
    ),
    "minilm-bi-encoder-committee": StudentSpec(
        "bi_encoder",
        {**ENCODER, "epochs": 1.0},
        COSINE,
        "as minilm-bi-encoder, trained on the committee's expected grade",
        labels=COMMITTEE,
    ),
    "minilm-cross-encoder-committee": StudentSpec(
        "cross_encoder",
        ENCODER,
        COSINE,
        "as minilm-cross-encoder, cross-entropy to the committee's distribution",
        labels=COMMITTEE,
    ),
    "minilm-bi-encoder-from-llama3-8b": StudentSpec(
        "bi_encoder",
        {**ENCODER, "epochs": 1.0},
        COSINE,
        "as minilm-bi-encoder, trained on Llama-3-8B's grades (a weaker teacher)",
        labels=WEAK_TEACHER,
    ),
    "smollm2-135m-instruct": StudentSpec("causal_lm", {**CAUSAL, "base_model": "smollm2-135m-instruct"}),
    "gemma3-270m": StudentSpec("causal_lm", {**CAUSAL, "base_model": "gemma3-270m"}),
    "gemma3-270m-query-twice": StudentSpec("causal_lm", QUERY_TWICE),
    "gemma3-270m-query-twice-ordinal": StudentSpec(
        "causal_lm",
        {**QUERY_TWICE, "objective": "ordinal"},
        description="as gemma3-270m-query-twice, binary cross-entropy of P(grade > k) over the grade tokens",
    ),
}
#: The student of the project's default family (``Profile.student_family``): summary.json's "default_student".
DEFAULT_STUDENT = next(name for name, spec in STUDENTS.items() if spec.family == Profile.student_family)


def query_splits(
    frame: pd.DataFrame,
    test_fraction: float,
    seed: int,
    kfold: int | None = None,
    cross_source: bool = False,
    only: Sequence[str] = (),
) -> list[Split]:
    """The hold-out split, ``kfold`` folds, or the train-on-one-file / test-on-another splits, by query;
    ``only`` keeps the splits of those names (the same folds as a full run, fewer of them)."""
    if cross_source:
        splits = cross_source_splits(frame)
    else:
        splits = kfold_splits(frame, kfold, seed) if kfold else holdout_split(frame, test_fraction, seed)
    unknown = sorted(set(only) - {s.name for s in splits})
    if unknown:
        raise SystemExit(f"--splits {unknown}: this protocol's splits are {[s.name for s in splits]}")
    return [s for s in splits if s.name in only] if only else splits


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


def parse_sizes(text: str) -> list[int | None]:
    """``"5,10,all"`` -> [5, 10, None]."""
    return [None if item.strip() == "all" else int(item) for item in text.split(",") if item.strip()]


# --------------------------------------------------------------------------------------------
# Training and labelling, each cached in the work folder
# --------------------------------------------------------------------------------------------


def student_config(spec: StudentSpec, epochs: float | None, seed: int, soft_labels: bool, bf16: bool) -> Any:
    """The family's config for this student; flags that apply to some families only are set where they exist."""
    settings = {**spec.settings, "seed": seed, **({"epochs": epochs} if epochs is not None else {})}
    return get_family(spec.family).make_config(
        settings,
        where_defined={
            "soft_labels": soft_labels,
            "soft_label_weight": 0.5 if soft_labels else 0.0,
            "bf16": bf16 or None,
            "save_steps": CHECKPOINT_STEPS,
        },
    )


def _same_training(trained: dict[str, Any], config: Any) -> bool:
    """Whether a manifest's config trains the same model as ``config`` (checkpoint and logging intervals aside).

    A setting missing from the manifest (added to the config class later) counts as its default.
    """
    defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    wanted = json.loads(json.dumps(asdict(config)))
    trained = {**defaults, **trained}
    return {k: v for k, v in trained.items() if k not in BOOKKEEPING} == {
        k: v for k, v in wanted.items() if k not in BOOKKEEPING
    }


def train(
    spec: StudentSpec, records: list[dict[str, Any]], folder: Path, config: Any, data: dict[str, Any], force: bool
) -> dict[str, Any]:
    """Train (or reuse) one student; returns its manifest plus measured wall time and peak RSS."""
    model_dir = distilled_student(folder)
    stats_path = folder / "train_stats.json"
    if model_dir is not None and not force:
        manifest = read_json(model_dir / LABELER_MANIFEST)
        if not _same_training(manifest["config"], config) or manifest["data"] != data:
            raise SystemExit(f"{model_dir} was trained with other settings or data; pass --force or another --work-dir")
        print(f"reusing {model_dir}")
        return {**manifest, **(read_json(stats_path) if stats_path.exists() else {})}
    load_before, start = load_average(), time.perf_counter()
    with PeakMemory() as memory:
        manifest = get_family(spec.family).train(records, folder, config, data)
    stats_record = {
        "wall_seconds": time.perf_counter() - start,
        "stopped_seconds": memory.stopped_seconds,
        "train_active_seconds": manifest["train_seconds"] - memory.stopped_seconds,
        "peak_rss_mb": round(memory.peak_mb, 1),
        "load_before": load_before,
        "load_after": load_average(),
    }
    write_json(stats_path, stats_record)
    return {**manifest, **stats_record}


Labeling = Callable[[], list[dict[str, Any]]]


def timed_predictions(
    prepare: Callable[[], Labeling], path: Path, pairs: set[tuple[str, str]], batch_size: int, force: bool
) -> dict[str, Any]:
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
    seconds = (
        time.perf_counter() - start - memory.stopped_seconds
    )  # time stopped by a signal (job control) is not labeling
    write_predictions(path, pd.DataFrame(rows))
    timing = {
        "pairs": len(rows),
        "seconds": seconds,
        "stopped_seconds": memory.stopped_seconds,
        "labels_per_second": len(rows) / seconds,
        "batch_size": batch_size,
        "peak_rss_mb": round(memory.peak_mb, 1),
        "load_before": load_before,
        "load_after": load_average(),
    }
    write_json(timing_path, timing)
    return timing


def release_memory() -> None:
    """Free what the last phase left behind, so the next phase's peak RSS is its own (glibc: give heap back)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def training_records(
    frame: pd.DataFrame,
    train_ids: frozenset[str],
    teacher: str,
    name: str,
    settings: dict[str, dict[str, Any]],
    seed: int,
) -> list[dict[str, Any]]:
    """The student's graded records of the training queries (the teacher's, the committee's or another judge's),
    capped per query (stratified by grade) and in total."""
    column = STUDENTS[name].label_column(teacher)
    records = labels_from_frame(
        frame[frame["query_id"].isin(train_ids)],
        column,
        column,
        distribution_prefix=COMMITTEE if column == COMMITTEE else None,
    )
    records = cap_pairs_per_query(records, settings["max_train_pairs_per_query"].get(name), seed)
    max_train = settings["max_train_pairs"].get(name)
    if max_train is not None and max_train < len(records):
        records = random.Random(seed).sample(records, max_train)
    return records


def student_predictions(
    name: str,
    spec: StudentSpec,
    split: Split,
    frame: pd.DataFrame,
    teacher: str,
    args: argparse.Namespace,
    settings: dict[str, dict[str, Any]],
    zero_shot: bool = True,
) -> dict[str, Any]:
    """Label one split's evaluation pairs zero-shot (unless ``zero_shot`` is off), train the student, label them
    distilled. Returns the training record and, per stage, the labeler name, predictions path and timing.
    A shared zero-shot baseline (the bi-encoder cosine of the MiniLM students) is labelled once per split.
    """
    folder = args.work_dir / name / split.name
    train_records = training_records(frame, split.train_ids, teacher, name, settings, args.seed)
    cap = settings["max_eval_pairs_per_query"].get(name)
    test_records = evaluation_pairs(frame, split, cap, args.seed).to_dict("records")
    eval_tag, batch = (f"cap{cap}" if cap else "all"), args.eval_batch_size
    outputs: dict[str, Any] = {"eval_set": eval_tag, "stages": {}}
    family = get_family(spec.family)
    config = student_config(spec, settings["epochs"].get(name), args.seed, args.soft_labels, args.bf16)
    pairs = {(r["query_id"], r["doc_id"]) for r in test_records}

    def record(stage: str, labeler_name: str, path: Path, prepare: Callable[[], Any]) -> None:
        timing = timed_predictions(
            lambda: partial(prepare().label_records, test_records, labeler_name, batch_size=batch),
            path,
            pairs,
            batch,
            args.force,
        )
        outputs["stages"][stage] = {"labeler": labeler_name, "path": str(path), "timing": timing}
        release_memory()

    if zero_shot and spec.zero_shot:
        thresholds_from = teacher.removeprefix(RECORDED_PREFIX)  # the cut points come from the teacher's grade shares
        path = args.work_dir / spec.zero_shot / split.name / f"zero-shot.{thresholds_from}.{eval_tag}.predictions.jsonl"
        fit_records = labels_from_frame(frame[frame["query_id"].isin(split.train_ids)], teacher, teacher)
        if len(fit_records) > COSINE_FIT_PAIRS:
            fit_records = random.Random(args.seed).sample(fit_records, COSINE_FIT_PAIRS)
        record("zero-shot", COSINE_LABELER, path, lambda: family.zero_shot(fit_records, config))
    elif zero_shot:
        record(
            "zero-shot",
            f"{name} zero-shot",
            folder / f"zero-shot.{eval_tag}.predictions.jsonl",
            lambda: family.zero_shot(train_records, config),
        )

    data = {
        "benchmark": " ".join(str(p) for p in args.pairs) if len(args.pairs) > 1 else str(args.pairs[0]),
        "teacher": spec.label_column(teacher),
        "split": split.name,
        "seed": args.seed,
        "test_fraction": None if args.kfold or args.cross_source else args.test_fraction,
        "kfold": args.kfold,
        "train_queries": len(split.train_ids),
        "train_pairs": len(train_records),
        "max_train_pairs": settings["max_train_pairs"].get(name),
        **(
            {"max_train_pairs_per_query": settings["max_train_pairs_per_query"][name]}
            if name in settings["max_train_pairs_per_query"]
            else {}
        ),
    }
    trained = train(spec, train_records, folder, config, data, args.force)
    outputs["train"] = {
        key: trained.get(key)
        for key in (
            "train_seconds",
            "train_active_seconds",
            "stopped_seconds",
            "wall_seconds",
            "peak_rss_mb",
            "train_examples",
            "global_steps",
            "train_loss",
            "truncated_documents",
            "load_before",
            "load_after",
            "method",
            "max_length",
            "resumed_from",
        )
    }
    outputs["config"] = trained["config"]
    release_memory()
    record(
        "distilled",
        f"{name} distilled",
        folder / f"distilled.{eval_tag}.predictions.jsonl",
        lambda: family.load(folder),
    )
    return outputs


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def share_calibrated(
    predictions: pd.DataFrame, frame: pd.DataFrame, splits: Sequence[Split], teacher: str
) -> pd.DataFrame:
    """The predictions re-graded by calibrated thresholds instead of the arg-max.

    Per split, the labeler's expected relevance on the held-out pairs it labelled is cut at the
    quantiles that give the teacher's grade shares on that split's training pairs (``teacher``: the
    column of the grades the student was trained on). Only those training grades and the labeler's
    own scores are used, never a human grade.
    """
    parts = []
    for split in splits:
        part = predictions[predictions["query_id"].isin(split.test_ids)].copy()
        counts = np.bincount(
            frame.loc[frame["query_id"].isin(split.train_ids), teacher].dropna().astype(int), minlength=len(GRADES)
        )
        scores = part["expected_relevance"].to_numpy()
        part["grade"] = pd.array(grades_at_thresholds(scores, share_matching_thresholds(scores, counts)), dtype="Int64")
        parts.append(part)
    return pd.concat(parts)


def spearman_of_scores(labeler: str) -> QueryMetric:
    """Spearman correlation of the labeler's expected relevance (else grade) with the human grades."""
    return query_metric(SPEARMAN, labeler)


def evaluate_set(
    frame: pd.DataFrame,
    labelers: Sequence[str],
    teacher: str,
    n_boot: int,
    seed: int,
    own_teachers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Every metric with its query-bootstrap interval, and each labeler's QWK minus the teacher's and minus the
    untrained cosine's (paired, when the cosine is among ``labelers``); ``own_teachers`` maps a student trained
    on other grades to that column, also compared pairwise."""
    results: dict[str, Any] = {}
    for labeler in labelers:
        metrics = {
            name: bootstrap_ci(frame, query_metric(name, labeler), n_boot, seed)
            for name in (*GRADE_METRICS, *RANKING_METRICS)
        }
        metrics[SPEARMAN] = bootstrap_ci(frame, spearman_of_scores(labeler), n_boot, seed)
        results[labeler] = {
            "n": int(frame[labeler].notna().sum()),
            "n_missing": int(frame[labeler].isna().sum()),
            "metrics": {name: metrics[name] for name in METRICS},
        }
        if labeler != teacher:
            results[labeler]["qwk_minus_teacher"] = paired_bootstrap(frame, labeler, teacher, "qwk", n_boot, seed)
        if COSINE_LABELER in labelers and labeler not in (teacher, COSINE_LABELER):
            results[labeler]["qwk_minus_cosine"] = paired_bootstrap(frame, labeler, COSINE_LABELER, "qwk", n_boot, seed)
        own = (own_teachers or {}).get(labeler)
        if own is not None and own != teacher:
            results[labeler]["qwk_minus_own_teacher"] = {
                "teacher": own,
                **paired_bootstrap(frame, labeler, own, "qwk", n_boot, seed),
            }
    return results


def _interval(result: dict[str, Any]) -> str:
    return f"{result['estimate']:.3f} [{result['ci_low']:.3f}, {result['ci_high']:.3f}]"


def _difference(paired: dict[str, Any] | None) -> str:
    """A paired difference with its interval, or a dash."""
    return f"{paired['difference']:+.3f} [{paired['ci_low']:+.3f}, {paired['ci_high']:+.3f}]" if paired else "–"


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
        f"# {report['sources_title']}: distilled students vs DeepSeek-V3, scored against NIST human grades",
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
        lines += [
            f"## {eval_set['title']}",
            "",
            f"{eval_set['pairs']} pairs, {eval_set['queries']} held-out queries; human grade counts "
            f"{eval_set['human_grade_counts']}.",
            "",
            "| labeler | n | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " | QWK - teacher | QWK - cosine |",
            "|---|---|" + "---|" * (len(METRICS) + 2),
        ]
        for labeler, result in eval_set["labelers"].items():
            diffs = [_difference(result.get(key)) for key in ("qwk_minus_teacher", "qwk_minus_cosine")]
            cells = [_interval(result["metrics"][m]) for m in METRICS]
            shown = f"{labeler} (teacher)" if labeler == report["settings"]["teacher"] else labeler
            lines.append(f"| {shown} | {result['n']} | " + " | ".join(cells + diffs) + " |")
        lines.append("")
        own = {
            labeler: r["qwk_minus_own_teacher"]
            for labeler, r in eval_set["labelers"].items()
            if "qwk_minus_own_teacher" in r
        }
        lines += [
            f"- {labeler}: QWK minus its own teacher's (`{d['teacher']}`, paired) {d['difference']:+.3f} "
            f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
            for labeler, d in own.items()
        ] + ([""] if own else [])
        if len(eval_set["per_split"]) > 1:
            names = list(eval_set["per_split"])
            lines += [
                f"Per split: QWK [95% CI] on each split's held-out queries ({eval_set['title'].lower()}).",
                "",
                "| labeler | " + " | ".join(names) + " |",
                "|---|" + "---|" * len(names),
            ]
            for labeler in eval_set["labelers"]:
                lines.append(
                    f"| {labeler} | "
                    + " | ".join(_interval(eval_set["per_split"][n][labeler]["qwk"]) for n in names)
                    + " |"
                )
            lines.append("")
    if report.get("learning_curve"):
        lines += learning_curve_markdown(report["learning_curve"])
    lines += [
        "## Cost on this CPU",
        "",
        "| labeler (split) | labels/s (batch) | labelled pairs | labelling peak RSS MB | train pairs x epochs | "
        "train steps | train time | train peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
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
                train_cells = (
                    [
                        f"{train['train_examples']} x {result['config']['epochs']:g}",
                        str(train["global_steps"]),
                        _train_time(train),
                        str(train["peak_rss_mb"]),
                    ]
                    if stage == "distilled"
                    else ["–"] * 4
                )
                lines.append(
                    f"| {row} | {timing['labels_per_second']:.2f} ({timing['batch_size']}) | {timing['pairs']} | "
                    f"{timing['peak_rss_mb']} | " + " | ".join(train_cells) + " |"
                )
    lines += [
        "",
        "Peak RSS is the whole process's resident memory during the phase (sampled every 50 ms), after "
        "freeing the previous phase. Labels/s include tokenisation; train time is the trainer's wall time. "
        "Time during which the job was stopped by a signal (job control) is taken out of both; the "
        "load average is recorded with every timing in results.json.",
        "",
    ]
    zero_shot = {
        split["stages"]["zero-shot"]["labeler"]: student["zero_shot"]
        for student in report["students"].values()
        for split in student["splits"].values()
    }
    lines += ["", "Zero-shot rows: " + "; ".join(f"{name}: {how}" for name, how in zero_shot.items()) + ".", ""]
    return "\n".join(lines)


def learning_curve_markdown(curve: dict[str, Any]) -> list[str]:
    """The learning-curve section of results.md: pooled held-out QWK and Spearman per training size."""
    lines = [
        "## Learning curve",
        "",
        f"Each point: the student retrained on the first N training queries of every split (nested, seeded) "
        f"with at most P teacher-labelled pairs per query (stratified by grade), scored on the held-out pairs of "
        f"the splits (the 'eval pairs' column), pooled. Plot: `{curve['plot']}`.",
        "",
        "| student | training queries per split | pairs per query (cap) | training pairs (mean per split) | eval pairs | "
        "QWK [95% CI] | QWK share-calibrated | Spearman E[rel] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for point in curve["points"]:
        lines.append(
            f"| {point['student']} | {point['queries']} | {point['pairs_per_query'] or 'all'} | "
            f"{point['mean_train_pairs']:.0f} | {point['eval_pairs']} | {_interval(point['qwk'])} | {_interval(point['qwk_calibrated'])} | "
            f"{_interval(point['spearman'])} |"
        )
    return [*lines, ""]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    per_student = "a number for every student, or name=value,name=value"
    parser.add_argument(
        "--pairs",
        type=Path,
        nargs="+",
        default=DEFAULT_PAIRS,
        help="judged pair files (TREC DL pairs.jsonl schema); several are read as one table with "
        "distinct query ids (default: %(default)s)",
    )
    parser.add_argument(
        "--teacher-column",
        default="deepseek_v3_umbrela",
        help="recorded labeler whose grades are distilled (llm_labels.<name>; default: %(default)s)",
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.5, help="share of queries held out (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="split, subsample, training and bootstrap seed (default: %(default)s)"
    )
    protocol = parser.add_mutually_exclusive_group()
    protocol.add_argument(
        "--kfold",
        type=int,
        default=None,
        help="K folds by query instead of one hold-out split; metrics pool the K held-out folds",
    )
    protocol.add_argument(
        "--cross-source",
        action="store_true",
        help="train on the queries of each --pairs file, test on those of each other file",
    )
    parser.add_argument(
        "--splits",
        help="comma list of the protocol's split names to run and pool (e.g. fold1of5,fold2of5; default: all), "
        "for a slow student on part of the folds",
    )
    parser.add_argument(
        "--students",
        default="minilm-cross-encoder",
        help=f"comma list among {', '.join(STUDENTS)} (default: %(default)s)",
    )
    parser.add_argument(
        "--epochs",
        help=f"training epochs ({per_student}); default per student: "
        + ", ".join(f"{n} {s.settings['epochs']:g}" for n, s in STUDENTS.items()),
    )
    parser.add_argument(
        "--max-train-pairs", help=f"random subsample of the training pairs ({per_student}); default all"
    )
    parser.add_argument(
        "--max-train-pairs-per-query",
        help=f"at most this many training pairs of each query, drawn within each teacher grade in "
        f"proportion to its share ({per_student}); default all",
    )
    parser.add_argument(
        "--max-eval-pairs-per-query",
        help=f"random held-out pairs per query ({per_student}); default all. "
        "DeepSeek-V3 and the other students are then also scored on exactly these pairs",
    )
    parser.add_argument(
        "--soft-labels",
        action="store_true",
        help="train on the teacher's grade distributions where records have them (TREC DL's recorded "
        "labels have none, so this changes nothing there)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast while training the causal LM students (a GPU, or a CPU with AVX512-BF16: "
        "1.2x faster than float32 here); default: float32 on a CPU, bfloat16 for QLoRA on a GPU",
    )
    parser.add_argument(
        "--learning-curve",
        action="store_true",
        help="also retrain each student on growing subsets of every split's training data",
    )
    parser.add_argument(
        "--curve-students", help="learning curve: comma list of the students it retrains (default: all)"
    )
    parser.add_argument(
        "--curve-queries",
        default="5,10,20,40,all",
        help="learning curve: training queries per split (default: %(default)s)",
    )
    parser.add_argument(
        "--curve-pairs",
        default="20,50",
        help="learning curve: pairs per query, 'all' for no cap (default: %(default)s)",
    )
    parser.add_argument(
        "--curve-eval-pairs-per-query",
        type=int,
        help="learning curve: score each point on at most this many random held-out pairs per query "
        "(default: the student's --max-eval-pairs-per-query)",
    )
    parser.add_argument(
        "--final-model",
        type=Path,
        help="after the splits, train the first student on every query of --pairs into this folder",
    )
    parser.add_argument("--eval-batch-size", type=int, default=16, help="labelling batch size (default: %(default)s)")
    parser.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap resamples over queries (default: %(default)s)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results folder (default: %(default)s)")
    parser.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="models, predictions and timings (default: %(default)s)"
    )
    parser.add_argument(
        "--force", action="store_true", help="retrain and relabel even when the work folder has results"
    )
    return parser


def pooled_predictions(outputs: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One labeler's predictions over every split's held-out pairs."""
    return pd.concat([read_predictions(output["path"]) for output in outputs])


def evaluation_sets(
    frame: pd.DataFrame,
    splits: Sequence[Split],
    students: Sequence[str],
    report_students: dict[str, Any],
    teacher: str,
    settings: dict[str, Any],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Pooled and per-split agreement tables, one per evaluation set (all held-out pairs, or a per-query cap)."""
    caps = sorted(
        {settings["max_eval_pairs_per_query"].get(n) for n in students}, key=lambda c: (c is not None, c or 0)
    )
    sets = []
    for cap in caps:
        table = pd.concat([evaluation_pairs(frame, s, cap, args.seed) for s in splits])
        labelers = [teacher]
        own_teachers: dict[str, str] = {}
        for name in students:
            if settings["max_eval_pairs_per_query"].get(name) not in (None, cap):
                continue  # its predictions do not cover every pair of this set
            for stage in ("zero-shot", "distilled"):
                outputs = [report_students[name]["splits"][s.name]["stages"][stage] for s in splits]
                if outputs[0]["labeler"] in labelers:
                    continue  # a shared zero-shot baseline
                predictions = pooled_predictions(outputs)
                table = attach_predictions(table, predictions, outputs[0]["labeler"])
                labelers.append(outputs[0]["labeler"])
                if stage == "distilled":
                    calibrated = f"{outputs[0]['labeler']}, share-calibrated"
                    source = STUDENTS[name].label_column(teacher)
                    table = attach_predictions(table, share_calibrated(predictions, frame, splits, source), calibrated)
                    labelers.append(calibrated)
                    own_teachers.update({outputs[0]["labeler"]: source, calibrated: source})
                    if source != teacher and source not in labelers:
                        labelers.insert(1, source)  # the student's own teacher, scored on the same pairs
        title = "All held-out pairs" if cap is None else f"At most {cap} random held-out pairs per query"
        print(f"== evaluating: {title}")
        results = evaluate_set(table, labelers, teacher, args.n_boot, args.seed, own_teachers)
        per_split = (
            {
                s.name: {
                    labeler: {
                        "qwk": bootstrap_ci(part, query_metric("qwk", labeler), args.n_boot, args.seed),
                        SPEARMAN: bootstrap_ci(part, spearman_of_scores(labeler), args.n_boot, args.seed),
                    }
                    for labeler in labelers
                }
                for s in splits
                for part in [table[table["query_id"].isin(s.test_ids)]]
            }
            if len(splits) > 1
            else {}
        )
        tag = "all" if cap is None else f"cap{cap}"
        figure = plot_forest({n: r["metrics"] for n, r in results.items()}, METRICS)
        args.output.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.output / f"forest_{tag}.png", "wb") as handle:
            figure.savefig(handle, format="png", dpi=110)
        sets.append(
            {
                "tag": tag,
                "title": title,
                "pairs": len(table),
                "queries": int(table["query_id"].nunique()),
                "human_grade_counts": np.bincount(table["human"], minlength=len(GRADES)).tolist(),
                "labelers": results,
                "per_split": per_split,
                "forest_plot": f"forest_{tag}.png",
            }
        )
    return sets


def learning_curve(
    frame: pd.DataFrame,
    splits: Sequence[Split],
    students: Sequence[str],
    teacher: str,
    settings: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Each student retrained on nested subsets of every split's training queries, at each pairs-per-query cap."""
    points = []
    for name in students:
        spec = STUDENTS[name]
        for pairs_per_query in parse_sizes(args.curve_pairs):
            cap = args.curve_eval_pairs_per_query or settings["max_eval_pairs_per_query"].get(name)
            point_settings = {
                **settings,
                "max_train_pairs_per_query": {**settings["max_train_pairs_per_query"], name: pairs_per_query},
                "max_eval_pairs_per_query": {**settings["max_eval_pairs_per_query"], name: cap},
            }
            if pairs_per_query is None:
                point_settings["max_train_pairs_per_query"].pop(name)
            if cap is None:
                point_settings["max_eval_pairs_per_query"].pop(name)
            for size in parse_sizes(args.curve_queries):
                outputs, train_pairs = [], []
                for split in splits:
                    n, subset = next(iter(nested_query_subsets(sorted(split.train_ids), [size], args.seed).items()))
                    # the main run's model (its folder also keeps predictions of other evaluation caps apart)
                    same = subset == split.train_ids and pairs_per_query == settings["max_train_pairs_per_query"].get(
                        name
                    )
                    sub = (
                        split
                        if same
                        else Split(f"{split.name}-q{n}-p{pairs_per_query or 'all'}", subset, split.test_ids)
                    )
                    print(f"== learning curve: {name}, {sub.name}")
                    result = student_predictions(name, spec, sub, frame, teacher, args, point_settings, zero_shot=False)
                    outputs.append(result["stages"]["distilled"])
                    train_pairs.append(result["train"]["train_examples"])
                table = pd.concat([evaluation_pairs(frame, s, cap, args.seed) for s in splits])
                predictions = pooled_predictions(outputs)
                table = attach_predictions(table, predictions, "student")
                table = attach_predictions(
                    table, share_calibrated(predictions, frame, splits, spec.label_column(teacher)), "calibrated"
                )
                points.append(
                    {
                        "student": name,
                        "queries": size or "all",
                        "pairs_per_query": pairs_per_query,
                        "eval_pairs": len(table),
                        "mean_train_pairs": float(np.mean(train_pairs)),
                        "qwk": bootstrap_ci(table, query_metric("qwk", "student"), args.n_boot, args.seed),
                        "qwk_calibrated": bootstrap_ci(
                            table, query_metric("qwk", "calibrated"), args.n_boot, args.seed
                        ),
                        "spearman": bootstrap_ci(table, spearman_of_scores("student"), args.n_boot, args.seed),
                    }
                )
    figure = plot_learning_curve(points, float(np.mean([len(s.train_ids) for s in splits])))
    with atomic_write(args.output / "learning_curve.png", "wb") as handle:
        figure.savefig(handle, format="png", dpi=110)
    return {"points": points, "plot": "learning_curve.png"}


def final_model(
    name: str, frame: pd.DataFrame, teacher: str, settings: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Train ``name`` on every query of the files into ``--final-model``, ready for the ``label`` command."""
    spec = STUDENTS[name]
    everything = frozenset(frame["query_id"])
    records = training_records(frame, everything, teacher, name, settings, args.seed)
    config = student_config(spec, settings["epochs"].get(name), args.seed, args.soft_labels, args.bf16)
    data = {
        "benchmark": [str(p) for p in args.pairs],
        "teacher": spec.label_column(teacher),
        "split": "all queries",
        "train_queries": len(everything),
        "train_pairs": len(records),
        "max_train_pairs_per_query": settings["max_train_pairs_per_query"].get(name),
    }
    print(f"== final model: {name} on all {len(everything)} queries ({len(records)} pairs) -> {args.final_model}")
    trained = train(spec, records, args.final_model, config, data, args.force)
    print(f"label with: python -m labeler_utils label --model {args.final_model} --input PAIRS --output OUT")
    return {
        "student": name,
        "folder": str(args.final_model),
        "train_examples": trained["train_examples"],
        "train_seconds": trained["train_seconds"],
        "peak_rss_mb": trained.get("peak_rss_mb"),
    }


def summary(report: dict[str, Any], students: Sequence[str], teacher: str) -> dict[str, Any]:
    """The headline numbers (summary.json), from the evaluation set over all held-out pairs when there is one."""
    eval_set = next((e for e in report["evaluation_sets"] if e["tag"] == "all"), report["evaluation_sets"][0])
    labelers = eval_set["labelers"]

    def qwk(labeler: str) -> float | None:
        return labelers[labeler]["metrics"]["qwk"]["estimate"] if labeler in labelers else None

    def scored_row(labeler: str, calibrated: str) -> dict[str, Any]:
        """A labeler's numbers on the first evaluation set that scores it (all pairs, else a per-query cap)."""
        scored = next((e for e in report["evaluation_sets"] if labeler in e["labelers"]), eval_set)
        found = scored["labelers"]
        result, calibrated_result = found.get(labeler, {}), found.get(calibrated, {})
        return {
            "evaluation_set": scored["title"],
            "qwk": result.get("metrics", {}).get("qwk", {}).get("estimate"),
            "qwk_share_calibrated": calibrated_result.get("metrics", {}).get("qwk", {}).get("estimate"),
            "spearman": result.get("metrics", {}).get(SPEARMAN, {}).get("estimate"),
            "teacher_qwk_same_pairs": found[teacher]["metrics"]["qwk"]["estimate"],
            "qwk_minus_teacher": result.get("qwk_minus_teacher"),
            "qwk_minus_cosine": result.get("qwk_minus_cosine"),
        }

    rows = {name: scored_row(f"{name} distilled", f"{name} distilled, share-calibrated") for name in students}
    default = DEFAULT_STUDENT if DEFAULT_STUDENT in students else None
    return {
        "protocol": report["protocol"],
        "queries": int(len({q for s in report["splits"] for q in s["test_queries"]})),
        "folds": len(report["splits"]),
        "evaluation_set": eval_set["title"],
        "pairs": eval_set["pairs"],
        "teacher": teacher,
        "teacher_qwk": qwk(teacher),
        "cosine_qwk": qwk(COSINE_LABELER),
        "default_student": default,
        "default_student_qwk": rows[default]["qwk"] if default else None,
        "students": rows,
        "best_student": max(  # by QWK minus the teacher's on the same pairs: fair across evaluation sets
            rows, key=lambda n: (rows[n]["qwk_minus_teacher"] or {}).get("difference", -np.inf)
        ),
        "command": report["command"],
        "date": report["date"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    students = [name.strip() for name in args.students.split(",") if name.strip()]
    unknown = [name for name in students if name not in STUDENTS]
    if unknown:
        raise SystemExit(f"unknown student(s) {unknown}; choose among {list(STUDENTS)}")
    for name in students:  # import every family used now: a run of hours never picks up half-edited code later
        get_family(STUDENTS[name].family).import_module()
    settings = {
        "epochs": parse_per_student(args.epochs, students, float),
        "max_train_pairs": parse_per_student(args.max_train_pairs, students, int),
        "max_train_pairs_per_query": parse_per_student(args.max_train_pairs_per_query, students, int),
        "max_eval_pairs_per_query": parse_per_student(args.max_eval_pairs_per_query, students, int),
    }
    teacher = (
        args.teacher_column
        if args.teacher_column.startswith(RECORDED_PREFIX)
        else RECORDED_PREFIX + args.teacher_column
    )
    machine = machine_info()
    frame = load_pair_files(args.pairs)
    if teacher not in frame.columns:
        raise SystemExit(
            f"{args.pairs} have no recorded labeler {teacher!r}; they have {[c for c in frame if c.startswith(RECORDED_PREFIX)]}"
        )
    frame = add_committee(frame, recorded_labelers(frame), COMMITTEE)
    only = [name.strip() for name in (args.splits or "").split(",") if name.strip()]
    splits = query_splits(frame, args.test_fraction, args.seed, args.kfold, args.cross_source, only)
    protocol = "cross-source" if args.cross_source else f"{args.kfold}-fold" if args.kfold else "holdout"
    if only:
        protocol += f" ({len(splits)} of its splits: {', '.join(s.name for s in splits)})"

    report_students: dict[str, Any] = {}
    for name in students:
        spec = STUDENTS[name]
        report_students[name] = {
            "family": spec.family,
            "zero_shot": ZERO_SHOT_DESCRIPTIONS[spec.zero_shot],
            "description": spec.description,
            "splits": {},
        }
        for split in splits:
            print(f"== {name}, {split.name}")
            report_students[name]["splits"][split.name] = student_predictions(
                name, spec, split, frame, teacher, args, settings
            )

    sources = list(dict.fromkeys(frame[SOURCE_COLUMN]))
    report = {
        "command": "python scripts/reproduce_trec_dl.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "protocol": protocol,
        "sources": sources,
        "sources_title": " + ".join(sources),
        "settings": {
            **{
                k: [str(p) for p in v] if k == "pairs" else str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
            },
            "teacher": teacher,
            "per_student": settings,
        },
        "splits": [
            {
                "name": s.name,
                "train_queries": sorted(s.train_ids),
                "test_queries": sorted(s.test_ids),
                "train_pairs": int(frame["query_id"].isin(s.train_ids).sum()),
                "test_pairs": int(frame["query_id"].isin(s.test_ids).sum()),
            }
            for s in splits
        ],
        "splits_summary": "; ".join(
            f"{s.name}: {len(s.train_ids)} training queries "
            f"({int(frame['query_id'].isin(s.train_ids).sum())} pairs), {len(s.test_ids)} held out "
            f"({int(frame['query_id'].isin(s.test_ids).sum())} pairs)"
            for s in splits
        ),
        "students": report_students,
        "evaluation_sets": evaluation_sets(frame, splits, students, report_students, teacher, settings, args),
    }
    if args.learning_curve:
        curve_students = [n.strip() for n in (args.curve_students or args.students).split(",") if n.strip()]
        if set(curve_students) - set(students):
            raise SystemExit(f"--curve-students {sorted(set(curve_students) - set(students))} are not in --students")
        report["learning_curve"] = learning_curve(frame, splits, curve_students, teacher, settings, args)
    if args.final_model:
        report["final_model"] = final_model(students[0], frame, teacher, settings, args)
    write_json(args.output / "results.json", report)
    write_json(args.output / "summary.json", summary(report, students, teacher))
    with atomic_write(args.output / "results.md") as handle:
        handle.write(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
