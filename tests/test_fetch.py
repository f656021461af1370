"""``fetch``: converting the public TREC DL source files, and downloading them from a real local HTTP server."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from labeler_utils.__main__ import main
from labeler_utils.benchmarks import fetch as fetch_module
from labeler_utils.benchmarks.fetch import SOURCES, BenchmarkSource, FetchError, fetch
from labeler_utils.benchmarks.loaders import load_benchmark
from labeler_utils.core.artifacts import InputError
from labeler_utils.core.config import PROJECT_ROOT

SHARED = PROJECT_ROOT.parent / "shared" / "benchmarks"
needs_shared = pytest.mark.skipif(
    not (SHARED / "sources").is_dir(), reason=f"the shared TREC DL source copies are not at {SHARED / 'sources'}"
)
PAIR_FIELDS = ["qid", "docid", "query", "passage", "human", "llm_labels"]


def shared_source(name: str) -> Path:
    return SHARED / "sources" / SOURCES[name].file_name


# --------------------------------------------------------------------------------------------
# A small source file in the published format, and a local server
# --------------------------------------------------------------------------------------------


def source_line(query_id: str, passages: list[tuple[str, str, int, int | None]], query: str = "what is a vpn") -> str:
    """One line of a source file: ``[query id, [judged passages]]`` as the published files write it."""
    return json.dumps(
        [
            query_id,
            [
                {
                    "paragraph_id": doc_id,
                    "text": text,
                    "paragraph": "",
                    "paragraph_data": {
                        "judgments": [
                            {"paragraphId": doc_id, "query": query_id, "relevance": human, "titleQuery": query}
                        ],
                        "rankings": [],
                    },
                    "grades": [{"llm": "deepseek-ai/DeepSeek-V3", "self_ratings": grade, "answer": "##final score"}],
                }
                for doc_id, text, human, grade in passages
            ],
        ]
    )


TINY_LINES = [
    source_line("7", [("d1", "A VPN tunnels traffic.", 3, 2)]),
    source_line("7", [("d2", "Pizza menu.", 0, 0), ("d3", "Private networks…", 2, None)]),
    source_line("9", [("d1", "A VPN tunnels traffic.", 1, 1)], query="vpn error 809"),
]


@pytest.fixture
def tiny_source(monkeypatch: pytest.MonkeyPatch):
    """Registers benchmark ``tiny`` whose published bytes are the gzipped ``lines``; returns the bytes."""

    def register(lines: list[str] = TINY_LINES) -> bytes:
        data = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
        source = BenchmarkSource("tiny.jsonl.gz", len(data), hashlib.sha256(data).hexdigest())
        monkeypatch.setitem(SOURCES, "tiny", source)
        return data

    return register


@contextmanager
def serve(files: dict[str, tuple[bytes, str]]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 answering ``GET /files/<name>`` from ``files``: ``name -> (bytes, how)``,
    ``how`` one of ``whole``, ``cut`` (announces every byte, sends half, closes) or ``short`` (announces and
    sends half). Yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
            name = self.path.removeprefix("/files/")
            if name not in files:
                self.send_error(404, "Not Found")
                return
            data, how = files[name]
            sent = data if how == "whole" else data[: len(data) // 2]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data) if how == "cut" else len(sent)))
            self.end_headers()
            self.wfile.write(sent)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/files"
    finally:
        httpd.shutdown()
        httpd.server_close()


def closed_port_url() -> str:
    """The URL of a port on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/files"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["fetch", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_nothing_written(folder: Path) -> None:
    assert not folder.exists() or list(folder.iterdir()) == []  # no output, no temporary file


