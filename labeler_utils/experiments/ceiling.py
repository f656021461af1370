"""The CPU ceiling in one picture: every labeler that reproductions scored, beside the teacher on the same pairs.

:func:`ceiling_rows` reads the ``results.json`` of any number of ``reproduce`` runs (5-fold, cross-year, capped
evaluation sets) into one table; :func:`plot_ceiling` draws it, one row per labeler: its QWK with the human grades
and interval, the teacher's QWK on exactly the same pairs, and the paired difference between them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from ..core.config import PROJECT_ROOT
from .report import format_difference

RECORDED_RESULTS = PROJECT_ROOT / "docs" / "results" / "trec_dl_cv"
"""Where the recorded ``reproduce`` runs live; the 5-fold run is the folder itself."""
RECORDED_CEILING_RUNS = (
    RECORDED_RESULTS,
    RECORDED_RESULTS / "cross_year",
    RECORDED_RESULTS / "mpnet_all",
    RECORDED_RESULTS / "mpnet_cross_year_all",
    RECORDED_RESULTS / "mpnet_cross_encoder_all_pairs",
)
"""The runs the README's ceiling figure is drawn from: 5 folds and across years (MiniLM and the causal students),
all-mpnet-base-v2 on the same protocols (every held-out pair), and the MiniLM and MPNet cross-encoders given every
training pair of two folds."""

CEILING_COLUMNS = (
    "run",
    "evaluation_set",
    "labeler",
    "pairs",
    "qwk",
    "ci_low",
    "ci_high",
    "teacher_qwk",
    "minus_teacher",
    "minus_teacher_low",
    "minus_teacher_high",
)


def read_results(paths: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """``{run name: results.json}`` of the given results files (or folders holding one); a run is named by its
    folder's path from just above the folders' common parent (``trec_dl_cv``, ``trec_dl_cv/cross_year``)."""
    found = [Path(p) / "results.json" if Path(p).is_dir() else Path(p) for p in paths]
    missing = [str(p) for p in found if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no results.json at {', '.join(missing)} (a `reproduce --output` folder)")
    folders = [p.resolve().parent for p in found]
    root = Path(os.path.commonpath(folders)).parent
    return {str(folder.relative_to(root)): json.loads(p.read_text()) for folder, p in zip(folders, found)}


def ceiling_rows(results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per labeler of each run other than its teacher, scored on the first (largest) evaluation set that
    holds it: QWK with its interval, the teacher's QWK on the same pairs and the paired difference (NaN where the
    run recorded none)."""
    rows = []
    for run, report in results.items():
        teacher = report["settings"]["teacher"]
        seen: set[str] = set()
        for eval_set in report["evaluation_sets"]:
            teacher_qwk = eval_set["labelers"][teacher]["metrics"]["qwk"]["estimate"]
            for labeler, result in eval_set["labelers"].items():
                if labeler == teacher or labeler in seen:
                    continue
                seen.add(labeler)
                qwk, paired = result["metrics"]["qwk"], result.get("qwk_minus_teacher") or {}
                rows.append(
                    (
                        f"{run} ({report['protocol']})",
                        eval_set["title"],
                        labeler,
                        result["n"],
                        qwk["estimate"],
                        qwk["ci_low"],
                        qwk["ci_high"],
                        teacher_qwk,
                        paired.get("difference", float("nan")),
                        paired.get("ci_low", float("nan")),
                        paired.get("ci_high", float("nan")),
                    )
                )
    return pd.DataFrame(rows, columns=list(CEILING_COLUMNS))


def plot_ceiling(rows: pd.DataFrame, title: str = "Every labeler against the teacher on the same pairs") -> Figure:
    """One line per labeler (grouped by run, best first): its QWK with interval (dot), the teacher's QWK on the
    same pairs (diamond) and, at the right, the paired difference with its interval."""
    runs = list(dict.fromkeys(rows["run"]))  # in the order given
    ordered = (
        rows.assign(order=rows["run"].map(runs.index))
        .sort_values(["order", "qwk"], ascending=[True, False])
        .reset_index(drop=True)
    )
    fig = Figure(figsize=(11, 0.32 * len(ordered) + 1.6), layout="constrained")
    ax = fig.subplots()
    for y, row in ordered.iterrows():
        color = f"C{row['order']}"
        ax.plot([row["qwk"], row["teacher_qwk"]], [y, y], color="lightgrey", linewidth=1, zorder=1)
        ax.errorbar(
            row["qwk"],
            y,
            xerr=[[row["qwk"] - row["ci_low"]], [row["ci_high"] - row["qwk"]]],
            fmt="o",
            color=color,
            capsize=3,
            zorder=2,
        )
        ax.scatter(row["teacher_qwk"], y, marker="D", color="black", s=22, zorder=3)
        paired = {
            "difference": row["minus_teacher"],
            "ci_low": row["minus_teacher_low"],
            "ci_high": row["minus_teacher_high"],
        }
        ax.annotate(
            f"n={row['pairs']}  {format_difference(paired) if pd.notna(row['minus_teacher']) else ''}",
            (1.0, y),
            xycoords=("axes fraction", "data"),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
        )
    ax.scatter([], [], marker="D", color="black", s=22, label="teacher, same pairs")
    for index, run in enumerate(runs):
        ax.errorbar([], [], fmt="o", color=f"C{index}", label=run)
    ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set(
        yticks=range(len(ordered)),
        yticklabels=ordered["labeler"],
        ylim=(len(ordered) - 0.5, -0.5),
        xlabel="QWK with the human grades (95% bootstrap interval over queries)",
        title=f"{title}\n(right: labeler minus teacher, paired, with its interval)",
    )
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(fontsize=7, loc="outside lower center", ncols=2)
    return fig
