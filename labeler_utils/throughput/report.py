"""Putting the measurements together: prices, the JSON summary, the Markdown table, and stage 06's quality."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..core.config import STAGES
from .cost import TARGETS, machine_cost_per_1000, ratio, token_cost_per_1000
from .measure import Measurement

STAGE = STAGES[7]  # this stage's folder in a run folder


# ---------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------


def price_measurements(
    measurements: Iterable[Measurement],
    machine_price_per_hour: float,
    teacher_price_in: float = 0.0,
    teacher_price_out: float = 0.0,
) -> None:
    """Set each measured row's cost per 1,000 labels: by machine-hour, or per token for a remote teacher.

    A local teacher and every student run on this machine, so they are priced by the machine-hour.
    A measured remote teacher (``teacher_price_*`` > 0) is priced per token from its usage counts.
    """
    for m in measurements:
        if not m.measured:
            continue
        if m.kind == "teacher" and (teacher_price_in or teacher_price_out):
            m.cost_per_1000_labels = token_cost_per_1000(
                m.prompt_tokens_per_pair, m.completion_tokens_per_pair, teacher_price_in, teacher_price_out
            )
            m.cost_basis = f"${teacher_price_in}/M in + ${teacher_price_out}/M out (stated)"
        else:
            m.cost_per_1000_labels = machine_cost_per_1000(m.labels_per_second, machine_price_per_hour)
            m.cost_basis = f"${machine_price_per_hour}/machine-hour (stated)"


def summarize_throughput(
    measurements: Sequence[Measurement],
    machine: dict[str, Any],
    settings: dict[str, Any],
    flops: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON summary: headline numbers, ratios, targets, and every measurement row.

    ``student_labels_per_second`` is the fastest measured single-pass row of the plain engine (the
    engine variants are reported as ``student_best_variant``); the teacher is the measured one.
    """
    single = [m for m in measurements if m.kind == "single_pass" and m.measured]
    plain = [m for m in single if m.variant is None] or single
    best = max(plain, key=lambda m: m.labels_per_second) if plain else None
    best_any = max(single, key=lambda m: m.labels_per_second) if single else None
    naive = next((m for m in measurements if m.kind == "naive_generate"), None)
    teacher = next((m for m in measurements if m.kind == "teacher" and m.measured), None)
    stated = next((m for m in measurements if m.kind == "teacher_stated"), None)

    def lps(m: Measurement | None) -> float | None:
        return m.labels_per_second if m is not None else None

    def cost(m: Measurement | None) -> float | None:
        return m.cost_per_1000_labels if m is not None else None

    costs = {
        "teacher_measured": cost(teacher),
        "teacher_hosted_api_stated": cost(stated),
        "student_single_pass": cost(best),
        "student_single_pass_best_variant": cost(best_any),
        "student_naive_generate": cost(naive),
    }
    speedup_naive, speedup_teacher = ratio(lps(best), lps(naive)), ratio(lps(best), lps(teacher))
    cost_ratio = ratio(cost(teacher), cost(best))
    targets = [
        _target("single_pass_vs_naive_generate_speed", speedup_naive, "measured"),
        _target("student_vs_teacher_speed", speedup_teacher, "measured (teacher = the measured one)"),
        _target("teacher_vs_student_cost", cost_ratio, "measured throughput x stated prices"),
    ]
    return {
        "stage": STAGE,
        "date": machine.get("date"),
        "machine": machine,
        "settings": settings,
        "student_labels_per_second": lps(best),
        "student_best_batch_size": best.batch_size if best else None,
        "student_best_variant": {"name": best_any.name, "labels_per_second": best_any.labels_per_second}
        if best_any
        else None,
        "teacher_labels_per_second": lps(teacher),
        "naive_generate_labels_per_second": lps(naive),
        "speedup_vs_teacher": speedup_teacher,
        "speedup_vs_naive_generate": speedup_naive,
        "speedup_best_variant_vs_naive_generate": ratio(lps(best_any), lps(naive)),
        "cost_per_1000_labels": costs,
        "cost_ratio_teacher_vs_student": cost_ratio,
        "hosted_api_teacher_stated": None
        if stated is None
        else {
            "labels_per_second": stated.labels_per_second,
            "cost_per_1000_labels": stated.cost_per_1000_labels,
            "student_speedup": ratio(lps(best), stated.labels_per_second),
            "cost_ratio_vs_student": ratio(stated.cost_per_1000_labels, cost(best)),
            "measured": False,
            "notes": stated.notes,
        },
        "targets": targets,
        "other_students": other_students_summary(measurements, teacher),
        "flops": flops or {},
        "measurements": [m.to_dict() for m in measurements],
    }


