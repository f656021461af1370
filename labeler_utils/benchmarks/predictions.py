"""Labelers' prediction files: reading, writing, finding them in a run folder, and attaching them to a benchmark.

A prediction line is ``{query_id, doc_id, grade, expected_relevance, distribution, labeler}`` (see
:data:`~labeler_utils.core.records.PREDICTION_COLUMNS`); ``grade`` may be null when the labeler gave no usable answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.artifacts import InputError, iter_jsonl_located, write_jsonl
from ..core.records import GRADES, PREDICTION_COLUMNS, PROBABILITY_COLUMNS, is_missing, parse_grade

PREDICTION_FILE_PREFIX = "benchmark_predictions_"
PREDICTION_STAGES = ("05_distill", "04_teacher_labels")  # students first: comparisons read student - teacher


def _probabilities(value: Any, where: str) -> list[float] | None:
    if is_missing(value):
        return None
    if not isinstance(value, (list, tuple)) or len(value) != len(GRADES):
        raise InputError(f"{where}: distribution must be a list of {len(GRADES)} probabilities, got {value!r}")
    try:
        probabilities = [float(p) for p in value]
    except (TypeError, ValueError):
        raise InputError(f"{where}: distribution must hold numbers, got {value!r}") from None
    if min(probabilities) < 0 or not math.isclose(sum(probabilities), 1.0, abs_tol=1e-3):
        raise InputError(f"{where}: distribution must be non-negative and sum to 1, got {value!r}")
    return probabilities


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read a labeler's predictions: JSONL lines ``{query_id, doc_id, grade, expected_relevance,
    distribution, labeler}`` (``grade`` may be null when the labeler gave no usable answer).

    Returns columns ``query_id, doc_id, grade`` (Int64), ``expected_relevance`` (float; computed
    from the distribution when only that is given), ``p0..p3`` (float) and ``labeler``.
    """
    path = Path(path)
    rows, first_seen = [], {}
    for where, record in iter_jsonl_located(path, required=("query_id", "doc_id")):
        if "grade" not in record:
            raise InputError(f"{where}: missing field 'grade' (use null when there is no grade)")
        key = (str(record["query_id"]), str(record["doc_id"]))
        if key in first_seen:
            raise InputError(
                f"{where}: prediction for (query {key[0]!r}, document {key[1]!r}) repeats {first_seen[key]}"
            )
        first_seen[key] = where
        probabilities = _probabilities(record.get("distribution"), where)
        expected = record.get("expected_relevance")
        if not is_missing(expected) and not (isinstance(expected, (int, float)) and 0 <= expected <= GRADES[-1]):
            raise InputError(f"{where}: expected_relevance must be a number within [0, 3] or null, got {expected!r}")
        if is_missing(expected) and probabilities is not None:
            expected = float(np.dot(GRADES, probabilities))
        rows.append(
            {
                "query_id": key[0],
                "doc_id": key[1],
                "grade": parse_grade(record["grade"], where, allow_missing=True),
                "expected_relevance": None if is_missing(expected) else float(expected),
                **dict(zip(PROBABILITY_COLUMNS, probabilities or [None] * len(GRADES))),
                "labeler": str(record.get("labeler") or ""),
            }
        )
    if not rows:
        raise InputError(f"{path}: no predictions")
    frame = pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))
    frame["grade"] = frame["grade"].astype("Int64")
    frame[["expected_relevance", *PROBABILITY_COLUMNS]] = frame[["expected_relevance", *PROBABILITY_COLUMNS]].astype(
        float
    )
    return frame


