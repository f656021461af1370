"""Label a large pair file with a student, in resumable chunks with atomic commits.

The input (JSONL, Parquet, or a TREC run with a topics file and a collection) is streamed: it is
never held in memory, and neither are the labels. Input units (non-blank lines, or Parquet rows)
are cut into chunks of ``chunk_size``; each chunk is labeled and committed on its own. The output
folder holds::

    manifest.json                  what the run is (input fingerprints, model, settings) and its progress
    work.sqlite                    collection and topic texts, and the first line of each pair, on disk
    chunks/chunk-000123.meta.json  counts and skipped lines of chunk 123, written first
    chunks/chunk-000123.jsonl      labels of chunk 123; its atomic rename is the chunk's commit
    labels.jsonl, labels.parquet, labels.qrels, skipped.jsonl, summary.json   merged at the end

Killed at any moment and started again with the same arguments, a run resumes after its last
committed chunk: no pair is labeled twice, lost or duplicated. Different arguments on a folder
with committed chunks are refused (``restart=True`` discards them). Reading and validating the
input is :mod:`labeler_utils.label_inputs`; this module is the run engine around it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import math
import os
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .artifacts import InputError, atomic_write, read_json, write_json
from .benchmarks import GRADES
from .families import load_labeler
from .label_inputs import (
    BadLine,
    DuplicatePair,
    PairRecord,
    PairSource,
    Unit,
    UnitReader,
    WorkStore,
    bad_input,
    check_input,
    check_qrels_ids,
    file_fingerprint,
    open_pairs,
)
from .labeler import resolve_dtype
from .throughput.machine import cpu_seconds, peak_rss_mb

MANIFEST = "manifest.json"
WORK_DB = "work.sqlite"
CHUNKS = "chunks"
SUMMARY = "summary.json"
SKIPPED = "skipped.jsonl"
LOCK = ".lock"
OUTPUT_FILES = {"jsonl": "labels.jsonl", "parquet": "labels.parquet", "qrels": "labels.qrels"}
MANIFEST_VERSION = 1


class ResumeRefused(RuntimeError):
    """The output folder holds committed chunks of a run with different arguments."""


@dataclass(frozen=True)
class LabelSettings:
    """Settings that decide the labels; a resumed run must use the same ones."""

    batch_size: int = 16
    chunk_size: int = 1000
    max_length: int = 512
    skip_bad_lines: bool = False
    precision: str = "auto"  # "auto" (bfloat16 on CUDA, float32 on CPU), "float32" or "bfloat16"

    def __post_init__(self) -> None:
        for name in ("batch_size", "chunk_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        resolve_dtype(self.precision)


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


def model_fingerprint(model: str | Path) -> dict[str, str]:
    """A model's identity: a local folder or file by its files' names, sizes and times; a name as itself."""
    path = Path(str(model)).expanduser()
    if not path.exists():
        return {"model": str(model), "model_fingerprint": str(model)}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        stat = file.stat()
        digest.update(
            f"{file.relative_to(path) if path.is_dir() else file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode()
        )
    return {"model": str(path.resolve()), "model_fingerprint": digest.hexdigest()}


# --------------------------------------------------------------------------------------------
# The output folder: manifest, lock, chunks
# --------------------------------------------------------------------------------------------


def chunk_path(out_dir: Path, index: int, suffix: str = ".jsonl") -> Path:
    return out_dir / CHUNKS / f"chunk-{index:06d}{suffix}"


def committed_chunks(out_dir: Path) -> int:
    """How many chunks are committed: consecutive ``chunk-*.jsonl`` files (with their meta) from 0."""
    count = 0
    while chunk_path(out_dir, count).exists() and chunk_path(out_dir, count, ".meta.json").exists():
        count += 1
    return count


@contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """Hold the folder's lock (released by the OS even on ``kill -9``).

    A lock file (and a folder) this call created is removed again when the folder holds no run
    at the end: a refused foreign folder or a refused input leaves nothing behind.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(out_dir))
    new_folder = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / LOCK
    new_lock = not lock.exists()
    try:
        with lock.open("w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ResumeRefused(f"{out_dir}: another labeling process is writing to this folder") from None
            yield
    finally:
        if new_lock and not (out_dir / MANIFEST).exists():
            lock.unlink(missing_ok=True)
            if new_folder and not any(out_dir.iterdir()):
                out_dir.rmdir()


def clear_output(out_dir: Path) -> None:
    """Remove everything a labeling run wrote into ``out_dir`` (not the lock, not foreign files)."""
    shutil.rmtree(out_dir / CHUNKS, ignore_errors=True)
    for name in (MANIFEST, SUMMARY, SKIPPED, *OUTPUT_FILES.values(), WORK_DB, f"{WORK_DB}-wal", f"{WORK_DB}-shm"):
        (out_dir / name).unlink(missing_ok=True)


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changes = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changes += _differences(before, after, f"{prefix}{key}.")
        elif before != after:
            changes.append(f"{prefix}{key}: {before!r} -> {after!r}")
    return changes


def start_or_resume(out_dir: Path, identity: dict[str, Any], restart: bool) -> dict[str, Any]:
    """The folder's manifest for this run: resumed when the identity matches, else fresh.

    A folder with committed chunks of a different run is refused unless ``restart``; a folder with
    files that no labeling run wrote is refused always.
    """
    manifest_path = out_dir / MANIFEST
    if not manifest_path.exists() and any(p.name != LOCK for p in out_dir.iterdir()):
        raise ResumeRefused(f"{out_dir} is not empty and holds no {MANIFEST}: choose an empty or new --output folder")
    if manifest_path.exists() and not restart:
        manifest = read_json(manifest_path)
        if manifest.get("identity") == identity:
            return manifest
        done = committed_chunks(out_dir)
        if done:
            changes = "; ".join(_differences(manifest.get("identity", {}), identity))
            raise ResumeRefused(
                f"{out_dir} holds {done} committed chunk(s) of a run with different arguments ({changes}). "
                "Start again with the same arguments to resume, pass --restart to discard them, "
                "or choose another --output folder."
            )
    clear_output(out_dir)
    manifest = {
        "version": MANIFEST_VERSION,
        "identity": identity,
        "total_units": None,
        "chunks_done": 0,
        "complete": False,
    }
    write_json(manifest_path, manifest)
    return manifest


# --------------------------------------------------------------------------------------------
# Labeling
# --------------------------------------------------------------------------------------------


def load_student(model: str | Path, max_length: int, precision: str = "auto") -> Any:
    """A trained student of any registered family (see :mod:`labeler_utils.families`) in the given precision."""
    return load_labeler(model, max_length=max_length, dtype=resolve_dtype(precision))


def label_record(pair: PairRecord, label: Any, labeler_name: str) -> dict[str, Any]:
    """A label line; the fields :func:`labeler_utils.benchmarks.read_predictions` reads, plus the input line."""
    return {
        "query_id": pair.query_id,
        "doc_id": pair.doc_id,
        "grade": label.grade,
        "expected_relevance": label.expected_relevance,
        "distribution": label.distribution,
        "labeler": labeler_name,
        "line": pair.line,
    }


@dataclass
class ChunkMeta:
    """What one committed chunk holds: counts, time, memory and its skipped lines."""

    index: int
    units: int
    labels: int
    truncated: int
    duplicates: int
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    skipped: list[dict[str, Any]] = field(default_factory=list)


def commit_chunk(out_dir: Path, meta: ChunkMeta, records: list[dict[str, Any]]) -> None:
    """Meta first, then the labels file: the labels file's atomic rename is the commit."""
    write_json(chunk_path(out_dir, meta.index, ".meta.json"), asdict(meta))
    with atomic_write(chunk_path(out_dir, meta.index)) as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def label_chunk(
    labeler: Any, units: list[Unit], batch_size: int, labeler_name: str, on_label: Any
) -> tuple[list[dict[str, Any]], int]:
    """Label the chunk's pairs in input order; returns (label records, documents truncated)."""
    pairs = [unit for unit in units if isinstance(unit, PairRecord)]
    truncated_before = labeler.truncated
    labels = labeler.label(
        ((p.query, p.document) for p in pairs),
        batch_size=batch_size,
        bucket_size=min(len(pairs), 512) or 1,
        progress=False,
    )
    records = []
    for pair, label in zip(pairs, labels, strict=True):
        records.append(label_record(pair, label, labeler_name))
        on_label()
    return records, labeler.truncated - truncated_before


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
) -> dict[str, Any]:
    """Label every pair of ``input_path`` into ``output_dir``, resuming a run stopped earlier.

    ``max_chunks`` stops after that many newly committed chunks (the run resumes later). Returns
    the summary (``complete`` False when stopped early); the complete summary is also written
    to ``summary.json``. Raises ``InputError`` for bad input (unless ``settings.skip_bad_lines``)
    and ``ResumeRefused`` for a folder holding another run.
    """
    unknown = set(formats) - set(OUTPUT_FILES)
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {list(OUTPUT_FILES)}, got {list(formats)}")
    out_dir = Path(output_dir)
    source = open_pairs(input_path, input_format)
    collection_path, topics_path = (Path(p) if p is not None else None for p in (collection, topics))
    if source.kind == "trec" and (collection_path is None or topics_path is None):
        raise ValueError("a TREC run needs --topics (qid<TAB>query) and --collection (TSV or JSONL) for the texts")
    for path in (collection_path, topics_path):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
    with exclusive(out_dir):
        fingerprints = {
            "input": file_fingerprint(source.path),
            "collection": file_fingerprint(collection_path) if collection_path else None,
            "topics": file_fingerprint(topics_path) if topics_path else None,
        }
        identity = {"format": source.kind, **fingerprints, **model_fingerprint(model), "settings": asdict(settings)}
        manifest = start_or_resume(out_dir, identity, restart)
        manifest["input_path"] = str(source.path.resolve())
        if not manifest["complete"]:
            try:
                manifest = _label_chunks(
                    out_dir,
                    manifest,
                    source,
                    model,
                    collection_path,
                    topics_path,
                    settings,
                    "qrels" in formats,
                    max_chunks,
                    progress,
                )
            except InputError:
                if manifest["total_units"] is None:  # refused before any labeling: nothing worth keeping
                    clear_output(out_dir)
                raise
            if not manifest["complete"]:
                return summarize(out_dir, manifest)
        for suffix in ("", "-wal", "-shm"):  # the texts and pair index are needed no more
            (out_dir / f"{WORK_DB}{suffix}").unlink(missing_ok=True)
        summary = summarize(out_dir, manifest)
        write_outputs(out_dir, formats, source)
        summary["outputs"] = {fmt: str(out_dir / OUTPUT_FILES[fmt]) for fmt in formats}
        write_json(out_dir / SUMMARY, summary)
        return summary


