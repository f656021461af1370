"""Labeling at scale: streaming inputs, bad lines, outputs, and resuming after a kill -9, on a tiny model."""

from __future__ import annotations

import errno
import gzip
import json
import math
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from labeler_utils.__main__ import main
from labeler_utils.benchmarks.loaders import load_trec
from labeler_utils.benchmarks.predictions import read_predictions
from labeler_utils.core.artifacts import InputError
from labeler_utils.labeling import run as labeling_run
from labeler_utils.labeling.inputs import WorkStore
from labeler_utils.labeling.job import ENGINES, LabelSettings, ResumeRefused
from labeler_utils.labeling.outputs import CHUNKS, committed_chunks, plot_chunks, plot_label_mix
from labeler_utils.labeling.run import ENGINE_RUNNERS, label_pairs

DATA = Path(__file__).parent / "data"
PROJECT_ROOT = Path(__file__).parent.parent
WORDS = (
    "vpn error timeout gateway restart travel policy lunch menu pizza expense report the document "
    "answers query relevant"
).split()
GOOD = {"query_id": "q1", "query": "vpn error", "doc_id": "d1", "document": "the vpn gateway error timeout restart"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_pairs(path: Path, n: int, seed: int = 0) -> list[dict]:
    """``n`` pairs with documents of 5-300 words (some longer than a 128-token prompt)."""
    import random

    rng = random.Random(seed)
    rows = [
        {
            "query_id": f"q{i % 37}",
            "query": " ".join(rng.sample(WORDS, 3)),
            "doc_id": f"d{i}",
            "document": " ".join(rng.choices(WORDS, k=rng.randrange(5, 300))),
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def read_labels(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "labels.jsonl").read_text().splitlines()]


def assert_same_labels(first: list[dict], second: list[dict]) -> None:
    assert [(r["query_id"], r["doc_id"]) for r in first] == [(r["query_id"], r["doc_id"]) for r in second]
    for a, b in zip(first, second):
        assert a["grade"] == b["grade"]
        assert a["distribution"] == pytest.approx(b["distribution"], abs=1e-5)


SMALL = LabelSettings(batch_size=4, chunk_size=10, max_length=128)


def test_kill_9_mid_run_then_resume_gives_every_pair_exactly_one_label(tiny_model_dir, tmp_path, capsys):
    pairs_path = tmp_path / "pairs.jsonl"
    pairs = write_pairs(pairs_path, 200)
    out_dir = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "labeler_utils",
        "label",
        "--model",
        str(tiny_model_dir),
        "--input",
        str(pairs_path),
        "--output",
        str(out_dir),
        "--chunk-size",
        "5",
        "--batch-size",
        "1",
        "--max-length",
        "128",
        "--threads",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while committed_chunks(out_dir) == 0 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = committed_chunks(out_dir)
    assert 1 <= killed_at < 40, process.stderr.read().decode()[-2000:]
    assert not (out_dir / "summary.json").exists()

    assert main(command[3:]) == 0  # the same command again (in this process: one interpreter start less)
    assert f"{killed_at} chunk(s) already committed" in capsys.readouterr().out
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["complete"] and summary["pairs_labeled"] == 200 and summary["chunks_done"] == 40
    labels = read_labels(out_dir)
    assert sorted((r["query_id"], r["doc_id"]) for r in labels) == sorted((p["query_id"], p["doc_id"]) for p in pairs)
    assert [r["line"] for r in labels] == list(range(1, 201))
    assert not list((out_dir / CHUNKS).glob(".*.tmp"))

    uninterrupted = tmp_path / "uninterrupted"
    label_pairs(tiny_model_dir, pairs_path, uninterrupted, settings=LabelSettings(1, 5, 128), progress=False)
    assert_same_labels(labels, read_labels(uninterrupted))


def test_max_chunks_stops_and_the_same_call_resumes(tiny_model_dir, tmp_path):
    pairs_path = tmp_path / "pairs.jsonl"
    write_pairs(pairs_path, 45)
    out_dir = tmp_path / "out"
    partial = label_pairs(tiny_model_dir, pairs_path, out_dir, settings=SMALL, max_chunks=2, progress=False)
    assert not partial["complete"] and partial["pairs_labeled"] == 20 and committed_chunks(out_dir) == 2
    assert not (out_dir / "labels.jsonl").exists()
    chunk_times = [(out_dir / CHUNKS / f"chunk-00000{i}.jsonl").stat().st_mtime_ns for i in range(2)]
    summary = label_pairs(tiny_model_dir, pairs_path, out_dir, settings=SMALL, progress=False)
    assert summary["complete"] and summary["pairs_labeled"] == 45 and summary["chunks_done"] == 5
    assert [(out_dir / CHUNKS / f"chunk-00000{i}.jsonl").stat().st_mtime_ns for i in range(2)] == chunk_times
    assert not (out_dir / "work.sqlite").exists()


def test_bfloat16_precision_labels_close_to_float32_and_is_part_of_the_run_identity(tiny_model_dir, tmp_path):
    pairs_path = tmp_path / "pairs.jsonl"
    write_pairs(pairs_path, 20)
    full = label_pairs(tiny_model_dir, pairs_path, tmp_path / "fp32", settings=SMALL, progress=False)
    half = LabelSettings(batch_size=4, chunk_size=10, max_length=128, precision="bfloat16")
    label_pairs(tiny_model_dir, pairs_path, tmp_path / "bf16", settings=half, progress=False)
    fp32, bf16 = read_labels(tmp_path / "fp32"), read_labels(tmp_path / "bf16")
    assert full["pairs_labeled"] == len(bf16) == 20
    assert max(abs(a - b) for x, y in zip(fp32, bf16) for a, b in zip(x["distribution"], y["distribution"])) < 0.1
    with pytest.raises(ResumeRefused, match="precision"):
        label_pairs(tiny_model_dir, pairs_path, tmp_path / "fp32", settings=half, progress=False)
    with pytest.raises(ValueError, match="precision must be one of"):
        LabelSettings(precision="fp8")


def test_a_changed_argument_is_refused_unless_restart(tiny_model_dir, tmp_path):
    pairs_path = tmp_path / "pairs.jsonl"
    write_pairs(pairs_path, 30)
    out_dir = tmp_path / "out"
    label_pairs(tiny_model_dir, pairs_path, out_dir, settings=SMALL, max_chunks=1, progress=False)
    with pytest.raises(ResumeRefused, match=r"chunk_size: 10 -> 15.*--restart"):
        label_pairs(tiny_model_dir, pairs_path, out_dir, settings=LabelSettings(4, 15, 128), progress=False)
    write_pairs(pairs_path, 30, seed=1)  # same name, new content
    with pytest.raises(ResumeRefused, match="input"):
        label_pairs(tiny_model_dir, pairs_path, out_dir, settings=SMALL, progress=False)
    summary = label_pairs(tiny_model_dir, pairs_path, out_dir, settings=SMALL, restart=True, progress=False)
    assert summary["complete"] and summary["pairs_labeled"] == 30


def test_cli_reports_a_refused_resume_and_a_foreign_folder_with_exit_code_2(tiny_model_dir, tmp_path, capsys):
    pairs_path = tmp_path / "pairs.jsonl"
    write_pairs(pairs_path, 12)
    out_dir = tmp_path / "out"

    def label(output: Path, *options: str) -> int:
        return main(
            [
                "label",
                "--model",
                str(tiny_model_dir),
                "--input",
                str(pairs_path),
                "--output",
                str(output),
                "--max-length",
                "128",
                "--chunk-size",
                "5",
                *options,
            ]
        )

    threads_before = torch.get_num_threads()
    assert label(out_dir, "--max-chunks", "1") == 0
    # without --threads: the cores other processes leave free, at least one
    threads = int(re.search(r"labelling with (\d+) torch thread", capsys.readouterr().err).group(1))
    assert 1 <= threads <= len(os.sched_getaffinity(0))
    assert label(out_dir, "--batch-size", "2") == 2
    assert "batch_size: 16 -> 2" in capsys.readouterr().err
    torch.set_num_threads(threads_before)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert label(foreign) == 2
    assert "not empty" in capsys.readouterr().err


BAD_LINES = {
    "malformed JSON": (b'{"query_id": "q9", "query": "vpn error",', "not valid JSON"),
    "not an object": (b'["q9", "vpn error"]', "expected a JSON object"),
    "missing field": (json.dumps({k: v for k, v in GOOD.items() if k != "doc_id"}).encode(), "missing field 'doc_id'"),
    "missing document": (
        json.dumps({**GOOD, "doc_id": "d9", "document": None}).encode(),
        "missing field 'document' (or give --collection",
    ),
    "empty text": (json.dumps({**GOOD, "doc_id": "d9", "document": "  \t "}).encode(), "field 'document' is empty"),
    "wrong type": (json.dumps({**GOOD, "doc_id": "d9", "query": 42}).encode(), "field 'query' must be a string"),
    "non-UTF-8 bytes": (
        b'{"query_id": "q9", "query": "caf\xe9", "doc_id": "d9", "document": "menu"}',
        "not valid UTF-8",
    ),
    "lone surrogate": (
        b'{"query_id": "q9", "query": "vpn \\ud800", "doc_id": "d9", "document": "menu"}',
        "invalid Unicode",
    ),
    "over-long query": (json.dumps({**GOOD, "doc_id": "d9", "query": "vpn " * 40}).encode(), "over the limit of 32"),
    "repeated pair": (json.dumps(GOOD).encode(), "repeats line 1"),
}


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_line_stops_with_file_and_line_or_is_skipped_and_recorded(case, tiny_model_dir, tmp_path):
    bad, reason = BAD_LINES[case]
    pairs_path = tmp_path / "pairs.jsonl"
    good_lines = [json.dumps({**GOOD, "doc_id": f"d{i}"}).encode() for i in (1, 2, 3)]
    pairs_path.write_bytes(b"\n".join([good_lines[0], good_lines[1], b"", bad, good_lines[2]]) + b"\n")
    with pytest.raises(InputError, match=f"{re.escape(str(pairs_path))}:4: .*{re.escape(reason)}"):
        label_pairs(tiny_model_dir, pairs_path, tmp_path / "strict", settings=SMALL, progress=False)
    assert committed_chunks(tmp_path / "strict") == 0

    skip = LabelSettings(batch_size=4, chunk_size=10, max_length=128, skip_bad_lines=True)
    summary = label_pairs(tiny_model_dir, pairs_path, tmp_path / "skip", settings=skip, progress=False)
    assert summary["skipped_lines"] == 1 and summary["pairs_labeled"] == 3 and summary["input_units"] == 4
    skipped = [json.loads(line) for line in (tmp_path / "skip" / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 1 and skipped[0]["line"] == 4 and reason in skipped[0]["reason"]
    assert [r["line"] for r in read_labels(tmp_path / "skip")] == [1, 2, 5]


def test_long_documents_are_truncated_and_counted(tiny_model_dir, tmp_path):
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text(
        "".join(
            json.dumps({**GOOD, "doc_id": f"d{i}", "document": "vpn error " * n}) + "\n"
            for i, n in enumerate((3, 400, 5, 10_000))
        )
    )
    summary = label_pairs(tiny_model_dir, pairs_path, tmp_path / "out", settings=SMALL, progress=False)
    assert summary["truncated_documents"] == 2 and summary["pairs_labeled"] == 4


def test_outputs_jsonl_parquet_qrels_agree_and_read_as_predictions(tiny_model_dir, tmp_path):
    pairs_path = tmp_path / "pairs.jsonl"
    write_pairs(pairs_path, 25)
    out_dir = tmp_path / "out"
    summary = label_pairs(tiny_model_dir, pairs_path, out_dir, settings=SMALL, progress=False)
    labels = read_labels(out_dir)
    table = pq.read_table(out_dir / "labels.parquet").to_pandas()
    assert list(table.columns) == ["query_id", "doc_id", "line", "grade", "expected_relevance", "p0", "p1", "p2", "p3"]
    assert pq.ParquetFile(out_dir / "labels.parquet").num_row_groups == 3  # one per chunk
    assert table["grade"].tolist() == [r["grade"] for r in labels]
    assert table[["p0", "p1", "p2", "p3"]].to_numpy().tolist() == [r["distribution"] for r in labels]
    assert (out_dir / "labels.qrels").read_text().splitlines() == [
        f"{r['query_id']} 0 {r['doc_id']} {r['grade']}" for r in labels
    ]
    predictions = read_predictions(out_dir / "labels.jsonl")
    assert len(predictions) == 25 and predictions["expected_relevance"].between(0, 3).all()
    assert summary["labels_per_second"] > 0 and summary["peak_rss_mb"] > 0
    assert set(summary["outputs"]) == {"jsonl", "parquet", "qrels"}


def test_whitespace_ids_are_refused_before_labeling_and_only_for_qrels(tiny_model_dir, tmp_path):
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "doc_id": "My Documents/report.md"}) + "\n")
    with pytest.raises(
        InputError,
        match=f"{re.escape(str(pairs_path))}:2: doc_id 'My Documents/report.md' "
        "contains whitespace, which TREC qrels cannot hold",
    ):
        label_pairs(tiny_model_dir, pairs_path, tmp_path / "out", settings=SMALL, progress=False)
    assert not (tmp_path / "out").exists()  # refused before labeling: nothing labeled, nothing left behind
    skip = LabelSettings(batch_size=4, chunk_size=10, max_length=128, skip_bad_lines=True)
    summary = label_pairs(tiny_model_dir, pairs_path, tmp_path / "skip", settings=skip, progress=False)
    assert summary["pairs_labeled"] == 1 and summary["skipped_lines"] == 1
    grade = read_labels(tmp_path / "skip")[0]["grade"]
    assert (tmp_path / "skip" / "labels.qrels").read_text().split() == ["q1", "0", "d1", str(grade)]

    summary = label_pairs(
        tiny_model_dir, pairs_path, tmp_path / "out", settings=SMALL, formats=("jsonl",), progress=False
    )
    assert summary["pairs_labeled"] == 2 and not (tmp_path / "out" / "labels.qrels").exists()
    with pytest.raises(InputError, match=f"{re.escape(str(pairs_path))}:2: doc_id"):  # qrels asked for only now
        label_pairs(tiny_model_dir, pairs_path, tmp_path / "out", settings=SMALL, progress=False)


def cli_label(model: Path, pairs_path: Path, output: Path, *options: str) -> int:
    return main(
        [
            "label",
            "--model",
            str(model),
            "--input",
            str(pairs_path),
            "--output",
            str(output),
            "--max-length",
            "128",
            "--chunk-size",
            "5",
            *options,
        ]
    )


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_cli_output_that_is_a_file_or_unwritable_and_a_zero_chunk_size_exit_2(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    pairs_path = tmp_path / "pairs.jsonl"
    write_pairs(pairs_path, 12)
    a_file = tmp_path / "labels.txt"
    a_file.write_text("mine")
    assert cli_label(tiny_model_dir, pairs_path, a_file) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: {a_file}: exists and is not a folder"]

    assert cli_label(tiny_model_dir, pairs_path, tmp_path / "out", "--chunk-size", "0") == 2
    assert error_lines(capsys.readouterr().err) == ["error: chunk_size: must be at least 1, got 0"]
    assert not (tmp_path / "out").exists()

    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    if os.access(read_only, os.W_OK):  # root writes anyway: refuse the lock file the way the OS would
        real_open = Path.open

        def refuse(path: Path, *args, **kwargs):
            if path.parent == read_only:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(Path, "open", refuse)
    assert cli_label(tiny_model_dir, pairs_path, read_only) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: {read_only / '.lock'}: Permission denied"]


def test_cli_full_disk_is_one_error_line_exit_2_and_the_run_resumes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    pairs_path = tmp_path / "pairs.jsonl"
    write_pairs(pairs_path, 12)
    out_dir = tmp_path / "out"
    real_replace = os.replace

    def full_disk(source, target):  # error path only: the second chunk's commit finds the disk full
        if Path(target).name == "chunk-000001.jsonl":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", full_disk)
    assert cli_label(tiny_model_dir, pairs_path, out_dir) == 2
    target = out_dir / CHUNKS / "chunk-000001.jsonl"
    assert error_lines(capsys.readouterr().err) == [f"error: {target}: No space left on device"]
    assert committed_chunks(out_dir) == 1 and not list((out_dir / CHUNKS).glob(".*.tmp"))
    monkeypatch.undo()
    assert cli_label(tiny_model_dir, pairs_path, out_dir) == 0
    assert json.loads((out_dir / "summary.json").read_text())["pairs_labeled"] == 12


def test_cli_full_disk_while_indexing_texts_names_the_work_file(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):  # error path only: what SQLite raises when the disk fills up
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(WorkStore, "load", full_disk)
    out_dir = tmp_path / "out"
    assert (
        cli_label(
            tiny_model_dir,
            DATA / "scale_run.trec",
            out_dir,
            "--collection",
            str(DATA / "scale_collection.tsv"),
            "--topics",
            str(DATA / "scale_topics.tsv"),
        )
        == 2
    )
    assert error_lines(capsys.readouterr().err) == [f"error: {out_dir / 'work.sqlite'}: database or disk is full"]


def disk_full_at_the_work_store(monkeypatch) -> str:
    """SQLite finds the disk full while setting up the work store, after creating its files (error path only)."""
    real_connect = sqlite3.connect

    def connect(path, *args, **kwargs):
        db = real_connect(path, *args, **kwargs)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS half_made (x)")
        db.close()
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(sqlite3, "connect", connect)
    return "{out}/work.sqlite: database or disk is full"


def disk_full_at(name: str, monkeypatch) -> str:
    """The atomic write of the file ``name`` finds the disk full (error path only)."""
    real_replace = os.replace

    def replace(source, target):
        if Path(target).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    return "{out}/" + ("chunks/" if name.startswith("chunk") else "") + f"{name}: No space left on device"


@pytest.mark.parametrize("where", ["work store", "manifest.json", "chunk-000000.jsonl"])
def test_cli_a_full_disk_before_the_first_label_is_one_line_exit_2_and_leaves_nothing(
    where, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    pairs_path = tmp_path / "pairs.jsonl"
    write_pairs(pairs_path, 12)
    out_dir = tmp_path / "out"
    if where == "work store":
        expected = disk_full_at_the_work_store(monkeypatch)
    else:
        expected = disk_full_at(where, monkeypatch)
    assert cli_label(tiny_model_dir, pairs_path, out_dir) == 2
    assert error_lines(capsys.readouterr().err) == ["error: " + expected.format(out=out_dir)]
    assert not out_dir.exists()  # no .lock, manifest.json or work.sqlite* of a run that labeled nothing
    monkeypatch.undo()
    assert cli_label(tiny_model_dir, pairs_path, out_dir) == 0


def test_gzipped_pairs_runs_topics_collections_and_qrels_are_read_decompressed(tiny_model_dir, tmp_path):
    def gzipped(source: Path) -> Path:
        target = tmp_path / f"{source.name}.gz"
        target.write_bytes(gzip.compress(source.read_bytes()))
        return target

    pairs_path = tmp_path / "pairs.jsonl"
    write_pairs(pairs_path, 12)
    summary = label_pairs(tiny_model_dir, gzipped(pairs_path), tmp_path / "gz", settings=SMALL, progress=False)
    label_pairs(tiny_model_dir, pairs_path, tmp_path / "plain", settings=SMALL, progress=False)
    assert summary["format"] == "jsonl" and summary["pairs_labeled"] == 12
    assert_same_labels(read_labels(tmp_path / "gz"), read_labels(tmp_path / "plain"))

    texts = {"collection": gzipped(DATA / "scale_collection.jsonl"), "topics": gzipped(DATA / "scale_topics.tsv")}
    run = gzipped(DATA / "scale_run.trec")
    summary = label_pairs(tiny_model_dir, run, tmp_path / "run", settings=SMALL, progress=False, **texts)
    assert summary["format"] == "trec" and summary["pairs_labeled"] == 6 and summary["duplicate_pairs"] == 3

    trec = DATA / "trec"
    plain = load_trec(trec / "qrels.txt", trec / "topics.tsv", trec / "collection.tsv")
    from_gz = load_trec(gzipped(trec / "qrels.txt"), gzipped(trec / "topics.tsv"), gzipped(trec / "collection.tsv"))
    assert from_gz.equals(plain) and len(plain) > 0

    damaged = tmp_path / "damaged.jsonl.gz"
    damaged.write_bytes(gzip.compress(pairs_path.read_bytes())[:200])
    with pytest.raises(InputError, match=f"{re.escape(str(damaged))}:\\d+: not a readable gzip file"):
        label_pairs(tiny_model_dir, damaged, tmp_path / "damaged", settings=SMALL, progress=False)
    assert not (tmp_path / "damaged").exists()


@pytest.fixture
def student_never_loads(monkeypatch) -> None:
    """Input errors must come before the student loads: loading it fails the test."""

    def load_student(*args, **kwargs):
        raise AssertionError("the student was loaded before the input was checked")

    monkeypatch.setattr(labeling_run, "load_labeler_for_run", load_student)


BAD_BEFORE_LOADING = {
    "malformed JSON": ([json.dumps(GOOD), '{"query_id": "q2",'], (), "pairs.jsonl:2: not valid JSON"),
    "missing document": (
        [json.dumps(GOOD), json.dumps({k: v for k, v in GOOD.items() if k != "document"})],
        (),
        "pairs.jsonl:2: missing field 'document' (or give --collection",
    ),
    "zero-width space in an id": (
        [json.dumps({**GOOD, "query_id": "q\u200b001"})],
        ("--formats", "jsonl"),
        "pairs.jsonl:1: query_id 'q\\u200b001' contains U+200B (ZERO WIDTH SPACE), an invisible character",
    ),
    "ideographic space in an id": (
        [json.dumps({**GOOD, "doc_id": "d\u30001"})],
        (),
        "pairs.jsonl:1: doc_id 'd\\u30001' contains whitespace, which TREC qrels cannot hold",
    ),
    "no input lines": (["", " "], (), "pairs.jsonl: no input lines"),
    "--max-chunks 0": ([json.dumps(GOOD)], ("--max-chunks", "0"), "max_chunks: must be at least 1, got 0"),
}


@pytest.mark.parametrize("case", BAD_BEFORE_LOADING)
def test_cli_bad_input_and_arguments_are_refused_before_the_student_loads(
    case, student_never_loads, tiny_model_dir, tmp_path, capsys
):
    lines, options, message = BAD_BEFORE_LOADING[case]
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text("".join(line + "\n" for line in lines))
    assert cli_label(tiny_model_dir, pairs_path, tmp_path / "out", *options) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: {tmp_path}/{message}" if "pairs.jsonl" in message else f"error: {message}"), line
    assert not (tmp_path / "out").exists()


def test_cli_a_run_whose_every_line_is_skipped_fails_with_the_count(tiny_model_dir, tmp_path, capsys):
    parquet_path = tmp_path / "pairs.parquet"
    pq.write_table(
        pa.table({"query_id": ["q1", "q2", "q3"], "query": ["vpn", "lunch", "pizza"], "doc_id": ["d1"] * 3}),
        parquet_path,
    )
    assert cli_label(tiny_model_dir, parquet_path, tmp_path / "out", "--skip-bad-lines") == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: {parquet_path}: all 3 row(s) are bad, nothing to label; the first: {parquet_path}: row 1: "
        "missing field 'document' (or give --collection to look it up by id)"
    ]
    assert not (tmp_path / "out").exists()


def test_cli_says_once_how_many_documents_were_cut_instead_of_the_tokenizer_warning(tiny_model_dir, tmp_path):
    """The tokenizer's own limit is --max-length here: measuring a longer prompt, transformers warns of indexing
    errors although the prompt is cut before the model reads it."""
    model = tmp_path / "model"
    model.mkdir()
    for file in tiny_model_dir.iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "model_max_length": 128}))
    pairs_path = tmp_path / "pairs.jsonl"
    write_pairs(pairs_path, 12)
    command = [sys.executable, "-m", "labeler_utils", "label", "--model", str(model), "--input", str(pairs_path)]
    command += ["--output", str(tmp_path / "out"), "--max-length", "128", "--threads", "1", "--formats", "jsonl"]
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cut = json.loads((tmp_path / "out" / "summary.json").read_text())["truncated_documents"]
    assert 0 < cut < 12 and "Token indices sequence length" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "cut from their end" in line]
    assert lines == [
        f"{cut} document(s) did not fit in 128 tokens and were cut from their end (truncated_documents in summary.json)"
    ]


