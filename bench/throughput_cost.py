#!/usr/bin/env python
"""Labeling throughput and cost, side by side in one run on one machine.

Measures, on the same (query, document) pairs:

  * the teacher through the OpenAI-compatible client (the embedded llama.cpp server with the
    bundled SmolLM2-135M GGUF by default; --teacher-base-url for any endpoint), cache lookups disabled;
  * the student with naive per-pair ``model.generate()`` (greedy, a few tokens, digit parsed);
  * the student with the single-pass engine at each --batch-sizes, plus engine variants
    (--variants prefix_cache,int8);

and prints a table (labels/s, seconds, tokens per pair, peak RSS, CPU seconds per label, cost per
1,000 labels, load average) with the ratios against the targets. A hosted API teacher (default
GPT-4o prices) is added as a STATED row: its throughput cannot be measured from here.

Writes ``throughput.json`` and ``throughput.md`` to --out.

Example (the 64-pair run recorded in bench/README.md took 176 s on a quiet 2-core CPU):

    .venv/bin/python bench/throughput_cost.py --out runs/throughput-bench
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labeler_utils import throughput as tp  # noqa: E402


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_argument_group("pairs")
    data.add_argument("--pairs", type=int, default=16, help="pairs for the single-pass student (default 16)")
    data.add_argument(
        "--pairs-file",
        help="JSONL of query/document records, or a run folder (its "
        "03_hard_negatives/pairs.jsonl); default: pairs built from data/demo_corpus",
    )
    data.add_argument(
        "--naive-pairs",
        type=int,
        default=8,
        help="how many of the same pairs naive generate() labels (default 8; it is slow)",
    )
    data.add_argument(
        "--teacher-pairs",
        type=int,
        default=4,
        help="how many of the same pairs the teacher labels (default 4; 0 skips the teacher)",
    )

    student = parser.add_argument_group("student")
    student.add_argument(
        "--student-model",
        default=None,
        help="bundled name, model folder or adapter folder (merged in memory); default: the "
        "merged/adapter of --run-dir's 05_distill if any, else smollm2-135m-instruct",
    )
    student.add_argument(
        "--run-dir",
        help="a run folder: its distilled adapter is the student (and, without "
        "--pairs-file, its pairs are used when it has enough)",
    )
    student.add_argument(
        "--max-length",
        type=int,
        default=512,
        help="student prompt length limit (an adapter's manifest overrides it; default 512)",
    )
    student.add_argument("--no-merge", action="store_true", help="time an adapter unmerged (PEFT layers)")
    student.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=[1, 4, 8, 16],
        help="comma-separated single-pass batch sizes (default 1,4,8,16)",
    )
    student.add_argument(
        "--variants",
        default="prefix_cache",
        help="comma-separated engine variants at the best batch size: prefix_cache, int8, "
        "bfloat16 (default prefix_cache; '' for none)",
    )
    student.add_argument(
        "--other-students",
        default="",
        help="comma-separated further students timed on the same pairs at every batch size, e.g. a "
        "cross-encoder folder written by stage 05 or python -m labeler_utils reproduce",
    )
    student.add_argument("--naive-new-tokens", type=int, default=4, help="tokens naive generate() makes (default 4)")
    student.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")

    teacher = parser.add_argument_group("teacher (measured)")
    teacher.add_argument(
        "--teacher-base-url",
        default=None,
        help="OpenAI-compatible endpoint; default: start the embedded llama.cpp server",
    )
    teacher.add_argument(
        "--teacher-model",
        default="smollm2-135m-instruct",
        help="model (or bundled name for the local server; default smollm2-135m-instruct)",
    )
    teacher.add_argument(
        "--teacher-threads",
        type=int,
        default=None,
        help="threads of the embedded llama.cpp server (default: all cores up to 8)",
    )
    teacher.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    teacher.add_argument(
        "--teacher-no-reasoning",
        action="store_true",
        help="grade-only teacher prompt (12 tokens) instead of brief reasoning (160 tokens)",
    )
    teacher.add_argument(
        "--teacher-price-in",
        type=float,
        default=0.0,
        help="USD per million input tokens of a measured remote teacher (0 = local, priced by hour)",
    )
    teacher.add_argument(
        "--teacher-price-out",
        type=float,
        default=0.0,
        help="USD per million output tokens of a measured remote teacher",
    )

    prices = parser.add_argument_group("stated prices and the stated hosted-API teacher")
    prices.add_argument(
        "--machine-price-per-hour",
        type=float,
        default=None,
        help=f"USD per hour of this machine (default {tp.CPU_PRICE_PER_HOUR} on CPU: a 2-vCPU "
        f"EPYC instance; {tp.GPU_PRICE_PER_HOUR} with CUDA: one H100)",
    )
    prices.add_argument("--api-model", default=tp.DEFAULT_API_MODEL, help="name of the stated hosted teacher")
    prices.add_argument(
        "--api-price-in",
        type=float,
        default=tp.API_PRICES_PER_MILLION["gpt-4o"][0],
        help="USD per million input tokens (default: GPT-4o list price 2.50)",
    )
    prices.add_argument(
        "--api-price-out",
        type=float,
        default=tp.API_PRICES_PER_MILLION["gpt-4o"][1],
        help="USD per million output tokens (default: GPT-4o list price 10.00)",
    )
    prices.add_argument(
        "--api-labels-per-second",
        type=float,
        default=tp.STATED_API_LABELS_PER_SECOND,
        help="stated throughput of the hosted teacher (default 4: 8 concurrent requests of ~2 s)",
    )
    prices.add_argument(
        "--api-completion-tokens",
        type=float,
        default=None,
        help="stated answer tokens per pair of the hosted teacher (default 60 with reasoning, "
        "6 grade only); prompt tokens are counted on the same rubric prompts",
    )
    prices.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for the FLOPs fraction (default: known GPU table, or this CPU's estimated fp32 peak)",
    )

    parser.add_argument("--out", default="runs/throughput-bench", help="output folder (default runs/throughput-bench)")
    parser.add_argument("--skip-naive", action="store_true", help="do not time naive generate()")
    return parser


def resolve_student(args: argparse.Namespace) -> str:
    if args.student_model:
        return args.student_model
    if args.run_dir:
        distill = Path(args.run_dir) / "05_distill"
        for candidate in (distill / "merged", distill / "adapter"):
            if (candidate / "config.json").exists() or (candidate / "adapter_config.json").exists():
                return str(candidate)
    return "smollm2-135m-instruct"


def count_teacher_prompt_tokens(tokenizer, pairs, reasoning: bool) -> float:
    """Tokens of the teacher's rubric prompt in chat form, counted with the student's tokenizer (a proxy)."""
    from labeler_utils.teacher import rubric_messages

    total = 0
    for query, document in pairs:
        messages = rubric_messages(query, document, reasoning=reasoning)
        text = (
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if getattr(tokenizer, "chat_template", None)
            else messages[0]["content"]
        )
        total += len(tokenizer.encode(text, add_special_tokens=False))
    return total / max(len(pairs), 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    machine = tp.machine_info()
    print(
        f"{machine['date']} | {machine['cpu']} | {machine['usable_cores']} cores | torch threads "
        f"{machine['torch_threads']} | GPU {machine['gpu']['name'] if machine['gpu'] else 'none'} | "
        f"load {machine['load_average']}",
        flush=True,
    )

    if args.pairs_file:
        pairs, source = tp.load_pairs(args.pairs_file, args.pairs), str(args.pairs_file)
    else:
        pairs, source = tp.pairs_for(args.run_dir, args.pairs)
    if len(pairs) < args.pairs:
        print(f"note: only {len(pairs)} pairs available", flush=True)
    student_name = resolve_student(args)
    print(f"pairs: {len(pairs)} from {source}; student: {student_name}", flush=True)
    student = tp.load_student(student_name, max_length=args.max_length, merge=not args.no_merge, check_pairs=pairs)
    other_names = [name.strip() for name in args.other_students.split(",") if name.strip()]
    others = [
        (
            Path(name).parent.parent.name if Path(name).name == "model" else Path(name).name,
            tp.load_student(name, max_length=args.max_length),
        )
        for name in other_names
    ]

    reasoning = not args.teacher_no_reasoning
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    naive_pairs = [] if args.skip_naive else pairs[: args.naive_pairs]
    measurements, extras = tp.run_all(
        pairs,
        student,
        batch_sizes=args.batch_sizes,
        teacher_pairs=pairs[: args.teacher_pairs],
        teacher_base_url=args.teacher_base_url,
        teacher_model=args.teacher_model,
        teacher_reasoning=reasoning,
        api_key_env=args.api_key_env,
        naive_pairs=naive_pairs or None,
        naive_new_tokens=args.naive_new_tokens,
        variants=variants,
        skip_naive=args.skip_naive,
        teacher_threads=args.teacher_threads,
        other_students=others,
    )

    machine_price = args.machine_price_per_hour
    if machine_price is None:
        machine_price = tp.GPU_PRICE_PER_HOUR if torch.cuda.is_available() else tp.CPU_PRICE_PER_HOUR
    tp.price_measurements(measurements, machine_price, args.teacher_price_in, args.teacher_price_out)

    api_prompt_tokens = count_teacher_prompt_tokens(student.tokenizer, pairs, reasoning)
    api_completion = (
        args.api_completion_tokens if args.api_completion_tokens is not None else (60.0 if reasoning else 6.0)
    )
    measurements.append(
        tp.stated_teacher(
            f"teacher {args.api_model} hosted API (stated)",
            args.api_labels_per_second,
            api_prompt_tokens,
            api_completion,
            args.api_price_in,
            args.api_price_out,
            notes=(
                f"STATED: throughput {args.api_labels_per_second}/s and prices are assumptions; prompt tokens counted "
                f"on the same rubric prompts with the student's tokenizer (proxy for the API's); "
                f"completion tokens stated ({api_completion:g})"
            ),
        )
    )

    single = [m for m in measurements if m.kind == "single_pass" and m.variant is None]
    best = max(single, key=lambda m: m.labels_per_second) if single else None
    flops = (
        tp.flops_report(student, best.prompt_tokens_per_pair, best.labels_per_second, args.peak_tflops) if best else {}
    )
    settings = {
        "pairs": len(pairs),
        "pairs_source": source,
        "student_model": student_name,
        "student_max_length": student.max_length,
        "merged_adapter": not args.no_merge,
        "merge_agreement": student.merge_agreement,  # merged vs unmerged grades on these pairs (None: not merged)
        "other_students": other_names,
        "batch_sizes": args.batch_sizes,
        "variants": variants,
        "naive_pairs": len(naive_pairs),
        "naive_new_tokens": args.naive_new_tokens,
        "teacher_pairs": min(args.teacher_pairs, len(pairs)),
        "teacher": args.teacher_base_url or "embedded llama.cpp server",
        "teacher_model": args.teacher_model,
        "teacher_reasoning": reasoning,
        "variant_agreement": extras["variant_agreement"],
        "command": " ".join(sys.argv),
        "assumptions": {
            "machine price": f"${machine_price}/hour for this machine (student and local teacher)",
            "hosted teacher": f"{args.api_model}: ${args.api_price_in}/M input, ${args.api_price_out}/M output tokens, "
            f"{args.api_labels_per_second} labels/s, {api_completion:g} answer tokens per pair",
            "timing": "wall clock after one warm-up call per engine; tokenisation included; model loading and "
            "server start-up excluded",
        },
    }
    summary = tp.summarize_throughput(measurements, machine, settings, flops)
    summary["total_bench_seconds"] = round(time.perf_counter() - started, 1)
    json_path, md_path = tp.write_results(summary, args.out)
    print()
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path} in {summary['total_bench_seconds']:.0f} s; load now {tp.load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
