"""Download a public TREC DL benchmark file, check it, and convert it into the project's pairs file.

The TREC Deep Learning 2019 and 2020 passage benchmarks (NIST's human grades, MS MARCO passages) with
DeepSeek-V3's recorded grades are public files of the GitHub repository ``naghmefarzi/umbrella_with_LLMs``,
pinned here to one commit with their size and SHA-256. :func:`fetch` downloads one (or reads a local
copy), refuses it unless both match, converts it and writes the pairs atomically: on any error nothing
is written. The passages are MS MARCO's (Microsoft's terms: non-commercial research use), so the
project downloads them on its user's request and never holds them: the default output is under the
git-ignored ``runs/``.

Source format (gzipped JSON lines, one query and its judged passages a line)::

    ["19335", [{"paragraph_id": "1017759", "text": "<passage>",
                "paragraph_data": {"judgments": [{"relevance": 0, "titleQuery": "<query>", ...}], ...},
                "grades": [{"llm": "deepseek-ai/DeepSeek-V3", "self_ratings": 1, ...}]}, ...]]

Output (what :func:`labeler_utils.benchmarks.load_pairs_jsonl` reads), one pair a line::

    {"qid": ..., "docid": ..., "query": ..., "passage": ..., "human": 0-3,
     "llm_labels": {"deepseek_v3_umbrela": 0-3}}
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..core import config
from ..core.artifacts import InputError, write_jsonl
from ..core.records import parse_grade

BASE_URL = (
    "https://raw.githubusercontent.com/naghmefarzi/umbrella_with_LLMs/"
    "a9e8651562168f2dce37322fc6debfa5b4319c5f/results/rubric_format"
)
TEACHER_LABEL = "deepseek_v3_umbrela"
TIMEOUT_SECONDS = 60
_BLOCK_BYTES = 1 << 16


class FetchError(InputError):
    """A benchmark could not be downloaded, verified or converted; nothing was written."""


@dataclass(frozen=True)
class BenchmarkSource:
    """One public source file: its name under the base URL, size in bytes and SHA-256."""

    file_name: str
    size: int
    sha256: str


SOURCES = {
    "trec-dl-2019": BenchmarkSource(
        "dl19_test_zeroshot_bing_DSV3_rubric.jsonl.gz",
        1_144_440,
        "886920e786f13774796878f581a3ddbf64755ea5010c52da13a73407fcf5e666",
    ),
    "trec-dl-2020": BenchmarkSource(
        "dl20_test_zeroshot_bing_DSV3_rubric.jsonl.gz",
        1_439_224,
        "00179f7f63556f2a25b633bca71a4705961518c94d7c7c6cabef3376a2840bf9",
    ),
}


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch` wrote."""

    benchmark: str
    output: Path
    pairs: int
    queries: int
    source: str


def benchmark_source(name: str) -> BenchmarkSource:
    """The source of a benchmark name; ``FetchError`` listing the known names otherwise."""
    if name not in SOURCES:
        raise FetchError(f"unknown benchmark {name!r}; choose one of {', '.join(SOURCES)}")
    return SOURCES[name]


def default_output(name: str) -> Path:
    """``runs/benchmarks/<name>/pairs.jsonl``: git-ignored, so the project never commits the file."""
    return config.RUNS_DIR / "benchmarks" / name / "pairs.jsonl"