def other_students_summary(measurements: Sequence[Measurement], teacher: Measurement | None) -> dict[str, Any]:
    """Per other student (rows of kind ``single_pass_other``): its fastest row and its ratios to the teacher."""
    rows: dict[str, list[Measurement]] = {}
    for m in measurements:
        if m.kind == "single_pass_other" and m.measured:
            rows.setdefault(m.name.split(" single pass")[0], []).append(m)
    summary = {}
    for name, timed in rows.items():
        best = max(timed, key=lambda m: m.labels_per_second)
        summary[name] = {
            "best_row": best.name,
            "labels_per_second": best.labels_per_second,
            "cost_per_1000_labels": best.cost_per_1000_labels,
            "peak_rss_mb": best.peak_rss_mb,
            "speedup_vs_teacher": ratio(best.labels_per_second, teacher.labels_per_second if teacher else None),
            "cost_ratio_teacher_vs_student": ratio(
                teacher.cost_per_1000_labels if teacher else None, best.cost_per_1000_labels
            ),
        }
    return summary


def _target(name: str, value: float | None, basis: str) -> dict[str, Any]:
    goal = TARGETS[name]
    return {
        "name": name,
        "target": goal,
        "value": value,
        "met": value is not None and value >= goal,
        "shortfall_factor": ratio(goal, value) if value is not None and value < goal else None,
        "basis": basis,
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != value or value == float("inf"):
            return "–"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) < 0.01 and value != 0:
            return f"{value:.2g}"
        return f"{value:.{digits}f}"
    return str(value)


def _seconds_cell(m: dict[str, Any]) -> str:
    if not m["measured"]:
        return "–"
    stopped = m.get("stopped_seconds") or 0
    return _fmt(m["seconds"], 1) + (f" (+{stopped:.0f} stopped)" if stopped else "")


