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
with committed chunks are refused (``restart=True`` discards them).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import json
import os
import resource
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .artifacts import InputError, atomic_write, read_json, write_json
from .benchmarks import GRADES, iter_delimited
from .documents import Document, document_card
from .families import load_labeler
from .labeler import resolve_dtype

MANIFEST = "manifest.json"
WORK_DB = "work.sqlite"
CHUNKS = "chunks"
SUMMARY = "summary.json"
SKIPPED = "skipped.jsonl"
LOCK = ".lock"
OUTPUT_FILES = {"jsonl": "labels.jsonl", "parquet": "labels.parquet", "qrels": "labels.qrels"}
INPUT_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".pq": "parquet", ".trec": "trec", ".run": "trec"}
MANIFEST_VERSION = 1
# A document is cut to this many characters per token of max_length before it is tokenized at all:
# natural text never spends more than a few characters per token, so the kept tokens do not change,
# but a pathological multi-megabyte "document" costs no more than a long one.
CHARS_PER_TOKEN_BOUND = 32
# Queries are never cut (the student's truncation policy); one longer than this share of max_length
# tokens is bad input, so that the document always keeps room.
MAX_QUERY_SHARE = 4
FINGERPRINT_BLOCK = 1 << 20

TRUNCATION_POLICY = (
    "Truncation: the instruction and the query are always kept whole; a document that does not fit "
    "in --max-length tokens is cut from its end (counted as truncated_documents in summary.json). "
    f"A query longer than --max-length/{MAX_QUERY_SHARE} tokens is bad input."
)
BAD_INPUT_POLICY = (
    "Bad input (malformed JSON, missing or empty fields, non-UTF-8 bytes, wrong field types, ids absent "
    "from --topics/--collection, over-long queries, a pair repeated in a JSONL/Parquet file, ids with "
    "whitespace when qrels are among the --formats): by default an "
    "error naming the file and line (Parquet: row) before any labeling starts; with --skip-bad-lines the line "
    "is skipped, counted in summary.json and recorded with its reason in skipped.jsonl. Repeated "
    "(query, document) pairs of a TREC run (several systems) are labeled once and counted as duplicates."
)


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


@dataclass(frozen=True)
class PairRecord:
    """One valid pair to label, with the input line (or Parquet row) it came from."""

    line: int
    query_id: str
    query: str
    doc_id: str
    document: str


@dataclass(frozen=True)
class BadLine:
    """An input unit that cannot be labeled, and why."""

    line: int
    reason: str


@dataclass(frozen=True)
class DuplicatePair:
    """A TREC-run line whose (query, document) pair an earlier line already gave."""

    line: int
    first_line: int


Unit = PairRecord | BadLine | DuplicatePair


# --------------------------------------------------------------------------------------------
# Fingerprints, raw readers
# --------------------------------------------------------------------------------------------


def file_fingerprint(path: str | Path) -> str:
    """BLAKE2b of a file's bytes (streamed), prefixed by its size."""
    digest = hashlib.blake2b(digest_size=16)
    path = Path(path)
    with path.open("rb") as handle:
        while block := handle.read(FINGERPRINT_BLOCK):
            digest.update(block)
    return f"{path.stat().st_size}:{digest.hexdigest()}"


def model_fingerprint(model: str | Path) -> dict[str, str]:
    """A model's identity: a local folder or file by its files' names, sizes and times; a name as itself."""
    path = Path(str(model)).expanduser()
    if not path.exists():
        return {"model": str(model), "model_fingerprint": str(model)}
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.blake2b(digest_size=16)
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return {"model": str(path.resolve()), "model_fingerprint": digest.hexdigest()}


def numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw bytes)`` of each non-blank line, streamed."""
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if raw.strip():
                yield line_no, raw


def decode_line(raw: bytes, line_no: int) -> str:
    """A line as text; ``ValueError`` with the reason for non-UTF-8 bytes (a BOM on line 1 is dropped)."""
    try:
        return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def json_object(raw: bytes, line_no: int) -> dict[str, Any]:
    """One JSONL line as an object; ``ValueError`` with the reason otherwise."""
    try:
        record = json.loads(decode_line(raw, line_no))
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    return record


def _text(value: Any, name: str) -> str:
    """A non-empty, encodable text field; ``ValueError`` naming the field otherwise."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"field {name!r} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field {name!r} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"field {name!r} holds invalid Unicode (a lone surrogate such as \\ud800)") from None
    return value


