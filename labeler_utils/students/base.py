"""What every student labeler shares: the label type, the abstract labeler, grade thresholds, manifests.

A labeler turns (query, document) pairs into :class:`GradeLabel` rows: a hard grade 0-3, a
distribution over the grades and the expected relevance ``sum(g * p_g)``. A student family
implements two methods, :meth:`Labeler.encode_pair` (text to model input, and whether it was cut)
and :meth:`Labeler.score_batch` (model inputs to labels); streaming, length bucketing, progress and
prediction rows are shared here. Every trained student is a folder with a manifest
(:data:`LABELER_MANIFEST`) that names its family (see :mod:`labeler_utils.students.registry`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import platform
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.artifacts import read_json, write_json
from ..core.records import GRADES

#: File name of the manifest a trained student's folder holds (family, config, data, versions).
LABELER_MANIFEST = "labeler_manifest.json"
#: Libraries whose versions every manifest records.
RECORDED_LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "sentence-transformers")


@dataclass
class GradeLabel:
    """One label from a student: hard grade, distribution over grades, expected relevance."""

    grade: int
    distribution: list[float]
    expected_relevance: float

    @classmethod
    def from_probabilities(cls, probabilities: Sequence[float]) -> GradeLabel:
        probs = [float(p) for p in probabilities]
        best = max(range(len(probs)), key=probs.__getitem__)
        return cls(grade=GRADES[best], distribution=probs, expected_relevance=sum(g * p for g, p in zip(GRADES, probs)))

    @classmethod
    def from_expected(cls, expected: float) -> GradeLabel:
        """A label from an expected grade in [0, 3]: mass split linearly between the two nearest grades.

        ``p[floor(e)] = 1 - (e - floor(e))`` and ``p[floor(e) + 1] = e - floor(e)``: the expectation is
        exactly ``e`` and the arg-max is the grade nearest to ``e`` (ties go down).
        """
        expected = min(max(float(expected), GRADES[0]), GRADES[-1])
        lower = min(int(np.floor(expected)), GRADES[-2])
        probabilities = [0.0] * len(GRADES)
        probabilities[lower] = 1.0 - (expected - lower)
        probabilities[lower + 1] = expected - lower
        return cls.from_probabilities(probabilities)


def share_matching_thresholds(scores: Sequence[float], grade_counts: Sequence[int]) -> np.ndarray:
    """Three cut points on ``scores`` that split them into grades 0-3 in the shares of ``grade_counts``.

    The calibrated-threshold alternative to the arg-max: cut a labeler's scores (a student's
    expected relevance, a cosine) so that its grade mix equals a reference mix, e.g. the teacher's
    grade counts on the training pairs. Only those counts are used, never a human grade.
    """
    counts = np.asarray(grade_counts, dtype=float)
    if counts.shape != (len(GRADES),) or counts.sum() <= 0:
        raise ValueError(f"grade_counts must be {len(GRADES)} counts with a positive sum, got {list(grade_counts)}")
    return np.quantile(np.asarray(scores, dtype=float), np.cumsum(counts / counts.sum())[:-1])


def grades_at_thresholds(scores: Sequence[float], thresholds: Sequence[float]) -> np.ndarray:
    """Grade of each score: how many of the (ascending) cut points it reaches."""
    return np.searchsorted(np.asarray(thresholds, dtype=float), np.asarray(scores, dtype=float), side="right")


def record_distribution(record: dict[str, Any], soft_labels: bool) -> list[float]:
    """The record's teacher distribution when soft labels are on and it has one, else one-hot of its grade."""
    grade = record.get("grade")
    if grade not in GRADES:
        raise ValueError(f"record ({record.get('query_id')}, {record.get('doc_id')}): grade {grade!r} not in 0-3")
    distribution = record.get("distribution") if soft_labels else None
    if distribution is None:
        return [float(g == grade) for g in GRADES]
    if len(distribution) != len(GRADES) or not math.isclose(sum(distribution), 1.0, abs_tol=1e-3):
        raise ValueError(f"record ({record.get('query_id')}, {record.get('doc_id')}): bad distribution {distribution}")
    return [float(p) for p in distribution]


