"""The student labeler: prompt format, loading, and grading by one forward pass.

The student never generates text to label a pair. Its prompt ends where the grade would be
written; one forward pass gives the logits of the next token, and the probabilities of the grade
tokens ``"0"``..``"3"`` (renormalised) are the label distribution. The expected relevance is
``sum(g * p_g)`` and the grade is the arg-max. Batches are sorted by length so that padding stays
small, inference runs under ``torch.inference_mode``, and input and output are streamed so that
memory stays flat for any number of pairs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...core.devices import default_device
from ...core.models import load_causal_lm
from ..base import GRADES, GradeLabel, Labeler, read_manifest

STUDENT_INSTRUCTION = (
    "Rate how well the document answers the search query.\n"
    "3 = perfectly relevant: dedicated to the query and answers it fully.\n"
    "2 = highly relevant: answers the query, perhaps with extra or missing detail.\n"
    "1 = related: on the topic but does not answer the query.\n"
    "0 = irrelevant.\n"
    "Reply with the grade digit only."
)
#: Where the query stands in the prompt: before the document only (the default), or before and after it, so
#: that the document is read knowing the query and the query is read again just before the grade.
PROMPT_FORMATS = ("query-document", "query-document-query")
FAMILY = "causal_lm"


def _uses_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(tokenizer: Any, query: str, document: str, prompt_format: str = PROMPT_FORMATS[0]) -> str:
    """The student's prompt in ``prompt_format`` (see :data:`PROMPT_FORMATS`), ending exactly where the grade digit
    goes (no trailing space: the digit follows ``Grade:`` or the chat template's answer prefix directly)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    body = f"{STUDENT_INSTRUCTION}\n\nQuery: {query}\n\nDocument:\n{document}"
    if prompt_format == "query-document-query":
        body += f"\n\nQuery: {query}"
    if _uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
    return f"{body}\n\nGrade:"


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt text, starting with the tokenizer's start-of-sequence token where it defines one and
    no chat template writes it (Gemma reads badly without its BOS); a chat template's text carries its own."""
    # verbose=False: prompts longer than the tokenizer's limit are measured here and cut, never fed to the model
    ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or _uses_chat_template(tokenizer) or ids[:1] == [bos]:
        return ids
    return [bos, *ids]


def grade_token_ids(tokenizer: Any, prompt_format: str = PROMPT_FORMATS[0]) -> list[int]:
    """Token id of each grade digit as it follows the student's prompt, found in context.

    A bare ``"0"`` is two tokens for a SentencePiece tokenizer that adds a leading space (``▁``, ``0``: the
    Llama-2 vocabulary of Phi-3.5-mini), so each digit is read where it is written: the prompt is encoded,
    then the prompt plus the digit, and the digit must add exactly one token after the unchanged prompt.
    Training and labelling use that token.
    """
    prompt = prompt_text(tokenizer, "query", "document", prompt_format)
    prompt_ids = encode_text(tokenizer, prompt)
    ids = []
    for grade in GRADES:
        with_grade = encode_text(tokenizer, prompt + str(grade))
        added = len(with_grade) - len(prompt_ids)
        if with_grade[: len(prompt_ids)] != prompt_ids or added != 1:
            raise ValueError(
                f"Grade {grade} written after the student prompt is {added} token(s) of this tokenizer, or changes "
                "the prompt's last tokens; one-pass scoring needs exactly 1 new token"
            )
        ids.append(with_grade[-1])
    return ids


def encode_prompt(
    tokenizer: Any, query: str, document: str, max_length: int, prompt_format: str = PROMPT_FORMATS[0]
) -> tuple[list[int], bool]:
    """Token ids of the prompt (see :func:`encode_text`) with the document cut to fit ``max_length``; returns
    (ids, truncated).

    Truncation policy: the instruction and the query are always kept whole; the document is cut
    from the end, token by token, so that the whole prompt plus the grade token fit.
    """
    full = encode_text(tokenizer, prompt_text(tokenizer, query, document, prompt_format))
    if len(full) < max_length:
        return full, False
    overhead = len(encode_text(tokenizer, prompt_text(tokenizer, query, "", prompt_format)))
    budget = max_length - overhead - 2
    if budget < 16:
        raise ValueError(f"max_length={max_length} leaves no room for the document (prompt alone is {overhead} tokens)")
    doc_ids = tokenizer.encode(document, add_special_tokens=False, verbose=False)[:budget]
    cut = tokenizer.decode(doc_ids)
    ids = encode_text(tokenizer, prompt_text(tokenizer, query, cut, prompt_format))
    return ids[: max_length - 1], True


def shared_prompt_prefix(tokenizer: Any, max_length: int = 512, prompt_format: str = PROMPT_FORMATS[0]) -> list[int]:
    """The token ids every student prompt starts with (longest common prefix of unrelated prompts)."""
    probes = [
        encode_prompt(tokenizer, query, document, max_length, prompt_format)[0]
        for query, document in (("1 alpha", "2 beta"), ("x zeta", "y eta"), ("Q", "D"))
    ]
    common = 0
    while all(common < len(ids) for ids in probes) and len({ids[common] for ids in probes}) == 1:
        common += 1
    return probes[0][: max(common - 1, 0)]  # one token held back: it may merge with the query's first characters


def logits_after_prefix(
    model: Any,
    prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
    suffix_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_positions: torch.Tensor,
) -> torch.Tensor:
    """Next-token logits ``[batch, vocab]`` at each row's answer position, the shared prefix already run.

    ``prefix_kv`` holds each layer's (keys, values) of the prefix for one row; every row of the
    right-padded ``suffix_ids`` attends to it. ``attention_mask`` covers prefix and suffix;
    ``answer_positions`` count from the start of the suffix. Vocabulary logits are computed only
    there (``logits_to_keep``): with Gemma's 262k-token vocabulary they would otherwise cost more
    than the transformer itself.
    """
    from transformers import DynamicCache

    rows, width = suffix_ids.shape
    p = prefix_kv[0][0].shape[-2]
    cache = DynamicCache(
        ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in prefix_kv]
    )
    positions = torch.arange(p, p + width, device=suffix_ids.device)
    kept = torch.unique(answer_positions)
    out = model(
        input_ids=suffix_ids,
        attention_mask=attention_mask,
        past_key_values=cache,
        use_cache=True,
        position_ids=positions.unsqueeze(0).expand(rows, -1),
        cache_position=positions,
        logits_to_keep=kept,
    )
    return out.logits[torch.arange(rows, device=suffix_ids.device), torch.searchsorted(kept, answer_positions)]