def _identifier(value: Any, name: str) -> str:
    """An id field: a string or an integer, as a string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(value, name).strip()


def check_qrels_ids(query_id: str, doc_id: str) -> None:
    """``ValueError`` naming the id when a pair's ids cannot be written as a TREC qrels line."""
    for name, value in (("query_id", query_id), ("doc_id", doc_id)):
        if any(c.isspace() for c in value):
            raise ValueError(f"{name} {value!r} contains whitespace, which TREC qrels cannot hold; "
                             "leave qrels out of --formats")  # fmt: skip


# --------------------------------------------------------------------------------------------
# Input formats
# --------------------------------------------------------------------------------------------


class PairSource:
    """A pair file read as numbered units; subclasses turn one raw unit into fields."""

    kind = ""
    unit = "line"
    duplicates_expected = False

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such input file")

    def raw_units(self) -> Iterator[tuple[int, Any]]:
        return numbered_lines(self.path)

    def fields(self, raw: Any, line_no: int) -> dict[str, Any]:
        raise NotImplementedError

    def where(self, line_no: int) -> str:
        return f"{self.path}:{line_no}" if self.unit == "line" else f"{self.path}: row {line_no}"


class JsonlSource(PairSource):
    """JSONL: ``query_id, query, doc_id`` and ``document`` (or the doc id looked up in a collection)."""

    kind = "jsonl"

    def fields(self, raw: bytes, line_no: int) -> dict[str, Any]:
        return json_object(raw, line_no)


class ParquetSource(PairSource):
    """Parquet with the JSONL fields as columns, read in record batches."""

    kind = "parquet"
    unit = "row"
    COLUMNS = ("query_id", "query", "doc_id", "document")
    BATCH_ROWS = 1024

    def __init__(self, path: str | Path):
        super().__init__(path)
        import pyarrow.parquet as pq

        try:
            self.file = pq.ParquetFile(self.path)
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise InputError(f"{self.path}: not a readable Parquet file ({exc})") from exc
        names = self.file.schema_arrow.names
        missing = [name for name in ("query_id", "doc_id") if name not in names]
        if missing:
            raise InputError(f"{self.path}: missing column(s) {missing}; columns are {names}")
        self.columns = [name for name in self.COLUMNS if name in names]

    def raw_units(self) -> Iterator[tuple[int, dict[str, Any]]]:
        batches = self.file.iter_batches(batch_size=self.BATCH_ROWS, columns=self.columns)
        rows = (row for batch in batches for row in batch.to_pylist())
        return enumerate(rows, start=1)

    def fields(self, raw: dict[str, Any], line_no: int) -> dict[str, Any]:
        return raw


class TrecRunSource(PairSource):
    """A TREC run (``qid Q0 docid rank score tag``): the distinct (query, document) pairs it ranks."""

    kind = "trec"
    duplicates_expected = True

    def fields(self, raw: bytes, line_no: int) -> dict[str, Any]:
        parts = decode_line(raw, line_no).split()
        if len(parts) != 6:
            raise ValueError(f"expected 6 whitespace-separated fields (qid Q0 docid rank score tag), found {len(parts)}")
        return {"query_id": parts[0], "doc_id": parts[2]}


SOURCES: dict[str, type[PairSource]] = {cls.kind: cls for cls in (JsonlSource, ParquetSource, TrecRunSource)}


def open_pairs(path: str | Path, input_format: str | None = None) -> PairSource:
    """The pair source for a file; the format comes from ``input_format`` or the file's suffix."""
    kind = input_format or INPUT_FORMATS.get(Path(path).suffix.lower())
    if kind not in SOURCES:
        raise ValueError(
            f"{path}: cannot tell the input format from the suffix {Path(path).suffix!r}; "
            f"name it with input_format / --input-format ({', '.join(SOURCES)})"
        )
    return SOURCES[kind](path)


# --------------------------------------------------------------------------------------------
# Texts and pair first-lines on disk
# --------------------------------------------------------------------------------------------