def test_refused_runs_leave_nothing_behind(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match=f"{re.escape(str(empty))}: no input lines"):
        label_pairs(tiny_model_dir, empty, tmp_path / "new", settings=SMALL, progress=False)
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(InputError, match="no input lines"):
        label_pairs(tiny_model_dir, empty, kept, settings=SMALL, progress=False)
    assert list(kept.iterdir()) == []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    pairs_path = tmp_path / "pairs.jsonl"  # a good input: the empty one is refused before the folder is looked at
    write_pairs(pairs_path, 3)
    with pytest.raises(ResumeRefused, match="not empty"):
        label_pairs(tiny_model_dir, pairs_path, foreign, settings=SMALL, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_outputs_get_the_mode_the_umask_allows(tiny_model_dir, tmp_path):
    pairs_path = tmp_path / "pairs.jsonl"
    write_pairs(pairs_path, 12)
    old = os.umask(0o027)
    try:
        label_pairs(tiny_model_dir, pairs_path, tmp_path / "out", settings=SMALL, progress=False)
    finally:
        os.umask(old)
    modes = {
        p.relative_to(tmp_path / "out").as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in (tmp_path / "out").rglob("*")
        if p.is_file()
    }
    assert {"manifest.json", "summary.json", "labels.jsonl", "labels.parquet", "chunks/chunk-000000.jsonl"} <= set(
        modes
    )
    assert set(modes.values()) == {0o640}


def test_parquet_input_is_read_by_batches_and_labels_like_jsonl(tiny_model_dir, tmp_path):
    pairs_path = tmp_path / "pairs.jsonl"
    rows = write_pairs(pairs_path, 23)
    parquet_path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet_path, row_group_size=7)
    from_parquet = label_pairs(tiny_model_dir, parquet_path, tmp_path / "pq", settings=SMALL, progress=False)
    label_pairs(tiny_model_dir, pairs_path, tmp_path / "jsonl", settings=SMALL, progress=False)
    assert from_parquet["format"] == "parquet" and from_parquet["pairs_labeled"] == 23
    assert_same_labels(read_labels(tmp_path / "pq"), read_labels(tmp_path / "jsonl"))

    pq.write_table(pa.Table.from_pylist([*rows[:2], {**rows[2], "document": None}]), parquet_path)
    with pytest.raises(InputError, match=f"{parquet_path}: row 3: missing field 'document'"):
        label_pairs(tiny_model_dir, parquet_path, tmp_path / "bad", settings=SMALL, progress=False)
    pq.write_table(pa.table({"query": ["vpn"], "document": ["menu"]}), parquet_path)
    with pytest.raises(InputError, match=r"missing column\(s\) \['query_id', 'doc_id'\]"):
        label_pairs(tiny_model_dir, parquet_path, tmp_path / "bad2", settings=SMALL, progress=False)


