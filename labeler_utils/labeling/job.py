"""A labeling run's shared machinery: its identity and resume, the chunk job, labeling and committing a chunk.

The input (JSONL, Parquet, or a TREC run with a topics file and a collection) is streamed: it is
never held in memory, and neither are the labels. Input units (non-blank lines, or Parquet rows)
are cut into chunks of ``chunk_size``; each chunk is labeled and committed on its own. The output
folder holds::

    manifest.json                  what the run is (input fingerprints, model, settings) and its progress
    work.sqlite                    collection and topic texts, and the first line of each pair, on disk
    chunks/chunk-000123.meta.json  counts and skipped lines of chunk 123, written first
    chunks/chunk-000123.jsonl      labels of chunk 123; its atomic rename is the chunk's commit
    shards/shard-000123.jsonl      the ray engine's input of chunk 123, until it is committed
    labels.jsonl, labels.parquet, labels.qrels, skipped.jsonl, summary.json   merged at the end

Killed at any moment and started again with the same arguments, a run resumes after its last
committed chunk: no pair is labeled twice, lost or duplicated. Different arguments on a folder
with committed chunks are refused (``restart=True`` discards them); the engine that labels the
chunks (this process, or a pool of Ray actors: :mod:`labeler_utils.labeling.ray_engine`) is not part of a
run's identity. Reading and validating the input is :mod:`labeler_utils.labeling.inputs`, the folder's
layout, summary and merge :mod:`labeler_utils.labeling.outputs`; this module is what every engine shares (the
run's identity and resume, :class:`ChunkJob`, the atomic commit), and :func:`labeler_utils.labeling.run.label_pairs`
the entry point that picks the engine.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..core.artifacts import atomic_write, read_json, write_json
from ..core.devices import resolve_dtype
from ..core.resources import peak_rss_mb
from ..students.registry import load_labeler
from .inputs import (
    BadLine,
    DuplicatePair,
    PairRecord,
    PairSource,
    Unit,
    UnitReader,
    WorkStore,
    bad_input,
    check_input,
)
from .outputs import (
    CHUNKS,
    LOCK,
    OUTPUT_FILES,
    RUN_MANIFEST,
    SHARDS,
    SKIPPED,
    SUMMARY,
    WORK_DB,
    chunk_path,
    committed_chunks,
)

MANIFEST_VERSION = 1
ENGINES = ("local", "ray")


class ResumeRefused(RuntimeError):
    """The output folder holds committed chunks of a run with different arguments."""


@dataclass(frozen=True)
class LabelSettings:
    """Settings that decide the labels; a resumed run must use the same ones."""

    batch_size: int = 16
    chunk_size: int = 1000
    max_length: int = 512
    skip_bad_lines: bool = False
    precision: str = "auto"  # "auto" (GPU: bfloat16 from Ampere on, else float16; CPU: float32), "float32", "bfloat16"

    def __post_init__(self) -> None:
        for name in ("batch_size", "chunk_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        resolve_dtype(self.precision)


@dataclass(frozen=True)
class Engine:
    """How the chunks are labeled; not part of a run's identity (a run may resume with another engine).

    ``"local"``: this process, with one student. ``"ray"``: a pool of ``workers`` Ray Data actors,
    each loading the student once (:mod:`labeler_utils.labeling.ray_engine`); ``address`` None starts a
    local Ray instance (or joins the cluster ``RAY_ADDRESS`` or ``ray start`` set up), ``"auto"``
    joins the running cluster, ``"ray://head:10001"`` a remote one. Each actor reserves
    ``cpus_per_worker`` CPUs (its torch threads) and ``gpus_per_worker`` GPUs (None: one each when
    the cluster has a GPU per actor, else its GPUs shared evenly, else none; 0.5 puts two actors on
    a GPU).
    """

    name: str = "local"
    workers: int = 1
    address: str | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float | None = None

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.name!r}")
        if self.workers < 1 or self.cpus_per_worker <= 0 or (self.gpus_per_worker or 0) < 0:
            raise ValueError("workers must be at least 1, cpus_per_worker above 0 and gpus_per_worker not negative")
        ray_options = (self.workers, self.address, self.cpus_per_worker, self.gpus_per_worker)
        if self.name == "local" and ray_options != (1, None, 1.0, None):
            raise ValueError("workers, address, cpus_per_worker and gpus_per_worker are options of the ray engine")


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
# The output folder: lock, manifest, resume
# --------------------------------------------------------------------------------------------


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
        if new_lock and not (out_dir / RUN_MANIFEST).exists():
            lock.unlink(missing_ok=True)
            if new_folder and not any(out_dir.iterdir()):
                out_dir.rmdir()


def remove_work_files(out_dir: Path) -> None:
    """Remove what only an unfinished run needs: the work store (texts, pair index) and the ray engine's shards."""
    shutil.rmtree(out_dir / SHARDS, ignore_errors=True)
    for suffix in ("", "-wal", "-shm"):
        (out_dir / f"{WORK_DB}{suffix}").unlink(missing_ok=True)


def clear_output(out_dir: Path) -> None:
    """Remove everything a labeling run wrote into ``out_dir`` (not the lock, not foreign files)."""
    shutil.rmtree(out_dir / CHUNKS, ignore_errors=True)
    remove_work_files(out_dir)
    for name in (RUN_MANIFEST, SUMMARY, SKIPPED, *OUTPUT_FILES.values()):
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
    manifest_path = out_dir / RUN_MANIFEST
    if not manifest_path.exists() and any(p.name != LOCK for p in out_dir.iterdir()):
        raise ResumeRefused(
            f"{out_dir} is not empty and holds no {RUN_MANIFEST}: choose an empty or new --output folder"
        )
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


