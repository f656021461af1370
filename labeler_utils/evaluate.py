"""Stage 06: how well each labeler's grades agree with the human grades, with intervals by query.

Conventions used throughout:

* Grades are 0–3. Confusion matrices have the human grade as row and the labeler's as column.
* Kappas measure disagreement by grade distance on the whole 0–3 scale: 1 for any difference
  (unweighted), ``|i - j|`` (linear), ``(i - j)**2`` (quadratic, "qwk"). This equals scikit-learn's
  ``cohen_kappa_score(..., labels=[0, 1, 2, 3])``.
* Statistics that are undefined for the data are NaN, never an exception: a kappa when both sides
  give every pair one and the same grade (chance agreement is 1), a correlation when one side is
  constant, Krippendorff's alpha when every grade given is the same. :func:`agreement` lists them
  under ``undefined`` with the reason.
* A pair without a labeler grade (null prediction) is left out for that labeler and counted in
  ``n_missing``; paired comparisons use the pairs both labelers graded.
* A labeler's *score* (used to rank documents) is its expected relevance where it has one, else its grade.
* nDCG uses linear gains (gain = human grade, as ``trec_eval``) and is tie-aware: the expected
  nDCG when documents with equal scores are put in random order (McSherry & Najork, 2008). It is
  computed per query over all judged documents ("ndcg") and at cutoff 10 ("ndcg@10") and averaged
  over queries; a query whose documents are all grade 0 has nothing to rank and is left out.
* Pairwise accuracy: over all pairs of documents of one query with different human grades, pooled
  over queries, the share the labeler orders the same way; a tie in the labeler's scores counts 0.5.
* Intervals are percentile bootstrap intervals that resample queries with replacement, because
  the pairs of one query are not independent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from rank_bm25 import BM25L, BM25Okapi, BM25Plus
from scipy import optimize, special, stats
from sklearn.isotonic import IsotonicRegression
from tqdm import tqdm

from .artifacts import InputError, atomic_write, write_json
from .benchmarks import GRADES, PROBABILITY_COLUMNS, iter_delimited, query_split
from .hard_negatives import Tokenizer, TokenizerSettings

N_GRADES = len(GRADES)
GRADE_VALUES = np.arange(N_GRADES)
RELEVANT_GRADE = 2  # binary relevance for calibration: grade >= 2
NDCG_CUTOFF = 10

# --------------------------------------------------------------------------------------------
# Agreement from a confusion matrix (every function accepts a stack of matrices: shape (..., k, k))
# --------------------------------------------------------------------------------------------


def _divide(numerator: Any, denominator: Any) -> np.ndarray:
    """Elementwise ratio, NaN where the denominator is 0 (or NaN)."""
    numerator, denominator = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator != 0, numerator / denominator, np.nan)


def confusion_matrix(human: Sequence[int] | np.ndarray, predicted: Sequence[int] | np.ndarray) -> np.ndarray:
    """4 x 4 counts: row = human grade, column = predicted grade."""
    counts = np.zeros((N_GRADES, N_GRADES), dtype=np.int64)
    np.add.at(counts, (np.asarray(human, dtype=int), np.asarray(predicted, dtype=int)), 1)
    return counts


def _totals(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row sums, column sums and the total of each matrix."""
    return confusion.sum(-1), confusion.sum(-2), confusion.sum((-2, -1))


def _disagreement_weights(k: int, weights: str | None) -> np.ndarray:
    i, j = np.indices((k, k))
    if weights is None:
        return (i != j).astype(float)
    if weights == "linear":
        return np.abs(i - j).astype(float)
    if weights == "quadratic":
        return ((i - j) ** 2).astype(float)
    raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}")


def cohen_kappa(confusion: np.ndarray, weights: str | None = None) -> np.ndarray:
    """Cohen's kappa, ``1 - sum(w * observed) / sum(w * expected)``; NaN when chance agreement is 1."""
    confusion = np.asarray(confusion, dtype=float)
    rows, columns, total = _totals(confusion)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = rows[..., :, None] * columns[..., None, :] / total[..., None, None]
    w = _disagreement_weights(confusion.shape[-1], weights)
    return 1.0 - _divide((w * confusion).sum((-2, -1)), (w * expected).sum((-2, -1)))


def binarize_confusion(confusion: np.ndarray, threshold: int) -> np.ndarray:
    """2 x 2 confusion of "grade >= threshold" (relevant) against the rest."""
    onehot = np.zeros((N_GRADES, 2))
    onehot[GRADE_VALUES, (GRADE_VALUES >= threshold).astype(int)] = 1.0
    return np.einsum("ia,...ij,jb->...ab", onehot, np.asarray(confusion, dtype=float), onehot)


def exact_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Share of pairs with the same grade."""
    confusion = np.asarray(confusion, dtype=float)
    return _divide(np.trace(confusion, axis1=-2, axis2=-1), confusion.sum((-2, -1)))


def within_one_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Share of pairs whose grades differ by at most one."""
    confusion = np.asarray(confusion, dtype=float)
    i, j = np.indices(confusion.shape[-2:])
    return _divide((confusion * (np.abs(i - j) <= 1)).sum((-2, -1)), confusion.sum((-2, -1)))


