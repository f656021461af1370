"""Timing: the pairs to label, :class:`Measurement`, the teacher and student measurements, and :func:`run_all`."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.config import DEMO_CORPUS_DIR
from ..core.resources import PeakMemory, cpu_seconds, load_average
from ..students.base import GradeLabel, Labeler, label_agreement
from ..students.causal_lm.labeler import StudentLabeler
from .cost import token_cost_per_1000
from .variants import (
    SPEED_VARIANTS,
    PrefixCachedStudentLabeler,
    in_precision,
    is_quantized,
    naive_generate_label,
    quantize_int8,
)

Pair = tuple[str, str]


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------


def demo_pairs(n: int, corpus_dir: str | Path = DEMO_CORPUS_DIR) -> list[Pair]:
    """``n`` pairs from the demo corpus: the query is a document title, the document a document card.

    Even pairs put a document with its own title, odd pairs with another document's title, so the
    grades differ; for timing only the prompt lengths matter.
    """
    from ..documents import document_card, load_corpus

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
    from ..core.artifacts import read_jsonl
    from ..documents import document_card, read_documents

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
        if (path / "03_hard_negatives" / "pairs.jsonl").exists() and (
            path / "01_seed_documents" / "documents.jsonl"
        ).exists():
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
    name: str,
    kind: str,
    pairs: int,
    seconds: float,
    prompt_tokens: float,
    completion_tokens: float,
    memory: PeakMemory,
    cpu_seconds: float | None,
    load_before: list[float],
    grades: list[int | None],
    batch_size: int | None = None,
    notes: str = "",
) -> Measurement:
    stopped = memory.stopped_seconds
    if stopped > 0:
        notes += f"; {stopped:.1f} s stopped by a signal taken out (wall clock {seconds:.1f} s)"
        seconds = max(seconds - stopped, 1e-9)
    return Measurement(
        name=name,
        kind=kind,
        measured=True,
        pairs=pairs,
        seconds=round(seconds, 3),
        labels_per_second=pairs / seconds if seconds > 0 else float("inf"),
        prompt_tokens_per_pair=prompt_tokens / max(pairs, 1),
        completion_tokens_per_pair=completion_tokens / max(pairs, 1),
        batch_size=batch_size,
        peak_rss_mb=round(memory.peak_mb, 1),
        cuda_peak_mb=round(memory.cuda_peak_mb, 1) if memory.cuda_peak_mb is not None else None,
        cpu_seconds_per_label=round(cpu_seconds / max(pairs, 1), 3) if cpu_seconds is not None else None,
        load_before=load_before,
        load_after=load_average(),
        grades=grades,
        notes=notes,
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
    from ..llm.client import Endpoint, LLMClient
    from ..llm.local_server import LocalLLMServer
    from ..teacher import TeacherLabeler

    max_tokens = max_tokens or (160 if reasoning else 12)
    server = None
    with tempfile.TemporaryDirectory(prefix="throughput-cache-") as tmp:
        cache_path = Path(tmp) / "fresh_cache.sqlite"
        if base_url is None:
            server = LocalLLMServer(model, n_ctx=n_ctx, n_threads=server_threads).start()
            client = LLMClient(server.endpoint(), cache_path, max_concurrency=1)
        else:
            client = LLMClient(
                Endpoint(base_url=base_url, model=model, api_key_env=api_key_env),
                cache_path,
                max_concurrency=max_concurrency,
                openai_client=openai_client,
            )
        client.cache.get = lambda key: None  # lookups disabled: a repeated pair is asked again, never served
        try:
            teacher = TeacherLabeler(client, reasoning=reasoning, max_tokens=max_tokens, top_logprobs=top_logprobs)
            if warmup:
                teacher.label_pair("warm-up query", "A short warm-up document that is not part of the measurement.")
            before = client.ledger.to_dict()
            pids = [server._process.pid] if server is not None and server._process is not None else [os.getpid()]
            cpu_start = sum(cpu_seconds(pid) for pid in pids) if server is not None else None
            load_before = load_average()
            records = [{"query": q, "document": d} for q, d in pairs]
            with PeakMemory(pids) as memory:
                start = time.perf_counter()
                labels = teacher.label_records(records)
                seconds = time.perf_counter() - start
            cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_start if cpu_start is not None else None
            after = client.ledger.to_dict()
        finally:
            client.cache.close()
            if server is not None:
                server.stop()
    if after["cache_hits"] != before["cache_hits"]:
        raise RuntimeError("cached answers were served during a throughput measurement; they must not count")
    failed = [label.get("error") for label in labels if label.get("error") not in (None, "unparseable")]
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(pairs)} teacher requests failed, so the timing is not a labeling "
            f"throughput (first error: {failed[0]})"
        )
    where = "embedded llama.cpp server" if base_url is None else base_url
    measurement = _finish(
        f"teacher {model} ({where}{', reasoning' if reasoning else ', grade only'})",
        "teacher",
        len(pairs),
        seconds,
        after["prompt_tokens"] - before["prompt_tokens"],
        after["completion_tokens"] - before["completion_tokens"],
        memory,
        cpu,
        load_before,
        [label["grade"] for label in labels],
        notes=(
            f"calls={after['calls'] - before['calls']}, failures={after['failures'] - before['failures']}, "
            f"unparseable={after['unparseable'] - before['unparseable']}; cache lookups disabled; "
            + ("RSS and CPU time are the server process's" if server is not None else "remote: memory not measurable")
        ),
    )
    if base_url is not None:
        measurement.peak_rss_mb = None
    return measurement


def stated_teacher(
    name: str,
    labels_per_second: float,
    prompt_tokens_per_pair: float,
    completion_tokens_per_pair: float,
    price_in_per_million: float,
    price_out_per_million: float,
    notes: str = "",
) -> Measurement:
    """A teacher whose throughput is stated, not measured (e.g. a hosted API); cost billed per token."""
    return Measurement(
        name=name,
        kind="teacher_stated",
        measured=False,
        pairs=0,
        seconds=0.0,
        labels_per_second=labels_per_second,
        prompt_tokens_per_pair=prompt_tokens_per_pair,
        completion_tokens_per_pair=completion_tokens_per_pair,
        cost_per_1000_labels=token_cost_per_1000(
            prompt_tokens_per_pair, completion_tokens_per_pair, price_in_per_million, price_out_per_million
        ),
        cost_basis=f"${price_in_per_million}/M in + ${price_out_per_million}/M out (stated)",
        notes=notes,
    )


def rubric_prompt_tokens(tokenizer: Any, pairs: Sequence[Pair], reasoning: bool) -> float:
    """Mean tokens per pair of the teacher's rubric prompt, counted with ``tokenizer`` (e.g. the student's).

    The prompt is :func:`labeler_utils.teacher.rubric_messages` in the tokenizer's chat template, with
    the generation prompt; a tokenizer without a chat template counts the rubric text alone. This is
    how a hosted teacher's prompt tokens are estimated for :func:`stated_teacher`.
    """
    from ..teacher import rubric_messages

    def count(query: str, document: str) -> int:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                rubric_messages(query, document, reasoning=reasoning), tokenize=False, add_generation_prompt=True
            )
        else:
            text = rubric_messages(query, document, reasoning=reasoning)[0]["content"]
        return len(tokenizer.encode(text, add_special_tokens=False))

    return sum(count(query, document) for query, document in pairs) / len(pairs)


# ---------------------------------------------------------------------------------------------
# The student: naive generate and the single pass at one batch size
# ---------------------------------------------------------------------------------------------


def measure_naive_generate(
    student: StudentLabeler,
    pairs: Sequence[Pair],
    max_new_tokens: int = 4,
    name: str = "student naive generate()",
    warmup: bool = True,
) -> Measurement:
    """Time per-pair greedy ``generate()`` of ``max_new_tokens`` tokens with the student's model."""
    model, tokenizer = student.model, student.tokenizer
    if warmup:
        naive_generate_label(
            model, tokenizer, "warm-up", "warm-up document", student.max_length, max_new_tokens, student.prompt_format
        )
    prompt_tokens = completion_tokens = 0
    grades: list[int | None] = []
    load_before = load_average()
    with PeakMemory() as memory:
        cpu_start, start = time.process_time(), time.perf_counter()
        for query, document in pairs:
            grade, _, n_prompt, n_new = naive_generate_label(
                model, tokenizer, query, document, student.max_length, max_new_tokens, student.prompt_format
            )
            grades.append(grade)
            prompt_tokens += n_prompt
            completion_tokens += n_new
        _synchronize()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return _finish(
        name,
        "naive_generate",
        len(pairs),
        seconds,
        prompt_tokens,
        completion_tokens,
        memory,
        cpu,
        load_before,
        grades,
        batch_size=1,
        notes=f"greedy, max_new_tokens={max_new_tokens}, first digit parsed; "
        f"{sum(g is None for g in grades)} answers without a grade digit",
    )


