"""One client for every LLM call: any OpenAI-compatible endpoint, cached, retried, accounted.

Every query-synthesis and teacher-labeling call goes through :class:`LLMClient`. Responses are
kept in a SQLite cache keyed by a hash of (model, messages, parameters), so re-running a notebook
makes no repeated calls; transient failures (timeouts, 429, 5xx, dropped connections, a 200 whose
body is not a chat completion) are retried with exponential backoff, or after the delay a 429/503
asks for in ``Retry-After`` / ``retry-after-ms`` (capped); a semaphore bounds concurrent requests;
a :class:`UsageLedger` counts calls, cache hits, tokens and failures; answers that do not parse are
recorded, never dropped. Errors never carry the API key: it and key- or token-like strings are
masked in their texts, and an ``LLMError`` chains no ``openai`` exception (whose text may quote the key).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import math
import os
import random
import re
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import openai
from tqdm.auto import tqdm

Message = dict[str, str]
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
NO_KEY = "not-needed-for-local-servers"
# Key- and token-like strings in server error texts: OpenAI-style keys and bearer tokens.
SECRET_PATTERNS = (
    (re.compile(r"\bsk-[\w-]{4,}"), "sk-***"),
    (re.compile(r"\bBearer\s+[^\s\"',;]+", re.I), "Bearer ***"),
)


class LLMError(RuntimeError):
    """An LLM call that failed for good (after retries, or for a non-retryable reason)."""


class MalformedResponse(ValueError):
    """A successful HTTP answer whose body is not a chat completion (no choices, not JSON)."""


RETRYABLE_ERRORS = (
    openai.APITimeoutError,
    openai.APIConnectionError,
    openai.RateLimitError,
    openai.InternalServerError,
    openai.APIResponseValidationError,
    json.JSONDecodeError,  # a 200 with a truncated JSON body
    MalformedResponse,
)


@dataclass(frozen=True)
class Endpoint:
    """Where and how to reach an OpenAI-compatible chat model.

    ``api_key_env`` names the environment variable holding the key: keys are never passed in
    code or stored in notebooks. ``kind="azure"`` uses Azure OpenAI (``base_url`` is then the
    resource endpoint and ``model`` the deployment name).
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    kind: str = "openai"
    api_version: str | None = None
    price_input_per_million: float = 0.0
    price_output_per_million: float = 0.0
    extra_body: tuple[tuple[str, Any], ...] = ()  # server-specific request fields, e.g. (("repeat_penalty", 1.0),)
    structured_output: str = (
        "json_schema"  # "json_schema" (OpenAI, vLLM, Ollama), "json_object_schema" (llama.cpp), "none"
    )

    def response_format(self, name: str, schema: dict[str, Any]) -> dict[str, Any] | None:
        """The ``response_format`` that constrains answers to ``schema`` on this kind of server."""
        if self.structured_output == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        if self.structured_output == "json_object_schema":
            return {"type": "json_object", "schema": schema}
        if self.structured_output == "none":
            return None
        raise ValueError(f"Unknown structured_output {self.structured_output!r}")

    @property
    def is_local(self) -> bool:
        """Whether ``base_url`` is on this machine (127.0.0.1, localhost), where no key is needed."""
        return urllib.parse.urlsplit(self.base_url).hostname in LOCAL_HOSTS

    def api_key(self) -> str | None:
        """The key in the ``api_key_env`` environment variable, None when it is unset or empty."""
        return os.environ.get(self.api_key_env) or None

    def make_openai_client(self, timeout: float) -> openai.OpenAI:
        """Build the underlying ``openai`` client (its own retries off: we retry ourselves).

        A remote endpoint whose ``api_key_env`` variable is not set is an error naming the
        variable; a local server gets a placeholder key.
        """
        if self.kind not in ("openai", "azure"):
            raise ValueError(f"Unknown endpoint kind {self.kind!r}: use 'openai' or 'azure'")
        key = self.api_key()
        if key is None and not self.is_local:
            raise ValueError(
                f"api_key_env: the environment variable {self.api_key_env!r} is not set (or is empty), and "
                f"{self.base_url} is not a local server; set it, or name the variable that holds the key"
            )
        key = key or NO_KEY
        if self.kind == "azure":
            return openai.AzureOpenAI(
                azure_endpoint=self.base_url,
                api_key=key,
                api_version=self.api_version or "2024-10-21",
                timeout=timeout,
                max_retries=0,
            )
        return openai.OpenAI(base_url=self.base_url, api_key=key, timeout=timeout, max_retries=0)


@dataclass
class ChatResult:
    """One chat completion (first choice unless ``n > 1``)."""

    texts: list[str]
    tokens: list[str] | None
    top_logprobs: list[dict[str, float]] | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False

    @property
    def text(self) -> str:
        return self.texts[0]


