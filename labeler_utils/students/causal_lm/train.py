"""Stage 05: distil teacher grades into a small causal LM with LoRA / QLoRA.

* QLoRA on a GPU: 4-bit NF4 base with double quantization, LoRA on every linear projection, bfloat16
  compute from compute capability 8.0 (Ampere) on and float16 compute with float32 adapters on older
  GPUs (T4, V100). On a CPU: plain LoRA on a float32 base (bitsandbytes 4-bit is not worth it there).
* trl's ``SFTTrainer`` drives training. Examples are tokenised here so that the label is exactly
  one token: the grade digit right after the student prompt. The loss is computed on that token
  only. Two objectives: ``"classification"``, cross-entropy on the hard grade, optionally mixed with
  the KL divergence between the teacher's grade distribution and the student's distribution over
  the four grade tokens; ``"ordinal"``, binary cross-entropy of the student's ``P(grade > k)``
  (sums of its grade-token probabilities) towards the teacher's, for k = 0, 1, 2, so that a grade
  off by two costs more than one off by one. Labelling reads the grade tokens the same way for both.
* The adapter is saved with a manifest (base model, data, hyperparameters, seed, versions).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...core.artifacts import follow_umask, write_json
from ...core.devices import gpu_half_precision
from ...core.models import load_causal_lm, release_gpu_memory, resolve_model
from ..base import (
    LABELER_MANIFEST,
    checkpoint_to_resume,
    exceed_probabilities,
    inverse_frequency_weights,
    merge_agreement,
    write_manifest,
)
from .labeler import (
    FAMILY,
    GRADES,
    PROMPT_FORMATS,
    StudentLabeler,
    encode_prompt,
    grade_token_ids,
    logits_after_prefix,
    shared_prompt_prefix,
)

LORA_TARGETS = "all-linear"
OBJECTIVES = ("classification", "ordinal")


@dataclass
class DistillConfig:
    """Hyperparameters of one distillation run (all written to the manifest)."""

    base_model: str = "smollm2-135m-instruct"
    qlora: bool | None = None  # None: 4-bit QLoRA when CUDA is available, plain LoRA otherwise
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    soft_label_weight: float = 0.0  # 0 = hard-label cross-entropy only; 1 = KL to the teacher only
    class_balance: bool = False  # weight the loss by inverse grade frequency
    objective: str = OBJECTIVES[0]  # "classification" (cross-entropy) or "ordinal" (cumulative, see grade_loss)
    prompt_format: str = PROMPT_FORMATS[0]  # see student.PROMPT_FORMATS; the labeler reads it from the manifest
    gradient_checkpointing: bool | None = None  # None: on for QLoRA (memory), off on CPU (speed)
    shared_prefix: bool | None = None  # instruction prefix run once per batch; None: on unless checkpointing
    bf16: bool | None = None  # bfloat16 autocast; None: on for QLoRA on an Ampere or newer GPU, off otherwise
    group_by_length: bool = True  # batches of similar length (less padding)
    save_steps: int = 0  # > 0: checkpoint every save_steps steps; a rerun of the same training resumes from the last
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    seed: int = 0
    logging_steps: int = 5

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r}: choose one of {OBJECTIVES}")

    def use_qlora(self) -> bool:
        return torch.cuda.is_available() if self.qlora is None else self.qlora

    def use_gradient_checkpointing(self) -> bool:
        return self.use_qlora() if self.gradient_checkpointing is None else self.gradient_checkpointing

    def use_shared_prefix(self) -> bool:
        """Whether the shared prompt prefix is run once per batch (needs the KV cache: no checkpointing)."""
        if self.shared_prefix and self.use_gradient_checkpointing():
            raise ValueError(
                "shared_prefix needs the KV cache, which gradient checkpointing turns off: set one to False"
            )
        return not self.use_gradient_checkpointing() if self.shared_prefix is None else self.shared_prefix

    def _qlora_on_gpu_computing(self, dtype: torch.dtype) -> bool:
        return self.use_qlora() and torch.cuda.is_available() and gpu_half_precision() == dtype

    def use_bf16(self) -> bool:
        """bfloat16 autocast: by default for QLoRA on a GPU that computes bfloat16 natively (not emulated)."""
        return self._qlora_on_gpu_computing(torch.bfloat16) if self.bf16 is None else self.bf16

    def use_fp16(self) -> bool:
        """float16 autocast (with loss scaling): QLoRA on a GPU older than Ampere, unless bfloat16 was asked for."""
        return not self.use_bf16() and self._qlora_on_gpu_computing(torch.float16)


def build_examples(
    tokenizer: Any, records: Sequence[dict[str, Any]], max_length: int, prompt_format: str = PROMPT_FORMATS[0]
) -> tuple[list[dict[str, Any]], int]:
    """Tokenise labelled records into training examples whose only label is the grade token.

    Each record needs ``query``, ``document`` and ``grade``; ``distribution`` (four
    probabilities) is optional and falls back to a one-hot of the grade. Returns the examples and
    the number of documents truncated to fit ``max_length``.
    """
    grade_ids = grade_token_ids(tokenizer, prompt_format)
    examples, truncated = [], 0
    for index, record in enumerate(records):
        grade = record.get("grade")
        if grade not in GRADES:
            raise ValueError(
                f"record {index} ({record.get('query_id')}, {record.get('doc_id')}): grade {grade!r} not in 0-3"
            )
        prompt_ids, cut = encode_prompt(tokenizer, record["query"], record["document"], max_length, prompt_format)
        truncated += cut
        distribution = record.get("distribution") or [float(g == grade) for g in GRADES]
        if len(distribution) != len(GRADES) or not math.isclose(sum(distribution), 1.0, abs_tol=1e-3):
            raise ValueError(f"record {index}: distribution {distribution} is not 4 probabilities summing to 1")
        examples.append(
            {
                "input_ids": prompt_ids + [grade_ids[grade]],
                "labels": [-100] * len(prompt_ids) + [grade_ids[grade]],
                "grade": grade,
                "teacher_distribution": [float(p) for p in distribution],
            }
        )
    return examples, truncated


class GradeCollator:
    """Right-pads token ids and stacks grades and teacher distributions."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            attention[row, :n] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "grade": torch.tensor([item["grade"] for item in batch]),
            "teacher_distribution": torch.tensor([item["teacher_distribution"] for item in batch]),
        }


