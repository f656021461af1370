"""Stage 03: tokenizer, BM25 index, near-duplicates, mining rules, splits, leak check, outputs."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
from conftest import chat_response, scripted_client
from matplotlib.figure import Figure

from labeler_utils import hard_negatives as hn
from labeler_utils import text
from labeler_utils.core.artifacts import read_jsonl
from labeler_utils.documents import Document
from labeler_utils.llm.client import Endpoint, LLMClient

DATA = Path(__file__).parent / "data"


def doc(doc_id: str, text: str, title: str = "") -> Document:
    return Document(doc_id=doc_id, title=title or doc_id, text=text, file_name=doc_id)


def ranked_corpus() -> list[Document]:
    """d1..d8 mention "alpha" 8..1 times (so BM25 ranks them d1 first), z0..z9 never do."""
    docs = [doc(f"d{i}", " ".join(["alpha"] * (9 - i) + [f"w{i}x{j}" for j in range(i + 1)])) for i in range(1, 9)]
    docs += [doc(f"z{i}", " ".join(f"v{i}y{j}" for j in range(9))) for i in range(10)]
    return docs


def query(query_id: str, seed_doc_id: str, text: str = "alpha") -> dict:
    return {
        "query_id": query_id,
        "query": text,
        "query_type": "keyword",
        "seed_doc_id": seed_doc_id,
        "generator_model": "fake-teacher",
        "prompt_hash": "h" * 64,
    }


def roles(pairs: list[dict], role: str) -> list[tuple[str, int | None]]:
    return [(p["doc_id"], p["bm25_rank"]) for p in pairs if p["role"] == role]


# ---------------------------------------------------------------------------------------- tokenizer and index


def test_tokenizer_keeps_identifiers_and_file_names():
    tokens = text.Tokenizer()("INC-20517: PAY-4012 timeouts in the atlas-nightly-load-recovery.md runbook")
    assert tokens == [
        "inc",
        "20517",
        "pay",
        "4012",
        "timeout",
        "atlas",
        "night",
        "load",
        "recoveri",
        "md",
        "runbook",
        "inc-20517",
        "pay-4012",
        "atlas-nightly-load-recovery.md",
    ]
    plain = text.Tokenizer(text.TokenizerSettings(stem=False, english_stop_words=False, identifiers=False))
    assert plain("Timeouts in the svc_auth v4.2.1") == ["timeouts", "in", "the", "svc", "auth", "v4", "2", "1"]
    assert text.Tokenizer(text.TokenizerSettings(lowercase=False, stem=False))("PAY-4012 Gateway") == [
        "PAY",
        "4012",
        "Gateway",
        "PAY-4012",
    ]
    assert text.normalize_query("  PAY-4012   Timeout? ") == "pay 4012 timeout"


def test_index_ranks_metadata_and_identifiers():
    docs = [
        doc("a.md", "the gateway failed with PAY-4012 during the night", title="incident report"),
        doc("b.md", "pay day is on the 25th; 4012 employees were paid", title="payroll faq"),
        doc("c.md", "lunch menu for the week", title="canteen"),
    ]
    index = text.BM25Index.build(docs)
    assert index.search("PAY-4012")[0][0] == "a.md"  # the intact identifier outweighs the scattered parts
    assert index.search("payroll faq", top_k=1)[0][0] == "b.md"  # the title (metadata) is indexed
    assert index.rank_of("canteen", "c.md") == 1 and index.rank_of("canteen", "a.md") is None
    assert index.ranks("zebra") == {}


def test_index_save_load_checks_settings_and_corpus(tmp_path):
    docs = ranked_corpus()
    path = tmp_path / text.INDEX_FILE
    index = text.BM25Index.build(docs)
    index.save(path)
    loaded = text.BM25Index.load(path, text.TokenizerSettings(), docs)
    assert loaded.search("alpha") == index.search("alpha")
    with pytest.raises(ValueError, match="tokenizer settings"):
        text.BM25Index.load(path, text.TokenizerSettings(stem=False))
    with pytest.raises(ValueError, match="k1"):
        text.BM25Index.load(path, k1=0.9)
    with pytest.raises(ValueError, match="other documents"):
        text.BM25Index.load(path, documents=docs[:-1])
    rebuilt = text.load_or_build_index(path, docs, text.TokenizerSettings(stem=False))
    assert rebuilt.settings.stem is False and text.BM25Index.load(path).settings.stem is False
    assert loaded.scores("alpha beta").tolist() == index.scores("alpha beta").tolist()


class RunsCode:
    """A pickle payload: unpickling it creates ``marker`` (any code would run the same way)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_pickled_index_is_never_unpickled_and_is_rebuilt(tmp_path, capsys):
    docs = ranked_corpus()
    marker = tmp_path / "code-ran"
    for name in ("bm25_index.pkl", text.INDEX_FILE):  # an old run's file, and a crafted file under the new name
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"format": 1, "bm25": RunsCode(marker)}))
        with pytest.raises(ValueError, match=f"{path}: not a JSON BM25 index.*never unpickled.*rebuild it"):
            text.BM25Index.load(path)
        index = text.load_or_build_index(path, docs)
        assert "rebuilding the BM25 index" in capsys.readouterr().out
        assert not marker.exists() and index.search("alpha") == text.BM25Index.build(docs).search("alpha")
        assert text.BM25Index.load(path, documents=docs).search("alpha") == index.search("alpha")