def measure_single_pass(
    student: Labeler,
    pairs: Sequence[Pair],
    batch_size: int,
    bucket_size: int = 512,
    name: str | None = None,
    warmup: bool = True,
) -> tuple[Measurement, list[GradeLabel]]:
    """Time ``student.label`` (one forward pass per pair, length-bucketed batches) at ``batch_size``."""
    if warmup:  # one short pass: first-call set-up (allocator, kernels) is not labeling throughput
        list(student.label([(pairs[0][0], pairs[0][1][:200])], batch_size=1, progress=False))
    prompt_tokens = sum(student.encoded_length(student.encode_pair(q, d)[0]) for q, d in pairs)
    load_before = load_average()
    with PeakMemory() as memory:
        cpu_start, start = time.process_time(), time.perf_counter()
        labels = list(
            student.label(pairs, batch_size=batch_size, bucket_size=bucket_size, total=len(pairs), progress=False)
        )
        _synchronize()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    measurement = _finish(
        name or f"student single pass, batch {batch_size}",
        "single_pass",
        len(pairs),
        seconds,
        prompt_tokens,
        0,
        memory,
        cpu,
        load_before,
        [label.grade for label in labels],
        batch_size=batch_size,
        notes="one forward pass, grade-token probabilities; tokenisation timed",
    )
    return measurement, labels


