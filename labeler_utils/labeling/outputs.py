"""The output folder of the ``label`` command: its layout, the committed chunks, the merged label files.

The engine (:mod:`labeler_utils.labeling.job`) commits chunks into the folder; this module reads
them back: the totals of a run (:func:`summarize_run`), the merge into ``labels.jsonl``,
``labels.parquet``, ``labels.qrels`` and ``skipped.jsonl`` (:func:`write_outputs`, streaming), and
the plots of notebook 08.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from ..core.artifacts import InputError, atomic_write, read_json
from ..core.records import GRADES
from .inputs import PairSource, check_ids

RUN_MANIFEST = "manifest.json"
WORK_DB = "work.sqlite"
CHUNKS = "chunks"
SHARDS = "shards"  # the ray engine's inputs of the chunks still to label (see labeler_utils.labeling.ray_engine)
SUMMARY = "summary.json"
SKIPPED = "skipped.jsonl"
LOCK = ".lock"
OUTPUT_FILES = {"jsonl": "labels.jsonl", "parquet": "labels.parquet", "qrels": "labels.qrels"}


def chunk_path(out_dir: Path, index: int, suffix: str = ".jsonl") -> Path:
    return out_dir / CHUNKS / f"chunk-{index:06d}{suffix}"


def committed_chunks(out_dir: Path) -> int:
    """How many chunks are committed: consecutive ``chunk-*.jsonl`` files (with their meta) from 0."""
    count = 0
    while chunk_path(out_dir, count).exists() and chunk_path(out_dir, count, ".meta.json").exists():
        count += 1
    return count


def chunk_metas(out_dir: Path, count: int) -> Iterator[dict[str, Any]]:
    for index in range(count):
        yield read_json(chunk_path(out_dir, index, ".meta.json"))


def plot_chunks(metas: Iterable[dict[str, Any]]) -> Figure:
    """Labels per second and peak resident memory of each committed chunk (the :func:`chunk_metas`).

    A flat memory line is what streaming buys: the thousandth chunk needs no more than the first.
    """
    metas = list(metas)
    chunks = [meta["index"] for meta in metas]
    memory = [meta["peak_rss_mb"] for meta in metas]
    fig = Figure(figsize=(11, 3.2))
    speed_ax, memory_ax = fig.subplots(1, 2)
    speed_ax.plot(chunks, [m["labels"] / m["seconds"] if m["seconds"] else math.nan for m in metas], marker=".")
    speed_ax.set(title="labels per second", xlabel="chunk")
    memory_ax.plot(chunks, memory, marker=".")
    memory_ax.set(title="peak RSS (MB)", xlabel="chunk", ylim=(0, max(memory, default=1.0) * 1.2))
    fig.tight_layout()
    return fig


def plot_label_mix(labels: pd.DataFrame) -> Figure:
    """Bars of the grades given and a histogram of the expected relevance (``labels.parquet``'s columns)."""
    fig = Figure(figsize=(11, 3.2))
    grades_ax, expected_ax = fig.subplots(1, 2)
    counts = labels["grade"].value_counts().reindex(GRADES, fill_value=0)
    grades_ax.bar(GRADES, counts.to_numpy(), color="tab:blue")
    grades_ax.set(title="grades", xticks=list(GRADES), xlabel="grade", ylabel="pairs")
    expected_ax.hist(labels["expected_relevance"], bins=30, range=(0, 3), color="tab:gray")
    expected_ax.set(title="expected relevance", xlabel="sum(g * p_g)", ylabel="pairs")
    fig.tight_layout()
    return fig


def summarize_run(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Totals over the committed chunks: pairs, skips, truncation, labels per second, peak memory."""
    totals: Counter[str] = Counter()
    peak = 0.0
    for meta in chunk_metas(out_dir, manifest["chunks_done"]):
        totals.update({k: meta[k] for k in ("units", "labels", "truncated", "duplicates", "seconds", "cpu_seconds")})
        totals["skipped"] += len(meta["skipped"])
        peak = max(peak, meta["peak_rss_mb"])
    identity = manifest["identity"]
    return {
        "complete": manifest["complete"],
        "input": manifest.get("input_path"),
        "format": identity["format"],
        "model": identity["model"],
        **identity["settings"],
        "labeler_max_length": manifest.get("labeler_max_length"),
        "input_units": manifest["total_units"],
        "units_done": totals["units"],
        "chunks_done": manifest["chunks_done"],
        "pairs_labeled": totals["labels"],
        "skipped_lines": totals["skipped"],
        "duplicate_pairs": totals["duplicates"],
        "truncated_documents": totals["truncated"],
        "labeling_seconds": round(totals["seconds"], 3),
        "labels_per_second": round(totals["labels"] / totals["seconds"], 3) if totals["seconds"] else None,
        "labeling_cpu_seconds": round(totals["cpu_seconds"], 3),
        "labels_per_cpu_second": round(totals["labels"] / totals["cpu_seconds"], 3) if totals["cpu_seconds"] else None,
        "peak_rss_mb": round(peak, 1),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------


def iter_labels(out_dir: Path) -> Iterator[dict[str, Any]]:
    """Every committed label, in input order, streamed from the chunk files."""
    for index in range(committed_chunks(out_dir)):
        with chunk_path(out_dir, index).open(encoding="utf-8") as handle:
            yield from (json.loads(line) for line in handle)


def write_outputs(out_dir: Path, formats: tuple[str, ...], source: PairSource) -> None:
    """Merge the chunks into the requested label files and ``skipped.jsonl``, each atomically, streaming.

    Ids are checked for qrels before labeling; a run labeled without qrels and merged with them
    now can still hold an id with whitespace: an error naming its input line.
    """
    count = committed_chunks(out_dir)
    with atomic_write(out_dir / SKIPPED) as handle:
        for meta in chunk_metas(out_dir, count):
            handle.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in meta["skipped"])
    if "jsonl" in formats:
        with atomic_write(out_dir / OUTPUT_FILES["jsonl"], "wb") as handle:
            for index in range(count):
                with chunk_path(out_dir, index).open("rb") as chunk:
                    shutil.copyfileobj(chunk, handle)
    if "parquet" in formats:
        _write_parquet(out_dir, count)
    if "qrels" in formats:
        with atomic_write(out_dir / OUTPUT_FILES["qrels"]) as handle:
            for record in iter_labels(out_dir):
                try:
                    check_ids(record["query_id"], record["doc_id"])
                except ValueError as exc:
                    raise InputError(f"{source.where(record['line'])}: {exc}") from None
                handle.write(f"{record['query_id']} 0 {record['doc_id']} {record['grade']}\n")


def _write_parquet(out_dir: Path, count: int) -> None:
    """``labels.parquet``: one row group per chunk, columns ids, line, grade, expected relevance, p0..p3."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("query_id", pa.string()),
            ("doc_id", pa.string()),
            ("line", pa.int64()),
            ("grade", pa.int8()),
            ("expected_relevance", pa.float64()),
            *((f"p{g}", pa.float64()) for g in GRADES),
        ]
    )
    with atomic_write(out_dir / OUTPUT_FILES["parquet"], "wb") as handle, pq.ParquetWriter(handle, schema) as writer:
        for index in range(count):
            with chunk_path(out_dir, index).open(encoding="utf-8") as chunk:
                records = [json.loads(line) for line in chunk]
            columns = {
                name: [r[name] for r in records]
                for name in ("query_id", "doc_id", "line", "grade", "expected_relevance")
            }
            for g in GRADES:
                columns[f"p{g}"] = [r["distribution"][g] for r in records]
            writer.write_table(pa.table(columns, schema=schema))
