"""Reading and validating the input of :mod:`labeler_utils.labeling.job`, streamed.

The pair sources (JSONL, Parquet, a TREC run) read numbered units (non-blank lines, or Parquet
rows); the collection and topics readers fill an SQLite work store, so that texts are looked up
by id without holding them in memory; :class:`UnitReader` turns each raw unit into a pair to
label, a bad line with its reason, or a repeated pair; :func:`check_input` is the one pass over
the input before labeling. Also here: the input files' fingerprints (a resumed run's identity),
:func:`cross_pairs` (input records from a run's documents and queries), and the policies the
``label`` command prints (truncation, bad input) beside the checks they describe.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..core.artifacts import InputError, format_suffix, iter_delimited, numbered_lines
from ..documents import Document, document_card

INPUT_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".pq": "parquet", ".trec": "trec", ".run": "trec"}
# Units read and checked before the model loads (the whole input is checked after, with the tokenizer).
FIRST_UNITS_CHECKED = 1000
# Unicode categories no id may hold: invisible format characters (a zero-width space, a BOM) and controls.
INVISIBLE_ID_CATEGORIES = frozenset({"Cf", "Cc"})
# and, when qrels are written, none of these either: every kind of space and line or paragraph separator.
WHITESPACE_CATEGORIES = frozenset({"Zs", "Zl", "Zp"})
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
    "an invisible format or control character such as a zero-width space, ids with whitespace when qrels "
    "are among the --formats): by default an error naming the file and line (Parquet: row) before any "
    f"labeling starts (the first {FIRST_UNITS_CHECKED} lines before the student loads); with --skip-bad-lines "
    "the line is skipped, counted in summary.json and recorded with its reason in skipped.jsonl; an input "
    "without a single good line is an error. Repeated (query, document) pairs of a TREC run (several "
    "systems) are labeled once and counted as duplicates. Input files ending in .gz are read decompressed."
)


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


def check_ids(query_id: str, doc_id: str, qrels: bool = True) -> None:
    """``ValueError`` naming the id and character when an id holds an invisible format or control character (a
    zero-width space makes ``q\\u200b001`` look like ``q001``), or, with ``qrels``, any whitespace, which a TREC
    qrels line cannot hold."""
    for name, value in (("query_id", query_id), ("doc_id", doc_id)):
        for char in value:
            category = unicodedata.category(char)
            if category in INVISIBLE_ID_CATEGORIES and not (qrels and char.isspace()):
                raise ValueError(
                    f"{name} {value!r} contains U+{ord(char):04X} ({unicodedata.name(char, 'a control character')}), "
                    "an invisible character no id may hold"
                )
            if qrels and (char.isspace() or category in WHITESPACE_CATEGORIES):
                raise ValueError(
                    f"{name} {value!r} contains whitespace, which TREC qrels cannot hold; leave qrels out of --formats"
                )


def pair_ids(fields: dict[str, Any], qrels: bool) -> tuple[str, str]:
    """The checked ``(query_id, doc_id)`` of a unit's fields (see :func:`check_ids`); ``ValueError`` otherwise."""
    for name in ("query_id", "doc_id"):
        if fields.get(name) is None:
            raise ValueError(f"missing field {name!r}")
    query_id, doc_id = _identifier(fields["query_id"], "query_id"), _identifier(fields["doc_id"], "doc_id")
    check_ids(query_id, doc_id, qrels)
    return query_id, doc_id


def inline_text(fields: dict[str, Any], name: str, option: str, can_look_up: bool) -> str | None:
    """The unit's own ``query`` or ``document`` text, checked; None when it is to be looked up by id in the
    ``option`` file, a ``ValueError`` when it is absent and there is no such file."""
    if fields.get(name) is not None:
        return _text(fields[name], name)
    if not can_look_up:
        raise ValueError(f"missing field {name!r} (or give {option} to look it up by id)")
    return None


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
            raise ValueError(
                f"expected 6 whitespace-separated fields (qid Q0 docid rank score tag), found {len(parts)}"
            )
        return {"query_id": parts[0], "doc_id": parts[2]}


SOURCES: dict[str, type[PairSource]] = {cls.kind: cls for cls in (JsonlSource, ParquetSource, TrecRunSource)}


