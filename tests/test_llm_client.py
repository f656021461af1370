"""LLM client: cache, retries, failures, ledger, unparseable answers; and the real local server."""

from __future__ import annotations

import email.utils
import json
import logging
import os
import time
import traceback

import httpx
import openai
import pytest
from conftest import ScriptedHTTPServer, chat_response, ok, replies, scripted_client

from labeler_utils import hard_negatives as hn
from labeler_utils.documents import Document
from labeler_utils.llm.client import Endpoint, LLMClient, LLMError, parse_with_retries
from labeler_utils.llm.local_server import LocalLLMServer, connect_llm, free_cpu_threads, free_port
from labeler_utils.teacher import TeacherLabeler

MESSAGES = [{"role": "user", "content": "Grade this pair."}]
ENDPOINT = Endpoint(
    base_url="http://127.0.0.1:9/v1", model="test-model", price_input_per_million=2.5, price_output_per_million=10.0
)


def _status_error(cls: type[openai.APIStatusError], code: int) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    return cls(f"HTTP {code}", response=httpx.Response(code, request=request), body=None)


def make_client(tmp_path, script, **kwargs) -> LLMClient:
    return LLMClient(
        ENDPOINT, tmp_path / "cache.sqlite", openai_client=scripted_client(script), backoff_seconds=0.0, **kwargs
    )


def test_rerun_is_served_from_cache_without_calls(tmp_path):
    client = make_client(tmp_path, [chat_response("Final grade: 2", prompt_tokens=100, completion_tokens=4)])
    first = client.chat(MESSAGES)
    second = client.chat(MESSAGES)
    assert (first.text, first.cached, second.text, second.cached) == ("Final grade: 2", False, "Final grade: 2", True)
    assert client.ledger.calls == 1 and client.ledger.cache_hits == 1
    # A new client on the same cache file (a re-run of the notebook) makes no call at all.
    rerun = make_client(tmp_path, [RuntimeError("must not be called")])
    assert rerun.chat(MESSAGES).text == "Final grade: 2"
    assert rerun.ledger.calls == 0 and rerun.ledger.cache_hits == 1
    assert client.cost_usd() == pytest.approx((100 * 2.5 + 4 * 10.0) / 1e6)


def test_different_parameters_are_different_cache_entries(tmp_path):
    client = make_client(tmp_path, [chat_response("a"), chat_response("b")])
    assert client.chat(MESSAGES, temperature=0.0).text == "a"
    assert client.chat(MESSAGES, temperature=0.7).text == "b"
    assert client.ledger.calls == 2


def test_retries_timeouts_429_and_5xx_then_succeeds(tmp_path):
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
    script = [
        openai.APITimeoutError(request=request),
        _status_error(openai.RateLimitError, 429),
        _status_error(openai.InternalServerError, 503),
        chat_response("Final grade: 1"),
    ]
    client = make_client(tmp_path, script, max_retries=3)
    assert client.chat(MESSAGES).text == "Final grade: 1"
    assert client.ledger.retries == 3 and client.ledger.calls == 4 and client.ledger.failures == 0


def test_gives_up_after_max_retries_with_a_clear_error(tmp_path):
    client = make_client(tmp_path, [_status_error(openai.InternalServerError, 500)], max_retries=2)
    with pytest.raises(LLMError, match=r"failed 3 times for model 'test-model'.*InternalServerError"):
        client.chat(MESSAGES)
    assert client.ledger.failures == 1 and client.ledger.retries == 2


def test_client_errors_are_not_retried(tmp_path):
    client = make_client(tmp_path, [_status_error(openai.AuthenticationError, 401)], max_retries=3)
    with pytest.raises(LLMError, match="HTTP 401"):
        client.chat(MESSAGES)
    assert client.ledger.calls == 1 and client.ledger.retries == 0


