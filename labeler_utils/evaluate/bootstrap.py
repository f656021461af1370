"""Metrics as sums of per-query statistics, and intervals from a bootstrap over queries."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from tqdm import tqdm

from .agreement_metrics import CONFUSION_METRICS, N_GRADES, _divide, labeler_scores, spearman_rho
from .ranking import NDCG_CUTOFF, ndcg, pairwise_counts

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


def _score_statistics(frame: pd.DataFrame, labeler: str) -> sparse.csr_matrix:
    """Per query, its graded pairs counted by (human grade, labeler score): a grade x score table whose
    columns are the labeler's distinct scores in ascending order, flattened; sparse, one entry per pair."""
    codes, n_queries = _query_index(frame)
    scores = labeler_scores(frame, labeler).to_numpy()
    graded = ~np.isnan(scores)
    distinct, score_rank = np.unique(scores[graded], return_inverse=True)
    cells = frame["human"].to_numpy(dtype=int)[graded] * len(distinct) + score_rank
    return sparse.csr_matrix((np.ones(len(cells)), (codes[graded], cells)), shape=(n_queries, N_GRADES * len(distinct)))


def _ndcg_statistics(scores: np.ndarray, human: np.ndarray, k: int | None) -> tuple[float, float]:
    value = ndcg(scores, human, k)
    return (0.0, 0.0) if math.isnan(value) else (value, 1.0)


def _ratio(statistics: np.ndarray) -> np.ndarray:
    return _divide(statistics[..., 0], statistics[..., 1])


_RESAMPLED_VALUES = 2**22  # resampled statistics held at once by QueryMetric.replicates (32 MiB)


@dataclass(frozen=True)
class QueryMetric:
    """One labeler's metric, computed from per-query statistics summed over queries.

    Resampling queries then only re-weights the per-query statistics, which makes a bootstrap
    of thousands of replicates cheap. Calling it on a table gives the metric's value.
    """

    name: str
    labeler: str
    statistics: Callable[[pd.DataFrame, str], np.ndarray | sparse.csr_matrix]
    combine: Callable[[np.ndarray], np.ndarray]

    def query_statistics(self, frame: pd.DataFrame) -> np.ndarray | sparse.csr_matrix:
        """Array (or sparse matrix) of shape (queries sorted by id, statistics)."""
        return self.statistics(frame, self.labeler)

    def value(self, statistics: np.ndarray | sparse.csr_matrix) -> float:
        """The metric over every query of the per-query ``statistics``."""
        return float(self.combine(np.asarray(statistics.sum(axis=0)).reshape(-1)))

    def replicates(self, statistics: np.ndarray | sparse.csr_matrix, counts: np.ndarray) -> np.ndarray:
        """The metric of each resampled table: row ``b`` of ``counts`` is how often replicate ``b`` draws
        each query. Computed a block of replicates at a time, so that memory stays bounded when there
        are many statistics (one per distinct score for ``spearman_expected``)."""
        block = max(1, _RESAMPLED_VALUES // max(1, statistics.shape[1]))
        return np.concatenate(
            [
                self.combine(np.asarray(counts[start : start + block] @ statistics))
                for start in range(0, len(counts), block)
            ]
        )

    def __call__(self, frame: pd.DataFrame) -> float:
        return self.value(self.query_statistics(frame))


RANKING_METRICS = ("ndcg", f"ndcg@{NDCG_CUTOFF}", "pairwise_accuracy")
METRIC_NAMES = (*CONFUSION_METRICS, *RANKING_METRICS)
#: Metrics of a labeler's scores (expected relevance, else grade): Spearman's rho with the human grades.
SCORE_METRICS = ("spearman_expected",)


def query_metric(name: str, labeler: str) -> QueryMetric:
    """The metric ``name`` of one labeler: one of :data:`METRIC_NAMES`, ``ndcg@K`` for any K, or
    ``spearman_expected`` (Spearman's rho of the labeler's scores, i.e. expected relevance where it has
    one, else its grade, with the human grades; ties share their average rank, as in ``scipy.stats.spearmanr``)."""
    if name in CONFUSION_METRICS:
        fn = CONFUSION_METRICS[name]
        return QueryMetric(
            name, labeler, _confusion_statistics, lambda s: fn(s.reshape(*s.shape[:-1], N_GRADES, N_GRADES))
        )
    if name in SCORE_METRICS:
        return QueryMetric(
            name, labeler, _score_statistics, lambda s: spearman_rho(s.reshape(*s.shape[:-1], N_GRADES, -1))
        )
    if name == "ndcg" or (name.startswith("ndcg@") and name[5:].isdigit()):
        k = int(name[5:]) if "@" in name else None
        return QueryMetric(
            name, labeler, partial(_ranking_statistics, per_query=partial(_ndcg_statistics, k=k)), _ratio
        )
    if name == "pairwise_accuracy":
        return QueryMetric(name, labeler, partial(_ranking_statistics, per_query=pairwise_counts), _ratio)
    raise ValueError(f"Unknown metric {name!r}; metrics are {[*METRIC_NAMES, *SCORE_METRICS]} (or ndcg@K)")


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
        statistics = metric_fn.query_statistics(frame)
        estimate = metric_fn.value(statistics)
        replicates = metric_fn.replicates(statistics, _draw_counts(draws, len(query_ids)))
    else:
        groups = dict(tuple(frame.groupby("query_id", sort=True)))

        def resampled(row: np.ndarray) -> pd.DataFrame:
            return pd.concat(
                [groups[query_ids[q]].assign(query_id=f"{query_ids[q]}#{draw}") for draw, q in enumerate(row)]
            )

        replicates = np.array(
            [metric_fn(resampled(row)) for row in tqdm(draws, desc="Bootstrap", leave=False)], dtype=float
        )
        estimate = metric_fn(frame)
    return _interval(estimate, np.asarray(replicates, dtype=float), alpha)


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
    statistics_a, statistics_b = metric_a.query_statistics(both), metric_b.query_statistics(both)
    difference = metric_a.replicates(statistics_a, counts) - metric_b.replicates(statistics_b, counts)
    value_a, value_b = metric_a.value(statistics_a), metric_b.value(statistics_b)
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
