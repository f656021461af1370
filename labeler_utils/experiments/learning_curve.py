"""``--learning-curve``: each student retrained on nested subsets of every split's training queries.

The point where a subset is all of a split's training queries at the main run's pairs-per-query cap
is the main run's model itself (reused from the work folder, not trained again).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..benchmarks.folds import Split, nested_query_subsets
from ..benchmarks.predictions import attach_predictions
from ..core.artifacts import atomic_write
from ..evaluate import bootstrap_ci, plot_learning_curve, query_metric
from .protocols import evaluation_pairs, parse_sizes
from .runner import student_predictions
from .scoring import SPEARMAN, pooled_predictions, share_calibrated
from .students import STUDENTS


def point_settings(settings: dict[str, Any], name: str, pairs_per_query: int | None, cap: int | None) -> dict[str, Any]:
    """The per-student settings of one curve point: ``name`` capped at ``pairs_per_query`` training pairs
    per query and scored on at most ``cap`` held-out pairs per query (None: no cap)."""
    changed = {
        **settings,
        "max_train_pairs_per_query": {**settings["max_train_pairs_per_query"], name: pairs_per_query},
        "max_eval_pairs_per_query": {**settings["max_eval_pairs_per_query"], name: cap},
    }
    if pairs_per_query is None:
        changed["max_train_pairs_per_query"].pop(name)
    if cap is None:
        changed["max_eval_pairs_per_query"].pop(name)
    return changed


def learning_curve(
    frame: pd.DataFrame,
    splits: Sequence[Split],
    students: Sequence[str],
    teacher: str,
    settings: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Each student retrained on nested subsets of every split's training queries, at each pairs-per-query cap;
    the points and ``learning_curve.png`` in ``--output``."""
    points = []
    for name in students:
        spec = STUDENTS[name]
        for pairs_per_query in parse_sizes(args.curve_pairs):
            cap = args.curve_eval_pairs_per_query or settings["max_eval_pairs_per_query"].get(name)
            at_point = point_settings(settings, name, pairs_per_query, cap)
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
                    result = student_predictions(name, spec, sub, frame, teacher, args, at_point, zero_shot=False)
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
                        "spearman": bootstrap_ci(table, query_metric(SPEARMAN, "student"), args.n_boot, args.seed),
                    }
                )
    figure = plot_learning_curve(points, float(np.mean([len(s.train_ids) for s in splits])))
    with atomic_write(args.output / "learning_curve.png", "wb") as handle:
        figure.savefig(handle, format="png", dpi=110)
    return {"points": points, "plot": "learning_curve.png"}
