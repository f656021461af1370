"""Every notebook, executed with papermill in the smoke profile, in order, into one run folder.

Real models and a real server: the bundled SmolLM2-135M-Instruct is served by the embedded llama.cpp
OpenAI-compatible server for stages 02-04; stage 05 trains the default student (the bundled MiniLM
cross-encoder) and, in a copy of the run folder, LoRA on SmolLM2-135M. The tests assert on what each
notebook records, not only that it ran.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from labeler_utils.artifacts import read_jsonl
from labeler_utils.config import STAGES
from labeler_utils.pipeline import execute_notebook, stage_metrics

pytestmark = pytest.mark.notebooks


@pytest.fixture(scope="module")
def run_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smoke_run")


def run_stage(run_path: Path, stage: str) -> dict:
    execute_notebook(stage, run_path, {"profile": "smoke"})
    assert (run_path / "notebooks" / f"{stage}.ipynb").exists()
    return stage_metrics(run_path, stage)


def test_00_setup(run_path):
    metrics = run_stage(run_path, "00_setup")
    assert metrics["bundled_models"] == 2 and metrics["torch"].startswith("2.13")


def test_01_seed_documents(run_path):
    metrics = run_stage(run_path, "01_seed_documents")
    assert metrics["documents"] >= 60 and metrics["document_types"] >= 6
    assert len(read_jsonl(run_path / "01_seed_documents" / "documents.jsonl")) == metrics["documents"]


def test_02_query_synthesis(run_path):
    run_stage(run_path, "02_query_synthesis")
    queries = read_jsonl(run_path / "02_query_synthesis" / "queries.jsonl")
    report = json.loads((run_path / "02_query_synthesis" / "filter_report.json").read_text())
    assert queries and all(q["query"].strip() and q["seed_doc_id"] for q in queries)
    assert report  # each filter reports how many queries it removed


def test_03_hard_negatives(run_path):
    run_stage(run_path, "03_hard_negatives")
    pairs = read_jsonl(run_path / "03_hard_negatives" / "pairs.jsonl")
    roles = {p["role"] for p in pairs}
    assert "seed" in roles and "hard_negative" in roles
    assert {p["split"] for p in pairs} <= {"train", "dev"}
    assert (run_path / "03_hard_negatives" / "dataset").is_dir()


def test_04_teacher_labels(run_path):
    metrics = run_stage(run_path, "04_teacher_labels")
    labels = read_jsonl(run_path / "04_teacher_labels" / "labels.jsonl")
    assert metrics["pairs"] == len(labels) > 0
    assert metrics["graded"] + metrics["unparseable_or_failed"] == metrics["pairs"]
    assert metrics["graded"] > 0 and metrics["ledger"]["calls"] > 0
    graded = [lab for lab in labels if lab["grade"] is not None]
    assert all(lab["grade"] in (0, 1, 2, 3) for lab in graded)
    assert all(abs(sum(lab["distribution"]) - 1) < 1e-6 for lab in graded if lab["distribution"])
    assert (run_path / "04_teacher_labels" / "benchmark_predictions_teacher.jsonl").exists()


def assert_distilled(run: Path, metrics: dict) -> None:
    assert metrics["train_examples"] > 0 and metrics["last_logged_loss"] < metrics["first_logged_loss"]
    for name in ("student_zero_shot", "student_distilled"):
        predictions = read_jsonl(run / "05_distill" / f"benchmark_predictions_{name}.jsonl")
        assert len(predictions) == metrics["benchmark_pairs_labeled"]
        assert all(p["grade"] in (0, 1, 2, 3) and abs(sum(p["distribution"]) - 1) < 1e-4 for p in predictions)


def test_05_distill(run_path):
    """The default student family: the MiniLM cross-encoder."""
    metrics = run_stage(run_path, "05_distill")
    assert metrics["family"] == "cross_encoder" and metrics["method"] == "cross-encoder-classification"
    assert (run_path / "05_distill" / "model" / "model.safetensors").exists()
    assert_distilled(run_path, metrics)


def test_06_evaluate(run_path):
    run_stage(run_path, "06_evaluate")
    report = json.loads((run_path / "06_evaluate" / "report.json").read_text())
    text = json.dumps(report)
    for labeler in ("teacher", "student_zero_shot", "student_distilled"):
        assert labeler in text
    assert (run_path / "06_evaluate" / "report.md").exists()


def test_07_throughput_cost(run_path):
    run_stage(run_path, "07_throughput_cost")
    throughput = json.loads((run_path / "07_throughput_cost" / "throughput.json").read_text())
    assert throughput["settings"]["student_model"].endswith("05_distill/model")
    assert throughput["naive_generate_labels_per_second"] is None  # an encoder has no generate()
    assert throughput["student_labels_per_second"] > throughput["teacher_labels_per_second"] > 0
    assert throughput["speedup_vs_teacher"] == pytest.approx(
        throughput["student_labels_per_second"] / throughput["teacher_labels_per_second"], rel=1e-6)


def test_causal_lm_family_through_stages_05_and_07(run_path, tmp_path):
    """One parameter switches stage 05 to LoRA on the bundled SmolLM2-135M; stage 07 then times that student."""
    other_run = tmp_path / "causal_lm_run"
    for stage in STAGES[:5]:
        shutil.copytree(run_path / stage, other_run / stage)
    execute_notebook("05_distill", other_run, {"profile": "smoke", "student_family": "causal_lm"})
    metrics = stage_metrics(other_run, "05_distill")
    assert metrics["family"] == "causal_lm" and metrics["method"] == "lora"
    assert (other_run / "05_distill" / "adapter" / "adapter_config.json").exists()
    assert_distilled(other_run, metrics)
    execute_notebook("07_throughput_cost", other_run, {"profile": "smoke", "teacher_pairs": 1})
    throughput = json.loads((other_run / "07_throughput_cost" / "throughput.json").read_text())
    assert throughput["settings"]["student_model"].endswith("05_distill/adapter")
    assert throughput["naive_generate_labels_per_second"] > 0 and throughput["speedup_vs_naive_generate"] > 0


def test_every_stage_has_a_test():
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_0")}
    assert tested == set(STAGES)
