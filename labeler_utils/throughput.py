"""Stage 07: how fast and how cheap each labeler is, measured side by side on the same pairs.

Three ways of labeling the same (query, document) pairs are timed in one process:

* the **teacher** through :class:`~labeler_utils.llm_client.LLMClient` (the embedded llama.cpp
  server by default, any OpenAI-compatible endpoint by argument) with a *fresh, empty* response
  cache, so that no cached answer is ever counted as throughput;
* the **student with naive** ``model.generate()`` — one pair at a time, greedy, a few new tokens,
  the first digit of the answer parsed as the grade (what people write first);
* the **student with the single-pass engine** (:class:`~labeler_utils.student.StudentLabeler`) at
  several batch sizes, and optionally two engine variants measured here: the shared-prefix KV
  cache (:class:`PrefixCachedStudentLabeler`) and int8 dynamic quantisation of the linear layers.

Each :class:`Measurement` holds labels/s, seconds, tokens per pair, peak memory, CPU seconds and
the load average before and after. Costs per 1,000 labels come from *stated* prices (API price per
million tokens, machine price per hour), and a hosted-API teacher whose throughput cannot be
measured here enters as a :func:`stated_teacher` row, always marked ``measured=False``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import platform
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import DEMO_CORPUS_DIR
from .student import (
    PROMPT_FORMATS,
    GradeLabel,
    StudentLabeler,
    encode_prompt,
    load_labeler,
    logits_after_prefix,
    shared_prompt_prefix,
)

STAGE = "07_throughput_cost"
Pair = tuple[str, str]

# ---------------------------------------------------------------------------------------------
# Stated prices and device peaks (assumptions: every number here is a parameter elsewhere)
# ---------------------------------------------------------------------------------------------

#: USD per million (input, output) tokens: list prices of hosted APIs (stated, not measured).
API_PRICES_PER_MILLION: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),  # OpenAI list price for gpt-4o (2024-08-06 and later snapshots)
    "gpt-4o-mini": (0.15, 0.60),
}
DEFAULT_API_MODEL = "gpt-4o"
#: USD per machine-hour (stated): on-demand prices of machines like the ones this runs on.
CPU_PRICE_PER_HOUR = 0.0765  # a 2-vCPU AMD EPYC (Milan) cloud instance, e.g. AWS c6a.large, us-east-1
GPU_PRICE_PER_HOUR = 3.00  # one H100 80GB rented by the hour (typical cloud price, 2025)
#: Stated throughput of a hosted GPT-4o-class teacher: 8 concurrent requests of ~2 s each
#: (about 1,100 prompt tokens and a short reasoned answer). Not measurable from this machine.
STATED_API_LABELS_PER_SECOND = 4.0

#: Dense (no sparsity) peak TFLOP/s in bf16/fp16 tensor-core math, from the vendors' data sheets.
DEVICE_PEAK_TFLOPS: dict[str, float] = {
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "L4": 121.0,
    "V100": 125.0,
    "T4": 65.0,
}

#: The targets this stage reports against (never asserted: they are what the numbers are read against).
TARGETS: dict[str, float] = {
    "single_pass_vs_naive_generate_speed": 20.0,
    "student_vs_teacher_speed": 17.0,
    "teacher_vs_student_cost": 19.0,
}


# ---------------------------------------------------------------------------------------------
# Arithmetic: cost, ratios, FLOPs (pure functions, tested on hand-computed numbers)
# ---------------------------------------------------------------------------------------------


def token_cost_per_1000(
    prompt_tokens_per_pair: float, completion_tokens_per_pair: float, price_in_per_million: float,
    price_out_per_million: float,
) -> float:
    """USD per 1,000 labels billed per token: ``1000 * (p * in + c * out) / 1e6``."""
    return 1000.0 * (prompt_tokens_per_pair * price_in_per_million
                     + completion_tokens_per_pair * price_out_per_million) / 1e6


def machine_cost_per_1000(labels_per_second: float, price_per_hour: float) -> float:
    """USD per 1,000 labels on a machine rented by the hour: hours for 1,000 labels times the price."""
    if labels_per_second <= 0:
        return float("inf")
    return 1000.0 / labels_per_second / 3600.0 * price_per_hour


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def prefill_flops_per_pair(matmul_parameters: int, prompt_tokens: float) -> float:
    """Forward FLOPs of reading a prompt: ``2 * parameters * tokens`` (attention's own term left out)."""
    return 2.0 * matmul_parameters * prompt_tokens


def attention_flops_per_pair(layers: int, hidden_size: int, prompt_tokens: float) -> float:
    """Causal attention scores and mixing: ``2 * 2 * layers * hidden * T^2 / 2`` (QK^T and AV, half masked)."""
    return 2.0 * layers * hidden_size * prompt_tokens**2


def peak_fraction(flops_per_pair: float, labels_per_second: float, peak_tflops: float) -> float:
    """Achieved FLOP/s over the device's peak: ``flops * labels/s / (peak * 1e12)``."""
    return flops_per_pair * labels_per_second / (peak_tflops * 1e12)


def device_peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a known device from its name (e.g. ``NVIDIA H100 80GB HBM3``)."""
    name = device_name.upper()
    if "H100" in name:
        if "PCIE" in name:
            return DEVICE_PEAK_TFLOPS["H100 PCIe"]
        if "NVL" in name:
            return DEVICE_PEAK_TFLOPS["H100 NVL"]
        return DEVICE_PEAK_TFLOPS["H100 SXM"]
    for key in sorted(DEVICE_PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"\b{re.escape(key.upper())}\b", name):
            return DEVICE_PEAK_TFLOPS[key]
    return None


def matmul_parameter_count(model: Any) -> int:
    """Parameters that take part in a matrix product for every prompt token.

    The input embedding is a table lookup, and the vocabulary projection is applied at the last
    position only, so both are left out (for tied embeddings they are the same matrix).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings().weight
    output = base.get_output_embeddings().weight if base.get_output_embeddings() is not None else None
    skip = {embedding.data_ptr()} | ({output.data_ptr()} if output is not None else set())
    return sum(p.numel() for p in base.parameters() if p.data_ptr() not in skip)


def estimate_cpu_peak_gflops(cores: int | None = None, ghz: float | None = None) -> float | None:
    """Rough fp32 peak of this CPU: cores x GHz x FLOPs/cycle (32 with AVX2+FMA, 64 with AVX-512).

    The frequency comes from ``/proc/cpuinfo`` (``cpu MHz``, else BogoMIPS / 2); a stated estimate.
    """
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set(re.search(r"^flags\s*:\s*(.*)$", info, re.MULTILINE).group(1).split()) if "flags" in info else set()
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16
    if ghz is None:
        mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", info, re.MULTILINE)
        bogo = re.search(r"^bogomips\s*:\s*([0-9.]+)", info, re.MULTILINE | re.IGNORECASE)
        ghz = float(mhz.group(1)) / 1000 if mhz else float(bogo.group(1)) / 2000 if bogo else None
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not ghz or not cores:
        return None
    return cores * ghz * per_cycle


# ---------------------------------------------------------------------------------------------
# Machine, load and memory
# ---------------------------------------------------------------------------------------------


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages (other people's jobs share this machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch threads, GPU (if any), library versions, date and load."""
    import transformers

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": load_average(),
        "cpu_peak_gflops_estimate": estimate_cpu_peak_gflops(),
        "gpu": None,
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        info["gpu"] = {"name": name, "count": torch.cuda.device_count(), "peak_tflops_bf16": device_peak_tflops(name),
                       "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    return info


def _rss_bytes(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except Exception:  # noqa: BLE001 - a process that went away has no memory
        return 0


def _cpu_seconds(pid: int) -> float:
    try:
        import psutil

        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    except Exception:  # noqa: BLE001
        return 0.0


def _is_stopped(pid: int) -> bool:
    try:
        import psutil

        return psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except Exception:  # noqa: BLE001
        return False


class PeakMemory:
    """Samples the resident memory of some processes in a thread; ``peak_mb`` is the largest sum seen.

    RSS is everything the process holds (weights, activations, Python), not only what labeling added.
    On CUDA the peak allocated device memory is recorded too.

    It also keeps ``stopped_seconds``: time during which a watched process was stopped by a signal
    (SIGSTOP, job control) — seen either as the process in
    state ``T`` or, for this process, as a gap of more than ``gap_seconds`` between two samples.
    That time is not labeling and is taken out of the throughput (and reported).
    """

    def __init__(self, pids: Sequence[int] | None = None, interval: float = 0.05, gap_seconds: float = 2.0):
        self.pids = list(pids) if pids else [os.getpid()]
        self.interval = interval
        self.gap_seconds = gap_seconds
        self.peak_mb = 0.0
        self.cuda_peak_mb: float | None = None
        self.stopped_seconds = 0.0
        self._last = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak_mb = max(self.peak_mb, sum(_rss_bytes(pid) for pid in self.pids) / 2**20)

    def _run(self) -> None:
        self._last = time.perf_counter()
        while not self._stop.wait(self.interval):
            now = time.perf_counter()
            elapsed, self._last = now - self._last, now
            if elapsed > self.gap_seconds:  # this process did not run at all for that long
                self.stopped_seconds += elapsed - self.interval
            elif any(_is_stopped(pid) for pid in self.pids if pid != os.getpid()):
                self.stopped_seconds += elapsed
            self._sample()

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        if torch.cuda.is_available():
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------


def demo_pairs(n: int, corpus_dir: str | Path = DEMO_CORPUS_DIR) -> list[Pair]:
    """``n`` pairs from the demo corpus: the query is a document title, the document a document card.

    Even pairs put a document with its own title, odd pairs with another document's title, so the
    grades differ; for timing only the prompt lengths matter.
    """
    from .documents import document_card, load_corpus

    docs = load_corpus(corpus_dir)
    pairs = []
    for i in range(n):
        doc = docs[i % len(docs)]
        query_doc = doc if i % 2 == 0 else docs[(i * 7 + 3) % len(docs)]
        pairs.append((query_doc.title, document_card(doc)))
    return pairs


def load_pairs(source: str | Path, n: int | None = None) -> list[Pair]:
    """Pairs from a JSONL of ``query``/``document`` records, or from a run folder.

    A run folder gives ``03_hard_negatives/pairs.jsonl`` with the documents of
    ``01_seed_documents/documents.jsonl`` as document cards (what stage 04 labels).
    """
    from .artifacts import read_jsonl
    from .documents import document_card, read_documents

    path = Path(source)
    if path.is_dir():
        records = read_jsonl(path / "03_hard_negatives" / "pairs.jsonl", required=("query", "doc_id"))
        documents = {d.doc_id: d for d in read_documents(path / "01_seed_documents" / "documents.jsonl")}
        pairs = [(r["query"], r.get("document") or document_card(documents[r["doc_id"]])) for r in records]
    else:
        pairs = [(r["query"], r["document"]) for r in read_jsonl(path, required=("query", "document"))]
    return pairs[:n] if n is not None else pairs


def pairs_for(run_dir: str | Path | None, n: int, corpus_dir: str | Path = DEMO_CORPUS_DIR) -> tuple[list[Pair], str]:
    """The run folder's pairs when it has them (at least ``n``), else demo-corpus pairs; returns (pairs, source)."""
    if run_dir is not None:
        path = Path(run_dir)
        if (path / "03_hard_negatives" / "pairs.jsonl").exists() and (path / "01_seed_documents" / "documents.jsonl").exists():
            pairs = load_pairs(path, n)
            if len(pairs) >= n:
                return pairs, f"{path}/03_hard_negatives/pairs.jsonl"
    return demo_pairs(n, corpus_dir), f"demo corpus {corpus_dir} (queries = document titles)"


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One labeler timed on ``pairs`` pairs (or, when ``measured`` is False, stated numbers)."""

    name: str
    kind: str  # "teacher", "teacher_stated", "naive_generate", "single_pass"
    measured: bool
    pairs: int
    seconds: float
    labels_per_second: float
    prompt_tokens_per_pair: float
    completion_tokens_per_pair: float
    batch_size: int | None = None
    peak_rss_mb: float | None = None
    cuda_peak_mb: float | None = None
    cpu_seconds_per_label: float | None = None
    stopped_seconds: float = 0.0
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)
    cost_per_1000_labels: float | None = None
    cost_basis: str = ""
    grades: list[int | None] = field(default_factory=list)
    notes: str = ""
    variant: str | None = None  # an engine variant of the single pass ("prefix_cache", "int8"); None = plain

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finish(
    name: str, kind: str, pairs: int, seconds: float, prompt_tokens: float, completion_tokens: float,
    memory: PeakMemory, cpu_seconds: float | None, load_before: list[float], grades: list[int | None],
    batch_size: int | None = None, notes: str = "",
) -> Measurement:
    stopped = memory.stopped_seconds
    if stopped > 0:
        notes += f"; {stopped:.1f} s stopped by a signal taken out (wall clock {seconds:.1f} s)"
        seconds = max(seconds - stopped, 1e-9)
    return Measurement(
        name=name, kind=kind, measured=True, pairs=pairs, seconds=round(seconds, 3),
        labels_per_second=pairs / seconds if seconds > 0 else float("inf"),
        prompt_tokens_per_pair=prompt_tokens / max(pairs, 1), completion_tokens_per_pair=completion_tokens / max(pairs, 1),
        batch_size=batch_size, peak_rss_mb=round(memory.peak_mb, 1),
        cuda_peak_mb=round(memory.cuda_peak_mb, 1) if memory.cuda_peak_mb is not None else None,
        cpu_seconds_per_label=round(cpu_seconds / max(pairs, 1), 3) if cpu_seconds is not None else None,
        load_before=load_before, load_after=load_average(), grades=grades, notes=notes,
        stopped_seconds=round(stopped, 1),
    )


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_teacher(
    pairs: Sequence[Pair],
    base_url: str | None = None,
    model: str = "smollm2-135m-instruct",
    api_key_env: str = "OPENAI_API_KEY",
    reasoning: bool = True,
    max_tokens: int | None = None,
    top_logprobs: int | None = 10,
    max_concurrency: int = 4,
    n_ctx: int = 2048,
    warmup: bool = True,
    openai_client: Any = None,
    server_threads: int | None = None,
) -> Measurement:
    """Time the teacher labeling ``pairs`` through :class:`LLMClient` with cache lookups disabled.

    ``base_url=None`` starts the embedded llama.cpp server for ``model`` (start-up not timed; its
    process's memory and CPU time are recorded; requests one at a time as in stage 04). One warm-up
    request on a pair that is not measured comes first. Tokens per pair are the endpoint's own usage
    counts, parse retries included. Raises if any answer came from a cache. ``openai_client``
    stands in for the ``openai`` client of a remote endpoint (tests); ``server_threads`` sets the
    local server's threads (default: its own choice, all cores up to 8).
    """
    from .local_server import LocalLLMServer
    from .llm_client import Endpoint, LLMClient
    from .teacher import TeacherLabeler

    max_tokens = max_tokens or (160 if reasoning else 12)
    server = None
    with tempfile.TemporaryDirectory(prefix="throughput-cache-") as tmp:
        cache_path = Path(tmp) / "fresh_cache.sqlite"
        if base_url is None:
            server = LocalLLMServer(model, n_ctx=n_ctx, n_threads=server_threads).start()
            client = LLMClient(server.endpoint(), cache_path, max_concurrency=1)
        else:
            client = LLMClient(Endpoint(base_url=base_url, model=model, api_key_env=api_key_env), cache_path,
                               max_concurrency=max_concurrency, openai_client=openai_client)
        client.cache.get = lambda key: None  # lookups disabled: a repeated pair is asked again, never served
        try:
            teacher = TeacherLabeler(client, reasoning=reasoning, max_tokens=max_tokens, top_logprobs=top_logprobs)
            if warmup:
                teacher.label_pair("warm-up query", "A short warm-up document that is not part of the measurement.")
            before = client.ledger.to_dict()
            pids = [server._process.pid] if server is not None and server._process is not None else [os.getpid()]
            cpu_start = sum(_cpu_seconds(pid) for pid in pids) if server is not None else None
            load_before = load_average()
            records = [{"query": q, "document": d} for q, d in pairs]
            with PeakMemory(pids) as memory:
                start = time.perf_counter()
                labels = teacher.label_records(records, description="teacher labels (timed)")
                seconds = time.perf_counter() - start
            cpu = sum(_cpu_seconds(pid) for pid in pids) - cpu_start if cpu_start is not None else None
            after = client.ledger.to_dict()
        finally:
            client.cache.close()
            if server is not None:
                server.stop()
    if after["cache_hits"] != before["cache_hits"]:
        raise RuntimeError("cached answers were served during a throughput measurement; they must not count")
    failed = [label.get("error") for label in labels if label.get("error") not in (None, "unparseable")]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(pairs)} teacher requests failed, so the timing is not a labeling "
                           f"throughput (first error: {failed[0]})")
    where = "embedded llama.cpp server" if base_url is None else base_url
    measurement = _finish(
        f"teacher {model} ({where}{', reasoning' if reasoning else ', grade only'})", "teacher", len(pairs), seconds,
        after["prompt_tokens"] - before["prompt_tokens"], after["completion_tokens"] - before["completion_tokens"],
        memory, cpu, load_before, [label["grade"] for label in labels],
        notes=(f"calls={after['calls'] - before['calls']}, failures={after['failures'] - before['failures']}, "
               f"unparseable={after['unparseable'] - before['unparseable']}; cache lookups disabled; "
               + ("RSS and CPU time are the server process's" if server is not None else "remote: memory not measurable")),
    )
    if base_url is not None:
        measurement.peak_rss_mb = None
    return measurement


def stated_teacher(
    name: str, labels_per_second: float, prompt_tokens_per_pair: float, completion_tokens_per_pair: float,
    price_in_per_million: float, price_out_per_million: float, notes: str = "",
) -> Measurement:
    """A teacher whose throughput is stated, not measured (e.g. a hosted API); cost billed per token."""
    return Measurement(
        name=name, kind="teacher_stated", measured=False, pairs=0, seconds=0.0, labels_per_second=labels_per_second,
        prompt_tokens_per_pair=prompt_tokens_per_pair, completion_tokens_per_pair=completion_tokens_per_pair,
        cost_per_1000_labels=token_cost_per_1000(prompt_tokens_per_pair, completion_tokens_per_pair,
                                                 price_in_per_million, price_out_per_million),
        cost_basis=f"${price_in_per_million}/M in + ${price_out_per_million}/M out (stated)",
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# The student: loading, naive generate, single pass and its variants
# ---------------------------------------------------------------------------------------------


def load_student(
    model_or_adapter: str | Path, max_length: int = 512, merge: bool = True, dtype: Any = None,
) -> StudentLabeler:
    """Load a student for timing; a LoRA adapter is merged into its base in memory (``merge=True``).

    A merged adapter costs exactly what the base model costs; unmerged, PEFT adds the low-rank
    products to every adapted layer. On CUDA the default dtype is bfloat16.
    """
    if dtype is None and torch.cuda.is_available():
        dtype = torch.bfloat16
    labeler = load_labeler(model_or_adapter, max_length=max_length, dtype=dtype)
    if merge and hasattr(labeler.model, "merge_and_unload"):
        labeler = StudentLabeler(labeler.model.merge_and_unload(), labeler.tokenizer, max_length=labeler.max_length)
    return labeler


_FIRST_DIGIT = re.compile(r"\d")


def parse_generated_grade(text: str, grades: Sequence[int] = (0, 1, 2, 3)) -> int | None:
    """The naive parser: the first digit in the generated text if it is a grade, else None."""
    match = _FIRST_DIGIT.search(text)
    if match is None or int(match.group(0)) not in grades:
        return None
    return int(match.group(0))


def naive_generate_label(
    model: Any, tokenizer: Any, query: str, document: str, max_length: int = 512, max_new_tokens: int = 4,
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
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
    )
    new = output[0, len(ids):]
    text = tokenizer.decode(new, skip_special_tokens=True)
    return parse_generated_grade(text), text, len(ids), int(new.numel())


def measure_naive_generate(
    student: StudentLabeler, pairs: Sequence[Pair], max_new_tokens: int = 4, name: str = "student naive generate()",
    warmup: bool = True,
) -> Measurement:
    """Time per-pair greedy ``generate()`` of ``max_new_tokens`` tokens with the student's model."""
    model, tokenizer = student.model, student.tokenizer
    if warmup:
        naive_generate_label(model, tokenizer, "warm-up", "warm-up document", student.max_length, max_new_tokens,
                             student.prompt_format)
    prompt_tokens = completion_tokens = 0
    grades: list[int | None] = []
    load_before = load_average()
    with PeakMemory() as memory:
        cpu_start, start = time.process_time(), time.perf_counter()
        for query, document in pairs:
            grade, _, n_prompt, n_new = naive_generate_label(model, tokenizer, query, document, student.max_length,
                                                             max_new_tokens, student.prompt_format)
            grades.append(grade)
            prompt_tokens += n_prompt
            completion_tokens += n_new
        _synchronize()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return _finish(name, "naive_generate", len(pairs), seconds, prompt_tokens, completion_tokens, memory, cpu,
                   load_before, grades, batch_size=1,
                   notes=f"greedy, max_new_tokens={max_new_tokens}, first digit parsed; "
                         f"{sum(g is None for g in grades)} answers without a grade digit")


def measure_single_pass(
    student: StudentLabeler, pairs: Sequence[Pair], batch_size: int, bucket_size: int = 512, name: str | None = None,
    warmup: bool = True,
) -> tuple[Measurement, list[GradeLabel]]:
    """Time ``student.label`` (one forward pass per pair, length-bucketed batches) at ``batch_size``."""
    if warmup:  # one short pass: first-call set-up (allocator, kernels) is not labeling throughput
        list(student.label([(pairs[0][0], pairs[0][1][:200])], batch_size=1, progress=False))
    prompt_tokens = sum(len(student.encode_pair(q, d)[0]) for q, d in pairs)
    load_before = load_average()
    with PeakMemory() as memory:
        cpu_start, start = time.process_time(), time.perf_counter()
        labels = list(student.label(pairs, batch_size=batch_size, bucket_size=bucket_size, total=len(pairs),
                                    progress=False))
        _synchronize()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    measurement = _finish(name or f"student single pass, batch {batch_size}", "single_pass", len(pairs), seconds,
                          prompt_tokens, 0, memory, cpu, load_before, [label.grade for label in labels],
                          batch_size=batch_size, notes="one forward pass, grade-token probabilities; tokenisation timed")
    return measurement, labels


class PrefixCachedStudentLabeler(StudentLabeler):
    """The single-pass engine with the shared instruction prefix computed once and reused (KV cache).

    Every prompt starts with the same tokens (chat template, system prompt, instruction, ``Query:``).
    Their keys and values are computed once; each batch then runs only the pair-specific suffix,
    attending to the cached prefix. Batches whose prompts do not all start with the prefix fall back
    to the full forward pass. Results equal the plain engine's up to float rounding.
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 512, device: str | None = None,
                 prompt_format: str = PROMPT_FORMATS[0]):
        super().__init__(model, tokenizer, max_length=max_length, device=device, prompt_format=prompt_format)
        self.prefix_ids = shared_prompt_prefix(tokenizer, max_length, prompt_format)
        body = self._base_model().get_decoder()
        with torch.inference_mode():
            out = body(input_ids=torch.tensor([self.prefix_ids], device=self.device), use_cache=True)
        cache = out.past_key_values
        self._prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.prefix_hits = 0

    @classmethod
    def from_labeler(cls, labeler: StudentLabeler) -> PrefixCachedStudentLabeler:
        return cls(labeler.model, labeler.tokenizer, max_length=labeler.max_length, device=str(labeler.device),
                   prompt_format=labeler.prompt_format)

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
        logits = logits_after_prefix(self._base_model(), self._prefix_kv, input_ids, attention, last)
        logits = logits[:, self.grade_ids].float()
        return [GradeLabel.from_probabilities(probs) for probs in torch.softmax(logits, dim=-1).cpu().tolist()]


def quantize_int8(labeler: StudentLabeler) -> StudentLabeler:
    """A copy of the student with int8 dynamic quantisation of the decoder's linear layers (CPU only).

    Weights become int8, activations are quantised on the fly (``torch.ao`` dynamic quantisation);
    the vocabulary projection stays in float. Outputs change slightly: compare grades before use.
    """
    import copy

    from torch.ao.quantization import quantize_dynamic

    model = copy.deepcopy(labeler._base_model())
    quantize_dynamic(model.get_decoder(), {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return StudentLabeler(model, labeler.tokenizer, max_length=labeler.max_length, device="cpu")


def is_causal(labeler: StudentLabeler) -> bool:
    """Whether the labeler's model is a causal LM (it can ``generate()`` and has a decoder to prefix-cache)."""
    return hasattr(labeler.model, "generate") and hasattr(labeler.model, "get_decoder")


def in_precision(labeler: StudentLabeler, dtype: torch.dtype) -> StudentLabeler:
    """A copy of the labeler whose model computes in ``dtype`` (the original is left as it is)."""
    copied = copy.deepcopy(labeler)
    copied.model.to(dtype)
    return copied


def label_agreement(reference: Sequence[GradeLabel], other: Sequence[GradeLabel]) -> dict[str, float]:
    """Share of equal grades and the largest absolute probability difference between two engines."""
    same = sum(a.grade == b.grade for a, b in zip(reference, other))
    diff = max((abs(x - y) for a, b in zip(reference, other) for x, y in zip(a.distribution, b.distribution)),
               default=0.0)
    return {"grade_agreement": same / max(len(reference), 1), "max_probability_difference": diff}


# ---------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------


def price_measurements(
    measurements: Iterable[Measurement], machine_price_per_hour: float, teacher_price_in: float = 0.0,
    teacher_price_out: float = 0.0,
) -> None:
    """Set each measured row's cost per 1,000 labels: by machine-hour, or per token for a remote teacher.

    A local teacher and every student run on this machine, so they are priced by the machine-hour.
    A measured remote teacher (``teacher_price_*`` > 0) is priced per token from its usage counts.
    """
    for m in measurements:
        if not m.measured:
            continue
        if m.kind == "teacher" and (teacher_price_in or teacher_price_out):
            m.cost_per_1000_labels = token_cost_per_1000(m.prompt_tokens_per_pair, m.completion_tokens_per_pair,
                                                         teacher_price_in, teacher_price_out)
            m.cost_basis = f"${teacher_price_in}/M in + ${teacher_price_out}/M out (stated)"
        else:
            m.cost_per_1000_labels = machine_cost_per_1000(m.labels_per_second, machine_price_per_hour)
            m.cost_basis = f"${machine_price_per_hour}/machine-hour (stated)"


def summarize(
    measurements: Sequence[Measurement], machine: dict[str, Any], settings: dict[str, Any],
    flops: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON summary: headline numbers, ratios, targets, and every measurement row.

    ``student_labels_per_second`` is the fastest measured single-pass row of the plain engine (the
    engine variants are reported as ``student_best_variant``); the teacher is the measured one.
    """
    single = [m for m in measurements if m.kind == "single_pass" and m.measured]
    plain = [m for m in single if m.variant is None] or single
    best = max(plain, key=lambda m: m.labels_per_second) if plain else None
    best_any = max(single, key=lambda m: m.labels_per_second) if single else None
    naive = next((m for m in measurements if m.kind == "naive_generate"), None)
    teacher = next((m for m in measurements if m.kind == "teacher" and m.measured), None)
    stated = next((m for m in measurements if m.kind == "teacher_stated"), None)

    def lps(m: Measurement | None) -> float | None:
        return m.labels_per_second if m is not None else None

    def cost(m: Measurement | None) -> float | None:
        return m.cost_per_1000_labels if m is not None else None

    costs = {
        "teacher_measured": cost(teacher),
        "teacher_hosted_api_stated": cost(stated),
        "student_single_pass": cost(best),
        "student_single_pass_best_variant": cost(best_any),
        "student_naive_generate": cost(naive),
    }
    speedup_naive, speedup_teacher = ratio(lps(best), lps(naive)), ratio(lps(best), lps(teacher))
    cost_ratio = ratio(cost(teacher), cost(best))
    targets = [
        _target("single_pass_vs_naive_generate_speed", speedup_naive, "measured"),
        _target("student_vs_teacher_speed", speedup_teacher, "measured (teacher = the measured one)"),
        _target("teacher_vs_student_cost", cost_ratio, "measured throughput x stated prices"),
    ]
    return {
        "stage": STAGE,
        "date": machine.get("date"),
        "machine": machine,
        "settings": settings,
        "student_labels_per_second": lps(best),
        "student_best_batch_size": best.batch_size if best else None,
        "student_best_variant": {"name": best_any.name, "labels_per_second": best_any.labels_per_second}
        if best_any else None,
        "teacher_labels_per_second": lps(teacher),
        "naive_generate_labels_per_second": lps(naive),
        "speedup_vs_teacher": speedup_teacher,
        "speedup_vs_naive_generate": speedup_naive,
        "speedup_best_variant_vs_naive_generate": ratio(lps(best_any), lps(naive)),
        "cost_per_1000_labels": costs,
        "cost_ratio_teacher_vs_student": cost_ratio,
        "hosted_api_teacher_stated": None if stated is None else {
            "labels_per_second": stated.labels_per_second,
            "cost_per_1000_labels": stated.cost_per_1000_labels,
            "student_speedup": ratio(lps(best), stated.labels_per_second),
            "cost_ratio_vs_student": ratio(stated.cost_per_1000_labels, cost(best)),
            "measured": False,
            "notes": stated.notes,
        },
        "targets": targets,
        "other_students": other_students_summary(measurements, teacher),
        "flops": flops or {},
        "measurements": [m.to_dict() for m in measurements],
    }


def other_students_summary(measurements: Sequence[Measurement], teacher: Measurement | None) -> dict[str, Any]:
    """Per other student (rows of kind ``single_pass_other``): its fastest row and its ratios to the teacher."""
    rows: dict[str, list[Measurement]] = {}
    for m in measurements:
        if m.kind == "single_pass_other" and m.measured:
            rows.setdefault(m.name.split(" single pass")[0], []).append(m)
    summary = {}
    for name, timed in rows.items():
        best = max(timed, key=lambda m: m.labels_per_second)
        summary[name] = {
            "best_row": best.name,
            "labels_per_second": best.labels_per_second,
            "cost_per_1000_labels": best.cost_per_1000_labels,
            "peak_rss_mb": best.peak_rss_mb,
            "speedup_vs_teacher": ratio(best.labels_per_second, teacher.labels_per_second if teacher else None),
            "cost_ratio_teacher_vs_student": ratio(teacher.cost_per_1000_labels if teacher else None,
                                                   best.cost_per_1000_labels),
        }
    return summary


def _target(name: str, value: float | None, basis: str) -> dict[str, Any]:
    goal = TARGETS[name]
    return {"name": name, "target": goal, "value": value, "met": value is not None and value >= goal,
            "shortfall_factor": ratio(goal, value) if value is not None and value < goal else None, "basis": basis}


def flops_report(student: StudentLabeler, prompt_tokens_per_pair: float, labels_per_second: float | None,
                 peak_tflops: float | None = None) -> dict[str, Any]:
    """FLOPs per pair of the single pass and the fraction of peak reached (device peak, or this CPU's estimate)."""
    config = student._base_model().config
    params = matmul_parameter_count(student.model)
    linear = prefill_flops_per_pair(params, prompt_tokens_per_pair)
    attention = attention_flops_per_pair(config.num_hidden_layers, config.hidden_size, prompt_tokens_per_pair)
    report: dict[str, Any] = {
        "matmul_parameters": params,
        "prompt_tokens_per_pair": prompt_tokens_per_pair,
        "prefill_gflops_per_pair": linear / 1e9,
        "attention_gflops_per_pair": attention / 1e9,
        "formula": "2 x matmul parameters x prompt tokens (attention reported separately)",
    }
    if labels_per_second:
        report["achieved_gflops_per_second"] = (linear + attention) * labels_per_second / 1e9
    if torch.cuda.is_available():
        peak = peak_tflops or device_peak_tflops(torch.cuda.get_device_name(0))
        report["device"] = torch.cuda.get_device_name(0)
    else:
        cpu_peak = estimate_cpu_peak_gflops()
        peak = peak_tflops or (cpu_peak / 1000 if cpu_peak else None)
        report["device"] = f"CPU {cpu_model()} (fp32 peak estimated from flags and clock)"
    report["peak_tflops"] = peak
    if peak and labels_per_second:
        report["fraction_of_peak"] = peak_fraction(linear + attention, labels_per_second, peak)
    return report


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != value or value == float("inf"):
            return "–"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) < 0.01 and value != 0:
            return f"{value:.2g}"
        return f"{value:.{digits}f}"
    return str(value)


def _seconds_cell(m: dict[str, Any]) -> str:
    if not m["measured"]:
        return "–"
    stopped = m.get("stopped_seconds") or 0
    return _fmt(m["seconds"], 1) + (f" (+{stopped:.0f} stopped)" if stopped else "")


def markdown_report(summary: dict[str, Any]) -> str:
    """The table and ratios as markdown (machine, date and load first)."""
    machine = summary["machine"]
    gpu = machine.get("gpu")
    lines = [
        f"# Labeling throughput and cost — {summary.get('date')}",
        "",
        f"Machine: {machine['cpu']}, {machine['usable_cores']} usable cores, torch threads {machine['torch_threads']}, "
        f"GPU: {gpu['name'] if gpu else 'none'}; torch {machine['torch']}, transformers {machine['transformers']}  ",
        f"Load average at start (1/5/15 min): {machine['load_average']}  ",
        f"Pairs: {summary['settings'].get('pairs')} from {summary['settings'].get('pairs_source')}; "
        f"student: {summary['settings'].get('student_model')}",
        "",
        "| labeler | measured? | batch | labels/s | seconds | prompt tok/pair | completion tok/pair | peak RSS MB | "
        "CPU s/label | $ per 1,000 labels | load before → after |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for m in summary["measurements"]:
        load = f"{m['load_before'][0] if m['load_before'] else '–'} → {m['load_after'][0] if m['load_after'] else '–'}"
        lines.append(
            f"| {m['name']} | {'measured' if m['measured'] else '**stated**'} | {_fmt(m['batch_size'])} | "
            f"{_fmt(m['labels_per_second'], 3)} | {_seconds_cell(m)} | "
            f"{_fmt(m['prompt_tokens_per_pair'], 0)} | {_fmt(m['completion_tokens_per_pair'], 1)} | "
            f"{_fmt(m['peak_rss_mb'], 0)} | {_fmt(m['cpu_seconds_per_label'])} | {_fmt(m['cost_per_1000_labels'], 4)} | "
            f"{load if m['measured'] else '–'} |"
        )
    lines += ["", "| ratio | value | target | met? | basis |", "| --- | ---: | ---: | --- | --- |"]
    for t in summary["targets"]:
        shortfall = f" (short by {t['shortfall_factor']:.1f}x)" if t.get("shortfall_factor") else ""
        lines.append(f"| {t['name']} | {_fmt(t['value'])}x | {t['target']:.0f}x | "
                     f"{'yes' if t['met'] else 'no' + shortfall} | {t['basis']} |")
    api = summary.get("hosted_api_teacher_stated")
    if api:
        lines.append(f"| student vs hosted API teacher, speed | {_fmt(api['student_speedup'])}x | – | – | "
                     "student measured, API throughput **stated** |")
        lines.append(f"| hosted API teacher vs student, cost | {_fmt(api['cost_ratio_vs_student'])}x | – | – | "
                     "student measured, API tokens measured locally, prices **stated** |")
    for name, other in (summary.get("other_students") or {}).items():
        lines.append(f"| {name} (best: {other['best_row']}) vs teacher, speed | {_fmt(other['speedup_vs_teacher'])}x | "
                     f"{TARGETS['student_vs_teacher_speed']:.0f}x | – | measured |")
        lines.append(f"| teacher vs {name}, cost | {_fmt(other['cost_ratio_teacher_vs_student'])}x | "
                     f"{TARGETS['teacher_vs_student_cost']:.0f}x | – | measured throughput x stated prices |")
    variant = summary.get("student_best_variant")
    if variant and summary.get("speedup_best_variant_vs_naive_generate"):
        lines.append(f"| best engine variant ({variant['name']}) vs naive generate | "
                     f"{_fmt(summary['speedup_best_variant_vs_naive_generate'])}x | – | – | measured |")
    flops = summary.get("flops") or {}
    if flops:
        lines += ["", f"FLOPs per pair: {_fmt(flops.get('prefill_gflops_per_pair'), 1)} GFLOP prefill "
                      f"(2 x {flops.get('matmul_parameters'):,} matmul parameters x {_fmt(flops.get('prompt_tokens_per_pair'), 0)} tokens) "
                      f"+ {_fmt(flops.get('attention_gflops_per_pair'), 1)} GFLOP attention; achieved "
                      f"{_fmt(flops.get('achieved_gflops_per_second'), 1)} GFLOP/s = "
                      f"{_fmt(100 * flops['fraction_of_peak'] if flops.get('fraction_of_peak') else None, 1)}% of "
                      f"{_fmt(flops.get('peak_tflops'), 3)} TFLOP/s peak ({flops.get('device')})."]
    notes = summary["settings"].get("assumptions")
    if notes:
        lines += ["", "Stated assumptions:", *[f"- {k}: {v}" for k, v in notes.items()]]
    return "\n".join(lines) + "\n"


def write_results(summary: dict[str, Any], out_dir: str | Path, stem: str = "throughput") -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``out_dir``."""
    from .artifacts import atomic_write, write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_json(json_path, summary)
    with atomic_write(md_path) as handle:
        handle.write(markdown_report(summary))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------
# Quality (stage 06 report, read defensively) for the quality-vs-cost frontier
# ---------------------------------------------------------------------------------------------

_QWK_KEYS = ("qwk", "quadratic_weighted_kappa", "kappa_quadratic", "weighted_kappa")


def _qwk_value(node: Any) -> float | None:
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node) if node == node else None
    if isinstance(node, dict):
        for key in ("estimate", "value", "mean", "point"):
            if isinstance(node.get(key), (int, float)):
                return float(node[key])
    return None


def _labeler_role(path: str) -> str | None:
    text = path.lower()
    if "teacher" in text:
        return "teacher"
    if "zero" in text or "base" in text:
        return "student_zero_shot"
    if "distill" in text or "adapter" in text or "student" in text:
        return "student_distilled"
    return None


def quality_from_report(report_path: str | Path) -> dict[str, float]:
    """Quadratic-weighted kappa of teacher, zero-shot and distilled student from stage 06's report.

    The report's layout is not fixed here: every ``qwk``-like number is collected with the path of
    keys above it, and the path names the labeler (``teacher``, ``zero``/``base``, ``distill``/
    ``student``). The first value found per labeler wins. Returns {} when nothing can be read.
    """
    try:
        report = json.loads(Path(report_path).read_text())
    except (OSError, ValueError):
        return {}
    found: dict[str, float] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            labeler = node.get("labeler") or node.get("name") or node.get("student")
            here = f"{path}/{labeler}" if isinstance(labeler, str) else path
            for key, value in node.items():
                if str(key).lower() in _QWK_KEYS:
                    role, qwk = _labeler_role(here), _qwk_value(value)
                    if role and qwk is not None:
                        found.setdefault(role, qwk)
                else:
                    walk(value, f"{here}/{key}")
        elif isinstance(node, list):
            for item in node:
                walk(item, path)

    walk(report, "")
    return found


def run_all(
    pairs: Sequence[Pair],
    student: StudentLabeler,
    batch_sizes: Sequence[int] = (1, 4, 8, 16),
    teacher_pairs: Sequence[Pair] | None = None,
    teacher_base_url: str | None = None,
    teacher_model: str = "smollm2-135m-instruct",
    teacher_reasoning: bool = True,
    api_key_env: str = "OPENAI_API_KEY",
    naive_pairs: Sequence[Pair] | None = None,
    naive_new_tokens: int = 4,
    variants: Sequence[str] = (),
    skip_naive: bool = False,
    teacher_threads: int | None = None,
    other_students: Sequence[tuple[str, StudentLabeler]] = (),
    log: Callable[[str], None] = print,
) -> tuple[list[Measurement], dict[str, Any]]:
    """Measure naive generate, the single pass at each batch size, engine variants, and the teacher.

    Returns the measurements and extras (engine agreement of the variants with the plain engine).
    ``variants``: ``"prefix_cache"``, ``"int8"`` (CPU) and ``"bfloat16"``, each at the best plain batch
    size; a variant that does not apply to the student's family is skipped with a message.
    ``other_students``: (name, labeler) pairs, e.g. a cross-encoder student, timed the same way on the
    same pairs (rows of kind ``single_pass_other``).
    """
    measurements: list[Measurement] = []
    extras: dict[str, Any] = {"variant_agreement": {}}
    naive_pairs = pairs if naive_pairs is None else naive_pairs
    if not is_causal(student):
        log("the student is not a causal LM: naive generate() and the decoder variants do not apply")
    if naive_pairs and not skip_naive and is_causal(student):
        log(f"naive generate() on {len(naive_pairs)} pairs ...")
        measurements.append(measure_naive_generate(student, naive_pairs, max_new_tokens=naive_new_tokens))
        log(f"  {measurements[-1].labels_per_second:.3f} labels/s (load {load_average()})")

    def time_engines(prefix: str, labeler: StudentLabeler, kind: str) -> None:
        """The plain single pass at every batch size, then each applicable variant at the fastest one."""
        timed = []
        for batch_size in batch_sizes:
            name = f"{prefix} single pass, batch {batch_size}"
            log(f"{name}, on {len(pairs)} pairs ...")
            measurement, labels = measure_single_pass(labeler, pairs, batch_size, name=name)
            measurement.kind = kind
            measurements.append(measurement)
            timed.append((measurement, labels))
            log(f"  {measurement.labels_per_second:.3f} labels/s (load {load_average()})")
        best, reference = max(timed, key=lambda item: item[0].labels_per_second) if timed else (None, None)
        best_batch = int(best.batch_size or 8) if best else 8
        for variant in variants:
            if variant in ("prefix_cache", "int8") and not is_causal(labeler):
                continue
            if variant == "bfloat16":
                engine = in_precision(labeler, torch.bfloat16)
                name = f"{prefix} single pass, bfloat16, batch {best_batch}"
            elif variant == "prefix_cache":
                engine = PrefixCachedStudentLabeler.from_labeler(labeler)
                name = f"{prefix} single pass + shared-prefix KV cache ({len(engine.prefix_ids)} tokens), batch {best_batch}"
            elif variant == "int8":
                if torch.cuda.is_available():
                    log("int8 dynamic quantisation is a CPU variant; skipped on CUDA")
                    continue
                engine = quantize_int8(labeler)
                name = f"{prefix} single pass, int8 dynamic quantisation, batch {best_batch}"
            else:
                raise ValueError(f"Unknown engine variant {variant!r}: use 'prefix_cache', 'int8' or 'bfloat16'")
            log(f"{name} ...")
            measurement, labels = measure_single_pass(engine, pairs, best_batch, name=name)
            measurement.kind, measurement.variant = kind, variant
            measurements.append(measurement)
            if reference is not None:
                key = variant if prefix == "student" else f"{prefix} {variant}"
                extras["variant_agreement"][key] = label_agreement(reference, labels)
                measurement.notes += f"; vs plain engine: {extras['variant_agreement'][key]}"
            log(f"  {measurement.labels_per_second:.3f} labels/s (load {load_average()})")
            del engine

    time_engines("student", student, "single_pass")
    for other_name, other in other_students:
        time_engines(other_name, other, "single_pass_other")
    teacher_pairs = pairs if teacher_pairs is None else teacher_pairs
    if teacher_pairs:
        log(f"teacher on {len(teacher_pairs)} pairs ({teacher_base_url or 'embedded llama.cpp server'}) ...")
        measurements.append(measure_teacher(teacher_pairs, base_url=teacher_base_url, model=teacher_model,
                                            api_key_env=api_key_env, reasoning=teacher_reasoning,
                                            server_threads=teacher_threads))
        log(f"  {measurements[-1].labels_per_second:.3f} labels/s (load {load_average()})")
    return measurements, extras
