"""Calibration of a labeler's scores and grade distributions, and recalibration fitted on dev queries."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, special
from sklearn.isotonic import IsotonicRegression

from ..core.records import GRADES
from .agreement_metrics import N_GRADES, labeler_probabilities, labeler_scores

RELEVANT_GRADE = 2  # binary relevance for calibration: grade >= 2


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
