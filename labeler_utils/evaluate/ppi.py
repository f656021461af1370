"""Prediction-powered inference: means of human labels from many labeler grades and a few human ones."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .agreement_metrics import _divide, labeler_scores
from .ranking import NDCG_CUTOFF, run_query_ndcg

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
