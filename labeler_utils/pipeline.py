"""The main job: execute the numbered notebooks in order with papermill into one run folder."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .core.artifacts import atomic_write, write_json
from .core.config import PROJECT_ROOT, STAGES, run_dir

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
METRICS_FILE = "metrics.json"


def execute_notebook(stage: str, run_path: Path, parameters: dict[str, Any], kernel: str = "python3") -> float:
    """Run one stage notebook into ``<run>/notebooks/``; returns its wall time in seconds."""
    import papermill

    source = NOTEBOOKS_DIR / f"{stage}.ipynb"
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    target = run_path / "notebooks" / f"{stage}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    papermill.execute_notebook(
        str(source),
        str(target),
        parameters={"run_dir": str(run_path), **parameters},
        kernel_name=kernel,
        cwd=str(PROJECT_ROOT),
        progress_bar=False,
    )
    return time.perf_counter() - start


def stage_metrics(run_path: Path, stage: str) -> dict[str, Any]:
    """The ``metrics.json`` a stage recorded, or an empty dict."""
    path = run_path / stage / METRICS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def run_pipeline(
    profile: str = "smoke",
    run_id: str | None = None,
    stages: Sequence[str] = STAGES,
    parameters: dict[str, Any] | None = None,
    stage_parameters: Mapping[str, dict[str, Any]] | None = None,
) -> Path:
    """Execute ``stages`` in order; writes ``report.md`` and ``pipeline.json`` into the run folder.

    ``parameters`` go to every notebook, ``stage_parameters[stage]`` to that stage's notebook only
    (see :func:`labeler_utils.domain.load_pipeline_config`, which routes a config file's parameters).
    A stage whose notebook fails stops the run; the folder keeps every artifact written so far,
    and any stage can be re-run on its own against the same folder. A profile this machine cannot run (``gpu``
    without CUDA) is refused first (:func:`labeler_utils.config.check_profile_runs_here`).
    """
    from .core.config import check_profile_runs_here, new_run_id

    check_profile_runs_here(profile)
    run_path = run_dir(run_id or new_run_id(profile))
    timings: dict[str, float] = {}
    for stage in stages:
        print(f"[{time.strftime('%H:%M:%S')}] {stage} ...", flush=True)
        own = (stage_parameters or {}).get(stage, {})
        timings[stage] = execute_notebook(stage, run_path, {"profile": profile, **(parameters or {}), **own})
        print(f"[{time.strftime('%H:%M:%S')}] {stage} done in {timings[stage]:.0f}s", flush=True)
    summary = {
        "profile": profile,
        "run_dir": str(run_path),
        "seconds": timings,
        "total_seconds": sum(timings.values()),
        "machine": f"{platform.machine()} {platform.processor()} {platform.platform()}",
        "metrics": {stage: stage_metrics(run_path, stage) for stage in stages},
    }
    write_json(run_path / "pipeline.json", summary)
    with atomic_write(run_path / "report.md") as handle:
        handle.write(render_report(summary))
    return run_path


def render_report(summary: dict[str, Any]) -> str:
    """A short markdown report: wall time and headline metrics of each stage."""
    lines = [
        f"# Run report — profile `{summary['profile']}`",
        "",
        f"Run folder: `{summary['run_dir']}`  ",
        f"Machine: {summary['machine']}  ",
        f"Total wall time: {summary['total_seconds']:.0f} s",
        "",
        "| stage | wall time (s) | recorded metrics |",
        "| --- | ---: | --- |",
    ]
    for stage, seconds in summary["seconds"].items():
        metrics = summary["metrics"].get(stage, {})
        shown = ", ".join(f"{k}={_short(v)}" for k, v in metrics.items() if not isinstance(v, (dict, list)))
        lines.append(f"| {stage} | {seconds:.0f} | {shown} |")
    reproduction = os.path.relpath(PROJECT_ROOT / "docs" / "reproduction.md", summary["run_dir"])
    lines += [
        "",
        "What the agreement figures mean (accuracy, kappa, qwk against the benchmark's grades): the bundled models "
        "are far too small to be good teachers; they exercise the pipeline, and these figures show that it runs end "
        "to end, not how good the labels are. Label quality on real human judgments (TREC DL 2019 and 2020) is in "
        f"notebook 10 and [Reproducing the central claim on 97 TREC DL queries]({reproduction}"
        "#reproducing-the-central-claim-on-97-trec-dl-queries-2019--2020).",
        "",
        "Executed notebooks are in `notebooks/` of the run folder; each stage's artifacts in its own folder.",
    ]
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def record_metrics(run_path: str | Path, stage: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Write a stage's headline metrics (what the tests and the run report read) and return them."""
    write_json(Path(run_path) / stage / METRICS_FILE, metrics)
    return metrics