class StudentLabeler(Labeler):
    """A causal-LM student (base model, merged model or LoRA adapter) that labels pairs in one pass."""

    FAMILY = FAMILY
    SPEED_VARIANTS = ("naive_generate", "prefix_cache", "int8", "bfloat16")

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_length: int = 512,
        device: str | None = None,
        prompt_format: str = PROMPT_FORMATS[0],
    ):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prompt_format = prompt_format
        self.device = default_device(device)
        if not getattr(model, "hf_device_map", None) and not getattr(model, "is_loaded_in_4bit", False):
            self.model.to(self.device)
        self.grade_ids = torch.tensor(grade_token_ids(tokenizer, prompt_format), device=self.device)
        self.truncated = 0

    def with_model(self, model: Any, device: str | None = None) -> StudentLabeler:
        """The same labeler (tokenizer, length, prompt format) around another model, e.g. a merged or quantised one."""
        return type(self)(
            model,
            self.tokenizer,
            max_length=self.max_length,
            device=device or str(self.device),
            prompt_format=self.prompt_format,
        )

    @classmethod
    def load(
        cls, model_or_adapter: str | Path, max_length: int = 512, dtype: Any = None, prompt_format: str | None = None
    ) -> StudentLabeler:
        """Load a bundled name, hub id, model folder, or an adapter folder written by the distill stage.

        A trained student (an adapter, or a merged model, with its manifest) is read with the prompt
        format and length it was trained with; ``prompt_format`` sets the format for a base model
        (default: the first of :data:`PROMPT_FORMATS`).
        """
        path = Path(str(model_or_adapter))
        manifest = read_manifest(path)
        if manifest:
            trained_format = manifest.get("config", {}).get("prompt_format", PROMPT_FORMATS[0])
            if prompt_format not in (None, trained_format):
                raise ValueError(f"{path} was trained with prompt_format {trained_format!r}, not {prompt_format!r}")
            prompt_format = trained_format
            max_length = manifest.get("max_length", max_length)
        if (path / "adapter_config.json").exists():
            from peft import PeftModel

            base_name = (
                manifest.get("base_model")
                or json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
            )
            # An adapter trained on a 4-bit base (QLoRA) is applied to the same 4-bit base, as in training.
            quantized = manifest.get("method") == "qlora-nf4"
            base, tokenizer = load_causal_lm(
                base_name,
                dtype=dtype,
                quantize_4bit=quantized,
                device_map={"": 0} if quantized and torch.cuda.is_available() else None,
            )
            model = PeftModel.from_pretrained(base, path)
        else:
            model, tokenizer = load_causal_lm(model_or_adapter, dtype=dtype)
        return cls(model, tokenizer, max_length=max_length, prompt_format=prompt_format or PROMPT_FORMATS[0])

    def encode_pair(self, query: str, document: str) -> tuple[list[int], bool]:
        """Token ids of one pair as the model reads it, and whether the document was cut to fit."""
        return encode_prompt(self.tokenizer, query, document, self.max_length, self.prompt_format)

    @torch.inference_mode()
    def score_batch(self, encoded: Sequence[list[int]]) -> list[GradeLabel]:
        """Grade-token probabilities for a batch of encoded prompts (right padding, last real position)."""
        width = max(len(ids) for ids in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        last = attention.sum(dim=1) - 1
        hidden = self._last_hidden_states(input_ids, attention)
        final = hidden[torch.arange(len(encoded), device=self.device), last]
        logits = self._output_layer()(final)[:, self.grade_ids].float()
        probabilities = torch.softmax(logits, dim=-1).cpu().tolist()
        return [GradeLabel.from_probabilities(p) for p in probabilities]

    def _last_hidden_states(self, input_ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Hidden states of the decoder body: the vocabulary projection is then done for one position only."""
        body = self.transformer().get_decoder()
        return body(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state

    def _output_layer(self) -> Any:
        return self.transformer().get_output_embeddings()