def _centred_midranks(counts: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Average rank of each grade's pairs, minus the mean rank (ties share their average rank)."""
    return np.cumsum(counts, -1) - (counts - 1) / 2 - (total[..., None] + 1) / 2


def spearman_rho(confusion: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation (average ranks for ties) of the pairs a confusion matrix counts."""
    confusion = np.asarray(confusion, dtype=float)
    rows, columns, total = _totals(confusion)
    rank_human, rank_predicted = _centred_midranks(rows, total), _centred_midranks(columns, total)
    covariance = np.einsum("...i,...ij,...j->...", rank_human, confusion, rank_predicted)
    spread = np.sqrt((rows * rank_human**2).sum(-1) * (columns * rank_predicted**2).sum(-1))
    return _divide(covariance, spread)


_I, _J, _K, _L = np.indices((N_GRADES,) * 4)
_CONCORDANT = ((_K > _I) & (_L > _J)).astype(float)
_DISCORDANT = ((_K > _I) & (_L < _J)).astype(float)


def kendall_tau_b(confusion: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of the pairs a 4 x 4 confusion matrix counts."""
    confusion = np.asarray(confusion, dtype=float)
    rows, columns, total = _totals(confusion)
    concordant = np.einsum("...ij,ijkl,...kl->...", confusion, _CONCORDANT, confusion)
    discordant = np.einsum("...ij,ijkl,...kl->...", confusion, _DISCORDANT, confusion)
    all_pairs = total * (total - 1) / 2
    untied_human = all_pairs - (rows * (rows - 1) / 2).sum(-1)
    untied_predicted = all_pairs - (columns * (columns - 1) / 2).sum(-1)
    return _divide(concordant - discordant, np.sqrt(untied_human * untied_predicted))


def ordinal_alpha(coincidence: np.ndarray) -> np.ndarray:
    """Krippendorff's alpha with the ordinal metric, from a coincidence matrix (any number of coders).

    ``alpha = 1 - (n - 1) * sum(o_ck * d2_ck) / sum(n_c * n_k * d2_ck)`` with
    ``d2_ck = (sum_{g=c..k} n_g - (n_c + n_k) / 2) ** 2`` (Krippendorff, 2011). For two coders who
    both graded every unit the coincidence matrix is ``C + C.T`` of their confusion matrix ``C``.
    """
    coincidence = np.asarray(coincidence, dtype=float)
    k = coincidence.shape[-1]
    value_counts = coincidence.sum(-1)
    total = value_counts.sum(-1)
    c, g = np.indices((k, k))
    low, high = np.minimum(c, g), np.maximum(c, g)
    cumulative = np.cumsum(value_counts, -1)
    between = cumulative[..., high] - cumulative[..., low] + value_counts[..., low]
    distance = (between - (value_counts[..., c] + value_counts[..., g]) / 2) ** 2
    observed = (coincidence * distance).sum((-2, -1))
    expected = (value_counts[..., :, None] * value_counts[..., None, :] * distance).sum((-2, -1))
    return 1.0 - _divide((total - 1) * observed, expected)


CONFUSION_METRICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "accuracy": exact_accuracy,
    "within_one": within_one_accuracy,
    "kappa": cohen_kappa,
    "kappa_linear": partial(cohen_kappa, weights="linear"),
    "qwk": partial(cohen_kappa, weights="quadratic"),
    "alpha_ordinal": lambda c: ordinal_alpha(c + np.swapaxes(c, -1, -2)),
    "spearman": spearman_rho,
    "kendall_tau_b": kendall_tau_b,
    "kappa_binary_ge1": lambda c: cohen_kappa(binarize_confusion(c, 1)),
    "kappa_binary_ge2": lambda c: cohen_kappa(binarize_confusion(c, 2)),
}

_UNDEFINED_REASONS = {
    "kappa": "both sides give every pair one and the same grade, so chance agreement is 1",
    "kappa_binary": "both sides put every pair on the same side of the threshold, so chance agreement is 1",
    "correlation": "one side gives every pair the same grade, so there is no order to correlate",
    "alpha_ordinal": "every grade given, by either side, is the same, so there is no variation to agree on",
}


def _undefined_reason(metric: str) -> str:
    if metric.startswith("kappa_binary"):
        return _UNDEFINED_REASONS["kappa_binary"]
    if metric in ("spearman", "kendall_tau_b"):
        return _UNDEFINED_REASONS["correlation"]
    return _UNDEFINED_REASONS.get(metric, _UNDEFINED_REASONS["kappa"])


def _grade_array(values: Iterable[Any], what: str) -> np.ndarray:
    """Grades as floats with NaN for missing values; ``ValueError`` for anything but 0–3."""
    sequence = values if hasattr(values, "__len__") else list(values)
    array = pd.array(sequence, dtype="Float64").to_numpy(dtype=float, na_value=np.nan)
    bad = ~np.isnan(array) & ~np.isin(array, GRADE_VALUES)
    if bad.any():
        position = int(bad.argmax())
        raise ValueError(f"{what} grade {array[position]:g} at position {position} is not an integer 0-3")
    return array


def agreement(human: Iterable[Any], predicted: Iterable[Any]) -> dict[str, Any]:
    """Agreement of predicted grades with human grades.

    Returns ``n`` (pairs used), ``n_missing`` (pairs without a predicted grade, left out), every
    metric of :data:`CONFUSION_METRICS` (NaN where undefined, explained under ``undefined``),
    ``per_grade`` precision/recall (precision is NaN for a grade never predicted), both grade
    distributions and the confusion matrix. Raises ``ValueError`` when every prediction is missing.
    """
    human_grades, predicted_grades = _grade_array(human, "human"), _grade_array(predicted, "predicted")
    if human_grades.shape != predicted_grades.shape:
        raise ValueError(f"{len(human_grades)} human grades but {len(predicted_grades)} predicted grades")
    if np.isnan(human_grades).any():
        raise ValueError(
            f"{int(np.isnan(human_grades).sum())} human grades are missing; the reference must be complete"
        )
    graded = ~np.isnan(predicted_grades)
    if not graded.any():
        raise ValueError(f"All {len(predicted_grades)} predicted grades are missing")
    confusion = confusion_matrix(human_grades[graded], predicted_grades[graded])
    metrics = {name: float(fn(confusion)) for name, fn in CONFUSION_METRICS.items()}
    rows, columns, total = _totals(confusion)
    hits = np.diag(confusion)
    return {
        "n": int(total),
        "n_missing": int((~graded).sum()),
        **metrics,
        "per_grade": {
            str(grade): {
                "precision": float(_divide(hits[grade], columns[grade])),
                "recall": float(_divide(hits[grade], rows[grade])),
                "human_count": int(rows[grade]),
                "predicted_count": int(columns[grade]),
            }
            for grade in GRADES
        },
        "human_distribution": (rows / total).tolist(),
        "predicted_distribution": (columns / total).tolist(),
        "confusion": confusion.tolist(),
        "undefined": {name: _undefined_reason(name) for name, value in metrics.items() if math.isnan(value)},
    }


# --------------------------------------------------------------------------------------------
# Ranking metrics for one query
# --------------------------------------------------------------------------------------------


def _discounts(n: int, k: int | None) -> np.ndarray:
    discounts = 1.0 / np.log2(np.arange(2, n + 2))
    if k is not None:
        discounts[k:] = 0.0
    return discounts


def ndcg(
    scores: Sequence[float] | np.ndarray,
    grades: Sequence[float] | np.ndarray,
    k: int | None = None,
    ideal_grades: Sequence[float] | np.ndarray | None = None,
) -> float:
    """Tie-aware nDCG@k of ranking documents by ``scores`` (high first), linear gains = ``grades``.

    Documents with equal scores share the discounts of the positions they occupy (the expected
    DCG over random orders of the tie). ``ideal_grades`` are the grades the ideal ranking is made
    of (default ``grades``; give every judged grade of the query when ``scores`` rank only some).
    NaN when the ideal DCG is 0 (no relevant document).
    """
    scores, gains = np.asarray(scores, dtype=float), np.asarray(grades, dtype=float)
    order = np.argsort(-scores, kind="stable")
    _, tie_group = np.unique(-scores[order], return_inverse=True)
    group_discount = np.bincount(tie_group, weights=_discounts(len(scores), k))
    group_mean_gain = np.bincount(tie_group, weights=gains[order]) / np.bincount(tie_group)
    ideal = np.sort(np.asarray(grades if ideal_grades is None else ideal_grades, dtype=float))[::-1]
    ideal_dcg = float((ideal * _discounts(len(ideal), k)).sum())
    return float((group_discount * group_mean_gain).sum() / ideal_dcg) if ideal_dcg > 0 else math.nan


def pairwise_counts(scores: Sequence[float] | np.ndarray, grades: Sequence[float] | np.ndarray) -> tuple[float, int]:
    """``(credit, pairs)`` over document pairs with different human grades: 1 per pair ordered as
    the human orders it, 0.5 per pair the scores tie."""
    scores, grades = np.asarray(scores, dtype=float), np.asarray(grades, dtype=float)
    human_prefers_first = grades[:, None] > grades[None, :]
    score_difference = (scores[:, None] - scores[None, :])[human_prefers_first]
    return float((score_difference > 0).sum() + 0.5 * (score_difference == 0).sum()), int(human_prefers_first.sum())


# --------------------------------------------------------------------------------------------
# A labeler's columns
# --------------------------------------------------------------------------------------------


def labeler_scores(frame: pd.DataFrame, labeler: str) -> pd.Series:
    """Expected relevance where the labeler gives one, else its grade; NaN where it has no grade."""
    grades = frame[labeler].astype("float64")
    expected_column = f"{labeler}:expected"
    if expected_column in frame.columns:
        return frame[expected_column].astype("float64").fillna(grades).where(grades.notna())
    return grades


def labeler_probabilities(frame: pd.DataFrame, labeler: str) -> np.ndarray | None:
    """The labeler's grade distribution per pair (NaN rows where absent), or None without one."""
    columns = [f"{labeler}:{name}" for name in PROBABILITY_COLUMNS]
    if not all(column in frame.columns for column in columns):
        return None
    return frame[columns].to_numpy(dtype=float)


# --------------------------------------------------------------------------------------------
# Metrics as sums of per-query statistics, and the query bootstrap
# --------------------------------------------------------------------------------------------


def _query_index(frame: pd.DataFrame) -> tuple[np.ndarray, int]:
    """Each row's query number (queries sorted by id) and the number of queries."""
    codes, query_ids = pd.factorize(frame["query_id"], sort=True)
    return codes, len(query_ids)


def _confusion_statistics(frame: pd.DataFrame, labeler: str) -> np.ndarray:
    """Per query, the 16 counts of its confusion matrix."""
    codes, n_queries = _query_index(frame)
    grades = frame[labeler].astype("float64").to_numpy()
    graded = ~np.isnan(grades)
    statistics = np.zeros((n_queries, N_GRADES * N_GRADES))
    cells = frame["human"].to_numpy(dtype=int)[graded] * N_GRADES + grades[graded].astype(int)
    np.add.at(statistics, (codes[graded], cells), 1.0)
    return statistics


def _ranking_statistics(
    frame: pd.DataFrame, labeler: str, per_query: Callable[[np.ndarray, np.ndarray], tuple[float, float]]
) -> np.ndarray:
    """Per query, ``per_query(scores, human_grades)`` over the pairs the labeler graded."""
    codes, n_queries = _query_index(frame)
    scores = labeler_scores(frame, labeler).to_numpy()
    human = frame["human"].to_numpy(dtype=float)
    statistics = np.zeros((n_queries, 2))
    graded_rows = np.flatnonzero(~np.isnan(scores))
    for query, rows in pd.Series(graded_rows).groupby(codes[graded_rows]):
        statistics[query] = per_query(scores[rows.to_numpy()], human[rows.to_numpy()])
    return statistics


def _ndcg_statistics(scores: np.ndarray, human: np.ndarray, k: int | None) -> tuple[float, float]:
    value = ndcg(scores, human, k)
    return (0.0, 0.0) if math.isnan(value) else (value, 1.0)


def _ratio(statistics: np.ndarray) -> np.ndarray:
    return _divide(statistics[..., 0], statistics[..., 1])


@dataclass(frozen=True)
class QueryMetric:
    """One labeler's metric, computed from per-query statistics summed over queries.

    Resampling queries then only re-weights the per-query statistics, which makes a bootstrap
    of thousands of replicates cheap. Calling it on a table gives the metric's value.
    """

    name: str
    labeler: str
    statistics: Callable[[pd.DataFrame, str], np.ndarray]
    combine: Callable[[np.ndarray], np.ndarray]

    def query_statistics(self, frame: pd.DataFrame) -> np.ndarray:
        """Array of shape (queries sorted by id, statistics)."""
        return self.statistics(frame, self.labeler)

    def __call__(self, frame: pd.DataFrame) -> float:
        return float(self.combine(self.query_statistics(frame).sum(axis=0)))


RANKING_METRICS = ("ndcg", f"ndcg@{NDCG_CUTOFF}", "pairwise_accuracy")
METRIC_NAMES = (*CONFUSION_METRICS, *RANKING_METRICS)


def query_metric(name: str, labeler: str) -> QueryMetric:
    """The metric ``name`` (one of :data:`METRIC_NAMES`, or ``ndcg@K`` for any K) of one labeler."""
    if name in CONFUSION_METRICS:
        fn = CONFUSION_METRICS[name]
        return QueryMetric(
            name, labeler, _confusion_statistics, lambda s: fn(s.reshape(*s.shape[:-1], N_GRADES, N_GRADES))
        )
    if name == "ndcg" or (name.startswith("ndcg@") and name[5:].isdigit()):
        k = int(name[5:]) if "@" in name else None
        return QueryMetric(
            name, labeler, partial(_ranking_statistics, per_query=partial(_ndcg_statistics, k=k)), _ratio
        )
    if name == "pairwise_accuracy":
        return QueryMetric(name, labeler, partial(_ranking_statistics, per_query=pairwise_counts), _ratio)
    raise ValueError(f"Unknown metric {name!r}; metrics are {list(METRIC_NAMES)} (or ndcg@K)")


def _bootstrap_draws(n_queries: int, n_boot: int, seed: int) -> np.ndarray:
    """Query numbers drawn with replacement: one row of ``n_queries`` draws per replicate."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n_queries, size=(n_boot, n_queries))


def _draw_counts(draws: np.ndarray, n_queries: int) -> np.ndarray:
    counts = np.zeros((len(draws), n_queries))
    np.add.at(counts, (np.arange(len(draws))[:, None], draws), 1.0)
    return counts


def _interval(estimate: float, replicates: np.ndarray, alpha: float) -> dict[str, Any]:
    defined = replicates[~np.isnan(replicates)]
    low, high = np.percentile(defined, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if len(defined) else (math.nan,) * 2
    return {
        "estimate": float(estimate),
        "ci_low": float(low),
        "ci_high": float(high),
        "std_error": float(np.std(defined, ddof=1)) if len(defined) > 1 else math.nan,
        "n_boot": len(replicates),
        "n_undefined": int(len(replicates) - len(defined)),
    }


def bootstrap_ci(
    frame: pd.DataFrame,
    metric_fn: QueryMetric | Callable[[pd.DataFrame], float],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Percentile bootstrap interval of ``metric_fn(frame)``, resampling queries with replacement.

    ``metric_fn`` is a :class:`QueryMetric` (from :func:`query_metric`; fast) or any callable from
    a table to a number, which is called on every resampled table; there each drawn copy of a query
    gets its own ``query_id`` (``<id>#<draw>``) so that it counts as a query of its own. Both give
    the same replicates for the same seed. Returns ``estimate, ci_low, ci_high, std_error, n_boot,
    n_undefined`` (replicates where the metric is NaN are left out of the interval).
    """
    query_ids = sorted(frame["query_id"].unique())
    draws = _bootstrap_draws(len(query_ids), n_boot, seed)
    if isinstance(metric_fn, QueryMetric):
        replicates = metric_fn.combine(_draw_counts(draws, len(query_ids)) @ metric_fn.query_statistics(frame))
    else:
        groups = dict(tuple(frame.groupby("query_id", sort=True)))

        def resampled(row: np.ndarray) -> pd.DataFrame:
            return pd.concat(
                [groups[query_ids[q]].assign(query_id=f"{query_ids[q]}#{draw}") for draw, q in enumerate(row)]
            )

        replicates = np.array(
            [metric_fn(resampled(row)) for row in tqdm(draws, desc="Bootstrap", leave=False)], dtype=float
        )
    return _interval(metric_fn(frame), np.asarray(replicates, dtype=float), alpha)


def paired_bootstrap(
    frame: pd.DataFrame,
    labeler_a: str,
    labeler_b: str,
    metric: str = "qwk",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Difference ``metric(A) - metric(B)`` on the pairs both graded, with a query-bootstrap interval.

    Both labelers are scored on the same resampled queries. ``p_value_a_better`` is the one-sided
    bootstrap p-value of "A is not better": ``(1 + #replicates with difference <= 0) / (1 + #replicates)``.
    """
    both = frame[frame[labeler_a].notna() & frame[labeler_b].notna()]
    if both.empty:
        raise ValueError(f"No pair is graded by both {labeler_a!r} and {labeler_b!r}")
    metric_a, metric_b = query_metric(metric, labeler_a), query_metric(metric, labeler_b)
    _, n_queries = _query_index(both)
    counts = _draw_counts(_bootstrap_draws(n_queries, n_boot, seed), n_queries)
    difference = metric_a.combine(counts @ metric_a.query_statistics(both)) - metric_b.combine(
        counts @ metric_b.query_statistics(both)
    )
    value_a, value_b = metric_a(both), metric_b(both)
    interval = _interval(value_a - value_b, difference, alpha)
    defined = difference[~np.isnan(difference)]
    return {
        "metric": metric,
        "labeler_a": labeler_a,
        "labeler_b": labeler_b,
        "value_a": value_a,
        "value_b": value_b,
        "difference": interval["estimate"],
        "ci_low": interval["ci_low"],
        "ci_high": interval["ci_high"],
        "p_value_a_better": float((1 + (defined <= 0).sum()) / (1 + len(defined))),
        "n_pairs": len(both),
        "n_queries": n_queries,
    }


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def reliability_table(
    predicted: Sequence[float] | np.ndarray,
    observed: Sequence[float] | np.ndarray,
    n_bins: int = 10,
    value_range: tuple[float, float] = (0.0, 3.0),
) -> pd.DataFrame:
    """Equal-width bins of the prediction over ``value_range``: count, mean prediction, mean observation.

    Only bins holding pairs are returned. For graded relevance compare expected relevance with
    the human grade; for binary relevance P(relevant) with whether the human grade is >= 2.
    """
    predicted, observed = np.asarray(predicted, dtype=float), np.asarray(observed, dtype=float)
    edges = np.linspace(*value_range, n_bins + 1)
    bins = np.digitize(predicted, edges[1:-1])
    table = (
        pd.DataFrame({"bin": bins, "predicted": predicted, "observed": observed})
        .groupby("bin")
        .agg(count=("predicted", "size"), mean_predicted=("predicted", "mean"), mean_observed=("observed", "mean"))
        .reset_index()
    )
    table.insert(1, "bin_low", edges[table["bin"]])
    table.insert(2, "bin_high", edges[table["bin"] + 1])
    return table.drop(columns="bin")


def expected_calibration_error(
    predicted: Sequence[float] | np.ndarray,
    observed: Sequence[float] | np.ndarray,
    n_bins: int = 10,
    value_range: tuple[float, float] = (0.0, 3.0),
) -> float:
    """ECE: mean over pairs of |mean prediction - mean observation| of the pair's bin."""
    table = reliability_table(predicted, observed, n_bins, value_range)
    return float(
        (table["count"] * (table["mean_predicted"] - table["mean_observed"]).abs()).sum() / table["count"].sum()
    )


def _as_logits(logits_or_probs: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Log-probabilities when rows are probability distributions (non-negative, sum 1), else the input."""
    values = np.asarray(logits_or_probs, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"Expected one row of {N_GRADES} logits or probabilities per pair, got shape {values.shape}")
    if (values >= 0).all() and np.allclose(values.sum(axis=1), 1.0, atol=1e-4):
        return np.log(np.clip(values, 1e-12, None))
    return values


def apply_temperature(logits_or_probs: Sequence[Sequence[float]] | np.ndarray, temperature: float) -> np.ndarray:
    """Grade distributions ``softmax(logits / temperature)``."""
    return special.softmax(_as_logits(logits_or_probs) / temperature, axis=1)


def _mean_log_loss(probabilities: np.ndarray, human: np.ndarray) -> float:
    return float(-np.log(np.clip(probabilities[np.arange(len(human)), human.astype(int)], 1e-12, None)).mean())


def fit_temperature(
    dev_logits_or_probs: Sequence[Sequence[float]] | np.ndarray, dev_human: Sequence[int] | np.ndarray
) -> float:
    """The temperature (0.05–20) that minimises the log loss of human grades on a dev split.

    Rows that are probability distributions are turned into log-probabilities first, so either
    the grade-token logits or the reported distribution can be given.
    """
    logits, human = _as_logits(dev_logits_or_probs), np.asarray(dev_human, dtype=int)

    def log_loss(log_temperature: float) -> float:
        return float(
            -special.log_softmax(logits / math.exp(log_temperature), axis=1)[np.arange(len(human)), human].mean()
        )

    result = optimize.minimize_scalar(log_loss, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(result.x))


def fit_isotonic(dev_scores: Sequence[float] | np.ndarray, dev_human: Sequence[int] | np.ndarray) -> IsotonicRegression:
    """A monotone map from a labeler's score to the expected human grade, fitted on a dev split."""
    return IsotonicRegression(y_min=0.0, y_max=float(GRADES[-1]), out_of_bounds="clip").fit(
        np.asarray(dev_scores, dtype=float), np.asarray(dev_human, dtype=float)
    )


def _rmse(predicted: np.ndarray, observed: np.ndarray) -> float:
    return float(np.sqrt(np.mean((predicted - observed) ** 2)))


def calibration_report(
    frame: pd.DataFrame, labeler: str, dev_queries: Iterable[str], n_bins: int = 10
) -> dict[str, Any]:
    """Calibration of a labeler against human grades; recalibration is fitted on ``dev_queries``
    and measured on the other queries.

    ``graded``: the score (expected relevance, else the grade) against the human grade — ECE and
    root-mean-square error before and after isotonic regression (which minimises squared error),
    and reliability tables (raw: all pairs; isotonic: held-out pairs). ``binary_ge2`` (only with
    grade distributions): P(grade >= 2) against human grade >= 2, before and after temperature
    scaling, with the fitted temperature and the log loss of the human grades.
    """
    graded = frame[frame[labeler].notna()]
    scores, human = labeler_scores(graded, labeler).to_numpy(), graded["human"].to_numpy(dtype=float)
    dev = graded["query_id"].isin(set(dev_queries)).to_numpy()
    if dev.all() or not dev.any():
        raise ValueError(f"{labeler}: calibration needs graded pairs both in and outside the dev queries")
    held_out = ~dev
    calibrated = fit_isotonic(scores[dev], human[dev]).predict(scores[held_out])
    report: dict[str, Any] = {
        "score_source": "expected_relevance" if f"{labeler}:expected" in frame.columns else "grade",
        "n_dev_pairs": int(dev.sum()),
        "n_held_out_pairs": int(held_out.sum()),
        "graded": {
            "ece": expected_calibration_error(scores[held_out], human[held_out], n_bins),
            "ece_isotonic": expected_calibration_error(calibrated, human[held_out], n_bins),
            "rmse": _rmse(scores[held_out], human[held_out]),
            "rmse_isotonic": _rmse(calibrated, human[held_out]),
            "reliability": reliability_table(scores, human, n_bins).to_dict("records"),
            "reliability_isotonic": reliability_table(calibrated, human[held_out], n_bins).to_dict("records"),
        },
        "binary_ge2": None,
    }
    probabilities = labeler_probabilities(graded, labeler)
    if probabilities is not None and not np.isnan(probabilities).all(axis=1).all():
        complete = ~np.isnan(probabilities).any(axis=1)
        fit_rows, test_rows = dev & complete, held_out & complete
        if fit_rows.any() and test_rows.any():
            temperature = fit_temperature(probabilities[fit_rows], human[fit_rows])
            tempered = apply_temperature(probabilities[test_rows], temperature)
            relevant = (human >= RELEVANT_GRADE).astype(float)
            p_relevant = probabilities[:, RELEVANT_GRADE:].sum(axis=1)
            tempered_relevant = tempered[:, RELEVANT_GRADE:].sum(axis=1)
            report["binary_ge2"] = {
                "temperature": temperature,
                "log_loss": _mean_log_loss(probabilities[test_rows], human[test_rows]),
                "log_loss_temperature": _mean_log_loss(tempered, human[test_rows]),
                "ece": expected_calibration_error(p_relevant[test_rows], relevant[test_rows], n_bins, (0.0, 1.0)),
                "ece_temperature": expected_calibration_error(
                    tempered_relevant, relevant[test_rows], n_bins, (0.0, 1.0)
                ),
                "reliability": reliability_table(p_relevant[complete], relevant[complete], n_bins, (0.0, 1.0)).to_dict(
                    "records"
                ),
                "reliability_temperature": reliability_table(
                    tempered_relevant, relevant[test_rows], n_bins, (0.0, 1.0)
                ).to_dict("records"),
            }
    return report


# --------------------------------------------------------------------------------------------
# System-ranking agreement
# --------------------------------------------------------------------------------------------

RUN_COLUMNS = ("query_id", "doc_id", "rank", "score", "run")


def read_trec_run(path: str | Path) -> pd.DataFrame:
    """A TREC run file (``qid Q0 docid rank score tag`` per line) as columns :data:`RUN_COLUMNS`."""
    rows, first_seen = [], {}
    for where, (query_id, _, doc_id, rank, score, tag) in iter_delimited(path, 6):
        try:
            rows.append((query_id, doc_id, int(rank), float(score), tag))
        except ValueError:
            raise InputError(
                f"{where}: rank must be an integer and score a number, got {rank!r} and {score!r}"
            ) from None
        key = (tag, query_id, doc_id)
        if key in first_seen:
            raise InputError(
                f"{where}: run {tag!r} ranks document {doc_id!r} for query {query_id!r} twice (also {first_seen[key]})"
            )
        first_seen[key] = where
    if not rows:
        raise InputError(f"{path}: no ranked documents")
    return pd.DataFrame(rows, columns=list(RUN_COLUMNS))


# name -> (BM25 class, parameters, stem words)
BM25_RUNS: dict[str, tuple[type, dict[str, float], bool]] = {
    "bm25": (BM25Okapi, {"k1": 1.2, "b": 0.75}, False),
    "bm25_k0.9_b0.4": (BM25Okapi, {"k1": 0.9, "b": 0.4}, False),
    "bm25_stemmed": (BM25Okapi, {"k1": 1.2, "b": 0.75}, True),
    "bm25l_stemmed": (BM25L, {"k1": 1.5, "b": 0.75}, True),
    "bm25plus": (BM25Plus, {"k1": 1.5, "b": 0.75}, False),
}


def _ranked(
    run: str, query_id: str, doc_ids: Sequence[str], scores: np.ndarray
) -> list[tuple[str, str, int, float, str]]:
    """Run rows for one query, ordered as ``trec_eval`` orders them: score descending, then doc id descending."""
    order = sorted(range(len(doc_ids)), key=lambda i: (scores[i], doc_ids[i]), reverse=True)
    return [(query_id, doc_ids[i], rank, float(scores[i]), run) for rank, i in enumerate(order, start=1)]


def synthetic_runs(frame: pd.DataFrame, labelers: Sequence[str] = (), seed: int = 0) -> pd.DataFrame:
    """Retrieval runs over the judged documents of each query, for when no real runs are at hand.

    BM25 variants (:data:`BM25_RUNS`, the project's tokenizer with and without stemming), a random
    ranking, BM25 reversed, and one run per labeler ranking by its own score ("<labeler>" run;
    ungraded pairs last). Columns :data:`RUN_COLUMNS`.
    """
    rng = np.random.default_rng(seed)
    tokenizers = {stem: Tokenizer(TokenizerSettings(stem=stem)) for stem in (False, True)}
    scores_of = {labeler: labeler_scores(frame, labeler).fillna(-1.0) for labeler in labelers}
    rows: list[tuple[str, str, int, float, str]] = []
    for query_id, group in frame.groupby("query_id", sort=True):
        doc_ids = group["doc_id"].tolist()
        query = group["query"].iloc[0]
        tokens = {stem: [tokenize(text) for text in group["document"]] for stem, tokenize in tokenizers.items()}
        for name, (bm25_class, params, stem) in BM25_RUNS.items():
            scores = np.asarray(bm25_class(tokens[stem], **params).get_scores(tokenizers[stem](query)))
            rows += _ranked(name, query_id, doc_ids, scores)
            if name == "bm25":
                rows += _ranked("bm25_reversed", query_id, doc_ids, -scores)
        rows += _ranked("random", query_id, doc_ids, rng.random(len(doc_ids)))
        for labeler, scores in scores_of.items():
            rows += _ranked(labeler, query_id, doc_ids, scores.loc[group.index].to_numpy())
    return pd.DataFrame(rows, columns=list(RUN_COLUMNS))


def run_query_ndcg(
    runs: pd.DataFrame, frame: pd.DataFrame, grade_column: str = "human", k: int = NDCG_CUTOFF
) -> pd.DataFrame:
    """nDCG@k of every run (columns) for every query of ``frame`` (rows), gains from ``grade_column``.

    As in ``trec_eval``: documents are ordered by score (ties by doc id, descending), unjudged or
    ungraded documents gain 0, and a query the run misses or without any relevant document scores 0.
    """
    judged = {
        query_id: dict(zip(group["doc_id"], group[grade_column].astype("float64").fillna(0.0)))
        for query_id, group in frame.groupby("query_id", sort=True)
    }
    names = list(dict.fromkeys(runs["run"]))
    table = pd.DataFrame(0.0, index=pd.Index(sorted(judged), name="query_id"), columns=names)
    ordered = runs[runs["query_id"].isin(judged)].sort_values(["score", "doc_id"], ascending=False)
    for (run, query_id), group in ordered.groupby(["run", "query_id"], sort=False):
        grades = judged[query_id]
        ranked = [grades.get(doc_id, 0.0) for doc_id in group["doc_id"].iloc[:k]]
        value = ndcg(-np.arange(len(ranked)), ranked, k, ideal_grades=list(grades.values()))
        table.at[query_id, run] = 0.0 if math.isnan(value) else value
    return table


def system_ranking_agreement(
    frame: pd.DataFrame, labelers: Sequence[str], runs: pd.DataFrame | None = None, k: int = NDCG_CUTOFF, seed: int = 0
) -> dict[str, Any]:
    """Do the labeler's grades order retrieval systems as the human grades do?

    Every run gets a mean nDCG@k from the human grades and from each labeler's grades; Kendall's
    tau-b and Spearman's rho between the two orderings of the runs are reported per labeler.
    Without ``runs``, :func:`synthetic_runs` makes some from the judged pool.
    """
    source = "given" if runs is not None else "synthetic"
    runs = runs if runs is not None else synthetic_runs(frame, labelers, seed)
    by_grades = {column: run_query_ndcg(runs, frame, column, k).mean() for column in ("human", *labelers)}
    human = by_grades["human"]
    agreement_by_labeler = {}
    for labeler in labelers:
        labeled = by_grades[labeler]
        agreement_by_labeler[labeler] = {
            "kendall_tau": float(stats.kendalltau(human, labeled).statistic),
            "spearman": float(stats.spearmanr(human, labeled).statistic),
            "same_best_run": bool(human.idxmax() == labeled.idxmax()),
        }
    return {
        "k": k,
        "runs_source": source,
        "runs": list(human.index),
        "ndcg": {run: {column: float(values[run]) for column, values in by_grades.items()} for run in human.index},
        "agreement": agreement_by_labeler,
    }


# --------------------------------------------------------------------------------------------
# Prediction-powered inference
# --------------------------------------------------------------------------------------------


def mean_interval(values: Sequence[float] | np.ndarray, alpha: float = 0.05) -> dict[str, float]:
    """Sample mean with its normal-approximation interval."""
    values = np.asarray(values, dtype=float)
    std_error = float(np.std(values, ddof=1) / math.sqrt(len(values)))
    half = stats.norm.ppf(1 - alpha / 2) * std_error
    return {
        "estimate": float(values.mean()),
        "ci_low": float(values.mean() - half),
        "ci_high": float(values.mean() + half),
        "std_error": std_error,
        "n": len(values),
    }


def ppi_mean(
    model_unlabelled: Sequence[float] | np.ndarray,
    model_labelled: Sequence[float] | np.ndarray,
    human_labelled: Sequence[float] | np.ndarray,
    alpha: float = 0.05,
    power_tuning: bool = False,
) -> dict[str, float]:
    """Prediction-powered estimate of the mean human label (Angelopoulos et al., 2023).

    ``mean(human_l) + lam * (mean(model_u) - mean(model_l))``: the model's mean on the unlabelled
    units, corrected by the human-minus-model rectifier on the labelled ones (``lam = 1``). With
    ``power_tuning`` (PPI++), ``lam = cov(human, model) / ((1 + n/N) var(model))`` clipped to
    [0, 1], which is never wider than the human-only interval asymptotically.
    Normal-approximation interval; needs >= 2 units on each side.
    """
    unlabelled = np.asarray(model_unlabelled, dtype=float)
    labelled, human = np.asarray(model_labelled, dtype=float), np.asarray(human_labelled, dtype=float)
    n, big_n = len(human), len(unlabelled)
    if n < 2 or big_n < 2 or len(labelled) != n:
        raise ValueError(
            f"PPI needs >= 2 labelled and >= 2 unlabelled units with one model label each; got {n} and {big_n}"
        )
    lam = 1.0
    if power_tuning:
        model_variance = np.var(np.concatenate([labelled, unlabelled]), ddof=1)
        lam = (
            float(np.clip(_divide(np.cov(human, labelled)[0, 1], (1 + n / big_n) * model_variance), 0.0, 1.0))
            if model_variance > 0
            else 0.0
        )
    estimate = float(human.mean() + lam * (unlabelled.mean() - labelled.mean()))
    std_error = math.sqrt(np.var(human - lam * labelled, ddof=1) / n + lam**2 * np.var(unlabelled, ddof=1) / big_n)
    half = stats.norm.ppf(1 - alpha / 2) * std_error
    return {
        "estimate": estimate,
        "ci_low": estimate - half,
        "ci_high": estimate + half,
        "std_error": std_error,
        "lambda": lam,
        "n_labelled": n,
        "n_unlabelled": big_n,
    }


def _ppi_summary(
    estimand: str, truth: float, model: np.ndarray, human: np.ndarray, labelled: np.ndarray, alpha: float
) -> dict[str, Any]:
    """Human-only, PPI and PPI++ estimates of the mean of ``human`` from its ``labelled`` part."""
    n_labelled, n_unlabelled = int(labelled.sum()), int((~labelled).sum())
    if n_labelled < 2 or n_unlabelled < 2:
        reason = f"needs >= 2 labelled and >= 2 unlabelled units, has {n_labelled} and {n_unlabelled}"
        return {"estimand": estimand, "skipped": reason}
    human_only = mean_interval(human[labelled], alpha)
    ppi = ppi_mean(model[~labelled], model[labelled], human[labelled], alpha)
    tuned = ppi_mean(model[~labelled], model[labelled], human[labelled], alpha, power_tuning=True)
    width = human_only["ci_high"] - human_only["ci_low"]
    return {
        "estimand": estimand,
        "true_value": float(truth),
        "human_only": human_only,
        "ppi": ppi,
        "ppi_power_tuned": tuned,
        "width_ratio_ppi": (ppi["ci_high"] - ppi["ci_low"]) / width if width > 0 else math.nan,
        "width_ratio_ppi_power_tuned": (tuned["ci_high"] - tuned["ci_low"]) / width if width > 0 else math.nan,
    }


def ppi_relevance(
    frame: pd.DataFrame, labeler: str, labelled_fraction: float = 0.2, seed: int = 0, alpha: float = 0.05
) -> dict[str, Any]:
    """Mean human grade of the pairs the labeler graded, from its scores on all of them plus human grades
    on a uniform random sample of the benchmark's pairs (``labelled_fraction``; the same sample for
    every labeler). The true value is known here, for comparison."""
    rng = np.random.default_rng(seed)
    sampled = np.zeros(len(frame), dtype=bool)
    sampled[rng.choice(len(frame), size=max(2, round(labelled_fraction * len(frame))), replace=False)] = True
    graded = frame[labeler].notna().to_numpy()
    human = frame["human"].to_numpy(dtype=float)[graded]
    return _ppi_summary(
        "mean human grade over pairs",
        human.mean(),
        labeler_scores(frame, labeler).to_numpy()[graded],
        human,
        sampled[graded],
        alpha,
    )


def ppi_ndcg(
    frame: pd.DataFrame,
    labeler: str,
    runs: pd.DataFrame,
    labelled_queries: Iterable[str],
    run: str | None = None,
    k: int = NDCG_CUTOFF,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Mean nDCG@k over queries of one run (default: the first), from the labeler's grades on every
    query plus human grades on ``labelled_queries``."""
    run = run or runs["run"].iloc[0]
    chosen = runs[runs["run"] == run]
    human = run_query_ndcg(chosen, frame, "human", k)[run]
    model = run_query_ndcg(chosen, frame, labeler, k)[run]
    labelled = human.index.isin(set(labelled_queries))
    return _ppi_summary(
        f"mean nDCG@{k} of run {run!r} over queries", human.mean(), model.to_numpy(), human.to_numpy(), labelled, alpha
    )


# --------------------------------------------------------------------------------------------
# Plots (each returns a Figure; nothing is shown from here)
# --------------------------------------------------------------------------------------------


def plot_confusion_matrices(frame: pd.DataFrame, labelers: Sequence[str]) -> Figure:
    """Per labeler: confusion counts and row-normalised shares (rows: human grade)."""
    fig = Figure(figsize=(9.5, 3.9 * len(labelers)))
    axes = fig.subplots(len(labelers), 2, squeeze=False)
    for (count_ax, share_ax), labeler in zip(axes, labelers):
        counts = np.array(agreement(frame["human"], frame[labeler])["confusion"], dtype=float)
        shares = _divide(counts, counts.sum(axis=1, keepdims=True))
        for ax, values, title, fmt in (
            (count_ax, counts, "counts", "{:.0f}"),
            (share_ax, shares, "share of human row", "{:.2f}"),
        ):
            image = ax.imshow(np.nan_to_num(values), cmap="Blues", vmin=0)
            for (i, j), value in np.ndenumerate(values):
                dark = not math.isnan(value) and value > 0.6 * np.nanmax(values)
                ax.text(
                    j,
                    i,
                    "–" if math.isnan(value) else fmt.format(value),
                    ha="center",
                    va="center",
                    color="white" if dark else "black",
                    fontsize=10,
                )
            ax.set(
                xticks=GRADE_VALUES,
                yticks=GRADE_VALUES,
                xlabel=f"{labeler} grade",
                ylabel="human grade",
                title=f"{labeler}: {title}",
            )
            ax.title.set_fontsize(10)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def plot_grade_distributions(frame: pd.DataFrame, labelers: Sequence[str]) -> Figure:
    """Share of pairs per grade: human beside every labeler (pairs each labeler graded)."""
    fig = Figure(figsize=(max(6.5, 1.6 * (len(labelers) + 1) + 3), 4))
    ax = fig.subplots()
    columns = ["human", *labelers]
    width = 0.8 / len(columns)
    for position, column in enumerate(columns):
        grades = frame[column].dropna().astype(int)
        shares = np.bincount(grades, minlength=N_GRADES) / len(grades)
        ax.bar(
            GRADE_VALUES + (position - (len(columns) - 1) / 2) * width,
            shares,
            width,
            label=f"{column} (n={len(grades)})",
            color="black" if column == "human" else None,
        )
    ax.set(xticks=GRADE_VALUES, xlabel="grade", ylabel="share of pairs", title="Grade distributions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_reliability(calibration: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Reliability diagrams: mean human grade per bin of the labeler's score (marker area ~ pairs),
    and, for labelers with grade distributions, observed share of grade >= 2 per bin of P(grade >= 2)."""
    with_binary = {name: report for name, report in calibration.items() if report.get("binary_ge2")}
    fig = Figure(figsize=(12 if with_binary else 6.5, 5))
    axes = fig.subplots(1, 2 if with_binary else 1, squeeze=False)[0]
    panels = [
        (
            axes[0],
            "graded",
            (0.0, 3.0),
            "labeler score (expected relevance, else grade)",
            "mean human grade",
            calibration,
        )
    ]
    if with_binary:
        panels.append(
            (axes[1], "binary_ge2", (0.0, 1.0), "P(grade >= 2)", "observed share with human grade >= 2", with_binary)
        )
    for ax, key, limits, xlabel, ylabel, reports in panels:
        ax.plot(limits, limits, color="grey", linestyle="--", linewidth=1, label="perfect calibration")
        for name, report in reports.items():
            table = pd.DataFrame(report[key]["reliability"])
            sizes = 20 + 280 * table["count"] / table["count"].max()
            line = ax.plot(
                table["mean_predicted"],
                table["mean_observed"],
                marker="",
                label=f"{name} (ECE {report[key]['ece']:.3f})",
            )[0]
            ax.scatter(table["mean_predicted"], table["mean_observed"], s=sizes, color=line.get_color(), alpha=0.7)
        ax.set(
            xlim=limits,
            ylim=limits,
            xlabel=xlabel,
            ylabel=ylabel,
            title=f"Reliability ({key}): all graded pairs; ECE on held-out queries",
        )
        ax.title.set_fontsize(10)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


FOREST_METRICS = (
    "accuracy",
    "kappa",
    "qwk",
    "alpha_ordinal",
    "kappa_binary_ge2",
    f"ndcg@{NDCG_CUTOFF}",
    "pairwise_accuracy",
)


def plot_forest(
    labeler_metrics: Mapping[str, Mapping[str, Mapping[str, float]]], metrics: Sequence[str] = FOREST_METRICS
) -> Figure:
    """One panel per metric: each labeler's estimate with its bootstrap interval.

    ``labeler_metrics`` maps labeler -> metric -> ``{estimate, ci_low, ci_high}`` (the report's
    ``labelers[name]["metrics"]``).
    """
    names = list(labeler_metrics)
    columns = 2
    rows = math.ceil(len(metrics) / columns)
    fig = Figure(figsize=(11, 0.45 * len(names) * rows + 1.2 * rows), layout="constrained")  # room for the suptitle
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, metric in zip(axes, metrics):
        for y, name in enumerate(names):
            result = labeler_metrics[name][metric]
            ax.errorbar(
                result["estimate"],
                y,
                xerr=[[result["estimate"] - result["ci_low"]], [result["ci_high"] - result["estimate"]]],
                fmt="o",
                capsize=4,
                color=f"C{y}",
            )
            ax.annotate(
                f"{result['estimate']:.3f}",
                (result["estimate"], y),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
        ax.set(yticks=range(len(names)), yticklabels=names, ylim=(len(names) - 0.3, -0.7), title=metric)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[len(metrics) :]:
        ax.set_visible(False)
    fig.suptitle("Agreement with human grades (95% bootstrap intervals over queries)")
    return fig


def _format_optional(value: float | None) -> str:
    """A correlation for a plot title; undefined ones (constant rankings) read "undefined"."""
    return "undefined" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def plot_system_ranking(system: Mapping[str, Any]) -> Figure:
    """Per labeler: each run's nDCG@k by human grades (x) and by the labeler's grades (y)."""
    labelers = list(system["agreement"])
    fig = Figure(figsize=(5.2 * len(labelers), 5))
    axes = fig.subplots(1, len(labelers), squeeze=False)[0]
    for ax, labeler in zip(axes, labelers):
        human = [system["ndcg"][run]["human"] for run in system["runs"]]
        labeled = [system["ndcg"][run][labeler] for run in system["runs"]]
        ax.scatter(human, labeled, color="tab:blue")
        for run, x, y in zip(system["runs"], human, labeled):
            ax.annotate(run, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        low, high = min(human + labeled) - 0.05, max(human + labeled) + 0.05
        ax.plot((low, high), (low, high), color="grey", linestyle="--", linewidth=1)
        tau, rho = system["agreement"][labeler]["kendall_tau"], system["agreement"][labeler]["spearman"]
        ax.set(
            xlim=(low, high),
            ylim=(low, high),
            xlabel=f"nDCG@{system['k']} (human grades)",
            ylabel=f"nDCG@{system['k']} ({labeler} grades)",
            title=f"{labeler}\nKendall tau {_format_optional(tau)}, Spearman {_format_optional(rho)}",
        )
        ax.title.set_fontsize(10)
    fig.suptitle(f"System ranking ({system['runs_source']} runs)")
    fig.tight_layout()
    return fig


def plot_ppi(ppi: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Figure:
    """Per estimand: human-only, PPI and PPI++ intervals of every labeler, with the true value."""
    estimands = list(dict.fromkeys(key for results in ppi.values() for key in results))
    fig = Figure(figsize=(11, 1.8 + 0.9 * len(ppi)))
    axes = fig.subplots(1, len(estimands), squeeze=False)[0]
    kinds = (
        ("human_only", "human labels only", "black"),
        ("ppi", "PPI", "tab:orange"),
        ("ppi_power_tuned", "PPI++", "tab:green"),
    )
    for ax, estimand in zip(axes, estimands):
        ticks = []
        for y, (labeler, results) in enumerate(ppi.items()):
            result = results.get(estimand, {})
            if "skipped" in result or not result:
                continue
            for offset, (key, label, color) in zip((-0.22, 0.0, 0.22), kinds):
                interval = result[key]
                ax.errorbar(
                    interval["estimate"],
                    y + offset,
                    xerr=[[interval["estimate"] - interval["ci_low"]], [interval["ci_high"] - interval["estimate"]]],
                    fmt="o",
                    color=color,
                    capsize=3,
                    label=None if ticks else label,
                )
            ax.axvline(result["true_value"], color="grey", linestyle=":", linewidth=1)
            ax.set_title(result["estimand"] + "\n(dotted: value from all human grades)", fontsize=9)
            ticks.append((y, labeler))
        ax.set(yticks=[y for y, _ in ticks], yticklabels=[name for _, name in ticks], ylim=(len(ppi) - 0.4, -0.6))
        ax.tick_params(axis="y", labelsize=8)
    legend_entries = [entry for ax in axes for entry in zip(*ax.get_legend_handles_labels())][: len(kinds)]
    if legend_entries:
        fig.legend(*zip(*legend_entries), loc="lower center", ncol=len(kinds), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

COMPARISON_METRICS = ("accuracy", "kappa", "qwk", "kappa_binary_ge2", f"ndcg@{NDCG_CUTOFF}", "pairwise_accuracy")


def agreement_by_group(frame: pd.DataFrame, labelers: Sequence[str], column: str = "query_type") -> pd.DataFrame:
    """Accuracy, kappa and qwk per value of ``column`` (e.g. query type) and labeler."""
    rows = []
    for group, part in frame.groupby(column, sort=True):
        for labeler in labelers:
            if part[labeler].notna().any():
                result = agreement(part["human"], part[labeler])
                rows.append(
                    {
                        column: group,
                        "labeler": labeler,
                        "n": result["n"],
                        "queries": part["query_id"].nunique(),
                        **{name: result[name] for name in ("accuracy", "kappa", "qwk")},
                    }
                )
    return pd.DataFrame(rows)


def _json_ready(value: Any) -> Any:
    """NaN becomes null (strict JSON), numpy numbers become Python numbers, recursively."""
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _with_interval(result: Mapping[str, Any]) -> str:
    """``estimate [low, high]``; values are None (from JSON) or NaN where undefined."""
    values = [result[key] for key in ("estimate", "ci_low", "ci_high")]
    if values[0] is None or math.isnan(values[0]):
        return "undefined"
    if any(value is None or math.isnan(value) for value in values[1:]):
        return f"{values[0]:.3f} [no defined replicate]"
    return f"{values[0]:.3f} [{values[1]:.3f}, {values[2]:.3f}]"


def summary_tables(report: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """The report's main numbers as tables: agreement, ranking, per_grade, comparisons, calibration,
    system_ranking, ppi (and by_query_type when the benchmark has query types)."""
    labelers = report["labelers"]
    tables = {
        "agreement": pd.DataFrame(
            {
                name: {
                    "n": r["n"],
                    "n_missing": r["n_missing"],
                    **{m: _with_interval(r["metrics"][m]) for m in CONFUSION_METRICS},
                }
                for name, r in labelers.items()
            }
        ).T,
        "ranking": pd.DataFrame(
            {name: {m: _with_interval(r["metrics"][m]) for m in RANKING_METRICS} for name, r in labelers.items()}
        ).T,
        "per_grade": pd.DataFrame(
            [
                {"labeler": name, "grade": grade, **values}
                for name, r in labelers.items()
                for grade, values in r["per_grade"].items()
            ]
        ),
        "comparisons": pd.DataFrame(report["comparisons"]),
        "calibration": pd.DataFrame(
            {
                name: {
                    "score": c["score_source"],
                    "ECE": c["graded"]["ece"],
                    "ECE isotonic": c["graded"]["ece_isotonic"],
                    "RMSE": c["graded"]["rmse"],
                    "RMSE isotonic": c["graded"]["rmse_isotonic"],
                    "binary ECE": (c["binary_ge2"] or {}).get("ece"),
                    "binary ECE temperature": (c["binary_ge2"] or {}).get("ece_temperature"),
                    "temperature": (c["binary_ge2"] or {}).get("temperature"),
                }
                for name, c in report["calibration"].items()
            }
        ).T,
        "system_ranking": pd.DataFrame(report["system_ranking"]["ndcg"]).T,
        "ppi": pd.DataFrame(
            [
                {
                    "labeler": name,
                    "estimand": r["estimand"],
                    "true value": r.get("true_value"),
                    **(
                        {
                            "human only": _with_interval(r["human_only"]),
                            "PPI": _with_interval(r["ppi"]),
                            "PPI++": _with_interval(r["ppi_power_tuned"]),
                            "PPI++ / human-only width": r["width_ratio_ppi_power_tuned"],
                        }
                        if "skipped" not in r
                        else {"human only": r["skipped"]}
                    ),
                }
                for name, results in report["ppi"].items()
                for r in results.values()
            ]
        ),
    }
    tables["system_ranking"].loc["Kendall tau vs human"] = {
        name: values["kendall_tau"] for name, values in report["system_ranking"]["agreement"].items()
    }
    if report.get("by_query_type"):
        tables["by_query_type"] = pd.DataFrame(report["by_query_type"])
    return tables


def _markdown_table(table: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "–" if math.isnan(value) else f"{value:.3f}"
        return "–" if value is None else str(value).replace("|", "\\|")

    header = (
        ["", *map(str, table.columns)] if not isinstance(table.index, pd.RangeIndex) else list(map(str, table.columns))
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in table.iterrows():
        cells = [cell(v) for v in row]
        lines.append(
            "| " + " | ".join(cells if isinstance(table.index, pd.RangeIndex) else [str(index), *cells]) + " |"
        )
    return "\n".join(lines)


def report_markdown(report: Mapping[str, Any]) -> str:
    """A Markdown summary of an evaluation report."""
    benchmark, settings = report["benchmark"], report["settings"]
    sections = [
        "# Agreement with human relevance grades",
        f"{benchmark['pairs']} judged pairs over {benchmark['queries']} queries; human grade counts "
        f"{benchmark['human_grade_counts']}. Intervals: {100 * (1 - settings['alpha']):.0f}% percentile bootstrap over "
        f"queries ({settings['n_boot']} replicates, seed {settings['seed']}). Recalibration and the PPI estimate of "
        f"nDCG use {settings['dev_queries']} human-labelled dev queries; the PPI estimate of the mean grade a random "
        f"{100 * settings['dev_fraction']:.0f}% of the pairs.",
    ]
    system = report["system_ranking"]
    titles = {
        "agreement": "Agreement (estimate [interval])",
        "ranking": "Ranking the judged documents of each query by the labeler's score",
        "per_grade": "Precision and recall per grade",
        "comparisons": "Paired comparisons (A - B, same resampled queries)",
        "calibration": "Calibration (held-out queries)",
        "system_ranking": f"System ranking: mean nDCG@{system['k']} per run ({system['runs_source']} runs)",
        "ppi": "Prediction-powered inference",
        "by_query_type": "Agreement by query type",
    }
    for key, table in summary_tables(report).items():
        if not table.empty:
            sections += [f"## {titles[key]}", _markdown_table(table)]
    return "\n\n".join(sections) + "\n"


def evaluation_report(
    frame: pd.DataFrame,
    labelers: Sequence[str],
    out_dir: str | Path,
    n_boot: int = 1000,
    dev_fraction: float = 0.2,
    seed: int = 0,
    runs: pd.DataFrame | None = None,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Evaluate every labeler column of ``frame`` against ``human`` and write the report.

    Labeler ``name`` is the grade column ``name`` with optional ``name:expected`` and
    ``name:p0..p3``. Writes ``report.json``, ``report.md`` and PNG plots into ``out_dir`` and returns
    the report: ``settings``, ``benchmark``, ``labelers`` (point values, metrics with intervals,
    per-grade numbers), ``comparisons`` (every pair of labelers), ``calibration``,
    ``system_ranking``, ``ppi``, ``by_query_type`` (when present) and ``figures`` (PNG paths).
    ``dev_fraction`` of the queries form the human-labelled dev split of calibration and PPI.
    """
    absent = [name for name in labelers if name not in frame.columns]
    if absent or not labelers:
        raise ValueError(
            f"Labeler column(s) {absent or '(none given)'} not in the table; columns are {list(frame.columns)}"
        )
    without_grades = [name for name in labelers if frame[name].isna().all()]
    labelers = [name for name in labelers if name not in without_grades]
    if not labelers:
        raise ValueError(f"No labeler has a single usable grade: {without_grades}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, dev_queries = query_split(frame, dev_fraction, seed)
    runs_source = "given" if runs is not None else "synthetic"
    runs = runs if runs is not None else synthetic_runs(frame, labelers, seed)
    report: dict[str, Any] = {
        "settings": {
            "n_boot": n_boot,
            "seed": seed,
            "alpha": alpha,
            "dev_fraction": dev_fraction,
            "dev_queries": len(dev_queries),
            "labelers": list(labelers),
        },
        "benchmark": {
            "pairs": len(frame),
            "queries": int(frame["query_id"].nunique()),
            "human_grade_counts": np.bincount(frame["human"], minlength=N_GRADES).tolist(),
        },
        "labelers": {},
        "labelers_without_grades": without_grades,
        "comparisons": [],
        "calibration": {},
        "ppi": {},
    }
    tasks = [(labeler, metric) for labeler in labelers for metric in METRIC_NAMES]
    for labeler, metric in tqdm(tasks, desc="Bootstrap intervals"):
        if labeler not in report["labelers"]:
            point = agreement(frame["human"], frame[labeler])
            report["labelers"][labeler] = {
                **{
                    key: point[key]
                    for key in (
                        "n",
                        "n_missing",
                        "per_grade",
                        "human_distribution",
                        "predicted_distribution",
                        "confusion",
                        "undefined",
                    )
                },
                "metrics": {},
            }
        report["labelers"][labeler]["metrics"][metric] = bootstrap_ci(
            frame, query_metric(metric, labeler), n_boot, seed, alpha
        )
    for labeler_a, labeler_b in combinations(labelers, 2):
        for metric in COMPARISON_METRICS:
            report["comparisons"].append(paired_bootstrap(frame, labeler_a, labeler_b, metric, n_boot, seed, alpha))
    for labeler in labelers:
        report["calibration"][labeler] = calibration_report(frame, labeler, dev_queries)
        report["ppi"][labeler] = {
            "mean_relevance": ppi_relevance(frame, labeler, dev_fraction, seed, alpha),
            f"ndcg@{NDCG_CUTOFF}": ppi_ndcg(frame, labeler, runs, dev_queries, k=NDCG_CUTOFF, alpha=alpha),
        }
    report["system_ranking"] = {**system_ranking_agreement(frame, labelers, runs), "runs_source": runs_source}
    if "query_type" in frame.columns:
        report["by_query_type"] = agreement_by_group(frame, labelers).to_dict("records")
    figures = {
        "confusion_matrices": plot_confusion_matrices(frame, labelers),
        "grade_distributions": plot_grade_distributions(frame, labelers),
        "reliability": plot_reliability(report["calibration"]),
        "forest": plot_forest({name: r["metrics"] for name, r in report["labelers"].items()}),
        "system_ranking": plot_system_ranking(report["system_ranking"]),
        "ppi": plot_ppi(report["ppi"]),
    }
    report["figures"] = {}
    for name, figure in figures.items():
        path = out_dir / f"{name}.png"
        with atomic_write(path, "wb") as handle:
            figure.savefig(handle, format="png", dpi=110)
        report["figures"][name] = str(path)
    report = _json_ready(report)
    write_json(out_dir / "report.json", report)
    with atomic_write(out_dir / "report.md") as handle:
        handle.write(report_markdown(report))
    return report
