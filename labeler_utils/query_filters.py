"""Stage 02's filtering stage: the query filters, their report, and the filter diagnostics.

Filters drop bad synthetic queries (from :mod:`labeler_utils.query_synthesis`) and report how
many each removed, in order: length bounds, exact and near duplicates (also of the texts in the
prompt: few-shot examples, instructions), copied spans from the document, and the round-trip
check that BM25 finds the seed document in its top-k (InPars / Promptagator style). Also here:
the per-query metrics the filters read (copy rate, seed overlap, seed BM25 rank) and the plots
of them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .documents import Document, document_card
from .text import BM25Index, Tokenizer, jaccard, normalize_query, word_tokens

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class FilterSettings:
    """Thresholds of the query filters."""

    min_tokens: int = 2
    max_tokens: int = 20
    near_duplicate_threshold: float = 0.8  # token Jaccard of stemmed content words
    copy_ngram: int = 5
    max_copy_rate: float = 0.75  # share of the query's word n-grams found verbatim in the document
    copy_exempt_types: tuple[str, ...] = ("navigational",)  # known-item queries quote titles by design
    roundtrip_top_k: int = 3
    roundtrip_fallback: bool = True  # keep each document's best-ranked query when none passes


def copy_rate(query: str, document_text: str, n: int = 5) -> float:
    """Share of the query's word ``n``-grams that appear verbatim in the document (0 if shorter than n)."""
    query_tokens = word_tokens(query)
    grams = [tuple(query_tokens[i : i + n]) for i in range(len(query_tokens) - n + 1)]
    if not grams:
        return 0.0
    doc_tokens = word_tokens(document_text)
    doc_grams = {tuple(doc_tokens[i : i + n]) for i in range(len(doc_tokens) - n + 1)}
    return sum(gram in doc_grams for gram in grams) / len(grams)


def seed_overlap(query: str, document_text: str) -> float:
    """Share of the query's distinct words that occur in the document (lexical overlap)."""
    query_words = set(word_tokens(query))
    return len(query_words & set(word_tokens(document_text))) / len(query_words) if query_words else 0.0


def add_query_metrics(
    queries: list[dict[str, Any]], documents_by_id: dict[str, Document], index: BM25Index, copy_ngram: int = 5
) -> None:
    """Add ``n_tokens``, ``copy_rate``, ``seed_overlap`` and ``seed_bm25_rank`` to each query row."""
    for row in tqdm(queries, desc="Query metrics"):
        doc = documents_by_id[row["seed_doc_id"]]
        card = document_card(doc)
        row["n_tokens"] = len(word_tokens(row["query"]))
        row["copy_rate"] = round(copy_rate(row["query"], card, copy_ngram), 4)
        row["seed_overlap"] = round(seed_overlap(row["query"], card), 4)
        row["seed_bm25_rank"] = index.rank_of(row["query"], doc.doc_id)


def _reject(row: dict[str, Any], filter_name: str, detail: str) -> dict[str, Any]:
    return {**row, "rejected_by": filter_name, "reject_detail": detail}


def filter_length(queries: Sequence[dict[str, Any]], min_tokens: int, max_tokens: int) -> tuple[Rows, Rows]:
    """Keep queries with ``min_tokens`` to ``max_tokens`` words."""
    kept, rejected = [], []
    for row in queries:
        count = len(word_tokens(row["query"]))
        if min_tokens <= count <= max_tokens:
            kept.append(row)
        else:
            rejected.append(_reject(row, "length", f"{count} tokens, allowed {min_tokens}-{max_tokens}"))
    return kept, rejected


def filter_exact_duplicates(
    queries: Sequence[dict[str, Any]], reference_queries: Sequence[str] = ()
) -> tuple[Rows, Rows]:
    """Drop queries whose normalised text was seen before (in ``reference_queries`` or earlier rows)."""
    seen = {normalize_query(q): "a prompt text" for q in reference_queries}
    kept, rejected = [], []
    for row in queries:
        key = normalize_query(row["query"])
        if key in seen:
            rejected.append(_reject(row, "exact_duplicate", f"same as {seen[key]}"))
        else:
            seen[key] = row["query_id"]
            kept.append(row)
    return kept, rejected


