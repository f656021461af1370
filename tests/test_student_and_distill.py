"""Student grade-token scoring and LoRA distillation, on a tiny model built from a config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from labeler_utils.core.models import load_causal_lm
from labeler_utils.students.base import LABELER_MANIFEST
from labeler_utils.students.causal_lm.labeler import (
    GradeLabel,
    StudentLabeler,
    encode_prompt,
    encode_text,
    grade_token_ids,
    prompt_text,
    shared_prompt_prefix,
)
from labeler_utils.students.causal_lm.train import (
    DistillConfig,
    GradeCollator,
    answer_logits,
    build_examples,
    grade_loss,
    inverse_frequency_weights,
    merge_adapter,
    train_student,
    zero_shot_labeler,
)

PAIRS = [
    ("vpn error", "the vpn gateway error timeout restart"),
    ("travel policy", "lunch menu pizza"),
    ("expense report", "the travel policy and expense report " * 30),
    ("vpn timeout", "restart"),
]


def test_grade_tokens_are_single_tokens(tiny_model_dir):
    _, tokenizer = load_causal_lm(tiny_model_dir)
    ids = grade_token_ids(tokenizer)
    assert len(set(ids)) == 4 and [tokenizer.decode([i]) for i in ids] == ["0", "1", "2", "3"]


def test_one_pass_scores_equal_the_full_forward_next_token_probabilities(tiny_model_dir):
    model, tokenizer = load_causal_lm(tiny_model_dir)
    labeler = StudentLabeler(model, tokenizer, max_length=128, device="cpu")
    labels = list(labeler.label(PAIRS, batch_size=3, bucket_size=3, progress=False))
    ids = grade_token_ids(tokenizer)
    for (query, document), label in zip(PAIRS, labels):
        prompt_ids, _ = encode_prompt(tokenizer, query, document, 128)
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids])).logits[0, -1, ids]
        expected = torch.softmax(logits, dim=-1).tolist()
        assert label.distribution == pytest.approx(expected, abs=1e-5)
        assert label.grade == max(range(4), key=expected.__getitem__)
        assert label.expected_relevance == pytest.approx(sum(g * p for g, p in enumerate(expected)), abs=1e-5)


def test_batching_and_bucketing_do_not_change_labels_or_order(tiny_model_dir):
    labeler = StudentLabeler.load(tiny_model_dir, max_length=128)
    one_by_one = [lab.distribution for lab in labeler.label(PAIRS, batch_size=1, progress=False)]
    batched = [lab.distribution for lab in labeler.label(PAIRS * 3, batch_size=5, bucket_size=7, progress=False)]
    for first, second in zip(one_by_one * 3, batched):
        assert first == pytest.approx(second, abs=1e-5)


def test_long_documents_are_truncated_to_fit(tiny_model_dir):
    _, tokenizer = load_causal_lm(tiny_model_dir)
    ids, truncated = encode_prompt(tokenizer, "expense report", "expense report " * 500, max_length=96)
    assert truncated and len(ids) < 96
    prompt_end = encode_text(tokenizer, prompt_text(tokenizer, "expense report", ""))[-2:]
    assert ids[-2:] == prompt_end  # the cut prompt still ends where the grade goes
    short_ids, short_cut = encode_prompt(tokenizer, "vpn", "restart", max_length=96)
    assert not short_cut and short_ids == encode_text(tokenizer, prompt_text(tokenizer, "vpn", "restart"))


def test_query_document_query_format_reads_the_query_again_before_the_grade(tiny_model_dir):
    _, tokenizer = load_causal_lm(tiny_model_dir)
    plain = prompt_text(tokenizer, "vpn error", "restart the gateway")
    twice = prompt_text(tokenizer, "vpn error", "restart the gateway", "query-document-query")
    assert plain.count("vpn error") == 1 and twice.count("vpn error") == 2
    assert twice.index("restart the gateway") < twice.rindex("vpn error")
    ids, truncated = encode_prompt(tokenizer, "expense report", "lunch menu " * 500, 96, "query-document-query")
    assert (
        truncated and len(ids) < 96 and tokenizer.decode(ids).count("expense report") == 2
    )  # the cut is in the document
    prefix = shared_prompt_prefix(tokenizer, 96, "query-document-query")
    assert prefix == shared_prompt_prefix(tokenizer, 96) and ids[: len(prefix)] == prefix
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        prompt_text(tokenizer, "q", "d", "document-query")


def test_grade_tokens_are_found_after_the_prompt_for_a_sentencepiece_tokenizer(sentencepiece_model_dir):
    """A tokenizer that prepends ``▁`` makes a bare "0" two tokens; the digit written after the prompt is one."""
    model, tokenizer = load_causal_lm(sentencepiece_model_dir)
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("0", add_special_tokens=False)) == ["▁", "0"]
    ids = grade_token_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(ids) == ["0", "1", "2", "3"]
    records = [{"query": q, "document": d, "grade": g} for (q, d), g in zip(PAIRS, [3, 0, 2, 1])]
    examples, _ = build_examples(tokenizer, records, max_length=512)
    for (query, document), example, grade in zip(PAIRS, examples, [3, 0, 2, 1]):
        written = encode_text(tokenizer, prompt_text(tokenizer, query, document) + str(grade))
        assert example["input_ids"] == written and example["labels"][-1] == ids[grade]  # trained as it is read
    labeler = StudentLabeler(model, tokenizer, max_length=512, device="cpu")
    assert labeler.grade_ids.tolist() == ids
    prompt_ids, _ = encode_prompt(tokenizer, *PAIRS[0], 512)
    with torch.no_grad():
        expected = torch.softmax(model(torch.tensor([prompt_ids])).logits[0, -1, ids], dim=-1).tolist()
    assert next(labeler.label(PAIRS[:1], progress=False)).distribution == pytest.approx(expected, abs=1e-5)


def test_prompts_start_with_the_bos_token_unless_a_chat_template_writes_them(tiny_model_dir):
    _, tokenizer = load_causal_lm(tiny_model_dir)
    text = prompt_text(tokenizer, "vpn", "restart")
    assert text.endswith("Grade:")  # no trailing space before the grade digit
    ids, _ = encode_prompt(tokenizer, "vpn", "restart", 96)
    assert ids[0] == tokenizer.bos_token_id and ids[1:] == tokenizer.encode(text, add_special_tokens=False)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %} grade"
    templated, _ = encode_prompt(tokenizer, "vpn", "restart", 96)
    assert templated == tokenizer.encode(prompt_text(tokenizer, "vpn", "restart"), add_special_tokens=False)


def test_grade_label_from_probabilities():
    label = GradeLabel.from_probabilities([0.1, 0.2, 0.3, 0.4])
    assert label.grade == 3 and label.expected_relevance == pytest.approx(2.0)


def test_examples_carry_one_label_the_grade_token(tiny_model_dir):
    _, tokenizer = load_causal_lm(tiny_model_dir)
    records = [{"query": q, "document": d, "grade": g} for (q, d), g in zip(PAIRS, [3, 0, 2, 1])]
    examples, truncated = build_examples(tokenizer, records, max_length=96)
    ids = grade_token_ids(tokenizer)
    assert truncated == 1
    for example, grade in zip(examples, [3, 0, 2, 1]):
        supervised = [t for t in example["labels"] if t != -100]
        assert supervised == [ids[grade]] and example["input_ids"][-1] == ids[grade]
        assert example["teacher_distribution"] == [float(g == grade) for g in range(4)]
    with pytest.raises(ValueError, match="grade 4 not in 0-3"):
        build_examples(tokenizer, [{"query": "q", "document": "d", "grade": 4}], 96)
    with pytest.raises(ValueError, match="4 probabilities summing to 1"):
        build_examples(tokenizer, [{"query": "q", "document": "d", "grade": 1, "distribution": [1, 1, 0, 0]}], 96)


def test_grade_loss_hard_and_soft():
    vocab, grade_ids = 10, torch.tensor([4, 5, 6, 7])
    logits = torch.zeros(1, vocab)
    logits[0, 6] = 2.0  # the answer position favours grade 2's token
    hard = grade_loss(logits, torch.tensor([2]), torch.tensor([[0.0, 0.0, 1.0, 0.0]]), grade_ids, 0.0)
    expected_hard = -torch.log_softmax(logits[0], dim=-1)[6]
    assert hard.item() == pytest.approx(expected_hard.item(), abs=1e-6)
    teacher = torch.tensor([[0.1, 0.2, 0.6, 0.1]])
    soft = grade_loss(logits, torch.tensor([2]), teacher, grade_ids, 1.0)
    student = torch.softmax(logits[0, grade_ids], dim=-1)
    expected_kl = (teacher[0] * (teacher[0] / student).log()).sum()
    assert soft.item() == pytest.approx(expected_kl.item(), abs=1e-6)


def test_ordinal_grade_loss_is_the_binary_cross_entropy_of_exceeding_each_grade():
    vocab, grade_ids = 10, torch.tensor([4, 5, 6, 7])
    logits = torch.full((1, vocab), -1.0)
    logits[0, grade_ids] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))  # grade-token probabilities 0.1-0.4
    exceed = [0.9, 0.7, 0.4]  # P(grade > 0), P(grade > 1), P(grade > 2)
    hard = grade_loss(logits, torch.tensor([2]), torch.tensor([[0.0, 0.0, 1.0, 0.0]]), grade_ids, 0.0, None, "ordinal")
    # grade 2 exceeds grades 0 and 1, not 2: targets 1, 1, 0
    expected_hard = -(math.log(exceed[0]) + math.log(exceed[1]) + math.log(1 - exceed[2])) / 3
    assert hard.item() == pytest.approx(expected_hard, abs=1e-5)
    teacher = torch.tensor([[0.5, 0.0, 0.5, 0.0]])  # targets 0.5, 0.5, 0
    soft = grade_loss(logits, torch.tensor([2]), teacher, grade_ids, 1.0, None, "ordinal")
    expected_soft = -sum(t * math.log(c) + (1 - t) * math.log(1 - c) for t, c in zip([0.5, 0.5, 0.0], exceed)) / 3
    assert soft.item() == pytest.approx(expected_soft, abs=1e-5)
    # mass one grade off costs less than mass three off, unlike cross-entropy, which sees the true grade's token only
    near = torch.full((1, vocab), -1.0)
    near[0, grade_ids] = torch.log(torch.tensor([0.05, 0.05, 0.85, 0.05]))
    far = torch.full((1, vocab), -1.0)
    far[0, grade_ids] = torch.log(torch.tensor([0.85, 0.05, 0.05, 0.05]))
    truth = torch.tensor([3])
    assert grade_loss(near, truth, teacher, grade_ids, 0.0, None, "ordinal") < grade_loss(
        far, truth, teacher, grade_ids, 0.0, None, "ordinal"
    )
    assert grade_loss(near, truth, teacher, grade_ids, 0.0).item() == pytest.approx(
        grade_loss(far, truth, teacher, grade_ids, 0.0).item()
    )
    with pytest.raises(ValueError, match="objective 'ranking'"):
        DistillConfig(objective="ranking")


def test_class_weights_give_every_grade_the_same_total_weight():
    weights = inverse_frequency_weights([0, 0, 0, 2, 3, 3])
    assert weights.tolist() == pytest.approx([6 / 12, 6 / 4, 6 / 4, 6 / 8])  # grade 1 absent: counted as 1
    vocab, grade_ids = 10, torch.tensor([4, 5, 6, 7])
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    grades = torch.tensor([0, 3])
    teacher = torch.nn.functional.one_hot(grades, 4).float()
    per_row = torch.nn.functional.cross_entropy(logits, grade_ids[grades], reduction="none")
    weighted = grade_loss(logits, grades, teacher, grade_ids, 0.0, class_weights=weights)
    assert weighted.item() == pytest.approx((per_row * weights[grades]).mean().item(), abs=1e-6)


def test_shared_prefix_forward_equals_the_whole_forward_with_gradients(tiny_model_dir):
    """Running the instruction prefix once per batch gives the same answer logits and LoRA gradients."""
    from peft import LoraConfig, get_peft_model

    base, tokenizer = load_causal_lm(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.1)  # a trained-looking adapter, so its gradients are not trivial
    records = [{"query": q, "document": d, "grade": g} for (q, d), g in zip(PAIRS, [3, 0, 2, 1])]
    examples, _ = build_examples(tokenizer, records, max_length=96)
    batch = GradeCollator(tokenizer.pad_token_id)(examples)
    positions = (batch["labels"] != -100).float().argmax(dim=1) - 1
    prefix = shared_prompt_prefix(tokenizer, 96)
    assert len(prefix) > 10 and all(e["input_ids"][: len(prefix)] == prefix for e in examples)
    results = []
    for prefix_ids in ([], prefix):
        model.zero_grad()
        logits = answer_logits(model, batch["input_ids"], batch["attention_mask"], positions, prefix_ids)
        logits[:, grade_token_ids(tokenizer)].sum().backward()
        grads = {n: w.grad.clone() for n, w in model.named_parameters() if w.grad is not None}
        results.append((logits.detach(), grads))
    (whole, whole_grads), (shared, shared_grads) = results
    assert whole.shape == (4, model.config.vocab_size)
    assert torch.allclose(whole, shared, atol=1e-4)
    assert whole_grads.keys() == shared_grads.keys() and len(whole_grads) > 0
    for name in whole_grads:
        assert torch.allclose(whole_grads[name], shared_grads[name], atol=1e-4, rtol=1e-3), name
    with pytest.raises(ValueError, match="gradient checkpointing"):
        DistillConfig(shared_prefix=True, gradient_checkpointing=True).use_shared_prefix()


def test_collator_pads_right_and_masks_padding():
    batch = GradeCollator(pad_token_id=0)(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, -100, 7], "grade": 1, "teacher_distribution": [0, 1, 0, 0]},
            {"input_ids": [5, 8], "labels": [-100, 8], "grade": 2, "teacher_distribution": [0, 0, 1, 0]},
        ]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 8, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7], [-100, 8, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def learnable_run(tiny_model_dir: Path, qlora: bool) -> tuple[list[dict], DistillConfig]:
    """Four pairs with distinct grades, repeated, and a config that fits them in 40 steps (LoRA or QLoRA)."""
    records = [
        {"query": q, "document": d, "grade": g, "query_id": str(i), "doc_id": str(i)}
        for i, ((q, d), g) in enumerate(zip(PAIRS, [3, 0, 2, 1]))
    ] * 4
    config = DistillConfig(
        base_model=str(tiny_model_dir),
        qlora=qlora,
        max_steps=40,
        batch_size=8,
        max_length=128,
        learning_rate=1e-2,
        lora_rank=8,
        logging_steps=5,
        warmup_ratio=0.0,
    )
    return records, config


def test_lora_training_learns_the_grades_and_saves_a_manifest(tiny_model_dir, tmp_path):
    records, config = learnable_run(tiny_model_dir, qlora=False)
    manifest = train_student(records, tmp_path, config, {"source": "unit test"})
    adapter = tmp_path / "adapter"
    saved = json.loads((adapter / LABELER_MANIFEST).read_text())
    assert saved["method"] == "lora" and saved["train_examples"] == 16 and saved["data"] == {"source": "unit test"}
    assert saved["versions"]["peft"] and saved["config"]["max_steps"] == 40
    losses = [h["loss"] for h in manifest["log_history"] if "loss" in h]
    assert losses[-1] < losses[0] / 2  # it fits 4 distinct pairs
    labeler = StudentLabeler.load(adapter)
    assert [lab.grade for lab in labeler.label(PAIRS, progress=False)] == [3, 0, 2, 1]


def test_ordinal_lora_training_learns_the_grades_through_the_same_labeler(tiny_model_dir, tmp_path):
    records, config = learnable_run(tiny_model_dir, qlora=False)
    config.objective, config.max_steps = "ordinal", 120  # its gradients at the grade tokens are smaller
    manifest = train_student(records, tmp_path, config, {"source": "unit test"})
    assert manifest["config"]["objective"] == "ordinal"
    losses = [h["loss"] for h in manifest["log_history"] if "loss" in h]
    assert losses[-1] < losses[0] / 2
    labels = list(StudentLabeler.load(tmp_path / "adapter").label(PAIRS, progress=False))
    assert [lab.grade for lab in labels] == [3, 0, 2, 1], [lab.distribution for lab in labels]


def test_an_adapter_is_read_in_the_prompt_format_it_was_trained_with(tiny_model_dir, tmp_path):
    records = [{"query": q, "document": d, "grade": g} for (q, d), g in zip(PAIRS, [3, 0, 2, 1])]
    config = DistillConfig(
        base_model=str(tiny_model_dir),
        qlora=False,
        max_steps=2,
        batch_size=4,
        max_length=128,
        prompt_format="query-document-query",
    )
    assert train_student(records, tmp_path, config)["config"]["prompt_format"] == "query-document-query"
    labeler = StudentLabeler.load(tmp_path / "adapter")
    assert labeler.prompt_format == "query-document-query"
    _, tokenizer = load_causal_lm(tiny_model_dir)
    assert (
        labeler.encode_pair("vpn", "restart")[0]
        == encode_prompt(tokenizer, "vpn", "restart", 128, "query-document-query")[0]
    )
    with pytest.raises(ValueError, match="was trained with prompt_format 'query-document-query'"):
        StudentLabeler.load(tmp_path / "adapter", prompt_format="query-document")
    merged = StudentLabeler.load(merge_adapter(tmp_path / "adapter", tmp_path / "merged", PAIRS))  # the export too
    assert merged.prompt_format == "query-document-query" and merged.max_length == 128
    # merged into the float32 base it was trained on, the adapter gives the same grades on the check pairs
    agreement = json.loads((tmp_path / "merged" / LABELER_MANIFEST).read_text())["merge_agreement"]
    assert agreement["pairs"] == 4 and agreement["grade_agreement"] == 1.0
    assert agreement["max_probability_difference"] < 1e-4
    with pytest.raises(ValueError, match="needs check_pairs"):
        merge_adapter(tmp_path / "adapter", tmp_path / "merged_unchecked", [])
    assert (
        StudentLabeler.load(tiny_model_dir, prompt_format="query-document-query").prompt_format
        == "query-document-query"
    )


def test_training_resumes_from_its_last_checkpoint_and_refuses_another_trainings(tiny_model_dir, tmp_path):
    import shutil

    records = [{"query": q, "document": d, "grade": g} for (q, d), g in zip(PAIRS, [3, 0, 2, 1])] * 4
    config = DistillConfig(
        base_model=str(tiny_model_dir),
        qlora=False,
        max_steps=4,
        batch_size=8,
        max_length=128,
        learning_rate=1e-2,
        lora_rank=8,
        warmup_ratio=0.0,
        save_steps=2,
    )
    first = train_student(records, tmp_path, config)
    assert first["resumed_from"] is None and first["global_steps"] == 4
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    shutil.rmtree(checkpoints / "checkpoint-4")  # as if the run had been killed between steps 2 and 4
    second = train_student(records, tmp_path, config)
    assert second["resumed_from"].endswith("checkpoint-2") and second["global_steps"] == 4
    assert (checkpoints / "checkpoint-4").is_dir()  # steps 3 and 4 ran again from the restored state
    with pytest.raises(ValueError, match="checkpoints of another training"):
        train_student(records, tmp_path, DistillConfig(**{**config.__dict__, "learning_rate": 5e-3}))


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir_64, tmp_path_factory) -> tuple[Path, dict]:
    """A QLoRA training of the learnable run on the 64-wide tiny Llama: its output folder and manifest."""
    records, config = learnable_run(tiny_model_dir_64, qlora=True)
    folder = tmp_path_factory.mktemp("qlora")
    return folder, train_student(records, folder, config, {"source": "unit test"})


def test_qlora_trains_lora_on_a_4bit_nf4_base(qlora_run):
    """The QLoRA path (NF4, double quantization, LoRA on every linear projection); bitsandbytes trains it on a CPU too."""
    from safetensors.torch import load_file

    tmp_path, manifest = qlora_run
    assert manifest["method"] == "qlora-nf4"
    losses = [h["loss"] for h in manifest["log_history"] if "loss" in h]
    assert losses[-1] < losses[0] / 2
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    adapted = {name.rsplit(".", 1)[-1] for name in adapter_config["target_modules"]}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    labeler = StudentLabeler.load(tmp_path / "adapter")  # applied to the same 4-bit base it was trained on
    base = labeler.model.get_base_model()
    assert base.is_loaded_in_4bit and base.config.quantization_config.bnb_4bit_use_double_quant
    # without bfloat16 compute (here float32) the adapters stay float32: trl would leave them in bfloat16
    assert {t.dtype for t in load_file(tmp_path / "adapter" / "adapter_model.safetensors").values()} == {torch.float32}


def test_a_merged_qlora_student_states_its_agreement_and_skips_the_bfloat16_variant(qlora_run):
    """Merged into its 4-bit base, the adapter is quantized again: its grades are compared with the unmerged ones.
    The bfloat16 engine variant cannot cast a 4-bit model and is skipped instead of crashing."""
    from labeler_utils import throughput as tp

    adapter = qlora_run[0] / "adapter"
    unmerged = list(StudentLabeler.load(adapter).label(PAIRS, progress=False))
    student = tp.load_student(adapter, max_length=128, check_pairs=PAIRS)
    merged = list(student.label(PAIRS, progress=False))
    assert not hasattr(student.model, "merge_and_unload") and tp.is_quantized(student)
    same = sum(a.grade == b.grade for a, b in zip(unmerged, merged)) / len(PAIRS)
    assert student.merge_agreement["pairs"] == 4 and student.merge_agreement["grade_agreement"] == same
    assert tp.load_student(adapter, max_length=128, merge=False, check_pairs=PAIRS).merge_agreement is None
    messages = []
    measurements, extras = tp.run_all(
        PAIRS, student, batch_sizes=[4], teacher_pairs=[], variants=["bfloat16"], skip_naive=True, log=messages.append
    )
    assert [(m.kind, m.variant) for m in measurements] == [("single_pass", None)] and not extras["variant_agreement"]
    assert any("bfloat16 skipped" in line for line in messages)
    with pytest.raises(ValueError, match="cannot be cast"):
        tp.in_precision(student, torch.bfloat16)


def test_gradient_accumulation_gives_the_loss_and_gradients_of_the_whole_batch(tiny_model_dir, tmp_path):
    """2 accumulated micro-batches of 4 are one batch of 8: same first logged loss and gradient norm."""
    records = [{"query": q, "document": d, "grade": g} for (q, d), g in zip(PAIRS, [3, 0, 2, 1])] * 2
    first_logs = []
    for batch_size, accumulation in ((8, 1), (4, 2)):
        config = DistillConfig(
            base_model=str(tiny_model_dir),
            qlora=False,
            max_steps=1,
            batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_length=128,
            lora_rank=8,
            lora_dropout=0.0,
            logging_steps=1,
            warmup_ratio=0.0,
        )
        manifest = train_student(records, tmp_path / f"batch{batch_size}", config)
        first_logs.append(next(h for h in manifest["log_history"] if "loss" in h))
    (whole, accumulated) = first_logs
    assert accumulated["loss"] == pytest.approx(whole["loss"], rel=1e-3)
    assert accumulated["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-3)


class Captured(Exception):
    """Raised by a stand-in for a call that would need a GPU here; the test reads the arguments it recorded."""


@pytest.mark.parametrize("capability, half", [((7, 5), torch.float16), ((8, 0), torch.bfloat16)])
def test_on_a_gpu_models_load_and_qlora_computes_in_its_native_half_precision(
    tiny_model_dir, tmp_path, monkeypatch, capability, half
):
    """bfloat16 from compute capability 8 (Ampere) on, float16 before (T4, V100: bfloat16 there is emulated);
    never float32 beside a 4-bit student on the GPU."""
    import bitsandbytes  # noqa: F401  (imported while the CPU is seen as such: its CUDA backend would not load)
    import peft  # noqa: F401
    import transformers
    import trl

    trl.SFTConfig, trl.SFTTrainer  # noqa: B018  (the lazy modules imported now, for the same reason)
    real_model, _ = load_causal_lm(tiny_model_dir)
    loads, trainer_args = [], {}

    def from_pretrained(source, **kwargs):
        loads.append(kwargs)
        if "quantization_config" not in kwargs:
            raise Captured
        return real_model  # the 4-bit student's stand-in, so that training reaches its arguments

    def sft_config(**kwargs):
        trainer_args.update(kwargs)
        raise Captured

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(trl, "SFTConfig", sft_config)
    config = DistillConfig(base_model=str(tiny_model_dir), max_length=128)
    assert (
        config.use_qlora()
        and config.use_bf16() == (half == torch.bfloat16)
        and config.use_fp16() == (half == torch.float16)
    )
    records = [{"query": q, "document": d, "grade": g} for (q, d), g in zip(PAIRS, [3, 0, 2, 1])]
    with pytest.raises(Captured):
        train_student(records, tmp_path, config)
    assert loads[-1]["dtype"] == half and loads[-1]["device_map"] == {"": 0}
    assert loads[-1]["quantization_config"].bnb_4bit_compute_dtype == half
    assert trainer_args["bf16"] == (half == torch.bfloat16) and trainer_args["fp16"] == (half == torch.float16)
    with pytest.raises(Captured):
        zero_shot_labeler(records, config)  # the untrained base beside the student
    with pytest.raises(Captured):
        StudentLabeler.load(tiny_model_dir)
    assert [load["dtype"] for load in loads[-2:]] == [half, half]
