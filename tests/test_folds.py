"""Several pair files as one table, query folds, cross-file splits, the stratified pairs-per-query cap."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from labeler_utils.benchmarks import folds
from labeler_utils.core.artifacts import InputError

JUDGES = ("deepseek_v3_umbrela", "llama3_8b_basic")


def write_pairs(path: Path, query_ids: list[str], pairs_per_query: int = 8, judges: tuple[str, ...] = JUDGES) -> Path:
    """A pair file in the TREC DL pairs.jsonl schema (human grade and recorded judges)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for q in query_ids:
            for d in range(pairs_per_query):
                handle.write(
                    json.dumps(
                        {
                            "qid": q,
                            "docid": f"{q}-d{d}",
                            "query": f"query {q}",
                            "passage": f"passage {d}",
                            "human": d % 4,
                            "llm_labels": {j: (d + 1) % 4 for j in judges},
                        }
                    )
                    + "\n"
                )
    return path


@pytest.fixture
def two_files(tmp_path: Path) -> list[Path]:
    return [
        write_pairs(tmp_path / "year-a" / "pairs.jsonl", [f"a{i}" for i in range(6)]),
        write_pairs(tmp_path / "year-b" / "pairs.jsonl", [f"b{i}" for i in range(4)]),
    ]


def test_several_pair_files_are_one_table_with_their_source(two_files):
    frame = folds.load_pair_files(two_files)
    assert len(frame) == 10 * 8 and frame["query_id"].nunique() == 10
    assert frame.groupby(folds.SOURCE_COLUMN)["query_id"].nunique().to_dict() == {"year-a": 6, "year-b": 4}
    assert {"recorded:deepseek_v3_umbrela", "recorded:llama3_8b_basic"} <= set(frame.columns)


def test_a_query_id_in_two_files_is_refused_naming_both(tmp_path, two_files):
    clash = write_pairs(tmp_path / "year-c" / "pairs.jsonl", ["c0", "a3"])
    with pytest.raises(InputError, match=r"year-c/pairs.jsonl: query id 'a3' is also in .*year-a/pairs.jsonl"):
        folds.load_pair_files([*two_files, clash])


def test_files_with_other_recorded_judges_are_refused(tmp_path, two_files):
    other = write_pairs(tmp_path / "year-c" / "pairs.jsonl", ["c0"], judges=("deepseek_v3_umbrela",))
    with pytest.raises(InputError, match=r"year-c/pairs.jsonl: columns \['recorded:llama3_8b_basic'\] differ"):
        folds.load_pair_files([two_files[0], other])
    with pytest.raises(InputError, match="also called 'year-a'"):
        folds.load_pair_files([two_files[0], two_files[0]])


def test_kfold_holds_every_query_out_exactly_once(two_files):
    frame = folds.load_pair_files(two_files)
    splits = folds.kfold_splits(frame, 5, seed=0)
    held_out = Counter(q for split in splits for q in split.test_ids)
    assert set(held_out) == set(frame["query_id"]) and set(held_out.values()) == {1}
    for split in splits:
        assert not split.train_ids & split.test_ids
        assert split.train_ids | split.test_ids == set(frame["query_id"])
    assert folds.kfold_splits(frame, 5, seed=0) == splits  # fixed by the seed
    assert folds.kfold_splits(frame, 5, seed=1) != splits


def test_cross_source_splits_train_on_one_file_and_test_on_the_other(two_files):
    frame = folds.load_pair_files(two_files)
    forward, backward = folds.cross_source_splits(frame)
    assert forward.name == "year-a_to_year-b" and backward.name == "year-b_to_year-a"
    assert forward.train_ids == {f"a{i}" for i in range(6)} and forward.test_ids == {f"b{i}" for i in range(4)}
    assert backward.train_ids == forward.test_ids and backward.test_ids == forward.train_ids
    with pytest.raises(InputError, match="needs two pair files"):
        folds.cross_source_splits(frame[frame[folds.SOURCE_COLUMN] == "year-a"])


def test_a_split_refuses_a_query_on_both_sides():
    with pytest.raises(ValueError, match="on both the training and the test side"):
        folds.Split("bad", frozenset({"q1", "q2"}), frozenset({"q2"}))


def records(grades_by_query: dict[str, list[int]]) -> list[dict]:
    return [
        {"query_id": q, "doc_id": f"{q}-{i}", "grade": g} for q, gs in grades_by_query.items() for i, g in enumerate(gs)
    ]