def test_unreachable_endpoint_fails_clearly(tmp_path):
    endpoint = Endpoint(base_url=f"http://127.0.0.1:{free_port()}/v1", model="nobody-home")
    client = LLMClient(endpoint, tmp_path / "cache.sqlite", max_retries=1, backoff_seconds=0.0, timeout=5)
    with pytest.raises(LLMError, match=r"failed 2 times.*APIConnectionError"):
        client.chat(MESSAGES)


def test_chat_many_keeps_order_and_returns_failures_in_place(tmp_path):
    script = [chat_response("one"), _status_error(openai.BadRequestError, 400), chat_response("three")]
    client = make_client(tmp_path, script, max_concurrency=1)
    results = client.chat_many([[{"role": "user", "content": str(i)}] for i in range(3)])
    assert results[0].text == "one" and isinstance(results[1], LLMError) and results[2].text == "three"


def test_unparseable_answers_are_recorded_and_retried(tmp_path):
    client = make_client(tmp_path, [chat_response("I think it is fine"), chat_response("Final grade: 3")])

    def parse(text: str) -> int:
        if "Final grade" not in text:
            raise ValueError("no grade line")
        return int(text[-1])

    value, result = parse_with_retries(client, MESSAGES, parse, stage="test", attempts=2)
    assert value == 3 and result.text == "Final grade: 3"
    recorded = client.cache.unparseable("test")
    assert [(r["text"], r["reason"]) for r in recorded] == [("I think it is fine", "no grade line")]
    assert client.ledger.unparseable == 1


def test_parse_failure_on_every_attempt_returns_none(tmp_path):
    client = make_client(tmp_path, [chat_response("no"), chat_response("still no")])
    value, _ = parse_with_retries(client, MESSAGES, lambda t: int(t), stage="test", attempts=2)
    assert value is None and len(client.cache.unparseable("test")) == 2


def test_logprobs_are_returned(tmp_path):
    response = chat_response("2", tokens=[("2", {"2": -0.1, "3": -2.5, "1": -3.0})])
    client = make_client(tmp_path, [response])
    result = client.chat(MESSAGES, top_logprobs=3)
    assert result.tokens == ["2"] and result.top_logprobs == [{"2": -0.1, "3": -2.5, "1": -3.0}]
    assert client._client.chat.completions.requests[0]["top_logprobs"] == 3


def test_unknown_endpoint_kind_is_rejected():
    with pytest.raises(ValueError, match="Unknown endpoint kind"):
        Endpoint(base_url="x", model="m", kind="bedrock").make_openai_client(timeout=1)


def test_api_key_is_read_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("MY_TEAM_KEY", "sk-test-123")
    client = Endpoint(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="MY_TEAM_KEY").make_openai_client(1)
    assert client.api_key == "sk-test-123"


TRUNCATED = (200, {}, b'{"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0, "mess')
NO_CHOICES = (200, {}, json.dumps({"id": "chatcmpl-2", "object": "chat.completion", "model": "m"}).encode())
NOT_JSON = (200, {"Content-Type": "text/plain"}, b"upstream proxy says hello")


def http_client(tmp_path, server: ScriptedHTTPServer, **kwargs) -> LLMClient:
    """The project's real client (real ``openai`` client, real HTTP) against the test server."""
    endpoint = Endpoint(base_url=server.base_url, model="test-model", api_key_env="TEST_LLM_KEY")
    return LLMClient(endpoint, tmp_path / "cache.sqlite", backoff_seconds=0.0, timeout=5, **kwargs)


def test_truncated_json_and_missing_choices_are_retried_over_http(tmp_path):
    with ScriptedHTTPServer(replies(TRUNCATED, NO_CHOICES, NOT_JSON, ok("Final grade: 2"))) as server:
        result = http_client(tmp_path, server, max_retries=3).chat(MESSAGES)
    assert result.text == "Final grade: 2" and len(server.requests) == 4


