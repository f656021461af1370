"""Several judged-pair files as one table, and the ways to divide it by query (splits, folds, subsets).

Every division is by query, never by pair: a query's pairs are all on the training side or all
on the test side. The protocols:

* :func:`kfold_splits` — K folds over all queries (every query held out exactly once), seeded;
* :func:`cross_source_splits` — train on the queries of one file, test on those of another
  (e.g. TREC DL 2019 -> 2020 and back): a distribution shift that within-file folds hide;
* :func:`holdout_split` — one seeded train/test division.

:func:`cap_pairs_per_query` spends a training budget on query diversity (at most N pairs of each
query, drawn within each teacher grade in proportion to its share), and :func:`nested_query_subsets`
gives the growing sets of training queries of a learning curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.artifacts import InputError
from .loaders import load_benchmark


def _shuffled_query_ids(frame: pd.DataFrame, seed: int) -> list[str]:
    query_ids = sorted(frame["query_id"].unique())
    return [query_ids[i] for i in np.random.default_rng(seed).permutation(len(query_ids))]


def query_split(frame: pd.DataFrame, test_fraction: float = 0.2, seed: int = 0) -> tuple[set[str], set[str]]:
    """Split the queries (never single pairs) into ``(train_ids, test_ids)``, reproducibly for a seed.

    The distillation stage splits a benchmark with this same function, and evaluation uses it for
    its human-labelled dev queries, so the same seed always gives the same queries. Each side
    gets at least one query.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be within (0, 1), got {test_fraction}")
    shuffled = _shuffled_query_ids(frame, seed)
    if len(shuffled) < 2:
        raise ValueError(f"A split by query needs at least 2 queries, the table has {len(shuffled)}")
    n_test = min(len(shuffled) - 1, max(1, round(test_fraction * len(shuffled))))
    return set(shuffled[n_test:]), set(shuffled[:n_test])


def query_kfold(frame: pd.DataFrame, k: int = 5, seed: int = 0) -> list[tuple[set[str], set[str]]]:
    """``k`` folds by query: a list of ``(train_ids, test_ids)``; every query is tested exactly once."""
    shuffled = _shuffled_query_ids(frame, seed)
    if not 2 <= k <= len(shuffled):
        raise ValueError(f"k must be within [2, number of queries = {len(shuffled)}], got {k}")
    folds = [set(part) for part in np.array_split(np.array(shuffled, dtype=object), k)]
    return [(set(shuffled) - fold, fold) for fold in folds]


def subset_queries(frame: pd.DataFrame, max_pairs: int | None, seed: int = 0) -> pd.DataFrame:
    """Whole queries, in a seeded random order, while their pairs fit in ``max_pairs`` (None: all).

    A query that would overflow is skipped; when no query fits, the first one is kept alone. Stages
    that label only part of the benchmark use this too, so their predictions cover the same pairs.
    """
    if max_pairs is None or max_pairs >= len(frame):
        return frame.reset_index(drop=True)
    sizes = frame.groupby("query_id").size()
    shuffled = _shuffled_query_ids(frame, seed)
    chosen, total = [], 0
    for query_id in shuffled:
        if total + sizes[query_id] <= max_pairs:
            chosen.append(query_id)
            total += sizes[query_id]
    return frame[frame["query_id"].isin(chosen or shuffled[:1])].reset_index(drop=True)


SOURCE_COLUMN = "source"


@dataclass(frozen=True)
class Split:
    """One train/test division of the queries."""

    name: str
    train_ids: frozenset[str]
    test_ids: frozenset[str]

    def __post_init__(self) -> None:
        shared = self.train_ids & self.test_ids
        if shared:
            raise ValueError(
                f"split {self.name}: queries {sorted(shared)[:5]} are on both the training and the test side"
            )


def source_name(path: str | Path) -> str:
    """A short name for a pair file: its folder's name for a generic file name (``trec-dl-2019/pairs.jsonl``)."""
    path = Path(path)
    return path.parent.name if path.stem in {"pairs", "benchmark", "data"} and path.parent.name else path.stem


