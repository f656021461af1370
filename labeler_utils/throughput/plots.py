"""The stage's plots: throughput against batch size, cost per 1,000 labels, quality against cost.

Each function returns a matplotlib Figure and shows nothing; save it with ``fig.savefig(path, dpi=120)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure

from .measure import Measurement

#: Horizontal lines of the throughput plot: kind -> (colour, line style).
_LINE_STYLES = {
    "naive_generate": ("tab:red", "--"),
    "teacher": ("tab:gray", ":"),
    "teacher_stated": ("tab:purple", "-."),
}


def plot_throughput_vs_batch_size(
    measurements: Sequence[Measurement], batch_sizes: Sequence[int], machine: Mapping[str, Any]
) -> Figure:
    """Labels per second against batch size (log scales).

    The plain single pass is a line over its batch sizes, each engine variant a star at its batch
    size, and naive ``generate()``, the measured teacher and the stated teacher horizontal lines.
    ``machine`` (from :func:`machine_info`) names the CPU, its cores and the load in the title.
    """
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    single = [m for m in measurements if m.kind == "single_pass" and m.variant is None]
    ax.plot([m.batch_size for m in single], [m.labels_per_second for m in single], "o-", label="student single pass")
    for m in measurements:
        if m.kind == "single_pass" and m not in single:
            ax.scatter(
                [m.batch_size], [m.labels_per_second], marker="*", s=140, zorder=3, label=m.name.split(", batch")[0]
            )
    for m in measurements:
        if m.kind in _LINE_STYLES:
            color, line = _LINE_STYLES[m.kind]
            ax.axhline(
                m.labels_per_second, color=color, linestyle=line, label=f"{m.name} ({m.labels_per_second:.2f}/s)"
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("labels per second")
    ax.set_title(
        f"labeling throughput ({machine['cpu']}, {machine['usable_cores']} cores, load {machine['load_average'][0]})",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def plot_cost_per_1000_labels(measurements: Sequence[Measurement]) -> Figure:
    """One horizontal bar per priced row: USD per 1,000 labels (log scale), the value written beside it.

    Colours: stated rows purple, the teacher grey, naive ``generate()`` red, the single pass blue; a
    stated row whose name does not say so gets ``[stated]``. Rows without a cost are left out.
    """
    rows = [m for m in measurements if m.cost_per_1000_labels is not None]
    fig = Figure(figsize=(7, 0.45 * len(rows) + 1.2))
    ax = fig.subplots()
    colors = [
        "tab:purple"
        if not m.measured
        else "tab:gray"
        if m.kind == "teacher"
        else "tab:red"
        if m.kind == "naive_generate"
        else "tab:blue"
        for m in rows
    ]
    ax.barh(
        [m.name if m.measured or "stated" in m.name else m.name + " [stated]" for m in rows],
        [m.cost_per_1000_labels for m in rows],
        color=colors,
    )
    for y, m in enumerate(rows):
        ax.text(m.cost_per_1000_labels, y, f" ${m.cost_per_1000_labels:.4f}", va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(min(m.cost_per_1000_labels for m in rows) / 2, max(m.cost_per_1000_labels for m in rows) * 4)
    ax.set_xlabel("USD per 1,000 labels (log scale; prices stated)")
    ax.tick_params(axis="y", labelsize=7)
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def plot_quality_vs_cost(quality: Mapping[str, float], points: Mapping[str, float | None]) -> Figure:
    """Quadratic-weighted kappa against USD per 1,000 labels (log scale), one labelled point per labeler.

    ``quality`` maps labeler -> qwk (from :func:`quality_from_report`), ``points`` labeler -> cost;
    a labeler without a cost in ``points`` is left out.
    """
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, qwk in quality.items():
        if points.get(name) is not None:
            ax.scatter(points[name], qwk, s=80)
            ax.annotate(
                name.replace("_", " "), (points[name], qwk), textcoords="offset points", xytext=(6, 4), fontsize=8
            )
    ax.set_xscale("log")
    ax.margins(x=0.4, y=0.15)
    ax.set_xlabel("USD per 1,000 labels (log scale)")
    ax.set_ylabel("quadratic-weighted kappa vs human labels")
    ax.set_title("quality vs cost", fontsize=10)
    fig.tight_layout()
    return fig
