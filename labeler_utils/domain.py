"""Adapt the pipeline to your documents: one YAML file drives a whole run.

A pipeline config names notebook parameters at its top level (``corpus_dir``, ``benchmark_path``,
``type_weights``, ``personas``, ``llm_base_url``, ``student_model``, ...) plus four settings of
the run itself (``profile``, ``run_id``, ``stages``, ``notebooks``)::

    profile: smoke
    corpus_dir: ../data/second_domain_corpus        # relative paths: from the config file's folder
    benchmark_path: ../data/second_domain_benchmark.jsonl
    student_model: smollm2-135m-instruct
    notebooks:                                        # parameters for one notebook only
      05_distill: {max_steps: 8}

Each top-level parameter goes to every notebook whose ``parameters`` cell declares it, and only
to those; a key that no notebook declares is an error (a typo would otherwise be ignored).
"""

from __future__ import annotations

import ast
import difflib
import json
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from .core.config import PROFILES, STAGES, new_run_id
from .pipeline import NOTEBOOKS_DIR

RUN_SETTINGS = ("profile", "run_id", "stages", "notebooks")
# Set by the pipeline itself for every notebook, never by a config file.
PIPELINE_PARAMETERS = ("run_dir", "profile")
PATH_PARAMETER = re.compile(r"_(dir|path)$")
URI = re.compile(r"^[A-Za-z][\w+.-]*:(?![\\/])")  # "ir_datasets:...", "https://..."; not "C:\"


class ConfigError(ValueError):
    """A pipeline config file that cannot be used, with the file (and key) at fault."""


@cache
def _declared(notebook: Path, modified_ns: int) -> tuple[str, ...]:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]  # nbformat 4 JSON; nbformat itself imports slowly
    cell = next((c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        return ()
    source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    names = []
    for node in ast.parse(source).body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return tuple(names)


def declared_parameters(stage: str, notebooks_dir: Path = NOTEBOOKS_DIR) -> tuple[str, ...]:
    """Names assigned in a notebook's ``parameters`` cell (empty when the notebook does not exist).

    Read with ``ast``, which sees every assignment: ``papermill.inspect_notebook`` skips any line
    with a second ``=`` sign (in a comment, say).
    """
    notebook = notebooks_dir / f"{stage}.ipynb"
    return _declared(notebook, notebook.stat().st_mtime_ns) if notebook.exists() else ()


def route_parameters(
    parameters: Mapping[str, Any],
    stages: Sequence[str],
    per_notebook: Mapping[str, Mapping[str, Any]] | None = None,
    notebooks_dir: Path = NOTEBOOKS_DIR,
) -> dict[str, dict[str, Any]]:
    """Parameters for each stage: each of ``parameters`` where the notebook declares it, then its own.

    Raises ``ConfigError`` for a parameter no pipeline notebook declares, or a per-notebook
    parameter its notebook does not declare. While some pipeline notebooks do not exist, a
    parameter no existing notebook declares cannot be checked: it is dropped with a warning.
    """
    declared = {stage: declared_parameters(stage, notebooks_dir) for stage in {*STAGES, *stages}}
    known = {name for names in declared.values() for name in names} - set(PIPELINE_PARAMETERS)
    missing = missing_notebooks(notebooks_dir)
    for name in parameters:
        if name not in known and not missing:
            raise ConfigError(_unknown(name, known, "a parameter of any notebook"))
        if name not in known:
            warnings.warn(
                f"{_unknown(name, known, 'a parameter of the existing notebooks')}; notebooks "
                f"{', '.join(missing)} do not exist yet, so it is passed to none",
                stacklevel=2,
            )
    routed = {stage: {k: v for k, v in parameters.items() if k in declared[stage]} for stage in stages}
    for stage, own in (per_notebook or {}).items():
        if stage not in declared or not declared[stage]:
            raise ConfigError(_unknown(stage, {s for s in declared if declared[s]}, "a notebook of the pipeline"))
        for name in own:
            if name not in declared[stage] or name in PIPELINE_PARAMETERS:
                raise ConfigError(
                    _unknown(name, set(declared[stage]) - set(PIPELINE_PARAMETERS), f"a parameter of notebook {stage}")
                )
        if stage in routed:
            routed[stage].update(own)
    return routed


def missing_notebooks(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[str]:
    return [stage for stage in STAGES if not (notebooks_dir / f"{stage}.ipynb").exists()]


def _unknown(name: str, choices: Iterable[str], what: str) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(choices))})"
    return f"{name!r} is not {what}{hint}"