def load_pair_files(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Judged-pair files in one table with a ``source`` column (see :func:`source_name`).

    The files must have the same columns (the same recorded labelers) and no query id in common;
    either clash raises ``InputError`` naming both files.
    """
    if not paths:
        raise InputError("no pair files given")
    frames: dict[str, pd.DataFrame] = {}
    owners: dict[str, str] = {}
    for path in paths:
        frame = load_benchmark(path)
        name = source_name(path)
        first = next(iter(frames.values()), frame)
        if list(frame.columns) != list(first.columns):
            raise InputError(
                f"{path}: columns {sorted(set(frame.columns) ^ set(first.columns))} differ from "
                f"{paths[0]}'s; every pair file needs the same fields and recorded labelers"
            )
        if name in frames:
            raise InputError(f"{path}: another pair file is also called {name!r}; rename one")
        for query_id in frame["query_id"].unique():
            if query_id in owners:
                raise InputError(
                    f"{path}: query id {query_id!r} is also in {owners[query_id]}; "
                    "query ids must be unique across pair files"
                )
            owners[query_id] = str(path)
        frames[name] = frame
    return pd.concat([f.assign(**{SOURCE_COLUMN: name}) for name, f in frames.items()], ignore_index=True)


def holdout_split(frame: pd.DataFrame, test_fraction: float, seed: int) -> list[Split]:
    """One seeded division of all queries, ``test_fraction`` of them held out."""
    train_ids, test_ids = query_split(frame, test_fraction, seed)
    return [Split("holdout", frozenset(train_ids), frozenset(test_ids))]


def kfold_splits(frame: pd.DataFrame, k: int, seed: int) -> list[Split]:
    """``k`` folds by query over all queries of all files: every query is held out exactly once."""
    return [
        Split(f"fold{i}of{k}", frozenset(train), frozenset(test))
        for i, (train, test) in enumerate(query_kfold(frame, k, seed), start=1)
    ]


def cross_source_splits(frame: pd.DataFrame) -> list[Split]:
    """Train on one file's queries, test on another's, for every ordered pair of files."""
    sources = list(dict.fromkeys(frame[SOURCE_COLUMN]))
    if len(sources) < 2:
        raise InputError(f"training on one file and testing on another needs two pair files, got {sources}")
    queries = {s: frozenset(frame.loc[frame[SOURCE_COLUMN] == s, "query_id"]) for s in sources}
    return [Split(f"{a}_to_{b}", queries[a], queries[b]) for a in sources for b in sources if a != b]


def cap_pairs_per_query(
    records: Sequence[dict[str, Any]], cap: int | None, seed: int, grade_field: str = "grade"
) -> list[dict[str, Any]]:
    """At most ``cap`` records of each query, drawn at random within each grade in proportion to its share.

    Each grade of a query gets ``cap * share`` records rounded by largest remainder, and every
    grade the query has keeps at least one record when ``cap`` allows; the records keep their order.
    """
    if cap is None:
        return list(records)
    if cap < 1:
        raise ValueError(f"the pairs-per-query cap must be at least 1, got {cap}")
    rng = np.random.default_rng(seed)
    by_query: dict[str, dict[int, list[int]]] = {}
    for index, record in enumerate(records):
        by_query.setdefault(record["query_id"], {}).setdefault(int(record[grade_field]), []).append(index)
    kept: list[int] = []
    for strata in by_query.values():
        total = sum(len(v) for v in strata.values())
        if total <= cap:
            kept.extend(i for v in strata.values() for i in v)
            continue
        quotas = _stratum_quotas({g: len(v) for g, v in strata.items()}, cap)
        for grade, indices in strata.items():
            kept.extend(rng.choice(indices, size=quotas[grade], replace=False).tolist())
    return [records[i] for i in sorted(kept)]


def _stratum_quotas(sizes: dict[int, int], cap: int) -> dict[int, int]:
    """Largest-remainder shares of ``cap`` over the strata, at least one each while ``cap`` allows."""
    total = sum(sizes.values())
    floor = {g: min(n, 1) for g, n in sizes.items()} if cap >= len(sizes) else {g: 0 for g in sizes}
    exact = {g: cap * n / total for g, n in sizes.items()}
    quotas = {g: min(sizes[g], max(floor[g], int(exact[g]))) for g in sizes}
    while sum(quotas.values()) > cap:  # the at-least-one floors overshot: take from the largest quota
        largest = max(quotas, key=lambda g: (quotas[g] - floor[g], quotas[g]))
        quotas[largest] -= 1
    by_remainder = sorted(sizes, key=lambda g: exact[g] - int(exact[g]), reverse=True)
    while sum(quotas.values()) < cap:  # hand out what rounding down left, largest remainder first
        open_strata = [g for g in by_remainder if quotas[g] < sizes[g]]
        for grade in open_strata[: cap - sum(quotas.values())]:
            quotas[grade] += 1
    return quotas


def nested_query_subsets(train_ids: Sequence[str], sizes: Sequence[int | None], seed: int) -> dict[int, frozenset[str]]:
    """For each size (None: all), that many training queries; a smaller set is always inside a larger one."""
    order = sorted(train_ids)
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    subsets = {}
    for size in sizes:
        n = len(order) if size is None else size
        if not 1 <= n <= len(order):
            raise ValueError(f"a learning-curve point asks for {n} training queries; the split has {len(order)}")
        subsets[n] = frozenset(order[:n])
    return subsets