def load_labeler_for_run(model: str | Path, max_length: int, precision: str = "auto") -> Any:
    """A trained student of any registered family (see :mod:`labeler_utils.students.registry`) in the given precision."""
    return load_labeler(model, max_length=max_length, dtype=resolve_dtype(precision))


def label_record(pair: PairRecord, label: Any, labeler_name: str) -> dict[str, Any]:
    """A label line; the fields :func:`labeler_utils.benchmarks.predictions.read_predictions` reads, plus the input line."""
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
    """What one committed chunk holds: counts, time, memory and its skipped lines.

    ``seconds``: the wall time the run spent labeling the chunk (the ray engine: what the chunk's
    interval adds to the time at least one actor was labeling, so that labels over seconds is the
    pool's rate; start-up is left out, as the local engine's model loading is); ``cpu_seconds``
    and ``peak_rss_mb``: of the process that labeled it.
    """

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


@dataclass
class ChunkJob:
    """One call's work on a run folder: what every engine shares around the labeling itself.

    An engine opens the input with :meth:`prepared` (the work store filled, the input checked
    once), takes the chunks still to label from :meth:`chunk_range`, reads them with
    :meth:`chunks` (the bad-line policy) and commits each with :meth:`commit`, in chunk order.
    """

    out_dir: Path
    manifest: dict[str, Any]
    source: PairSource
    model: str | Path
    collection: Path | None
    topics: Path | None
    settings: LabelSettings
    formats: tuple[str, ...]
    max_chunks: int | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds of this call's steps besides labeling

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[step]`` (the summary's ``call_seconds``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[step] = round(self.timings.get(step, 0.0) + time.perf_counter() - start, 3)

    @property
    def labeler_name(self) -> str:
        return self.manifest["identity"]["model"]

    @property
    def total_chunks(self) -> int:
        return -(-self.manifest["total_units"] // self.settings.chunk_size)

    @contextmanager
    def prepared(self, labeler: Any, progress: bool) -> Iterator[UnitReader]:
        """The unit reader over the input, its texts in the work store, the input checked on the first call.

        ``labeler`` gives the tokenizer and max length of the query-length check. SQLite errors
        ("database or disk is full"), from creating the work file on, are raised as ``OSError``
        naming it.
        """
        for stale in [*self.out_dir.glob(".*.tmp"), *self.out_dir.glob("*/.*.tmp")]:  # writes cut short by a kill
            stale.unlink()
        try:
            with closing(WorkStore(self.out_dir / WORK_DB)) as store:
                store.load("documents", self.collection, self.manifest["identity"]["collection"], progress)
                store.load("queries", self.topics, self.manifest["identity"]["topics"], progress)
                reader = UnitReader(self.source, store, labeler.tokenizer, labeler.max_length, "qrels" in self.formats)
                if self.manifest["total_units"] is None:
                    with self.timed("input_check"):
                        self.manifest["total_units"] = check_input(reader, self.settings.skip_bad_lines, progress)
                    self.manifest["labeler_max_length"] = labeler.max_length
                    write_json(self.out_dir / RUN_MANIFEST, self.manifest)
                yield reader
        except sqlite3.OperationalError as exc:
            raise OSError(None, str(exc), str(self.out_dir / WORK_DB)) from exc

    def chunk_range(self, progress: bool) -> range:
        """The indices of the chunks this call labels: from the first uncommitted one, at most ``max_chunks``."""
        done = committed_chunks(self.out_dir)
        if done and progress:
            print(f"resuming {self.out_dir}: {done} chunk(s) already committed", flush=True)
        end = self.total_chunks if self.max_chunks is None else min(self.total_chunks, done + self.max_chunks)
        self.manifest.update(chunks_done=done, complete=done == self.total_chunks)
        return range(done, end)

    def chunks(self, reader: UnitReader, indices: range) -> Iterator[tuple[int, list[Unit]]]:
        """``(index, units)`` of each chunk in ``indices``, read in order; a bad line stops the run unless skipped."""
        units = reader.units(skip=indices.start * self.settings.chunk_size)
        for index in indices:
            chunk = list(itertools.islice(units, self.settings.chunk_size))
            bad = next((unit for unit in chunk if isinstance(unit, BadLine)), None)
            if bad and not self.settings.skip_bad_lines:  # only when the file was changed during the run
                raise bad_input(self.source, bad)
            reader.store.commit()
            yield index, chunk

    def progress_bar(self, indices: range, progress: bool) -> Any:
        """The driver's bar over the input units, starting after the chunks committed before."""
        total = self.manifest["total_units"]
        return tqdm(
            total=total,
            initial=min(indices.start * self.settings.chunk_size, total),
            desc="labeling",
            unit="pair",
            disable=not progress,
            smoothing=0.1,
        )

    def commit(self, meta: ChunkMeta, records: list[dict[str, Any]]) -> None:
        """Commit a chunk (the next one in order) and record the progress in the manifest."""
        commit_chunk(self.out_dir, meta, records)
        done = meta.index + 1
        self.manifest.update(chunks_done=done, complete=done == self.total_chunks)
        write_json(self.out_dir / RUN_MANIFEST, self.manifest)


def chunk_meta(
    index: int, units: list[Unit], records: list[dict[str, Any]], truncated: int, seconds: float, cpu: float
) -> ChunkMeta:
    """The meta of a labeled chunk: its counts and skipped lines, the time given, this process's peak memory."""
    return ChunkMeta(
        index=index,
        units=len(units),
        labels=len(records),
        truncated=truncated,
        duplicates=sum(isinstance(u, DuplicatePair) for u in units),
        seconds=seconds,
        cpu_seconds=cpu,
        peak_rss_mb=peak_rss_mb(),
        skipped=[{"line": u.line, "reason": u.reason} for u in units if isinstance(u, BadLine)],
    )
