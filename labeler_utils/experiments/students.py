"""The students the reproduction can train: each one's family, family settings, zero-shot row and training grades."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..benchmarks.loaders import RECORDED_PREFIX
from ..core.config import GPU_STUDENT_MODEL, Profile
from ..students.registry import get_family

COMMITTEE = (
    "committee"  # the per-pair distribution of every recorded judge's grade (labeler_utils.teacher.add_committee)
)
WEAK_TEACHER = "llama3_8b_umbrela"
CHECKPOINT_STEPS = 50  # every family: a killed training resumes from its last checkpoint when rerun
COSINE_FIT_PAIRS = 2000  # a cosine's cut points: quantiles over at most this many random training pairs


@dataclass(frozen=True)
class ZeroShotCosine:
    """A shared zero-shot row: an untrained sentence encoder's cosine, cut at the teacher's grade shares."""

    encoder: str  # a bundled encoder name (core.models.BUNDLED_ENCODERS), folder or hub id
    labeler: str  # the row's name in the reports

    @property
    def description(self) -> str:
        return (
            f"bi-encoder cosine of the untrained {self.encoder}, thresholds matching the teacher's grade shares on the "
            f"training pairs (at most {COSINE_FIT_PAIRS} of them, drawn at random)"
        )


COSINE = "minilm-bi-encoder-cosine"
MPNET_COSINE = "mpnet-bi-encoder-cosine"
#: The zero-shot cosines by name (a student's ``zero_shot``); each pair's cosine is computed once per encoder.
COSINES = {
    COSINE: ZeroShotCosine("all-MiniLM-L6-v2", "minilm bi-encoder cosine zero-shot"),
    MPNET_COSINE: ZeroShotCosine("all-mpnet-base-v2", "mpnet bi-encoder cosine zero-shot"),
}
COSINE_LABELER = COSINES[COSINE].labeler  # the default encoder's cosine: every student's "QWK - cosine"
ZERO_SHOT_DESCRIPTIONS = {
    **{name: cosine.description for name, cosine in COSINES.items()},
    "": "base model, same one-pass grade-token scoring",
}


@dataclass(frozen=True)
class StudentSpec:
    """A student the reproduction can train: its family, the family config's settings, and its zero-shot row.

    ``zero_shot`` names a baseline shared by several students (their predictions are computed
    once), or is empty for the student's own untrained model. ``labels`` is what it is trained on:
    empty for ``--teacher-column``, :data:`COMMITTEE` for the distribution of all recorded judges,
    or another recorded judge's name (a weaker teacher). A spec that does not train is its zero-shot
    row alone: an untrained encoder's cosine, to compare encoders without training them.
    """

    family: str
    settings: dict[str, Any] = field(default_factory=dict)
    zero_shot: str = ""
    description: str = ""
    labels: str = ""
    trains: bool = True  # False: the zero-shot row alone (an untrained cosine), nothing trained

    def labeler(self, name: str) -> str:
        """The row that stands for student ``name`` in the reports: its distilled model, or its zero-shot row."""
        if self.trains:
            return f"{name} distilled"
        return COSINES[self.zero_shot].labeler if self.zero_shot else f"{name} zero-shot"

    def label_column(self, teacher: str) -> str:
        """The frame column of the grades this student is trained on."""
        if not self.labels:
            return teacher
        return self.labels if self.labels == COMMITTEE else RECORDED_PREFIX + self.labels


ENCODER = {"epochs": 2.0, "batch_size": 16, "max_length": 256}
CAUSAL = {"epochs": 2.0, "batch_size": 8, "max_length": 256, "qlora": None}
QUERY_TWICE = {**CAUSAL, "base_model": "gemma3-270m", "prompt_format": "query-document-query"}
PAPER_STUDENT = "phi-3.5-mini-qlora"


MPNET = {"base_model": COSINES[MPNET_COSINE].encoder}


def bi_encoder(description: str, labels: str = "", cosine: str = COSINE, **settings: Any) -> StudentSpec:
    """A bi-encoder student (one epoch unless ``settings`` say otherwise), beside its encoder's untrained cosine."""
    return StudentSpec("bi_encoder", {**ENCODER, "epochs": 1.0, **settings}, cosine, description, labels)


