"""Stage 02: taxonomy draw, prompt, parser, generation through a fake client, each filter, outputs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import chat_response, scripted_client
from matplotlib.figure import Figure

from labeler_utils import query_filters as qf
from labeler_utils import query_synthesis as qs
from labeler_utils.core.artifacts import InputError, read_json, read_jsonl
from labeler_utils.documents import Document
from labeler_utils.hard_negatives import BM25Index
from labeler_utils.llm.client import Endpoint, LLMClient

DATA = Path(__file__).parent / "data"


def doc(doc_id: str, text: str, title: str = "", author: str = "", doc_type: str = "", **metadata) -> Document:
    return Document(
        doc_id=doc_id,
        title=title or doc_id,
        text=text,
        author=author,
        doc_type=doc_type,
        file_name=doc_id.rsplit("/", 1)[-1],
        metadata=metadata,
    )


CODE_DOC = doc(
    "eng/inc-1.md",
    "Gateway returned PAY-4012 timeouts. The CAB approved the failover.",
    title="INC-1 PAY-4012 timeouts",
    author="Marcus Oyelaran",
    doc_type="incident_ticket",
)
PLAIN_DOC = doc("hr/lunch.md", "the canteen serves lunch from noon until two every weekday", title="lunch hours")


def row(query: str, query_id: str, seed: str = "hr/lunch.md", query_type: str = "keyword", **extra) -> dict:
    return {"query_id": query_id, "query": query, "query_type": query_type, "seed_doc_id": seed, **extra}


# ---------------------------------------------------------------------------------------- taxonomy


def test_types_that_do_not_fit_are_skipped():
    assert qs.applicable_types(CODE_DOC, qs.DEFAULT_TYPE_WEIGHTS) == [
        "keyword",
        "question",
        "navigational",
        "people",
        "acronym",
        "error_code",
    ]
    # No author, no code-like token, no upper-case acronym, not a how-to document.
    assert qs.applicable_types(PLAIN_DOC, qs.DEFAULT_TYPE_WEIGHTS) == ["keyword", "question", "navigational"]
    assert qs.applicable_types(CODE_DOC, {"keyword": 1.0, "error_code": 0.0}) == ["keyword"]
    with pytest.raises(ValueError, match="Unknown query types"):
        qs.applicable_types(CODE_DOC, {"gossip": 1.0})


@pytest.mark.parametrize(
    "text, has_code",
    [
        ("see ticket OPS-1182", True),
        ("ERR_CERT_AUTHORITY_INVALID in Chrome", True),
        ("code 0x80070005", True),
        ("error E500 on save", False),
        ("the SSO page", False),
        ("version 4.2", False),
    ],
)
def test_error_code_detection(text, has_code):
    assert ("error_code" in qs.applicable_types(doc("d.md", text), {"error_code": 1.0})) is has_code


def test_how_to_fits_policies_and_numbered_steps():
    weights = {"how_to": 1.0}
    assert qs.applicable_types(doc("p.md", "text", doc_type="policy"), weights) == ["how_to"]
    steps = doc("s.md", "1. open the portal\n2. click expenses\n3. attach the receipt\n")
    assert qs.applicable_types(steps, weights) == ["how_to"]
    assert qs.applicable_types(doc("m.md", "minutes of the meeting", doc_type="meeting_notes"), weights) == []


def test_draw_is_seeded_weighted_and_diverse():
    first = qs.draw_query_types(CODE_DOC, 4, seed=3)
    assert first == qs.draw_query_types(CODE_DOC, 4, seed=3)
    assert len(set(first)) == 4  # without replacement while types remain
    assert qs.draw_query_types(PLAIN_DOC, 5, seed=0).count("error_code") == 0
    # Over many documents the first drawn type follows the weights 3:1.
    docs = [doc(f"d{i}.md", "plain text") for i in range(600)]
    counts = Counter(qs.draw_query_types(d, 1, {"keyword": 3.0, "question": 1.0}, seed=0)[0] for d in docs)
    assert counts["keyword"] / 600 == pytest.approx(0.75, abs=0.05)
    # Refill after the fitting types are exhausted: 5 queries from 3 fitting types.
    assert Counter(qs.draw_query_types(PLAIN_DOC, 5, seed=1)).most_common(1)[0][1] == 2
    with pytest.raises(ValueError, match="No query type"):
        qs.draw_query_types(PLAIN_DOC, 1, {"error_code": 1.0})


def test_persona_prefers_the_documents_department():
    personas = [{"role": "accountant", "department": "Finance"}, {"role": "SRE", "department": "Engineering"}]
    eng = doc("e.md", "text", department="Engineering")
    assert qs.choose_persona(eng, personas) == personas[1]
    assert qs.choose_persona(PLAIN_DOC, personas) in personas
    assert qs.choose_persona(PLAIN_DOC, None) is None


# ---------------------------------------------------------------------------------------- prompt


def test_prompt_uses_metadata_examples_and_persona():
    examples = qs.read_queries(DATA / "qs_user_queries.jsonl")
    messages = qs.query_messages(
        CODE_DOC, ["error_code", "people"], examples[:2], {"role": "SRE", "department": "Engineering"}
    )
    user = messages[1]["content"]
    for expected in (
        "Title: INC-1 PAY-4012 timeouts",
        "File: inc-1.md",
        "Author: Marcus Oyelaran",
        "Type: incident_ticket",
        "payroll cutoff date march",
        "as a SRE in Engineering",
        "1. error_code:",
        "2. people:",
        "Write 2 different search queries",
    ):
        assert expected in user
    assert len(qs.PROMPT_HASH) == 64


def test_examples_file_and_selection():
    examples = qs.read_queries(DATA / "qs_user_queries.jsonl")
    assert [e.get("query_type") for e in examples] == ["keyword", "people", None]
    with pytest.raises(InputError, match="gossip"):
        qs.read_queries(DATA / "qs_bad_type.jsonl")
    builtin = qs.read_queries()
    assert len(builtin) >= 25 and set(e["query_type"] for e in builtin) == set(qs.QUERY_TYPES)
    import random

    chosen = qs.select_examples(builtin, ["error_code", "people"], 4, random.Random(0))
    assert [e["query_type"] for e in chosen[:2]] == ["error_code", "people"] and len(chosen) == 4


# ---------------------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '[{"query_type": "keyword", "query": "pay-4012 timeout"}, {"query": "who owns TPG?"}]',
            [("pay-4012 timeout", "keyword"), ("who owns TPG?", None)],
        ),
        (
            'Sure!\n```json\n["vpn split tunnel", "  \\"expense limits\\" "]\n```\nHope this helps',
            [("vpn split tunnel", None), ("expense limits", None)],
        ),
        ('{"queries": [{"query": "cab meeting time", "query_type": "question"}]}', [("cab meeting time", "question")]),
        (
            '{"query": "a", "query_type": "keyword"}\n{"query": "b c", "query_type": "question"}',
            [("a", "keyword"), ("b c", "question")],
        ),
        (
            'Here are the queries:\n1. keyword: payroll cutoff\n2) (question) when is payday?\n3. Query: "lunch hours"',
            [("payroll cutoff", "keyword"), ("when is payday?", "question"), ("lunch hours", None)],
        ),
        (
            "- keyword search tips\n* [people] - who runs payroll",
            [("keyword search tips", None), ("who runs payroll", "people")],
        ),
        (
            "1. [A. Bigger Postgres host\n2. **Pay**\n3. [phishing runbook](https://intranet/phishing.md)",
            [("A. Bigger Postgres host", None), ("Pay", None), ("phishing runbook", None)],
        ),
        ('[{"query": "broken json"', None),  # unterminated JSON and no list lines
    ],
)
def test_parser_variants(text, expected):
    if expected is None:
        with pytest.raises(ValueError, match="no queries found"):
            qs.parse_queries(text)
    else:
        assert [(q["query"], q.get("query_type")) for q in qs.parse_queries(text)] == expected


def test_parser_rejects_empty_and_pure_echoes():
    for text in ("", "   ", "I cannot help with that.", '[{"query": ""}]', "```json\n[]\n```"):
        with pytest.raises(ValueError):
            qs.parse_queries(text)
    echoes = qs.prompt_reference_queries([{"query": "sso login loop okta"}])
    with pytest.raises(ValueError, match="only repeats"):
        qs.parse_queries(
            "1. keyword: 2-5 keywords typed into a search box, not a sentence\n2. SSO login loop, Okta", echoes
        )
    assert len(qs.parse_queries('["sso login loop okta", "pay-4012"]', echoes)) == 2  # mixed answers pass


# ---------------------------------------------------------------------------------------- generation


def _client(tmp_path, script) -> LLMClient:
    return LLMClient(
        Endpoint(base_url="http://127.0.0.1:9/v1", model="fake-teacher"),
        tmp_path / "cache.sqlite",
        openai_client=scripted_client(script),
        backoff_seconds=0.0,
        max_concurrency=1,
    )


def test_generation_rows_and_unparseable_answers_recorded(tmp_path):
    script = [
        chat_response(
            '[{"query_type": "keyword", "query": "pay-4012 gateway"}, {"query": "who ran INC-1"},'
            ' {"query": "surplus query"}]'
        ),
        chat_response("I am sorry, I cannot do that."),  # first attempt for the second document
        chat_response("Still no queries here."),  # retry with another seed
    ]
    client = _client(tmp_path, script)
    settings = qs.GenerationSettings(queries_per_document=2, seed=0)
    examples = qs.read_queries(DATA / "qs_user_queries.jsonl")
    rows, counts = qs.synthesize_queries(client, [CODE_DOC, PLAIN_DOC], settings, examples)
    assert counts == {
        "documents_with_queries": 1,
        "queries_surplus_dropped": 1,
        "queries_missing": 0,
        "documents_unparseable": 1,
    }
    assert [r["query"] for r in rows] == ["pay-4012 gateway", "who ran INC-1"]
    assert [r["query_type"] for r in rows] == qs.draw_query_types(CODE_DOC, 2, seed=0)  # requested, by position
    first = rows[0]
    assert set(first) == {
        "query_id",
        "query",
        "query_type",
        "seed_doc_id",
        "persona",
        "generator_model",
        "prompt_hash",
        "params",
    }
    assert (first["seed_doc_id"], first["generator_model"], first["prompt_hash"]) == (
        "eng/inc-1.md",
        "fake-teacher",
        qs.PROMPT_HASH,
    )
    assert first["params"]["queries_per_document"] == 2 and first["params"]["seed"] == 0
    assert len({r["query_id"] for r in rows}) == 2
    assert client.ledger.unparseable == 2
    recorded = client.cache.unparseable(qs.STAGE)
    assert sorted(r["text"] for r in recorded) == ["I am sorry, I cannot do that.", "Still no queries here."]
    assert all(r["reason"].startswith("no queries found") for r in recorded)


def test_structured_output_asks_for_exactly_n_queries(tmp_path):
    answer = '{"queries": [{"query_type": "keyword", "query": "pay-4012 gateway"}, {"query_type": "x", "query": "who ran INC-1"}]}'
    client = _client(tmp_path, [chat_response(answer)])
    rows, counts = qs.synthesize_queries(
        client,
        [CODE_DOC],
        qs.GenerationSettings(queries_per_document=2),
        qs.read_queries(DATA / "qs_user_queries.jsonl"),
    )
    assert [r["query"] for r in rows] == ["pay-4012 gateway", "who ran INC-1"]
    request = client._client.chat.completions.requests[0]
    schema = request["response_format"]["json_schema"]["schema"]
    assert request["response_format"]["type"] == "json_schema"
    assert schema["properties"]["queries"]["minItems"] == schema["properties"]["queries"]["maxItems"] == 2
    assert schema["required"] == ["queries"]
    plain = _client(tmp_path / "plain", [chat_response(answer)])
    qs.synthesize_queries(plain, [CODE_DOC], qs.GenerationSettings(queries_per_document=2, structured_output=False))
    assert "response_format" not in plain._client.chat.completions.requests[0]


# ---------------------------------------------------------------------------------------- filters


def test_length_bounds():
    rows = [row("vpn", "a"), row("vpn split tunnel", "b"), row("one two three four five six", "c")]
    kept, rejected = qf.filter_length(rows, min_tokens=2, max_tokens=5)
    assert [r["query_id"] for r in kept] == ["b"]
    assert [(r["query_id"], r["rejected_by"], r["reject_detail"]) for r in rejected] == [
        ("a", "length", "1 tokens, allowed 2-5"),
        ("c", "length", "6 tokens, allowed 2-5"),
    ]


def test_exact_duplicates_are_normalised_and_include_prompt_texts():
    rows = [
        row("PAY-4012 timeout?", "a"),
        row("pay 4012   Timeout", "b"),
        row("sso login loop okta!", "c"),
        row("pay 4012 timeouts", "d"),
    ]
    kept, rejected = qf.filter_exact_duplicates(rows, reference_queries=["SSO login loop, Okta"])
    assert [r["query_id"] for r in kept] == ["a", "d"]
    assert [(r["query_id"], r["reject_detail"]) for r in rejected] == [
        ("b", "same as a"),
        ("c", "same as a prompt text"),
    ]


def test_near_duplicates_by_stemmed_token_jaccard():
    rows = [
        row("how do I reset my password", "a"),
        row("reset password", "b"),
        row("password reset policy", "c"),
        row("expense policy travel", "d"),
    ]
    kept, rejected = qf.filter_near_duplicates(rows, threshold=0.8)
    # {reset, password} == {reset, password}: 1.0; {password, reset, polici}: 2/3 < 0.8.
    assert [r["query_id"] for r in kept] == ["a", "c", "d"]
    assert rejected[0]["query_id"] == "b" and rejected[0]["reject_detail"] == "Jaccard 1.00 with a"
    kept, _ = qf.filter_near_duplicates(rows, threshold=0.6)
    assert [r["query_id"] for r in kept] == ["a", "d"]
    kept, rejected = qf.filter_near_duplicates([row("passwords reset", "z")], 0.8, ["how to reset a password"])
    assert kept == [] and rejected[0]["reject_detail"] == "Jaccard 1.00 with a prompt text"


def test_copy_rate_values():
    text = "the gateway does not retry automatically because a retry could double authorise the card"
    assert qf.copy_rate("gateway does not retry automatically because", text, n=5) == 1.0
    # 5-grams of 7 words: 3, of which the first two are verbatim.
    assert qf.copy_rate("gateway does not retry automatically because weekends", text, n=5) == pytest.approx(2 / 3)
    assert qf.copy_rate("gateway retry", text, n=5) == 0.0  # shorter than n: never a long copied span
    assert qf.seed_overlap("gateway retry policy", text) == pytest.approx(2 / 3)


def test_copied_filter_exempts_navigational():
    rows = [
        row("q1", "a", copy_rate=0.9),
        row("q2", "b", copy_rate=0.5),
        row("q3", "c", copy_rate=1.0, query_type="navigational"),
    ]
    kept, rejected = qf.filter_copied(rows, max_copy_rate=0.75, exempt_types=("navigational",))
    assert [r["query_id"] for r in kept] == ["b", "c"]
    assert rejected[0]["reject_detail"] == "copy rate 0.90"


def test_roundtrip_with_and_without_fallback():
    rows = [
        row("q", "a", seed="d1", seed_bm25_rank=1),
        row("q", "b", seed="d1", seed_bm25_rank=7),
        row("q", "c", seed="d2", seed_bm25_rank=9),
        row("q", "d", seed="d2", seed_bm25_rank=5),
        row("q", "e", seed="d3", seed_bm25_rank=None),
    ]
    kept, rejected, readmitted = qf.filter_roundtrip(rows, top_k=3, fallback=False)
    assert [r["query_id"] for r in kept] == ["a"] and readmitted == 0
    assert {r["query_id"]: r["reject_detail"] for r in rejected} == {
        "b": "seed at BM25 rank 7 > 3",
        "c": "seed at BM25 rank 9 > 3",
        "d": "seed at BM25 rank 5 > 3",
        "e": "seed not retrieved",
    }
    kept, rejected, readmitted = qf.filter_roundtrip(rows, top_k=3, fallback=True)
    # d2 has no passing query: its best-ranked one (d, rank 5) comes back flagged; d3's seed was never retrieved.
    assert [(r["query_id"], r["roundtrip_fallback"]) for r in kept] == [("a", False), ("d", True)]
    assert readmitted == 1 and sorted(r["query_id"] for r in rejected) == ["b", "c", "e"]


def _corpus() -> list[Document]:
    return [
        doc("hr/lunch.md", "the canteen serves lunch from noon until two every weekday", title="lunch hours"),
        doc("it/vpn.md", "connect to the vpn with the tallbridge connect client and your badge", title="vpn guide"),
        doc("fin/expenses.md", "submit expenses within thirty days with receipts attached", title="expenses"),
        CODE_DOC,
    ]


def test_apply_filters_reports_each_filter_and_outputs(tmp_path):
    corpus = _corpus()
    index = BM25Index.build(corpus)
    queries = [
        row("canteen lunch hours", "q1", seed="hr/lunch.md"),
        row("lunch", "q2", seed="hr/lunch.md"),  # too short
        row("Canteen lunch hours!", "q3", seed="hr/lunch.md"),  # exact duplicate of q1
        row("sso login loop okta", "q4", seed="it/vpn.md"),  # copy of a few-shot example
        row("connect to the vpn with the tallbridge connect client", "q5", seed="it/vpn.md"),  # copied span
        row("expenses receipts deadline", "q6", seed="fin/expenses.md"),
        row("vpn badge login", "q7", seed="fin/expenses.md"),  # BM25 finds it/vpn.md, not the seed
        row("PAY-4012 timeouts", "q8", seed="eng/inc-1.md", query_type="error_code"),
    ]
    settings = qf.FilterSettings(min_tokens=2, max_tokens=12, roundtrip_top_k=1, roundtrip_fallback=False)
    kept, rejected, report = qf.apply_filters(
        queries, {d.doc_id: d for d in corpus}, index, settings, reference_queries=["sso login loop okta"]
    )
    table = report.to_frame().set_index("filter")
    assert table["removed"].to_dict() == {
        "length": 1,
        "exact_duplicate": 2,
        "near_duplicate": 0,
        "copied_from_document": 1,
        "roundtrip": 1,
    }
    assert table.loc["length", "input"] == 8 and table.loc["roundtrip", "kept"] == 3
    assert [r["query_id"] for r in kept] == ["q1", "q6", "q8"]
    assert {r["query_id"]: r["rejected_by"] for r in rejected} == {
        "q2": "length",
        "q3": "exact_duplicate",
        "q4": "exact_duplicate",
        "q5": "copied_from_document",
        "q7": "roundtrip",
    }
    assert kept[0]["seed_bm25_rank"] == 1 and kept[0]["n_tokens"] == 3 and kept[0]["copy_rate"] == 0.0
    assert all(r["roundtrip_fallback"] is False for r in kept)

    paths = qs.save_outputs(tmp_path, kept, rejected, report, {"documents_with_queries": 4})
    assert [r["query_id"] for r in read_jsonl(paths["queries.jsonl"])] == ["q1", "q6", "q8"]
    assert len(read_jsonl(paths["rejected_queries.jsonl"])) == 5
    saved = read_json(paths["filter_report.json"])
    assert [f["filter"] for f in saved["filters"]][-1] == "roundtrip" and saved["prompt_hash"] == qs.PROMPT_HASH
    json.dumps(saved)


def test_diagnostic_plots_are_figures():
    kept = [row("canteen lunch hours", "a", copy_rate=0.0, seed_overlap=1.0, seed_bm25_rank=1)]
    rejected = [row("vpn", "b", query_type="question", copy_rate=0.2, seed_overlap=0.5, seed_bm25_rank=None)]
    figures = [
        qs.plot_type_mix(kept, rejected),
        qs.plot_length_distribution(kept, [{"query": "a b c"}]),
        qf.plot_seed_overlap(kept, rejected),
        qf.plot_seed_rank(kept + rejected, top_k=3),
    ]
    assert all(isinstance(f, Figure) and f.axes for f in figures)
