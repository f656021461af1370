"""Stage 01: seed documents with their metadata (title, author, file name, folder path, date, type).

A corpus is a folder of Markdown or text files (and, on request, HTML, JSON/JSONL records, PDF and
Word files; see :func:`load_corpus`). A Markdown or text file may start with YAML front matter::

    ---
    title: Travel and Expense Policy (2025)
    author: Priya Raman
    date: 2025-02-03
    doc_type: policy
    ---

The document id is the file's POSIX path relative to the corpus folder; the file name and the
folder path are metadata too (navigational queries use them). A JSON list or JSONL file holds
several documents: each one's id is ``<path>#<its id field, or its position>``.

Long documents can be cut into chunks (:class:`ChunkPolicy`); a chunk's id is
``<document id>#chunk-<n>``, so that the hard-negative stage recognises chunks of one source as
siblings.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from matplotlib.figure import Figure

from .core.artifacts import InputError, iter_jsonl, read_jsonl, write_jsonl

TEXT_SUFFIXES = (".md", ".markdown", ".txt")
HTML_SUFFIXES = (".html", ".htm")
RECORD_SUFFIXES = (".json", ".jsonl")
OPTIONAL_SUFFIXES = (".pdf", ".docx")  # need the optional extra: pip install 'labeler-utils[documents]'
DOCUMENT_SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + RECORD_SUFFIXES + OPTIONAL_SUFFIXES
MIN_BODY_CHARS = 40
RECORD_ID_FIELDS = ("doc_id", "id")
RECORD_TEXT_FIELDS = ("text", "body")
CHUNK_ID_MARKER = "#chunk-"


@dataclass
class Document:
    """One seed document."""

    doc_id: str
    title: str
    text: str
    author: str = ""
    date: str = ""
    doc_type: str = ""
    file_name: str = ""
    path: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_front_matter(raw: str, source: str) -> tuple[dict[str, Any], str]:
    """Split ``---`` YAML front matter from the body; errors name the file."""
    if not raw.startswith("---"):
        return {}, raw
    parts = raw.split("\n---", 1)
    if len(parts) != 2:
        raise InputError(f"{source}: front matter starts with '---' but never closes")
    header, body = parts[0][3:], parts[1]
    try:
        meta = yaml.safe_load(header) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: front matter is not valid YAML ({exc})") from exc
    if not isinstance(meta, dict):
        raise InputError(f"{source}: front matter must be a mapping of fields")
    return meta, body.lstrip("-").lstrip("\n")


def parse_document(raw: str, doc_id: str, source: str) -> Document:
    """Build a :class:`Document` from file text, checking it is not empty."""
    meta, body = split_front_matter(raw, source)
    return build_document(meta, body, doc_id, source)


def build_document(meta: dict[str, Any], body: str, doc_id: str, source: str, file: str | None = None) -> Document:
    """A :class:`Document` from metadata fields and a body, checking the body is not empty.

    ``title``, ``author``, ``date`` and ``doc_type`` become fields (the title defaults to the file
    name's stem), other fields stay in ``metadata``. File name and folder path come from ``file``
    (the file's path in the corpus; default: ``doc_id``).
    """
    meta = dict(meta)
    body = body.strip()
    if len(body) < MIN_BODY_CHARS:
        raise InputError(f"{source}: document body is empty or shorter than {MIN_BODY_CHARS} characters")
    date = meta.pop("date", "")
    if isinstance(date, (_dt.date, _dt.datetime)):
        date = date.isoformat()
    path = Path(file or doc_id)
    title = str(meta.pop("title", "") or path.stem.replace("-", " ").replace("_", " "))
    return Document(
        doc_id=doc_id,
        title=title,
        text=body,
        author=str(meta.pop("author", "") or ""),
        date=str(date or ""),
        doc_type=str(meta.pop("doc_type", "") or ""),
        file_name=path.name,
        path=str(path.parent.as_posix()) if str(path.parent) != "." else "",
        metadata=meta,
    )


def load_corpus(
    folder: str | Path, suffixes: Iterable[str] = TEXT_SUFFIXES, chunking: ChunkPolicy | None = None
) -> list[Document]:
    """Load every file with one of ``suffixes`` under ``folder``, sorted by id, optionally chunked.

    ``suffixes`` may name any of :data:`DOCUMENT_SUFFIXES` (``.pdf`` and ``.docx`` need the
    ``documents`` extra). Errors name the file (and line or record).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Corpus folder {folder} does not exist")
    suffixes = tuple(s.lower() for s in suffixes)
    unsupported = sorted(set(suffixes) - set(DOCUMENT_SUFFIXES))
    if unsupported:
        raise ValueError(f"Cannot read {unsupported} files; supported suffixes are {DOCUMENT_SUFFIXES}")
    documents = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes):
        documents.extend(READERS[file.suffix.lower()](file, file.relative_to(folder).as_posix()))
    if not documents:
        raise InputError(f"{folder}: no documents with suffix {suffixes} found")
    return chunk_documents(documents, chunking) if chunking else documents


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{file}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc


def read_text_file(file: Path, doc_id: str) -> list[Document]:
    """A Markdown or text file, with optional YAML front matter."""
    return [parse_document(_read_text(file), doc_id, str(file))]


class _HTMLText(HTMLParser):
    """Collects an HTML page's title, ``<meta name=... content=...>`` fields and its visible text by block."""

    BLOCKS = frozenset(
        "address article aside blockquote br dd div dl dt figcaption footer form h1 h2 h3 h4 h5 h6 "
        "header hr li main nav ol p pre section table td th tr ul".split()
    )
    HIDDEN = frozenset(("script", "style", "noscript", "template", "title", "head"))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.meta: dict[str, str] = {}
        self.blocks: list[str] = [""]
        self.hidden: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "meta" and values.get("name") and values.get("content"):
            self.meta[values["name"].lower()] = values["content"].strip()
        elif tag in self.HIDDEN:
            self.hidden.append(tag)
        elif tag in self.BLOCKS:
            self.blocks.append("")

    def handle_endtag(self, tag: str) -> None:
        if self.hidden and tag == self.hidden[-1]:
            self.hidden.pop()
        elif tag in self.BLOCKS:
            self.blocks.append("")

    def handle_data(self, data: str) -> None:
        if self.hidden and self.hidden[-1] == "title":
            self.title += data
        elif not self.hidden:
            self.blocks[-1] += data

    def text(self) -> str:
        return "\n\n".join(" ".join(block.split()) for block in self.blocks if block.strip())


def read_html_file(file: Path, doc_id: str) -> list[Document]:
    """An HTML page: title from ``<title>``, author/date/doc_type from ``<meta name=...>``, text by block."""
    parser = _HTMLText()
    parser.feed(_read_text(file))
    parser.close()
    meta = {name: value for name, value in parser.meta.items() if name in ("author", "date", "doc_type", "description")}
    meta["title"] = " ".join(parser.title.split())
    return [build_document(meta, parser.text(), doc_id, str(file))]


def _record_document(record: Any, doc_id: str, where: str, file: str) -> Document:
    """A document from a JSON object with ``title``, ``text`` (or ``body``) and optional metadata fields."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object with title and text, got {type(record).__name__}")
    text_field = next((name for name in RECORD_TEXT_FIELDS if name in record), None)
    if text_field is None or not isinstance(record[text_field], str):
        raise InputError(f"{where}: needs a string field 'text' (or 'body'); fields are {sorted(record)}")
    meta = {k: v for k, v in record.items() if k not in (*RECORD_ID_FIELDS, *RECORD_TEXT_FIELDS)}
    return build_document(meta, record[text_field], doc_id, where, file)


def _record_documents(records: list[tuple[str, Any]], doc_id: str) -> list[Document]:
    """Documents of a multi-record file, ids ``<path>#<id field or 1-based position>``, ids unique."""
    documents, seen = [], {}
    for position, (where, record) in enumerate(records, start=1):
        key = next(
            (str(record[f]) for f in RECORD_ID_FIELDS if isinstance(record, dict) and record.get(f)), str(position)
        )
        if key in seen:
            raise InputError(f"{where}: id {key!r} is already used at {seen[key]}")
        seen[key] = where
        documents.append(_record_document(record, f"{doc_id}#{key}", where, doc_id))
    return documents


def read_json_file(file: Path, doc_id: str) -> list[Document]:
    """A JSON file: one document object (id = the file's path) or a list of them."""
    try:
        payload = json.loads(_read_text(file))
    except json.JSONDecodeError as exc:
        raise InputError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if isinstance(payload, list):
        return _record_documents([(f"{file} [record {i}]", r) for i, r in enumerate(payload, start=1)], doc_id)
    return [_record_document(payload, doc_id, str(file), doc_id)]


def read_jsonl_file(file: Path, doc_id: str) -> list[Document]:
    """A JSONL file: one document object per line."""
    return _record_documents([(f"{file} [record {i}]", r) for i, r in enumerate(iter_jsonl(file), start=1)], doc_id)


def _optional_module(module: str, package: str, file: Path) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModuleNotFoundError(
            f"{file}: reading {file.suffix} files needs the optional package {package!r}; install it with "
            f"pip install 'labeler-utils[documents]' (or pip install {package}), or leave {file.suffix} out of suffixes"
        ) from None


def _iso_date(value: Any) -> str:
    return value.date().isoformat() if isinstance(value, _dt.datetime) else ""


def read_pdf_file(file: Path, doc_id: str) -> list[Document]:
    """A PDF's text layer, page by page (pypdf); title, author and creation date from its metadata."""
    pypdf = _optional_module("pypdf", "pypdf", file)
    try:
        reader = pypdf.PdfReader(file)
        text = "\n\n".join((page.extract_text() or "").strip() for page in reader.pages)
        info = reader.metadata or {}
    except pypdf.errors.PyPdfError as exc:
        raise InputError(f"{file}: not a readable PDF ({exc})") from exc
    if not text.strip():
        raise InputError(f"{file}: the PDF has no text layer (a scan needs OCR first)")
    meta = {
        "title": info.get("/Title") or "",
        "author": info.get("/Author") or "",
        "date": _iso_date(getattr(info, "creation_date", None)),
        "pages": len(reader.pages),
    }
    return [build_document(meta, text, doc_id, str(file))]


def read_docx_file(file: Path, doc_id: str) -> list[Document]:
    """A Word file's paragraphs and table rows (python-docx); title, author and date from its properties."""
    docx = _optional_module("docx", "python-docx", file)
    try:
        word = docx.Document(str(file))
    except Exception as exc:  # python-docx raises zipfile, KeyError or its own errors for a bad file
        raise InputError(f"{file}: not a readable .docx file ({exc})") from exc
    blocks = [p.text for p in word.paragraphs]
    blocks += [" | ".join(cell.text for cell in row.cells) for table in word.tables for row in table.rows]
    props = word.core_properties
    meta = {
        "title": props.title or "",
        "author": props.author or "",
        "date": _iso_date(props.created),
        "doc_type": props.category or "",
    }
    return [build_document(meta, "\n\n".join(b.strip() for b in blocks if b.strip()), doc_id, str(file))]


READERS: dict[str, Callable[[Path, str], list[Document]]] = {
    **dict.fromkeys(TEXT_SUFFIXES, read_text_file),
    **dict.fromkeys(HTML_SUFFIXES, read_html_file),
    ".json": read_json_file,
    ".jsonl": read_jsonl_file,
    ".pdf": read_pdf_file,
    ".docx": read_docx_file,
}


@dataclass(frozen=True)
class ChunkPolicy:
    """How long documents are cut: at most ``max_words`` words a chunk, ``overlap_words`` repeated.

    A document of at most ``max_words`` words is kept whole, with its id. A longer one is cut on
    paragraph boundaries (blank lines): paragraphs are packed in order while the chunk stays
    within ``max_words``; a paragraph longer than that is cut into runs of words. Each chunk after
    the first starts with the last ``overlap_words`` words of the one before. Chunks keep the
    document's metadata; their ids are ``<doc id>#chunk-1``, ``#chunk-2``, ...
    """

    max_words: int = 300
    overlap_words: int = 50

    def __post_init__(self) -> None:
        if self.max_words < 1 or not 0 <= self.overlap_words < self.max_words:
            raise ValueError(f"Need max_words >= 1 and 0 <= overlap_words < max_words, got {self}")


PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def chunk_text(text: str, policy: ChunkPolicy) -> list[str]:
    """The chunks of one text under ``policy`` (the text itself when it is short enough)."""
    if len(text.split()) <= policy.max_words:
        return [text]
    step = policy.max_words - policy.overlap_words
    pieces: list[tuple[str, int]] = []  # (paragraph text or run of words, word count)
    for paragraph in PARAGRAPH_BREAK.split(text.strip()):
        words = paragraph.split()
        if len(words) <= step:
            pieces.append((paragraph.strip(), len(words)))
        else:
            pieces.extend((" ".join(words[i : i + step]), len(words[i : i + step])) for i in range(0, len(words), step))
    chunks: list[list[str]] = []
    current: list[str] = []
    count = 0
    for piece, words in pieces:
        if words == 0:
            continue
        if current and count + words > policy.max_words:
            chunks.append(current)
            tail = " ".join(" ".join(current).split()[-policy.overlap_words :]) if policy.overlap_words else ""
            current, count = ([tail] if tail else []), len(tail.split())
        current.append(piece)
        count += words
    chunks.append(current)
    return ["\n\n".join(chunk) for chunk in chunks]


def chunk_documents(documents: Iterable[Document], policy: ChunkPolicy) -> list[Document]:
    """Documents cut by ``policy``; a chunk records its number, the count and its source in ``metadata``."""
    out: list[Document] = []
    for doc in documents:
        parts = chunk_text(doc.text, policy)
        if len(parts) == 1:
            out.append(doc)
            continue
        for number, part in enumerate(parts, start=1):
            out.append(
                replace(
                    doc,
                    doc_id=f"{doc.doc_id}{CHUNK_ID_MARKER}{number}",
                    text=part,
                    metadata={**doc.metadata, "chunk": number, "chunks": len(parts), "source_doc_id": doc.doc_id},
                )
            )
    return out


def save_documents(documents: Iterable[Document], path: str | Path) -> int:
    """Write documents as JSONL (the stage 01 artifact)."""
    return write_jsonl(path, (doc.to_dict() for doc in documents))


def read_documents(path: str | Path) -> list[Document]:
    """Read the stage 01 artifact back."""
    return [Document(**record) for record in read_jsonl(path, required=("doc_id", "text"))]


def select_documents(documents: list[Document], max_documents: int | None) -> list[Document]:
    """A deterministic subset spread over document types (round-robin by type)."""
    if max_documents is None or max_documents >= len(documents):
        return list(documents)
    by_type: dict[str, list[Document]] = {}
    for doc in documents:
        by_type.setdefault(doc.doc_type, []).append(doc)
    chosen: list[Document] = []
    queues = [list(group) for _, group in sorted(by_type.items())]
    while len(chosen) < max_documents:
        for queue in queues:
            if queue and len(chosen) < max_documents:
                chosen.append(queue.pop(0))
    return sorted(chosen, key=lambda d: d.doc_id)


def document_card(doc: Document, max_chars: int | None = None) -> str:
    """The document as a prompt sees it: metadata lines, then the (optionally cut) text."""
    text = doc.text if max_chars is None else doc.text[:max_chars]
    lines = [f"Title: {doc.title}"]
    if doc.file_name:
        lines.append(f"File: {doc.path + '/' if doc.path else ''}{doc.file_name}")
    if doc.author:
        lines.append(f"Author: {doc.author}")
    if doc.date:
        lines.append(f"Date: {doc.date}")
    if doc.doc_type:
        lines.append(f"Type: {doc.doc_type}")
    return "\n".join(lines) + "\n\n" + text


# --------------------------------------------------------------------------------------------
# What a corpus holds (notebooks 01 and 09)
# --------------------------------------------------------------------------------------------


def document_table(documents: Iterable[Document]) -> pd.DataFrame:
    """One row per document: its fields, ``file_type`` (the file name's suffix) and ``words`` (its length)."""
    table = pd.DataFrame([doc.to_dict() for doc in documents], columns=[f.name for f in fields(Document)])
    table["file_type"] = table["file_name"].str.extract(r"(\.[^.]+)$", expand=False)
    table["words"] = table["text"].str.split().str.len()
    return table


def plot_corpus(table: pd.DataFrame) -> Figure:
    """Bars of documents per type and per file type, and a histogram of their lengths (a :func:`document_table`)."""
    fig = Figure(figsize=(13, 3.2))
    types_ax, files_ax, words_ax = fig.subplots(1, 3)
    types = table["doc_type"].replace("", "(none)").value_counts().sort_values()
    types_ax.barh(types.index, types.to_numpy(), color="tab:blue")
    types_ax.set_title("documents per type")
    file_types = table["file_type"].fillna("(none)").value_counts()
    files_ax.bar(file_types.index, file_types.to_numpy(), color="tab:blue")
    files_ax.set_title("file types")
    words_ax.hist(table["words"], bins=20, color="tab:gray")
    words_ax.set(title="document length", xlabel="words")
    fig.tight_layout()
    return fig


def plot_chunk_lengths(document_words: Sequence[int], chunk_words: Sequence[int], max_words: int) -> Figure:
    """Histograms of words per document and per chunk side by side, with the chunk limit as a dotted line."""
    fig = Figure(figsize=(6.5, 3.2))
    ax = fig.subplots()
    ax.hist([list(document_words), list(chunk_words)], bins=15, label=["documents", "chunks"])
    ax.axvline(max_words, color="black", linestyle=":", label=f"max_words = {max_words}")
    ax.set(xlabel="words", ylabel="count")
    ax.legend()
    fig.tight_layout()
    return fig