def markdown_report(summary: dict[str, Any]) -> str:
    """The table and ratios as markdown (machine, date and load first)."""
    machine = summary["machine"]
    gpu = machine.get("gpu")
    lines = [
        f"# Labeling throughput and cost — {summary.get('date')}",
        "",
        f"Machine: {machine['cpu']}, {machine['usable_cores']} usable cores, torch threads {machine['torch_threads']}, "
        f"GPU: {gpu['name'] if gpu else 'none'}; torch {machine['torch']}, transformers {machine['transformers']}  ",
        f"Load average at start (1/5/15 min): {machine['load_average']}  ",
        f"Pairs: {summary['settings'].get('pairs')} from {summary['settings'].get('pairs_source')}; "
        f"student: {summary['settings'].get('student_model')}",
        "",
        "| labeler | measured? | batch | labels/s | seconds | prompt tok/pair | completion tok/pair | peak RSS MB | "
        "CPU s/label | $ per 1,000 labels | load before → after |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in summary["measurements"]:
        load = f"{m['load_before'][0] if m['load_before'] else '–'} → {m['load_after'][0] if m['load_after'] else '–'}"
        lines.append(
            f"| {m['name']} | {'measured' if m['measured'] else '**stated**'} | {_fmt(m['batch_size'])} | "
            f"{_fmt(m['labels_per_second'], 3)} | {_seconds_cell(m)} | "
            f"{_fmt(m['prompt_tokens_per_pair'], 0)} | {_fmt(m['completion_tokens_per_pair'], 1)} | "
            f"{_fmt(m['peak_rss_mb'], 0)} | {_fmt(m['cpu_seconds_per_label'])} | {_fmt(m['cost_per_1000_labels'], 4)} | "
            f"{load if m['measured'] else '–'} |"
        )
    lines += ["", "| ratio | value | target | met? | basis |", "| --- | ---: | ---: | --- | --- |"]
    for t in summary["targets"]:
        shortfall = f" (short by {t['shortfall_factor']:.1f}x)" if t.get("shortfall_factor") else ""
        lines.append(
            f"| {t['name']} | {_fmt(t['value'])}x | {t['target']:.0f}x | "
            f"{'yes' if t['met'] else 'no' + shortfall} | {t['basis']} |"
        )
    api = summary.get("hosted_api_teacher_stated")
    if api:
        lines.append(
            f"| student vs hosted API teacher, speed | {_fmt(api['student_speedup'])}x | – | – | "
            "student measured, API throughput **stated** |"
        )
        lines.append(
            f"| hosted API teacher vs student, cost | {_fmt(api['cost_ratio_vs_student'])}x | – | – | "
            "student measured, API tokens measured locally, prices **stated** |"
        )
    for name, other in (summary.get("other_students") or {}).items():
        lines.append(
            f"| {name} (best: {other['best_row']}) vs teacher, speed | {_fmt(other['speedup_vs_teacher'])}x | "
            f"{TARGETS['student_vs_teacher_speed']:.0f}x | – | measured |"
        )
        lines.append(
            f"| teacher vs {name}, cost | {_fmt(other['cost_ratio_teacher_vs_student'])}x | "
            f"{TARGETS['teacher_vs_student_cost']:.0f}x | – | measured throughput x stated prices |"
        )
    variant = summary.get("student_best_variant")
    if variant and summary.get("speedup_best_variant_vs_naive_generate"):
        lines.append(
            f"| best engine variant ({variant['name']}) vs naive generate | "
            f"{_fmt(summary['speedup_best_variant_vs_naive_generate'])}x | – | – | measured |"
        )
    flops = summary.get("flops") or {}
    if flops:
        lines += [
            "",
            f"FLOPs per pair: {_fmt(flops.get('prefill_gflops_per_pair'), 1)} GFLOP prefill "
            f"(2 x {flops.get('matmul_parameters'):,} matmul parameters x {_fmt(flops.get('prompt_tokens_per_pair'), 0)} tokens) "
            f"+ {_fmt(flops.get('attention_gflops_per_pair'), 1)} GFLOP attention; achieved "
            f"{_fmt(flops.get('achieved_gflops_per_second'), 1)} GFLOP/s = "
            f"{_fmt(100 * flops['fraction_of_peak'] if flops.get('fraction_of_peak') else None, 1)}% of "
            f"{_fmt(flops.get('peak_tflops'), 3)} TFLOP/s peak ({flops.get('device')}).",
        ]
    notes = summary["settings"].get("assumptions")
    if notes:
        lines += ["", "Stated assumptions:", *[f"- {k}: {v}" for k, v in notes.items()]]
    return "\n".join(lines) + "\n"


def write_results(summary: dict[str, Any], out_dir: str | Path, stem: str = "throughput") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir``."""
    from ..core.artifacts import atomic_write, write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_json(json_path, summary)
    with atomic_write(md_path) as handle:
        handle.write(markdown_report(summary))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------
# Quality (stage 06 report, read defensively) for the quality-vs-cost frontier
# ---------------------------------------------------------------------------------------------

_QWK_KEYS = ("qwk", "quadratic_weighted_kappa", "kappa_quadratic", "weighted_kappa")


def _qwk_value(node: Any) -> float | None:
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node) if node == node else None
    if isinstance(node, dict):
        for key in ("estimate", "value", "mean", "point"):
            if isinstance(node.get(key), (int, float)):
                return float(node[key])
    return None


def _labeler_role(path: str) -> str | None:
    text = path.lower()
    if "teacher" in text:
        return "teacher"
    if "zero" in text or "base" in text:
        return "student_zero_shot"
    if "distill" in text or "adapter" in text or "student" in text:
        return "student_distilled"
    return None


def quality_from_report(report_path: str | Path) -> dict[str, float]:
    """Quadratic-weighted kappa of teacher, zero-shot and distilled student from stage 06's report.

    The report's layout is not fixed here: every ``qwk``-like number is collected with the path of
    keys above it, and the path names the labeler (``teacher``, ``zero``/``base``, ``distill``/
    ``student``). The first value found per labeler wins. Returns {} when nothing can be read.
    """
    try:
        report = json.loads(Path(report_path).read_text())
    except (OSError, ValueError):
        return {}
    found: dict[str, float] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            labeler = node.get("labeler") or node.get("name") or node.get("student")
            here = f"{path}/{labeler}" if isinstance(labeler, str) else path
            for key, value in node.items():
                if str(key).lower() in _QWK_KEYS:
                    role, qwk = _labeler_role(here), _qwk_value(value)
                    if role and qwk is not None:
                        found.setdefault(role, qwk)
                else:
                    walk(value, f"{here}/{key}")
        elif isinstance(node, list):
            for item in node:
                walk(item, path)

    walk(report, "")
    return found
