"""Stage 07: how fast and how cheap each labeler is, measured side by side on the same pairs.

Three ways of labeling the same (query, document) pairs are timed in one process:

* the **teacher** through :class:`~labeler_utils.llm.client.LLMClient` (the embedded llama.cpp
  server by default, any OpenAI-compatible endpoint by argument) with a *fresh, empty* response
  cache, so that no cached answer is ever counted as throughput;
* the **student with naive** ``model.generate()`` — one pair at a time, greedy, a few new tokens,
  the first digit of the answer parsed as the grade (what people write first);
* the **student with the single-pass engine** (:class:`~labeler_utils.students.causal_lm.labeler.StudentLabeler`) at
  several batch sizes, and optionally two engine variants measured here: the shared-prefix KV
  cache (:class:`PrefixCachedStudentLabeler`) and int8 dynamic quantisation of the linear layers.

Each :class:`Measurement` holds labels/s, seconds, tokens per pair, peak memory, CPU seconds and
the load average before and after. Costs per 1,000 labels come from *stated* prices (API price per
million tokens, machine price per hour), and a hosted-API teacher whose throughput cannot be
measured here enters as a :func:`stated_teacher` row, always marked ``measured=False``.

The subpackage, by topic (every name is importable from ``labeler_utils.throughput`` itself):

* :mod:`.cost` — stated prices and device peaks; cost, ratio and FLOPs arithmetic;
* :mod:`.machine` — the machine and FLOPs against its peak (load and :class:`PeakMemory` while timing come from :mod:`labeler_utils.core.resources`);
* :mod:`.variants` — loading the student, naive ``generate()``, and the speed variants of the single pass;
* :mod:`.measure` — the pairs, :class:`Measurement`, each measurement, and :func:`run_all`;
* :mod:`.report` — prices per row, the JSON summary, Markdown, and stage 06's quality;
* :mod:`.plots` — the figures (each function returns a Figure).
"""

from ..core.resources import PeakMemory, cpu_seconds, load_average, peak_rss_mb
from .cost import (
    API_PRICES_PER_MILLION,
    CPU_PRICE_PER_HOUR,
    DEFAULT_API_MODEL,
    DEVICE_PEAK_TFLOPS,
    GPU_PRICE_PER_HOUR,
    STATED_API_LABELS_PER_SECOND,
    TARGETS,
    attention_flops_per_pair,
    device_peak_tflops,
    estimate_cpu_peak_gflops,
    machine_cost_per_1000,
    matmul_parameter_count,
    peak_fraction,
    prefill_flops_per_pair,
    ratio,
    token_cost_per_1000,
)
from .machine import cpu_model, flops_report, machine_info
from .measure import (
    Measurement,
    Pair,
    demo_pairs,
    load_pairs,
    measure_naive_generate,
    measure_single_pass,
    measure_teacher,
    pairs_for,
    rubric_prompt_tokens,
    run_all,
    stated_teacher,
)
from .plots import plot_cost_per_1000_labels, plot_quality_vs_cost, plot_throughput_vs_batch_size
from .report import (
    STAGE,
    markdown_report,
    other_students_summary,
    price_measurements,
    quality_from_report,
    summarize_throughput,
    write_results,
)
from .variants import (
    SPEED_VARIANTS,
    PrefixCachedStudentLabeler,
    in_precision,
    is_quantized,
    load_student,
    naive_generate_label,
    parse_generated_grade,
    quantize_int8,
)

__all__ = [
    # cost
    "API_PRICES_PER_MILLION",
    "CPU_PRICE_PER_HOUR",
    "DEFAULT_API_MODEL",
    "DEVICE_PEAK_TFLOPS",
    "GPU_PRICE_PER_HOUR",
    "STATED_API_LABELS_PER_SECOND",
    "TARGETS",
    "attention_flops_per_pair",
    "device_peak_tflops",
    "estimate_cpu_peak_gflops",
    "machine_cost_per_1000",
    "matmul_parameter_count",
    "peak_fraction",
    "prefill_flops_per_pair",
    "ratio",
    "token_cost_per_1000",
    # machine
    "PeakMemory",
    "cpu_model",
    "cpu_seconds",
    "flops_report",
    "load_average",
    "machine_info",
    "peak_rss_mb",
    # variants
    "SPEED_VARIANTS",
    "PrefixCachedStudentLabeler",
    "in_precision",
    "is_quantized",
    "load_student",
    "naive_generate_label",
    "parse_generated_grade",
    "quantize_int8",
    # measure
    "Measurement",
    "Pair",
    "demo_pairs",
    "load_pairs",
    "measure_naive_generate",
    "measure_single_pass",
    "measure_teacher",
    "pairs_for",
    "rubric_prompt_tokens",
    "run_all",
    "stated_teacher",
    # report
    "STAGE",
    "markdown_report",
    "other_students_summary",
    "price_measurements",
    "quality_from_report",
    "summarize_throughput",
    "write_results",
    # plots
    "plot_cost_per_1000_labels",
    "plot_quality_vs_cost",
    "plot_throughput_vs_batch_size",
]