class WorkStore:
    """An SQLite file beside the labels: collection and topic texts, and each pair's first line.

    Memory stays flat for any collection or input size. A text table is (re)loaded in one
    transaction whenever its source file's fingerprint differs from the one recorded with it.
    """

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS sources (name TEXT PRIMARY KEY, fingerprint TEXT);
            CREATE TABLE IF NOT EXISTS documents (id TEXT PRIMARY KEY, text TEXT, source TEXT) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS queries (id TEXT PRIMARY KEY, text TEXT, source TEXT) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS pairs (query_id TEXT, doc_id TEXT, line INTEGER,
                                              PRIMARY KEY (query_id, doc_id)) WITHOUT ROWID;
            """
        )
        self.has = {"documents": False, "queries": False}

    def close(self) -> None:
        self.db.close()

    def load(self, table: str, path: Path | None, fingerprint: str | None, progress: bool = True) -> None:
        """Fill ``documents`` (from a TSV or JSONL collection) or ``queries`` (from a topics TSV)."""
        if path is None:
            return
        self.has[table] = True
        known = self.db.execute("SELECT fingerprint FROM sources WHERE name = ?", (table,)).fetchone()
        if known and known[0] == fingerprint:
            return
        with self.db:
            self.db.execute(f"DELETE FROM {table}")  # noqa: S608 - table is one of two constants
            rows = collection_rows(path) if table == "documents" else topic_rows(path)
            for where, key, text in tqdm(rows, desc=f"indexing {path.name}", unit=" lines", disable=not progress):
                cursor = self.db.execute(f"INSERT OR IGNORE INTO {table} VALUES (?, ?, ?)", (key, text, where))  # noqa: S608
                if cursor.rowcount == 0:
                    first = self.db.execute(f"SELECT source FROM {table} WHERE id = ?", (key,)).fetchone()[0]  # noqa: S608
                    raise InputError(f"{where}: id {key!r} is given twice (first at {first})")
            self.db.execute("INSERT OR REPLACE INTO sources VALUES (?, ?)", (table, fingerprint))

    def text(self, table: str, key: str) -> str | None:
        row = self.db.execute(f"SELECT text FROM {table} WHERE id = ?", (key,)).fetchone()  # noqa: S608
        return row[0] if row else None

    def first_line(self, query_id: str, doc_id: str, line: int) -> int:
        """The line where this pair first occurs (``line`` itself the first time; idempotent on re-reads)."""
        self.db.execute("INSERT OR IGNORE INTO pairs VALUES (?, ?, ?)", (query_id, doc_id, line))
        return self.db.execute("SELECT line FROM pairs WHERE query_id = ? AND doc_id = ?", (query_id, doc_id)).fetchone()[0]

    def commit(self) -> None:
        self.db.commit()


COLLECTION_ID_FIELDS = ("doc_id", "docid", "_id", "id")
COLLECTION_TEXT_FIELDS = ("document", "text", "contents", "body")


def collection_rows(path: Path) -> Iterator[tuple[str, str, str]]:
    """``(where, doc id, text)`` of a collection: TSV ``docid<TAB>text`` or JSONL.

    A JSONL record's id is its first field of ``doc_id, docid, _id, id`` and its text the first of
    ``document, text, contents, body``, after its ``title`` when it has one (BEIR layout).
    """
    if path.suffix.lower() != ".jsonl":
        for where, (doc_id, text) in iter_delimited(path, 2, "\t"):
            yield where, doc_id, text
        return
    for line_no, raw in numbered_lines(path):
        where = f"{path}:{line_no}"
        try:
            record = json_object(raw, line_no)
            id_field = next((name for name in COLLECTION_ID_FIELDS if name in record), None)
            text_field = next((name for name in COLLECTION_TEXT_FIELDS if name in record), None)
            if id_field is None or text_field is None:
                raise ValueError(f"needs an id field ({', '.join(COLLECTION_ID_FIELDS)}) and a text field "
                                 f"({', '.join(COLLECTION_TEXT_FIELDS)}); has {sorted(record)}")
            text = _text(record[text_field], text_field)
            if record.get("title"):
                text = f"{_text(record['title'], 'title')}\n\n{text}"
            yield where, _identifier(record[id_field], id_field), text
        except ValueError as exc:
            raise InputError(f"{where}: {exc}") from None


def topic_rows(path: Path) -> Iterator[tuple[str, str, str]]:
    """``(where, query id, query)`` of a topics file ``qid<TAB>query``."""
    for where, (query_id, query) in iter_delimited(path, 2, "\t"):
        if not query.strip():
            raise InputError(f"{where}: empty query")
        yield where, query_id.strip(), query.strip()


# --------------------------------------------------------------------------------------------
# Units: raw input -> pair, bad line or duplicate
# --------------------------------------------------------------------------------------------


class UnitReader:
    """Turns a source's raw units into :data:`Unit` values, with texts looked up in the work store."""

    def __init__(self, source: PairSource, store: WorkStore, tokenizer: Any, max_length: int, qrels: bool = False):
        """``qrels``: ids must fit a TREC qrels line (no whitespace)."""
        self.source = source
        self.store = store
        self.qrels = qrels
        self.max_query_tokens = max_length // MAX_QUERY_SHARE
        self.max_document_chars = max_length * CHARS_PER_TOKEN_BOUND
        self.query_tokens = lru_cache(maxsize=8192)(lambda q: len(tokenizer.encode(q, add_special_tokens=False)))

    def units(self, skip: int = 0) -> Iterator[Unit]:
        """Every unit in input order, after the first ``skip`` raw units (not even parsed)."""
        for line_no, raw in itertools.islice(self.source.raw_units(), skip, None):
            try:
                pair = self.pair(line_no, self.source.fields(raw, line_no))
            except ValueError as exc:
                yield BadLine(line_no, str(exc))
                continue
            first = self.store.first_line(pair.query_id, pair.doc_id, line_no)
            if first == line_no:
                yield pair
            elif self.source.duplicates_expected:
                yield DuplicatePair(line_no, first)
            else:
                yield BadLine(line_no, f"pair (query {pair.query_id!r}, document {pair.doc_id!r}) repeats "
                                       f"{self.source.unit} {first}")

    def pair(self, line_no: int, fields: dict[str, Any]) -> PairRecord:
        for name in ("query_id", "doc_id"):
            if fields.get(name) is None:
                raise ValueError(f"missing field {name!r}")
        query_id = _identifier(fields["query_id"], "query_id")
        doc_id = _identifier(fields["doc_id"], "doc_id")
        if self.qrels:
            check_qrels_ids(query_id, doc_id)
        query = self._lookup(fields.get("query"), "query", "queries", query_id, "--topics")
        document = self._lookup(fields.get("document"), "document", "documents", doc_id, "--collection")
        tokens = self.query_tokens(query)
        if tokens > self.max_query_tokens:
            raise ValueError(f"query is {tokens} tokens, over the limit of {self.max_query_tokens} "
                             f"(max_length / {MAX_QUERY_SHARE}; queries are never cut)")
        return PairRecord(line_no, query_id, query, doc_id, document[: self.max_document_chars])

    def _lookup(self, value: Any, name: str, table: str, key: str, option: str) -> str:
        """The field's text, or the text of ``key`` in the collection / topics when the field is absent."""
        if value is not None:
            return _text(value, name)
        if not self.store.has[table]:
            raise ValueError(f"missing field {name!r} (or give {option} to look it up by id)")
        text = self.store.text(table, key)
        if text is None:
            raise ValueError(f"{'doc_id' if table == 'documents' else 'query_id'} {key!r} is not in the {option} file")
        return text


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
    manifest = {"version": MANIFEST_VERSION, "identity": identity, "total_units": None, "chunks_done": 0,
                "complete": False}  # fmt: skip
    write_json(manifest_path, manifest)
    return manifest


