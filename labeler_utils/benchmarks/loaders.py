"""Human-graded benchmarks in one table: one loader per format (pair JSONL, TREC files, Hugging Face, ir_datasets).

Every loader returns a DataFrame with one row per judged query–document pair:

* ``query_id`` (str), ``query`` (str), ``doc_id`` (str), ``document`` (str: the text a labeler reads),
  ``human`` (int 0–3: the reference grade);
* ``recorded:<name>`` (nullable ``Int64``), one per labeler whose grades the input already carries
  (e.g. ``recorded:deepseek_v3_umbrela`` in the TREC DL 2019 file);
* ``query_type`` when the input has it (the demo benchmark does).

:func:`~labeler_utils.benchmarks.predictions.attach_predictions` adds a labeler's predictions as columns ``<name>`` (grade),
``<name>:expected`` (expected relevance) and ``<name>:p0`` … ``<name>:p3`` (grade distribution).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..core import config
from ..core.artifacts import InputError, format_suffix, iter_delimited, iter_jsonl_located
from ..core.records import is_missing, parse_grade
from ..documents import document_card, load_corpus

BASE_COLUMNS = ("query_id", "query", "doc_id", "document", "human")
METADATA_COLUMNS = ("query_type",)
RECORDED_PREFIX = "recorded:"

# Record fields of the two JSONL pair formats.
DEMO_FIELDS = ("query_id", "query", "doc_id", "grade")
TREC_DL_PAIR_FIELDS = ("qid", "docid", "query", "passage", "human")


# --------------------------------------------------------------------------------------------
# Validation shared by every loader
# --------------------------------------------------------------------------------------------


class _PairRows:
    """Collects judged pairs from one source, refusing a pair given twice."""

    def __init__(self, source: str):
        self.source = source
        self.rows: list[dict[str, Any]] = []
        self.first_seen: dict[tuple[str, str], str] = {}

    def add(self, where: str, row: dict[str, Any]) -> None:
        key = (row["query_id"], row["doc_id"])
        if key in self.first_seen:
            raise InputError(
                f"{where}: pair (query {key[0]!r}, document {key[1]!r}) is already given at {self.first_seen[key]}"
            )
        self.first_seen[key] = where
        self.rows.append(row)

    def frame(self) -> pd.DataFrame:
        if not self.rows:
            raise InputError(f"{self.source}: no judged pairs")
        return check_benchmark(pd.DataFrame(self.rows), self.source)


def check_benchmark(frame: pd.DataFrame, source: str = "benchmark") -> pd.DataFrame:
    """Validate a benchmark table and return it with the standard columns and dtypes.

    Keeps the base columns, ``recorded:*`` columns and known metadata columns; raises
    ``InputError`` naming ``source`` and the row of the first bad grade or repeated pair.
    """
    missing = [name for name in BASE_COLUMNS if name not in frame.columns]
    if missing:
        raise InputError(f"{source}: missing column(s) {missing}; columns are {list(frame.columns)}")
    if frame.empty:
        raise InputError(f"{source}: no judged pairs")
    recorded = sorted(c for c in frame.columns if c.startswith(RECORDED_PREFIX))
    metadata = [c for c in METADATA_COLUMNS if c in frame.columns]
    out = frame[[*BASE_COLUMNS, *metadata, *recorded]].reset_index(drop=True)
    for name in ("query_id", "doc_id", "query", "document"):
        if out[name].isna().any():
            raise InputError(f"{source} row {int(out[name].isna().to_numpy().argmax())}: {name} is missing")
        out[name] = out[name].astype(str)
    out["human"] = [parse_grade(v, f"{source} row {i} (human)") for i, v in enumerate(out["human"])]
    out["human"] = out["human"].astype(int)
    for name in recorded:
        grades = [parse_grade(v, f"{source} row {i} ({name})", allow_missing=True) for i, v in enumerate(out[name])]
        out[name] = pd.array(grades, dtype="Int64")
    repeated = out.duplicated(["query_id", "doc_id"])
    if repeated.any():
        row = int(repeated.to_numpy().argmax())
        raise InputError(
            f"{source} row {row}: pair (query {out.at[row, 'query_id']!r}, document {out.at[row, 'doc_id']!r}) "
            "is given more than once"
        )
    return out


def recorded_labelers(frame: pd.DataFrame) -> list[str]:
    """Names of the ``recorded:*`` labeler columns of a benchmark table."""
    return [c for c in frame.columns if c.startswith(RECORDED_PREFIX)]


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def _recorded_grades(record: dict[str, Any], where: str) -> dict[str, int | None]:
    labels = record.get("llm_labels") or {}
    if not isinstance(labels, dict):
        raise InputError(f"{where}: llm_labels must be an object of labeler name -> grade")
    return {
        f"{RECORDED_PREFIX}{name}": parse_grade(grade, f"{where} (llm_labels.{name})", allow_missing=True)
        for name, grade in labels.items()
    }


def load_pairs_jsonl(path: str | Path, corpus_dir: str | Path | None = None) -> pd.DataFrame:
    """Load judged pairs from JSONL, in either of two formats (decided by the first record).

    * Demo benchmark: ``query_id, query, doc_id, grade`` (+ ``query_type``). The document text is
      the document's card (metadata lines + text) from the corpus in ``corpus_dir``
      (default :data:`config.DEMO_CORPUS_DIR`), unless the record carries a ``document`` field.
    * TREC DL pairs: ``qid, docid, query, passage, human`` (+ ``llm_labels``: name -> grade or null).

    ``llm_labels`` become ``recorded:<name>`` columns in both formats. Errors name file and line.
    """
    path = Path(path)
    rows = _PairRows(str(path))
    required: Sequence[str] | None = None
    cards: dict[str, str] | None = None
    for where, record in iter_jsonl_located(path):
        if required is None:
            if all(name in record for name in TREC_DL_PAIR_FIELDS):
                required = TREC_DL_PAIR_FIELDS
            elif all(name in record for name in DEMO_FIELDS):
                required = DEMO_FIELDS
            else:
                raise InputError(
                    f"{where}: unknown record format; expected fields {list(DEMO_FIELDS)} (demo benchmark) "
                    f"or {list(TREC_DL_PAIR_FIELDS)} (TREC DL pairs), got {sorted(record)}"
                )
        absent = [name for name in required if is_missing(record.get(name)) or record.get(name) == ""]
        if absent:
            raise InputError(f"{where}: missing or empty field(s) {absent}")
        if required is TREC_DL_PAIR_FIELDS:
            row = {
                "query_id": str(record["qid"]),
                "query": record["query"],
                "doc_id": str(record["docid"]),
                "document": record["passage"],
                "human": parse_grade(record["human"], where),
            }
        else:
            document = record.get("document")
            if document is None:
                if cards is None:
                    folder = Path(corpus_dir) if corpus_dir is not None else config.DEMO_CORPUS_DIR
                    cards = {doc.doc_id: document_card(doc) for doc in load_corpus(folder)}
                document = cards.get(str(record["doc_id"]))
                if document is None:
                    raise InputError(f"{where}: doc_id {record['doc_id']!r} is not a document of the corpus {folder}")
            row = {
                "query_id": str(record["query_id"]),
                "query": record["query"],
                "doc_id": str(record["doc_id"]),
                "document": document,
                "human": parse_grade(record["grade"], where),
            }
            if "query_type" in record:
                row["query_type"] = record["query_type"]
        rows.add(where, {**row, **_recorded_grades(record, where)})
    return rows.frame()


def load_trec(qrels_path: str | Path, topics_path: str | Path, collection_path: str | Path) -> pd.DataFrame:
    """Load TREC qrels (``qid 0 docid grade``), topics (``qid<TAB>query``) and a collection (``docid<TAB>text``).

    Only the judged documents of the collection are kept in memory, so a large collection file is fine.
    """
    topics: dict[str, str] = {}
    for where, (query_id, query) in iter_delimited(topics_path, 2, "\t"):
        if query_id in topics:
            raise InputError(f"{where}: query {query_id!r} is given twice")
        topics[query_id] = query.strip()
    judged: list[tuple[str, str, str, int]] = []
    for where, (query_id, _, doc_id, grade) in iter_delimited(qrels_path, 4):
        if query_id not in topics:
            raise InputError(f"{where}: query {query_id!r} is not in the topics file {topics_path}")
        judged.append((where, query_id, doc_id, parse_grade(grade, where)))
    needed = {doc_id for _, _, doc_id, _ in judged}
    texts: dict[str, str] = {}
    for _, (doc_id, text) in iter_delimited(collection_path, 2, "\t"):
        if doc_id in needed:
            texts[doc_id] = text
    absent = sorted(needed - texts.keys())
    if absent:
        raise InputError(
            f"{collection_path}: {len(absent)} judged document(s) are not in the collection, e.g. {absent[:5]}"
        )
    rows = _PairRows(str(qrels_path))
    for where, query_id, doc_id, grade in judged:
        rows.add(
            where,
            {
                "query_id": query_id,
                "query": topics[query_id],
                "doc_id": doc_id,
                "document": texts[doc_id],
                "human": grade,
            },
        )
    return rows.frame()


def load_hf_dataset(
    dataset_or_path: Any, split: str | None = None, column_map: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Load a Hugging Face ``datasets`` Dataset (or a ``save_to_disk`` folder) as a benchmark table.

    ``column_map`` renames dataset columns to benchmark columns, pandas-style
    (``{"qid": "query_id", "label": "human", "gpt4": "recorded:gpt4"}``). A ``DatasetDict`` needs ``split``.
    """
    import datasets

    source = str(dataset_or_path) if isinstance(dataset_or_path, (str, Path)) else "dataset"
    dataset = (
        datasets.load_from_disk(str(dataset_or_path)) if isinstance(dataset_or_path, (str, Path)) else dataset_or_path
    )
    if isinstance(dataset, datasets.DatasetDict):
        if split is None or split not in dataset:
            raise ValueError(f"{source}: choose a split with split=...; splits are {sorted(dataset)}")
        dataset, source = dataset[split], f"{source}[{split}]"
    return check_benchmark(dataset.to_pandas().rename(columns=dict(column_map or {})), source)


