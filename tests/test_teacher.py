"""Teacher stage: strict grade parsing, logprob distributions, label import, labeling through a client."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from conftest import ScriptedHTTPServer, chat_response, ok, scripted_client
from matplotlib import colormaps

from labeler_utils.core.artifacts import InputError
from labeler_utils.core.records import LabelScale, parse_grade_answer
from labeler_utils.llm.client import Endpoint, LLMClient
from labeler_utils.teacher import (
    TeacherLabeler,
    distribution_from_logprobs,
    grades_by_role,
    import_labels,
    labels_from_frame,
    plot_teacher_grades,
    rubric_messages,
)


@pytest.mark.parametrize(
    ("text", "grade"),
    [
        ("Intent is clear. Match is partial.\nFinal grade: 2", 2),
        ("final grade = 3", 3),
        ("Final Grade: **1**", 1),
        ("Final grade: 1 ... wait. Final grade: 0", 0),
        ("3", 3),
        (" Grade: 2.", 2),
        ('{"grade": 1}', 1),
        ('```json\n{"grade": 3}\n```', 3),
    ],
)
def test_parse_grade_accepts_the_fixed_forms(text, grade):
    assert parse_grade_answer(text) == grade


@pytest.mark.parametrize(
    "text",
    ["The document is relevant, I would say 3 out of 3.", "", "Final grade: 7", "Grade: high", '{"score": 2}'],
)
def test_parse_grade_rejects_everything_else(text):
    with pytest.raises(ValueError):
        parse_grade_answer(text)


def test_custom_scale_limits_grades():
    scale = LabelScale(grades=(0, 1), descriptions={0: "no", 1: "yes"})
    assert parse_grade_answer("Final grade: 1", scale) == 1
    with pytest.raises(ValueError, match="outside the scale"):
        parse_grade_answer("Final grade: 2", scale)
    assert "1 = yes\n0 = no" in rubric_messages("q", "d", scale)[0]["content"]


def test_distribution_from_the_grade_token_alternatives():
    tokens = ["Final", " grade", ":", " 2"]
    steps = [
        {"Final": -0.1},
        {" grade": -0.1},
        {":": -0.1},
        {" 2": math.log(0.6), " 3": math.log(0.2), "1": math.log(0.1), " the": math.log(0.1)},
    ]
    distribution, mass = distribution_from_logprobs(tokens, steps, "Final grade: 2")
    assert distribution == pytest.approx([0.0, 1 / 9, 6 / 9, 2 / 9])
    assert mass == pytest.approx(0.9)


def test_no_distribution_without_a_digit_token():
    assert distribution_from_logprobs(["no"], [{"no": -0.1}], "no") is None


def _client(tmp_path, script) -> LLMClient:
    return LLMClient(
        Endpoint("http://127.0.0.1:9/v1", "teacher-x"),
        tmp_path / "c.sqlite",
        openai_client=scripted_client(script),
        backoff_seconds=0,
    )


def test_labeler_keeps_hard_grade_and_soft_label(tmp_path):
    response = chat_response(
        "Final grade: 3",
        tokens=[
            ("Final", {"Final": -0.01}),
            (" grade", {" grade": -0.01}),
            (":", {":": -0.01}),
            (" 3", {" 3": math.log(0.7), " 2": math.log(0.3)}),
        ],
    )
    label = TeacherLabeler(_client(tmp_path, [response])).label_pair("vpn timeout", "VPN runbook")
    assert label["grade"] == 3 and label["distribution_source"] == "logprobs"
    assert label["distribution"] == pytest.approx([0, 0, 0.3, 0.7])


def test_labeler_falls_back_to_sampled_distribution(tmp_path):
    script = [
        chat_response("Final grade: 2"),
        chat_response("Final grade: 2"),
        chat_response("Final grade: 1"),
        chat_response("Final grade: 2"),
        chat_response("nonsense"),
    ]
    labeler = TeacherLabeler(_client(tmp_path, script), top_logprobs=None, n_samples=4)
    label = labeler.label_pair("q", "d")
    assert label["grade"] == 2 and label["distribution_source"] == "samples"
    assert label["distribution"] == pytest.approx([0, 1 / 3, 2 / 3, 0])
    assert labeler.client.ledger.unparseable == 1


def test_unparseable_pair_gets_no_grade_and_is_recorded(tmp_path):
    labeler = TeacherLabeler(_client(tmp_path, [chat_response("It depends.")]))
    records = labeler.label_records([{"query": "q", "document": "d", "pair_id": "p1"}])
    assert records[0]["grade"] is None and records[0]["error"] == "unparseable"
    assert records[0]["pair_id"] == "p1" and records[0]["labeler"] == "teacher:teacher-x"
    assert len(labeler.client.cache.unparseable()) == 2


def test_import_labels_reads_recorded_judgments(tmp_path):
    path = tmp_path / "labels.jsonl"
    rows = [
        {"query": "q1", "document": "d1", "grade": 2, "distribution": [0.1, 0.2, 0.6, 0.1]},
        {"query_id": "7", "doc_id": "x", "query": "q2", "document": "d2", "grade": 0},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = import_labels(path, source="recorded:gpt-4o")
    assert [(r["query_id"], r["grade"], r["distribution_source"]) for r in records] == [
        ("q1", 2, "imported"),
        ("7", 0, None),
    ]
    assert records[0]["labeler"] == "recorded:gpt-4o"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"query": "q", "document": "d", "grade": 5}', ":2: grade 5"),
        ('{"query": "q", "document": "d"}', ":2: missing"),
        ('{"query": "q", "document": "d", "grade": 1, "distribution": [0.5, 0.5]}', "4 probabilities"),
        ("not json", ":2: not valid JSON"),
    ],
)
def test_import_labels_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"query": "q", "document": "d", "grade": 1}\n' + line + "\n")
    with pytest.raises(InputError, match=message):
        import_labels(path)


def test_labels_from_frame_skips_missing_grades():
    frame = pd.DataFrame(
        {
            "query_id": ["1", "1"],
            "doc_id": ["a", "b"],
            "query": ["q", "q"],
            "document": ["da", "db"],
            "recorded:judge": pd.array([2, None], dtype="Int64"),
        }
    )
    records = labels_from_frame(frame, "recorded:judge", "recorded:judge")
    assert [(r["doc_id"], r["grade"]) for r in records] == [("a", 2)]


def test_label_scale_from_wording_accepts_json_keys_and_names_bad_input():
    scale = LabelScale.from_wording({"3": "the procedure itself", "0": "unrelated", 1: "same topic", 2: " answers it "})
    assert scale.grades == (0, 1, 2, 3)
    assert scale.describe().splitlines() == [
        "3 = the procedure itself",
        "2 = answers it",
        "1 = same topic",
        "0 = unrelated",
    ]
    with pytest.raises(ValueError, match="label_scale: needs at least two grades.*empty: \\[1\\]"):
        LabelScale.from_wording({0: "no", 1: "  "})
    with pytest.raises(ValueError, match="my.yaml: expected a mapping of integer grades"):
        LabelScale.from_wording({"high": "x"}, source="my.yaml")


def test_a_malformed_answer_is_one_pair_failure_not_a_batch_failure(tmp_path):
    def respond(request: dict) -> tuple[int, dict[str, str], bytes]:
        prompt = request["messages"][0]["content"]
        if "truncated" in prompt:
            return 200, {}, b'{"id": "x", "choices": [{"index": 0, "message": {"content": "Final gr'
        if "no choices" in prompt:
            return 200, {}, json.dumps({"id": "x", "object": "chat.completion"}).encode()
        return ok("Final grade: 2")

    with ScriptedHTTPServer(respond) as server:
        client = LLMClient(
            Endpoint(server.base_url, "teacher-x", api_key_env="TEST_LLM_KEY"),
            tmp_path / "c.sqlite",
            max_retries=1,
            backoff_seconds=0,
            timeout=5,
            max_concurrency=2,
        )
        records = TeacherLabeler(client).label_records(
            [{"query": q, "document": "d"} for q in ("vpn timeout", "truncated", "no choices")]
        )
    assert [r["grade"] for r in records] == [2, None, None]
    assert records[0]["error"] is None
    assert "failed 2 times" in records[1]["error"] and "JSONDecodeError" in records[1]["error"]
    assert "failed 2 times" in records[2]["error"] and "no choices" in records[2]["error"]


def test_a_failed_sample_leaves_the_grade_and_the_other_samples(tmp_path):
    def respond(request: dict) -> tuple[int, dict[str, str], bytes]:
        if request.get("seed") == 2:
            return 400, {}, b'{"error": {"message": "bad sample"}}'
        return ok("Final grade: 1" if request.get("seed") == 3 else "Final grade: 2")

    with ScriptedHTTPServer(respond) as server:
        client = LLMClient(
            Endpoint(server.base_url, "teacher-x", api_key_env="TEST_LLM_KEY"),
            tmp_path / "c.sqlite",
            backoff_seconds=0,
            timeout=5,
        )
        label = TeacherLabeler(client, top_logprobs=None, n_samples=3).label_records([{"query": "q", "document": "d"}])[
            0
        ]
    assert label["grade"] == 2 and label["distribution"] == pytest.approx([0, 0.5, 0.5, 0])
    assert client.ledger.failures == 1


def _labels_frame() -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"role": "seed", "grade": 3, "distribution": [0.0, 0.0, 0.2, 0.8]},
            {"role": "seed", "grade": 2, "distribution": None},
            {"role": "hard_negative", "grade": 1, "distribution": [0.2, 0.6, 0.2, 0.0]},
            {"role": "random_negative", "grade": 0, "distribution": None},
            {"role": "random_negative", "grade": None, "distribution": None},  # unparseable: not counted
        ]
    )


def test_grades_by_role_counts_graded_pairs_only():
    table = grades_by_role(_labels_frame())
    assert table.loc["seed"].tolist() == [0, 0, 1, 1] and table.loc["random_negative"].tolist() == [1, 0, 0, 0]
    assert table.to_numpy().sum() == 4 and list(table.columns) == [0, 1, 2, 3]
    imported = grades_by_role(_labels_frame().drop(columns="role"))  # imported labels carry no role
    assert imported.index.tolist() == ["all"] and imported.loc["all"].tolist() == [1, 1, 1, 1]


def test_plot_teacher_grades_stacks_grades_per_role_and_averages_the_soft_labels():
    roles_ax, soft_ax = plot_teacher_grades(_labels_frame()).axes
    assert len(roles_ax.patches) == 3 * 4  # a bar per role and grade, stacked
    assert roles_ax.patches[-1].get_facecolor() == pytest.approx(colormaps["viridis"](1.0))  # grade 3: always this
    assert [text.get_text() for text in roles_ax.get_legend().get_texts()] == ["0", "1", "2", "3"]
    assert [bar.get_height() for bar in soft_ax.patches] == pytest.approx([0.1, 0.3, 0.2, 0.4])
    assert "2 pairs with a distribution" in soft_ax.get_title()
