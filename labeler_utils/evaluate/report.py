"""The evaluation report: every metric with intervals, comparisons, calibration, PPI, plots, JSON and Markdown."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..benchmarks.folds import query_split
from ..core.artifacts import atomic_write, write_json
from .agreement_metrics import CONFUSION_METRICS, N_GRADES, agreement
from .bootstrap import METRIC_NAMES, RANKING_METRICS, bootstrap_ci, paired_bootstrap, query_metric
from .calibration import calibration_report
from .plots import report_figures
from .ppi import ppi_ndcg, ppi_relevance
from .ranking import NDCG_CUTOFF, synthetic_runs, system_ranking_agreement

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
    figures = report_figures(frame, labelers, report)
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


# --------------------------------------------------------------------------------------------
# Learning curves recorded by the TREC DL reproduction (labeler_utils.experiments)
# --------------------------------------------------------------------------------------------

LEARNING_CURVE_METRICS = {"qwk": "QWK", "qwk_calibrated": "QWK share-calibrated", "spearman": "Spearman"}


def read_learning_curves(paths: Sequence[str | Path]) -> tuple[list[dict[str, Any]], float]:
    """The learning-curve points of reproduction results files (``results.json``), and the mean number of
    training queries per split (where the points marked ``"all"`` are drawn)."""
    points: list[dict[str, Any]] = []
    train_queries: list[int] = []
    for path in paths:
        results = json.loads(Path(path).read_text())
        if not results.get("learning_curve"):
            raise ValueError(f"{path}: no 'learning_curve' (run the reproduction with --learning-curve)")
        points += results["learning_curve"]["points"]
        train_queries += [len(split["train_queries"]) for split in results["splits"]]
    return points, float(np.mean(train_queries))


def learning_curve_table(points: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per learning-curve point: training size, held-out pairs, and the metrics with their intervals."""
    return pd.DataFrame(
        [
            {
                "student": point["student"],
                "training queries": point["queries"],
                "pairs per query": point["pairs_per_query"] or "all",
                "mean training pairs": round(point["mean_train_pairs"]),
                "held-out pairs": point["eval_pairs"],
                **{title: _with_interval(point[key]) for key, title in LEARNING_CURVE_METRICS.items()},
            }
            for point in points
        ]
    )
