"""The TREC DL reproduction (labeler_utils.experiments): its splits, caps, cache, report, and the command itself."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest

from labeler_utils.core.config import PROJECT_ROOT
from labeler_utils.experiments import cli, protocols, report, runner, scoring, students

TREC_DL_2019 = PROJECT_ROOT.parent / "shared" / "benchmarks" / "trec-dl-2019" / "pairs.jsonl"


def _synthetic_benchmark(n_queries: int = 9, pairs_per_query: int = 6) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"query_id": f"q{q}", "query": f"query {q}", "doc_id": f"d{q}-{d}", "document": f"text {d}", "human": d % 4}
            for q in range(n_queries)
            for d in range(pairs_per_query)
        ]
    )


def test_split_holds_every_query_out_on_one_side_only():
    frame = _synthetic_benchmark()
    (split,) = protocols.query_splits(frame, test_fraction=0.5, seed=0)
    assert not split.train_ids & split.test_ids
    assert split.train_ids | split.test_ids == set(frame["query_id"])
    assert protocols.query_splits(frame, 0.5, 0) == [split]  # same seed, same split
    folds = protocols.query_splits(frame, 0.5, 0, kfold=3)
    assert sorted(q for fold in folds for q in fold.test_ids) == sorted(frame["query_id"].unique())
    assert all(not fold.train_ids & fold.test_ids for fold in folds)
    assert protocols.query_splits(frame, 0.5, 0, kfold=3, only=["fold3of3", "fold1of3"]) == [folds[0], folds[2]]
    with pytest.raises(SystemExit, match="fold4of3"):
        protocols.query_splits(frame, 0.5, 0, kfold=3, only=["fold4of3"])


def test_evaluation_subsample_is_capped_per_query_and_reproducible():
    frame = _synthetic_benchmark()
    (split,) = protocols.query_splits(frame, 0.5, 0)
    capped = protocols.evaluation_pairs(frame, split, 2, seed=0)
    assert set(capped["query_id"]) == set(split.test_ids)
    assert capped.groupby("query_id").size().max() == 2
    assert capped.equals(protocols.evaluation_pairs(frame, split, 2, seed=0))
    assert len(protocols.evaluation_pairs(frame, split, None, seed=0)) == 6 * len(split.test_ids)
    sample = protocols.sample_per_query(frame, 4, seed=0)  # the same draw over all queries (notebook 10's quick run)
    assert sample.groupby("query_id").size().tolist() == [4] * 9 and sample.index.is_monotonic_increasing
    assert protocols.sample_per_query(frame, None, seed=0) is frame


def test_per_student_options():
    names = ["minilm-cross-encoder", "smollm2-135m-instruct"]
    assert protocols.parse_per_student("3", names, int) == dict.fromkeys(names, 3)
    assert protocols.parse_per_student("smollm2-135m-instruct=800", names, int) == {"smollm2-135m-instruct": 800}
    assert protocols.parse_per_student(None, names, int) == {}
    with pytest.raises(SystemExit):
        protocols.parse_per_student("gemma3-270m=5", names, int)
    args = cli.options(epochs=1, max_eval_pairs_per_query="smollm2-135m-instruct=10")
    assert protocols.per_student_settings(args, names) == {
        "epochs": dict.fromkeys(names, 1.0),
        "max_train_pairs": {},
        "max_train_pairs_per_query": {},
        "max_eval_pairs_per_query": {"smollm2-135m-instruct": 10},
    }


def test_options_are_the_command_defaults_with_overrides():
    args = cli.options(kfold=2)
    assert vars(args) == vars(cli.build_parser().parse_args(["--kfold", "2"]))
    with pytest.raises(TypeError, match="folds"):
        cli.options(folds=2)


def test_reuses_a_model_only_when_it_was_trained_the_same_way():
    from labeler_utils.students.causal_lm.train import DistillConfig

    config = DistillConfig(base_model="tiny", epochs=2.0, save_steps=50)
    manifest = json.loads(json.dumps(asdict(config)))
    assert runner._same_training({**manifest, "save_steps": 0, "logging_steps": 1}, config)  # bookkeeping only
    assert not runner._same_training({**manifest, "epochs": 1.0}, config)
    older = {k: v for k, v in manifest.items() if k != "class_balance"}  # written before the setting existed
    assert runner._same_training(older, config)
    assert not runner._same_training(older, DistillConfig(base_model="tiny", epochs=2.0, class_balance=True))


def test_says_which_steps_a_resumed_training_time_covers():
    assert report._train_time({"train_seconds": 100.4, "global_steps": 20, "resumed_from": None}) == "100 s"
    resumed = {
        "train_seconds": 90.0,
        "train_active_seconds": 80.2,
        "global_steps": 20,
        "resumed_from": "/x/checkpoint-15",
    }
    assert report._train_time(resumed) == "80 s for steps 16-20 (resumed from a checkpoint)"


def test_share_calibration_uses_only_the_teacher_training_grades():
    frame = _synthetic_benchmark(n_queries=10, pairs_per_query=10)
    frame["recorded:judge"] = [0] * 70 + [3] * 30  # the teacher's grades; "human" must not be read
    (split,) = protocols.query_splits(frame, 0.5, 0)
    held_out = frame[frame["query_id"].isin(split.test_ids)]
    predictions = pd.DataFrame(
        {
            "query_id": held_out["query_id"],
            "doc_id": held_out["doc_id"],
            "grade": pd.array([0] * len(held_out), dtype="Int64"),
            "expected_relevance": np.linspace(0, 1, len(held_out)),
        }
    )
    calibrated = scoring.share_calibrated(predictions, frame.drop(columns="human"), [split], "recorded:judge")
    counts = np.bincount(frame.loc[frame["query_id"].isin(split.train_ids), "recorded:judge"], minlength=4)
    assert (
        np.bincount(calibrated["grade"].astype(int), minlength=4).tolist()
        == (counts * len(held_out) // counts.sum()).tolist()
    )
    assert calibrated["expected_relevance"].equals(predictions["expected_relevance"])  # ranking unchanged
    assert calibrated.loc[calibrated["expected_relevance"].idxmax(), "grade"] == 3


def test_each_student_is_compared_with_the_cosine_of_its_own_encoder():
    frame = _synthetic_benchmark(n_queries=12)
    rng = np.random.default_rng(0)
    minilm, mpnet = (students.COSINES[name].labeler for name in (students.COSINE, students.MPNET_COSINE))
    teacher, mpnet_student, other = "teacher", "mpnet-bi-encoder distilled", "gemma distilled"
    for labeler, noise in ((teacher, 0.3), (minilm, 0.6), (mpnet, 0.5), (mpnet_student, 0.4), (other, 0.7)):
        frame[labeler] = np.where(rng.random(len(frame)) < noise, rng.integers(0, 4, len(frame)), frame["human"])
    labelers = [teacher, minilm, mpnet, mpnet_student, other]
    own = {mpnet_student: mpnet}
    results = scoring.evaluate_set(frame, labelers, teacher, n_boot=20, seed=0, own_cosines=own)
    assert results[mpnet_student]["qwk_minus_cosine"] == results[mpnet_student]["qwk_minus"][mpnet]
    assert results[mpnet_student]["qwk_minus_cosine"]["labeler_b"] == mpnet
    assert results[other]["qwk_minus_cosine"]["labeler_b"] == minilm  # a student without an encoder: MiniLM's
    assert "qwk_minus_cosine" not in results[mpnet] and "qwk_minus_cosine" not in results[minilm]
    assert results[mpnet]["qwk_minus"][minilm]["labeler_b"] == minilm  # the encoders still compared in the table


def test_summary_has_the_headline_keys():
    interval = {"estimate": 0.5, "ci_low": 0.4, "ci_high": 0.6}

    def scored(*rows: tuple[str, float, float | None]) -> dict:
        return {
            name: {
                "metrics": {"qwk": {**interval, "estimate": qwk}, scoring.SPEARMAN: interval},
                **({"qwk_minus_teacher": {"difference": diff}} if diff is not None else {}),
            }
            for name, qwk, diff in rows
        }

    labelers = scored(
        ("recorded:t", 0.58, None),
        (students.COSINE_LABELER, 0.4, -0.18),
        ("minilm-bi-encoder distilled", 0.45, -0.13),
        ("minilm-bi-encoder distilled, share-calibrated", 0.47, -0.11),
    )
    capped = scored(("recorded:t", 0.50, None), ("minilm-cross-encoder distilled", 0.40, -0.10))
    results = {
        "protocol": "5-fold",
        "splits": [{"test_queries": ["a", "b"]}, {"test_queries": ["c"]}],
        "evaluation_sets": [
            {"tag": "all", "title": "All held-out pairs", "pairs": 30, "labelers": labelers},
            {"tag": "cap5", "title": "At most 5", "pairs": 10, "labelers": capped},
        ],
        "command": "x",
        "date": "d",
    }
    summary = report.summary(results, ["minilm-bi-encoder", "minilm-cross-encoder"], "recorded:t")
    assert {"queries", "folds", "teacher_qwk", "default_student", "default_student_qwk", "cosine_qwk"} <= set(summary)
    assert summary["queries"] == 3 and summary["folds"] == 2 and summary["teacher_qwk"] == 0.58
    assert summary["cosine_qwk"] == 0.4 and summary["default_student_qwk"] == 0.45
    bi, cross = summary["students"]["minilm-bi-encoder"], summary["students"]["minilm-cross-encoder"]
    assert bi["qwk_share_calibrated"] == 0.47 and bi["teacher_qwk_same_pairs"] == 0.58
    # a student scored only on the capped set is reported there, against the teacher on those pairs
    assert cross["evaluation_set"] == "At most 5" and cross["qwk"] == 0.40 and cross["teacher_qwk_same_pairs"] == 0.50
    assert summary["best_student"] == "minilm-cross-encoder"  # the smaller gap to the teacher on its own pairs
    assert summary["default_student"] == students.DEFAULT_STUDENT or summary["default_student"] is None


def test_students_each_build_a_config_of_their_family():
    for name, spec in students.STUDENTS.items():
        config = students.student_config(spec, None, seed=3, soft_labels=False, bf16=True)
        assert config.seed == 3, name
    assert students.STUDENTS["minilm-bi-encoder-committee"].label_column("recorded:t") == students.COMMITTEE
    assert (
        students.STUDENTS["minilm-bi-encoder-from-llama3-8b"].label_column("recorded:t") == "recorded:llama3_8b_umbrela"
    )
    assert students.STUDENTS["minilm-bi-encoder"].label_column("recorded:t") == "recorded:t"
    for name in ("mpnet-bi-encoder", "mpnet-cross-encoder"):  # beside the untrained cosine of the same encoder
        spec = students.STUDENTS[name]
        config = students.student_config(spec, None, seed=0, soft_labels=False, bf16=False)
        assert config.base_model == students.COSINES[spec.zero_shot].encoder == "all-mpnet-base-v2", name


def _command(*arguments: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "labeler_utils", "reproduce", *arguments],
        cwd=PROJECT_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=1800,
    )


def test_the_command_lists_its_options_and_every_student():
    result = _command("--help")
    assert result.returncode == 0, result.stderr
    for option in (
        "--pairs",
        "--kfold",
        "--cross-source",
        "--max-train-pairs-per-query",
        "--learning-curve",
        "--work-dir",
    ):
        assert option in result.stdout
    for student in cli.STUDENTS:
        assert student in result.stdout.replace("\n", "").replace(" ", "")
    assert "Protocol" in result.stdout


def _inside(interval: dict) -> bool:
    return interval["ci_low"] - 1e-9 <= interval["estimate"] <= interval["ci_high"] + 1e-9


@pytest.mark.skipif(not TREC_DL_2019.exists(), reason=f"shared TREC DL 2019 pairs not found at {TREC_DL_2019}")
def test_a_two_fold_run_on_six_queries_writes_the_report_and_reuses_its_models(tmp_path, capsys):
    """The default student (bi-encoder, 1 epoch, 4 pairs per query) and the untrained cosine on 6 queries x 12 pairs."""
    lines, per_query = [], Counter()
    with TREC_DL_2019.open() as handle:
        for line in handle:
            query = json.loads(line)["qid"]
            if per_query[query] < 12 and (query in per_query or len(per_query) < 6):
                per_query[query] += 1
                lines.append(line)
    pairs = tmp_path / "trec-dl-2019" / "pairs.jsonl"
    pairs.parent.mkdir()
    pairs.write_text("".join(lines))
    arguments = [
        *("--pairs", str(pairs), "--kfold", "2", "--students", "minilm-bi-encoder", "--epochs", "1"),
        *("--max-train-pairs-per-query", "4", "--n-boot", "50"),
        *("--output", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")),
    ]
    first = _command(*arguments)
    assert first.returncode == 0, first.stderr[-3000:]
    trained = tmp_path / "work" / "minilm-bi-encoder" / "fold1of2"
    assert (trained / "bi_encoder").is_dir() and not (trained / "checkpoints").exists()  # removed after training
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(results) == {
        *("command", "date", "machine", "protocol", "sources", "sources_title", "settings", "splits"),
        *("splits_summary", "students", "evaluation_sets"),
    }
    assert results["command"] == "python -m labeler_utils reproduce " + " ".join(arguments)
    assert (results["protocol"], results["sources"], results["settings"]["teacher"]) == (
        "2-fold",
        ["trec-dl-2019"],
        "recorded:deepseek_v3_umbrela",
    )
    assert [s["name"] for s in results["splits"]] == ["fold1of2", "fold2of2"]
    assert sum(s["test_pairs"] for s in results["splits"]) == len(lines) == 72
    (evaluation,) = results["evaluation_sets"]
    assert (evaluation["tag"], evaluation["pairs"], evaluation["queries"]) == ("all", 72, 6)
    assert list(evaluation["labelers"]) == [
        "recorded:deepseek_v3_umbrela",
        "minilm bi-encoder cosine zero-shot",
        "minilm-bi-encoder distilled",
        "minilm-bi-encoder distilled, share-calibrated",
    ]
    for name, result in evaluation["labelers"].items():
        assert result["n"] + result["n_missing"] == 72
        assert list(result["metrics"]) == list(scoring.METRICS)
        assert all(_inside(m) for m in result["metrics"].values() if not math.isnan(m["ci_low"])), name
    student = evaluation["labelers"]["minilm-bi-encoder distilled"]
    for paired in ("qwk_minus_teacher", "qwk_minus_cosine"):
        difference = student[paired]
        assert difference["ci_low"] - 1e-9 <= difference["difference"] <= difference["ci_high"] + 1e-9, paired
    assert set(evaluation["per_split"]) == {"fold1of2", "fold2of2"}
    trained = results["students"]["minilm-bi-encoder"]["splits"]["fold1of2"]
    assert trained["train"]["train_examples"] <= 4 * 3 and trained["config"]["epochs"] == 1.0
    assert (summary["default_student"], summary["folds"], summary["queries"], summary["pairs"]) == (
        "minilm-bi-encoder",
        2,
        6,
        72,
    )
    assert summary["default_student_qwk"] == student["metrics"]["qwk"]["estimate"]
    for name in ("results.md", "forest_all.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "## All held-out pairs" in (tmp_path / "out" / "results.md").read_text()
    # the cache layout of earlier runs: work/<student>/<split>/, the cosine's cut points named by the teacher
    for fold in ("fold1of2", "fold2of2"):
        assert (tmp_path / "work" / "minilm-bi-encoder" / fold / "bi_encoder").is_dir()
        assert (tmp_path / "work" / "minilm-bi-encoder" / fold / "distilled.all.predictions.jsonl").exists()
        cosine = tmp_path / "work" / "minilm-bi-encoder-cosine" / fold
        assert (cosine / "zero-shot.deepseek_v3_umbrela.all.predictions.jsonl").exists()
    # the same run again (the command's own entry point, as the script calls it) trains nothing: the models and
    # predictions are reused and the numbers are the same
    rerun = cli.main(arguments)
    assert capsys.readouterr().out.count("reusing ") == 2
    assert rerun["evaluation_sets"] == results["evaluation_sets"]
    # other settings on the same work folder are refused, naming the way out
    with pytest.raises(SystemExit, match="trained with other settings or data; pass --force or another --work-dir"):
        cli.main([*arguments, "--epochs", "2", "--output", str(tmp_path / "out2")])
    # the cosine embedded each of the 72 pairs once: one fold's cut points come from the other fold's pairs
    assert json.loads((tmp_path / "work" / "minilm-bi-encoder-cosine" / "cosines.json").read_text())["pairs"] == 72
    # an untrained cosine on its own (a fresh work folder): the same row and numbers, nothing trained
    arguments[arguments.index("minilm-bi-encoder")] = "minilm-cosine"
    cosine_only = cli.main([*arguments[:-1], str(tmp_path / "work0"), "--output", str(tmp_path / "cosine")])
    (only,) = cosine_only["evaluation_sets"]
    assert list(only["labelers"]) == ["recorded:deepseek_v3_umbrela", "minilm bi-encoder cosine zero-shot"]
    cosine_row = evaluation["labelers"]["minilm bi-encoder cosine zero-shot"]
    assert only["labelers"]["minilm bi-encoder cosine zero-shot"] == {**cosine_row, "qwk_minus": {}}
    assert list((tmp_path / "work0").iterdir()) == [tmp_path / "work0" / "minilm-bi-encoder-cosine"]
    assert all("train" not in split for split in cosine_only["students"]["minilm-cosine"]["splits"].values())
    cosine_summary = json.loads((tmp_path / "cosine" / "summary.json").read_text())
    assert cosine_summary["students"]["minilm-cosine"]["qwk"] == cosine_row["metrics"]["qwk"]["estimate"]


def test_a_missing_pairs_file_is_refused_with_the_fetch_command_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="python -m labeler_utils fetch trec-dl-2019"):
        cli.main(["--pairs", str(tmp_path / "absent.jsonl"), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_without_named_students_a_cuda_gpu_trains_the_papers_qlora_student(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert students.default_students() == students.PAPER_STUDENT
    config = students.student_config(students.STUDENTS[students.PAPER_STUDENT], None, 0, False, False)
    assert config.qlora is True and config.base_model == "microsoft/Phi-3.5-mini-instruct"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert students.default_students() == students.DEFAULT_STUDENT == "minilm-bi-encoder"


def test_a_killed_labelling_resumes_with_only_the_missing_pairs(tmp_path, monkeypatch):
    """Labels are appended a chunk at a time; after a crash the same call labels only what is missing, and the
    predictions equal one uninterrupted labelling's, in the records' order."""
    from labeler_utils.benchmarks.predictions import read_predictions
    from labeler_utils.students.bi_encoder import CosineBaseline

    records = [{**r, "grade": r["human"]} for r in _synthetic_benchmark(3, 4).to_dict("records")]
    cosine = CosineBaseline.fit(records, max_length=32)
    labelled: list[int] = []

    class Crashing:  # the real labeler, killed during its second chunk
        def label_records(self, chunk, *args, **kwargs):
            if labelled:
                raise KeyboardInterrupt
            labelled.append(len(chunk))
            return cosine.label_records(chunk, *args, **kwargs)

    class Counting:
        def label_records(self, chunk, *args, **kwargs):
            labelled.append(len(chunk))
            return cosine.label_records(chunk, *args, **kwargs)

    monkeypatch.setattr(runner, "LABEL_CHUNK_PAIRS", 5)
    path = tmp_path / "distilled.all.predictions.jsonl"
    with pytest.raises(KeyboardInterrupt):
        runner.timed_predictions(Crashing, records, "cosine", path, 4, force=False)
    assert not path.exists() and len(path.with_suffix(".partial.jsonl").read_text().splitlines()) == 5
    with path.with_suffix(".partial.jsonl").open("a") as handle:
        handle.write('{"query_id": "q2", "doc_')  # an append the crash cut off
    timing = runner.timed_predictions(Counting, records, "cosine", path, 4, force=False)
    assert labelled == [5, 5, 2] and timing["pairs"] == 12 and timing["labels_per_second"] > 0
    assert not path.with_suffix(".partial.jsonl").exists() and not path.with_suffix(".partial.json").exists()
    resumed = read_predictions(path)
    whole = pd.DataFrame(cosine.label_records(records, "cosine"))
    assert list(resumed["doc_id"]) == [r["doc_id"] for r in records]
    assert list(resumed["grade"]) == list(whole["grade"])
    assert runner.timed_predictions(Crashing, records, "cosine", path, 4, force=False) == timing  # reused as is
