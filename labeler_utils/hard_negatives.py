"""Stage 03: a BM25 index, hard-negative mining with a false-negative guard, and leak-free splits.

The tokenizer and :class:`BM25Index` here are the project's one lexical retrieval implementation:
stage 02 uses them for its round-trip filter, later stages for baselines. Mining takes each kept
query, ranks the corpus with BM25 and picks negatives from a rank window, never the seed document,
its near-duplicates (MinHash over word shingles, verified by exact Jaccard) or sibling chunks of
the same source file. A small teacher-graded sample measures how many "negatives" are in fact
relevant (false negatives) per BM25 rank band. Splits are made by seed-document group, and a leak
check removes anything that overlaps the benchmark.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import unicodedata
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import snowballstemmer
from matplotlib.figure import Figure
from rank_bm25 import BM25Okapi
from tqdm.auto import tqdm

from .artifacts import InputError, atomic_write, read_jsonl, write_jsonl
from .documents import Document, document_card

STAGE = "03_hard_negatives"
CHUNK_MARKER = "#chunk"
INDEX_FORMAT = 2  # 1 was a pickle; an index is JSON now, so that a run folder's file can hold data, never code
INDEX_FILE = "bm25_index.json"
MERSENNE_PRIME = np.uint64((1 << 61) - 1)

WORD_RE = re.compile(r"[^\W_]+")
# Runs of letters/digits joined by - _ . / : PAY-4012, atlas-nightly-load-recovery.md, svc_auth, v4.2.1
IDENTIFIER_RE = re.compile(r"[^\W_]+(?:[-_./][^\W_]+)+")

ENGLISH_STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who
    whom why will with would you your yours yourself yourselves""".split()
)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerSettings:
    """How text becomes BM25 terms; saved with every index and checked when it is loaded."""

    lowercase: bool = True
    stem: bool = True
    stemmer_language: str = "english"
    english_stop_words: bool = True
    identifiers: bool = True  # add joined identifiers (PAY-4012, file names) as extra terms


