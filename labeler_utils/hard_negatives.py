"""Stage 03: hard-negative mining with a false-negative guard, and leak-free splits.

The corpus is ranked with the BM25 index of :mod:`labeler_utils.text`. Mining takes each kept
query, ranks the corpus with BM25 and picks negatives from a rank window, never the seed document,
its near-duplicates (MinHash over word shingles, verified by exact Jaccard) or sibling chunks of
the same source file. A small teacher-graded sample measures how many "negatives" are in fact
relevant (false negatives) per BM25 rank band. Splits are made by seed-document group, and a leak
check removes anything that overlaps the benchmark.
"""

from __future__ import annotations

import os
import random
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .core.artifacts import InputError, read_jsonl, write_jsonl
from .core.config import STAGES
from .core.records import parse_grade_answer
from .documents import Document, document_card
from .llm.client import LLMClient, Message, parse_with_retries
from .text import (
    BM25Index,
    normalize_query,
)

STAGE = STAGES[3]  # this stage's folder in a run folder
CHUNK_MARKER = "#chunk"


def source_id(doc_id: str) -> str:
    """The source file of a chunk id (``handbook.md#chunk3`` -> ``handbook.md``)."""
    return doc_id.split(CHUNK_MARKER, 1)[0]


def document_groups(doc_ids: Iterable[str], near_duplicate_pairs: Iterable[tuple[str, str, float]]) -> dict[str, str]:
    """Group id per document: connected components of near-duplicate and same-source links."""
    parent = {doc_id: doc_id for doc_id in doc_ids}

    def root(doc_id: str) -> str:
        while parent[doc_id] != doc_id:
            parent[doc_id] = parent[parent[doc_id]]
            doc_id = parent[doc_id]
        return doc_id

    def union(a: str, b: str) -> None:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    by_source: dict[str, list[str]] = defaultdict(list)
    for doc_id in parent:
        by_source[source_id(doc_id)].append(doc_id)
    for members in by_source.values():
        for other in members[1:]:
            union(members[0], other)
    for a, b, _ in near_duplicate_pairs:
        union(a, b)
    return {doc_id: root(doc_id) for doc_id in parent}


# --------------------------------------------------------------------------------------------
# Mining
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MiningSettings:
    """Controls of hard-negative mining (recorded with every pair)."""

    negatives_per_query: int = 4
    min_rank: int = 0  # skip ranks 1..min_rank: likely relevant, never used as negatives
    max_rank: int = 30  # hard negatives come from ranks min_rank+1..max_rank
    random_share: float = 0.25  # share of each query's negatives drawn at random from the corpus
    sampling: Literal["top", "random"] = "top"  # hardest first, or uniformly within the window
    near_duplicate_threshold: float = 0.5
    shingle_size: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.min_rank < self.max_rank:
            raise ValueError(f"Need 0 <= min_rank < max_rank, got {self.min_rank} and {self.max_rank}")
        if not 0.0 <= self.random_share <= 1.0:
            raise ValueError(f"random_share must be within [0, 1], got {self.random_share}")
        if self.sampling not in ("top", "random"):
            raise ValueError(f"sampling must be 'top' or 'random', got {self.sampling!r}")


@dataclass
class MiningStats:
    """What mining skipped and where it fell short."""

    queries: int = 0
    excluded_in_window: Counter[str] = field(default_factory=Counter)  # reason -> count
    short_of_hard_negatives: int = 0  # queries whose window had too few eligible documents
    short_of_random_negatives: int = 0
    seed_not_retrieved: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "excluded_in_window": dict(self.excluded_in_window)}


def _exclusion_reason(doc_id: str, seed_doc_id: str, groups: dict[str, str], blocked: frozenset[str]) -> str | None:
    if doc_id == seed_doc_id:
        return "seed"
    if source_id(doc_id) == source_id(seed_doc_id):
        return "sibling_chunk"
    if groups.get(doc_id, doc_id) == groups.get(seed_doc_id, seed_doc_id):
        return "near_duplicate"
    if doc_id in blocked:
        return "blocked"
    return None