# ---------------------------------------------------------------------------------------- false-negative guard

POLICY = (
    "Employees must not install unapproved software on company laptops. Report lost devices to the "
    "service desk within 24 hours. Personal use of email is allowed when it is occasional and lawful. "
    "Passwords must never be shared with colleagues or written down near the device."
)


def guard_corpus() -> list[Document]:
    return [
        doc("security/acceptable-use.md", POLICY, title="Acceptable use policy"),
        doc("it/shared/acceptable-use-copy.md", POLICY.replace("24 hours", "one day"), title="AUP copy"),
        doc("it/laptops.md", "Laptops are encrypted. Install software from the company portal only.", title="Laptops"),
        doc("hr/leave.md", "Annual leave is 25 days. Unused days expire in March.", title="Leave"),
        doc("manual.md#chunk1", "Chapter one: install the portal software on company laptops.", title="Manual"),
        doc("manual.md#chunk2", "Chapter two: software updates for company laptops arrive monthly.", title="Manual"),
    ]


def test_near_duplicates_found_and_grouped():
    docs = guard_corpus()
    pairs = text.find_near_duplicates(docs, threshold=0.5)
    assert [(a, b) for a, b, _ in pairs] == [("it/shared/acceptable-use-copy.md", "security/acceptable-use.md")]
    assert pairs[0][2] == pytest.approx(34 / 46, abs=1e-4)  # exact Jaccard of the 5-word shingle sets
    assert text.find_near_duplicates(docs, threshold=0.95) == []
    groups = hn.document_groups([d.doc_id for d in docs], pairs)
    assert groups["security/acceptable-use.md"] == groups["it/shared/acceptable-use-copy.md"]
    assert groups["manual.md#chunk1"] == groups["manual.md#chunk2"] != groups["it/laptops.md"]
    assert hn.source_id("manual.md#chunk2") == "manual.md" and hn.source_id("a.md") == "a.md"
    assert text.jaccard(set(), set()) == 0.0


def test_near_duplicate_of_the_seed_never_becomes_a_negative():
    docs = guard_corpus()
    index = text.BM25Index.build(docs)
    q = [query("q1", "security/acceptable-use.md", "install unapproved software on company laptops")]
    settings = hn.MiningSettings(negatives_per_query=3, min_rank=0, max_rank=10, random_share=0.0)
    unguarded, _ = hn.mine_negatives(q, index, settings)
    assert "it/shared/acceptable-use-copy.md" in [d for d, _ in roles(unguarded, "hard_negative")]
    groups = hn.document_groups(index.doc_ids, text.find_near_duplicates(docs, threshold=0.5))
    pairs, stats = hn.mine_negatives(q, index, settings, groups)
    negatives = [d for d, _ in roles(pairs, "hard_negative")]
    assert "it/shared/acceptable-use-copy.md" not in negatives and len(negatives) == 3
    assert stats.excluded_in_window["near_duplicate"] == 1 and stats.excluded_in_window["seed"] == 1


def test_sibling_chunks_and_blocked_documents_are_excluded():
    docs = guard_corpus()
    index = text.BM25Index.build(docs)
    q = [query("q1", "manual.md#chunk1", "install portal software company laptops")]
    settings = hn.MiningSettings(negatives_per_query=10, min_rank=0, max_rank=10, random_share=0.0)
    pairs, stats = hn.mine_negatives(q, index, settings, blocked_doc_ids={"it/laptops.md"})
    negatives = {d for d, _ in roles(pairs, "hard_negative")}
    assert "manual.md#chunk2" not in negatives and "it/laptops.md" not in negatives
    assert stats.excluded_in_window["sibling_chunk"] == 1 and stats.excluded_in_window["blocked"] == 1
    assert stats.short_of_hard_negatives == 1


