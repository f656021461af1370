"""The student families: one registration each, so no caller branches on a family.

A family is a module that provides a config dataclass, a train function
``train(records, output_dir, config, data_description) -> manifest``, a labeler class (a
:class:`~labeler_utils.students.base.Labeler` with a ``load`` classmethod) and a zero-shot baseline
``zero_shot_labeler(train_records, config)``, the untrained labeler the distilled one must beat.
Modules are imported only when a family is used, so importing this registry stays cheap.

A new family is one :func:`register_family` call; stage 05, the throughput benchmark, the
``label`` command and the TREC DL reproduction then take it by name.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..core.config import GPU_STUDENT_FAMILY, GPU_STUDENT_MODEL, Profile
from .base import LABELER_MANIFEST, Labeler, read_manifest

#: The family of a manifest written before manifests recorded one (only causal-LM adapters were).
LEGACY_FAMILY = "causal_lm"


@dataclass(frozen=True)
class StudentFamily:
    """Where a family's pieces live; each is looked up in ``module`` when first used."""

    name: str
    module: str
    config_class_name: str
    train_name: str
    labeler_class_name: str
    model_subdir: str  # the folder under a training output folder that holds the trained student and its manifest
    summary: str
    zero_shot_name: str = "zero_shot_labeler"
    profile_base_model: bool = False  # its base model defaults to the profile's ``student_model``

    def import_module(self) -> ModuleType:
        """The family's module, imported now if it was not yet."""
        return importlib.import_module(self.module)

    def _member(self, name: str) -> Any:
        return getattr(self.import_module(), name)

    @property
    def config_class(self) -> type:
        return self._member(self.config_class_name)

    @property
    def labeler_class(self) -> type[Labeler]:
        return self._member(self.labeler_class_name)

    def train(
        self, records: Any, output_dir: str | Path, config: Any, data_description: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Train a student on graded records into ``output_dir``; returns its manifest."""
        return self._member(self.train_name)(records, output_dir, config, data_description)

    def load(self, path_or_name: str | Path, **kwargs: Any) -> Labeler:
        """Load a trained student (its folder, or the training output folder above it), or a base model name or
        folder, as this family's labeler."""
        return self.labeler_class.load(distilled_student(path_or_name) or path_or_name, **kwargs)

    def zero_shot(self, train_records: Any, config: Any) -> Any:
        """The untrained baseline for ``config`` (thresholds, where it has any, from the training records only)."""
        return self._member(self.zero_shot_name)(train_records, config)

    def make_config(self, settings: Mapping[str, Any], where_defined: Mapping[str, Any] | None = None) -> Any:
        """The family's config from ``settings`` (each must be a field), plus ``where_defined`` for the fields it has.

        ``where_defined`` carries options meant for some families only (``bf16`` for the causal LM,
        ``soft_labels`` for the encoders), so one call site serves every family.
        """
        names = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(f"{self.config_class.__name__} ({self.name}) has no setting(s) {unknown}")
        optional = {k: v for k, v in (where_defined or {}).items() if k in names}
        return self.config_class(**{**optional, **settings})


#: The settings that switch a family's config between hard labels and the teacher's distribution.
SOFT_LABEL_SETTINGS = {
    True: {"soft_labels": True, "soft_label_weight": 0.5},
    False: {"soft_labels": False, "soft_label_weight": 0.0},
}
FAMILIES: dict[str, StudentFamily] = {}


def with_soft_labels(config: Any, soft: bool) -> Any:
    """A copy of a family config that trains on the teacher's distributions (``soft``) or on hard grades only."""
    names = {f.name for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{k: v for k, v in SOFT_LABEL_SETTINGS[soft].items() if k in names})


def register_family(family: StudentFamily) -> StudentFamily:
    """Add a family to the registry (a name registered twice is an error)."""
    if family.name in FAMILIES:
        raise ValueError(f"student family {family.name!r} is registered already")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> StudentFamily:
    """The registered family called ``name``; an unknown name is refused with the choices."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown student family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


register_family(
    StudentFamily(
        "cross_encoder",
        "labeler_utils.students.cross_encoder",
        "CrossEncoderConfig",
        "train_cross_encoder",
        "CrossEncoderLabeler",
        "model",
        "cross-encoder (base_model: the bundled MiniLM by default, or all-mpnet-base-v2): query and document read "
        "together, a grade head on top",
    )
)
register_family(
    StudentFamily(
        "causal_lm",
        "labeler_utils.students.causal_lm.train",
        "DistillConfig",
        "train_student",
        "StudentLabeler",
        "adapter",
        "small causal LM with LoRA/QLoRA: the probabilities of the grade tokens after one forward pass",
        profile_base_model=True,
    )
)
register_family(
    StudentFamily(
        "bi_encoder",
        "labeler_utils.students.bi_encoder",
        "BiEncoderConfig",
        "train_bi_encoder",
        "BiEncoderLabeler",
        "bi_encoder",
        "bi-encoder (base_model: the bundled MiniLM by default, or all-mpnet-base-v2) fine-tuned on the grades: cosine "
        "of query and document embeddings, cut at trained thresholds",
    )
)


def stage_student(
    settings: Profile, family: str | None = None, base_model: str | None = None
) -> tuple[StudentFamily, str | None]:
    """The family stage 05 trains and its base model (None: the family's own default, the bundled MiniLM).

    ``family`` when given, else with a CUDA GPU present the causal LM (QLoRA, the paper's method,
    :data:`~labeler_utils.config.GPU_STUDENT_FAMILY`), else the profile's family. ``base_model`` when given, else
    for a family that takes the profile's student model: the profile's when the family was given or is the
    profile's own, the paper's hub student (:data:`~labeler_utils.config.GPU_STUDENT_MODEL`) when the GPU chose
    it; the smoke profile keeps its bundled model, a pipeline check with no download.
    """
    import torch

    gpu_choice = family is None and settings.student_family != GPU_STUDENT_FAMILY and torch.cuda.is_available()
    chosen = get_family(GPU_STUDENT_FAMILY if gpu_choice else family or settings.student_family)
    if base_model or not chosen.profile_base_model:
        return chosen, base_model
    return chosen, GPU_STUDENT_MODEL if gpu_choice and settings.name != "smoke" else settings.student_model


def distilled_student(folder: str | Path) -> Path | None:
    """The folder holding a trained student's manifest: ``folder`` itself, else the sub-folder of any family
    (``adapter/``, ``model/``, ...), the most recently trained when several exist; None when there is none."""
    path = Path(str(folder))
    if (path / LABELER_MANIFEST).exists():
        return path
    subdirs = dict.fromkeys(family.model_subdir for family in FAMILIES.values())
    found = [path / sub for sub in subdirs if (path / sub / LABELER_MANIFEST).exists()]
    return max(found, key=lambda f: (f / LABELER_MANIFEST).stat().st_mtime_ns, default=None)


def family_of(path_or_name: str | Path, family: str | None = None) -> tuple[StudentFamily, str | Path]:
    """The family of a student and the path to load it from.

    ``family`` when given, else the manifest's ``family`` of a trained student folder (or its
    sub-folder), else :data:`LEGACY_FAMILY` (a base model name, hub id or folder without manifest).
    """
    holder = distilled_student(path_or_name)
    if holder is not None:
        return get_family(family or read_manifest(holder).get("family", LEGACY_FAMILY)), holder
    return get_family(family or LEGACY_FAMILY), path_or_name


def load_labeler(path_or_name: str | Path, family: str | None = None, **kwargs: Any) -> Labeler:
    """Load a student of any family with one call (see :func:`family_of`); ``kwargs`` go to its ``load``."""
    found, path = family_of(path_or_name, family)
    return found.load(path, **kwargs)
