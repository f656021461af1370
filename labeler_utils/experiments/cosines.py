"""The untrained encoder's cosine of each pair, computed once per encoder and shared by every split and protocol.

A zero-shot cosine row differs between splits only in its cut points (the teacher's grade shares on the
split's training pairs); the cosine of a pair does not depend on the split. So each pair is embedded
once: ``<work-dir>/<baseline>/cosines.jsonl`` keeps one line per pair (a hash of its query and document
text, and the cosine), appended a chunk at a time, and ``cosines.json`` says which encoder wrote it and
how fast. A killed run loses at most the chunk in progress; the next run computes only what is missing. Runs that
share the cache (one per core) append under a file lock and add their counts to one ``cosines.json``.
"""

from __future__ import annotations

import fcntl
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..core.artifacts import append_jsonl, read_appended_jsonl, read_json, write_json
from ..core.resources import PeakMemory, load_average

CHUNK_PAIRS = 512  # pairs embedded between two appends to the cache


def pair_key(query: str, document: str) -> str:
    """The cache key of a pair: a hash of its two texts (ids may repeat across files; texts decide the cosine)."""
    return hashlib.sha1(f"{query}\0{document}".encode()).hexdigest()[:20]


def pair_cosines(
    records: Sequence[dict[str, Any]], encoder: str, folder: Path, max_length: int, batch_size: int = 32
) -> tuple[np.ndarray, dict[str, Any]]:
    """The cosine of each record's ``query`` and ``document`` under the untrained ``encoder`` (a bundled name,
    folder or hub id), and the timing of everything the cache in ``folder`` has computed (labels/s, peak RSS,
    load average). Pairs not in the cache are embedded now and appended to it."""
    from sentence_transformers import SentenceTransformer

    from ..core.models import resolve_model
    from ..students.bi_encoder import cosines

    folder.mkdir(parents=True, exist_ok=True)
    path, meta_path = folder / "cosines.jsonl", folder / "cosines.json"
    wanted = {"encoder": encoder, "max_length": max_length}
    meta = read_json(meta_path) if meta_path.exists() else {**wanted, "pairs": 0, "seconds": 0.0, "peak_rss_mb": 0.0}
    if {key: meta.get(key) for key in wanted} != wanted:
        raise SystemExit(
            f"{meta_path} holds cosines of {meta.get('encoder')!r}, not {encoder!r}; use another --work-dir"
        )
    cached = {row["key"]: row["cosine"] for row in read_appended_jsonl(path)}
    keys = [pair_key(r["query"], r["document"]) for r in records]
    missing = list({key: r for key, r in zip(keys, records) if key not in cached}.items())
    if missing:
        model = SentenceTransformer(resolve_model(encoder), device="cpu")
        model.max_seq_length = max_length
        load_before = load_average()
        bar = tqdm(total=len(missing), desc=f"cosines of {Path(encoder).name}", unit="pair")
        for start in range(0, len(missing), CHUNK_PAIRS):
            chunk = missing[start : start + CHUNK_PAIRS]
            began = time.perf_counter()
            with PeakMemory() as memory:
                values = cosines(model, [r["query"] for _, r in chunk], [r["document"] for _, r in chunk], batch_size)
            with path.open("a", encoding="utf-8") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)  # runs sharing a --work-dir append whole chunks, one at a time
                append_jsonl(handle, ({"key": key, "cosine": float(v)} for (key, _), v in zip(chunk, values)))
                meta = read_json(meta_path) if meta_path.exists() else meta  # what the other runs added meanwhile
                meta["load_before"] = load_before
                meta["pairs"] += len(chunk)
                meta["seconds"] += time.perf_counter() - began - memory.stopped_seconds
                meta["peak_rss_mb"] = round(max(meta["peak_rss_mb"], memory.peak_mb), 1)
                meta.update(batch_size=batch_size, load_after=load_average())
                write_json(meta_path, meta)
            cached.update((key, float(v)) for (key, _), v in zip(chunk, values))
            bar.update(len(chunk))
        bar.close()
    timing = {
        "pairs": meta["pairs"],
        "seconds": meta["seconds"],
        "labels_per_second": meta["pairs"] / meta["seconds"] if meta["seconds"] else 0.0,
        "batch_size": meta.get("batch_size", batch_size),
        "peak_rss_mb": meta["peak_rss_mb"],
        "load_before": meta.get("load_before"),
        "load_after": meta.get("load_after"),
        "measured_on": f"every pair the cache {path} holds, embedded once and shared by the splits",
    }
    return np.array([cached[key] for key in keys]), timing