def open_pairs(path: str | Path, input_format: str | None = None) -> PairSource:
    """The pair source for a file; the format comes from ``input_format`` or the file's suffix (the one before
    ``.gz``: a gzipped JSONL file or TREC run is read decompressed)."""
    kind = input_format or INPUT_FORMATS.get(format_suffix(path))
    if kind not in SOURCES:
        raise ValueError(
            f"{path}: cannot tell the input format from the suffix {format_suffix(path)!r}; "
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
        """Open (or create) the store; an SQLite error while setting it up closes it again and is raised."""
        self.db = sqlite3.connect(path)
        try:
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
        except sqlite3.Error:
            self.db.close()
            raise
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
        return self.db.execute(
            "SELECT line FROM pairs WHERE query_id = ? AND doc_id = ?", (query_id, doc_id)
        ).fetchone()[0]

    def commit(self) -> None:
        self.db.commit()


COLLECTION_ID_FIELDS = ("doc_id", "docid", "_id", "id")
COLLECTION_TEXT_FIELDS = ("document", "text", "contents", "body")


def collection_rows(path: Path) -> Iterator[tuple[str, str, str]]:
    """``(where, doc id, text)`` of a collection: TSV ``docid<TAB>text`` or JSONL.

    A JSONL record's id is its first field of ``doc_id, docid, _id, id`` and its text the first of
    ``document, text, contents, body``, after its ``title`` when it has one (BEIR layout).
    """
    if format_suffix(path) != ".jsonl":
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
                raise ValueError(
                    f"needs an id field ({', '.join(COLLECTION_ID_FIELDS)}) and a text field "
                    f"({', '.join(COLLECTION_TEXT_FIELDS)}); has {sorted(record)}"
                )
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
        self.query_tokens = lru_cache(maxsize=8192)(
            lambda q: len(tokenizer.encode(q, add_special_tokens=False, verbose=False))
        )

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
                yield BadLine(
                    line_no,
                    f"pair (query {pair.query_id!r}, document {pair.doc_id!r}) repeats {self.source.unit} {first}",
                )

    def pair(self, line_no: int, fields: dict[str, Any]) -> PairRecord:
        query_id, doc_id = pair_ids(fields, self.qrels)
        query = inline_text(fields, "query", "--topics", self.store.has["queries"])
        query = query or self._lookup("queries", query_id, "--topics")
        document = inline_text(fields, "document", "--collection", self.store.has["documents"])
        document = document or self._lookup("documents", doc_id, "--collection")
        tokens = self.query_tokens(query)
        if tokens > self.max_query_tokens:
            raise ValueError(
                f"query is {tokens} tokens, over the limit of {self.max_query_tokens} "
                f"(max_length / {MAX_QUERY_SHARE}; queries are never cut)"
            )
        return PairRecord(line_no, query_id, query, doc_id, document[: self.max_document_chars])

    def _lookup(self, table: str, key: str, option: str) -> str:
        """The text of ``key`` in the collection / topics."""
        text = self.store.text(table, key)
        if text is None:
            raise ValueError(f"{'doc_id' if table == 'documents' else 'query_id'} {key!r} is not in the {option} file")
        return text


def bad_input(source: PairSource, unit: BadLine) -> InputError:
    """The error for a bad line when bad lines are not skipped."""
    return InputError(
        f"{source.where(unit.line)}: {unit.reason} (fix it, or pass --skip-bad-lines to skip and record bad lines)"
    )


def check_first_units(source: PairSource, skip_bad_lines: bool, qrels: bool, collection: bool, topics: bool) -> None:
    """What can be checked before the student loads: the input has a unit, and its first
    :data:`FIRST_UNITS_CHECKED` units parse, with valid ids and texts or the file to look them up in
    (``collection``, ``topics``: whether one is given); :func:`check_input` checks everything after."""
    count = 0
    for line_no, raw in itertools.islice(source.raw_units(), FIRST_UNITS_CHECKED):
        count += 1
        try:
            fields = source.fields(raw, line_no)
            pair_ids(fields, qrels)
            inline_text(fields, "query", "--topics", topics)
            inline_text(fields, "document", "--collection", collection)
        except ValueError as exc:
            if not skip_bad_lines:
                raise bad_input(source, BadLine(line_no, str(exc))) from None
    if count == 0:
        raise InputError(f"{source.path}: no input lines")


def check_input(reader: UnitReader, skip_bad_lines: bool, progress: bool) -> int:
    """One pass before labeling: count the units, and stop at the first bad one unless skipping; an input whose
    every unit is bad is refused with the count even when skipping."""
    count, labelable, first_bad = 0, 0, None
    for unit in tqdm(reader.units(), desc="checking input", unit=" lines", disable=not progress, mininterval=2):
        count += 1
        if isinstance(unit, BadLine):
            if not skip_bad_lines:
                raise bad_input(reader.source, unit)
            first_bad = first_bad or unit
        else:
            labelable += 1
    reader.store.commit()
    if count == 0:
        raise InputError(f"{reader.source.path}: no input lines")
    if labelable == 0:
        raise InputError(
            f"{reader.source.path}: all {count} {reader.source.unit}(s) are bad, nothing to label; the first: "
            f"{reader.source.where(first_bad.line)}: {first_bad.reason}"
        )
    return count


def cross_pairs(
    documents: Sequence[Document], queries: Iterable[dict[str, Any]], max_pairs: int | None = None
) -> Iterator[dict[str, Any]]:
    """Label input records for every query with every document (query by query), streamed.

    ``queries`` need ``query_id`` and ``query``; the document text is the document card, as the
    teacher and the student saw it in stages 04 and 05.
    """
    records = (
        {"query_id": q["query_id"], "query": q["query"], "doc_id": doc.doc_id, "document": document_card(doc)}
        for q in queries
        for doc in documents
    )
    return itertools.islice(records, max_pairs)