# ---------------------------------------------------------------------------------------- mining rules


def test_ranked_corpus_ranks_as_designed():
    index = text.BM25Index.build(ranked_corpus())
    assert [d for d, _ in index.search("alpha")] == [f"d{i}" for i in range(1, 9)]


def test_rank_window_and_seed_exclusion():
    index = text.BM25Index.build(ranked_corpus())
    settings = hn.MiningSettings(negatives_per_query=3, min_rank=2, max_rank=5, random_share=0.0)
    pairs, stats = hn.mine_negatives([query("q1", "d4")], index, settings)
    assert roles(pairs, "seed") == [("d4", 4)]
    assert roles(pairs, "hard_negative") == [("d3", 3), ("d5", 5)]  # ranks 3..5 without the seed
    assert stats.short_of_hard_negatives == 1 and stats.excluded_in_window == {"seed": 1}
    pairs, _ = hn.mine_negatives(
        [query("q1", "d1")], index, hn.MiningSettings(2, min_rank=0, max_rank=10, random_share=0.0)
    )
    assert roles(pairs, "hard_negative") == [("d2", 2), ("d3", 3)]
    sampled, _ = hn.mine_negatives(
        [query("q1", "d1")],
        index,
        hn.MiningSettings(2, min_rank=0, max_rank=8, random_share=0.0, sampling="random", seed=5),
    )
    hard = roles(sampled, "hard_negative")
    assert len(hard) == 2 and all(2 <= rank <= 8 for _, rank in hard) and hard == sorted(hard, key=lambda x: x[1])
    with pytest.raises(ValueError, match="min_rank"):
        hn.MiningSettings(min_rank=5, max_rank=5)


def test_random_share_and_randoms_avoid_the_skipped_top_ranks():
    index = text.BM25Index.build(ranked_corpus())
    settings = hn.MiningSettings(negatives_per_query=4, min_rank=2, max_rank=6, random_share=0.5, seed=3)
    queries = [query(f"q{i}", "d1") for i in range(30)]
    pairs, stats = hn.mine_negatives(queries, index, settings)
    for q in queries:
        mine = [p for p in pairs if p["query_id"] == q["query_id"]]
        hard = [p["doc_id"] for p in mine if p["role"] == "hard_negative"]
        randoms = [p for p in mine if p["role"] == "random_negative"]
        assert hard == ["d3", "d4"] and len(randoms) == 2
        assert all(p["doc_id"] not in {"d1", "d2", *hard} for p in randoms)  # seed, skipped rank 2, hard ones
        assert all(p["bm25_rank"] is None or p["bm25_rank"] > 2 for p in randoms)
    assert len({p["doc_id"] for p in pairs if p["role"] == "random_negative"}) > 5  # varies by query
    again, _ = hn.mine_negatives(queries, index, settings)
    assert again == pairs  # seeded
    assert stats.to_dict()["queries"] == 30
    one_of_two, _ = hn.mine_negatives(
        queries[:1], index, hn.MiningSettings(2, min_rank=0, max_rank=5, random_share=0.25)
    )
    assert [p["role"] for p in one_of_two] == ["seed", "hard_negative", "random_negative"]  # 0.5 rounds up
    all_random, _ = hn.mine_negatives(
        queries[:1], index, hn.MiningSettings(3, min_rank=0, max_rank=5, random_share=1.0)
    )
    assert [p["role"] for p in all_random] == ["seed"] + ["random_negative"] * 3


# ---------------------------------------------------------------------------------------- splits and leaks


def _pairs_for(seeds: list[str]) -> list[dict]:
    index = text.BM25Index.build(ranked_corpus())
    qs = [query(f"q{i}", seed, f"alpha w{seed[1]}x0") for i, seed in enumerate(seeds)]
    pairs, _ = hn.mine_negatives(qs, index, hn.MiningSettings(2, min_rank=0, max_rank=10, random_share=0.0))
    return pairs


