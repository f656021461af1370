"""What the two encoder families (bi-encoder and cross-encoder) share: their training settings and trainer arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.models import BUNDLED_MODELS, bundled_minilm_path


@dataclass
class EncoderSettings:
    """Training settings common to the encoder families (all written to the manifest)."""

    base_model: str = field(default_factory=bundled_minilm_path)  # bundled encoder name, folder or hub id
    soft_labels: bool = True  # train on the teacher's distribution (or its expected grade) when a record has one
    epochs: float = 1.0
    max_steps: int = -1  # > 0: stop after this many optimizer steps (overrides epochs)
    learning_rate: float = 2e-5
    batch_size: int = 16
    max_length: int = 256
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0
    logging_steps: int = 20
    save_steps: int = 0  # > 0: checkpoint every save_steps steps; a rerun of the same training resumes from the last

    def check_base_model(self, family: str) -> None:
        """Refuse a bundled causal LM as the encoder of ``family``."""
        if self.base_model in BUNDLED_MODELS:
            raise ValueError(
                f"{self.base_model!r} is a bundled causal LM: train it with student_family='causal_lm', or "
                f"give the {family} a sentence encoder (default: the bundled MiniLM)"
            )


def encoder_training_arguments(arguments_class: type, output_dir: Path, config: EncoderSettings, **extra: Any) -> Any:
    """sentence-transformers training arguments from an encoder family's config (checkpoints only with
    ``save_steps``, no reports)."""
    return arguments_class(
        output_dir=str(output_dir / "checkpoints"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=2,
        report_to=[],
        seed=config.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        **extra,
    )