@pytest.mark.parametrize(
    ("reply", "kind"),
    [(TRUNCATED, "JSONDecodeError"), (NO_CHOICES, "MalformedResponse"), (NOT_JSON, "MalformedResponse")],
)
def test_malformed_answers_fail_as_llm_error_after_the_retries(reply, kind, tmp_path):
    with ScriptedHTTPServer(replies(reply)) as server:
        client = http_client(tmp_path, server, max_retries=2)
        with pytest.raises(LLMError, match=f"failed 3 times for model 'test-model': {kind}"):
            client.chat(MESSAGES)
    assert len(server.requests) == 3 and client.ledger.failures == 1 and client.ledger.retries == 2


@pytest.mark.parametrize(
    ("status", "header", "value", "seconds"),
    [
        (429, "retry-after-ms", "700", 0.7),
        (429, "Retry-After", "1", 1.0),
        (503, "Retry-After", "1.5", 1.5),
    ],
)
def test_retry_after_is_honoured(status, header, value, seconds, tmp_path):
    with ScriptedHTTPServer(
        replies((status, {header: value}, b'{"error": {"message": "slow down"}}'), ok("Final grade: 1"))
    ) as server:
        assert http_client(tmp_path, server, max_retries=2).chat(MESSAGES).text == "Final grade: 1"
    assert server.arrivals[1] - server.arrivals[0] >= seconds


def test_retry_after_as_an_http_date_is_honoured(tmp_path):
    header = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: 1-2 s from now
    moment = email.utils.parsedate_to_datetime(header).timestamp()
    with ScriptedHTTPServer(replies((429, {"Retry-After": header}, b"{}"), ok("Final grade: 1"))) as server:
        assert http_client(tmp_path, server, max_retries=1).chat(MESSAGES).text == "Final grade: 1"
    assert server.arrivals[1] >= moment


def test_retry_after_is_capped(tmp_path):
    with ScriptedHTTPServer(replies((429, {"Retry-After": "3600"}, b"{}"), ok("Final grade: 1"))) as server:
        assert http_client(tmp_path, server, max_retries=1, max_retry_after=0.3).chat(MESSAGES).text
    assert 0.3 <= server.arrivals[1] - server.arrivals[0] < 5