def download(url: str, size: int) -> bytes:
    """The body of ``url``, with a progress bar; at most ``size + 1`` bytes are read (one more shows a
    longer file). ``FetchError`` when the server cannot be reached, answers with an error, or stops early."""
    received = bytearray()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            with tqdm(total=size, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=None) as bar:
                while len(received) <= size:
                    block = response.read(min(_BLOCK_BYTES, size + 1 - len(received)))
                    if not block:
                        break
                    received += block
                    bar.update(len(block))
    except urllib.error.HTTPError as exc:
        raise FetchError(f"{url}: the server answered {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise FetchError(
            f"{url}: cannot download ({exc.reason}); check the network, or download the file elsewhere "
            "and convert it with --from FILE"
        ) from exc
    except http.client.IncompleteRead as exc:
        raise FetchError(
            f"{url}: the download stopped after {len(received) + len(exc.partial)} of {size} bytes; try again"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:  # a reset connection, a timeout mid-transfer
        raise FetchError(
            f"{url}: the download failed after {len(received)} of {size} bytes ({exc}); try again"
        ) from exc
    if len(received) < size:
        raise FetchError(f"{url}: the download stopped after {len(received)} of {size} bytes; try again")
    return bytes(received)


def verify(data: bytes, source: BenchmarkSource, where: str) -> None:
    """``FetchError`` unless ``data`` has the source's size and SHA-256."""
    if len(data) != source.size:
        raise FetchError(f"{where}: {len(data)} bytes, expected {source.size} ({source.file_name} as published)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != source.sha256:
        raise FetchError(
            f"{where}: SHA-256 {digest} differs from the published {source.sha256}; the file is damaged or "
            f"not the pinned {source.file_name}"
        )


def _field(value: Any, path: tuple[str | int, ...], where: str) -> Any:
    """``value[path[0]][path[1]]...``, or ``FetchError`` naming the first missing step."""
    for step in path:
        try:
            value = value[step]
        except (KeyError, IndexError, TypeError):
            shown = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in path)
            raise FetchError(f"{where}: no field {shown.lstrip('.')}") from None
    return value


def convert(data: bytes, where: str) -> Iterator[dict[str, Any]]:
    """The pairs of a source file's bytes (gzipped JSON lines), in file order; errors name ``where`` and the line."""
    try:
        text = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise FetchError(f"{where}: not a complete gzip file ({exc})") from exc
    for line_no, raw in enumerate(text.splitlines(), start=1):
        at = f"{where}:{line_no}"
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FetchError(f"{at}: not valid JSON ({exc})") from exc
        if not (isinstance(record, list) and len(record) == 2 and isinstance(record[1], list)):
            raise FetchError(f"{at}: expected [query id, [judged passages]], got {type(record).__name__}")
        query_id, passages = str(record[0]), record[1]
        for passage in passages:
            judgment = _field(passage, ("paragraph_data", "judgments", 0), at)
            yield {
                "qid": query_id,
                "docid": str(_field(passage, ("paragraph_id",), at)),
                "query": _field(judgment, ("titleQuery",), at),
                "passage": _field(passage, ("text",), at),
                "human": parse_grade(_field(judgment, ("relevance",), at), f"{at} (relevance)"),
                "llm_labels": {
                    TEACHER_LABEL: parse_grade(
                        _field(passage, ("grades", 0, "self_ratings"), at), f"{at} (self_ratings)", allow_missing=True
                    )
                },
            }


def fetch(
    name: str, output: str | Path | None = None, from_file: str | Path | None = None, base_url: str = BASE_URL
) -> FetchResult:
    """Download benchmark ``name`` (or read ``from_file``, a local copy of its source file), verify its
    size and SHA-256, convert it and write the pairs atomically to ``output`` (default
    :func:`default_output`). Raises ``FetchError`` (``InputError`` for a bad grade in the file) when any
    step fails, and then nothing is written."""
    source = benchmark_source(name)
    output = Path(output) if output is not None else default_output(name)
    if output.is_dir():
        raise FetchError(f"{output}: is a folder; --output names the pairs file to write")
    if from_file is not None:
        where = str(from_file)
        try:
            data = Path(from_file).read_bytes()
        except OSError as exc:
            raise FetchError(f"{where}: cannot read it ({exc.strerror or exc})") from exc
    else:
        where = f"{base_url.rstrip('/')}/{source.file_name}"
        data = download(where, source.size)
    verify(data, source, where)
    rows = list(convert(data, where))
    if not rows:
        raise FetchError(f"{where}: no judged pairs")
    write_jsonl(output, rows)
    return FetchResult(name, output, len(rows), len({row["qid"] for row in rows}), where)
