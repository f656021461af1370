"""Every labeler scored against the human grades on the pooled held-out pairs, with query-bootstrap intervals.

The metrics, the bootstrap and the paired comparisons are :mod:`labeler_utils.evaluate`'s; this module
pools the splits' predictions, re-grades the students "share-calibrated", and builds one agreement
table per evaluation set (all held-out pairs, and each per-query cap of a slow student).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..benchmarks.folds import Split
from ..benchmarks.predictions import attach_predictions, read_predictions
from ..core.artifacts import atomic_write
from ..core.records import GRADES
from ..evaluate import NDCG_CUTOFF, SCORE_METRICS, bootstrap_ci, paired_bootstrap, plot_forest, query_metric
from ..students.base import grades_at_thresholds, share_matching_thresholds
from .protocols import evaluation_pairs
from .students import COSINE_LABELER, COSINES, DEFAULT_STUDENT, STUDENTS

#: Metrics of labeler_utils.evaluate (bootstrapped from per-query statistics) reported for every labeler.
GRADE_METRICS = ("accuracy", "kappa", "qwk", "kappa_binary_ge2")
RANKING_METRICS = (f"ndcg@{NDCG_CUTOFF}", "pairwise_accuracy")
(SPEARMAN,) = SCORE_METRICS  # Spearman of expected relevance, the one metric bootstrapped from score tables
METRICS = (*GRADE_METRICS, SPEARMAN, *RANKING_METRICS)
#: The labelers every other one is compared with, pairwise, when they are scored on the same pairs.
COSINE_LABELERS = tuple(cosine.labeler for cosine in COSINES.values())
REFERENCES = (*COSINE_LABELERS, f"{DEFAULT_STUDENT} distilled")


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


def evaluate_set(
    frame: pd.DataFrame,
    labelers: Sequence[str],
    teacher: str,
    n_boot: int,
    seed: int,
    own_teachers: dict[str, str] | None = None,
    own_cosines: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Every metric with its query-bootstrap interval, and each labeler's QWK minus the teacher's and minus each
    reference among ``labelers`` (every untrained cosine, the default student: ``qwk_minus``), all paired.
    ``qwk_minus_cosine`` is the difference to the untrained cosine of the labeler's own encoder (``own_cosines``;
    the default encoder's cosine for a labeler not named there; none for a cosine row); ``own_teachers`` maps a
    student trained on other grades to that column, also compared pairwise."""
    results: dict[str, Any] = {}
    for labeler in labelers:
        metrics = {
            name: bootstrap_ci(frame, query_metric(name, labeler), n_boot, seed)
            for name in (*GRADE_METRICS, *RANKING_METRICS)
        }
        metrics[SPEARMAN] = bootstrap_ci(frame, query_metric(SPEARMAN, labeler), n_boot, seed)
        results[labeler] = {
            "n": int(frame[labeler].notna().sum()),
            "n_missing": int(frame[labeler].isna().sum()),
            "metrics": {name: metrics[name] for name in METRICS},
        }
        if labeler != teacher:
            results[labeler]["qwk_minus_teacher"] = paired_bootstrap(frame, labeler, teacher, "qwk", n_boot, seed)
        if labeler != teacher:
            results[labeler]["qwk_minus"] = {
                reference: paired_bootstrap(frame, labeler, reference, "qwk", n_boot, seed)
                for reference in labelers
                if reference in REFERENCES and reference != labeler
            }
        cosine = (own_cosines or {}).get(labeler, COSINE_LABELER)
        if labeler not in COSINE_LABELERS and cosine in results[labeler].get("qwk_minus", {}):
            results[labeler]["qwk_minus_cosine"] = results[labeler]["qwk_minus"][cosine]
        own = (own_teachers or {}).get(labeler)
        if own is not None and own != teacher:
            results[labeler]["qwk_minus_own_teacher"] = {
                "teacher": own,
                **paired_bootstrap(frame, labeler, own, "qwk", n_boot, seed),
            }
    return results


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
    """Pooled and per-split agreement tables, one per evaluation set (all held-out pairs, or a per-query cap),
    each with its forest plot ``forest_<set>.png`` in ``--output``."""
    caps = sorted(
        {settings["max_eval_pairs_per_query"].get(n) for n in students}, key=lambda c: (c is not None, c or 0)
    )
    sets = []
    for cap in caps:
        table = pd.concat([evaluation_pairs(frame, s, cap, args.seed) for s in splits])
        labelers = [teacher]
        own_teachers: dict[str, str] = {}
        own_cosines: dict[str, str] = {}
        for name in students:
            if settings["max_eval_pairs_per_query"].get(name) not in (None, cap):
                continue  # its predictions do not cover every pair of this set
            for stage in ("zero-shot", "distilled"):
                if stage == "distilled" and not STUDENTS[name].trains:
                    continue
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
                    if STUDENTS[name].zero_shot in COSINES:
                        cosine = COSINES[STUDENTS[name].zero_shot].labeler
                        own_cosines.update({outputs[0]["labeler"]: cosine, calibrated: cosine})
                    if source != teacher and source not in labelers:
                        labelers.insert(1, source)  # the student's own teacher, scored on the same pairs
        title = "All held-out pairs" if cap is None else f"At most {cap} random held-out pairs per query"
        print(f"== evaluating: {title}")
        results = evaluate_set(table, labelers, teacher, args.n_boot, args.seed, own_teachers, own_cosines)
        per_split = (
            {
                s.name: {
                    labeler: {
                        "qwk": bootstrap_ci(part, query_metric("qwk", labeler), args.n_boot, args.seed),
                        SPEARMAN: bootstrap_ci(part, query_metric(SPEARMAN, labeler), args.n_boot, args.seed),
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