def filter_near_duplicates(
    queries: Sequence[dict[str, Any]], threshold: float, reference_queries: Sequence[str] = ()
) -> tuple[Rows, Rows]:
    """Drop queries whose stemmed content words have Jaccard >= ``threshold`` with an earlier one."""
    content_terms = Tokenizer()
    seen: list[tuple[str, set[str]]] = [("a prompt text", set(content_terms(q))) for q in reference_queries]
    postings: dict[str, list[int]] = defaultdict(list)  # term -> positions in ``seen``
    for position, (_, terms) in enumerate(seen):
        for term in terms:
            postings[term].append(position)
    kept, rejected = [], []
    for row in queries:
        terms = set(content_terms(row["query"]))
        candidates = {position for term in terms for position in postings.get(term, ())}
        best = max(((jaccard(terms, seen[p][1]), p) for p in candidates), default=(0.0, -1))
        if best[0] >= threshold:
            rejected.append(_reject(row, "near_duplicate", f"Jaccard {best[0]:.2f} with {seen[best[1]][0]}"))
            continue
        for term in terms:
            postings[term].append(len(seen))
        seen.append((row["query_id"], terms))
        kept.append(row)
    return kept, rejected


def filter_copied(
    queries: Sequence[dict[str, Any]], max_copy_rate: float, exempt_types: Sequence[str] = ()
) -> tuple[Rows, Rows]:
    """Drop queries whose ``copy_rate`` (see :func:`add_query_metrics`) exceeds ``max_copy_rate``."""
    kept, rejected = [], []
    for row in queries:
        if row["query_type"] not in exempt_types and row["copy_rate"] > max_copy_rate:
            rejected.append(_reject(row, "copied_from_document", f"copy rate {row['copy_rate']:.2f}"))
        else:
            kept.append(row)
    return kept, rejected


def filter_roundtrip(queries: Sequence[dict[str, Any]], top_k: int, fallback: bool = True) -> tuple[Rows, Rows, int]:
    """Keep queries whose seed document ranks within BM25 ``top_k`` (``seed_bm25_rank``).

    With ``fallback``, a document left without any query keeps its best-ranked one (the seed must
    at least be retrieved), flagged ``roundtrip_fallback=True``; returns (kept, rejected, readmitted).
    """
    kept, failed = [], []
    for row in queries:
        rank = row["seed_bm25_rank"]
        (kept if rank is not None and rank <= top_k else failed).append({**row, "roundtrip_fallback": False})
    readmitted = []
    if fallback:
        covered = {row["seed_doc_id"] for row in kept}
        best: dict[str, dict[str, Any]] = {}
        for row in failed:
            doc_id, rank = row["seed_doc_id"], row["seed_bm25_rank"]
            if (
                doc_id not in covered
                and rank is not None
                and (doc_id not in best or rank < best[doc_id]["seed_bm25_rank"])
            ):
                best[doc_id] = row
        readmitted = [{**row, "roundtrip_fallback": True} for row in best.values()]
    readmitted_ids = {row["query_id"] for row in readmitted}
    rejected = [
        _reject(
            row,
            "roundtrip",
            "seed not retrieved"
            if row["seed_bm25_rank"] is None
            else f"seed at BM25 rank {row['seed_bm25_rank']} > {top_k}",
        )
        for row in failed
        if row["query_id"] not in readmitted_ids
    ]
    return kept + readmitted, rejected, len(readmitted)


@dataclass
class FilterReport:
    """How many queries each filter removed, in the order they ran."""

    rows: list[dict[str, Any]]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["filter", "input", "removed", "readmitted", "kept", "setting"])

    def to_dict(self) -> dict[str, Any]:
        return {"filters": self.rows}