@pytest.mark.parametrize("collection", ["scale_collection.tsv", "scale_collection.jsonl"])
def test_trec_run_labels_each_distinct_pair_once(collection, tiny_model_dir, tmp_path):
    summary = label_pairs(
        tiny_model_dir,
        DATA / "scale_run.trec",
        tmp_path / "out",
        collection=DATA / collection,
        topics=DATA / "scale_topics.tsv",
        settings=SMALL,
        progress=False,
    )
    assert summary["format"] == "trec" and summary["input_units"] == 9
    assert summary["pairs_labeled"] == 6 and summary["duplicate_pairs"] == 3 and summary["skipped_lines"] == 0
    qrels = [line.split() for line in (tmp_path / "out" / "labels.qrels").read_text().splitlines()]
    assert [(q, d) for q, _, d, _ in qrels] == [
        ("101", "d1"),
        ("101", "d2"),
        ("102", "d2"),
        ("102", "d1"),
        ("103", "d3"),
        ("103", "d1"),
    ]
    assert all(zero == "0" and grade in "0123" for _, zero, _, grade in qrels)


def test_trec_run_with_an_unknown_document_or_bad_line(tiny_model_dir, tmp_path):
    run = tmp_path / "run.trec"
    run.write_text((DATA / "scale_run.trec").read_text() + "103 Q0 d77 3 0.1 dense\n")
    common = {"collection": DATA / "scale_collection.tsv", "topics": DATA / "scale_topics.tsv", "progress": False}
    with pytest.raises(InputError, match=f"{run}:10: doc_id 'd77' is not in the --collection file"):
        label_pairs(tiny_model_dir, run, tmp_path / "strict", settings=SMALL, **common)
    run.write_text(run.read_text() + "101 Q0 d4\n")
    with pytest.raises(InputError, match=f"{run}:11: expected 6 whitespace-separated fields"):  # found before d77:
        label_pairs(tiny_model_dir, run, tmp_path / "strict", settings=SMALL, **common)  # no lookup before loading
    skip = LabelSettings(batch_size=4, chunk_size=10, max_length=128, skip_bad_lines=True)
    summary = label_pairs(tiny_model_dir, run, tmp_path / "skip", settings=skip, **common)
    assert summary["skipped_lines"] == 2 and summary["pairs_labeled"] == 6
    assert "expected 6 whitespace-separated fields" in (tmp_path / "skip" / "skipped.jsonl").read_text()
    with pytest.raises(ValueError, match="needs --topics"):
        label_pairs(tiny_model_dir, run, tmp_path / "x", collection=DATA / "scale_collection.tsv", progress=False)


