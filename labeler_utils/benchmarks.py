"""Human-graded benchmarks in one table, splits by query, and labelers' prediction files.

Every loader returns a DataFrame with one row per judged query–document pair:

* ``query_id`` (str), ``query`` (str), ``doc_id`` (str), ``document`` (str: the text a labeler reads),
  ``human`` (int 0–3: the reference grade);
* ``recorded:<name>`` (nullable ``Int64``), one per labeler whose grades the input already carries
  (e.g. ``recorded:deepseek_v3_umbrela`` in the TREC DL 2019 file);
* ``query_type`` when the input has it (the demo benchmark does).

:func:`attach_predictions` adds a labeler's predictions as columns ``<name>`` (grade),
``<name>:expected`` (expected relevance) and ``<name>:p0`` … ``<name>:p3`` (grade distribution).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import config
from .artifacts import InputError, format_suffix, iter_jsonl_located, numbered_lines, write_jsonl
from .documents import document_card, load_corpus

GRADES = (0, 1, 2, 3)
BASE_COLUMNS = ("query_id", "query", "doc_id", "document", "human")
METADATA_COLUMNS = ("query_type",)
RECORDED_PREFIX = "recorded:"
PREDICTION_FILE_PREFIX = "benchmark_predictions_"
PREDICTION_STAGES = ("05_distill", "04_teacher_labels")  # students first: comparisons read student - teacher
PROBABILITY_COLUMNS = tuple(f"p{grade}" for grade in GRADES)
PREDICTION_COLUMNS = ("query_id", "doc_id", "grade", "expected_relevance", *PROBABILITY_COLUMNS, "labeler")

# Record fields of the two JSONL pair formats.
DEMO_FIELDS = ("query_id", "query", "doc_id", "grade")
TREC_DL_PAIR_FIELDS = ("qid", "docid", "query", "passage", "human")


# --------------------------------------------------------------------------------------------
# Validation shared by every loader
# --------------------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def parse_grade(value: Any, where: str, allow_missing: bool = False) -> int | None:
    """A grade 0–3 from a JSON, TSV or table value; ``InputError`` naming ``where`` otherwise."""
    if _is_missing(value):
        if allow_missing:
            return None
        raise InputError(f"{where}: the grade is missing")
    number = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            raise InputError(f"{where}: grade {value!r} is not an integer 0-3") from None
    if isinstance(number, (float, np.floating)) and float(number).is_integer():
        number = int(number)
    if isinstance(number, (int, np.integer)) and not isinstance(number, bool) and number in GRADES:
        return int(number)
    raise InputError(f"{where}: grade {value!r} is not an integer 0-3")


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
        absent = [name for name in required if _is_missing(record.get(name)) or record.get(name) == ""]
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


def iter_delimited(path: str | Path, n_fields: int, sep: str | None = None) -> Iterator[tuple[str, list[str]]]:
    """``("file:line", fields)`` for each non-blank line of a text table with exactly ``n_fields`` fields.

    ``sep=None`` splits on any whitespace; a separator such as ``"\\t"`` splits at most
    ``n_fields - 1`` times, so the last field may contain it (passage texts). A ``.gz`` file is read decompressed.
    """
    for line_no, raw in numbered_lines(path):
        where = f"{path}:{line_no}"
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise InputError(f"{where}: not valid UTF-8 ({exc.reason})") from exc
        fields = line.split() if sep is None else line.split(sep, n_fields - 1)
        if len(fields) != n_fields:
            shown = "whitespace" if sep is None else repr(sep)
            raise InputError(f"{where}: expected {n_fields} {shown}-separated fields, found {len(fields)}")
        yield where, fields


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


# --------------------------------------------------------------------------------------------
# Splits and subsets by query
# --------------------------------------------------------------------------------------------


def _shuffled_query_ids(frame: pd.DataFrame, seed: int) -> list[str]:
    query_ids = sorted(frame["query_id"].unique())
    return [query_ids[i] for i in np.random.default_rng(seed).permutation(len(query_ids))]


def query_split(frame: pd.DataFrame, test_fraction: float = 0.2, seed: int = 0) -> tuple[set[str], set[str]]:
    """Split the queries (never single pairs) into ``(train_ids, test_ids)``, reproducibly for a seed.

    The distillation stage splits a benchmark with this same function, and evaluation uses it for
    its human-labelled dev queries, so the same seed always gives the same queries. Each side
    gets at least one query.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be within (0, 1), got {test_fraction}")
    shuffled = _shuffled_query_ids(frame, seed)
    if len(shuffled) < 2:
        raise ValueError(f"A split by query needs at least 2 queries, the table has {len(shuffled)}")
    n_test = min(len(shuffled) - 1, max(1, round(test_fraction * len(shuffled))))
    return set(shuffled[n_test:]), set(shuffled[:n_test])


