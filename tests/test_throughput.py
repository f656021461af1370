"""Throughput and cost helpers: arithmetic on hand-computed numbers, and engine agreement on a tiny model.

No timing is asserted anywhere: speed depends on the machine and its load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import chat_response, scripted_client

from labeler_utils import throughput as tp
from labeler_utils.students.base import label_agreement
from labeler_utils.students.causal_lm.labeler import StudentLabeler, grade_token_ids

# ------------------------------------------------------------------------------------------
# Cost, ratios, FLOPs
# ------------------------------------------------------------------------------------------


def test_token_cost_per_1000_labels():
    # 1,000 prompt + 100 answer tokens at $2.50 / $10 per million: (2500 + 1000) / 1e6 per label.
    assert tp.token_cost_per_1000(1000, 100, 2.50, 10.00) == pytest.approx(3.5)
    assert tp.token_cost_per_1000(0, 0, 2.50, 10.00) == 0.0


def test_machine_cost_per_1000_labels():
    # 0.5 labels/s -> 2,000 s for 1,000 labels = 5/9 h; at $0.0765/h that is $0.0425.
    assert tp.machine_cost_per_1000(0.5, 0.0765) == pytest.approx(0.0425)
    # 100 labels/s on a $3.60/h GPU: 10 s = 1/360 h -> $0.01.
    assert tp.machine_cost_per_1000(100.0, 3.60) == pytest.approx(0.01)
    assert tp.machine_cost_per_1000(0.0, 1.0) == math.inf


def test_ratio_handles_missing_values():
    assert tp.ratio(10.0, 0.5) == 20.0
    assert tp.ratio(None, 2.0) is None
    assert tp.ratio(1.0, None) is None
    assert tp.ratio(1.0, 0.0) is None


def test_flops_and_peak_fraction():
    # 100M parameters x 500 tokens x 2 = 1e11 FLOPs per pair.
    assert tp.prefill_flops_per_pair(100_000_000, 500) == pytest.approx(1e11)
    # 10 pairs/s x 1e11 = 1e12 FLOP/s on a 989 TFLOP/s H100: 1/989 of peak.
    assert tp.peak_fraction(1e11, 10.0, 989.0) == pytest.approx(1 / 989)
    # A100: 3,120 pairs/s of 1e11 FLOPs each is exactly its 312 TFLOP/s.
    assert tp.peak_fraction(1e11, 3120.0, 312.0) == pytest.approx(1.0)
    # Attention: 2 * layers * hidden * T^2 = 2 * 30 * 576 * 100^2.
    assert tp.attention_flops_per_pair(30, 576, 100) == pytest.approx(2 * 30 * 576 * 100**2)


def test_device_peak_table():
    assert tp.device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert tp.device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert tp.device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert tp.device_peak_tflops("NVIDIA L40S") == 362.0
    assert tp.device_peak_tflops("NVIDIA L4") == 121.0
    assert tp.device_peak_tflops("Tesla T4") == 65.0
    assert tp.device_peak_tflops("Some Unknown Accelerator") is None


def _row(name: str, kind: str, lps: float, batch: int | None = None, measured: bool = True) -> tp.Measurement:
    return tp.Measurement(
        name=name,
        kind=kind,
        measured=measured,
        pairs=10,
        seconds=10 / lps,
        labels_per_second=lps,
        prompt_tokens_per_pair=500,
        completion_tokens_per_pair=0,
        batch_size=batch,
    )


def _example_rows() -> list[tp.Measurement]:
    """Naive generate, the plain single pass at batch 1 and 8, a faster engine variant, a measured teacher."""
    variant = _row("single + prefix", "single_pass", 12.0, 8)
    variant.variant = "prefix_cache"
    return [
        _row("naive", "naive_generate", 0.5, 1),
        _row("single 1", "single_pass", 1.0, 1),
        _row("single 8", "single_pass", 10.0, 8),
        variant,  # reported as the best variant, not the headline
        _row("teacher", "teacher", 0.4),
    ]


def test_summary_ratios_costs_and_targets():
    rows = _example_rows()
    tp.price_measurements(rows, machine_price_per_hour=3.6)
    api = tp.stated_teacher("api", 4.0, 1000, 60, 2.5, 10.0)
    summary = tp.summarize_throughput(rows + [api], {"date": "today"}, {"pairs": 10})

    assert summary["student_labels_per_second"] == 10.0
    assert summary["student_best_batch_size"] == 8
    assert summary["speedup_vs_naive_generate"] == pytest.approx(20.0)
    assert summary["speedup_vs_teacher"] == pytest.approx(25.0)
    assert summary["speedup_best_variant_vs_naive_generate"] == pytest.approx(24.0)
    costs = summary["cost_per_1000_labels"]
    assert costs["student_single_pass"] == pytest.approx(0.1)  # 100 s = 1/36 h at $3.60
    assert costs["teacher_measured"] == pytest.approx(2.5)  # 2,500 s at $3.60/h
    assert costs["student_naive_generate"] == pytest.approx(2.0)
    assert costs["teacher_hosted_api_stated"] == pytest.approx(3.1)  # (1000 * 2.5 + 60 * 10) / 1000
    assert summary["cost_ratio_teacher_vs_student"] == pytest.approx(25.0)
    api_summary = summary["hosted_api_teacher_stated"]
    assert api_summary["measured"] is False
    assert api_summary["student_speedup"] == pytest.approx(2.5)
    assert api_summary["cost_ratio_vs_student"] == pytest.approx(31.0)
    targets = {t["name"]: t for t in summary["targets"]}
    assert targets["single_pass_vs_naive_generate_speed"]["met"]  # 20 >= 20
    assert targets["student_vs_teacher_speed"]["met"]
    assert targets["teacher_vs_student_cost"]["met"]

    slow = tp.summarize_throughput([_row("naive", "naive_generate", 1.0), _row("s", "single_pass", 2.0, 4)], {}, {})
    target = {t["name"]: t for t in slow["targets"]}["single_pass_vs_naive_generate_speed"]
    assert not target["met"] and target["shortfall_factor"] == pytest.approx(10.0)
    assert slow["speedup_vs_teacher"] is None

    markdown = tp.markdown_report(
        {
            **summary,
            "machine": {
                "cpu": "x",
                "usable_cores": 2,
                "torch_threads": 2,
                "torch": "t",
                "transformers": "t",
                "load_average": [0.1],
            },
        }
    )
    assert "**stated**" in markdown and "single_pass_vs_naive_generate_speed" in markdown


def test_remote_teacher_priced_per_token():
    rows = [tp.Measurement("teacher", "teacher", True, 10, 5.0, 2.0, 1000, 100)]
    tp.price_measurements(rows, machine_price_per_hour=1.0, teacher_price_in=2.5, teacher_price_out=10.0)
    assert rows[0].cost_per_1000_labels == pytest.approx(3.5)


def test_time_a_process_is_stopped_is_counted():
    import os
    import signal
    import subprocess
    import time

    child = subprocess.Popen(["sleep", "30"])
    try:
        os.kill(child.pid, signal.SIGSTOP)
        with tp.PeakMemory([child.pid], interval=0.02) as memory:
            time.sleep(0.4)
        assert 0.2 < memory.stopped_seconds <= 0.5
        assert memory.peak_mb > 0
    finally:
        child.kill()
        child.wait()
    with tp.PeakMemory() as memory:
        time.sleep(0.1)
    assert memory.stopped_seconds == 0.0


# ------------------------------------------------------------------------------------------
# Parsing, pairs, the stage 06 report
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, grade",
    [("2", 2), (" 3.", 3), ("Grade: 1", 1), ("0\n", 0), ("The document is", None), ("5", None), ("", None)],
)
def test_naive_parser(text, grade):
    assert tp.parse_generated_grade(text) == grade


def test_demo_pairs_are_deterministic_and_vary():
    pairs = tp.demo_pairs(6)
    assert pairs == tp.demo_pairs(6) and len(pairs) == 6
    assert pairs[0][1].startswith(f"Title: {pairs[0][0]}")  # even pairs: the document's own title
    assert not pairs[1][1].startswith(f"Title: {pairs[1][0]}")


def test_load_pairs_from_jsonl(tmp_path: Path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"query": f"q{i}", "document": f"d{i}"}) for i in range(3)) + "\n")
    assert tp.load_pairs(path, 2) == [("q0", "d0"), ("q1", "d1")]


@pytest.mark.parametrize(
    "report",
    [
        {
            "labelers": {
                "teacher": {"qwk": 0.61},
                "student_zero_shot": {"qwk": 0.12},
                "student_distilled": {"qwk": {"estimate": 0.48, "low": 0.4}},
            }
        },
        {  # stage 06's layout: labelers -> name -> metrics -> qwk -> estimate, then comparisons
            "labelers": {
                name: {"n": 10, "metrics": {"kappa": {"estimate": 0.0}, "qwk": {"estimate": q, "ci_low": 0.0}}}
                for name, q in (("student_distilled", 0.48), ("student_zero_shot", 0.12), ("teacher", 0.61))
            },
            "comparisons": {"student_distilled_vs_teacher": {"qwk": {"estimate": -0.13}}},
        },
        {
            "rows": [
                {"labeler": "teacher", "qwk": 0.61},
                {"labeler": "student_zero_shot", "qwk": 0.12},
                {"labeler": "student_distilled", "quadratic_weighted_kappa": 0.48},
            ]
        },
    ],
)
def test_quality_from_report_layouts(tmp_path: Path, report):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert tp.quality_from_report(path) == {"teacher": 0.61, "student_zero_shot": 0.12, "student_distilled": 0.48}


def test_quality_from_missing_or_broken_report(tmp_path: Path):
    assert tp.quality_from_report(tmp_path / "missing.json") == {}
    (tmp_path / "bad.json").write_text("{not json")
    assert tp.quality_from_report(tmp_path / "bad.json") == {}


# ------------------------------------------------------------------------------------------
# The teacher measurement never counts cached answers
# ------------------------------------------------------------------------------------------


def test_measure_teacher_counts_every_call_and_usage():
    client = scripted_client([chat_response("Brief reason.\nFinal grade: 2", prompt_tokens=300, completion_tokens=20)])
    pairs = [("vpn error", "restart the gateway")] * 3  # the same pair three times: asked three times
    m = tp.measure_teacher(
        pairs, base_url="http://127.0.0.1:9/v1", model="scripted", openai_client=client, top_logprobs=None, warmup=True
    )
    assert m.grades == [2, 2, 2]
    assert m.prompt_tokens_per_pair == 300 and m.completion_tokens_per_pair == 20
    assert len(client.chat.completions.requests) == 4  # warm-up + 3, none served from a cache
    assert m.measured and m.kind == "teacher" and m.peak_rss_mb is None


# ------------------------------------------------------------------------------------------
# Engines agree on a tiny model
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_student(tiny_model_dir: Path) -> StudentLabeler:
    """The tiny Llama with an output layer whose arg-max over the whole vocabulary is always a grade.

    Every non-grade row is the mean of the four grade rows, so its logit is the mean of the grade
    logits: never above the largest. Greedy ``generate()`` therefore writes a grade digit first, and
    that digit must be the single-pass engine's arg-max grade.
    """
    labeler = StudentLabeler.load(tiny_model_dir, max_length=128)
    ids = grade_token_ids(labeler.tokenizer)
    head = labeler.model.get_output_embeddings().weight
    assert head.data_ptr() != labeler.model.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        grade_rows = head[ids].clone() * 4
        head[:] = grade_rows.mean(dim=0)
        head[ids] = grade_rows
    return labeler


TINY_PAIRS = [
    ("vpn error", "restart the gateway"),
    ("travel policy", "expense report travel policy lunch menu pizza"),
    ("lunch menu", "pizza"),
    ("expense report", "the expense report is related to travel but does not answer the query " * 3),
    ("gateway timeout", "vpn gateway timeout error restart"),
    ("pizza", "lunch menu with pizza and extra detail perhaps missing"),
]


def test_naive_generate_and_single_pass_agree_on_the_grade(tiny_student: StudentLabeler):
    engine = list(tiny_student.label(TINY_PAIRS, batch_size=4, progress=False))  # padded batches
    for (query, document), label in zip(TINY_PAIRS, engine):
        grade, text, n_prompt, n_new = tp.naive_generate_label(
            tiny_student.model, tiny_student.tokenizer, query, document, tiny_student.max_length, max_new_tokens=2
        )
        assert grade == label.grade, (query, text)
        assert n_new >= 1 and n_prompt > 10


def test_prefix_cache_engine_matches_plain_engine(tiny_student: StudentLabeler):
    plain = list(tiny_student.label(TINY_PAIRS, batch_size=4, progress=False))
    cached_engine = tp.PrefixCachedStudentLabeler.from_labeler(tiny_student)
    assert len(cached_engine.prefix_ids) > 10  # the instruction is shared
    cached = list(cached_engine.label(TINY_PAIRS, batch_size=4, progress=False))
    assert cached_engine.prefix_hits == len(TINY_PAIRS)
    agreement = label_agreement(plain, cached)
    assert agreement["grade_agreement"] == 1.0
    assert agreement["max_probability_difference"] < 1e-4


def test_measurements_on_tiny_model(tiny_student: StudentLabeler):
    naive = tp.measure_naive_generate(tiny_student, TINY_PAIRS[:2], max_new_tokens=2)
    single, labels = tp.measure_single_pass(tiny_student, TINY_PAIRS, batch_size=4)
    assert naive.pairs == 2 and naive.completion_tokens_per_pair == 2 and naive.labels_per_second > 0
    assert single.pairs == len(TINY_PAIRS) and single.completion_tokens_per_pair == 0
    assert single.grades == [label.grade for label in labels] and single.peak_rss_mb > 0
    assert single.prompt_tokens_per_pair > naive.prompt_tokens_per_pair / 4
    params = tp.matmul_parameter_count(tiny_student.model)
    total = sum(p.numel() for p in tiny_student.model.parameters())
    vocab, hidden = tiny_student.model.config.vocab_size, tiny_student.model.config.hidden_size
    assert params == total - 2 * vocab * hidden  # untied: input table and output layer both left out
    report = tp.flops_report(tiny_student, single.prompt_tokens_per_pair, single.labels_per_second, peak_tflops=1.0)
    assert report["prefill_gflops_per_pair"] == pytest.approx(2 * params * single.prompt_tokens_per_pair / 1e9)
    assert 0 < report["fraction_of_peak"] < 1


# ------------------------------------------------------------------------------------------
# Plots and the stated teacher's prompt tokens
# ------------------------------------------------------------------------------------------


def _plotted_rows() -> list[tp.Measurement]:
    """The example rows priced at $3.60/h, a row without a price, and a stated hosted teacher."""
    rows = _example_rows()
    tp.price_measurements(rows, machine_price_per_hour=3.6)
    return [*rows, _row("not priced", "single_pass_other", 3.0, 8), tp.stated_teacher("api", 4.0, 1000, 60, 2.5, 10.0)]


def test_plot_throughput_vs_batch_size():
    machine = {"cpu": "Test CPU", "usable_cores": 2, "load_average": [0.5, 0.4, 0.3]}
    fig = tp.plot_throughput_vs_batch_size(_plotted_rows(), [1, 8], machine)
    (ax,) = fig.axes
    plain, *horizontal = ax.lines  # the plain single pass, then naive generate, teacher and stated teacher
    assert list(plain.get_xdata()) == [1, 8] and list(plain.get_ydata()) == [1.0, 10.0]
    assert [line.get_ydata()[0] for line in horizontal] == [0.5, 0.4, 4.0]
    assert len(ax.collections) == 1  # the engine variant's star
    assert len(ax.get_legend().get_texts()) == 5
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["1", "8"]
    assert "Test CPU, 2 cores, load 0.5" in ax.get_title()


def test_plot_cost_per_1000_labels():
    rows = _plotted_rows()
    fig = tp.plot_cost_per_1000_labels(rows)
    (ax,) = fig.axes
    priced = [m for m in rows if m.cost_per_1000_labels is not None]
    assert len(priced) == 6 and len(ax.patches) == len(priced) and len(ax.texts) == len(priced)
    assert [bar.get_width() for bar in ax.patches] == [m.cost_per_1000_labels for m in priced]
    labels = [tick.get_text() for tick in ax.get_yticklabels()]
    assert labels[-1] == "api [stated]" and "not priced" not in labels


def test_plot_quality_vs_cost():
    quality = {"teacher": 0.61, "student_zero_shot": 0.12, "student_distilled": 0.48}
    fig = tp.plot_quality_vs_cost(quality, {"teacher": 2.5, "student_zero_shot": 0.1, "student_distilled": None})
    (ax,) = fig.axes
    assert len(ax.collections) == 2  # the distilled student has no cost: left out
    assert [text.get_text() for text in ax.texts] == ["teacher", "student zero shot"]
    assert [tuple(c.get_offsets()[0]) for c in ax.collections] == [(2.5, 0.61), (0.1, 0.12)]


def test_rubric_prompt_tokens_equal_a_direct_count(tiny_student: StudentLabeler):
    import copy

    from labeler_utils.teacher import rubric_messages

    tokenizer = tiny_student.tokenizer
    assert not getattr(tokenizer, "chat_template", None)  # the rubric text alone
    for reasoning in (True, False):
        rubric = [rubric_messages(q, d, reasoning=reasoning)[0]["content"] for q, d in TINY_PAIRS]
        direct = [len(tokenizer.encode(text, add_special_tokens=False)) for text in rubric]
        assert tp.rubric_prompt_tokens(tokenizer, TINY_PAIRS, reasoning=reasoning) == sum(direct) / len(direct)

    templated = copy.deepcopy(tokenizer)
    templated.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    for reasoning in (True, False):
        direct = [
            len(
                templated.encode(
                    templated.apply_chat_template(
                        rubric_messages(q, d, reasoning=reasoning), tokenize=False, add_generation_prompt=True
                    ),
                    add_special_tokens=False,
                )
            )
            for q, d in TINY_PAIRS
        ]
        assert tp.rubric_prompt_tokens(templated, TINY_PAIRS, reasoning=reasoning) == sum(direct) / len(direct)
    assert tp.rubric_prompt_tokens(templated, TINY_PAIRS, False) < tp.rubric_prompt_tokens(templated, TINY_PAIRS, True)