def _pair(
    query: dict[str, Any], doc_id: str, role: str, rank: int | None, provenance: dict[str, Any]
) -> dict[str, Any]:
    return {
        "pair_id": f"{query['query_id']}::{doc_id}",
        "query_id": query["query_id"],
        "query": query["query"],
        "query_type": query.get("query_type"),
        "seed_doc_id": query["seed_doc_id"],
        "doc_id": doc_id,
        "role": role,
        "bm25_rank": rank,
        "split": None,
        "generator_model": query.get("generator_model"),
        "prompt_hash": query.get("prompt_hash"),
        **provenance,
    }


def mine_negatives(
    queries: Sequence[dict[str, Any]],
    index: BM25Index,
    settings: MiningSettings,
    groups: dict[str, str] | None = None,
    blocked_doc_ids: Iterable[str] = (),
) -> tuple[list[dict[str, Any]], MiningStats]:
    """One ``seed`` pair plus hard and random negatives per query.

    Never a negative: the seed document, its sibling chunks, its near-duplicate group (``groups``
    from :func:`document_groups`), ``blocked_doc_ids`` (e.g. benchmark documents) and any document
    ranked 1..``min_rank``. Each query gets its own seeded random generator, so adding queries does
    not change the negatives of the others.
    """
    groups = groups or {}
    blocked = frozenset(blocked_doc_ids)
    n_random = int(settings.negatives_per_query * settings.random_share + 0.5)  # half up: 2 x 0.25 -> 1
    n_hard = settings.negatives_per_query - n_random
    provenance = {"mining_params": {**asdict(settings), "bm25": index.params}, "seed": settings.seed}
    stats = MiningStats()
    pairs: list[dict[str, Any]] = []
    for query in tqdm(queries, desc="Mining negatives"):
        stats.queries += 1
        rng = random.Random(f"{settings.seed}:{query['query_id']}")
        seed_doc_id = query["seed_doc_id"]
        ranks = index.ranks(query["query"])
        stats.seed_not_retrieved += seed_doc_id not in ranks
        pairs.append(_pair(query, seed_doc_id, "seed", ranks.get(seed_doc_id), provenance))

        window: list[str] = []
        for doc_id, rank in ranks.items():
            if settings.min_rank < rank <= settings.max_rank:
                reason = _exclusion_reason(doc_id, seed_doc_id, groups, blocked)
                if reason is None:
                    window.append(doc_id)
                else:
                    stats.excluded_in_window[reason] += 1
        hard = (
            window[:n_hard]
            if settings.sampling == "top"
            else sorted(rng.sample(window, min(n_hard, len(window))), key=ranks.__getitem__)
        )
        stats.short_of_hard_negatives += len(hard) < n_hard
        pairs.extend(_pair(query, doc_id, "hard_negative", ranks[doc_id], provenance) for doc_id in hard)

        skipped_top = {doc_id for doc_id, rank in ranks.items() if rank <= settings.min_rank}
        pool = [
            doc_id
            for doc_id in index.doc_ids
            if doc_id not in skipped_top
            and doc_id not in hard
            and _exclusion_reason(doc_id, seed_doc_id, groups, blocked) is None
        ]
        randoms = rng.sample(pool, min(n_random, len(pool)))
        stats.short_of_random_negatives += len(randoms) < n_random
        pairs.extend(_pair(query, doc_id, "random_negative", ranks.get(doc_id), provenance) for doc_id in randoms)
    return pairs, stats


# --------------------------------------------------------------------------------------------
# Splits and the benchmark leak check
# --------------------------------------------------------------------------------------------


def assign_splits(
    pairs: list[dict[str, Any]], groups: dict[str, str], dev_fraction: float, seed: int = 0
) -> dict[str, str]:
    """Set each pair's ``split`` by its seed document's group; returns group -> split.

    Near-duplicate seed documents and chunks of one file share a group, so a query and its
    paraphrase-like neighbours never end up on both sides.
    """
    if not 0.0 <= dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be within [0, 1), got {dev_fraction}")
    seed_groups = sorted({groups.get(p["seed_doc_id"], p["seed_doc_id"]) for p in pairs})
    random.Random(seed).shuffle(seed_groups)
    n_dev = round(len(seed_groups) * dev_fraction)
    if dev_fraction > 0 and len(seed_groups) >= 2:
        n_dev = min(max(n_dev, 1), len(seed_groups) - 1)
    split_of = {group: ("dev" if i < n_dev else "train") for i, group in enumerate(seed_groups)}
    for pair in pairs:
        pair["split"] = split_of[groups.get(pair["seed_doc_id"], pair["seed_doc_id"])]
    return split_of