def _native(value: Any) -> Any:
    """A JSON-ready Python value (None for missing, int/float for numpy numbers)."""
    if is_missing(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


def write_predictions(path: str | Path, frame: pd.DataFrame, labeler: str | None = None) -> int:
    """Write predictions as JSONL (the format :func:`read_predictions` reads); returns the line count.

    ``frame`` needs ``query_id, doc_id, grade``; optional ``expected_relevance``, ``p0..p3`` or a
    ``distribution`` column of 4-lists, and ``labeler`` (or give ``labeler=``).
    """
    missing = [name for name in ("query_id", "doc_id", "grade") if name not in frame.columns]
    if missing:
        raise ValueError(f"Predictions need column(s) {missing}; columns are {list(frame.columns)}")

    def record(row: Mapping[str, Any]) -> dict[str, Any]:
        if all(name in row for name in PROBABILITY_COLUMNS):
            distribution = [_native(row[name]) for name in PROBABILITY_COLUMNS]
            distribution = None if any(p is None for p in distribution) else distribution
        else:
            distribution = row.get("distribution")
            distribution = None if distribution is None else [float(p) for p in distribution]
        grade = _native(row["grade"])
        return {
            "query_id": str(row["query_id"]),
            "doc_id": str(row["doc_id"]),
            "grade": None if grade is None else int(grade),
            "expected_relevance": _native(row.get("expected_relevance")),
            "distribution": distribution,
            "labeler": labeler or str(row.get("labeler") or ""),
        }

    return write_jsonl(path, (record(row) for row in frame.to_dict("records")))


def prediction_labeler_name(path: str | Path) -> str:
    """Labeler name of a prediction file: the file name after ``benchmark_predictions_`` (else its stem)."""
    return Path(path).stem.removeprefix(PREDICTION_FILE_PREFIX)


def find_prediction_files(run_path: str | Path) -> list[Path]:
    """The ``benchmark_predictions_*.jsonl`` files stages 05 and 04 wrote in a run folder (in that order)."""
    return [
        file
        for stage in PREDICTION_STAGES
        for file in sorted((Path(run_path) / stage).glob(f"{PREDICTION_FILE_PREFIX}*.jsonl"))
    ]


def attach_predictions(
    benchmark_frame: pd.DataFrame, predictions: pd.DataFrame | str | Path, name: str
) -> pd.DataFrame:
    """A copy of the benchmark with a labeler's columns ``<name>``, ``<name>:expected``, ``<name>:p0..p3``.

    Predictions are matched by ``(query_id, doc_id)``; ``predictions`` is a table from
    :func:`read_predictions` or a path to such a file. Every benchmark pair needs a prediction
    line (its grade may be null): ``InputError`` says how many are missing, with examples.
    Predictions for pairs outside the benchmark (e.g. a subset of queries) are ignored.
    The expectation and distribution columns are added only when some prediction has them.
    """
    source = str(predictions) if isinstance(predictions, (str, Path)) else f"predictions of {name!r}"
    if isinstance(predictions, (str, Path)):
        predictions = read_predictions(predictions)
    absent_columns = [c for c in ("query_id", "doc_id", "grade") if c not in predictions.columns]
    if absent_columns:
        raise ValueError(f"{source}: missing column(s) {absent_columns}")
    predictions = predictions.reindex(columns=list(PREDICTION_COLUMNS)).astype({"query_id": str, "doc_id": str})
    taken = [c for c in benchmark_frame.columns if c == name or c.startswith(f"{name}:")]
    if taken:
        raise ValueError(f"The benchmark table already has column(s) {taken}; choose another labeler name")
    keys = ["query_id", "doc_id"]
    merged = benchmark_frame[keys].merge(predictions, on=keys, how="left", indicator=True, validate="one_to_one")
    absent = merged.loc[merged["_merge"] == "left_only", keys]
    if len(absent):
        examples = ", ".join(f"({q!r}, {d!r})" for q, d in absent.head(5).itertuples(index=False))
        raise InputError(
            f"{source}: {len(absent)} of {len(benchmark_frame)} benchmark pairs have no prediction, e.g. {examples}; "
            "label every pair, or evaluate on the queries that were labelled"
        )
    out = benchmark_frame.copy()
    out[name] = merged["grade"].astype("Int64").to_numpy()
    if merged["expected_relevance"].notna().any():
        out[f"{name}:expected"] = merged["expected_relevance"].to_numpy(dtype=float)
    if merged[list(PROBABILITY_COLUMNS)].notna().any().any():
        for column in PROBABILITY_COLUMNS:
            out[f"{name}:{column}"] = merged[column].to_numpy(dtype=float)
    return out