def test_jsonl_pairs_may_take_documents_from_a_collection(tiny_model_dir, tmp_path):
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text(
        "".join(json.dumps({"query_id": "q1", "query": "vpn error", "doc_id": d}) + "\n" for d in ("d1", "d3"))
    )
    summary = label_pairs(
        tiny_model_dir,
        pairs_path,
        tmp_path / "out",
        collection=DATA / "scale_collection.tsv",
        settings=SMALL,
        progress=False,
    )
    assert summary["pairs_labeled"] == 2


def test_a_collection_with_a_repeated_id_names_both_lines(tiny_model_dir, tmp_path):
    collection = tmp_path / "collection.tsv"
    collection.write_text("d1\tvpn error\nd2\tlunch menu\nd1\tpizza\n")
    with pytest.raises(InputError, match=f"{collection}:3: id 'd1' is given twice \\(first at {collection}:1\\)"):
        label_pairs(
            tiny_model_dir,
            DATA / "scale_run.trec",
            tmp_path / "out",
            collection=collection,
            topics=DATA / "scale_topics.tsv",
            settings=SMALL,
            progress=False,
        )


def test_plot_chunks_shows_speed_and_memory_per_chunk():
    metas = [
        {"index": i, "labels": 64, "seconds": seconds, "peak_rss_mb": rss}
        for i, (seconds, rss) in enumerate([(2.0, 500.0), (4.0, 510.0), (0.0, 505.0)])
    ]
    speed_ax, memory_ax = plot_chunks(iter(metas)).axes
    (speed,) = speed_ax.lines
    assert list(speed.get_xdata()) == [0, 1, 2] and list(speed.get_ydata())[:2] == [32.0, 16.0]
    assert math.isnan(speed.get_ydata()[2])  # a chunk of no measurable time has no rate
    assert list(memory_ax.lines[0].get_ydata()) == [500.0, 510.0, 505.0] and memory_ax.get_ylim() == (0, 612.0)


def test_plot_label_mix_counts_every_grade_and_the_expected_relevance():
    import pandas as pd

    labels = pd.DataFrame({"grade": [0, 0, 0, 2, 3], "expected_relevance": [0.1, 0.2, 0.4, 2.1, 2.9]})
    grades_ax, expected_ax = plot_label_mix(labels).axes
    assert [bar.get_height() for bar in grades_ax.patches] == [3, 0, 1, 1]  # grade 1, never given, is a zero bar
    assert len(expected_ax.patches) == 30 and sum(bar.get_height() for bar in expected_ax.patches) == 5


def test_every_engine_name_has_a_runner():
    assert set(ENGINE_RUNNERS) == set(ENGINES)
