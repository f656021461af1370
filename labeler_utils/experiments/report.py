"""What a reproduction writes to ``--output``: results.json, summary.json and results.md (the plots are written
where they are drawn: ``forest_<set>.png`` by :mod:`.scoring`, ``learning_curve.png`` by :mod:`.learning_curve`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.artifacts import atomic_write, write_json
from ..evaluate import NDCG_CUTOFF
from .scoring import METRICS, SPEARMAN
from .students import COSINE_LABELER, COSINES, DEFAULT_STUDENT, STUDENTS

METRIC_TITLES = {
    "accuracy": "acc",
    "kappa": "kappa",
    "qwk": "QWK",
    "kappa_binary_ge2": "kappa (>=2)",
    SPEARMAN: "Spearman E[rel]",
    f"ndcg@{NDCG_CUTOFF}": f"nDCG@{NDCG_CUTOFF}",
    "pairwise_accuracy": "pairwise acc",
}
PAIRED_COLUMNS = {"qwk_minus_teacher": "QWK - teacher", "qwk_minus_cosine": "QWK - cosine"}
TABLE_COLUMNS = (*(METRIC_TITLES[m] for m in METRICS), *PAIRED_COLUMNS.values())


def _interval(result: dict[str, Any]) -> str:
    return f"{result['estimate']:.3f} [{result['ci_low']:.3f}, {result['ci_high']:.3f}]"


def format_difference(paired: dict[str, Any] | None) -> str:
    """A paired difference with its interval, or a dash."""
    return f"{paired['difference']:+.3f} [{paired['ci_low']:+.3f}, {paired['ci_high']:+.3f}]" if paired else "–"


def _train_time(train: dict[str, Any]) -> str:
    """Training wall time; a training resumed from a checkpoint says which steps that time covers."""
    seconds = f"{train.get('train_active_seconds') or train['train_seconds']:.0f} s"
    if not train.get("resumed_from"):
        return seconds
    first = int(Path(train["resumed_from"]).name.rpartition("-")[2]) + 1
    return f"{seconds} for steps {first}-{train['global_steps']} (resumed from a checkpoint)"


def agreement_rows(labelers: dict[str, Any], teacher: str) -> list[list[Any]]:
    """One row per labeler of an evaluation set: name (the teacher marked), n, every metric and the paired
    differences, each as ``estimate [low, high]``."""
    return [
        [
            f"{labeler} (teacher)" if labeler == teacher else labeler,
            result["n"],
            *(_interval(result["metrics"][m]) for m in METRICS),
            *(format_difference(result.get(key)) for key in PAIRED_COLUMNS),
        ]
        for labeler, result in labelers.items()
    ]


def agreement_table(labelers: dict[str, Any], teacher: str) -> pd.DataFrame:
    """An evaluation set's agreement table (``evaluate_set``'s results) as results.md shows it, as a DataFrame."""
    return pd.DataFrame(agreement_rows(labelers, teacher), columns=["labeler", "n", *TABLE_COLUMNS]).set_index(
        "labeler"
    )


def markdown(report: dict[str, Any]) -> str:
    """results.md: the agreement tables per evaluation set, then cost (training and labelling)."""
    settings, machine = report["settings"], report["machine"]
    lines = [
        f"# {report['sources_title']}: distilled students vs DeepSeek-V3, scored against NIST human grades",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {machine['date']}; machine: {machine['cpu']}, {machine['usable_cores']} cores, torch threads "
        f"{machine['torch_threads']}, no GPU; load average at start {machine['load_average']} (each timing "
        "keeps its own load average in results.json: a timing taken while other jobs ran is a lower bound).",
        "",
        f"Teacher: `{settings['teacher']}` (recorded grades of the training queries are the only training data). "
        f"Split by query, seed {settings['seed']}: {report['splits_summary']}. Intervals: 95% percentile bootstrap over "
        f"held-out queries, {settings['n_boot']} resamples; 'QWK - teacher' is paired (same resamples, same "
        "pairs), and so is 'QWK - cosine', the difference to the untrained cosine of the student's own encoder "
        "(MiniLM's for a student without one).",
        "",
    ]
    for eval_set in report["evaluation_sets"]:
        lines += [
            f"## {eval_set['title']}",
            "",
            f"{eval_set['pairs']} pairs, {eval_set['queries']} held-out queries; human grade counts "
            f"{eval_set['human_grade_counts']}.",
            "",
            "| labeler | n | " + " | ".join(TABLE_COLUMNS) + " |",
            "|---|---|" + "---|" * len(TABLE_COLUMNS),
        ]
        lines += [
            "| " + " | ".join(str(cell) for cell in row) + " |"
            for row in agreement_rows(eval_set["labelers"], settings["teacher"])
        ]
        lines.append("")
        own = {
            labeler: r["qwk_minus_own_teacher"]
            for labeler, r in eval_set["labelers"].items()
            if "qwk_minus_own_teacher" in r
        }
        lines += [
            f"- {labeler}: QWK minus its own teacher's (`{d['teacher']}`, paired) {d['difference']:+.3f} "
            f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
            for labeler, d in own.items()
        ] + ([""] if own else [])
        lines += paired_markdown(eval_set["labelers"])
        if len(eval_set["per_split"]) > 1:
            names = list(eval_set["per_split"])
            lines += [
                f"Per split: QWK [95% CI] on each split's held-out queries ({eval_set['title'].lower()}).",
                "",
                "| labeler | " + " | ".join(names) + " |",
                "|---|" + "---|" * len(names),
            ]
            for labeler in eval_set["labelers"]:
                lines.append(
                    f"| {labeler} | "
                    + " | ".join(_interval(eval_set["per_split"][n][labeler]["qwk"]) for n in names)
                    + " |"
                )
            lines.append("")
    if report.get("learning_curve"):
        lines += learning_curve_markdown(report["learning_curve"])
    return "\n".join(lines + cost_markdown(report))


def paired_markdown(labelers: dict[str, Any]) -> list[str]:
    """QWK differences between every labeler and each reference (the untrained cosines, the default student) on the
    same pairs, when there is more than the one reference the agreement table already shows."""
    references = list(dict.fromkeys(ref for result in labelers.values() for ref in result.get("qwk_minus", {})))
    if references in ([], [COSINE_LABELER]):
        return []
    lines = [
        "Paired QWK differences (row minus column, same pairs, same resamples):",
        "",
        "| labeler | " + " | ".join(references) + " |",
        "|---|" + "---|" * len(references),
    ]
    for labeler, result in labelers.items():
        if "qwk_minus" in result:
            lines.append(
                f"| {labeler} | "
                + " | ".join(format_difference(result["qwk_minus"].get(ref)) for ref in references)
                + " |"
            )
    return [*lines, ""]


def cost_markdown(report: dict[str, Any]) -> list[str]:
    """The cost section of results.md: labels/s and memory of every labeller, time and memory of every training."""
    lines = [
        "## Cost on this CPU",
        "",
        "| labeler (split) | labels/s (batch) | labelled pairs | labelling peak RSS MB | train pairs x epochs | "
        "train steps | train time | train peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    shown: set[str] = set()
    for student in report["students"].values():
        for split_name, result in student["splits"].items():
            train = result.get("train")
            for stage, output in result["stages"].items():
                row = f"{output['labeler']} ({split_name})"
                if row in shown:
                    continue
                shown.add(row)
                timing = output["timing"]
                train_cells = (
                    [
                        f"{train['train_examples']} x {result['config']['epochs']:g}",
                        str(train["global_steps"]),
                        _train_time(train),
                        str(train["peak_rss_mb"]),
                    ]
                    if stage == "distilled"
                    else ["–"] * 4
                )
                lines.append(
                    f"| {row} | {timing['labels_per_second']:.2f} ({timing['batch_size']}) | {timing['pairs']} | "
                    f"{timing['peak_rss_mb']} | " + " | ".join(train_cells) + " |"
                )
    lines += [
        "",
        "Peak RSS is the whole process's resident memory during the phase (sampled every 50 ms), after "
        "freeing the previous phase. Labels/s include tokenisation; train time is the trainer's wall time. "
        "Time during which the job was stopped by a signal (job control) is taken out of both; the "
        "load average is recorded with every timing in results.json.",
        "",
    ]
    zero_shot = {
        split["stages"]["zero-shot"]["labeler"]: student["zero_shot"]
        for student in report["students"].values()
        for split in student["splits"].values()
    }
    return lines + ["", "Zero-shot rows: " + "; ".join(f"{name}: {how}" for name, how in zero_shot.items()) + ".", ""]


def learning_curve_markdown(curve: dict[str, Any]) -> list[str]:
    """The learning-curve section of results.md: pooled held-out QWK and Spearman per training size."""
    lines = [
        "## Learning curve",
        "",
        f"Each point: the student retrained on the first N training queries of every split (nested, seeded) "
        f"with at most P teacher-labelled pairs per query (stratified by grade), scored on the held-out pairs of "
        f"the splits (the 'eval pairs' column), pooled. Plot: `{curve['plot']}`.",
        "",
        "| student | training queries per split | pairs per query (cap) | training pairs (mean per split) | eval pairs | "
        "QWK [95% CI] | QWK share-calibrated | Spearman E[rel] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for point in curve["points"]:
        lines.append(
            f"| {point['student']} | {point['queries']} | {point['pairs_per_query'] or 'all'} | "
            f"{point['mean_train_pairs']:.0f} | {point['eval_pairs']} | {_interval(point['qwk'])} | {_interval(point['qwk_calibrated'])} | "
            f"{_interval(point['spearman'])} |"
        )
    return [*lines, ""]


def summary(report: dict[str, Any], students: Sequence[str], teacher: str) -> dict[str, Any]:
    """The headline numbers (summary.json), from the evaluation set over all held-out pairs when there is one."""
    eval_set = next((e for e in report["evaluation_sets"] if e["tag"] == "all"), report["evaluation_sets"][0])
    labelers = eval_set["labelers"]

    def qwk(labeler: str) -> float | None:
        return labelers[labeler]["metrics"]["qwk"]["estimate"] if labeler in labelers else None

    def scored_row(labeler: str, calibrated: str) -> dict[str, Any]:
        """A labeler's numbers on the first evaluation set that scores it (all pairs, else a per-query cap)."""
        scored = next((e for e in report["evaluation_sets"] if labeler in e["labelers"]), eval_set)
        found = scored["labelers"]
        result, calibrated_result = found.get(labeler, {}), found.get(calibrated, {})
        return {
            "evaluation_set": scored["title"],
            "qwk": result.get("metrics", {}).get("qwk", {}).get("estimate"),
            "qwk_share_calibrated": calibrated_result.get("metrics", {}).get("qwk", {}).get("estimate"),
            "spearman": result.get("metrics", {}).get(SPEARMAN, {}).get("estimate"),
            "teacher_qwk_same_pairs": found[teacher]["metrics"]["qwk"]["estimate"],
            "qwk_minus_teacher": result.get("qwk_minus_teacher"),
            "qwk_minus_cosine": result.get("qwk_minus_cosine"),
            "qwk_minus": result.get("qwk_minus"),
        }

    rows = {name: scored_row(STUDENTS[name].labeler(name), f"{name} distilled, share-calibrated") for name in students}
    default = DEFAULT_STUDENT if DEFAULT_STUDENT in students else None
    return {
        "protocol": report["protocol"],
        "queries": int(len({q for s in report["splits"] for q in s["test_queries"]})),
        "folds": len(report["splits"]),
        "evaluation_set": eval_set["title"],
        "pairs": eval_set["pairs"],
        "teacher": teacher,
        "teacher_qwk": qwk(teacher),
        "cosine_qwk": qwk(COSINE_LABELER),
        "cosines_qwk": {c.labeler: qwk(c.labeler) for c in COSINES.values() if c.labeler in labelers},
        "default_student": default,
        "default_student_qwk": rows[default]["qwk"] if default else None,
        "students": rows,
        "best_student": max(  # by QWK minus the teacher's on the same pairs: fair across evaluation sets
            rows, key=lambda n: (rows[n]["qwk_minus_teacher"] or {}).get("difference", -np.inf)
        ),
        "command": report["command"],
        "date": report["date"],
    }


def write_report(report: dict[str, Any], students: Sequence[str], teacher: str, output: Path) -> str:
    """Write results.json, summary.json and results.md into ``output``; returns the markdown."""
    write_json(output / "results.json", report)
    write_json(output / "summary.json", summary(report, students, teacher))
    text = markdown(report)
    with atomic_write(output / "results.md") as handle:
        handle.write(text)
    return text