# --------------------------------------------------------------------------------------------
# Labeling
# --------------------------------------------------------------------------------------------


def load_student(model: str | Path, max_length: int, precision: str = "auto") -> Any:
    """A labeler of either family (causal LM or cross-encoder) in the given precision."""
    return load_labeler(model, max_length=max_length, dtype=resolve_dtype(precision))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """CPU time this process has used (all threads, user + system): unlike wall time, not slowed by other jobs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def label_record(pair: PairRecord, label: Any, labeler_name: str) -> dict[str, Any]:
    """A label line; the fields :func:`labeler_utils.benchmarks.read_predictions` reads, plus the input line."""
    return {"query_id": pair.query_id, "doc_id": pair.doc_id, "grade": label.grade,
            "expected_relevance": label.expected_relevance, "distribution": label.distribution,
            "labeler": labeler_name, "line": pair.line}  # fmt: skip


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


def label_chunk(labeler: Any, units: list[Unit], batch_size: int, labeler_name: str,
                on_label: Any) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
    """Label the chunk's pairs in input order; returns (label records, documents truncated)."""
    pairs = [unit for unit in units if isinstance(unit, PairRecord)]
    truncated_before = labeler.truncated
    labels = labeler.label(((p.query, p.document) for p in pairs), batch_size=batch_size,
                           bucket_size=min(len(pairs), 512) or 1, progress=False)  # fmt: skip
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
                manifest = _label_chunks(out_dir, manifest, source, model, collection_path, topics_path, settings,
                                         "qrels" in formats, max_chunks, progress)  # fmt: skip
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