# --------------------------------------------------------------------------------------------
# Converting
# --------------------------------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("name, pairs, queries", [("trec-dl-2019", 9259, 43), ("trec-dl-2020", 11385, 54)])
def test_converting_the_source_gives_the_shared_pairs(tmp_path: Path, name: str, pairs: int, queries: int) -> None:
    output = tmp_path / "pairs.jsonl"
    result = fetch(name, output, from_file=shared_source(name))
    assert (result.pairs, result.queries, result.output) == (pairs, queries, output)
    converted = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert all(list(row) == PAIR_FIELDS for row in converted)
    shared = [json.loads(line) for line in (SHARED / name / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    expected = {
        (row["qid"], row["docid"]): {
            **{field: row[field] for field in PAIR_FIELDS[:-1]},
            "llm_labels": {"deepseek_v3_umbrela": row["llm_labels"]["deepseek_v3_umbrela"]},
        }
        for row in shared
        if row["llm_labels"]["deepseek_v3_umbrela"] is not None
    }
    assert len(shared) == pairs + 1 and len(expected) == pairs  # the one pair without a DeepSeek-V3 grade
    assert {(row["qid"], row["docid"]): row for row in converted} == expected

    def by_pair(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.sort_values(["query_id", "doc_id"]).reset_index(drop=True)

    loaded = load_benchmark(output)
    reference = load_benchmark(SHARED / name / "pairs.jsonl")
    reference = reference[reference["recorded:deepseek_v3_umbrela"].notna()][list(loaded.columns)]
    pd.testing.assert_frame_equal(by_pair(loaded), by_pair(reference))


def test_converting_a_small_source_keeps_order_and_a_missing_grade(tmp_path: Path, tiny_source) -> None:
    data = tiny_source()
    source_file = tmp_path / "copy.jsonl.gz"
    source_file.write_bytes(data)
    result = fetch("tiny", tmp_path / "out" / "pairs.jsonl", from_file=source_file)
    rows = [json.loads(line) for line in result.output.read_text(encoding="utf-8").splitlines()]
    assert [(r["qid"], r["docid"], r["human"], r["llm_labels"]["deepseek_v3_umbrela"]) for r in rows] == [
        ("7", "d1", 3, 2),
        ("7", "d2", 0, 0),
        ("7", "d3", 2, None),
        ("9", "d1", 1, 1),
    ]
    assert rows[2]["passage"] == "Private networks…" and rows[3]["query"] == "vpn error 809"
    assert (result.pairs, result.queries) == (4, 2)
    assert load_benchmark(result.output)["recorded:deepseek_v3_umbrela"].isna().sum() == 1


def test_default_output_is_under_the_git_ignored_runs_folder(tmp_path: Path, tiny_source, monkeypatch) -> None:
    monkeypatch.setattr("labeler_utils.core.config.RUNS_DIR", tmp_path / "runs")
    source_file = tmp_path / "copy.jsonl.gz"
    source_file.write_bytes(tiny_source())
    assert fetch("tiny", from_file=source_file).output == tmp_path / "runs" / "benchmarks" / "tiny" / "pairs.jsonl"
    assert fetch_module.default_output("trec-dl-2019").relative_to(fetch_module.config.RUNS_DIR)
    assert "runs/" in (PROJECT_ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.parametrize(
    "lines, message",
    [
        ([TINY_LINES[0], "not json"], r"tiny.jsonl.gz:2: not valid JSON"),
        ([TINY_LINES[0], '{"qid": "1"}'], r"tiny.jsonl.gz:2: expected \[query id, \[judged passages\]\]"),
        ([TINY_LINES[0], '["1", [{"paragraph_id": "d"}]]'], r":2: no field paragraph_data.judgments\[0\]"),
        ([TINY_LINES[0].replace('"self_ratings": 2', '"self_ratings": 7')], r":1 \(self_ratings\): grade 7"),
        ([TINY_LINES[0].replace('"relevance": 3', '"relevance": null')], r":1 \(relevance\): the grade is missing"),
    ],
)
def test_a_garbled_source_names_file_and_line(tmp_path: Path, tiny_source, lines: list[str], message: str) -> None:
    source_file = tmp_path / "tiny.jsonl.gz"
    source_file.write_bytes(tiny_source(lines))
    with pytest.raises(InputError, match=message):
        fetch("tiny", tmp_path / "out" / "pairs.jsonl", from_file=source_file)
    assert_nothing_written(tmp_path / "out")


def test_bytes_that_are_not_gzip_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"plain text, not gzip\n"
    monkeypatch.setitem(SOURCES, "tiny", BenchmarkSource("tiny.jsonl.gz", len(data), hashlib.sha256(data).hexdigest()))
    (tmp_path / "tiny.jsonl.gz").write_bytes(data)
    with pytest.raises(FetchError, match="tiny.jsonl.gz: not a complete gzip file"):
        fetch("tiny", tmp_path / "out" / "pairs.jsonl", from_file=tmp_path / "tiny.jsonl.gz")
    assert_nothing_written(tmp_path / "out")


def test_a_local_copy_is_checked_too(tmp_path: Path, tiny_source) -> None:
    data = tiny_source()
    changed = tmp_path / "changed.jsonl.gz"
    changed.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(FetchError, match=r"changed.jsonl.gz: SHA-256 [0-9a-f]{64} differs from the published"):
        fetch("tiny", tmp_path / "out" / "pairs.jsonl", from_file=changed)
    changed.write_bytes(data + b"\n")
    with pytest.raises(FetchError, match=rf"{len(data) + 1} bytes, expected {len(data)}"):
        fetch("tiny", tmp_path / "out" / "pairs.jsonl", from_file=changed)
    assert_nothing_written(tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Downloading from a local server
# --------------------------------------------------------------------------------------------


@needs_shared
def test_download_of_the_published_file_from_a_local_server(tmp_path: Path, capsys) -> None:
    data = shared_source("trec-dl-2019").read_bytes()
    output = tmp_path / "pairs.jsonl"
    with serve({SOURCES["trec-dl-2019"].file_name: (data, "whole")}) as base_url:
        code, out, err = run_cli(capsys, "trec-dl-2019", "--output", str(output), "--base-url", base_url)
    assert (code, err) == (0, "")
    assert out.startswith(f"{output}: 9259 pairs over 43 queries of trec-dl-2019 (from {base_url}/dl19_")
    from_copy = fetch("trec-dl-2019", tmp_path / "from_copy.jsonl", from_file=shared_source("trec-dl-2019"))
    assert output.read_bytes() == from_copy.output.read_bytes()


def test_download_writes_the_converted_pairs(tmp_path: Path, tiny_source) -> None:
    data = tiny_source()
    with serve({"tiny.jsonl.gz": (data, "whole")}) as base_url:
        result = fetch("tiny", tmp_path / "pairs.jsonl", base_url=base_url)
    assert result.source == f"{base_url}/tiny.jsonl.gz" and result.pairs == 4
    assert len(load_benchmark(result.output)) == 4


@pytest.mark.parametrize(
    "how, changed, message",
    [
        ("whole", True, r"SHA-256 [0-9a-f]{64} differs from the published [0-9a-f]{64}; the file is damaged"),
        ("cut", False, r"the download stopped after \d+ of \d+ bytes; try again"),
        ("short", False, r"the download stopped after \d+ of \d+ bytes; try again"),
    ],
)
def test_a_corrupt_or_cut_off_download_writes_nothing(
    tmp_path: Path, tiny_source, capsys, how: str, changed: bool, message: str
) -> None:
    data = tiny_source()
    served = data[:10] + bytes([data[10] ^ 0xFF]) + data[11:] if changed else data
    output = tmp_path / "out" / "pairs.jsonl"
    with serve({"tiny.jsonl.gz": (served, how)}) as base_url:
        code, out, err = run_cli(capsys, "tiny", "--output", str(output), "--base-url", base_url)
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {base_url}/tiny.jsonl.gz: ")
    assert re.search(message, err)
    assert_nothing_written(tmp_path / "out")


def test_server_down_or_file_missing_is_one_clear_error(tmp_path: Path, tiny_source, capsys) -> None:
    tiny_source()
    output = tmp_path / "out" / "pairs.jsonl"
    code, out, err = run_cli(capsys, "tiny", "--output", str(output), "--base-url", closed_port_url())
    assert (code, out, len(err.splitlines())) == (2, "", 1)
    assert "cannot download (" in err and "--from FILE" in err
    with serve({}) as base_url:
        code, out, err = run_cli(capsys, "tiny", "--output", str(output), "--base-url", base_url)
    assert (code, err) == (2, f"error: {base_url}/tiny.jsonl.gz: the server answered 404 Not Found\n")
    assert_nothing_written(tmp_path / "out")


def test_cli_errors_for_a_bad_name_a_missing_copy_and_an_unwritable_output(tmp_path: Path, tiny_source, capsys):
    code, out, err = run_cli(capsys, "trec-dl-2018", "--output", str(tmp_path / "x.jsonl"))
    assert (code, err) == (2, "error: unknown benchmark 'trec-dl-2018'; choose one of trec-dl-2019, trec-dl-2020\n")
    code, out, err = run_cli(capsys, "trec-dl-2019", "--from", str(tmp_path / "absent.gz"))
    assert (code, err) == (2, f"error: {tmp_path / 'absent.gz'}: cannot read it (No such file or directory)\n")
    source_file = tmp_path / "copy.jsonl.gz"
    source_file.write_bytes(tiny_source())
    (tmp_path / "taken").mkdir()
    code, out, err = run_cli(capsys, "tiny", "--from", str(source_file), "--output", str(tmp_path / "taken"))
    assert (code, err) == (2, f"error: {tmp_path / 'taken'}: is a folder; --output names the pairs file to write\n")
    (tmp_path / "file").write_text("")
    code, out, err = run_cli(capsys, "tiny", "--from", str(source_file), "--output", str(tmp_path / "file" / "x"))
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {tmp_path / 'file'}")
    code, out, err = run_cli(capsys, "tiny", "--from", str(source_file), "--output", str(tmp_path / "ok.jsonl"))
    assert (code, err) == (0, "") and out.startswith(f"{tmp_path / 'ok.jsonl'}: 4 pairs over 2 queries of tiny")


def test_fetch_help_names_the_benchmarks_and_the_default_output(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fetch", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    assert "trec-dl-2019, trec-dl-2020" in text and "runs/benchmarks/BENCHMARK/pairs.jsonl" in text
    assert "git-ignored" in text and "--from FILE" in text