def check_split_isolation(pairs: Sequence[dict[str, Any]], groups: dict[str, str]) -> None:
    """Raise ``ValueError`` if a seed-document group or a normalised query is in both splits."""
    for key_name, key in (
        ("seed document group", lambda p: groups.get(p["seed_doc_id"], p["seed_doc_id"])),
        ("query", lambda p: normalize_query(p["query"])),
    ):
        splits_of: dict[str, set[str]] = defaultdict(set)
        for pair in pairs:
            splits_of[key(pair)].add(pair["split"])
        leaked = sorted(k for k, splits in splits_of.items() if len(splits) > 1)
        if leaked:
            raise ValueError(f"{len(leaked)} {key_name}(s) appear in more than one split, e.g. {leaked[:3]}")


def read_benchmark(path: str | Path) -> tuple[set[str], set[str]]:
    """The benchmark's queries and document ids (JSONL with ``query`` and ``doc_id``)."""
    records = read_jsonl(path, required=("query", "doc_id"))
    return {r["query"] for r in records}, {r["doc_id"] for r in records}


def with_group_members(doc_ids: Iterable[str], groups: dict[str, str]) -> set[str]:
    """The documents plus every document sharing a group with one of them (near-duplicates, chunks)."""
    wanted = {groups.get(doc_id, doc_id) for doc_id in doc_ids}
    return set(doc_ids) | {doc_id for doc_id, group in groups.items() if group in wanted}