def _label_chunks(out_dir: Path, manifest: dict[str, Any], source: PairSource, model: str | Path,
                  collection: Path | None, topics: Path | None, settings: LabelSettings, qrels: bool,
                  max_chunks: int | None, progress: bool) -> dict[str, Any]:  # fmt: skip
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
        with tqdm(total=manifest["total_units"], initial=min(done * settings.chunk_size, manifest["total_units"]),
                  desc="labeling", unit="pair", disable=not progress, smoothing=0.1) as bar:  # fmt: skip
            for index in range(done, min(total_chunks, done + max_chunks) if max_chunks is not None else total_chunks):
                start, cpu_start = time.perf_counter(), cpu_seconds()
                chunk = list(itertools.islice(units, settings.chunk_size))
                bad = [unit for unit in chunk if isinstance(unit, BadLine)]
                if bad and not settings.skip_bad_lines:  # only when the file was changed during the run
                    raise bad_input(source, bad[0])
                records, truncated = label_chunk(labeler, chunk, settings.batch_size, labeler_name, bar.update)
                store.commit()
                meta = ChunkMeta(index=index, units=len(chunk), labels=len(records), truncated=truncated,
                                 duplicates=sum(isinstance(u, DuplicatePair) for u in chunk),
                                 seconds=time.perf_counter() - start, cpu_seconds=cpu_seconds() - cpu_start,
                                 peak_rss_mb=peak_rss_mb(),
                                 skipped=[{"line": u.line, "reason": u.reason} for u in bad])
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


def bad_input(source: PairSource, unit: BadLine) -> InputError:
    """The error for a bad line when bad lines are not skipped."""
    return InputError(f"{source.where(unit.line)}: {unit.reason} "
                      "(fix it, or pass --skip-bad-lines to skip and record bad lines)")


def check_input(reader: UnitReader, skip_bad_lines: bool, progress: bool) -> int:
    """One pass before labeling: count the units, and stop at the first bad one unless skipping."""
    count = 0
    for unit in tqdm(reader.units(), desc="checking input", unit=" lines", disable=not progress, mininterval=2):
        count += 1
        if isinstance(unit, BadLine) and not skip_bad_lines:
            raise bad_input(reader.source, unit)
    reader.store.commit()
    if count == 0:
        raise InputError(f"{reader.source.path}: no input lines")
    return count


def chunk_metas(out_dir: Path, count: int) -> Iterator[dict[str, Any]]:
    for index in range(count):
        yield read_json(chunk_path(out_dir, index, ".meta.json"))


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


def cross_pairs(documents: Sequence[Document], queries: Iterable[dict[str, Any]],
                max_pairs: int | None = None) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Label input records for every query with every document (query by query), streamed.

    ``queries`` need ``query_id`` and ``query``; the document text is the document card, as the
    teacher and the student saw it in stages 04 and 05.
    """
    records = ({"query_id": q["query_id"], "query": q["query"], "doc_id": doc.doc_id, "document": document_card(doc)}
               for q in queries for doc in documents)  # fmt: skip
    return itertools.islice(records, max_pairs)


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

    schema = pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("line", pa.int64()),
                        ("grade", pa.int8()), ("expected_relevance", pa.float64()),
                        *((f"p{g}", pa.float64()) for g in GRADES)])  # fmt: skip
    with atomic_write(out_dir / OUTPUT_FILES["parquet"], "wb") as handle, pq.ParquetWriter(handle, schema) as writer:
        for index in range(count):
            with chunk_path(out_dir, index).open(encoding="utf-8") as chunk:
                records = [json.loads(line) for line in chunk]
            columns = {name: [r[name] for r in records] for name in ("query_id", "doc_id", "line", "grade",
                                                                     "expected_relevance")}  # fmt: skip
            for g in GRADES:
                columns[f"p{g}"] = [r["distribution"][g] for r in records]
            writer.write_table(pa.table(columns, schema=schema))