def test_a_missing_key_variable_for_a_remote_endpoint_is_named(monkeypatch):
    for name in ("OPENAI_APIKEY", "AZURE_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="api_key_env: the environment variable 'OPENAI_APIKEY' is not set"):
        Endpoint(base_url="https://api.openai.com/v1", model="gpt-4o", api_key_env="OPENAI_APIKEY").make_openai_client(
            1
        )
    azure = Endpoint(base_url="https://me.openai.azure.com", model="d", api_key_env="AZURE_KEY", kind="azure")
    with pytest.raises(ValueError, match="'AZURE_KEY'"):
        azure.make_openai_client(1)
    for local in ("http://127.0.0.1:8080/v1", "http://localhost:11434/v1"):
        assert Endpoint(base_url=local, model="m", api_key_env="OPENAI_APIKEY").make_openai_client(1).api_key


def test_server_error_text_is_stored_with_the_key_and_tokens_masked(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", "team-secret-0042")
    echo = {
        "error": {
            "message": "Incorrect API key provided: team-secret-0042 (sk-proj-AbCdEf0123456789); "
            "header was Authorization: Bearer eyJhbGciOi.J9x"
        }
    }
    with ScriptedHTTPServer(replies((401, {}, json.dumps(echo).encode()))) as server:
        client = http_client(tmp_path, server)
        with pytest.raises(LLMError) as failure:
            client.chat(MESSAGES)
        label = TeacherLabeler(client).label_records([{"query": "q", "document": "d"}])[0]  # what labels.jsonl keeps
    for message in (str(failure.value), label["error"]):
        assert "HTTP 401" in message and "Incorrect API key provided: ***" in message and "Bearer ***" in message
        for secret in ("team-secret-0042", "AbCdEf0123456789", "eyJhbGciOi"):
            assert secret not in message


def chained(error: BaseException) -> list[BaseException]:
    """An exception and every cause and context chained to it."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


@pytest.mark.parametrize("status", [401, 503])  # refused at once; failed after the retries
def test_no_traceback_repr_or_log_of_a_failed_call_holds_the_key(status, tmp_path, monkeypatch, caplog):
    """Uncaught, as in stage 03's false-negative check or a direct ``chat``: the printed traceback, with every
    chained exception, the ``repr`` and the debug logs of ``openai`` and ``httpx`` keep the key out."""
    key = "plantedkey-7f3a9c5e1d"  # not key-shaped: only masking this very key hides it
    monkeypatch.setenv("TEST_LLM_KEY", key)
    caplog.set_level(logging.DEBUG)
    body = {"error": {"message": f"Incorrect API key provided: {key}.", "type": "invalid_request_error"}}
    document = Document("runbook.md", "Runbook", "Restart the gateway.")
    with ScriptedHTTPServer(replies((status, {}, json.dumps(body).encode()))) as server:
        client = http_client(tmp_path, server, max_retries=1)
        failures = []
        for call in (lambda: client.chat(MESSAGES), lambda: hn.sample_check_grader(client)("gateway", document)):
            with pytest.raises(LLMError) as failure:
                call()
            failures.append(failure.value)
    assert len(server.requests) == (2 if status == 401 else 4)
    for error in failures:
        printed = "".join(traceback.format_exception(error))
        assert ("(HTTP 401)" if status == 401 else "failed 2 times") in printed and "Incorrect API key" in printed
        assert chained(error) == [error] and key not in printed and key not in repr(error)
    assert "HTTP Response" in caplog.text and key not in caplog.text


def test_real_local_server_answers_and_stops(tmp_path):
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is installed by scripts/install.sh")
    client, server = connect_llm("smollm2-135m-instruct", tmp_path / "cache.sqlite", n_ctx=512)
    try:
        result = client.chat([{"role": "user", "content": "Say hello."}], max_tokens=8, top_logprobs=3)
        assert result.text.strip() and result.completion_tokens > 0 and result.top_logprobs
        # Under CPU contention: threads that fit the free cores, for prompts too, sleeping at barriers after a brief spin.
        pid = server._process.pid
        command = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
        threads = command[command.index("--n_threads") + 1]
        assert command[command.index("--n_threads_batch") + 1] == threads and 1 <= int(threads) <= os.cpu_count()
        environ = open(f"/proc/{pid}/environ", "rb").read().decode().split("\0")
        assert f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}" in environ
        assert f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '20000')}" in environ
    finally:
        server.stop()
    with pytest.raises(LLMError):
        LLMClient(server.endpoint(), tmp_path / "other.sqlite", max_retries=0, timeout=3).chat(MESSAGES)


def test_server_threads_fit_the_cores_others_leave_free():
    import subprocess
    import sys

    usable = len(os.sched_getaffinity(0))
    assert 1 <= free_cpu_threads() <= usable and free_cpu_threads(limit=1) == 1
    # every core kept busy by other processes: one thread, never more threads than free cores
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable)]
    try:
        time.sleep(1.0)
        assert free_cpu_threads(sample_seconds=0.5) == 1
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def test_local_server_rejects_a_model_it_cannot_serve():
    with pytest.raises(ValueError, match="bundled model name or a .gguf file"):
        LocalLLMServer("some-org/some-hub-model")


def test_local_server_stops_when_its_parent_is_killed(tmp_path):
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is installed by scripts/install.sh")
    import signal
    import subprocess
    import sys
    import time

    script = (
        "from labeler_utils.llm.local_server import LocalLLMServer\n"
        "server = LocalLLMServer(n_ctx=256).start()\n"
        "print(server._process.pid, flush=True)\n"
        "import time; time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    server_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(server_pid, 0)
        except ProcessLookupError:
            break
        if open(f"/proc/{server_pid}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.2)
    else:
        os.kill(server_pid, signal.SIGKILL)
        pytest.fail("the server outlived its killed parent")
