"""Agreement of a labeler's grades with the human grades: confusion-matrix metrics and :func:`agreement`.

Also the grade constants every part of :mod:`labeler_utils.evaluate` uses, and how a labeler's
columns of the evaluation table are read (:func:`labeler_scores`, :func:`labeler_probabilities`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from ..core.records import GRADES, PROBABILITY_COLUMNS

N_GRADES = len(GRADES)
GRADE_VALUES = np.arange(N_GRADES)


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
    rows = confusion.sum(-1)
    return rows, confusion.sum(-2), rows.sum(-1)


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
