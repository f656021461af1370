"""Benchmark loaders, query splits and prediction files."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest

from labeler_utils.benchmarks import folds as splits
from labeler_utils.benchmarks import loaders as bm
from labeler_utils.benchmarks import predictions as preds
from labeler_utils.core.artifacts import InputError
from labeler_utils.evaluate import agreement

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "eval_corpus"
TREC_DL_2019 = Path(__file__).resolve().parents[2] / "shared/benchmarks/trec-dl-2019/pairs.jsonl"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def test_demo_format_reads_documents_from_the_corpus() -> None:
    frame = bm.load_pairs_jsonl(DATA / "demo_pairs.jsonl", CORPUS)
    assert frame.columns.tolist() == [*bm.BASE_COLUMNS, "query_type"]
    assert frame["human"].tolist() == [3, 1, 0, 3, 0]
    assert frame["human"].dtype == np.int64
    card = frame.loc[frame["doc_id"] == "it/vpn.md", "document"].iloc[0]
    assert card.startswith("Title: How to Connect to the VPN\nFile: it/vpn.md\n")
    assert "approve the MFA push" in card
    assert frame.groupby("query_id")["query_type"].first().to_dict() == {"q1": "informational", "q2": "navigational"}


def test_trec_dl_format_keeps_recorded_labels() -> None:
    frame = bm.load_pairs_jsonl(DATA / "trec_dl_pairs.jsonl")
    assert bm.recorded_labelers(frame) == ["recorded:judge_a", "recorded:judge_b"]
    assert str(frame["recorded:judge_a"].dtype) == "Int64"
    assert frame["recorded:judge_a"].isna().tolist() == [False, True, False, False, False]
    assert frame.loc[0, ["query_id", "doc_id", "human"]].tolist() == ["101", "7", 3]
    assert frame.loc[0, "document"].startswith("A rainbow is an optical phenomenon")


def test_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    good = '{"qid": 1, "docid": 2, "query": "q", "passage": "p", "human": 1}\n'
    path = write(
        tmp_path / "grade.jsonl",
        good + "\n" + good.replace('"human": 1', '"human": 5').replace('"docid": 2', '"docid": 3'),
    )
    with pytest.raises(InputError, match=rf"{path}:3: grade 5 is not an integer 0-3"):
        bm.load_pairs_jsonl(path)
    path = write(tmp_path / "null.jsonl", good.replace('"human": 1', '"human": null'))
    with pytest.raises(InputError, match=rf"{path}:1: missing or empty field\(s\) \['human'\]"):
        bm.load_pairs_jsonl(path)
    path = write(tmp_path / "twice.jsonl", good + good)
    with pytest.raises(InputError, match=rf"{path}:2: pair \(query '1', document '2'\) is already given at {path}:1"):
        bm.load_pairs_jsonl(path)
    path = write(tmp_path / "label.jsonl", good.replace("}", ', "llm_labels": {"x": 2.5}}'))
    with pytest.raises(InputError, match=rf"{path}:1 \(llm_labels.x\): grade 2.5 is not an integer 0-3"):
        bm.load_pairs_jsonl(path)
    path = write(tmp_path / "other.jsonl", '{"question": "q"}\n')
    with pytest.raises(InputError, match=rf"{path}:1: unknown record format"):
        bm.load_pairs_jsonl(path)
    path = write(tmp_path / "json.jsonl", good + "{not json\n")
    with pytest.raises(InputError, match=rf"{path}:2: not valid JSON"):
        bm.load_pairs_jsonl(path)


def test_demo_format_error_for_a_document_outside_the_corpus(tmp_path: Path) -> None:
    path = write(tmp_path / "demo.jsonl", '{"query_id": "q", "query": "x", "doc_id": "hr/missing.md", "grade": 2}\n')
    with pytest.raises(InputError, match=rf"{path}:1: doc_id 'hr/missing.md' is not a document of the corpus"):
        bm.load_pairs_jsonl(path, CORPUS)


def test_load_trec() -> None:
    frame = bm.load_trec(DATA / "trec/qrels.txt", DATA / "trec/topics.tsv", DATA / "trec/collection.tsv")
    assert frame[["query_id", "doc_id", "human"]].values.tolist() == [
        ["201", "d1", 3],
        ["201", "d2", 0],
        ["202", "d3", 2],
        ["202", "d1", 0],
    ]
    assert frame.loc[1, "document"] == "The Loire is the longest river in France.\td2 has a tab inside"
    assert frame.loc[2, "query"] == "largest ocean"


def test_load_trec_errors(tmp_path: Path) -> None:
    topics, collection = DATA / "trec/topics.tsv", DATA / "trec/collection.tsv"
    qrels = write(tmp_path / "qrels", "201 0 d1 3\n201 0 d2\n")
    with pytest.raises(InputError, match=rf"{qrels}:2: expected 4 whitespace-separated fields, found 3"):
        bm.load_trec(qrels, topics, collection)
    qrels = write(tmp_path / "qrels", "201 0 d1 3\n201 0 d2 -1\n")
    with pytest.raises(InputError, match=rf"{qrels}:2: grade '-1' is not an integer 0-3"):
        bm.load_trec(qrels, topics, collection)
    qrels = write(tmp_path / "qrels", "201 0 x9 3\n201 0 d1 1\n202 0 x8 0\n")
    with pytest.raises(InputError, match=r"2 judged document\(s\) are not in the collection, e.g. \['x8', 'x9'\]"):
        bm.load_trec(qrels, topics, collection)
    qrels = write(tmp_path / "qrels", "999 0 d1 3\n")
    with pytest.raises(InputError, match=rf"{qrels}:1: query '999' is not in the topics file"):
        bm.load_trec(qrels, topics, collection)
    bad_topics = write(tmp_path / "topics", "201 no tab here\n")
    with pytest.raises(InputError, match=rf"{bad_topics}:1: expected 2 '\\t'-separated fields, found 1"):
        bm.load_trec(DATA / "trec/qrels.txt", bad_topics, collection)


def hf_dataset() -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "qid": [1, 1, 2],
            "pid": ["a", "b", "a"],
            "text": ["q one", "q one", "q two"],
            "passage": ["doc a", "doc b", "doc a"],
            "label": [2, 0, 3],
            "gpt": [2, None, 1],
        }
    )


HF_COLUMNS = {
    "qid": "query_id",
    "pid": "doc_id",
    "text": "query",
    "passage": "document",
    "label": "human",
    "gpt": "recorded:gpt",
}


def test_load_hf_dataset_from_memory_and_disk(tmp_path: Path) -> None:
    frame = bm.load_hf_dataset(hf_dataset(), column_map=HF_COLUMNS)
    assert frame["query_id"].tolist() == ["1", "1", "2"]
    assert frame["recorded:gpt"].tolist()[0] == 2 and frame["recorded:gpt"].isna().tolist() == [False, True, False]
    datasets.DatasetDict({"test": hf_dataset()}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"choose a split with split=...; splits are \['test'\]"):
        bm.load_hf_dataset(tmp_path / "saved", column_map=HF_COLUMNS)
    loaded = bm.load_benchmark({"dataset": tmp_path / "saved", "split": "test", "column_map": HF_COLUMNS})
    pd.testing.assert_frame_equal(loaded, frame)
    with pytest.raises(InputError, match=r"dataset row 2 \(human\): grade 7 is not an integer 0-3"):
        bm.load_hf_dataset(
            hf_dataset().map(lambda r: {"label": 7 if r["qid"] == 2 else r["label"]}), column_map=HF_COLUMNS
        )
    with pytest.raises(InputError, match=r"missing column\(s\) \['query_id'"):
        bm.load_hf_dataset(hf_dataset())


def test_load_ir_dataset_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ir_datasets", None)  # import fails
    with pytest.raises(RuntimeError, match=r"ir_datasets is not installed.*needs network access.*load_trec"):
        bm.load_ir_dataset("msmarco-passage/trec-dl-2019/judged")


def test_load_ir_dataset_converts_and_reports_download_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    record = types.SimpleNamespace
    doc = record(default_text=lambda: "passage text")
    dataset = record(
        queries_iter=lambda: [record(query_id="1", text="a query")],
        qrels_iter=lambda: [record(query_id="1", doc_id="p1", relevance=2)],
        docs_store=lambda: record(get_many=lambda ids: {i: doc for i in ids}),
    )

    def load(dataset_id: str) -> object:
        if dataset_id == "offline":
            raise ConnectionError("no route to host")
        return dataset

    monkeypatch.setitem(sys.modules, "ir_datasets", types.SimpleNamespace(load=load))
    frame = bm.load_benchmark("ir_datasets:some/id")
    assert frame.iloc[0][list(bm.BASE_COLUMNS)].tolist() == ["1", "a query", "p1", "passage text", 2]
    with pytest.raises(RuntimeError, match=r"could not load 'offline': no route to host.*network access"):
        bm.load_ir_dataset("offline")


def test_load_benchmark_dispatch(tmp_path: Path) -> None:
    frame = bm.load_benchmark(DATA / "trec_dl_pairs.jsonl")
    pd.testing.assert_frame_equal(bm.load_benchmark(frame), frame)
    pd.testing.assert_frame_equal(
        bm.load_benchmark(str(DATA / "demo_pairs.jsonl"), CORPUS),
        bm.load_pairs_jsonl(DATA / "demo_pairs.jsonl", CORPUS),
    )
    trec = {
        "qrels": DATA / "trec/qrels.txt",
        "topics": DATA / "trec/topics.tsv",
        "collection": DATA / "trec/collection.tsv",
    }
    assert len(bm.load_benchmark(trec)) == 4
    with pytest.raises(FileNotFoundError, match="no such benchmark"):
        bm.load_benchmark(tmp_path / "absent.tsv")
    with pytest.raises(TypeError, match="Cannot load a benchmark from a int"):
        bm.load_benchmark(3)


# --------------------------------------------------------------------------------------------
# Splits by query
# --------------------------------------------------------------------------------------------


def query_table(n_queries: int = 20) -> pd.DataFrame:
    rows = [
        {"query_id": f"q{q}", "query": "x", "doc_id": f"d{d}", "document": "y", "human": d % 4}
        for q in range(n_queries)
        for d in range(q % 5 + 1)
    ]
    return pd.DataFrame(rows)


def test_query_split_is_by_query_and_reproducible() -> None:
    frame = query_table()
    train, test = splits.query_split(frame, 0.25, seed=1)
    assert not train & test and train | test == set(frame["query_id"]) and len(test) == 5
    assert splits.query_split(frame, 0.25, seed=1) == (train, test)
    assert splits.query_split(frame, 0.25, seed=2) != (train, test)
    assert splits.query_split(frame.iloc[:2], 0.01)[1]  # each side gets a query
    with pytest.raises(ValueError, match="at least 2 queries"):
        splits.query_split(frame[frame["query_id"] == "q0"], 0.5)


def test_query_kfold_tests_every_query_once() -> None:
    frame = query_table()
    folds = splits.query_kfold(frame, k=3, seed=0)
    tested = [query for _, test in folds for query in test]
    assert sorted(tested) == sorted(set(frame["query_id"]))
    assert all(train == set(frame["query_id"]) - test for train, test in folds)
    with pytest.raises(ValueError, match="k must be within"):
        splits.query_kfold(frame, k=21)


def test_subset_queries_keeps_whole_queries() -> None:
    frame = query_table()
    subset = splits.subset_queries(frame, max_pairs=12, seed=0)
    assert len(subset) <= 12
    sizes = frame.groupby("query_id").size()
    assert subset.groupby("query_id").size().to_dict() == sizes[subset["query_id"].unique()].to_dict()
    pd.testing.assert_frame_equal(subset, splits.subset_queries(frame, max_pairs=12, seed=0))
    assert len(splits.subset_queries(frame, None)) == len(frame)
    assert splits.subset_queries(frame, 0)["query_id"].nunique() == 1


# --------------------------------------------------------------------------------------------
# Prediction files
# --------------------------------------------------------------------------------------------


def benchmark() -> pd.DataFrame:
    return bm.load_pairs_jsonl(DATA / "trec_dl_pairs.jsonl")


def predictions_for(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame[["query_id", "doc_id"]].copy()
    out["grade"] = pd.array([3, None, 0, 2, 3], dtype="Int64")
    out["distribution"] = [[0.0, 0.1, 0.2, 0.7], None, [0.9, 0.1, 0.0, 0.0], [0.1, 0.2, 0.4, 0.3], [0.0, 0.0, 0.5, 0.5]]
    return out


def test_predictions_round_trip_and_attach(tmp_path: Path) -> None:
    frame = benchmark()
    path = tmp_path / "benchmark_predictions_student_distilled.jsonl"
    assert preds.write_predictions(path, predictions_for(frame), labeler="student") == 5
    predictions = preds.read_predictions(path)
    assert predictions["grade"].isna().tolist() == [False, True, False, False, False]
    assert predictions.loc[0, "expected_relevance"] == pytest.approx(2.6)  # from the distribution
    assert set(predictions["labeler"]) == {"student"}
    name = preds.prediction_labeler_name(path)
    assert name == "student_distilled"
    attached = preds.attach_predictions(frame, path, name)
    assert attached[name].tolist()[2:] == [0, 2, 3] and attached[name].isna().sum() == 1
    assert attached[f"{name}:p3"].tolist()[0] == pytest.approx(0.7)
    assert attached[f"{name}:expected"].tolist()[4] == pytest.approx(2.5)
    assert agreement(attached["human"], attached[name])["n_missing"] == 1
    preds.write_predictions(tmp_path / "again.jsonl", predictions)  # the read table writes back as it was
    pd.testing.assert_frame_equal(preds.read_predictions(tmp_path / "again.jsonl"), predictions)


def test_attach_predictions_refuses_missing_pairs_and_name_clashes(tmp_path: Path) -> None:
    frame = benchmark()
    path = tmp_path / "partial.jsonl"
    preds.write_predictions(path, predictions_for(frame).iloc[1:4], labeler="x")
    with pytest.raises(
        InputError, match=rf"{path}: 2 of 5 benchmark pairs have no prediction, e.g. \('101', '7'\), \('102', '10'\)"
    ):
        preds.attach_predictions(frame, path, "x")
    subset = frame.iloc[1:4]  # predictions beyond the benchmark are fine
    assert len(preds.attach_predictions(subset, preds.read_predictions(path), "x")) == 3
    with pytest.raises(ValueError, match=r"already has column\(s\) \['recorded:judge_a'\]"):
        preds.attach_predictions(frame, predictions_for(frame), "recorded:judge_a")


def test_prediction_file_errors_name_file_and_line(tmp_path: Path) -> None:
    line = '{"query_id": "q", "doc_id": "d%d", "grade": 2, "distribution": %s}\n'
    path = write(tmp_path / "p.jsonl", line % (1, "null") + line % (2, "[0.5, 0.5, 0.5, 0]"))
    with pytest.raises(InputError, match=rf"{path}:2: distribution must be non-negative and sum to 1"):
        preds.read_predictions(path)
    path = write(tmp_path / "p.jsonl", line % (1, "[1, 0]"))
    with pytest.raises(InputError, match=rf"{path}:1: distribution must be a list of 4 probabilities"):
        preds.read_predictions(path)
    path = write(tmp_path / "p.jsonl", line % (1, "null") + line % (1, "null"))
    with pytest.raises(InputError, match=rf"{path}:2: prediction for \(query 'q', document 'd1'\) repeats {path}:1"):
        preds.read_predictions(path)
    path = write(tmp_path / "p.jsonl", '{"query_id": "q", "doc_id": "d"}\n')
    with pytest.raises(InputError, match=rf"{path}:1: missing field 'grade'"):
        preds.read_predictions(path)
    path = write(tmp_path / "p.jsonl", '{"query_id": "q", "doc_id": "d", "grade": 1, "expected_relevance": 4}\n')
    with pytest.raises(InputError, match=rf"{path}:1: expected_relevance must be a number within \[0, 3\]"):
        preds.read_predictions(path)


def test_find_prediction_files(tmp_path: Path) -> None:
    for stage, name in (
        ("04_teacher_labels", "teacher"),
        ("05_distill", "student_zero_shot"),
        ("05_distill", "student_distilled"),
    ):
        (tmp_path / stage).mkdir(exist_ok=True)
        write(tmp_path / stage / f"benchmark_predictions_{name}.jsonl", "")
    (tmp_path / "05_distill" / "train_pairs.jsonl").write_text("")
    files = preds.find_prediction_files(tmp_path)
    assert [preds.prediction_labeler_name(f) for f in files] == [
        "student_distilled",
        "student_zero_shot",
        "teacher",
    ]


# --------------------------------------------------------------------------------------------
# The shared TREC DL 2019 file: published agreement of the recorded judges
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not TREC_DL_2019.exists(), reason=f"shared TREC DL 2019 pairs not found at {TREC_DL_2019}")
def test_trec_dl_2019_reproduces_published_agreement() -> None:
    frame = bm.load_benchmark(TREC_DL_2019)
    assert (len(frame), frame["query_id"].nunique()) == (9260, 43)
    assert np.bincount(frame["human"]).tolist() == [5158, 1601, 1804, 697]
    published = {  # acc, kappa, qwk, kappa at grade >= 2 (README of the shared file)
        "recorded:deepseek_v3_umbrela": (0.584, 0.360, 0.597, 0.518),
        "recorded:llama3_8b_umbrela": (0.309, 0.108, 0.311, 0.244),
        "recorded:llama3_8b_basic": (0.327, 0.108, 0.306, 0.233),
    }
    for labeler, values in published.items():
        result = agreement(frame["human"], frame[labeler])
        assert tuple(round(result[m], 3) for m in ("accuracy", "kappa", "qwk", "kappa_binary_ge2")) == values, labeler
    assert agreement(frame["human"], frame["recorded:deepseek_v3_umbrela"])["n_missing"] == 1