def load_ir_dataset(dataset_id: str) -> pd.DataFrame:
    """Load a benchmark with ``ir_datasets`` (e.g. ``"msmarco-passage/trec-dl-2019/judged"``).

    ``ir_datasets`` is optional and downloads its files on first use; without the package or the
    network this raises ``RuntimeError`` pointing to the file loaders.
    """
    fallback = (
        "ir_datasets downloads its data on first use, so it needs network access; without it, download the "
        "files elsewhere and use load_trec(qrels, topics, collection) or load_pairs_jsonl(path)"
    )
    try:
        import ir_datasets
    except ImportError as exc:
        raise RuntimeError(f"ir_datasets is not installed (pip install ir_datasets). {fallback}.") from exc
    try:
        dataset = ir_datasets.load(dataset_id)
        topics = {str(q.query_id): q.text for q in dataset.queries_iter()}
        qrels = list(dataset.qrels_iter())
        docs = dataset.docs_store().get_many({q.doc_id for q in qrels})
    except Exception as exc:  # network, download and unknown-id errors all end here
        raise RuntimeError(f"ir_datasets could not load {dataset_id!r}: {exc}. {fallback}.") from exc
    rows = _PairRows(f"ir_datasets {dataset_id}")
    for qrel in qrels:
        where = f"ir_datasets {dataset_id} qrel ({qrel.query_id}, {qrel.doc_id})"
        doc = docs.get(qrel.doc_id)
        if doc is None or str(qrel.query_id) not in topics:
            raise InputError(f"{where}: its query or document is missing from the dataset")
        rows.add(
            where,
            {
                "query_id": str(qrel.query_id),
                "query": topics[str(qrel.query_id)],
                "doc_id": str(qrel.doc_id),
                "document": doc.default_text(),
                "human": parse_grade(qrel.relevance, where),
            },
        )
    return rows.frame()