def remove_benchmark_leaks(
    pairs: Sequence[dict[str, Any]],
    benchmark_queries: Iterable[str],
    benchmark_doc_ids: Iterable[str],
    documents: Literal["exclude", "allow"] = "exclude",
    on_leak: Literal["drop", "raise"] = "drop",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Remove training pairs that overlap the benchmark; returns (clean pairs, report).

    A query whose normalised text equals a benchmark query is always dropped with all its pairs.
    With ``documents="exclude"`` (document-disjoint evaluation) a query written from a benchmark
    document is dropped too, and any other pair whose document is a benchmark document; pass the
    benchmark ids expanded by :func:`with_group_members` so their near-duplicates count as well.
    ``documents="allow"`` (a labeler trained for the very corpus it is evaluated on) only counts
    those pairs. ``on_leak="raise"`` raises ``ValueError`` instead of dropping anything.
    """
    if on_leak not in ("drop", "raise") or documents not in ("exclude", "allow"):
        raise ValueError(
            f"on_leak must be 'drop' or 'raise' and documents 'exclude' or 'allow', got {on_leak!r} and {documents!r}"
        )
    query_keys = {normalize_query(q) for q in benchmark_queries}
    doc_ids = set(benchmark_doc_ids)
    leaked_queries = {p["query_id"] for p in pairs if normalize_query(p["query"]) in query_keys}
    from_benchmark_docs = {p["query_id"] for p in pairs if p["seed_doc_id"] in doc_ids} - leaked_queries
    with_benchmark_doc = [p for p in pairs if p["doc_id"] in doc_ids and p["query_id"] not in leaked_queries]
    excluding = documents == "exclude"
    dropped_queries = leaked_queries | (from_benchmark_docs if excluding else set())
    clean = [p for p in pairs if p["query_id"] not in dropped_queries and not (excluding and p["doc_id"] in doc_ids)]
    report = {
        "on_leak": on_leak,
        "benchmark_documents_policy": documents,
        "benchmark_queries": len(query_keys),
        "benchmark_documents": len(doc_ids),
        "queries_matching_benchmark_query": len(leaked_queries),
        "queries_seeded_from_benchmark_document": len(from_benchmark_docs),
        "pairs_with_benchmark_document": len(with_benchmark_doc),
        "pairs_removed": len(pairs) - len(clean),
    }
    if on_leak == "raise" and report["pairs_removed"]:
        raise ValueError(f"Training pairs overlap the benchmark: {report}")
    return clean, report


# --------------------------------------------------------------------------------------------
# Teacher-verified sample: false negatives by BM25 rank band
# --------------------------------------------------------------------------------------------

RANK_BANDS: tuple[tuple[int, int | None], ...] = ((1, 3), (4, 10), (11, 30), (31, None))
UNRANKED = "not retrieved"


def rank_band(rank: int | None, bands: Sequence[tuple[int, int | None]] = RANK_BANDS) -> str:
    """Label of the band holding ``rank`` ("1-3", "31+", or "not retrieved" for None)."""
    if rank is None:
        return UNRANKED
    for low, high in bands:
        if rank >= low and (high is None or rank <= high):
            return f"{low}+" if high is None else f"{low}-{high}"
    raise ValueError(f"Rank {rank} is in none of the bands {bands}")


def band_order(bands: Sequence[tuple[int, int | None]] = RANK_BANDS) -> list[str]:
    """Band labels from best rank to worst, then the unranked band."""
    return [rank_band(low, bands) for low, _ in bands] + [UNRANKED]


def stratified_negative_sample(
    pairs: Sequence[dict[str, Any]],
    size: int,
    seed: int = 0,
    bands: Sequence[tuple[int, int | None]] = RANK_BANDS,
) -> list[dict[str, Any]]:
    """Up to ``size`` negative pairs spread evenly over rank bands (round-robin, seeded)."""
    rng = random.Random(seed)
    by_band: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for pair in pairs:
        if pair["role"] != "seed":
            by_band[rank_band(pair["bm25_rank"], bands)].append(pair)
    queues = []
    for label in band_order(bands):
        members = list(by_band.get(label, []))
        rng.shuffle(members)
        queues.append(members)
    sample: list[dict[str, Any]] = []
    while len(sample) < size and any(queues):
        for queue in queues:
            if queue and len(sample) < size:
                sample.append(queue.pop())
    return sample


SAMPLE_CHECK_SYSTEM = "You grade search results. Answer with one digit: 0, 1, 2 or 3."
SAMPLE_CHECK_PROMPT = (
    "Document:\n{card}\n\nSearch query: {query}\n\n3 = answers the query fully, 2 = answers it partly, "
    "1 = on topic but does not answer, 0 = irrelevant.\nGrade (0, 1, 2 or 3):"
)


def sample_check_messages(query: str, document: Document, card_chars: int = 1200) -> list[Message]:
    """The minimal one-digit grading prompt of the false-negative check (stage 04 has the full rubric)."""
    card = document_card(document, card_chars)
    return [
        {"role": "system", "content": SAMPLE_CHECK_SYSTEM},
        {"role": "user", "content": SAMPLE_CHECK_PROMPT.format(query=query, card=card)},
    ]


def sample_check_grader(client: LLMClient, card_chars: int = 1200) -> Callable[[str, Document], int | None]:
    """A ``grade_fn`` for :func:`verify_negatives`: :func:`sample_check_messages` through ``client``.

    The answer is read by the teacher's strict :func:`~labeler_utils.core.records.parse_grade_answer` (a bare
    digit, ``Final grade: N`` or JSON); one that does not parse is retried once with a new seed,
    then recorded as unparseable under this stage and graded ``None``.
    """

    def grade(query: str, document: Document) -> int | None:
        value, _ = parse_with_retries(
            client, sample_check_messages(query, document, card_chars), parse_grade_answer, stage=STAGE, max_tokens=4
        )
        return value

    return grade


def verify_negatives(
    sample: Sequence[dict[str, Any]],
    documents_by_id: dict[str, Document],
    grade_fn: Callable[[str, Document], int | None],
    bands: Sequence[tuple[int, int | None]] = RANK_BANDS,
) -> pd.DataFrame:
    """Grade each sampled negative with ``grade_fn(query, document)``; one row per pair."""
    rows = []
    for pair in tqdm(sample, desc="Grading negative sample"):
        grade = grade_fn(pair["query"], documents_by_id[pair["doc_id"]])
        rows.append(
            {
                "pair_id": pair["pair_id"],
                "query": pair["query"],
                "doc_id": pair["doc_id"],
                "role": pair["role"],
                "bm25_rank": pair["bm25_rank"],
                "rank_band": rank_band(pair["bm25_rank"], bands),
                "grade": grade,
            }
        )
    return pd.DataFrame(rows, columns=["pair_id", "query", "doc_id", "role", "bm25_rank", "rank_band", "grade"])


def false_negative_rates(
    graded: pd.DataFrame, relevant_grade: int = 2, bands: Sequence[tuple[int, int | None]] = RANK_BANDS
) -> pd.DataFrame:
    """Per rank band: sampled, graded (grade not None), false negatives (grade >= ``relevant_grade``), rate."""
    rows = []
    for label in band_order(bands):
        band = graded[graded["rank_band"] == label]
        grades = band["grade"].dropna()
        false_negatives = int((grades >= relevant_grade).sum())
        rows.append(
            {
                "rank_band": label,
                "sampled": len(band),
                "graded": len(grades),
                "false_negatives": false_negatives,
                "false_negative_rate": false_negatives / len(grades) if len(grades) else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def plot_false_negative_rates(rates: pd.DataFrame) -> Figure:
    """Bar chart of the false-negative rate per rank band, annotated with n graded."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    shown = rates[rates["sampled"] > 0]
    bars = ax.bar(shown["rank_band"], shown["false_negative_rate"].fillna(0.0), color="tab:red")
    for bar, sampled, graded, fn in zip(bars, shown["sampled"], shown["graded"], shown["false_negatives"]):
        ax.annotate(
            f"{fn}/{graded} graded\n({sampled} sampled)",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set(
        ylim=(0, 1.1),
        xlabel="BM25 rank band of the negative",
        ylabel="false-negative rate",
        title="Teacher-verified sample: mined negatives graded relevant",
    )
    fig.tight_layout()
    return fig


def plot_negative_ranks(pairs: Sequence[dict[str, Any]]) -> Figure:
    """Histogram of BM25 ranks by role (hard / random negatives, seed)."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ranked = [p["bm25_rank"] for p in pairs if p["bm25_rank"] is not None]
    bins = np.arange(1, max(ranked, default=1) + 2) - 0.5
    for role, color in (("seed", "tab:green"), ("hard_negative", "tab:red"), ("random_negative", "tab:gray")):
        ranks = [p["bm25_rank"] for p in pairs if p["role"] == role and p["bm25_rank"] is not None]
        unranked = sum(p["role"] == role and p["bm25_rank"] is None for p in pairs)
        ax.hist(ranks, bins=bins, alpha=0.6, color=color, label=f"{role} ({unranked} not retrieved)")
    ax.set(xlabel="BM25 rank for the query", ylabel="pairs", title="Where the pairs rank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def save_pairs(pairs: Sequence[dict[str, Any]], stage_path: str | Path) -> dict[str, Path]:
    """Write ``pairs.jsonl`` and the same rows as a Hugging Face dataset in ``dataset/``."""
    from datasets import Dataset

    stage_path = Path(stage_path)
    if not pairs:
        raise ValueError("No pairs to save: every query was filtered out or removed by the leak check")
    jsonl_path = stage_path / "pairs.jsonl"
    write_jsonl(jsonl_path, pairs)
    dataset_path, partial = stage_path / "dataset", stage_path / ".dataset.partial"
    shutil.rmtree(partial, ignore_errors=True)
    Dataset.from_list(list(pairs)).save_to_disk(str(partial))
    shutil.rmtree(dataset_path, ignore_errors=True)
    os.replace(partial, dataset_path)
    return {"pairs": jsonl_path, "dataset": dataset_path}


def mining_report(
    pairs: Sequence[dict[str, Any]],
    stats: MiningStats,
    settings: MiningSettings,
    index: BM25Index,
    near_duplicate_pairs: Sequence[tuple[str, str, float]],
    leak_report: dict[str, Any],
) -> dict[str, Any]:
    """Everything needed to audit a mining run, as JSON-ready data."""
    return {
        "settings": asdict(settings),
        "bm25": index.params,
        "corpus_documents": len(index.doc_ids),
        "queries": len({p["query_id"] for p in pairs}),
        "pairs_by_role": dict(Counter(p["role"] for p in pairs)),
        "pairs_by_split": dict(Counter(p["split"] for p in pairs)),
        "queries_by_split": dict(Counter(s for _, s in {(p["query_id"], p["split"]) for p in pairs})),
        "mining": stats.to_dict(),
        "near_duplicate_pairs": [list(pair) for pair in near_duplicate_pairs],
        "benchmark_leak_check": leak_report,
    }


def read_queries_for_mining(path: str | Path) -> list[dict[str, Any]]:
    """Stage 02's kept queries, checked for the fields mining needs."""
    queries = read_jsonl(path, required=("query_id", "query", "seed_doc_id"))
    if not queries:
        raise InputError(f"{path}: no queries; stage 02 kept none (see its filter_report.json)")
    return queries
