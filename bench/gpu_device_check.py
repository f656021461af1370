#!/usr/bin/env python
"""Device check of the GPU path (QLoRA training, labelling, merging) on one CUDA GPU, in a minute or two.

Nothing is downloaded: the student is a 2-layer Llama built from a config, with a SentencePiece-style tokenizer
built offline (``labeler_utils.core.models.build_tiny_llama``: a bare "0" is two tokens, as with Phi-3.5-mini). It is
trained with QLoRA (4-bit NF4 base; bfloat16 compute from compute capability 8, float16 before) through
``labeler_utils.students.causal_lm.train.train_student``, loaded back and labelled through the shared labeler interface
(``labeler_utils.students.registry.load_labeler``), merged two ways, and timed with the bfloat16 engine variant asked for.
Each check prints one line, ``PASS`` or ``FAIL``, with its time; then the total time and the peak GPU memory.

    python bench/gpu_device_check.py                  # exit 0: every check passed; 1: one failed; 2: no CUDA GPU
    python bench/gpu_device_check.py --cpu-rehearsal  # the same checks on a CPU (float32 compute), no GPU needed

Expected output and what each check means: docs/gpu.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from labeler_utils import throughput as tp
from labeler_utils.core.devices import default_dtype
from labeler_utils.core.models import build_tiny_llama, load_causal_lm
from labeler_utils.students.base import read_manifest
from labeler_utils.students.causal_lm.labeler import STUDENT_INSTRUCTION, grade_token_ids
from labeler_utils.students.causal_lm.train import DistillConfig, merge_adapter, train_student, zero_shot_labeler
from labeler_utils.students.registry import load_labeler

NO_CUDA_EXIT = 2
PAIRS = [
    ("vpn error", "the vpn gateway error timeout restart"),
    ("travel policy", "lunch menu pizza"),
    ("expense report", "the travel policy and expense report " * 30),
    ("vpn timeout", "restart"),
]
TAUGHT_GRADES = [3, 0, 2, 1]
RECORDS = [{"query": q, "document": d, "grade": g} for (q, d), g in zip(PAIRS, TAUGHT_GRADES)] * 4
WORDS = [*STUDENT_INSTRUCTION.split(), *" ".join(q + " " + d for q, d in PAIRS).split()]
MERGE_AGREEMENT_FLOOR = 0.75  # merged into the unquantised half-precision base: at most one of the 4 grades may move
LEFT_AFTER_TRAINING = 0.1  # GPU memory still allocated after training returned, at most this share of its peak


class DeviceCheck:
    """Runs named checks, each printing one PASS/FAIL line; keeps their timings."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.seconds: dict[str, float] = {}

    def run(self, name: str, check: Callable[[], tuple[bool, str]]) -> None:
        """Run ``check`` (returns whether it passed and what it saw); an exception is a failure."""
        start = time.perf_counter()
        try:
            passed, detail = check()
        except Exception as exc:  # a check that crashes fails, and the next checks still run
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        self.seconds[name] = time.perf_counter() - start
        if not passed:
            self.failed.append(name)
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {detail} ({self.seconds[name]:.1f} s)", flush=True)


def qlora_config(model_dir: Path, **settings: Any) -> DistillConfig:
    """The learnable QLoRA run of the test suite: 4 distinct pairs fitted in 40 steps."""
    return DistillConfig(
        **{
            "base_model": str(model_dir),
            "qlora": True,
            "max_steps": 40,
            "batch_size": 8,
            "max_length": 128,
            "learning_rate": 1e-2,
            "lora_rank": 8,
            "logging_steps": 5,
            "warmup_ratio": 0.0,
            **settings,
        }
    )


