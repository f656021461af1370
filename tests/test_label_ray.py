"""The ray engine of the ``label`` command: the local engine's outputs, a SIGKILL of the driver and a resume,
refused arguments and bad lines, on a local Ray instance with 2 CPUs that the tests start themselves."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from test_label_at_scale import GOOD, PROJECT_ROOT, assert_same_labels, read_labels, write_pairs

from labeler_utils.__main__ import main
from labeler_utils.core.artifacts import InputError
from labeler_utils.labeling.job import Engine, LabelSettings, ResumeRefused
from labeler_utils.labeling.outputs import committed_chunks
from labeler_utils.labeling.ray_engine import Timeline
from labeler_utils.labeling.run import label_pairs

SETTINGS = LabelSettings(batch_size=4, chunk_size=5, max_length=128)
RAY = Engine("ray", workers=2)


# One torch thread in this process, as each actor has (one CPU each): the same arithmetic, the same labels.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.notebooks
# First in this module, before its Ray instance starts: the notebook's kernel starts one of its own.
def test_notebook_08_labels_a_run_folder_with_an_interrupt_and_a_resume_and_on_ray(tiny_model_dir, tmp_path):
    from labeler_utils.documents import load_corpus, save_documents
    from labeler_utils.pipeline import execute_notebook

    documents = load_corpus(PROJECT_ROOT / "data" / "second_domain_corpus")[:10]
    save_documents(documents, tmp_path / "01_seed_documents" / "documents.jsonl")
    queries = [{"query_id": f"q{i}", "query": d.title, "seed_doc_id": d.doc_id} for i, d in enumerate(documents[:4])]
    (tmp_path / "02_query_synthesis").mkdir()
    (tmp_path / "02_query_synthesis" / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    execute_notebook(
        "08_label_at_scale",
        tmp_path,
        {"model": str(tiny_model_dir), "max_length": 128, "chunk_size": 8, "interrupt_after_chunks": 2, "threads": 1},
    )
    metrics = json.loads((tmp_path / "08_label_at_scale" / "metrics.json").read_text())
    assert metrics["pairs_labeled"] == 40 and metrics["resumed_after_chunks"] == 2 and metrics["skipped_lines"] == 0
    assert sum(metrics["grade_counts"].values()) == 40
    # the ray engine beside the local one (2 actors on a local Ray instance): the same pairs, every grade the same
    assert metrics["ray_pairs_labeled"] == 40 and metrics["ray_same_pairs"] and metrics["ray_same_grades"] == 1.0
    assert metrics["ray_labels_per_second"] > 0 and metrics["ray_call_seconds"]["ray_init"] > 0


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance with 2 CPUs for the tests of this module (the engine joins it), shut down at the end."""
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_DEDUP_LOGS", "0")
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        yield ray
        ray.shutdown()


def kill_process_tree(process: subprocess.Popen, descendants: list) -> None:
    """SIGKILL the driver, then what its Ray instance left behind: its process group and any descendant still alive."""
    import psutil

    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(descendants, timeout=30)


def test_the_package_imports_ray_only_when_the_ray_engine_runs():
    code = "import sys, labeler_utils.labeling.ray_engine, labeler_utils.__main__; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_pools_labeling_time_is_the_union_of_the_chunks_intervals():
    busy = Timeline()
    assert [busy.add(*span) for span in [(0, 10), (0, 10.5), (30, 35), (10, 20), (19, 31)]] == [10, 0.5, 5, 9.5, 10]
    assert busy.intervals == [(0, 35)]


def session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_a_driver_that_started_ray_leaves_no_ray_process_behind(tiny_model_dir, tmp_path):
    """``ray.shutdown()`` orphans the actors' workers; the driver adopts and reaps them, so that none outlives it (as a
    live orphan, or as a ``ray::MapWorker <defunct>`` where PID 1 reaps no one)."""
    import psutil

    pytest.importorskip("ray")
    pairs_path = tmp_path / "pairs.jsonl"
    write_pairs(pairs_path, 12)
    options = ["--model", str(tiny_model_dir), "--input", str(pairs_path), "--output", str(tmp_path / "out")]
    options += ["--chunk-size", "4", "--max-length", "128", "--engine", "ray", "--workers", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "labeler_utils", "label", *options],
        cwd=PROJECT_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # every process of its Ray instance is in this session
    )
    _, stderr = process.communicate(timeout=400)
    assert process.returncode == 0, stderr.decode()[-3000:]
    left = [p for p in psutil.process_iter(["name", "status"]) if session_of(p.pid) == process.pid]
    for leftover in left:
        leftover.kill()
    assert [(p.info["name"], p.info["status"]) for p in left] == []


