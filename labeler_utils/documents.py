"""Stage 01: seed documents with their metadata (title, author, file name, folder path, date, type).

A corpus is a folder of Markdown or text files. Each file may start with YAML front matter::

    ---
    title: Travel and Expense Policy (2025)
    author: Priya Raman
    date: 2025-02-03
    doc_type: policy
    ---

The document id is the file's POSIX path relative to the corpus folder; the file name and the
folder path are metadata too (navigational queries use them).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .artifacts import InputError, read_jsonl, write_jsonl

TEXT_SUFFIXES = (".md", ".markdown", ".txt")
MIN_BODY_CHARS = 40


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
    body = body.strip()
    if len(body) < MIN_BODY_CHARS:
        raise InputError(f"{source}: document body is empty or shorter than {MIN_BODY_CHARS} characters")
    date = meta.pop("date", "")
    if isinstance(date, (_dt.date, _dt.datetime)):
        date = date.isoformat()
    path = Path(doc_id)
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


def load_corpus(folder: str | Path, suffixes: Iterable[str] = TEXT_SUFFIXES) -> list[Document]:
    """Load every text/Markdown file under ``folder``, sorted by id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Corpus folder {folder} does not exist")
    documents = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in tuple(suffixes)):
        try:
            raw = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{file}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
        documents.append(parse_document(raw, file.relative_to(folder).as_posix(), str(file)))
    if not documents:
        raise InputError(f"{folder}: no documents with suffix {tuple(suffixes)} found")
    return documents


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