STUDENTS: dict[str, StudentSpec] = {
    "minilm-cross-encoder": StudentSpec("cross_encoder", ENCODER, COSINE),
    "minilm-cross-encoder-balanced": StudentSpec("cross_encoder", {**ENCODER, "class_balance": True}, COSINE),
    "minilm-cross-encoder-regression": StudentSpec(
        "cross_encoder",
        {**ENCODER, "objective": "regression"},
        COSINE,
        "one logit, binary cross-entropy to the expected grade / 3",
    ),
    "minilm-cross-encoder-ordinal": StudentSpec(
        "cross_encoder",
        {**ENCODER, "objective": "ordinal"},
        COSINE,
        "cumulative-link head: three logits towards P(grade > k)",
    ),
    "minilm-bi-encoder": bi_encoder("CoSENT, each batch one query's pairs (ranking within a query)"),
    "minilm-bi-encoder-mixed": bi_encoder("CoSENT, batches mixing queries", batching="random"),
    "minilm-bi-encoder-committee": bi_encoder(
        "as minilm-bi-encoder, trained on the committee's expected grade", labels=COMMITTEE
    ),
    "minilm-cross-encoder-committee": StudentSpec(
        "cross_encoder",
        ENCODER,
        COSINE,
        "as minilm-cross-encoder, cross-entropy to the committee's distribution",
        labels=COMMITTEE,
    ),
    "minilm-bi-encoder-from-llama3-8b": bi_encoder(
        "as minilm-bi-encoder, trained on Llama-3-8B's grades (a weaker teacher)", labels=WEAK_TEACHER
    ),
    "minilm-cosine": StudentSpec("bi_encoder", ENCODER, COSINE, "the untrained MiniLM cosine alone", trains=False),
    "mpnet-cosine": StudentSpec(
        "bi_encoder", {**ENCODER, **MPNET}, MPNET_COSINE, "the untrained all-mpnet-base-v2 cosine alone", trains=False
    ),
    "mpnet-bi-encoder": bi_encoder("as minilm-bi-encoder, from all-mpnet-base-v2", cosine=MPNET_COSINE, **MPNET),
    "mpnet-cross-encoder": StudentSpec(
        "cross_encoder", {**ENCODER, **MPNET}, MPNET_COSINE, "as minilm-cross-encoder, from all-mpnet-base-v2"
    ),
    "smollm2-135m-instruct": StudentSpec("causal_lm", {**CAUSAL, "base_model": "smollm2-135m-instruct"}),
    "gemma3-270m": StudentSpec("causal_lm", {**CAUSAL, "base_model": "gemma3-270m"}),
    "gemma3-270m-query-twice": StudentSpec("causal_lm", QUERY_TWICE),
    PAPER_STUDENT: StudentSpec(
        "causal_lm",
        {**CAUSAL, "base_model": GPU_STUDENT_MODEL, "qlora": True, "max_length": 512},
        description="the paper's student: QLoRA (4-bit NF4 base, LoRA on every projection) on a CUDA GPU",
    ),
    "gemma3-270m-query-twice-ordinal": StudentSpec(
        "causal_lm",
        {**QUERY_TWICE, "objective": "ordinal"},
        description="as gemma3-270m-query-twice, binary cross-entropy of P(grade > k) over the grade tokens",
    ),
}
#: The student of the project's default family (``Profile.student_family``): summary.json's "default_student".
DEFAULT_STUDENT = next(name for name, spec in STUDENTS.items() if spec.family == Profile.student_family)


def default_students() -> str:
    """The students trained when none are named: the paper's QLoRA student with a CUDA GPU, else the CPU default."""
    import torch

    return PAPER_STUDENT if torch.cuda.is_available() else DEFAULT_STUDENT


def chosen_students(names: str) -> list[str]:
    """A comma list of student names -> the names, each checked, its family's module imported now
    (a run of hours never picks up half-edited code later)."""
    students = [name.strip() for name in names.split(",") if name.strip()]
    unknown = [name for name in students if name not in STUDENTS]
    if unknown:
        raise SystemExit(f"unknown student(s) {unknown}; choose among {list(STUDENTS)}")
    for name in students:
        get_family(STUDENTS[name].family).import_module()
    return students


def student_config(spec: StudentSpec, epochs: float | None, seed: int, soft_labels: bool, bf16: bool) -> Any:
    """The family's config for this student; flags that apply to some families only are set where they exist."""
    settings = {**spec.settings, "seed": seed, **({"epochs": epochs} if epochs is not None else {})}
    return get_family(spec.family).make_config(
        settings,
        where_defined={
            "soft_labels": soft_labels,
            "soft_label_weight": 0.5 if soft_labels else 0.0,
            "bf16": bf16 or None,
            "save_steps": CHECKPOINT_STEPS,
        },
    )