def test_sigkill_of_the_driver_then_the_same_command_resumes_with_every_pair_once(
    tiny_model_dir, tmp_path, request, capsys
):
    """A real kill -9 of a driver that started its own Ray instance; the resume starts Ray again (2 actors now)."""
    import psutil

    pytest.importorskip("ray")
    pairs_path = tmp_path / "pairs.jsonl"
    pairs = write_pairs(pairs_path, 200)
    out_dir = tmp_path / "killed"
    options = ["--model", str(tiny_model_dir), "--input", str(pairs_path), "--output", str(out_dir)]
    options += ["--chunk-size", "5", "--batch-size", "1", "--max-length", "128", "--engine", "ray"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "labeler_utils", "label", *options, "--workers", "1"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the Ray processes it starts can be found and ended
    )
    descendants: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while committed_chunks(out_dir) == 0 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        descendants = psutil.Process(process.pid).children(recursive=True) if process.poll() is None else []
    finally:
        kill_process_tree(process, descendants)
    killed_at = committed_chunks(out_dir)
    assert 1 <= killed_at < 40, process.stderr.read().decode()[-3000:]
    assert not (out_dir / "summary.json").exists() and list((out_dir / "shards").glob("shard-*.jsonl"))

    request.getfixturevalue("ray_instance")  # Ray started again in this process, beside the killed one's leftovers
    assert main(["label", *options, "--workers", "2"]) == 0  # the same run; the worker count is no part of it
    assert f"{killed_at} chunk(s) already committed" in capsys.readouterr().out
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["complete"] and summary["pairs_labeled"] == 200 and summary["chunks_done"] == 40
    assert summary["engine"]["name"] == "ray" and summary["engine"]["workers"] == 2
    labels = read_labels(out_dir)
    assert [r["line"] for r in labels] == list(range(1, 201))
    assert sorted((r["query_id"], r["doc_id"]) for r in labels) == sorted((p["query_id"], p["doc_id"]) for p in pairs)
    assert not (out_dir / "shards").exists() and not list((out_dir / "chunks").glob(".*.tmp"))
    uninterrupted = tmp_path / "uninterrupted"
    label_pairs(tiny_model_dir, pairs_path, uninterrupted, settings=LabelSettings(1, 5, 128), progress=False)
    assert_same_labels(labels, read_labels(uninterrupted))


def test_ray_engine_writes_the_local_engines_outputs_and_skips_and_a_run_may_switch_engines(
    ray_instance, tiny_model_dir, tmp_path, capsys
):
    pairs_path = tmp_path / "pairs.jsonl"
    write_pairs(pairs_path, 23)
    lines = pairs_path.read_bytes().splitlines(keepends=True)
    pairs_path.write_bytes(b"".join([*lines[:7], b'{"query_id": "q9",\n', *lines[7:]]))  # line 8 is bad
    skip = LabelSettings(batch_size=4, chunk_size=5, max_length=128, skip_bad_lines=True)
    local = label_pairs(tiny_model_dir, pairs_path, tmp_path / "local", settings=skip, progress=False)
    on_ray = label_pairs(tiny_model_dir, pairs_path, tmp_path / "ray", settings=skip, engine=RAY, progress=False)
    assert on_ray["engine"] == {**local["engine"], "name": "ray", "workers": 2}
    for key in ("pairs_labeled", "chunks_done", "truncated_documents", "skipped_lines", "labeler_max_length"):
        assert on_ray[key] == local[key], key
    assert on_ray["pairs_labeled"] == 23 and on_ray["skipped_lines"] == 1 and on_ray["input_units"] == 24
    assert on_ray["labels_per_second"] > 0 and on_ray["peak_rss_mb"] > 0
    skipped = [json.loads(line) for line in (tmp_path / "ray" / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 1 and skipped[0]["line"] == 8 and "not valid JSON" in skipped[0]["reason"]
    assert_same_labels(read_labels(tmp_path / "ray"), read_labels(tmp_path / "local"))
    assert 8 not in [r["line"] for r in read_labels(tmp_path / "ray")]
    ids = ["query_id", "doc_id", "line", "grade"]
    tables = [pq.read_table(tmp_path / name / "labels.parquet").to_pandas()[ids] for name in ("local", "ray")]
    assert tables[0].equals(tables[1])
    assert pq.ParquetFile(tmp_path / "ray" / "labels.parquet").num_row_groups == 5  # one per chunk, as local
    assert (tmp_path / "ray" / "labels.qrels").read_text() == (tmp_path / "local" / "labels.qrels").read_text()

    mixed = tmp_path / "mixed"  # two chunks on Ray, the rest with the local engine: one run, the same labels
    partial = label_pairs(tiny_model_dir, pairs_path, mixed, settings=skip, engine=RAY, max_chunks=2, progress=False)
    assert not partial["complete"] and committed_chunks(mixed) == 2 and partial["pairs_labeled"] == 9
    with pytest.raises(ResumeRefused, match=r"batch_size: 4 -> 2"):
        label_pairs(tiny_model_dir, pairs_path, mixed, settings=LabelSettings(2, 5, 128, True), engine=RAY)
    assert label_pairs(tiny_model_dir, pairs_path, mixed, settings=skip, progress=False)["complete"]
    assert_same_labels(read_labels(mixed), read_labels(tmp_path / "local"))

    command = ["label", "--model", str(tiny_model_dir), "--input", str(pairs_path), "--output", str(tmp_path / "x")]
    assert main([*command, "--workers", "2"]) == 2  # a ray option without the ray engine
    assert "options of the ray engine" in capsys.readouterr().err


def test_a_bad_line_stops_the_ray_engine_with_file_and_line_before_ray_starts(tiny_model_dir, tmp_path):
    pairs_path = tmp_path / "pairs.jsonl"
    good = [json.dumps({**GOOD, "doc_id": f"d{i}"}).encode() for i in (1, 2, 3)]
    pairs_path.write_bytes(b"\n".join([good[0], good[1], b"", b'{"query_id": "q9",', good[2]]) + b"\n")
    with pytest.raises(InputError, match=f"{re.escape(str(pairs_path))}:4: not valid JSON"):
        label_pairs(tiny_model_dir, pairs_path, tmp_path / "strict", settings=SETTINGS, engine=RAY, progress=False)
    assert not (tmp_path / "strict").exists()