def test_splits_by_seed_group_cannot_leak():
    pairs = _pairs_for(["d1", "d2", "d3", "d4", "d5", "d6"])
    groups = {"d1": "d1", "d2": "d1"}  # d2 is a near-duplicate of d1
    split_of = hn.assign_splits(pairs, groups, dev_fraction=0.4, seed=0)
    assert sorted(split_of.values()) == ["dev", "dev", "train", "train", "train"]  # 5 groups, round(2.0)
    by_seed = {p["seed_doc_id"]: p["split"] for p in pairs}
    assert by_seed["d1"] == by_seed["d2"]
    assert all(p["split"] == by_seed[p["seed_doc_id"]] for p in pairs)
    hn.check_split_isolation(pairs, groups)
    pairs[0]["split"] = "dev" if pairs[0]["split"] == "train" else "train"
    with pytest.raises(ValueError, match="more than one split"):
        hn.check_split_isolation(pairs, groups)
    tiny = _pairs_for(["d1", "d2"])
    hn.assign_splits(tiny, {}, dev_fraction=0.1)
    assert sorted({p["split"] for p in tiny}) == ["dev", "train"]  # at least one dev group when asked for


def test_leak_check_drops_or_raises():
    pairs = _pairs_for(["d1", "d2", "d3"])  # queries "alpha w1x0", "alpha w2x0", "alpha w3x0"
    benchmark_queries, benchmark_docs = hn.read_benchmark(DATA / "hn_benchmark.jsonl")
    assert benchmark_queries == {"Alpha  W1X0?", "unrelated question"} and benchmark_docs == {"d2", "d5"}
    clean, report = hn.remove_benchmark_leaks(pairs, benchmark_queries, benchmark_docs)
    # q0 matches a benchmark query (normalised), q1 was written from benchmark document d2,
    # and q2 keeps its seed pair but loses its negative d2, a benchmark document.
    assert {p["query_id"] for p in clean} == {"q2"}
    assert [p["doc_id"] for p in clean] == ["d3", "d1"]
    assert report == {
        "on_leak": "drop",
        "benchmark_documents_policy": "exclude",
        "benchmark_queries": 2,
        "benchmark_documents": 2,
        "queries_matching_benchmark_query": 1,
        "queries_seeded_from_benchmark_document": 1,
        "pairs_with_benchmark_document": 2,
        "pairs_removed": 7,
    }
    allowed, report = hn.remove_benchmark_leaks(pairs, benchmark_queries, benchmark_docs, documents="allow")
    assert {p["query_id"] for p in allowed} == {"q1", "q2"} and report["pairs_removed"] == 3  # only q0
    with pytest.raises(ValueError, match="overlap the benchmark"):
        hn.remove_benchmark_leaks(pairs, benchmark_queries, benchmark_docs, on_leak="raise")
    assert hn.remove_benchmark_leaks(clean, benchmark_queries, benchmark_docs, on_leak="raise")[0] == clean


def test_benchmark_documents_extend_to_their_near_duplicates():
    groups = {"a": "a", "a-copy": "a", "b": "b", "m#chunk1": "m#chunk1", "m#chunk2": "m#chunk1"}
    assert hn.with_group_members({"a", "m#chunk2"}, groups) == {"a", "a-copy", "m#chunk1", "m#chunk2"}
    assert hn.with_group_members({"unknown"}, groups) == {"unknown"}


# ---------------------------------------------------------------------------------------- verification sample


def test_stratified_sample_and_false_negative_rates():
    negatives = [
        {"pair_id": f"p{r}", "query": "q", "doc_id": f"d{r}", "role": "hard_negative", "bm25_rank": r}
        for r in (1, 2, 3, 5, 6, 12, 40)
    ]
    negatives.append({"pair_id": "pr", "query": "q", "doc_id": "dr", "role": "random_negative", "bm25_rank": None})
    negatives.append({"pair_id": "ps", "query": "q", "doc_id": "ds", "role": "seed", "bm25_rank": 1})
    sample = hn.stratified_negative_sample(negatives, size=5, seed=0)
    assert sorted(hn.rank_band(p["bm25_rank"]) for p in sample) == sorted(
        ["1-3", "4-10", "11-30", "31+", "not retrieved"]
    )  # one per band before any band gets two
    assert "ps" not in {p["pair_id"] for p in sample}
    assert len(hn.stratified_negative_sample(negatives, size=50)) == 8

    grades = {"d1": 3, "d2": 2, "d3": 0, "d5": 1, "d6": None, "d12": 0, "d40": 0, "dr": 0}
    documents = {d: doc(d, "text") for d in grades}
    graded = hn.verify_negatives(
        hn.stratified_negative_sample(negatives, 50), documents, lambda q, document: grades[document.doc_id]
    )
    rates = hn.false_negative_rates(graded).set_index("rank_band")
    assert rates.loc["1-3", ["sampled", "graded", "false_negatives"]].tolist() == [3, 3, 2]
    assert rates.loc["1-3", "false_negative_rate"] == pytest.approx(2 / 3)
    assert rates.loc["4-10", ["sampled", "graded", "false_negatives"]].tolist() == [2, 1, 0]
    assert rates.loc["not retrieved", "false_negative_rate"] == 0.0
    assert isinstance(hn.plot_false_negative_rates(hn.false_negative_rates(graded)), Figure)
    assert hn.rank_band(31) == "31+" and hn.rank_band(None) == "not retrieved"


