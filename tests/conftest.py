"""Shared fixtures: a tiny causal LM built from a config (no download) and a scripted OpenAI client."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

TINY_WORDS = (
    "rate how well the document answers search query perfectly relevant dedicated to and it fully highly "
    "perhaps with extra or missing detail related on topic but does not irrelevant reply grade digit only "
    "vpn error timeout gateway restart travel policy lunch menu pizza expense report"
).split()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer Llama with a word-level tokenizer whose digits are single tokens."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    symbols = list("0123456789.,:;=-()?!'\"/#")
    vocab = {token: i for i, token in enumerate(specials + symbols + sorted(set(TINY_WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
        initializer_range=0.3,  # large enough that a frozen random output layer can express a confident grade
    )
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class ScriptedCompletions:
    """Stands in for ``openai_client.chat.completions``: returns or raises the scripted items in turn."""

    def __init__(self, script: list[Any]):
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []

    def create(self, **kwargs: Any) -> Any:
        self.requests.append(kwargs)
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        return item


def chat_response(text: str, tokens: list[tuple[str, dict[str, float]]] | None = None,
                  prompt_tokens: int = 10, completion_tokens: int = 2) -> Any:
    """An object shaped like ``openai``'s ChatCompletion."""
    logprobs = None
    if tokens is not None:
        logprobs = SimpleNamespace(content=[
            SimpleNamespace(token=tok, logprob=alts.get(tok, -1.0),
                            top_logprobs=[SimpleNamespace(token=t, logprob=lp) for t, lp in alts.items()])
            for tok, alts in tokens
        ])
    choice = SimpleNamespace(message=SimpleNamespace(content=text), logprobs=logprobs)
    usage = SimpleNamespace(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    return SimpleNamespace(choices=[choice], usage=usage)


def scripted_client(script: list[Any]) -> Any:
    completions = ScriptedCompletions(script)
    return SimpleNamespace(chat=SimpleNamespace(completions=completions))
