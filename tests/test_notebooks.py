"""Every notebook, executed with papermill in the smoke profile, in order, into one run folder.

Real models and a real server: the bundled SmolLM2-135M-Instruct is served by the embedded llama.cpp
OpenAI-compatible server for stages 02-04; stage 05 trains the default student (the bundled MiniLM
fine-tuned as a bi-encoder) and, in a copy of the run folder, LoRA on SmolLM2-135M. The tests assert on what each
notebook records, not only that it ran: the deterministic parts of the smoke run (the demo corpus, the seed documents,
the benchmark subset, the bundled models) equal the values a real smoke run records; what the LLM writes varies a
little between runs, so those counts are checked by invariants (every generated query is kept or removed by exactly one
filter, every pair is labelled once, ...) and recorded numbers against a recomputation from the files the stage wrote.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest

from labeler_utils import hard_negatives as hn
from labeler_utils import text
from labeler_utils.core.artifacts import read_jsonl
from labeler_utils.core.config import DEMO_BENCHMARK_PATH, PROJECT_ROOT, STAGES, get_profile
from labeler_utils.experiments import RECORDED_CEILING_RUNS
from labeler_utils.pipeline import execute_notebook, stage_metrics
from labeler_utils.students.base import LABELER_MANIFEST

pytestmark = pytest.mark.notebooks

SMOKE = get_profile("smoke")
TOL = 1e-9  # a recorded number against the same number recomputed from the stage's files
# The demo corpus in the smoke profile: deterministic, equal in every run (observed in a real smoke run).
DEMO_CORPUS = {"documents": 73, "chunked_passages": 0, "document_types": 10, "authors": 22, "median_words": 279.0}
BENCHMARK_DOCUMENTS_BLOCKED = 63  # benchmark documents and their near-duplicates: never seeds (stage 02)
SEED_DOCUMENTS = 10  # the 73 documents less the 63 blocked (the profile would allow 12)
NEAR_DUPLICATE_PAIRS = 1  # in the demo corpus at shingle Jaccard >= 0.5 (stage 03)
BENCHMARK_SUBSET = {"pairs": 25, "queries": 5}  # the profile's eval_max_pairs, whole queries (stages 04-06)
LABELERS = ("teacher", "student_zero_shot", "student_distilled")  # the demo benchmark records no other judges
# What the bundled SmolLM2-135M writes in the smoke run (two runs gave the same counts; another llama.cpp build or
# thread count may change a few answers, hence the tolerances): value, absolute tolerance.
LLM_COUNTS = {"queries_generated": (16, 4), "queries_kept": (5, 3), "pairs": (15, 9), "benchmark_graded": (25, 3)}
FALSE_NEGATIVE_SAMPLE = 6  # notebook 03's verify_sample_size


def assert_near_smoke_run(metrics: dict, *names: str) -> None:
    for name in names:
        value, tolerance = LLM_COUNTS[name]
        assert metrics[name] == pytest.approx(value, abs=tolerance), name


@pytest.fixture(scope="module")
def run_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smoke_run")


def undefined(value: float | None) -> bool:
    """A statistic the data leave undefined: NaN in metrics.json, null in report.json."""
    return value is None or math.isnan(value)


def run_stage(run_path: Path, stage: str) -> dict:
    execute_notebook(stage, run_path, {"profile": "smoke"})
    assert (run_path / "notebooks" / f"{stage}.ipynb").exists()
    return stage_metrics(run_path, stage)


def test_00_setup(run_path):
    import torch

    metrics = run_stage(run_path, "00_setup")
    assert metrics["bundled_models"] == 2 and metrics["torch"].startswith("2.13")
    assert metrics["profile"] == "smoke" and metrics["cuda"] == torch.cuda.is_available()
    for package in ("torch", "transformers", "peft", "trl", "datasets", "sentence-transformers", "papermill"):
        assert metrics[package] == importlib.metadata.version(package), package


def test_01_seed_documents(run_path):
    metrics = run_stage(run_path, "01_seed_documents")
    assert metrics["documents"] >= 60 and metrics["document_types"] >= 6
    assert len(read_jsonl(run_path / "01_seed_documents" / "documents.jsonl")) == metrics["documents"]
    assert metrics == {**DEMO_CORPUS, "median_words": pytest.approx(DEMO_CORPUS["median_words"], abs=TOL)}


def test_02_query_synthesis(run_path):
    metrics = run_stage(run_path, "02_query_synthesis")
    queries = read_jsonl(run_path / "02_query_synthesis" / "queries.jsonl")
    rejected = read_jsonl(run_path / "02_query_synthesis" / "rejected_queries.jsonl")
    report = json.loads((run_path / "02_query_synthesis" / "filter_report.json").read_text())
    assert queries and all(q["query"].strip() and q["seed_doc_id"] for q in queries)
    assert report  # each filter reports how many queries it removed
    assert (metrics["corpus_documents"], metrics["blocked_documents"], metrics["seed_documents"]) == (
        DEMO_CORPUS["documents"],
        BENCHMARK_DOCUMENTS_BLOCKED,
        SEED_DOCUMENTS,
    )
    # every seed document's answer was parsed, unparseable or a failed call; each parsed one gives up to n queries
    generation = metrics["generation"]
    outcomes = ("documents_with_queries", "documents_unparseable", "documents_failed_call")
    assert sum(generation.get(outcome, 0) for outcome in outcomes) == SEED_DOCUMENTS
    assert metrics["queries_generated"] == (
        SMOKE.queries_per_document * generation.get("documents_with_queries", 0) - generation.get("queries_missing", 0)
    )
    # every generated query is kept or removed by exactly one filter, the filters in a chain
    filters = report["filters"]
    assert metrics["removed_by_filter"] == {row["filter"]: row["removed"] for row in filters}
    assert (
        metrics["queries_generated"]
        == filters[0]["input"]
        == metrics["queries_kept"] + sum(metrics["removed_by_filter"].values())
    )
    assert all(row["input"] == row["kept"] + row["removed"] for row in filters)
    assert [row["input"] for row in filters[1:]] == [row["kept"] for row in filters[:-1]]
    assert metrics["queries_kept"] == filters[-1]["kept"] == len(queries) == sum(report["kept_by_type"].values())
    assert Counter(r["rejected_by"] for r in rejected) == {k: v for k, v in metrics["removed_by_filter"].items() if v}
    assert (
        metrics["roundtrip_fallback_kept"] == filters[-1]["readmitted"] == sum(q["roundtrip_fallback"] for q in queries)
    )
    _, benchmark_doc_ids = hn.read_benchmark(DEMO_BENCHMARK_PATH)
    assert not {q["seed_doc_id"] for q in queries} & benchmark_doc_ids  # benchmark_documents="exclude"
    assert_near_smoke_run(metrics, "queries_generated", "queries_kept")


def test_03_hard_negatives(run_path):
    metrics = run_stage(run_path, "03_hard_negatives")
    pairs = read_jsonl(run_path / "03_hard_negatives" / "pairs.jsonl")
    roles = {p["role"] for p in pairs}
    assert "seed" in roles and "hard_negative" in roles
    assert {p["split"] for p in pairs} <= {"train", "dev"}
    assert (run_path / "03_hard_negatives" / "dataset").is_dir()
    # the pair counts per role and per split add up to the file
    assert (
        metrics["pairs"]
        == len(pairs)
        == sum(metrics["pairs_by_role"].values())
        == sum(metrics["pairs_by_split"].values())
    )
    assert metrics["pairs_by_role"] == Counter(p["role"] for p in pairs)
    assert metrics["pairs_by_split"] == Counter(p["split"] for p in pairs)
    # one seed pair per query, at most the profile's negatives besides it, all of a query's pairs in one split
    query_ids = {p["query_id"] for p in pairs}
    assert Counter(p["query_id"] for p in pairs if p["role"] == "seed") == dict.fromkeys(query_ids, 1)
    assert metrics["queries"] == len(query_ids) <= stage_metrics(run_path, "02_query_synthesis")["queries_kept"]
    assert_near_smoke_run(metrics, "pairs")
    assert max(Counter(p["query_id"] for p in pairs if p["role"] != "seed").values()) <= SMOKE.negatives_per_query
    assert all(len({p["split"] for p in pairs if p["query_id"] == q}) == 1 for q in query_ids)
    assert (metrics["corpus_documents"], metrics["near_duplicate_pairs"]) == (
        DEMO_CORPUS["documents"],
        NEAR_DUPLICATE_PAIRS,
    )
    # no benchmark query and no benchmark document is left (benchmark_documents="exclude")
    benchmark_queries, benchmark_doc_ids = hn.read_benchmark(DEMO_BENCHMARK_PATH)
    assert not {p["doc_id"] for p in pairs} & benchmark_doc_ids
    assert not {text.normalize_query(p["query"]) for p in pairs} & {text.normalize_query(q) for q in benchmark_queries}
    # the false-negative check graded a sample of the negatives
    negatives = metrics["pairs"] - metrics["pairs_by_role"]["seed"]
    assert metrics["false_negatives_sampled"] == min(FALSE_NEGATIVE_SAMPLE, negatives)
    assert (
        0
        <= metrics["false_negatives_found"]
        <= metrics["false_negatives_checked"]
        <= metrics["false_negatives_sampled"]
    )


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
    pairs = read_jsonl(run_path / "03_hard_negatives" / "pairs.jsonl")
    assert [lab["pair_id"] for lab in labels] == [p["pair_id"] for p in pairs]  # every pair labelled once
    assert {int(g): n for g, n in metrics["grade_counts"].items()} == Counter(lab["grade"] for lab in graded)
    assert metrics["with_distribution"] == sum(lab["distribution"] is not None for lab in labels) <= metrics["graded"]
    benchmark = read_jsonl(run_path / "04_teacher_labels" / "benchmark_predictions_teacher.jsonl")
    assert metrics["benchmark_pairs"] == len(benchmark) == BENCHMARK_SUBSET["pairs"]
    assert metrics["benchmark_graded"] == sum(p["grade"] is not None for p in benchmark) > 0
    assert_near_smoke_run(metrics, "benchmark_graded")


def assert_distilled(run: Path, metrics: dict) -> None:
    losses = metrics["epoch_losses"]  # the smoke profile trains 12 steps on 12 pairs: 3 epochs of the same batches
    assert metrics["train_examples"] > 0 and len(losses) >= 2 and losses[-1] < losses[0]
    for name in ("student_zero_shot", "student_distilled"):
        predictions = read_jsonl(run / "05_distill" / f"benchmark_predictions_{name}.jsonl")
        assert len(predictions) == metrics["benchmark_pairs_labeled"]
        assert all(p["grade"] in (0, 1, 2, 3) and abs(sum(p["distribution"]) - 1) < 1e-4 for p in predictions)
    labels = [lab for lab in read_jsonl(run / "04_teacher_labels" / "labels.jsonl") if lab["grade"] is not None]
    assert metrics["train_examples"] == sum(lab.get("split", "train") == "train" for lab in labels)
    assert metrics["benchmark_pairs_labeled"] == BENCHMARK_SUBSET["pairs"]
    assert metrics["first_logged_loss"] > 0 and metrics["train_loss"] > 0 and metrics["train_seconds"] > 0
    dev = any(lab.get("split") == "dev" for lab in labels)
    assert [row["student"] for row in metrics["dev_agreement"]] == (
        ["student_zero_shot", "student_distilled"] if dev else []
    )
    for row in metrics["dev_agreement"]:
        assert 0 <= row["accuracy"] <= 1 and all(undefined(row[k]) or -1 <= row[k] <= 1 for k in ("kappa", "qwk"))
    # it checkpointed every 5 of its 12 steps (the smoke profile) and deleted the checkpoints once it finished
    (manifest,) = (run / "05_distill").glob(f"*/{LABELER_MANIFEST}")
    assert json.loads(manifest.read_text())["config"]["save_steps"] == get_profile("smoke").checkpoint_steps == 5
    assert not (run / "05_distill" / "checkpoints").exists()


def test_05_distill(run_path):
    """The default student family: the MiniLM bi-encoder (CoSENT, thresholds from the teacher's grade shares)."""
    metrics = run_stage(run_path, "05_distill")
    assert metrics["family"] == "bi_encoder" and metrics["method"] == "bi-encoder-cosent"
    assert (run_path / "05_distill" / "bi_encoder" / "model.safetensors").exists()
    assert_distilled(run_path, metrics)


def test_06_evaluate(run_path):
    from sklearn.metrics import cohen_kappa_score

    metrics = run_stage(run_path, "06_evaluate")
    report = json.loads((run_path / "06_evaluate" / "report.json").read_text())
    text = json.dumps(report)
    for labeler in ("teacher", "student_zero_shot", "student_distilled"):
        assert labeler in text
    assert (run_path / "06_evaluate" / "report.md").exists()
    assert {"pairs": metrics["pairs"], "queries": metrics["queries"]} == BENCHMARK_SUBSET
    assert (report["benchmark"]["pairs"], report["benchmark"]["queries"]) == (metrics["pairs"], metrics["queries"])
    curves = sorted((PROJECT_ROOT / "docs" / "results" / "trec_dl_cv").glob("learning_curve*/results.json"))
    recorded_points = sum(len(json.loads(p.read_text())["learning_curve"]["points"]) for p in curves)
    assert metrics["learning_curve_points"] == recorded_points > 0  # the recorded TREC DL learning curves
    assert metrics["labelers"] == list(report["labelers"]) and set(metrics["labelers"]) == set(LABELERS)
    human = {(r["query_id"], r["doc_id"]): r["grade"] for r in read_jsonl(DEMO_BENCHMARK_PATH)}
    stage_of = {"teacher": "04_teacher_labels", "student_zero_shot": "05_distill", "student_distilled": "05_distill"}
    for name, result in report["labelers"].items():
        predictions = read_jsonl(run_path / stage_of[name] / f"benchmark_predictions_{name}.jsonl")
        graded = [p for p in predictions if p["grade"] is not None]
        assert len(predictions) == metrics["pairs"]
        assert result["n"] == len(graded) and result["n"] + result["n_missing"] == metrics["pairs"]
        for metric, interval in result["metrics"].items():
            if not (undefined(interval["estimate"]) or undefined(interval["ci_low"])):
                assert interval["ci_low"] - TOL <= interval["estimate"] <= interval["ci_high"] + TOL, (name, metric)
        for metric in ("accuracy", "kappa", "qwk"):
            recorded, reported = metrics[f"{name} {metric}"], result["metrics"][metric]["estimate"]
            assert recorded == reported or undefined(recorded) and undefined(reported), (name, metric)
        if name == "teacher":
            direct = cohen_kappa_score(
                [human[p["query_id"], p["doc_id"]] for p in graded],
                [p["grade"] for p in graded],
                labels=[0, 1, 2, 3],
                weights="quadratic",
            )
            assert metrics["teacher qwk"] == pytest.approx(direct, abs=TOL, nan_ok=True)


def assert_timed(throughput: dict, teacher_pairs: int) -> None:
    """The smoke plan: every pair at batch sizes 4 and 16, the first 4 for generate(), the first few for the teacher."""
    settings, rows = throughput["settings"], throughput["measurements"]
    pairs = SMOKE.throughput_pairs
    assert (settings["pairs"], settings["batch_sizes"], settings["variants"]) == (pairs, [4, 16], [])
    assert (settings["naive_pairs"], settings["teacher_pairs"]) == (4, teacher_pairs)
    single = [m for m in rows if m["kind"] == "single_pass"]
    assert [(m["batch_size"], m["pairs"]) for m in single] == [(4, pairs), (16, pairs)]
    assert [m["pairs"] for m in rows if m["kind"] == "teacher"] == [teacher_pairs]
    naive = [m["pairs"] for m in rows if m["kind"] == "naive_generate"]
    assert naive == ([4] if throughput["naive_generate_labels_per_second"] is not None else [])
    assert throughput["student_labels_per_second"] == max(m["labels_per_second"] for m in single)
    costs = throughput["cost_per_1000_labels"]
    assert costs["student_single_pass"] > 0 and costs["teacher_measured"] > 0
    assert all(cost is None or cost > 0 for cost in costs.values())


def test_07_throughput_cost(run_path):
    metrics = run_stage(run_path, "07_throughput_cost")
    throughput = json.loads((run_path / "07_throughput_cost" / "throughput.json").read_text())
    assert throughput["settings"]["student_model"].endswith("05_distill/bi_encoder")
    assert throughput["naive_generate_labels_per_second"] is None  # an encoder has no generate()
    assert throughput["student_labels_per_second"] > throughput["teacher_labels_per_second"] > 0
    assert throughput["speedup_vs_teacher"] == pytest.approx(
        throughput["student_labels_per_second"] / throughput["teacher_labels_per_second"], rel=1e-6
    )
    assert_timed(throughput, teacher_pairs=2)
    for key in (
        "student_labels_per_second",
        "student_best_batch_size",
        "naive_generate_labels_per_second",
        "teacher_labels_per_second",
        "speedup_vs_naive_generate",
        "speedup_vs_teacher",
        "cost_ratio_teacher_vs_student",
        "cost_per_1000_labels",
    ):
        assert metrics[key] == throughput[key], key
    costs = throughput["cost_per_1000_labels"]
    assert metrics["cost_ratio_teacher_vs_student"] == pytest.approx(
        costs["teacher_measured"] / costs["student_single_pass"], rel=1e-6
    )


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
    assert_timed(throughput, teacher_pairs=1)


TREC_DL_2019 = PROJECT_ROOT.parent / "shared" / "benchmarks" / "trec-dl-2019" / "pairs.jsonl"
REPRODUCTION = {  # a small real configuration of notebook 10: minutes on a 2-core CPU
    "pairs_path": str(TREC_DL_2019),
    "max_queries": 20,
    "folds": 2,
    "epochs": 1,
    "max_pairs_per_query": 30,
    "max_train_pairs_per_query": 8,
    "n_boot": 200,
}


@pytest.mark.skipif(not TREC_DL_2019.exists(), reason=f"shared TREC DL 2019 pairs not found at {TREC_DL_2019}")
def test_10_reproduce_on_trec_dl(tmp_path):
    """The recorded numbers against the pairs file read directly: the queries, the pairs, the teacher's QWK."""
    from sklearn.metrics import cohen_kappa_score

    stage = "10_reproduce_on_trec_dl"
    execute_notebook(stage, tmp_path, REPRODUCTION)
    metrics = stage_metrics(tmp_path, stage)
    grades = {}  # (query, doc) -> (human, teacher), from the file itself
    for line in TREC_DL_2019.read_text().splitlines():
        pair = json.loads(line)
        grades[pair["qid"], pair["docid"]] = (pair["human"], pair["llm_labels"]["deepseek_v3_umbrela"])
    evaluated = {
        stage_name: [(p["query_id"], p["doc_id"]) for path in paths for p in read_jsonl(path)]
        for stage_name, paths in metrics["predictions"].items()
    }
    pairs = evaluated["distilled"]
    assert len(pairs) == len(set(pairs)) == metrics["pairs"] and set(evaluated["zero-shot"]) == set(pairs)
    queries = {query for query, _ in pairs}
    in_file, evaluated_per_query = Counter(query for query, _ in grades), Counter(query for query, _ in pairs)
    assert len(queries) == metrics["queries"] == REPRODUCTION["max_queries"] and metrics["folds"] == 2
    assert set(pairs) <= set(grades)  # every query held out once, with at most 30 of its pairs
    assert evaluated_per_query == {q: min(REPRODUCTION["max_pairs_per_query"], in_file[q]) for q in queries}
    assert metrics["pairs_loaded"] == metrics["pairs"]

    def teacher_qwk(keys: list[tuple[str, str]]) -> float:
        graded = [grades[key] for key in keys if grades[key][1] is not None]
        return cohen_kappa_score(*zip(*graded), labels=[0, 1, 2, 3], weights="quadratic")

    teacher = "recorded:deepseek_v3_umbrela"
    assert metrics[f"{teacher} qwk"]["estimate"] == pytest.approx(teacher_qwk(pairs), abs=TOL)
    assert metrics["teacher qwk all pairs"]["estimate"] == pytest.approx(teacher_qwk(pairs), abs=TOL)
    labelers = [teacher, "minilm bi-encoder cosine zero-shot", "minilm-bi-encoder distilled"]
    intervals = [metrics[f"{name} qwk"] for name in labelers] + [metrics["teacher qwk all pairs"]]
    assert all(i["ci_low"] - TOL <= i["estimate"] <= i["ci_high"] + TOL for i in intervals)
    for key, other in (("qwk_minus_teacher", teacher), ("qwk_minus_cosine", labelers[1])):
        paired = metrics[key]
        assert (
            paired["labeler_b"] == other and paired["ci_low"] - TOL <= paired["difference"] <= paired["ci_high"] + TOL
        )
    student, baseline = metrics[labelers[2] + " qwk"]["estimate"], metrics[labelers[1] + " qwk"]["estimate"]
    assert metrics["qwk_minus_cosine"]["difference"] == pytest.approx(student - baseline, abs=TOL)
    assert metrics["learning_curve_points"] == 4  # the recorded curve in docs/results/trec_dl_cv/learning_curve
    recorded = [json.loads((folder / "results.json").read_text()) for folder in RECORDED_CEILING_RUNS]
    teachers = [{r["settings"]["teacher"]} for r in recorded]
    labelers = [set().union(*(e["labelers"] for e in r["evaluation_sets"])) - t for r, t in zip(recorded, teachers)]
    assert metrics["ceiling_rows"] == sum(map(len, labelers))  # every recorded labeler but the teacher, once per run
    assert metrics["forest_plot"] == "forest_all.png" and (tmp_path / stage / "forest_all.png").exists()


def test_every_stage_has_a_test():
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_0")}
    assert tested == set(STAGES)
