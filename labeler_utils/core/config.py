"""Profiles, project paths and run folders shared by every stage."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = PROJECT_ROOT / "data"
DEMO_CORPUS_DIR = DATA_DIR / "demo_corpus"
DEMO_BENCHMARK_PATH = DATA_DIR / "demo_benchmark.jsonl"
RUNS_DIR = Path(os.environ.get("LABELER_RUNS_DIR", PROJECT_ROOT / "runs"))
CACHE_DIR = Path(os.environ.get("LABELER_CACHE_DIR", PROJECT_ROOT / ".cache"))

# Stage folder names inside a run folder, one per notebook.
STAGES = (
    "00_setup",
    "01_seed_documents",
    "02_query_synthesis",
    "03_hard_negatives",
    "04_teacher_labels",
    "05_distill",
    "06_evaluate",
    "07_throughput_cost",
)


@dataclass(frozen=True)
class Profile:
    """Sizes and model choices for one way of running the pipeline."""

    name: str
    max_documents: int | None
    queries_per_document: int
    negatives_per_query: int
    student_model: str
    teacher_model: str
    train_epochs: float
    max_train_steps: int
    max_seq_length: int
    learning_rate: float
    batch_size: int
    eval_max_pairs: int | None
    throughput_pairs: int
    lora_rank: int = 16
    # stage 05 checkpoints every so many steps, so that its rerun resumes a killed training (0: no checkpoints)
    checkpoint_steps: int = 50
    # "bi_encoder" (the bundled MiniLM fine-tuned as a sentence encoder, the default: the best pooled agreement with
    # the human grades of the 97 TREC DL queries in 5-fold cross-validation, see README), "cross_encoder" (the same
    # MiniLM reading query and document together) or "causal_lm" (LoRA/QLoRA on student_model)
    student_family: str = "bi_encoder"
    needs_cuda: bool = False  # refused before any work on a machine without a CUDA GPU
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The student the paper distilled GPT-4o into; the gpu profile's, and stage 05's on a GPU when no family is given.
GPU_STUDENT_MODEL = "microsoft/Phi-3.5-mini-instruct"
#: The family trained on a CUDA GPU when none is given: QLoRA of a causal LM, the paper's method.
GPU_STUDENT_FAMILY = "causal_lm"

# The whole demo corpus; meant for a GPU or a patient CPU.
_FULL = Profile(
    name="full",
    max_documents=None,
    queries_per_document=6,
    negatives_per_query=4,
    student_model="smollm2-135m-instruct",
    teacher_model="smollm2-135m-instruct",
    train_epochs=3.0,
    max_train_steps=-1,
    max_seq_length=512,
    learning_rate=2e-4,
    batch_size=8,
    eval_max_pairs=None,
    throughput_pairs=256,
)

PROFILES: dict[str, Profile] = {
    # Minutes on a 2-core CPU: exercises every stage end to end with the bundled models.
    "smoke": Profile(
        name="smoke",
        max_documents=12,
        queries_per_document=2,
        negatives_per_query=2,
        student_model="smollm2-135m-instruct",
        teacher_model="smollm2-135m-instruct",
        train_epochs=1.0,
        max_train_steps=12,
        max_seq_length=384,
        learning_rate=2e-4,
        batch_size=4,
        eval_max_pairs=25,
        throughput_pairs=16,
        checkpoint_steps=5,  # of its 12 steps: the smoke run exercises checkpointing too
        notes="Pipeline check only: the bundled 135M teacher does not grade relevance well.",
    ),
    "full": _FULL,
    # The paper's method: QLoRA (4-bit NF4 base, LoRA on every linear projection) of a hub SLM on one CUDA GPU,
    # bfloat16 compute from Ampere on, float16 on older cards (T4, V100). Phi-3.5-mini (3.8B) is the paper's student:
    # ~2.2 GB of 4-bit weights. A smaller instruct model that fits a 16 GB card with room to spare:
    # Qwen/Qwen2.5-1.5B-Instruct (1.5B, ~1.1 GB of 4-bit weights), given to stage 05 as student_model. Memory of each
    # choice and how it was estimated: docs/gpu.md.
    "gpu": replace(
        _FULL,
        name="gpu",
        student_model=GPU_STUDENT_MODEL,
        train_epochs=2.0,
        student_family=GPU_STUDENT_FAMILY,
        needs_cuda=True,
        notes="Needs a CUDA GPU and the Hugging Face hub (the student's weights, ~7.6 GB, are downloaded once).",
    ),
}


def get_profile(name: str, **overrides: Any) -> Profile:
    """Return the named profile, with any field overridden by keyword."""
    if name not in PROFILES:
        raise ValueError(f"Unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    unknown = set(overrides) - set(Profile.__dataclass_fields__)
    if unknown:
        raise ValueError(f"Unknown profile fields: {sorted(unknown)}")
    return replace(PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})


class NeedsCuda(RuntimeError):
    """A profile that needs a CUDA GPU was asked for on a machine without one."""


def check_profile_runs_here(name: str) -> None:
    """Refuse, before any slow work, a profile this machine cannot run (the ``gpu`` profile without CUDA)."""
    if not get_profile(name).needs_cuda:
        return
    import torch

    if not torch.cuda.is_available():
        cpu_profiles = " or ".join(f"--profile {p.name}" for p in PROFILES.values() if not p.needs_cuda)
        raise NeedsCuda(
            f"the {name} profile trains a QLoRA student on a CUDA GPU and this machine has none: "
            f"run {cpu_profiles} (the default bi-encoder student trains on a CPU)"
        )


def new_run_id(prefix: str = "run") -> str:
    """A sortable, unique-enough run id such as ``run-20261125-101500``."""
    return f"{prefix}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_dir(run_id_or_path: str | Path, create: bool = True) -> Path:
    """Resolve a run id (under ``runs/``) or a path to a run folder."""
    path = Path(run_id_or_path)
    if not path.is_absolute() and len(path.parts) == 1:
        path = RUNS_DIR / path
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def stage_dir(run_path: str | Path, stage: str, create: bool = True) -> Path:
    """The folder of one stage inside a run folder."""
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; stages are {STAGES}")
    path = Path(run_path) / stage
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def require_artifact(run_path: str | Path, stage: str, name: str) -> Path:
    """Path of an upstream artifact, with an error saying which notebook makes it."""
    path = Path(run_path) / stage / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run notebook {stage}.ipynb for this run folder first "
            f"(or pass the artifact's path explicitly)."
        )
    return path