def load_benchmark(spec: Any, corpus_dir: str | Path | None = None) -> pd.DataFrame:
    """Load a benchmark from whatever describes it.

    * a DataFrame (validated copy) or a ``datasets`` Dataset;
    * a ``.jsonl`` (or ``.jsonl.gz``) path (:func:`load_pairs_jsonl`) or a ``save_to_disk`` folder (:func:`load_hf_dataset`);
    * ``"ir_datasets:<id>"`` (:func:`load_ir_dataset`);
    * a mapping with ``qrels``, ``topics``, ``collection`` paths (:func:`load_trec`), or with
      ``dataset`` (+ ``split``, ``column_map``) (:func:`load_hf_dataset`).
    """
    if isinstance(spec, pd.DataFrame):
        return check_benchmark(spec, "DataFrame")
    if type(spec).__module__.split(".")[0] == "datasets":
        return load_hf_dataset(spec)
    if isinstance(spec, Mapping):
        if {"qrels", "topics", "collection"} <= spec.keys():
            return load_trec(spec["qrels"], spec["topics"], spec["collection"])
        if "dataset" in spec:
            return load_hf_dataset(spec["dataset"], spec.get("split"), spec.get("column_map"))
        raise ValueError(f"Benchmark mapping needs keys qrels/topics/collection or dataset, got {sorted(spec)}")
    if isinstance(spec, str) and spec.startswith("ir_datasets:"):
        return load_ir_dataset(spec.removeprefix("ir_datasets:"))
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if path.is_dir():
            return load_hf_dataset(path)
        if format_suffix(path) == ".jsonl":
            return load_pairs_jsonl(path, corpus_dir)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such benchmark file or folder")
        raise ValueError(
            f"{path}: give a .jsonl pairs file, a saved dataset folder, or a qrels/topics/collection mapping"
        )
    raise TypeError(f"Cannot load a benchmark from a {type(spec).__name__}")
