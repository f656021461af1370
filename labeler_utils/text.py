"""Text utilities the stages share: the tokenizer, the BM25 index, word shingles and near-duplicate detection.

The tokenizer and :class:`BM25Index` are the project's one lexical retrieval implementation:
stage 02 uses them for its round-trip filter, stage 03 to mine hard negatives, stage 06 for its
BM25 baseline runs. Near-duplicates are found with MinHash over word shingles, verified by exact
Jaccard similarity. A saved index is JSON (never a pickle), so a shared run folder holds data only.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import snowballstemmer
from rank_bm25 import BM25Okapi
from tqdm.auto import tqdm

from .core.artifacts import atomic_write
from .documents import Document, document_card

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
        cls,
        documents: Sequence[Document],
        settings: TokenizerSettings = TokenizerSettings(),
        k1: float = 1.5,
        b: float = 0.75,
    ) -> BM25Index:
        """Tokenize every document card and build the index (documents sorted by id)."""
        documents = sorted(documents, key=lambda d: d.doc_id)
        tokenizer = Tokenizer(settings)
        tokenized = [tokenizer(document_card(doc)) for doc in tqdm(documents, desc="Indexing for BM25")]
        return cls(
            BM25Okapi(tokenized, k1=k1, b=b), [d.doc_id for d in documents], settings, corpus_fingerprint(documents)
        )

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
        payload = {
            "format": INDEX_FORMAT,
            "k1": self.bm25.k1,
            "b": self.bm25.b,
            "epsilon": self.bm25.epsilon,
            "doc_ids": self.doc_ids,
            "settings": asdict(self.settings),
            "fingerprint": self.fingerprint,
            "term_counts": self.bm25.doc_freqs,
        }
        with atomic_write(path) as handle:
            json.dump(payload, handle, ensure_ascii=False)

    @classmethod
    def load(
        cls,
        path: str | Path,
        settings: TokenizerSettings | None = None,
        documents: Sequence[Document] | None = None,
        k1: float | None = None,
        b: float | None = None,
    ) -> BM25Index:
        """Load a saved index; raise ``ValueError`` when it is not one, or was built with other settings or text.

        The file is read as JSON only: an index pickled by an older version is refused, never unpickled.
        """
        try:
            payload = json.loads(Path(path).read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"{path}: not a JSON BM25 index (an older version's pickle is never unpickled, "
                "as unpickling can run code); rebuild it"
            ) from exc
        if not isinstance(payload, dict) or payload.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path}: not a BM25 index of format {INDEX_FORMAT}; rebuild it")
        try:
            # Each document's terms in first-occurrence order: BM25Okapi then rebuilds identical statistics.
            corpus = [
                [term for term, count in counts.items() for _ in range(count)] for counts in payload["term_counts"]
            ]
            bm25 = BM25Okapi(corpus, k1=payload["k1"], b=payload["b"], epsilon=payload["epsilon"])
            index = cls(
                bm25, list(payload["doc_ids"]), TokenizerSettings(**payload["settings"]), payload["fingerprint"]
            )
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
    path: str | Path,
    documents: Sequence[Document],
    settings: TokenizerSettings = TokenizerSettings(),
    k1: float = 1.5,
    b: float = 0.75,
) -> BM25Index:
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
    documents: Sequence[Document],
    threshold: float = 0.5,
    shingle_size: int = 5,
    num_perm: int = 128,
    seed: int = 0,
) -> list[tuple[str, str, float]]:
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