def query_kfold(frame: pd.DataFrame, k: int = 5, seed: int = 0) -> list[tuple[set[str], set[str]]]:
    """``k`` folds by query: a list of ``(train_ids, test_ids)``; every query is tested exactly once."""
    shuffled = _shuffled_query_ids(frame, seed)
    if not 2 <= k <= len(shuffled):
        raise ValueError(f"k must be within [2, number of queries = {len(shuffled)}], got {k}")
    folds = [set(part) for part in np.array_split(np.array(shuffled, dtype=object), k)]
    return [(set(shuffled) - fold, fold) for fold in folds]


def subset_queries(frame: pd.DataFrame, max_pairs: int | None, seed: int = 0) -> pd.DataFrame:
    """Whole queries, in a seeded random order, while their pairs fit in ``max_pairs`` (None: all).

    A query that would overflow is skipped; when no query fits, the first one is kept alone. Stages
    that label only part of the benchmark use this too, so their predictions cover the same pairs.
    """
    if max_pairs is None or max_pairs >= len(frame):
        return frame.reset_index(drop=True)
    sizes = frame.groupby("query_id").size()
    shuffled = _shuffled_query_ids(frame, seed)
    chosen, total = [], 0
    for query_id in shuffled:
        if total + sizes[query_id] <= max_pairs:
            chosen.append(query_id)
            total += sizes[query_id]
    return frame[frame["query_id"].isin(chosen or shuffled[:1])].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Prediction files
# --------------------------------------------------------------------------------------------


def _probabilities(value: Any, where: str) -> list[float] | None:
    if _is_missing(value):
        return None
    if not isinstance(value, (list, tuple)) or len(value) != len(GRADES):
        raise InputError(f"{where}: distribution must be a list of {len(GRADES)} probabilities, got {value!r}")
    try:
        probabilities = [float(p) for p in value]
    except (TypeError, ValueError):
        raise InputError(f"{where}: distribution must hold numbers, got {value!r}") from None
    if min(probabilities) < 0 or not math.isclose(sum(probabilities), 1.0, abs_tol=1e-3):
        raise InputError(f"{where}: distribution must be non-negative and sum to 1, got {value!r}")
    return probabilities


def read_predictions(path: str | Path) -> pd.DataFrame:
    """Read a labeler's predictions: JSONL lines ``{query_id, doc_id, grade, expected_relevance,
    distribution, labeler}`` (``grade`` may be null when the labeler gave no usable answer).

    Returns columns ``query_id, doc_id, grade`` (Int64), ``expected_relevance`` (float; computed
    from the distribution when only that is given), ``p0..p3`` (float) and ``labeler``.
    """
    path = Path(path)
    rows, first_seen = [], {}
    for where, record in iter_jsonl_located(path, required=("query_id", "doc_id")):
        if "grade" not in record:
            raise InputError(f"{where}: missing field 'grade' (use null when there is no grade)")
        key = (str(record["query_id"]), str(record["doc_id"]))
        if key in first_seen:
            raise InputError(
                f"{where}: prediction for (query {key[0]!r}, document {key[1]!r}) repeats {first_seen[key]}"
            )
        first_seen[key] = where
        probabilities = _probabilities(record.get("distribution"), where)
        expected = record.get("expected_relevance")
        if not _is_missing(expected) and not (isinstance(expected, (int, float)) and 0 <= expected <= GRADES[-1]):
            raise InputError(f"{where}: expected_relevance must be a number within [0, 3] or null, got {expected!r}")
        if _is_missing(expected) and probabilities is not None:
            expected = float(np.dot(GRADES, probabilities))
        rows.append(
            {
                "query_id": key[0],
                "doc_id": key[1],
                "grade": parse_grade(record["grade"], where, allow_missing=True),
                "expected_relevance": None if _is_missing(expected) else float(expected),
                **dict(zip(PROBABILITY_COLUMNS, probabilities or [None] * len(GRADES))),
                "labeler": str(record.get("labeler") or ""),
            }
        )
    if not rows:
        raise InputError(f"{path}: no predictions")
    frame = pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))
    frame["grade"] = frame["grade"].astype("Int64")
    frame[["expected_relevance", *PROBABILITY_COLUMNS]] = frame[["expected_relevance", *PROBABILITY_COLUMNS]].astype(
        float
    )
    return frame