def grade_loss(
    answer_logits: torch.Tensor,
    grades: torch.Tensor,
    teacher_distribution: torch.Tensor,
    grade_ids: torch.Tensor,
    soft_label_weight: float,
    class_weights: torch.Tensor | None = None,
    objective: str = OBJECTIVES[0],
) -> torch.Tensor:
    """Loss at the grade position only: (1-w) * hard-grade term + w * teacher-distribution term.

    ``answer_logits`` are the next-token logits ``[batch, vocab]`` at the position right before
    each row's grade token. ``"classification"``: cross-entropy to the grade's token,
    ``grade_ids[grade]``, plus KL(teacher || student) over the grade tokens. ``"ordinal"``: mean binary
    cross-entropy of the student's ``P(grade > k)`` (from its softmax over the four grade tokens)
    towards 0/1 of the hard grade, plus the same towards the teacher distribution's ``P(grade > k)``.
    ``class_weights`` weigh each row's hard term by its grade.
    """
    answer_logits = answer_logits.float()
    if objective == "ordinal":
        exceed = exceed_probabilities(torch.softmax(answer_logits[:, grade_ids], dim=-1)).clamp(1e-6, 1 - 1e-6)
        one_hot = F.one_hot(grades, len(GRADES)).float()
        hard = F.binary_cross_entropy(exceed, exceed_probabilities(one_hot), reduction="none").mean(dim=-1)
    else:
        hard = F.cross_entropy(answer_logits, grade_ids[grades], reduction="none")
    if class_weights is not None:
        hard = hard * class_weights.to(hard.device)[grades]
    loss = hard.mean() * (1.0 - soft_label_weight)
    if soft_label_weight > 0:
        if objective == "ordinal":
            soft = F.binary_cross_entropy(exceed, exceed_probabilities(teacher_distribution.float()))
        else:
            student_log_probs = F.log_softmax(answer_logits[:, grade_ids], dim=-1)
            soft = F.kl_div(student_log_probs, teacher_distribution.float(), reduction="batchmean")
        loss = loss + soft_label_weight * soft
    return loss