@dataclass
class UsageLedger:
    """Running totals for one client: what was spent and what went wrong."""

    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0
    unparseable: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds_in_calls: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def to_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


class ResponseCache:
    """SQLite store of raw responses and of answers that failed to parse."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response TEXT NOT NULL)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS unparseable (key TEXT, stage TEXT, text TEXT, reason TEXT, "
            "created REAL, PRIMARY KEY (key, stage))"
        )
        self._db.commit()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, response: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(response)))
            self._db.commit()

    def record_unparseable(self, key: str, stage: str, text: str, reason: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO unparseable VALUES (?, ?, ?, ?, ?)", (key, stage, text, reason, time.time())
            )
            self._db.commit()

    def unparseable(self, stage: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT key, stage, text, reason FROM unparseable"
        args: tuple[str, ...] = ()
        if stage is not None:
            query, args = query + " WHERE stage = ?", (stage,)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [dict(zip(("key", "stage", "text", "reason"), row)) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def request_key(model: str, messages: Sequence[Message], params: dict[str, Any]) -> str:
    """Stable hash of everything that determines a response."""
    payload = json.dumps({"model": model, "messages": list(messages), "params": params}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class LLMClient:
    """Chat completions against one endpoint, with cache, retries, concurrency limit and ledger."""

    def __init__(
        self,
        endpoint: Endpoint,
        cache_path: str | Path,
        max_retries: int = 4,
        timeout: float = 120.0,
        max_concurrency: int = 4,
        backoff_seconds: float = 1.0,
        openai_client: Any | None = None,
        max_retry_after: float = 60.0,
    ):
        """``max_retry_after`` caps the wait a 429/503 asks for (``Retry-After``, ``retry-after-ms``)."""
        self.endpoint = endpoint
        self.cache = ResponseCache(cache_path)
        self.max_retries = max_retries
        self.max_concurrency = max_concurrency
        self.backoff_seconds = backoff_seconds
        self.max_retry_after = max_retry_after
        self.ledger = UsageLedger()
        self._client = openai_client or endpoint.make_openai_client(timeout)
        self._slots = threading.Semaphore(max_concurrency)

    def chat(
        self,
        messages: Sequence[Message],
        *,
        temperature: float = 0.0,
        max_tokens: int = 256,
        n: int = 1,
        top_logprobs: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> ChatResult:
        """One chat completion, served from the cache when the same request was made before."""
        params: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens, "n": n, "seed": seed}
        if top_logprobs:
            params.update(logprobs=True, top_logprobs=top_logprobs)
        if stop:
            params["stop"] = list(stop)
        if self.endpoint.extra_body:
            params["extra_body"] = dict(self.endpoint.extra_body)
        if response_format:
            params["response_format"] = response_format
        key = request_key(self.endpoint.model, messages, params)
        stored = self.cache.get(key)
        if stored is not None:
            self.ledger.add(cache_hits=1)
            return ChatResult(**stored, cached=True)
        result = self._call_with_retries(messages, params)
        self.cache.put(key, {k: v for k, v in asdict(result).items() if k != "cached"})
        self.ledger.add(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens)
        return result

    def chat_many(
        self,
        conversations: Sequence[Sequence[Message]],
        description: str = "LLM calls",
        **chat_kwargs: Any,
    ) -> list[ChatResult | LLMError]:
        """Run many chats concurrently (bounded); failures come back as ``LLMError`` in place."""

        def one(messages: Sequence[Message]) -> ChatResult | LLMError:
            try:
                return self.chat(messages, **chat_kwargs)
            except LLMError as exc:
                return exc

        return map_concurrent(one, conversations, self.max_concurrency, description)

    def record_unparseable(self, stage: str, messages: Sequence[Message], text: str, reason: str) -> None:
        """Keep an answer that could not be parsed, with why, for the notebook to show."""
        key = request_key(self.endpoint.model, messages, {"stage": stage})
        self.cache.record_unparseable(key, stage, text, reason)
        self.ledger.add(unparseable=1)

    def cost_usd(self) -> float:
        """Spend so far at the endpoint's stated prices (cache hits cost nothing)."""
        return (
            self.ledger.prompt_tokens * self.endpoint.price_input_per_million
            + self.ledger.completion_tokens * self.endpoint.price_output_per_million
        ) / 1e6

    def _call_with_retries(self, messages: Sequence[Message], params: dict[str, Any]) -> ChatResult:
        """The completion, retried on transient errors; an ``LLMError`` with a masked message otherwise.

        The ``LLMError`` is raised outside the handlers, with no chained cause or context: the
        ``openai`` exception it replaces may quote the API key (a 401 body does) and would be
        printed with any traceback.
        """
        kwargs = {k: v for k, v in params.items() if v is not None}
        for attempt in range(self.max_retries + 1):
            with self._slots:
                start = time.perf_counter()
                try:
                    result = _to_result(
                        self._client.chat.completions.create(
                            model=self.endpoint.model, messages=list(messages), **kwargs
                        )
                    )
                    self.ledger.add(calls=1, seconds_in_calls=time.perf_counter() - start)
                    return result
                except RETRYABLE_ERRORS as exc:
                    self.ledger.add(calls=1, seconds_in_calls=time.perf_counter() - start)
                    error: Exception = exc
                except openai.APIStatusError as exc:
                    self.ledger.add(calls=1, failures=1)
                    failure = (
                        f"{self.endpoint.base_url} refused the request for model {self.endpoint.model!r} "
                        f"(HTTP {exc.status_code}): {exc.message}"
                    )
                    break
            if attempt < self.max_retries:
                self.ledger.add(retries=1)
                time.sleep(self._delay(error, attempt))
        else:
            self.ledger.add(failures=1)
            failure = (
                f"{self.endpoint.base_url} failed {self.max_retries + 1} times for model {self.endpoint.model!r}: "
                f"{type(error).__name__}: {error}"
            )
        raise LLMError(self._masked(failure))

    def _delay(self, error: Exception, attempt: int) -> float:
        """Seconds before the next attempt: what the answer asked for (at most ``max_retry_after``), else backoff."""
        response = getattr(error, "response", None)
        asked = retry_after_seconds(response.headers) if response is not None else None
        if asked is not None:
            return min(asked, self.max_retry_after)
        return self.backoff_seconds * (2**attempt) * (1 + random.random() * 0.25)

    def _masked(self, text: str) -> str:
        return mask_secrets(text, [self.endpoint.api_key() or ""])


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The wait an answer asks for: ``retry-after-ms``, else ``Retry-After`` in seconds or as an HTTP date."""
    for name, unit in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * unit
        except ValueError:
            if name == "retry-after-ms":
                continue
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return None
        return None if math.isnan(seconds) else max(0.0, seconds)
    return None


def mask_secrets(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with each of ``secrets`` and anything shaped like an API key or a bearer token masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    for pattern, replacement in SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def map_concurrent(
    function: Callable[[Any], Any], items: Sequence[Any], max_workers: int, description: str, progress: bool = True
) -> list[Any]:
    """``function`` over ``items`` in order, ``max_workers`` at a time, with a progress bar unless ``progress`` is off."""
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        return list(tqdm(pool.map(function, items), total=len(items), desc=description, disable=not progress))


def _to_result(response: Any) -> ChatResult:
    """The parts of a chat completion kept; ``MalformedResponse`` when the answer is not one."""
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices or any(getattr(c, "message", None) is None for c in choices):
        raise MalformedResponse(f"the answer holds no choices with a message: {str(response)[:200]!r}")
    texts = [choice.message.content or "" for choice in choices]
    tokens, logprob_steps = None, None
    first = choices[0]
    if getattr(first, "logprobs", None) is not None and first.logprobs.content:
        tokens = [step.token for step in first.logprobs.content]
        logprob_steps = [
            {alt.token: alt.logprob for alt in step.top_logprobs} if step.top_logprobs else {step.token: step.logprob}
            for step in first.logprobs.content
        ]
    usage = getattr(response, "usage", None)
    return ChatResult(
        texts=texts,
        tokens=tokens,
        top_logprobs=logprob_steps,
        prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
        completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
    )


def parse_with_retries(
    client: LLMClient,
    messages: Sequence[Message],
    parse: Callable[[str], Any],
    stage: str,
    attempts: int = 2,
    **chat_kwargs: Any,
) -> tuple[Any | None, ChatResult]:
    """Call and parse; on a parse failure record the answer and retry with a new sampling seed.

    Returns ``(parsed or None, last result)``; ``None`` means every attempt failed to parse and
    each failing answer is in the cache's ``unparseable`` table.
    """
    result: ChatResult | None = None
    for attempt in range(attempts):
        kwargs = dict(chat_kwargs)
        if attempt:
            kwargs.update(
                seed=(chat_kwargs.get("seed") or 0) + attempt, temperature=max(kwargs.get("temperature", 0.0), 0.7)
            )
        result = client.chat(messages, **kwargs)
        try:
            return parse(result.text), result
        except ValueError as exc:
            client.record_unparseable(
                stage, list(messages) + [{"role": "attempt", "content": str(attempt)}], result.text, str(exc)
            )
    assert result is not None
    return None, result