def exceed_probabilities(distributions: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` probabilities ``P(grade > k)`` for k = 0, 1, 2 of ``[..., 4]`` grade distributions."""
    return (1.0 - torch.cumsum(distributions, dim=-1)[..., :-1]).clamp(0.0, 1.0)


def grade_counts(records: Iterable[dict[str, Any]]) -> np.ndarray:
    """How many records carry each grade 0-3."""
    return np.bincount([int(r["grade"]) for r in records], minlength=len(GRADES))


def inverse_frequency_weights(grades: Sequence[int]) -> torch.Tensor:
    """One weight per grade, ``n / (4 * count)``: each grade weighs the same in total (absent grades count as 1)."""
    counts = torch.bincount(torch.tensor(list(grades), dtype=torch.long), minlength=len(GRADES)).float()
    return counts.sum() / (len(GRADES) * counts.clamp(min=1))


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`RECORDED_LIBRARIES` ("not installed" for a missing one)."""
    versions = {}
    for name in RECORDED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def training_environment() -> dict[str, Any]:
    """Versions, Python and device: what every manifest records about where a student was trained."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"versions": library_versions(), "python": platform.python_version(), "device": device}


def checkpoint_to_resume(folder: Path, config: Any, examples: Sequence[Any]) -> str | None:
    """The newest checkpoint in ``folder`` if it belongs to this very training, else None (always None when the
    config's ``save_steps`` is 0: no checkpoints).

    A fingerprint of the configuration (a dataclass) and the training ``examples`` (JSON-serialisable) is kept
    beside the checkpoints; checkpoints of another training in the same folder raise instead of being resumed.
    """
    from transformers.trainer_utils import get_last_checkpoint

    if not config.save_steps:
        return None
    fingerprint = hashlib.sha256(json.dumps([dataclasses.asdict(config), list(examples)]).encode()).hexdigest()
    stamp = folder / "training_fingerprint.txt"
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if last is not None and (not stamp.exists() or stamp.read_text().strip() != fingerprint):
        raise ValueError(
            f"{folder} holds checkpoints of another training (other settings or data): "
            "delete the folder or train into another output folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(fingerprint + "\n")
    if last is not None:
        print(f"resuming from {last}")
    return last


def remove_checkpoints(output_dir: Path) -> None:
    """Delete the checkpoints of a finished training in ``output_dir``: only a killed training needs them, and a
    large encoder's take gigabytes."""
    shutil.rmtree(Path(output_dir) / "checkpoints", ignore_errors=True)


def write_manifest(
    folder: str | Path,
    family: str,
    config: Any,
    method: str,
    trainer: Any,
    result: Any,
    seconds: float,
    grades: Sequence[int],
    data_description: dict[str, Any] | None,
    **details: Any,
) -> dict[str, Any]:
    """Write a trained student's manifest into ``folder`` and return it.

    Every family records the same core (family, base model, method, config, max length, grade
    counts, training time, loss and steps of a transformers ``trainer`` and its ``result``, the
    data description, versions and device); ``details`` adds the family's own fields.
    """
    manifest = {
        "family": family,
        "base_model": config.base_model,
        "method": method,
        "config": dataclasses.asdict(config),
        "max_length": config.max_length,
        "train_examples": len(grades),
        **details,
        "grade_counts": {g: int(c) for g, c in zip(GRADES, np.bincount(list(grades), minlength=len(GRADES)))},
        "train_seconds": seconds,
        "train_loss": result.training_loss,
        "global_steps": result.global_step,
        "log_history": trainer.state.log_history,
        "data": data_description or {},
        **training_environment(),
    }
    write_json(Path(str(folder)) / LABELER_MANIFEST, manifest)
    return manifest


def epoch_losses(log_history: Sequence[dict[str, Any]]) -> list[float]:
    """Mean logged training loss of each epoch (a step logged at epoch e belongs to epoch ceil(e)).

    Batch losses vary with what each batch holds (one query's pairs, for the bi-encoder); the
    epoch means compare the same batches and show whether training lowered the loss.
    """
    by_epoch: dict[int, list[float]] = {}
    for entry in log_history:
        if "loss" in entry and "epoch" in entry:
            by_epoch.setdefault(math.ceil(float(entry["epoch"]) - 1e-9), []).append(float(entry["loss"]))
    return [float(np.mean(by_epoch[e])) for e in sorted(by_epoch)]


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a trained student's folder, or an empty dict when the folder has none."""
    path = Path(str(folder)) / LABELER_MANIFEST
    return read_json(path) if path.exists() else {}


class PairLabeler(ABC):
    """Anything that grades records of (query, document) pairs: a student, the zero-shot cosine, the teacher LLM."""

    FAMILY: str = ""

    @abstractmethod
    def label_records(
        self, records: Sequence[dict[str, Any]], labeler: str | None = None, batch_size: int = 16, progress: bool = True
    ) -> list[dict[str, Any]]:
        """One row per record, in order: its ``query_id`` and ``doc_id``, ``grade``, ``distribution``,
        ``expected_relevance`` and ``labeler`` (the name given, or the labeler's own)."""


class Labeler(PairLabeler):
    """A student that grades (query, document) pairs in batches.

    Subclasses set :attr:`FAMILY`, ``max_length`` and ``device`` and implement :meth:`encode_pair`
    and :meth:`score_batch`; :attr:`SPEED_VARIANTS` lists the speed variants of the single pass that apply
    to them (see :mod:`labeler_utils.throughput`).
    """

    FAMILY: str = ""
    SPEED_VARIANTS: tuple[str, ...] = ("bfloat16",)
    model: Any
    max_length: int
    device: torch.device
    truncated: int = 0
    #: Grade agreement of a student merged on loading with its unmerged adapter, on the same pairs (None: not
    #: merged, or not checked); see :func:`labeler_utils.throughput.engines.load_student`.
    merge_agreement: dict[str, float] | None = None

    def transformer(self) -> Any:
        """The underlying transformers model (a PEFT wrapper's base model)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @abstractmethod
    def encode_pair(self, query: str, document: str) -> tuple[Any, bool]:
        """Model input of one pair, and whether the document was cut to fit ``max_length``."""

    @abstractmethod
    def score_batch(self, encoded: Sequence[Any]) -> list[GradeLabel]:
        """Labels of a batch of encoded pairs, in order."""

    def encoded_length(self, encoded: Any) -> int:
        """Tokens of an encoded pair (what the model reads): bucketing and throughput count them."""
        return len(encoded)

    def label(
        self,
        pairs: Iterable[tuple[str, str]],
        batch_size: int = 16,
        bucket_size: int = 512,
        total: int | None = None,
        progress: bool = True,
    ) -> Iterator[GradeLabel]:
        """Label (query, document) pairs in input order, streaming.

        Pairs are read ``bucket_size`` at a time, sorted by length inside the bucket into batches
        of ``batch_size`` (little padding), scored, and yielded back in input order.
        """
        bar = tqdm(total=total, desc=f"{self.FAMILY} labels", unit="pair", disable=not progress)
        bucket: list[Any] = []
        for query, document in pairs:
            encoded, truncated = self.encode_pair(query, document)
            self.truncated += truncated
            bucket.append(encoded)
            if len(bucket) >= bucket_size:
                yield from self._score_bucket(bucket, batch_size, bar)
                bucket = []
        if bucket:
            yield from self._score_bucket(bucket, batch_size, bar)
        bar.close()

    def _score_bucket(self, bucket: list[Any], batch_size: int, bar: Any) -> Iterator[GradeLabel]:
        order = sorted(range(len(bucket)), key=lambda i: self.encoded_length(bucket[i]))
        results: list[GradeLabel | None] = [None] * len(bucket)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            for index, label in zip(chunk, self.score_batch([bucket[i] for i in chunk])):
                results[index] = label
            bar.update(len(chunk))
        yield from (label for label in results if label is not None)

    def label_records(
        self, records: Sequence[dict[str, Any]], labeler: str | None = None, batch_size: int = 16, progress: bool = True
    ) -> list[dict[str, Any]]:
        """Label records with ``query_id``, ``query``, ``doc_id``, ``document``; returns prediction rows."""
        labels = self.label(
            ((r["query"], r["document"]) for r in records), batch_size=batch_size, total=len(records), progress=progress
        )
        return [prediction_row(record, label, labeler or self.FAMILY) for record, label in zip(records, labels)]


def prediction_row(record: dict[str, Any], label: GradeLabel, labeler: str) -> dict[str, Any]:
    """One prediction row: the pair's ids, the label's grade, expected relevance and distribution, the labeler."""
    return {
        "query_id": record["query_id"],
        "doc_id": record["doc_id"],
        "grade": int(label.grade),
        "expected_relevance": float(label.expected_relevance),
        "distribution": [float(p) for p in label.distribution],
        "labeler": labeler,
    }


def label_agreement(reference: Sequence[GradeLabel], other: Sequence[GradeLabel]) -> dict[str, float]:
    """Share of equal grades and the largest absolute probability difference between two labelers' labels of the same pairs."""
    same = sum(a.grade == b.grade for a, b in zip(reference, other))
    diff = max(
        (abs(x - y) for a, b in zip(reference, other) for x, y in zip(a.distribution, b.distribution)), default=0.0
    )
    return {"grade_agreement": same / max(len(reference), 1), "max_probability_difference": diff}


def merge_agreement(
    unmerged_labels: Sequence[GradeLabel], merged: Labeler, pairs: Sequence[tuple[str, str]]
) -> dict[str, float]:
    """How well a merged student reproduces the adapter it was merged from, on the same pairs.

    ``unmerged_labels`` are the adapter's labels of ``pairs`` (taken before merging, which changes a PEFT model in
    place); returns the number of pairs, the share of equal grades and the largest probability difference.
    """
    merged_labels = list(merged.label(pairs, progress=False))
    return {"pairs": len(pairs), **label_agreement(unmerged_labels, merged_labels)}