def apply_filters(
    queries: Sequence[dict[str, Any]],
    documents_by_id: dict[str, Document],
    index: BM25Index,
    settings: FilterSettings = FilterSettings(),
    reference_queries: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], FilterReport]:
    """Run all filters in order; returns (kept, rejected with ``rejected_by``, report).

    ``reference_queries`` (:func:`prompt_reference_queries`) count as already seen by the duplicate
    filters, so queries parroted from the prompt (examples, instructions) are removed.
    """
    rows = [dict(row) for row in queries]
    add_query_metrics(rows, documents_by_id, index, settings.copy_ngram)
    report_rows: list[dict[str, Any]] = []
    all_rejected: list[dict[str, Any]] = []

    def record(name: str, setting: str, before: int, kept: Rows, rejected: Rows, readmitted: int = 0) -> Rows:
        report_rows.append(
            {
                "filter": name,
                "input": before,
                "removed": len(rejected),
                "readmitted": readmitted,
                "kept": len(kept),
                "setting": setting,
            }
        )
        all_rejected.extend(rejected)
        return kept

    s = settings
    rows = record(
        "length", f"{s.min_tokens}-{s.max_tokens} tokens", len(rows), *filter_length(rows, s.min_tokens, s.max_tokens)
    )
    rows = record(
        "exact_duplicate",
        "normalised text, incl. prompt texts",
        len(rows),
        *filter_exact_duplicates(rows, reference_queries),
    )
    rows = record(
        "near_duplicate",
        f"Jaccard >= {s.near_duplicate_threshold}",
        len(rows),
        *filter_near_duplicates(rows, s.near_duplicate_threshold, reference_queries),
    )
    rows = record(
        "copied_from_document",
        f"{s.copy_ngram}-gram copy rate > {s.max_copy_rate}",
        len(rows),
        *filter_copied(rows, s.max_copy_rate, s.copy_exempt_types),
    )
    rows = record(
        "roundtrip",
        f"seed in BM25 top {s.roundtrip_top_k}" + (" (fallback on)" if s.roundtrip_fallback else ""),
        len(rows),
        *filter_roundtrip(rows, s.roundtrip_top_k, s.roundtrip_fallback),
    )
    return rows, all_rejected, FilterReport(report_rows)


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------


def plot_seed_overlap(kept: Sequence[dict[str, Any]], rejected: Sequence[dict[str, Any]]) -> Figure:
    """Lexical overlap (share of query words in the seed document) and copy rate, kept vs rejected."""
    fig = Figure(figsize=(8, 3.5))
    axes = fig.subplots(1, 2)
    bins = np.linspace(0, 1, 11)
    for ax, metric in zip(axes, ("seed_overlap", "copy_rate")):
        for rows, label, color in ((kept, "kept", "tab:green"), (rejected, "rejected", "tab:gray")):
            values = [r[metric] for r in rows if r.get(metric) is not None]
            ax.hist(values, bins=bins, alpha=0.6, label=f"{label} (n={len(values)})", color=color)
        ax.set(xlabel=metric.replace("_", " "), ylabel="queries")
        ax.legend(fontsize=8)
    axes[0].set_title("Query words found in the seed document")
    axes[1].set_title("Verbatim n-gram copy rate")
    fig.tight_layout()
    return fig


def plot_seed_rank(queries: Sequence[dict[str, Any]], top_k: int) -> Figure:
    """Histogram of the seed document's BM25 rank for its query (last bar: not retrieved)."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ranks = [r["seed_bm25_rank"] for r in queries if r.get("seed_bm25_rank") is not None]
    missing = sum(r.get("seed_bm25_rank") is None for r in queries)
    not_retrieved_at = max(ranks + [top_k]) + 2
    ax.hist(ranks, bins=np.arange(1, not_retrieved_at) - 0.5, color="tab:blue", label="seed rank")
    ax.bar([not_retrieved_at], [missing], width=1.0, color="tab:gray", label=f"not retrieved ({missing})")
    ax.axvline(top_k + 0.5, color="tab:red", linestyle="--", label=f"round-trip cut (top {top_k})")
    ax.set(
        xlabel="BM25 rank of the seed document for its query",
        ylabel="queries",
        title="Round trip: can BM25 find the seed document?",
    )
    ax.legend()
    fig.tight_layout()
    return fig
