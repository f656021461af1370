"""The ways of running a student that are timed: loading, naive ``generate()``, and speed variants of the single pass.

The variants are the shared-prefix KV cache (:class:`PrefixCachedStudentLabeler`), int8 dynamic
quantisation of the linear layers (:func:`quantize_int8`) and another precision (:func:`in_precision`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.devices import gpu_half_precision
from ..students.base import GradeLabel, Labeler, merge_agreement
from ..students.causal_lm.labeler import (
    PROMPT_FORMATS,
    StudentLabeler,
    encode_prompt,
    logits_after_prefix,
    shared_prompt_prefix,
)
from ..students.registry import load_labeler

#: Speed variants timed beside the plain single pass, where the student's family supports them (Labeler.SPEED_VARIANTS).
SPEED_VARIANTS = ("prefix_cache", "int8", "bfloat16")


# ---------------------------------------------------------------------------------------------
# The student: loading, naive generate and the single-pass variants
# ---------------------------------------------------------------------------------------------


def load_student(
    model_or_adapter: str | Path,
    max_length: int = 512,
    merge: bool = True,
    dtype: Any = None,
    check_pairs: Sequence[tuple[str, str]] = (),
) -> Labeler:
    """Load a student of any family for timing; a LoRA adapter is merged into its base in memory (``merge=True``).

    A merged adapter costs exactly what the base model costs; unmerged, PEFT adds the low-rank
    products to every adapted layer. With CUDA the default dtype is the GPU's half precision. A QLoRA
    adapter is merged into its 4-bit base, which is quantized again: with ``check_pairs`` the grades of the
    unmerged and the merged student on them are compared, in the returned labeler's ``merge_agreement``
    (see :func:`merge_agreement`).
    """
    if dtype is None and torch.cuda.is_available():
        dtype = gpu_half_precision()
    labeler = load_labeler(model_or_adapter, max_length=max_length, dtype=dtype)
    if merge and hasattr(labeler.model, "merge_and_unload"):
        unmerged_labels = list(labeler.label(check_pairs, progress=False))  # before the merge changes the model
        labeler = labeler.with_model(labeler.model.merge_and_unload())
        if check_pairs:
            labeler.merge_agreement = merge_agreement(unmerged_labels, labeler, check_pairs)
    return labeler


def is_quantized(labeler: Labeler) -> bool:
    """Whether the labeler's model holds quantized (bitsandbytes 4-bit or 8-bit) weights, which cannot change dtype."""
    return bool(getattr(labeler.transformer(), "is_quantized", False))


_FIRST_DIGIT = re.compile(r"\d")


def parse_generated_grade(text: str, grades: Sequence[int] = (0, 1, 2, 3)) -> int | None:
    """The naive parser: the first digit in the generated text if it is a grade, else None."""
    match = _FIRST_DIGIT.search(text)
    if match is None or int(match.group(0)) not in grades:
        return None
    return int(match.group(0))


def naive_generate_label(
    model: Any,
    tokenizer: Any,
    query: str,
    document: str,
    max_length: int = 512,
    max_new_tokens: int = 4,
    prompt_format: str = PROMPT_FORMATS[0],
) -> tuple[int | None, str, int, int]:
    """One pair the naive way: ``model.generate`` (greedy) on the same prompt, then parse the digit.

    Returns (grade or None, generated text, prompt tokens, generated tokens). The prompt ids are
    the single-pass engine's (same template, same truncation) so that only the method differs.
    """
    ids, _ = encode_prompt(tokenizer, query, document, max_length, prompt_format)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad,
    )
    new = output[0, len(ids) :]
    text = tokenizer.decode(new, skip_special_tokens=True)
    return parse_generated_grade(text), text, len(ids), int(new.numel())


class PrefixCachedStudentLabeler(StudentLabeler):
    """The single-pass engine with the shared instruction prefix computed once and reused (KV cache).

    Every prompt starts with the same tokens (chat template, system prompt, instruction, ``Query:``).
    Their keys and values are computed once; each batch then runs only the pair-specific suffix,
    attending to the cached prefix. Batches whose prompts do not all start with the prefix fall back
    to the full forward pass. Results equal the plain engine's up to float rounding.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        """The arguments of :class:`StudentLabeler`."""
        super().__init__(*args, **kwargs)
        self.prefix_ids = shared_prompt_prefix(self.tokenizer, self.max_length, self.prompt_format)
        body = self.transformer().get_decoder()
        with torch.inference_mode():
            out = body(input_ids=torch.tensor([self.prefix_ids], device=self.device), use_cache=True)
        cache = out.past_key_values
        self._prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.prefix_hits = 0

    @classmethod
    def from_labeler(cls, labeler: StudentLabeler) -> PrefixCachedStudentLabeler:
        return cls(
            labeler.model,
            labeler.tokenizer,
            max_length=labeler.max_length,
            device=str(labeler.device),
            prompt_format=labeler.prompt_format,
        )

    @torch.inference_mode()
    def score_batch(self, encoded: Sequence[list[int]]) -> list[GradeLabel]:
        p = len(self.prefix_ids)
        if any(len(ids) <= p or ids[:p] != self.prefix_ids for ids in encoded):
            return super().score_batch(encoded)
        self.prefix_hits += len(encoded)
        suffixes = [ids[p:] for ids in encoded]
        rows, width = len(suffixes), max(len(s) for s in suffixes)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((rows, width), pad, dtype=torch.long)
        attention = torch.zeros((rows, p + width), dtype=torch.long)
        attention[:, :p] = 1
        for row, ids in enumerate(suffixes):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, p : p + len(ids)] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        last = torch.tensor([len(s) - 1 for s in suffixes], device=self.device)
        logits = logits_after_prefix(self.transformer(), self._prefix_kv, input_ids, attention, last)
        logits = logits[:, self.grade_ids].float()
        return [GradeLabel.from_probabilities(probs) for probs in torch.softmax(logits, dim=-1).cpu().tolist()]


def quantize_int8(labeler: Labeler) -> Labeler:
    """A copy of the student with int8 dynamic quantisation of its linear layers (CPU only; the original is left as it
    is): a causal LM's decoder layers (its vocabulary projection stays in float), an encoder's every linear layer.

    Weights become int8, activations are quantised on the fly (``torch.ao`` dynamic quantisation).
    Outputs change slightly: compare grades before use.
    """
    from torch.ao.quantization import quantize_dynamic

    if isinstance(labeler, StudentLabeler):
        model = copy.deepcopy(labeler.transformer())
        quantize_dynamic(model.get_decoder(), {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        return labeler.with_model(model, device="cpu")
    copied = copy.deepcopy(labeler)
    copied.model.to("cpu")
    copied.device = torch.device("cpu")
    quantize_dynamic(copied.transformer(), {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return copied


def in_precision(labeler: Labeler, dtype: torch.dtype) -> Labeler:
    """A copy of the labeler whose model computes in ``dtype`` (the original is left as it is); not for a quantized
    model (:func:`is_quantized`), whose copy would double its GPU memory and whose weights cannot be cast."""
    if is_quantized(labeler):
        raise ValueError("a quantized (4-bit) student computes in its quantization's compute dtype: it cannot be cast")
    copied = copy.deepcopy(labeler)
    copied.model.to(dtype)
    return copied