def _label_chunks(
    out_dir: Path,
    manifest: dict[str, Any],
    source: PairSource,
    model: str | Path,
    collection: Path | None,
    topics: Path | None,
    settings: LabelSettings,
    qrels: bool,
    max_chunks: int | None,
    progress: bool,
) -> dict[str, Any]:
    """Validate the input once (``qrels``: ids must fit qrels lines), then label and commit the chunks not committed yet."""
    for stale in [*out_dir.glob(".*.tmp"), *(out_dir / CHUNKS).glob(".*.tmp")]:  # writes cut short by a kill
        stale.unlink()
    labeler = load_student(model, settings.max_length, settings.precision)
    labeler_name = manifest["identity"]["model"]
    store = WorkStore(out_dir / WORK_DB)
    try:
        store.load("documents", collection, manifest["identity"]["collection"], progress)
        store.load("queries", topics, manifest["identity"]["topics"], progress)
        reader = UnitReader(source, store, labeler.tokenizer, labeler.max_length, qrels)
        if manifest["total_units"] is None:
            manifest["total_units"] = check_input(reader, settings.skip_bad_lines, progress)
            manifest["labeler_max_length"] = labeler.max_length
            write_json(out_dir / MANIFEST, manifest)
        done = committed_chunks(out_dir)
        if done and progress:
            print(f"resuming {out_dir}: {done} chunk(s) already committed", flush=True)
        total_chunks = -(-manifest["total_units"] // settings.chunk_size)
        units = reader.units(skip=done * settings.chunk_size)
        with tqdm(
            total=manifest["total_units"],
            initial=min(done * settings.chunk_size, manifest["total_units"]),
            desc="labeling",
            unit="pair",
            disable=not progress,
            smoothing=0.1,
        ) as bar:
            for index in range(done, min(total_chunks, done + max_chunks) if max_chunks is not None else total_chunks):
                start, cpu_start = time.perf_counter(), cpu_seconds()
                chunk = list(itertools.islice(units, settings.chunk_size))
                bad = [unit for unit in chunk if isinstance(unit, BadLine)]
                if bad and not settings.skip_bad_lines:  # only when the file was changed during the run
                    raise bad_input(source, bad[0])
                records, truncated = label_chunk(labeler, chunk, settings.batch_size, labeler_name, bar.update)
                store.commit()
                meta = ChunkMeta(
                    index=index,
                    units=len(chunk),
                    labels=len(records),
                    truncated=truncated,
                    duplicates=sum(isinstance(u, DuplicatePair) for u in chunk),
                    seconds=time.perf_counter() - start,
                    cpu_seconds=cpu_seconds() - cpu_start,
                    peak_rss_mb=peak_rss_mb(),
                    skipped=[{"line": u.line, "reason": u.reason} for u in bad],
                )
                commit_chunk(out_dir, meta, records)
                bar.update(len(chunk) - len(records))
                done = index + 1
                manifest.update(chunks_done=done, complete=done == total_chunks)
                write_json(out_dir / MANIFEST, manifest)
        manifest.update(chunks_done=done, complete=done == total_chunks)
    except sqlite3.OperationalError as exc:  # "database or disk is full", "disk I/O error": name the file
        raise OSError(None, str(exc), str(out_dir / WORK_DB)) from exc
    finally:
        store.close()
    return manifest


def chunk_metas(out_dir: Path, count: int) -> Iterator[dict[str, Any]]:
    for index in range(count):
        yield read_json(chunk_path(out_dir, index, ".meta.json"))


def plot_chunks(metas: Iterable[dict[str, Any]]) -> Figure:
    """Labels per second and peak resident memory of each committed chunk (the :func:`chunk_metas`).

    A flat memory line is what streaming buys: the thousandth chunk needs no more than the first.
    """
    metas = list(metas)
    chunks = [meta["index"] for meta in metas]
    memory = [meta["peak_rss_mb"] for meta in metas]
    fig = Figure(figsize=(11, 3.2))
    speed_ax, memory_ax = fig.subplots(1, 2)
    speed_ax.plot(chunks, [m["labels"] / m["seconds"] if m["seconds"] else math.nan for m in metas], marker=".")
    speed_ax.set(title="labels per second", xlabel="chunk")
    memory_ax.plot(chunks, memory, marker=".")
    memory_ax.set(title="peak RSS (MB)", xlabel="chunk", ylim=(0, max(memory, default=1.0) * 1.2))
    fig.tight_layout()
    return fig


def plot_label_mix(labels: pd.DataFrame) -> Figure:
    """Bars of the grades given and a histogram of the expected relevance (``labels.parquet``'s columns)."""
    fig = Figure(figsize=(11, 3.2))
    grades_ax, expected_ax = fig.subplots(1, 2)
    counts = labels["grade"].value_counts().reindex(GRADES, fill_value=0)
    grades_ax.bar(GRADES, counts.to_numpy(), color="tab:blue")
    grades_ax.set(title="grades", xticks=list(GRADES), xlabel="grade", ylabel="pairs")
    expected_ax.hist(labels["expected_relevance"], bins=30, range=(0, 3), color="tab:gray")
    expected_ax.set(title="expected relevance", xlabel="sum(g * p_g)", ylabel="pairs")
    fig.tight_layout()
    return fig


def summarize(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Totals over the committed chunks: pairs, skips, truncation, labels per second, peak memory."""
    totals: Counter[str] = Counter()
    peak = 0.0
    for meta in chunk_metas(out_dir, manifest["chunks_done"]):
        totals.update({k: meta[k] for k in ("units", "labels", "truncated", "duplicates", "seconds", "cpu_seconds")})
        totals["skipped"] += len(meta["skipped"])
        peak = max(peak, meta["peak_rss_mb"])
    identity = manifest["identity"]
    return {
        "complete": manifest["complete"],
        "input": manifest.get("input_path"),
        "format": identity["format"],
        "model": identity["model"],
        **identity["settings"],
        "labeler_max_length": manifest.get("labeler_max_length"),
        "input_units": manifest["total_units"],
        "units_done": totals["units"],
        "chunks_done": manifest["chunks_done"],
        "pairs_labeled": totals["labels"],
        "skipped_lines": totals["skipped"],
        "duplicate_pairs": totals["duplicates"],
        "truncated_documents": totals["truncated"],
        "labeling_seconds": round(totals["seconds"], 3),
        "labels_per_second": round(totals["labels"] / totals["seconds"], 3) if totals["seconds"] else None,
        "labeling_cpu_seconds": round(totals["cpu_seconds"], 3),
        "labels_per_cpu_second": round(totals["labels"] / totals["cpu_seconds"], 3) if totals["cpu_seconds"] else None,
        "peak_rss_mb": round(peak, 1),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------


def iter_labels(out_dir: Path) -> Iterator[dict[str, Any]]:
    """Every committed label, in input order, streamed from the chunk files."""
    for index in range(committed_chunks(out_dir)):
        with chunk_path(out_dir, index).open(encoding="utf-8") as handle:
            yield from (json.loads(line) for line in handle)


def write_outputs(out_dir: Path, formats: tuple[str, ...], source: PairSource) -> None:
    """Merge the chunks into the requested label files and ``skipped.jsonl``, each atomically, streaming.

    Ids are checked for qrels before labeling; a run labeled without qrels and merged with them
    now can still hold an id with whitespace: an error naming its input line.
    """
    count = committed_chunks(out_dir)
    with atomic_write(out_dir / SKIPPED) as handle:
        for meta in chunk_metas(out_dir, count):
            handle.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in meta["skipped"])
    if "jsonl" in formats:
        with atomic_write(out_dir / OUTPUT_FILES["jsonl"], "wb") as handle:
            for index in range(count):
                with chunk_path(out_dir, index).open("rb") as chunk:
                    shutil.copyfileobj(chunk, handle)
    if "parquet" in formats:
        _write_parquet(out_dir, count)
    if "qrels" in formats:
        with atomic_write(out_dir / OUTPUT_FILES["qrels"]) as handle:
            for record in iter_labels(out_dir):
                try:
                    check_qrels_ids(record["query_id"], record["doc_id"])
                except ValueError as exc:
                    raise InputError(f"{source.where(record['line'])}: {exc}") from None
                handle.write(f"{record['query_id']} 0 {record['doc_id']} {record['grade']}\n")


def _write_parquet(out_dir: Path, count: int) -> None:
    """``labels.parquet``: one row group per chunk, columns ids, line, grade, expected relevance, p0..p3."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("query_id", pa.string()),
            ("doc_id", pa.string()),
            ("line", pa.int64()),
            ("grade", pa.int8()),
            ("expected_relevance", pa.float64()),
            *((f"p{g}", pa.float64()) for g in GRADES),
        ]
    )
    with atomic_write(out_dir / OUTPUT_FILES["parquet"], "wb") as handle, pq.ParquetWriter(handle, schema) as writer:
        for index in range(count):
            with chunk_path(out_dir, index).open(encoding="utf-8") as chunk:
                records = [json.loads(line) for line in chunk]
            columns = {
                name: [r[name] for r in records]
                for name in ("query_id", "doc_id", "line", "grade", "expected_relevance")
            }
            for g in GRADES:
                columns[f"p{g}"] = [r["distribution"][g] for r in records]
            writer.write_table(pa.table(columns, schema=schema))
