"""Ranking: nDCG and pairwise accuracy of one query, and whether labelers order retrieval systems as humans do."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rank_bm25 import BM25L, BM25Okapi, BM25Plus
from scipy import stats

from ..core.artifacts import InputError, iter_delimited
from ..text import Tokenizer, TokenizerSettings
from .agreement_metrics import labeler_scores

NDCG_CUTOFF = 10


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
