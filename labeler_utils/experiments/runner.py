"""Training and labelling, each cached under ``--work-dir``.

A student's model is in ``<work-dir>/<student>/<split>/``, its predictions beside it as
``zero-shot.<eval set>.predictions.jsonl`` and ``distilled.<eval set>.predictions.jsonl`` (a shared
zero-shot baseline's in ``<work-dir>/<baseline>/<split>/zero-shot.<teacher>.<eval set>.predictions.jsonl``),
each with a ``.timing.json``. A model trained with the same settings on the same data, and predictions
of exactly the same pairs, are reused unless ``--force``; other settings or pairs are refused.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from ..benchmarks.folds import Split
from ..benchmarks.loaders import RECORDED_PREFIX
from ..benchmarks.predictions import read_predictions, write_predictions
from ..core.artifacts import append_jsonl, read_appended_jsonl, read_json, write_json
from ..core.resources import PeakMemory, load_average
from ..students.base import (
    LABELER_MANIFEST,
    grade_counts,
    prediction_row,
    remove_checkpoints,
    share_matching_thresholds,
)
from ..students.registry import distilled_student, get_family
from ..teacher import labels_from_frame
from .cosines import pair_cosines
from .protocols import evaluation_pairs, training_records
from .students import COSINE_FIT_PAIRS, COSINES, STUDENTS, ZERO_SHOT_DESCRIPTIONS, StudentSpec, student_config

BOOKKEEPING = {"save_steps", "logging_steps"}  # settings that do not change the trained model
#: What results.json keeps of a training manifest and its measured time and memory.
TRAIN_FIELDS = (
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
LABEL_CHUNK_PAIRS = 1000  # pairs labelled between two appends to a run's partial predictions
COSINE_BATCH_SIZE = 32  # sentence-transformers' encode batch for the zero-shot cosines


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
    remove_checkpoints(folder)
    return {**manifest, **stats_record}


def cached_timing(path: Path, pairs: set[tuple[str, str]], force: bool) -> dict[str, Any] | None:
    """The timing saved beside the predictions file at ``path`` when that file can be reused (it labels exactly
    ``pairs``; another set of pairs is refused), else None."""
    timing_path = path.with_suffix(".timing.json")
    if not (path.exists() and timing_path.exists()) or force:
        return None
    cached = read_predictions(path)
    if set(zip(cached["query_id"], cached["doc_id"])) != pairs:
        raise SystemExit(f"{path} labels other pairs (another seed or split?); pass --force or another --work-dir")
    return read_json(timing_path)


def timed_predictions(
    prepare: Callable[[], Any],
    records: list[dict[str, Any]],
    labeler_name: str,
    path: Path,
    batch_size: int,
    force: bool,
) -> dict[str, Any]:
    """Reuse the predictions file at ``path`` (when it labels exactly the records' pairs), or ``prepare()`` a labeler
    (untimed) and time its labelling of the records. Returns the timing (labels/s, batch size, peak RSS, load) saved
    beside it.

    Labels are appended to ``<path>.partial.jsonl`` a chunk of :data:`LABEL_CHUNK_PAIRS` at a time, with the time
    spent in ``<path>.partial.json``: a killed run loses at most the chunk in progress, and the same command labels
    only the pairs still missing.
    """
    pairs = {(r["query_id"], r["doc_id"]) for r in records}
    cached = cached_timing(path, pairs, force)
    if cached is not None:
        return cached
    appended, appended_timing = path.with_suffix(".partial.jsonl"), path.with_suffix(".partial.json")
    if force:
        appended.unlink(missing_ok=True)
        appended_timing.unlink(missing_ok=True)
    done = {(row["query_id"], row["doc_id"]): row for row in read_appended_jsonl(appended)}
    timing = (
        read_json(appended_timing)
        if done and appended_timing.exists()
        else {"pairs": 0, "seconds": 0.0, "stopped_seconds": 0.0, "peak_rss_mb": 0.0, "load_before": load_average()}
    )
    missing = [r for r in records if (r["query_id"], r["doc_id"]) not in done]
    if missing:
        labeler = prepare()
        path.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(records), initial=len(records) - len(missing), desc=labeler_name, unit="pair")
        for start in range(0, len(missing), LABEL_CHUNK_PAIRS):
            chunk = missing[start : start + LABEL_CHUNK_PAIRS]
            began = time.perf_counter()
            with PeakMemory() as memory:
                rows = labeler.label_records(chunk, labeler_name, batch_size=batch_size, progress=False)
            seconds = time.perf_counter() - began - memory.stopped_seconds  # time stopped by a signal is not labelling
            with appended.open("a", encoding="utf-8") as handle:
                append_jsonl(handle, rows)
            done.update(((row["query_id"], row["doc_id"]), row) for row in rows)
            timing.update(
                pairs=timing["pairs"] + len(rows),
                seconds=timing["seconds"] + seconds,
                stopped_seconds=timing["stopped_seconds"] + memory.stopped_seconds,
                peak_rss_mb=round(max(timing["peak_rss_mb"], memory.peak_mb), 1),
            )
            write_json(appended_timing, timing)
            bar.update(len(rows))
        bar.close()
    timing.update(
        labels_per_second=timing["pairs"] / timing["seconds"] if timing["seconds"] else 0.0,
        batch_size=batch_size,
        load_after=load_average(),
    )
    write_predictions(path, pd.DataFrame([done[(r["query_id"], r["doc_id"])] for r in records]))
    write_json(path.with_suffix(".timing.json"), timing)
    appended.unlink(missing_ok=True)
    appended_timing.unlink(missing_ok=True)
    return timing


def cosine_predictions(
    baseline: str,
    fit_records: list[dict[str, Any]],
    test_records: list[dict[str, Any]],
    path: Path,
    args: argparse.Namespace,
    max_length: int,
) -> dict[str, Any]:
    """A zero-shot cosine's predictions of one split: the cosines from the baseline's cache (computed once per pair),
    cut at the teacher's grade shares on ``fit_records``. Returns the cache's timing, saved beside the file."""
    pairs = {(r["query_id"], r["doc_id"]) for r in test_records}
    cached = cached_timing(path, pairs, args.force)
    if cached is not None:
        return cached
    from ..students.bi_encoder import cosine_labels

    cosine = COSINES[baseline]
    values, timing = pair_cosines(
        fit_records + test_records, cosine.encoder, args.work_dir / baseline, max_length, COSINE_BATCH_SIZE
    )
    thresholds = share_matching_thresholds(values[: len(fit_records)], grade_counts(fit_records))
    labels = cosine_labels(values[len(fit_records) :], thresholds)
    write_predictions(
        path, pd.DataFrame([prediction_row(r, lab, cosine.labeler) for r, lab in zip(test_records, labels)])
    )
    write_json(path.with_suffix(".timing.json"), timing)
    return timing


def release_memory() -> None:
    """Free what the last phase left behind, so the next phase's peak RSS is its own (glibc: give heap back)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


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

    def record(stage: str, labeler_name: str, path: Path, prepare: Callable[[], Any]) -> None:
        timing = timed_predictions(prepare, test_records, labeler_name, path, batch, args.force)
        outputs["stages"][stage] = {"labeler": labeler_name, "path": str(path), "timing": timing}
        release_memory()

    if zero_shot and spec.zero_shot:
        thresholds_from = teacher.removeprefix(RECORDED_PREFIX)  # the cut points come from the teacher's grade shares
        path = args.work_dir / spec.zero_shot / split.name / f"zero-shot.{thresholds_from}.{eval_tag}.predictions.jsonl"
        fit_records = labels_from_frame(frame[frame["query_id"].isin(split.train_ids)], teacher, teacher)
        if len(fit_records) > COSINE_FIT_PAIRS:
            fit_records = random.Random(args.seed).sample(fit_records, COSINE_FIT_PAIRS)
        timing = cosine_predictions(spec.zero_shot, fit_records, test_records, path, args, config.max_length)
        outputs["stages"]["zero-shot"] = {
            "labeler": COSINES[spec.zero_shot].labeler,
            "path": str(path),
            "timing": timing,
        }
    elif zero_shot:
        record(
            "zero-shot",
            f"{name} zero-shot",
            folder / f"zero-shot.{eval_tag}.predictions.jsonl",
            lambda: family.zero_shot(train_records, config),
        )

    if not spec.trains:
        return outputs
    data = {  # with the config, what a cached model must have been trained on
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
    outputs["train"] = {key: trained.get(key) for key in TRAIN_FIELDS}
    outputs["config"] = trained["config"]
    release_memory()
    record(
        "distilled",
        f"{name} distilled",
        folder / f"distilled.{eval_tag}.predictions.jsonl",
        lambda: family.load(folder),
    )
    return outputs


def run_students(
    students: Sequence[str],
    splits: Sequence[Split],
    frame: pd.DataFrame,
    teacher: str,
    args: argparse.Namespace,
    settings: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Every student on every split (zero-shot, trained, distilled): results.json's ``students``."""
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
    return report_students


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