def run_checks(work: Path) -> DeviceCheck:
    """Every check, in order; later checks use the adapter the training check wrote."""
    checks = DeviceCheck()
    model_dir = build_tiny_llama(work / "tiny_llama", WORDS)
    half = default_dtype()
    adapter = work / "train" / "adapter"
    state: dict[str, Any] = {}

    def compute_dtype() -> tuple[bool, str]:
        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else "cpu"
        config = qlora_config(model_dir)
        model, _ = load_causal_lm(
            model_dir, quantize_4bit=True, device_map={"": 0} if torch.cuda.is_available() else None
        )
        quantization = model.config.quantization_config
        ok = (
            model.is_loaded_in_4bit
            and quantization.bnb_4bit_quant_type == "nf4"
            and quantization.bnb_4bit_compute_dtype == half
            and config.use_bf16() == (half == torch.bfloat16 and torch.cuda.is_available())
            and config.use_fp16() == (half == torch.float16)
        )
        return ok, (
            f"capability {capability}: 4-bit {quantization.bnb_4bit_quant_type}, compute {half}, "
            f"trainer bf16={config.use_bf16()} fp16={config.use_fp16()}"
        )

    def grade_tokens() -> tuple[bool, str]:
        _, tokenizer = load_causal_lm(model_dir)
        bare = tokenizer.encode("0", add_special_tokens=False)
        found = tokenizer.convert_ids_to_tokens(grade_token_ids(tokenizer))
        return len(bare) == 2 and found == ["0", "1", "2", "3"], f'bare "0" is {len(bare)} tokens; in context {found}'

    def qlora_training() -> tuple[bool, str]:
        from safetensors.torch import load_file

        before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        manifest = train_student(RECORDS, work / "train", qlora_config(model_dir), {"source": "device check"})
        if torch.cuda.is_available():
            state["left"] = torch.cuda.memory_allocated() - before
            state["peak"] = torch.cuda.max_memory_allocated() - before
        losses = [h["loss"] for h in manifest["log_history"] if "loss" in h]
        adapter_dtypes = {str(t.dtype) for t in load_file(adapter / "adapter_model.safetensors").values()}
        expected = {str(torch.bfloat16 if half == torch.bfloat16 and torch.cuda.is_available() else torch.float32)}
        ok = manifest["method"] == "qlora-nf4" and losses[-1] < losses[0] / 2 and adapter_dtypes == expected
        return ok, (
            f"{manifest['global_steps']} steps in {manifest['train_seconds']:.1f} s, loss {losses[0]:.3f} -> "
            f"{losses[-1]:.3f}, adapters {sorted(adapter_dtypes)} (expected {sorted(expected)})"
        )

    def memory_released() -> tuple[bool, str]:
        left, peak = state["left"], state["peak"]
        return left <= LEFT_AFTER_TRAINING * peak, (
            f"{left / 2**20:.1f} MiB still allocated after training returned, of {peak / 2**20:.1f} MiB at its peak"
        )

    def gradient_accumulation() -> tuple[bool, str]:
        first = []
        for batch_size, steps in ((8, 1), (4, 2)):
            config = qlora_config(
                model_dir, max_steps=1, batch_size=batch_size, gradient_accumulation_steps=steps, lora_dropout=0.0
            )
            config.logging_steps = 1
            manifest = train_student(RECORDS[:8], work / f"accumulation_{batch_size}", config)
            first.append(next(h for h in manifest["log_history"] if "loss" in h))
        (whole, accumulated) = first
        close = all(abs(accumulated[k] - whole[k]) <= 0.02 * abs(whole[k]) for k in ("loss", "grad_norm"))
        return close, (
            f"1 x 8: loss {whole['loss']:.4f}, grad norm {whole['grad_norm']:.4f}; "
            f"2 x 4: loss {accumulated['loss']:.4f}, grad norm {accumulated['grad_norm']:.4f}"
        )

    def labelling() -> tuple[bool, str]:
        labeler = load_labeler(adapter, max_length=128)
        labels = list(labeler.label(PAIRS, batch_size=4, progress=False))
        grades = [label.grade for label in labels]
        sums_to_one = all(abs(sum(label.distribution) - 1) < 1e-3 for label in labels)
        base = labeler.transformer()
        ok = grades == TAUGHT_GRADES and sums_to_one and base.is_loaded_in_4bit and labeler.FAMILY == "causal_lm"
        return ok, f"{labeler.FAMILY} on {labeler.device}, 4-bit base: grades {grades} (taught {TAUGHT_GRADES})"

    def zero_shot_precision() -> tuple[bool, str]:
        baseline = zero_shot_labeler(RECORDS, qlora_config(model_dir))
        dtype = next(baseline.model.parameters()).dtype
        return dtype == half, f"untrained base loaded in {dtype} (expected {half})"

    def merge_unquantised() -> tuple[bool, str]:
        merged = merge_adapter(adapter, work / "merged", PAIRS)
        agreement = read_manifest(merged)["merge_agreement"]
        return agreement["grade_agreement"] >= MERGE_AGREEMENT_FLOOR, (
            f"into the {half} base: {agreement} (at least {MERGE_AGREEMENT_FLOOR} of the grades equal)"
        )

    def merge_4bit_and_bfloat16_variant() -> tuple[bool, str]:
        student = tp.load_student(adapter, max_length=128, check_pairs=PAIRS)
        messages: list[str] = []
        measurements, _ = tp.run_all(
            PAIRS,
            student,
            batch_sizes=[4],
            teacher_pairs=[],
            variants=["bfloat16"],
            skip_naive=True,
            log=messages.append,
        )
        variants = [m.variant for m in measurements]
        ok = tp.is_quantized(student) and variants == [None] and any("bfloat16 skipped" in m for m in messages)
        return ok, (
            f"merged into the 4-bit base (quantized again): {student.merge_agreement}; "
            f"timed variants {variants}, {measurements[0].labels_per_second:.1f} labels/s"
        )

    checks.run("QLoRA base: NF4, compute dtype from the compute capability", compute_dtype)
    checks.run("grade tokens found after the prompt", grade_tokens)
    checks.run("QLoRA training learns 4 taught grades", qlora_training)
    if "left" in state:  # on a GPU, after a training that ran
        checks.run("GPU memory released after training", memory_released)
    checks.run("gradient accumulation 2 x 4 equals 1 x 8", gradient_accumulation)
    checks.run("labels through load_labeler (adapter on the 4-bit base)", labelling)
    checks.run("zero-shot baseline in the GPU's half precision", zero_shot_precision)
    checks.run("merged into the unquantised base agrees with the adapter", merge_unquantised)
    checks.run("4-bit merge states its agreement; bfloat16 variant skipped", merge_4bit_and_bfloat16_variant)
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the tiny model, adapters and merges (default: temporary)")
    parser.add_argument(
        "--cpu-rehearsal", action="store_true", help="run the checks on a CPU (float32 compute) to try the script"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_rehearsal:
        print(
            "error: no CUDA GPU is visible: this device check needs one CUDA GPU "
            "(--cpu-rehearsal runs the same checks on a CPU; the CPU path is covered by pytest tests/)",
            file=sys.stderr,
        )
        return NO_CUDA_EXIT
    start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        print(f"device: {torch.cuda.get_device_name()} (compute capability {torch.cuda.get_device_capability()})")
    else:
        print("device: CPU (rehearsal: float32 compute, no GPU memory figures)")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.out or Path(scratch)
        checks = run_checks(work)
    print(f"total: {time.perf_counter() - start:.1f} s")
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB allocated")
    print(
        f"RESULT: {'PASS' if not checks.failed else 'FAIL'} ({len(checks.seconds) - len(checks.failed)} of "
        f"{len(checks.seconds)} checks passed)"
    )
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