# ---------------------------------------------------------------------------------------------
# Every measurement in one call
# ---------------------------------------------------------------------------------------------


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
    other_students: Sequence[tuple[str, Labeler]] = (),
    log: Callable[[str], None] = print,
) -> tuple[list[Measurement], dict[str, Any]]:
    """Measure naive generate, the single pass at each batch size, engine variants, and the teacher.

    Returns the measurements and extras (engine agreement of the variants with the plain engine).
    ``variants``: ``"prefix_cache"``, ``"int8"`` (CPU) and ``"bfloat16"``, each at the best plain batch
    size; a variant that does not apply to the student's family is skipped with a message.
    ``other_students``: (name, labeler) pairs, e.g. a cross-encoder student, timed the same way on the
    same pairs (rows of kind ``single_pass_other``).
    """
    unknown = [v for v in variants if v not in SPEED_VARIANTS]
    if unknown:
        raise ValueError(f"Unknown speed variant(s) {unknown}: use {list(SPEED_VARIANTS)}")
    measurements: list[Measurement] = []
    extras: dict[str, Any] = {"variant_agreement": {}}
    naive_pairs = pairs if naive_pairs is None else naive_pairs
    if "naive_generate" not in student.SPEED_VARIANTS:
        log(f"a {student.FAMILY} student: naive generate() and the decoder variants do not apply")
    if naive_pairs and not skip_naive and "naive_generate" in student.SPEED_VARIANTS:
        log(f"naive generate() on {len(naive_pairs)} pairs ...")
        measurements.append(measure_naive_generate(student, naive_pairs, max_new_tokens=naive_new_tokens))
        log(f"  {measurements[-1].labels_per_second:.3f} labels/s (load {load_average()})")

    def time_engines(prefix: str, labeler: Labeler, kind: str) -> None:
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
            if variant not in labeler.SPEED_VARIANTS:
                continue
            if variant == "bfloat16":
                if is_quantized(labeler):
                    log(f"{prefix}: a quantized (4-bit) student computes in its own compute dtype; bfloat16 skipped")
                    continue
                engine = in_precision(labeler, torch.bfloat16)
                name = f"{prefix} single pass, bfloat16, batch {best_batch}"
            elif variant == "prefix_cache":
                engine = PrefixCachedStudentLabeler.from_labeler(labeler)
                name = f"{prefix} single pass + shared-prefix KV cache ({len(engine.prefix_ids)} tokens), batch {best_batch}"
            else:
                if torch.cuda.is_available():
                    log("int8 dynamic quantisation is a CPU variant; skipped on CUDA")
                    continue
                engine = quantize_int8(labeler)
                name = f"{prefix} single pass, int8 dynamic quantisation, batch {best_batch}"
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
        measurements.append(
            measure_teacher(
                teacher_pairs,
                base_url=teacher_base_url,
                model=teacher_model,
                api_key_env=api_key_env,
                reasoning=teacher_reasoning,
                server_threads=teacher_threads,
            )
        )
        log(f"  {measurements[-1].labels_per_second:.3f} labels/s (load {load_average()})")
    return measurements, extras
