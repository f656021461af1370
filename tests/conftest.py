"""Shared fixtures: a tiny causal LM built from a config (no download), a scripted OpenAI client, a test HTTP server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

TINY_WORDS = (
    "rate how well the document answers search query perfectly relevant dedicated to and it fully highly "
    "perhaps with extra or missing detail related on topic but does not irrelevant reply grade digit only "
    "vpn error timeout gateway restart travel policy lunch menu pizza expense report"
).split()


def save_tiny_llama(folder: Path, hidden_size: int) -> Path:
    """A randomly initialised 2-layer Llama with a word-level tokenizer whose digits are single tokens, in ``folder``."""
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
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        initializer_range=0.3,  # large enough that a frozen random output layer can express a confident grade
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama, 32 wide."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), hidden_size=32)


@pytest.fixture(scope="session")
def tiny_model_dir_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama, 64 wide: on CPUs with AVX512-BF16, bitsandbytes' 4-bit inference repacks each weight in blocks
    of 64 input features and fails on narrower layers (real models are hundreds wide)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama_64"), hidden_size=64)


@pytest.fixture(scope="session")
def sentencepiece_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose SentencePiece-style tokenizer (Metaspace, leading ``▁``) makes a bare ``"0"`` two tokens."""
    from labeler_utils.core.models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_sentencepiece_llama"), TINY_WORDS)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: on a busy 2-core machine a 2-layer model is many times faster on one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def chat_response(
    text: str,
    tokens: list[tuple[str, dict[str, float]]] | None = None,
    prompt_tokens: int = 10,
    completion_tokens: int = 2,
) -> Any:
    """An object shaped like ``openai``'s ChatCompletion."""
    logprobs = None
    if tokens is not None:
        logprobs = SimpleNamespace(
            content=[
                SimpleNamespace(
                    token=tok,
                    logprob=alts.get(tok, -1.0),
                    top_logprobs=[SimpleNamespace(token=t, logprob=lp) for t, lp in alts.items()],
                )
                for tok, alts in tokens
            ]
        )
    choice = SimpleNamespace(message=SimpleNamespace(content=text), logprobs=logprobs)
    usage = SimpleNamespace(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    return SimpleNamespace(choices=[choice], usage=usage)


def scripted_client(script: list[Any]) -> Any:
    completions = ScriptedCompletions(script)
    return SimpleNamespace(chat=SimpleNamespace(completions=completions))


def completion_body(text: str, prompt_tokens: int = 10, completion_tokens: int = 2) -> dict[str, Any]:
    """The JSON body of an OpenAI chat completion answering ``text``."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "test-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


Reply = tuple[int, dict[str, str], bytes]


class ScriptedHTTPServer:
    """A real HTTP server on 127.0.0.1: every POST is answered by ``respond(request JSON)``.

    ``respond`` returns ``(status, headers, body)``; the server records each request and the
    wall-clock time it arrived, so tests can check what a client sent and when.
    """

    def __init__(self, respond: Callable[[dict[str, Any]], Reply]):
        self.requests: list[dict[str, Any]] = []
        self.arrivals: list[float] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server hook name
                server.arrivals.append(time.time())
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(request)
                status, headers, body = respond(request)
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> ScriptedHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def replies(*script: Reply) -> Callable[[dict[str, Any]], Reply]:
    """A ``respond`` function giving the scripted replies in turn (the last one from then on)."""
    remaining = list(script)
    return lambda request: remaining.pop(0) if len(remaining) > 1 else remaining[0]


def ok(text: str) -> Reply:
    """A 200 answering ``text``."""
    return 200, {}, json.dumps(completion_body(text)).encode()


# Queries with one relevant and one unrelated document each: the encoder students' tiny training data.
TOPICS = {
    "vpn error": (
        "The VPN gateway returns error 809 when the tunnel times out; restart the client.",
        "The cafeteria serves pizza on Fridays.",
    ),
    "travel policy": (
        "Employees book flights through the travel portal; economy class under six hours.",
        "Printer toner is in room 4.",
    ),
    "expense report": (
        "Submit the expense report with receipts within 30 days of the trip.",
        "The parking garage closes at 10 pm.",
    ),
    "password reset": (
        "To reset your password open the self-service portal and confirm by SMS.",
        "Quarterly results beat estimates.",
    ),
}