def _native(value: Any) -> Any:
    """A JSON-ready Python value (None for missing, int/float for numpy numbers)."""
    if _is_missing(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


def write_predictions(path: str | Path, frame: pd.DataFrame, labeler: str | None = None) -> int:
    """Write predictions as JSONL (the format :func:`read_predictions` reads); returns the line count.

    ``frame`` needs ``query_id, doc_id, grade``; optional ``expected_relevance``, ``p0..p3`` or a
    ``distribution`` column of 4-lists, and ``labeler`` (or give ``labeler=``).
    """
    missing = [name for name in ("query_id", "doc_id", "grade") if name not in frame.columns]
    if missing:
        raise ValueError(f"Predictions need column(s) {missing}; columns are {list(frame.columns)}")

    def record(row: Mapping[str, Any]) -> dict[str, Any]:
        if all(name in row for name in PROBABILITY_COLUMNS):
            distribution = [_native(row[name]) for name in PROBABILITY_COLUMNS]
            distribution = None if any(p is None for p in distribution) else distribution
        else:
            distribution = row.get("distribution")
            distribution = None if distribution is None else [float(p) for p in distribution]
        grade = _native(row["grade"])
        return {
            "query_id": str(row["query_id"]),
            "doc_id": str(row["doc_id"]),
            "grade": None if grade is None else int(grade),
            "expected_relevance": _native(row.get("expected_relevance")),
            "distribution": distribution,
            "labeler": labeler or str(row.get("labeler") or ""),
        }

    return write_jsonl(path, (record(row) for row in frame.to_dict("records")))


def prediction_labeler_name(path: str | Path) -> str:
    """Labeler name of a prediction file: the file name after ``benchmark_predictions_`` (else its stem)."""
    return Path(path).stem.removeprefix(PREDICTION_FILE_PREFIX)


def find_prediction_files(run_path: str | Path) -> list[Path]:
    """The ``benchmark_predictions_*.jsonl`` files stages 05 and 04 wrote in a run folder (in that order)."""
    return [
        file
        for stage in PREDICTION_STAGES
        for file in sorted((Path(run_path) / stage).glob(f"{PREDICTION_FILE_PREFIX}*.jsonl"))
    ]


def attach_predictions(
    benchmark_frame: pd.DataFrame, predictions: pd.DataFrame | str | Path, name: str
) -> pd.DataFrame:
    """A copy of the benchmark with a labeler's columns ``<name>``, ``<name>:expected``, ``<name>:p0..p3``.

    Predictions are matched by ``(query_id, doc_id)``; ``predictions`` is a table from
    :func:`read_predictions` or a path to such a file. Every benchmark pair needs a prediction
    line (its grade may be null): ``InputError`` says how many are missing, with examples.
    Predictions for pairs outside the benchmark (e.g. a subset of queries) are ignored.
    The expectation and distribution columns are added only when some prediction has them.
    """
    source = str(predictions) if isinstance(predictions, (str, Path)) else f"predictions of {name!r}"
    if isinstance(predictions, (str, Path)):
        predictions = read_predictions(predictions)
    absent_columns = [c for c in ("query_id", "doc_id", "grade") if c not in predictions.columns]
    if absent_columns:
        raise ValueError(f"{source}: missing column(s) {absent_columns}")
    predictions = predictions.reindex(columns=list(PREDICTION_COLUMNS)).astype({"query_id": str, "doc_id": str})
    taken = [c for c in benchmark_frame.columns if c == name or c.startswith(f"{name}:")]
    if taken:
        raise ValueError(f"The benchmark table already has column(s) {taken}; choose another labeler name")
    keys = ["query_id", "doc_id"]
    merged = benchmark_frame[keys].merge(predictions, on=keys, how="left", indicator=True, validate="one_to_one")
    absent = merged.loc[merged["_merge"] == "left_only", keys]
    if len(absent):
        examples = ", ".join(f"({q!r}, {d!r})" for q, d in absent.head(5).itertuples(index=False))
        raise InputError(
            f"{source}: {len(absent)} of {len(benchmark_frame)} benchmark pairs have no prediction, e.g. {examples}; "
            "label every pair, or evaluate on the queries that were labelled"
        )
    out = benchmark_frame.copy()
    out[name] = merged["grade"].astype("Int64").to_numpy()
    if merged["expected_relevance"].notna().any():
        out[f"{name}:expected"] = merged["expected_relevance"].to_numpy(dtype=float)
    if merged[list(PROBABILITY_COLUMNS)].notna().any().any():
        for column in PROBABILITY_COLUMNS:
            out[f"{name}:{column}"] = merged[column].to_numpy(dtype=float)
    return out