class Tokenizer:
    """Split text into terms: word runs (stop words dropped, stemmed) plus intact identifiers."""

    def __init__(self, settings: TokenizerSettings = TokenizerSettings()):
        self.settings = settings
        self._stemmer = snowballstemmer.stemmer(settings.stemmer_language) if settings.stem else None

    def __call__(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFKC", text)
        if self.settings.lowercase:
            text = text.lower()
        words = WORD_RE.findall(text)
        if self.settings.english_stop_words:
            words = [word for word in words if word.lower() not in ENGLISH_STOP_WORDS]
        if self._stemmer is not None:
            words = self._stemmer.stemWords(words)
        if self.settings.identifiers:
            words.extend(IDENTIFIER_RE.findall(text))
        return words


# Plain lower-cased words: lengths, copy rates, shingles and query normalisation.
word_tokens = Tokenizer(TokenizerSettings(stem=False, english_stop_words=False, identifiers=False))


def normalize_query(query: str) -> str:
    """Lower-cased words joined by single spaces: the key for exact-duplicate and leak checks."""
    return " ".join(word_tokens(query))


# --------------------------------------------------------------------------------------------
# BM25 index
# --------------------------------------------------------------------------------------------


def corpus_fingerprint(documents: Sequence[Document]) -> str:
    """Hash of the indexed text (document cards), to notice a stale saved index."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.doc_id.encode("utf-8") + b"\0" + document_card(doc).encode("utf-8") + b"\0")
    return digest.hexdigest()


class BM25Index:
    """``BM25Okapi`` over document cards (metadata lines + text), with ranks that break ties by doc id."""

    def __init__(self, bm25: BM25Okapi, doc_ids: list[str], settings: TokenizerSettings, fingerprint: str):
        self.bm25 = bm25
        self.doc_ids = doc_ids
        self.settings = settings
        self.fingerprint = fingerprint
        self.tokenizer = Tokenizer(settings)

    @classmethod
    def build(
        cls, documents: Sequence[Document], settings: TokenizerSettings = TokenizerSettings(),
        k1: float = 1.5, b: float = 0.75,
    ) -> BM25Index:  # fmt: skip
        """Tokenize every document card and build the index (documents sorted by id)."""
        documents = sorted(documents, key=lambda d: d.doc_id)
        tokenizer = Tokenizer(settings)
        tokenized = [tokenizer(document_card(doc)) for doc in tqdm(documents, desc="Indexing for BM25")]
        return cls(BM25Okapi(tokenized, k1=k1, b=b), [d.doc_id for d in documents], settings,
                   corpus_fingerprint(documents))  # fmt: skip

    @property
    def params(self) -> dict[str, Any]:
        return {"k1": self.bm25.k1, "b": self.bm25.b, "tokenizer": asdict(self.settings)}

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document, in ``doc_ids`` order."""
        return np.asarray(self.bm25.get_scores(self.tokenizer(query)))

    def search(self, query: str, top_k: int | None = None) -> list[tuple[str, float]]:
        """Documents with a positive score, best first (ties by doc id), at most ``top_k``."""
        scores = self.scores(query)
        order = np.argsort(-scores, kind="stable")
        hits = [(self.doc_ids[i], float(scores[i])) for i in order if scores[i] > 0]
        return hits if top_k is None else hits[:top_k]

    def ranks(self, query: str) -> dict[str, int]:
        """1-based rank of every retrieved document; documents without a matching term are absent."""
        return {doc_id: rank for rank, (doc_id, _) in enumerate(self.search(query), start=1)}

    def rank_of(self, query: str, doc_id: str) -> int | None:
        """Rank of one document for ``query``, or None when BM25 does not retrieve it at all."""
        return self.ranks(query).get(doc_id)

    def save(self, path: str | Path) -> None:
        """Write the index as JSON (atomic): each document's term counts, BM25 parameters, tokenizer settings
        and corpus fingerprint. JSON, never pickle: loading a file from a run folder cannot run code."""
        payload = {"format": INDEX_FORMAT, "k1": self.bm25.k1, "b": self.bm25.b, "epsilon": self.bm25.epsilon,
                   "doc_ids": self.doc_ids, "settings": asdict(self.settings), "fingerprint": self.fingerprint,
                   "term_counts": self.bm25.doc_freqs}  # fmt: skip
        with atomic_write(path) as handle:
            json.dump(payload, handle, ensure_ascii=False)

    @classmethod
    def load(
        cls, path: str | Path, settings: TokenizerSettings | None = None,
        documents: Sequence[Document] | None = None, k1: float | None = None, b: float | None = None,
    ) -> BM25Index:  # fmt: skip
        """Load a saved index; raise ``ValueError`` when it is not one, or was built with other settings or text.

        The file is read as JSON only: an index pickled by an older version is refused, never unpickled.
        """
        try:
            payload = json.loads(Path(path).read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a JSON BM25 index (an older version's pickle is never unpickled, "
                             "as unpickling can run code); rebuild it") from exc  # fmt: skip
        if not isinstance(payload, dict) or payload.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path}: not a BM25 index of format {INDEX_FORMAT}; rebuild it")
        try:
            # Each document's terms in first-occurrence order: BM25Okapi then rebuilds identical statistics.
            corpus = [[term for term, count in counts.items() for _ in range(count)] for counts in payload["term_counts"]]
            bm25 = BM25Okapi(corpus, k1=payload["k1"], b=payload["b"], epsilon=payload["epsilon"])
            index = cls(bm25, list(payload["doc_ids"]), TokenizerSettings(**payload["settings"]), payload["fingerprint"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: a BM25 index with a missing or malformed field ({exc!r}); rebuild it") from exc
        if settings is not None and settings != index.settings:
            raise ValueError(f"{path} was built with tokenizer settings {index.settings}, not {settings}; rebuild it")
        for name, wanted in (("k1", k1), ("b", b)):
            if wanted is not None and wanted != getattr(index.bm25, name):
                raise ValueError(f"{path} was built with {name}={getattr(index.bm25, name)}, not {wanted}; rebuild it")
        if documents is not None and corpus_fingerprint(sorted(documents, key=lambda d: d.doc_id)) != index.fingerprint:
            raise ValueError(f"{path} was built over other documents than the ones given; rebuild it")
        return index


def load_or_build_index(
    path: str | Path, documents: Sequence[Document], settings: TokenizerSettings = TokenizerSettings(),
    k1: float = 1.5, b: float = 0.75,
) -> BM25Index:  # fmt: skip
    """Reuse the index saved at ``path`` when it matches settings and corpus, else build and save one."""
    if Path(path).exists():
        try:
            return BM25Index.load(path, settings, documents, k1, b)
        except ValueError as exc:
            print(f"rebuilding the BM25 index: {exc}")
    index = BM25Index.build(documents, settings, k1, b)
    index.save(path)
    return index


# --------------------------------------------------------------------------------------------
# Near-duplicates and sibling chunks: the false-negative guard
# --------------------------------------------------------------------------------------------


def shingles(text: str, size: int = 5) -> set[str]:
    """Word ``size``-grams of a text (the whole text as one shingle when it is shorter)."""
    tokens = word_tokens(text)
    if len(tokens) <= size:
        return {" ".join(tokens)} if tokens else set()
    return {" ".join(tokens[i : i + size]) for i in range(len(tokens) - size + 1)}


def jaccard(a: set[Any], b: set[Any]) -> float:
    """Jaccard similarity; two empty sets are not similar (0.0)."""
    return len(a & b) / len(a | b) if a and b else 0.0


def _lsh_rows_per_band(threshold: float, num_perm: int, recall: float = 0.99) -> int:
    """Most MinHash rows per LSH band that still find pairs at ``threshold`` with ``recall``."""
    for rows in range(num_perm, 0, -1):
        if 1 - (1 - threshold**rows) ** (num_perm // rows) >= recall:
            return rows
    return 1


def find_near_duplicates(
    documents: Sequence[Document], threshold: float = 0.5, shingle_size: int = 5,
    num_perm: int = 128, seed: int = 0,
) -> list[tuple[str, str, float]]:  # fmt: skip
    """Pairs of documents whose body shingle sets have Jaccard >= ``threshold``, as (a, b, similarity).

    MinHash signatures and LSH banding find candidate pairs without comparing every pair; each
    candidate is then verified with the exact Jaccard similarity.
    """
    rng = np.random.default_rng(seed)
    mult = rng.integers(1, 2**32, size=num_perm, dtype=np.uint64)
    add = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64)
    rows = _lsh_rows_per_band(threshold, num_perm)
    shingle_sets = {doc.doc_id: shingles(doc.text, shingle_size) for doc in documents}
    buckets: dict[tuple[int, bytes], list[str]] = defaultdict(list)
    for doc_id, doc_shingles in tqdm(shingle_sets.items(), desc="MinHash signatures"):
        if not doc_shingles:
            continue
        hashes = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in doc_shingles), dtype=np.uint64)
        # Universal hashing (a*h + b) mod p: a, h < 2**32 so a*h fits in uint64 before the modulus.
        signature = ((np.outer(hashes, mult) % MERSENNE_PRIME + add) % MERSENNE_PRIME).min(axis=0)
        for band in range(num_perm // rows):
            buckets[(band, signature[band * rows : (band + 1) * rows].tobytes())].append(doc_id)
    candidates = {tuple(sorted((a, b))) for ids in buckets.values() for i, a in enumerate(ids) for b in ids[i + 1 :]}
    pairs = [(a, b, jaccard(shingle_sets[a], shingle_sets[b])) for a, b in sorted(candidates)]
    return [(a, b, round(sim, 4)) for a, b, sim in pairs if sim >= threshold]


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


def _pair(query: dict[str, Any], doc_id: str, role: str, rank: int | None, provenance: dict[str, Any]) -> dict[str, Any]:
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
        hard = window[:n_hard] if settings.sampling == "top" else sorted(
            rng.sample(window, min(n_hard, len(window))), key=ranks.__getitem__)
        stats.short_of_hard_negatives += len(hard) < n_hard
        pairs.extend(_pair(query, doc_id, "hard_negative", ranks[doc_id], provenance) for doc_id in hard)

        skipped_top = {doc_id for doc_id, rank in ranks.items() if rank <= settings.min_rank}
        pool = [
            doc_id for doc_id in index.doc_ids
            if doc_id not in skipped_top and doc_id not in hard
            and _exclusion_reason(doc_id, seed_doc_id, groups, blocked) is None
        ]  # fmt: skip
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
        raise ValueError(f"on_leak must be 'drop' or 'raise' and documents 'exclude' or 'allow', "
                         f"got {on_leak!r} and {documents!r}")  # fmt: skip
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
    pairs: Sequence[dict[str, Any]], size: int, seed: int = 0,
    bands: Sequence[tuple[int, int | None]] = RANK_BANDS,
) -> list[dict[str, Any]]:  # fmt: skip
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
        rows.append({"pair_id": pair["pair_id"], "query": pair["query"], "doc_id": pair["doc_id"],
                     "role": pair["role"], "bm25_rank": pair["bm25_rank"],
                     "rank_band": rank_band(pair["bm25_rank"], bands), "grade": grade})  # fmt: skip
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
        rows.append({"rank_band": label, "sampled": len(band), "graded": len(grades),
                     "false_negatives": false_negatives,
                     "false_negative_rate": false_negatives / len(grades) if len(grades) else float("nan")})  # fmt: skip
    return pd.DataFrame(rows)


def plot_false_negative_rates(rates: pd.DataFrame) -> Figure:
    """Bar chart of the false-negative rate per rank band, annotated with n graded."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    shown = rates[rates["sampled"] > 0]
    bars = ax.bar(shown["rank_band"], shown["false_negative_rate"].fillna(0.0), color="tab:red")
    for bar, sampled, graded, fn in zip(bars, shown["sampled"], shown["graded"], shown["false_negatives"]):
        ax.annotate(f"{fn}/{graded} graded\n({sampled} sampled)", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set(ylim=(0, 1.1), xlabel="BM25 rank band of the negative", ylabel="false-negative rate",
           title="Teacher-verified sample: mined negatives graded relevant")  # fmt: skip
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