def test_pairs_per_query_cap_keeps_each_grade_in_proportion():
    data = records({"q1": [0] * 60 + [1] * 20 + [2] * 15 + [3] * 5, "q2": [0] * 3 + [3] * 2, "q3": [0] * 97 + [3] * 3})
    capped = folds.cap_pairs_per_query(data, 20, seed=0)
    by_query = {q: Counter(r["grade"] for r in capped if r["query_id"] == q) for q in ("q1", "q2", "q3")}
    assert by_query["q1"] == {0: 12, 1: 4, 2: 3, 3: 1}  # 60/20/15/5 of 100 -> 12/4/3/1 of 20
    assert by_query["q2"] == {0: 3, 3: 2}  # under the cap: kept whole
    assert by_query["q3"] == {0: 19, 3: 1}  # 3% of 20 is 0.6: the rare grade still keeps one pair
    assert sum(by_query["q3"].values()) == 20
    assert capped == [r for r in data if r in capped]  # input order kept
    assert folds.cap_pairs_per_query(data, 20, seed=0) == capped  # reproducible
    assert folds.cap_pairs_per_query(data, None, seed=0) == data


def test_pairs_per_query_cap_smaller_than_the_number_of_grades():
    data = records({"q1": [0] * 10 + [1] * 5 + [2] * 3 + [3] * 2})
    assert len(folds.cap_pairs_per_query(data, 2, seed=0)) == 2
    assert Counter(r["grade"] for r in folds.cap_pairs_per_query(data, 4, seed=0)) == {0: 1, 1: 1, 2: 1, 3: 1}
    with pytest.raises(ValueError, match="at least 1"):
        folds.cap_pairs_per_query(data, 0, seed=0)


def test_learning_curve_query_subsets_are_nested():
    ids = [f"q{i}" for i in range(40)]
    subsets = folds.nested_query_subsets(ids, [5, 10, 20, None], seed=3)
    assert [len(s) for s in subsets.values()] == [5, 10, 20, 40]
    assert subsets[5] < subsets[10] < subsets[20] < subsets[40] == set(ids)
    with pytest.raises(ValueError, match="asks for 50 training queries"):
        folds.nested_query_subsets(ids, [50], seed=0)


def test_source_name_uses_the_folder_of_a_generic_file_name(tmp_path):
    assert folds.source_name(Path("x/trec-dl-2020/pairs.jsonl")) == "trec-dl-2020"
    assert folds.source_name(Path("x/my_judged.jsonl")) == "my_judged"
    assert isinstance(folds.load_pair_files([write_pairs(tmp_path / "p.jsonl", ["q"])]), pd.DataFrame)


def test_the_committee_distribution_is_the_share_of_judges_per_grade():
    from labeler_utils.teacher import add_committee, labels_from_frame

    frame = pd.DataFrame(
        {
            "query_id": ["q"] * 3,
            "query": ["x"] * 3,
            "doc_id": ["a", "b", "c"],
            "document": ["t"] * 3,
            "j1": pd.array([3, 0, None], dtype="Int64"),
            "j2": pd.array([1, 0, None], dtype="Int64"),
            "j3": pd.array([3, None, None], dtype="Int64"),
        }
    )
    out = add_committee(frame, ["j1", "j2", "j3"])
    assert out.loc[0, [f"committee:p{g}" for g in range(4)]].tolist() == pytest.approx([0, 1 / 3, 0, 2 / 3])
    assert out.loc[1, [f"committee:p{g}" for g in range(4)]].tolist() == pytest.approx([1, 0, 0, 0])  # j3 did not grade
    assert out["committee"].tolist()[:2] == [2, 0]  # 7/3 is nearest grade 2
    assert out["committee"].isna().tolist() == [False, False, True]  # no judge graded the third pair
    records = labels_from_frame(out, "committee", "committee", distribution_prefix="committee")
    assert [r["doc_id"] for r in records] == ["a", "b"]
    assert records[0]["distribution"] == pytest.approx([0, 1 / 3, 0, 2 / 3]) and records[0]["grade"] == 2
    tie = add_committee(frame.assign(j3=pd.array([1, None, None], dtype="Int64")), ["j1", "j2", "j3"])
    assert tie.loc[0, "committee"] == 2  # expected 5/3 -> nearest 2
    two = add_committee(frame, ["j1", "j2"])
    assert two.loc[0, "committee"] == 2  # expected exactly 2
    halfway = add_committee(frame.assign(j2=pd.array([2, 0, None], dtype="Int64")), ["j1", "j2"])
    assert halfway.loc[0, "committee"] == 2  # expected 2.5: the tie goes down
    with pytest.raises(ValueError, match="at least one"):
        add_committee(frame, [])
