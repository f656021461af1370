"""The protocols: which pairs are read, how queries are divided, and how many pairs each side gets.

The divisions themselves (hold-out, K folds, cross-source, the per-query cap, nested query subsets)
are :mod:`labeler_utils.benchmarks.folds`; this module applies them to the reproduction's options.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..benchmarks.folds import (
    Split,
    cap_pairs_per_query,
    cross_source_splits,
    holdout_split,
    kfold_splits,
    load_pair_files,
)
from ..benchmarks.loaders import RECORDED_PREFIX, recorded_labelers
from ..teacher import add_committee, labels_from_frame
from .students import COMMITTEE, STUDENTS

#: The per-student options: ``"N"`` for every student, or ``"name=N,name=M"``.
PER_STUDENT_OPTIONS = {
    "epochs": float,
    "max_train_pairs": int,
    "max_train_pairs_per_query": int,
    "max_eval_pairs_per_query": int,
}


def teacher_column(name: str) -> str:
    """The frame column of a recorded labeler: ``deepseek_v3_umbrela`` -> ``recorded:deepseek_v3_umbrela``."""
    return name if name.startswith(RECORDED_PREFIX) else RECORDED_PREFIX + name


def load_frame(pairs: Sequence[str | Path], teacher: str) -> pd.DataFrame:
    """The judged-pair files as one table, checked to record ``teacher``, with the committee of all recorded judges."""
    frame = load_pair_files(pairs)
    if teacher not in frame.columns:
        raise SystemExit(
            f"{pairs} have no recorded labeler {teacher!r}; they have {[c for c in frame if c.startswith(RECORDED_PREFIX)]}"
        )
    return add_committee(frame, recorded_labelers(frame), COMMITTEE)


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


def protocol_splits(frame: pd.DataFrame, args: argparse.Namespace) -> tuple[list[Split], str]:
    """The splits the options ask for, and the protocol's name as the report gives it."""
    only = [name.strip() for name in (args.splits or "").split(",") if name.strip()]
    splits = query_splits(frame, args.test_fraction, args.seed, args.kfold, args.cross_source, only)
    protocol = "cross-source" if args.cross_source else f"{args.kfold}-fold" if args.kfold else "holdout"
    if only:
        protocol += f" ({len(splits)} of its splits: {', '.join(s.name for s in splits)})"
    return splits, protocol


def split_pairs(frame: pd.DataFrame, query_ids: frozenset[str]) -> int:
    """How many pairs of the frame belong to these queries."""
    return int(frame["query_id"].isin(query_ids).sum())


def split_records(frame: pd.DataFrame, splits: Sequence[Split]) -> list[dict[str, Any]]:
    """Each split's queries and pair counts, as results.json records them."""
    return [
        {
            "name": s.name,
            "train_queries": sorted(s.train_ids),
            "test_queries": sorted(s.test_ids),
            "train_pairs": split_pairs(frame, s.train_ids),
            "test_pairs": split_pairs(frame, s.test_ids),
        }
        for s in splits
    ]


def splits_summary(frame: pd.DataFrame, splits: Sequence[Split]) -> str:
    """One line on every split: training and held-out queries with their pairs."""
    return "; ".join(
        f"{s.name}: {len(s.train_ids)} training queries ({split_pairs(frame, s.train_ids)} pairs), "
        f"{len(s.test_ids)} held out ({split_pairs(frame, s.test_ids)} pairs)"
        for s in splits
    )


def sample_per_query(frame: pd.DataFrame, max_pairs_per_query: int | None, seed: int) -> pd.DataFrame:
    """At most ``max_pairs_per_query`` pairs of each query (None: all), drawn at random with ``seed``, in frame order."""
    if max_pairs_per_query is None:
        return frame
    shuffled = frame.sample(frac=1.0, random_state=seed)
    return shuffled.groupby("query_id", sort=False).head(max_pairs_per_query).sort_index()


def evaluation_pairs(frame: pd.DataFrame, split: Split, max_pairs_per_query: int | None, seed: int) -> pd.DataFrame:
    """The split's held-out pairs; with a cap, at most that many per query, drawn at random with ``seed``."""
    return sample_per_query(frame[frame["query_id"].isin(split.test_ids)], max_pairs_per_query, seed)


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


def per_student_settings(args: argparse.Namespace, students: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Every per-student option as {option: {student: value}}."""
    return {
        option: parse_per_student(getattr(args, option), students, cast) for option, cast in PER_STUDENT_OPTIONS.items()
    }


def parse_sizes(text: str) -> list[int | None]:
    """``"5,10,all"`` -> [5, 10, None]."""
    return [None if item.strip() == "all" else int(item) for item in text.split(",") if item.strip()]


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