@dataclass
class PipelineConfig:
    """A parsed pipeline config: run settings, parameters for every notebook, per-notebook parameters."""

    path: Path
    profile: str = "smoke"
    run_id: str | None = None
    stages: tuple[str, ...] = STAGES
    parameters: dict[str, Any] = field(default_factory=dict)
    notebooks: dict[str, dict[str, Any]] = field(default_factory=dict)
    notebooks_dir: Path = NOTEBOOKS_DIR

    def stage_parameters(self, stages: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """What each stage notebook receives (besides ``run_dir`` and ``profile``)."""
        return route_parameters(self.parameters, stages or self.stages, self.notebooks, self.notebooks_dir)

    def new_run_id(self) -> str:
        """The configured run id, or ``<config name>-<timestamp>``."""
        return self.run_id or new_run_id(self.path.stem)


def _where(path: Path, key: str) -> str:
    return f"{path}: {key}"


def _resolve_paths(values: dict[str, Any], base: Path) -> dict[str, Any]:
    """``*_dir`` / ``*_path`` values relative to ``base`` (URIs such as ``ir_datasets:...`` unchanged)."""
    return {
        key: str((base / value).resolve())
        if PATH_PARAMETER.search(key)
        and isinstance(value, str)
        and not URI.match(value)
        and not Path(value).is_absolute()
        else value
        for key, value in values.items()
    }


def load_pipeline_config(
    path: str | Path, extra_parameters: Mapping[str, Any] | None = None, notebooks_dir: Path = NOTEBOOKS_DIR
) -> PipelineConfig:
    """Read and check a pipeline config; ``extra_parameters`` (e.g. from the command line) win over the file's.

    Errors (``ConfigError``) name the file and the key: YAML syntax, unknown keys (with the
    closest known name), an unknown profile or stage, a corpus folder that does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values, got {type(raw).__name__}")
    parameters = {k: v for k, v in {**raw, **(extra_parameters or {})}.items() if k not in RUN_SETTINGS}
    for name in PIPELINE_PARAMETERS:
        if name in parameters:
            raise ConfigError(_where(path, f"{name!r} is set by the pipeline (use run_id for the run folder name)"))
    profile = raw.get("profile", "smoke")
    if profile not in PROFILES:
        raise ConfigError(_where(path, f"profile {profile!r} is not one of {sorted(PROFILES)}"))
    stages = raw.get("stages", list(STAGES))
    if not isinstance(stages, list) or any(stage not in STAGES for stage in stages):
        raise ConfigError(_where(path, f"stages must be a list of {list(STAGES)}, got {stages!r}"))
    notebooks = raw.get("notebooks") or {}
    if not isinstance(notebooks, dict) or not all(isinstance(v, dict) for v in notebooks.values()):
        raise ConfigError(_where(path, "notebooks must map a notebook name (e.g. 05_distill) to its parameters"))
    base = path.resolve().parent
    config = PipelineConfig(
        path=path,
        profile=profile,
        run_id=raw.get("run_id"),
        stages=tuple(stages),
        parameters=_resolve_paths(parameters, base),
        notebooks={stage: _resolve_paths(dict(values), base) for stage, values in notebooks.items()},
        notebooks_dir=notebooks_dir,
    )
    corpus_dir = config.parameters.get("corpus_dir")
    if corpus_dir is not None and not Path(corpus_dir).is_dir():
        raise ConfigError(
            _where(
                path,
                f"corpus_dir {corpus_dir} is not a folder "
                f"(relative paths are read from the config file's folder {base})",
            )
        )
    try:
        config.stage_parameters()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config