def answer_logits(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_positions: torch.Tensor,
    prefix_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Next-token logits ``[batch, vocab]`` at each row's answer position, with gradients.

    Vocabulary logits are computed only at the answer positions (``logits_to_keep``). With
    ``prefix_ids`` (the instruction every prompt starts with), the prefix runs once and its keys
    and values are shared by the batch's rows (:func:`logits_after_prefix`): the same result as
    running it in every row, except that LoRA dropout draws one mask for the prefix instead of one
    per row. A batch whose rows do not all start with the prefix runs whole.
    """
    p = len(prefix_ids)
    prefix = torch.tensor([list(prefix_ids)], device=input_ids.device)
    if (
        not p
        or input_ids.shape[1] <= p
        or bool((answer_positions < p).any())
        or not torch.equal(input_ids[:, :p], prefix.expand(input_ids.shape[0], -1))
    ):
        kept = torch.unique(answer_positions)
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=kept)
        return out.logits[
            torch.arange(input_ids.shape[0], device=input_ids.device), torch.searchsorted(kept, answer_positions)
        ]
    prefix_cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
    prefix_kv = [(layer.keys, layer.values) for layer in prefix_cache.layers]
    return logits_after_prefix(model, prefix_kv, input_ids[:, p:], attention_mask, answer_positions - p)


def _trainer_class() -> type:
    from trl import SFTTrainer

    class GradeSFTTrainer(SFTTrainer):
        """SFTTrainer whose loss is :func:`grade_loss` on the grade token.

        :func:`grade_loss` is each micro-batch's mean, not a sum over ``num_items_in_batch``: the Trainer must divide
        it by the gradient accumulation steps (it would not for a model that accepts loss keyword arguments).
        """

        loss_is_scaled_for_ga = False

        def __init__(
            self,
            *args: Any,
            grade_ids: list[int],
            soft_label_weight: float,
            class_weights: torch.Tensor | None,
            prefix_ids: Sequence[int],
            objective: str,
            **kwargs: Any,
        ):
            super().__init__(*args, **kwargs)
            self.objective = objective
            self.grade_ids = torch.tensor(grade_ids)
            self.soft_label_weight = soft_label_weight
            self.class_weights = class_weights
            self.prefix_ids = list(prefix_ids)

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, torch.Tensor],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            grades = inputs.pop("grade")
            teacher = inputs.pop("teacher_distribution")
            labels = inputs.pop("labels")
            answer_positions = (labels != -100).float().argmax(dim=1) - 1  # the position that predicts the grade
            logits = answer_logits(
                model, inputs["input_ids"], inputs["attention_mask"], answer_positions, self.prefix_ids
            )
            loss = grade_loss(
                logits,
                grades,
                teacher,
                self.grade_ids.to(labels.device),
                self.soft_label_weight,
                self.class_weights,
                self.objective,
            )
            return (loss, logits) if return_outputs else loss

    return GradeSFTTrainer


def train_student(
    records: Sequence[dict[str, Any]],
    output_dir: str | Path,
    config: DistillConfig,
    data_description: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a LoRA/QLoRA adapter on graded records; returns the manifest (also saved beside it)."""
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from trl import SFTConfig

    output_dir = Path(output_dir)
    qlora = config.use_qlora()
    torch.manual_seed(config.seed)
    model, tokenizer = load_causal_lm(
        config.base_model,
        quantize_4bit=qlora,
        dtype=None if qlora else torch.float32,  # plain LoRA trains on a float32 base, without autocast
        device_map={"": 0} if qlora and torch.cuda.is_available() else None,  # bitsandbytes' NF4 also runs on a CPU
    )
    checkpointing = config.use_gradient_checkpointing()
    prefix_ids = (
        shared_prompt_prefix(tokenizer, config.max_length, config.prompt_format) if config.use_shared_prefix() else []
    )
    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    examples, truncated = build_examples(tokenizer, records, config.max_length, config.prompt_format)
    if not examples:
        raise ValueError("No training records: the teacher stage produced no gradable pairs")
    class_weights = inverse_frequency_weights([e["grade"] for e in examples]) if config.class_balance else None
    args = SFTConfig(
        output_dir=str(output_dir / "checkpoints"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=config.weight_decay,
        bf16=config.use_bf16(),
        fp16=config.use_fp16(),
        gradient_checkpointing=checkpointing,
        max_length=config.max_length,
        packing=False,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=2,
        report_to=[],
        seed=config.seed,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        data_collator=GradeCollator(tokenizer.pad_token_id),
        peft_config=peft_config,
        grade_ids=grade_token_ids(tokenizer, config.prompt_format),
        soft_label_weight=config.soft_label_weight,
        class_weights=class_weights,
        prefix_ids=prefix_ids,
        objective=config.objective,
    )
    if qlora and not config.use_bf16():
        _adapters_to_float32(trainer.model)
    resume_from = checkpoint_to_resume(
        output_dir / "checkpoints", config, [(e["input_ids"], e["teacher_distribution"]) for e in examples]
    )
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    adapter_dir = output_dir / "adapter"
    trainer.model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    follow_umask(adapter_dir)
    manifest = write_manifest(
        adapter_dir,
        FAMILY,
        config,
        "qlora-nf4" if qlora else "lora",
        trainer,
        result,
        seconds,
        [e["grade"] for e in examples],
        data_description,
        base_model_resolved=resolve_model(config.base_model),
        shared_prefix_tokens=len(prefix_ids),
        truncated_documents=truncated,
        resumed_from=resume_from,
    )
    del trainer, model
    release_gpu_memory()  # the zero-shot baseline and the distilled student are loaded next on the same GPU
    return manifest


def _adapters_to_float32(model: Any) -> None:
    """Cast the trainable (LoRA) weights back to float32.

    trl casts a quantized model's adapters to bfloat16 (the QLoRA paper's bf16 recipe). Without bfloat16
    compute (float16 autocast on a GPU older than Ampere, float32 on a CPU) they would be updated in emulated
    bfloat16; float32 adapters are what float16 loss scaling expects.
    """
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, check_pairs: Sequence[tuple[str, str]]) -> Path:
    """Merge a LoRA adapter into its unquantised base and save a standalone model folder.

    A QLoRA adapter was trained on the 4-bit base and is merged into the unquantised one, so its grades can
    change: the merged model and the adapter label ``check_pairs`` (e.g. the dev pairs) and the manifest of the
    merged folder states their agreement under ``merge_agreement`` (see
    :func:`labeler_utils.students.base.merge_agreement`).
    """
    from peft import PeftModel

    if not check_pairs:
        raise ValueError(
            "merge_adapter needs check_pairs: the pairs on which the merged model is compared with the adapter"
        )
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    manifest = json.loads((adapter_dir / LABELER_MANIFEST).read_text())
    base, tokenizer = load_causal_lm(manifest["base_model"])
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    follow_umask(output_dir)
    del base, merged
    release_gpu_memory()
    write_json(
        output_dir / LABELER_MANIFEST, {**manifest, "merged_from": str(adapter_dir)}
    )  # read by the merged labeler
    unmerged_labels = list(StudentLabeler.load(adapter_dir).label(check_pairs, progress=False))
    agreement = merge_agreement(unmerged_labels, StudentLabeler.load(output_dir), check_pairs)
    write_json(
        output_dir / LABELER_MANIFEST, {**manifest, "merged_from": str(adapter_dir), "merge_agreement": agreement}
    )
    return output_dir


def zero_shot_labeler(train_records: Sequence[dict[str, Any]], config: DistillConfig) -> StudentLabeler:
    """The base model read the way the distilled student is (same prompt format and length), without an adapter."""
    return StudentLabeler.load(config.base_model, max_length=config.max_length, prompt_format=config.prompt_format)