def test_sample_check_grader_reads_answers_with_the_teachers_strict_parser(tmp_path):
    """A bare digit is a grade; a digit inside free text is not: it is retried once, recorded, and left ungraded."""
    script = [
        chat_response("2"),
        chat_response("Grade: 3."),
        chat_response("between 1 and 3"),
        chat_response("I would say 2 or 3"),
    ]
    openai_client = scripted_client(script)
    client = LLMClient(
        Endpoint("http://127.0.0.1:9/v1", "grader"),
        tmp_path / "c.sqlite",
        openai_client=openai_client,
        backoff_seconds=0,
    )
    grade = hn.sample_check_grader(client, card_chars=20)
    document = doc("runbook.md", "Restart the payments gateway when PAY-4012 timeouts appear.", title="Runbook")
    assert [grade("pay-4012", document), grade("gateway", document), grade("lunch", document)] == [2, 3, None]
    assert len(client.cache.unparseable(hn.STAGE)) == 2  # both attempts of the last pair
    system, user = hn.sample_check_messages("pay-4012", document, card_chars=20)
    assert system["content"] == hn.SAMPLE_CHECK_SYSTEM and user["content"].endswith("Grade (0, 1, 2 or 3):")
    assert "Title: Runbook" in user["content"] and "Restart the payments" in user["content"]
    assert "PAY-4012 timeouts" not in user["content"] and "Search query: pay-4012" in user["content"]
    requests = openai_client.chat.completions.requests
    assert requests[0]["messages"][1]["content"] == user["content"] and requests[0]["max_tokens"] == 4


# ---------------------------------------------------------------------------------------- outputs


def test_pairs_jsonl_and_dataset_with_provenance(tmp_path):
    from datasets import load_from_disk

    index = text.BM25Index.build(ranked_corpus())
    settings = hn.MiningSettings(negatives_per_query=3, min_rank=1, max_rank=6, random_share=1 / 3, seed=7)
    pairs, stats = hn.mine_negatives([query("q1", "d1"), query("q2", "d3")], index, settings)
    hn.assign_splits(pairs, {}, dev_fraction=0.5, seed=0)
    paths = hn.save_pairs(pairs, tmp_path)
    rows = read_jsonl(paths["pairs"])
    assert len(rows) == 8 and len({r["pair_id"] for r in rows}) == 8
    required = {
        "pair_id",
        "query_id",
        "query",
        "query_type",
        "doc_id",
        "role",
        "bm25_rank",
        "split",
        "generator_model",
        "prompt_hash",
        "mining_params",
        "seed",
    }
    assert required <= set(rows[0])
    assert rows[0]["mining_params"]["min_rank"] == 1 and rows[0]["mining_params"]["bm25"]["k1"] == 1.5
    assert rows[0]["seed"] == 7 and rows[0]["generator_model"] == "fake-teacher"
    assert [r["role"] for r in rows[:4]] == ["seed", "hard_negative", "hard_negative", "random_negative"]
    dataset = load_from_disk(str(paths["dataset"]))
    assert dataset.num_rows == 8 and dataset[1]["pair_id"] == rows[1]["pair_id"]
    assert dataset[0]["mining_params"]["max_rank"] == 6
    hn.save_pairs(pairs[:2], tmp_path)  # overwriting an existing dataset works
    assert load_from_disk(str(paths["dataset"])).num_rows == 2
    report = hn.mining_report(pairs, stats, settings, index, [], {"pairs_removed": 0})
    assert report["pairs_by_role"] == {"seed": 2, "hard_negative": 4, "random_negative": 2}
    json.dumps(report)
    assert isinstance(hn.plot_negative_ranks(pairs), Figure)
    with pytest.raises(ValueError, match="No pairs"):
        hn.save_pairs([], tmp_path)
