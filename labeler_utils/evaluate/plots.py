"""The evaluation's plots; each function returns a matplotlib Figure and shows nothing."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .agreement_metrics import GRADE_VALUES, N_GRADES, _divide, agreement
from .ranking import NDCG_CUTOFF

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


def report_figures(frame: pd.DataFrame, labelers: Sequence[str], report: Mapping[str, Any]) -> dict[str, Figure]:
    """The figures of :func:`~labeler_utils.evaluate.evaluation_report` by file stem, from the table and the report."""
    return {
        "confusion_matrices": plot_confusion_matrices(frame, labelers),
        "grade_distributions": plot_grade_distributions(frame, labelers),
        "reliability": plot_reliability(report["calibration"]),
        "forest": plot_forest({name: r["metrics"] for name, r in report["labelers"].items()}),
        "system_ranking": plot_system_ranking(report["system_ranking"]),
        "ppi": plot_ppi(report["ppi"]),
    }


def plot_training_loss(log_history: Sequence[Mapping[str, Any]], title: str = "training loss") -> Figure:
    """The logged training loss against the optimizer step (a trainer's ``log_history``)."""
    logged = [entry for entry in log_history if "loss" in entry]
    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    ax.plot([entry["step"] for entry in logged], [float(entry["loss"]) for entry in logged], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_learning_curve(points: Sequence[Mapping[str, Any]], all_queries: float) -> Figure:
    """Held-out QWK (share-calibrated) and Spearman against training queries, one line per student and pair cap.

    ``points`` are the learning-curve points of the TREC DL reproduction (``student``, ``queries`` — a
    number or ``"all"``, drawn at ``all_queries`` —, ``pairs_per_query``, and ``qwk_calibrated`` and
    ``spearman`` intervals with ``estimate``, ``ci_low``, ``ci_high``).
    """
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    lines: dict[tuple[str, Any], list[Mapping[str, Any]]] = {}
    for point in points:
        lines.setdefault((point["student"], point["pairs_per_query"]), []).append(point)
    for (student, cap), line in lines.items():
        xs = [all_queries if p["queries"] == "all" else p["queries"] for p in line]
        for ax, key in zip(axes, ("qwk_calibrated", "spearman")):
            estimates = np.array([p[key]["estimate"] for p in line])
            errors = np.array(
                [[p[key]["estimate"] - p[key]["ci_low"], p[key]["ci_high"] - p[key]["estimate"]] for p in line]
            ).T
            ax.errorbar(
                xs, estimates, yerr=errors, marker="o", capsize=3, label=f"{student}, {cap or 'all'} pairs/query"
            )
    for ax, title in zip(axes, ("QWK with the human grades (share-calibrated)", "Spearman of expected relevance")):
        ax.set_xscale("log")
        ax.set_xlabel("teacher-labelled training queries (per split)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
