"""The embedded offline default: a real OpenAI-compatible server (llama-cpp-python) on 127.0.0.1.

``LocalLLMServer`` starts ``python -m llama_cpp.server`` on a free loopback port serving a bundled
GGUF model, waits until ``/v1/models`` answers, and stops it again (context manager). Its
:meth:`endpoint` is an :class:`~labeler_utils.llm.client.Endpoint` like any remote one, so
the stages never know whether they talk to this server, OpenAI, Azure, vLLM or Ollama.

On a shared CPU the server degrades gracefully: it starts as many threads as there are cores the
other processes leave free (usable cores less the busy ones, sampled at start-up), and its OpenMP
threads sleep at barriers after a brief spin (``OMP_WAIT_POLICY=PASSIVE`` with ``GOMP_SPINCOUNT``
20,000), so that a thread that lost its core no longer makes the others burn theirs waiting for it,
while a quiet machine keeps the speed of spinning threads (sleeping at once made stage 02 1.5x
slower there; ``bench/server_contention.py``).
"""

from __future__ import annotations

import atexit
import os
import runpy
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from ..core.config import CACHE_DIR
from ..core.models import server_gguf_path
from .client import Endpoint, LLMClient


def free_cpu_threads(limit: int = 8, sample_seconds: float = 0.25) -> int:
    """Threads that fit the cores this process may use, less those other processes keep busy now (1..``limit``)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(limit, usable - round(busy_cores(sample_seconds))))


def busy_cores(sample_seconds: float = 0.25) -> float:
    """How many cores the machine keeps busy, sampled from ``/proc/stat`` over ``sample_seconds``.

    Sampled rather than read from the load average, which lags by minutes (a job that just ended
    still counts); where ``/proc/stat`` is missing, the 1-minute load average is the estimate.
    """

    def busy_and_total() -> tuple[int, int]:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
        total = user + nice + system + idle + iowait + irq + softirq + steal
        return total - idle - iowait, total

    try:
        busy_before, total_before = busy_and_total()
        time.sleep(sample_seconds)
        busy_after, total_after = busy_and_total()
    except (OSError, ValueError):
        return os.getloadavg()[0]
    return (busy_after - busy_before) / max(1, total_after - total_before) * (os.cpu_count() or 1)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalLLMServer:
    """llama-cpp-python's OpenAI-compatible server for a bundled model or a ``.gguf`` file."""

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        n_ctx: int = 2048,
        n_threads: int | None = None,
        port: int | None = None,
        startup_timeout: float = 180.0,
        log_path: str | Path | None = None,
        wait_policy: str | None = "PASSIVE",
        spin_count: int | None = 20_000,
    ):
        """``n_threads`` (generation and prompt processing) defaults to :func:`free_cpu_threads` at start-up;
        ``wait_policy`` is the server's ``OMP_WAIT_POLICY`` (None: OpenMP's default, spinning a while) and
        ``spin_count`` its ``GOMP_SPINCOUNT``, the spins before a waiting thread sleeps (used with a wait
        policy only; None: the policy's own); either variable set in the environment wins."""
        self.model = model
        self.gguf_path = server_gguf_path(model)
        self.n_ctx = n_ctx
        self.n_threads = n_threads or free_cpu_threads()
        self.wait_policy = wait_policy
        self.spin_count = spin_count
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path or CACHE_DIR / "logs" / f"llama-server-{self.port}.log")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def endpoint(self) -> Endpoint:
        """An endpoint for :class:`LLMClient` (no key needed; the price of local tokens is 0).

        llama.cpp applies a repetition penalty by default; it is switched off so that the greedy
        answer and the reported ``top_logprobs`` come from the same distribution.
        """
        return Endpoint(
            base_url=self.base_url,
            model=self.model,
            api_key_env="LOCAL_LLM_API_KEY",
            extra_body=(("repeat_penalty", 1.0),),
            structured_output="json_object_schema",
        )

    def start(self) -> LocalLLMServer:
        """Start the server process and wait until it answers."""
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                "The embedded LLM server needs llama-cpp-python[server]; run scripts/install.sh "
                "(it builds it with portable CPU flags) or point the pipeline at another endpoint."
            ) from exc
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "labeler_utils.llm.local_server",
            "--model",
            str(self.gguf_path),
            "--model_alias",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.n_ctx),
            "--n_threads",
            str(self.n_threads),
            "--n_threads_batch",
            str(self.n_threads),
            "--logits_all",
            "true",
        ]
        env = dict(os.environ)
        if self.wait_policy is not None:
            env.setdefault("OMP_WAIT_POLICY", self.wait_policy)
            if self.spin_count is not None:
                env.setdefault("GOMP_SPINCOUNT", str(self.spin_count))
        log = self.log_path.open("wb")
        self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"The local LLM server exited with code {self._process.returncode}; see {self.log_path}:\n"
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(
            f"The local LLM server did not answer within {self.startup_timeout:.0f}s; see {self.log_path}"
        )

    def stop(self) -> None:
        """Stop the server process (idempotent)."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> LocalLLMServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def connect_llm(
    model: str,
    cache_path: str | Path,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    kind: str = "openai",
    api_version: str | None = None,
    max_concurrency: int = 4,
    n_ctx: int = 2048,
) -> tuple[LLMClient, LocalLLMServer | None]:
    """A client for ``base_url``, or for a freshly started local server when ``base_url`` is None.

    The local server is stopped at interpreter exit (or call ``server.stop()``). With a local
    server, requests run one at a time: a single CPU process gains nothing from concurrency.
    """
    if base_url is None:
        server = LocalLLMServer(model, n_ctx=n_ctx).start()
        atexit.register(server.stop)
        return LLMClient(server.endpoint(), cache_path, max_concurrency=1), server
    endpoint = Endpoint(base_url=base_url, model=model, api_key_env=api_key_env, kind=kind, api_version=api_version)
    return LLMClient(endpoint, cache_path, max_concurrency=max_concurrency), None


def _serve_until_parent_exits() -> None:
    """Run llama.cpp's server in this process, exiting as soon as the process that started it is gone.

    The server is started as ``python -m labeler_utils.llm.local_server <llama_cpp.server arguments>``
    so that a notebook kernel or test killed without clean-up never leaves a server behind.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()
    sys.argv = ["llama_cpp.server", *sys.argv[1:]]
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _serve_until_parent_exits()
