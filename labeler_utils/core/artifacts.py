"""Reading and writing run artifacts: text lines (gzipped or not) and JSONL with line-precise errors, atomic writes,
and append-only JSONL that survives a crash mid-append."""

from __future__ import annotations

import gzip
import json
import os
import secrets
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


class InputError(ValueError):
    """Bad user input, with the file and line where it was found."""


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path`` and rename it into place on success.

    The file gets the mode the umask allows (0644 under the usual 022; ``mkstemp`` would make it
    0600). An ``OSError`` without a file name (a full disk, say) is raised again naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _create_beside(path)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def follow_umask(folder: str | Path) -> None:
    """Give every file under ``folder`` the mode a new file gets under the umask (0666 less it: readable by all
    under the usual 022). Call it after saving a model: safetensors writes its files 0600 whatever the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for file in Path(folder).rglob("*"):
        if file.is_file() and not file.is_symlink():
            file.chmod(0o666 & ~umask)


def _create_beside(path: Path) -> tuple[int, str]:
    """A new empty file ``.<name>.<random>.tmp`` beside ``path``, created 0666 less the umask."""
    while True:
        tmp_name = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp_name
        except FileExistsError:
            continue


COMPRESSED_SUFFIXES = (".gz",)  # read transparently: "pairs.jsonl.gz" is JSONL


def format_suffix(path: str | Path) -> str:
    """The lower-case suffix that names a file's format, the one before a compression suffix (``a.jsonl.gz``:
    ``.jsonl``)."""
    path = Path(path)
    if path.suffix.lower() in COMPRESSED_SUFFIXES:
        path = path.with_suffix("")
    return path.suffix.lower()


def numbered_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw bytes)`` of each non-blank line of a text file, streamed; a ``.gz`` file is decompressed
    on the fly. ``FileNotFoundError`` naming a missing file, ``InputError`` for a damaged ``.gz``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    compressed = path.suffix.lower() in COMPRESSED_SUFFIXES
    with gzip.open(path, "rb") if compressed else path.open("rb") as handle:
        line_no = 0
        try:
            for line_no, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield line_no, raw
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise InputError(f"{path}:{line_no + 1}: not a readable gzip file ({exc})") from None


def read_jsonl(path: str | Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Read a JSONL file; raise ``InputError`` naming the file and line of any bad record."""
    return list(iter_jsonl(path, required))


def iter_jsonl(path: str | Path, required: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """Stream records from a JSONL file, checking that each has the ``required`` fields."""
    for _, record in iter_jsonl_located(path, required):
        yield record


def iter_jsonl_located(path: str | Path, required: Sequence[str] = ()) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream ``("file:line", record)`` pairs, so later checks can name the line too."""
    for line_no, raw in numbered_lines(path):
        where = f"{path}:{line_no}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{where}: not valid UTF-8 ({exc.reason})") from exc
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [name for name in required if name not in record or record[name] in (None, "")]
        if missing:
            raise InputError(f"{where}: missing or empty field(s) {missing}")
        yield where, record


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Atomically write records as JSONL; returns the number written."""
    count = 0
    with atomic_write(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def append_jsonl(handle: IO[str], records: Iterable[dict[str, Any]]) -> None:
    """Append records to an open JSONL file and force them to disk (a crash loses at most a cut last line)."""
    handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    handle.flush()
    os.fsync(handle.fileno())


def read_appended_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a file written by :func:`append_jsonl`; a last line cut off by a crash is dropped from the file
    (any other bad line raises, naming it)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().splitlines(keepends=True)
    records = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number != len(lines) - 1:
                raise InputError(
                    f"{path}:{number + 1}: not a JSON record; delete the file to start it again"
                ) from error
            with path.open("r+b") as handle:  # the append a crash interrupted
                handle.truncate(sum(len(kept) for kept in lines[:number]))
    return records


def write_json(path: str | Path, payload: Any) -> None:
    """Atomically write pretty JSON."""
    with atomic_write(path) as handle:
        json.dump(payload, handle, indent=2, ensure_ascii=False, default=str)
        handle.write("\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file with an error naming it when it does not parse."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc


def iter_delimited(path: str | Path, n_fields: int, sep: str | None = None) -> Iterator[tuple[str, list[str]]]:
    """``("file:line", fields)`` for each non-blank line of a text table with exactly ``n_fields`` fields.

    ``sep=None`` splits on any whitespace; a separator such as ``"\\t"`` splits at most
    ``n_fields - 1`` times, so the last field may contain it (passage texts). A ``.gz`` file is read decompressed.
    """
    for line_no, raw in numbered_lines(path):
        where = f"{path}:{line_no}"
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise InputError(f"{where}: not valid UTF-8 ({exc.reason})") from exc
        fields = line.split() if sep is None else line.split(sep, n_fields - 1)
        if len(fields) != n_fields:
            shown = "whitespace" if sep is None else repr(sep)
            raise InputError(f"{where}: expected {n_fields} {shown}-separated fields, found {len(fields)}")
        yield where, fields
