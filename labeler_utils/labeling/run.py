"""Label a large pair file with a student, in resumable chunks with atomic commits: :func:`label_pairs`.

The input (JSONL, Parquet, or a TREC run with a topics file and a collection; plain or gzipped) is streamed: it is
never held in memory, and neither are the labels. Input units are cut into chunks; each chunk is labeled and
committed on its own, so a run killed at any moment resumes after its last committed chunk (see
:mod:`labeler_utils.labeling.job` for the folder's layout). The chunks are labeled by an engine picked by name from
:data:`ENGINE_RUNNERS`: this process (``local``) or a pool of Ray actors (``ray``,
:mod:`labeler_utils.labeling.ray_engine`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core.artifacts import InputError, write_json
from ..core.resources import cpu_seconds
from .inputs import check_first_units, file_fingerprint, open_pairs
from .job import (
    ChunkJob,
    Engine,
    LabelSettings,
    chunk_meta,
    clear_output,
    exclusive,
    label_chunk,
    load_labeler_for_run,
    model_fingerprint,
    remove_work_files,
    start_or_resume,
)
from .outputs import OUTPUT_FILES, SUMMARY, committed_chunks, summarize_run, write_outputs
from .ray_engine import label_chunks_ray, require_ray


def label_chunks_local(job: ChunkJob, engine: Engine, progress: bool) -> None:
    """The local engine: this process loads the student and labels and commits the chunks one after another
    (``engine`` has nothing to set for it)."""
    with job.timed("model_load"):
        labeler = load_labeler_for_run(job.model, job.settings.max_length, job.settings.precision)
    with job.prepared(labeler, progress) as reader:
        indices = job.chunk_range(progress)
        with job.progress_bar(indices, progress) as bar:
            for index, chunk in job.chunks(reader, indices):
                start, cpu_start = time.perf_counter(), cpu_seconds()
                records, truncated = label_chunk(labeler, chunk, job.settings.batch_size, job.labeler_name, bar.update)
                meta = chunk_meta(
                    index, chunk, records, truncated, time.perf_counter() - start, cpu_seconds() - cpu_start
                )
                job.commit(meta, records)
                bar.update(len(chunk) - len(records))


@dataclass(frozen=True)
class EngineRunner:
    """How one engine runs: a check before any work (its library is there), and the labeling of the chunks."""

    check: Callable[[], None]
    label_chunks: Callable[[ChunkJob, Engine, bool], None]


def _nothing_to_check() -> None:
    """The local engine needs nothing beyond the package."""


#: Engine name -> how it runs; the names are :data:`labeler_utils.labeling.job.ENGINES`.
ENGINE_RUNNERS: dict[str, EngineRunner] = {
    "local": EngineRunner(_nothing_to_check, label_chunks_local),
    "ray": EngineRunner(require_ray, label_chunks_ray),
}


def label_pairs(
    model: str | Path,
    input_path: str | Path,
    output_dir: str | Path,
    *,
    collection: str | Path | None = None,
    topics: str | Path | None = None,
    input_format: str | None = None,
    settings: LabelSettings = LabelSettings(),
    formats: tuple[str, ...] = tuple(OUTPUT_FILES),
    restart: bool = False,
    max_chunks: int | None = None,
    progress: bool = True,
    engine: Engine = Engine(),
) -> dict[str, Any]:
    """Label every pair of ``input_path`` into ``output_dir``, resuming a run stopped earlier.

    ``max_chunks`` stops after that many newly committed chunks (the run resumes later).
    ``engine`` says how the chunks are labeled (this process, or a pool of Ray actors); it is not
    part of the run's identity, so a run may resume with another engine or worker count. Returns
    the summary (``complete`` False when stopped early); the complete summary is also written
    to ``summary.json``. Raises ``InputError`` for bad input (unless ``settings.skip_bad_lines``;
    an input without a single good unit always), before the student loads where the first lines
    show it, and ``ResumeRefused`` for a folder holding another run. A run that stops on an error
    (bad input, a full disk) before its first chunk is committed leaves nothing in ``output_dir``.
    """
    unknown = set(formats) - set(OUTPUT_FILES)
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {list(OUTPUT_FILES)}, got {list(formats)}")
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"max_chunks: must be at least 1, got {max_chunks}")
    runner = ENGINE_RUNNERS[engine.name]
    runner.check()
    out_dir = Path(output_dir)
    source = open_pairs(input_path, input_format)
    collection_path, topics_path = (Path(p) if p is not None else None for p in (collection, topics))
    if source.kind == "trec" and (collection_path is None or topics_path is None):
        raise ValueError("a TREC run needs --topics (qid<TAB>query) and --collection (TSV or JSONL) for the texts")
    for path in (collection_path, topics_path):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
    check_first_units(
        source, settings.skip_bad_lines, "qrels" in formats, collection_path is not None, topics_path is not None
    )
    with exclusive(out_dir):
        fingerprints = {
            "input": file_fingerprint(source.path),
            "collection": file_fingerprint(collection_path) if collection_path else None,
            "topics": file_fingerprint(topics_path) if topics_path else None,
        }
        identity = {"format": source.kind, **fingerprints, **model_fingerprint(model), "settings": asdict(settings)}
        manifest = start_or_resume(out_dir, identity, restart)
        manifest["input_path"] = str(source.path.resolve())
        job = ChunkJob(out_dir, manifest, source, model, collection_path, topics_path, settings, formats, max_chunks)
        about = {"engine": asdict(engine), "call_seconds": job.timings}  # how this call went, beside the totals
        if not manifest["complete"]:
            try:
                runner.label_chunks(job, engine, progress)
            except (InputError, OSError):
                if committed_chunks(out_dir) == 0:  # stopped before any label: nothing worth keeping
                    clear_output(out_dir)
                raise
            if not manifest["complete"]:
                return {**summarize_run(out_dir, manifest), **about}
        remove_work_files(out_dir)  # the texts, pair index and shards are needed no more
        summary = {**summarize_run(out_dir, manifest), **about}
        write_outputs(out_dir, formats, source)
        summary["outputs"] = {fmt: str(out_dir / OUTPUT_FILES[fmt]) for fmt in formats}
        write_json(out_dir / SUMMARY, summary)
        return summary
