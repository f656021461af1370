"""The MiniLM cross-encoder student, ``load_labeler`` dispatch, and the cosine baseline beside it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TOPICS

from labeler_utils.core.models import bundled_minilm_path
from labeler_utils.students.base import LABELER_MANIFEST, GradeLabel
from labeler_utils.students.causal_lm.labeler import StudentLabeler
from labeler_utils.students.cross_encoder import (
    CrossEncoderConfig,
    CrossEncoderLabeler,
    cross_encoder_loss,
    train_cross_encoder,
    training_labels,
)
from labeler_utils.students.registry import load_labeler

RECORDS = [
    {"query_id": f"q{i}", "doc_id": f"d{i}{j}", "query": query, "document": document * repeat, "grade": grade}
    for i, (query, (relevant, irrelevant)) in enumerate(TOPICS.items())
    for j, (document, grade, repeat) in enumerate(
        [(relevant, 3, 1), (relevant, 2, 3), (irrelevant, 0, 1), (irrelevant, 1, 4)]
    )
]  # 16 pairs of varied lengths


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("cross_encoder")
    config = CrossEncoderConfig(epochs=1, batch_size=8, max_length=64, learning_rate=1e-4)
    return folder, train_cross_encoder(RECORDS, folder, config, {"source": "hand-made"})


@pytest.fixture(scope="module")
def labeler(trained: tuple[Path, dict]) -> CrossEncoderLabeler:
    return load_labeler(trained[0])


def test_training_saves_model_and_manifest(trained):
    folder, manifest = trained
    saved = json.loads((folder / "model" / LABELER_MANIFEST).read_text())
    assert saved["family"] == manifest["family"] == "cross_encoder"
    assert saved["config"]["objective"] == "classification" and saved["config"]["base_model"] == bundled_minilm_path()
    assert saved["train_examples"] == 16 and saved["data"] == {"source": "hand-made"} and saved["train_seconds"] > 0
    assert "sentence-transformers" in saved["versions"]
    assert (folder / "model" / "model.safetensors").exists()


def test_load_labeler_reads_the_family_from_the_manifest(trained, labeler):
    assert isinstance(labeler, CrossEncoderLabeler) and labeler.objective == "classification"
    assert labeler.max_length == 64  # the manifest's max_length wins, as for StudentLabeler
    assert isinstance(load_labeler(trained[0] / "model"), CrossEncoderLabeler)


def test_labels_keep_input_order_and_do_not_depend_on_batching(labeler):
    pairs = [(r["query"], r["document"]) for r in RECORDS]
    one_by_one = [next(labeler.label([pair], progress=False)) for pair in pairs]
    bucketed = list(labeler.label(iter(pairs), batch_size=3, bucket_size=5, progress=False))
    assert [label.grade for label in bucketed] == [label.grade for label in one_by_one]
    for a, b in zip(bucketed, one_by_one):
        assert a.distribution == pytest.approx(b.distribution, abs=1e-5)
    for label in bucketed:
        assert math.isclose(sum(label.distribution), 1.0, abs_tol=1e-6)
        assert label.grade == max(range(4), key=label.distribution.__getitem__)
        assert label.expected_relevance == pytest.approx(sum(g * p for g, p in enumerate(label.distribution)))


def test_label_records_rows_match_the_causal_student_format(labeler):
    rows = labeler.label_records(RECORDS[:3], "minilm", progress=False)
    assert [(r["query_id"], r["doc_id"]) for r in rows] == [(r["query_id"], r["doc_id"]) for r in RECORDS[:3]]
    assert set(rows[0]) == {"query_id", "doc_id", "grade", "expected_relevance", "distribution", "labeler"}


def test_long_documents_are_cut_to_max_length_and_counted(labeler):
    ids, truncated = labeler.encode_pair("vpn error", "gateway timeout " * 200)
    assert len(ids) == labeler.max_length and truncated and ids[-1] == labeler.tokenizer.sep_token_id
    assert labeler.encode_pair("vpn error", "gateway timeout")[1] is False
    before = labeler.truncated
    list(labeler.label([("vpn error", "gateway timeout " * 200), ("vpn error", "gateway timeout")], progress=False))
    assert labeler.truncated == before + 1


def test_regression_head_labels_through_the_same_interface(tmp_path):
    from sentence_transformers.cross_encoder import CrossEncoder

    CrossEncoder(bundled_minilm_path(), num_labels=1, max_length=64).save_pretrained(str(tmp_path))
    regression = load_labeler(tmp_path, family="cross_encoder")
    assert regression.objective == "regression"
    labels = list(regression.label([(r["query"], r["document"]) for r in RECORDS[:4]], progress=False))
    assert all(math.isclose(sum(label.distribution), 1.0) and 0 <= label.expected_relevance <= 3 for label in labels)


def test_regression_score_maps_to_the_two_nearest_grades():
    label = GradeLabel.from_expected(1.25)
    assert label.distribution == pytest.approx([0, 0.75, 0.25, 0]) and label.grade == 1
    assert label.expected_relevance == pytest.approx(1.25)
    assert GradeLabel.from_expected(2.6).grade == 3 and GradeLabel.from_expected(3.0).distribution == pytest.approx(
        [0, 0, 0, 1]
    )
    assert GradeLabel.from_expected(-0.2).distribution == pytest.approx([1, 0, 0, 0])


def test_training_targets_hard_soft_and_regression():
    records = [{"grade": 2, "distribution": [0.1, 0.2, 0.6, 0.1]}, {"grade": 0}]
    assert training_labels(records, CrossEncoderConfig(base_model="x", soft_labels=False)) == [2, 0]
    assert training_labels(records, CrossEncoderConfig(base_model="x")) == [[0.1, 0.2, 0.6, 0.1], [1.0, 0.0, 0.0, 0.0]]
    regression = training_labels(records, CrossEncoderConfig(base_model="x", objective="regression"))
    assert regression == pytest.approx([(0.2 + 1.2 + 0.3) / 3, 0.0])
    with pytest.raises(ValueError, match="objective"):
        CrossEncoderConfig(base_model="x", objective="ranking")


def test_class_balance_weights_each_grade_by_its_inverse_frequency():
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder

    model = CrossEncoder(bundled_minilm_path(), num_labels=4, max_length=64)
    records = RECORDS[:3] + [{**RECORDS[2], "doc_id": f"x{i}"} for i in range(5)]  # grades 3, 2, then six 0s
    loss = cross_encoder_loss(model, records, CrossEncoderConfig(class_balance=True))
    grades = torch.tensor([r["grade"] for r in records])
    weights = torch.tensor([8 / (4 * 6), 1.0, 8 / 4, 8 / 4])  # n / (4 * count); grade 1 absent counts as 1
    with torch.no_grad():
        logits = model.model(
            **model.tokenizer(
                [r["query"] for r in records], [r["document"] for r in records], padding=True, return_tensors="pt"
            )
        ).logits
        balanced = loss([[r["query"] for r in records], [r["document"] for r in records]], grades)
        plain = cross_encoder_loss(model, records, CrossEncoderConfig())(
            [[r["query"] for r in records], [r["document"] for r in records]], grades
        )
    per_pair = torch.nn.functional.cross_entropy(logits, grades, reduction="none")
    assert balanced.item() == pytest.approx(
        ((weights[grades] * per_pair).sum() / weights[grades].sum()).item(), rel=1e-4
    )
    assert plain.item() == pytest.approx(per_pair.mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="class_balance weights the grades of the classification objective"):
        CrossEncoderConfig(base_model="x", objective="regression", class_balance=True)


def test_load_labeler_dispatches_the_causal_family(tiny_model_dir, tmp_path):
    assert type(load_labeler(tiny_model_dir, max_length=128)) is StudentLabeler
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_model_dir, legacy)
    (legacy / LABELER_MANIFEST).write_text(json.dumps({"base_model": str(tiny_model_dir), "max_length": 128}))
    assert type(load_labeler(legacy)) is StudentLabeler  # a manifest without "family" is a causal LM
    assert type(load_labeler(tiny_model_dir, family="causal_lm")) is StudentLabeler
    with pytest.raises(ValueError, match="family"):
        load_labeler(tiny_model_dir, family="seq2seq")


def test_share_matching_thresholds_give_the_reference_grade_mix():
    from labeler_utils.students.base import grades_at_thresholds, share_matching_thresholds

    scores = np.random.default_rng(0).normal(size=1000)
    thresholds = share_matching_thresholds(scores, [500, 200, 200, 100])
    assert np.all(np.diff(thresholds) > 0)
    assert np.bincount(grades_at_thresholds(scores, thresholds), minlength=4).tolist() == [500, 200, 200, 100]
    assert grades_at_thresholds([-9.0, 9.0], thresholds).tolist() == [0, 3]  # higher score, higher grade
    with pytest.raises(ValueError, match="4 counts"):
        share_matching_thresholds(scores, [1, 2, 3])


def test_cosine_baseline_reproduces_the_teacher_grade_shares_on_its_training_pairs():
    from labeler_utils.students.bi_encoder import CosineBaseline

    baseline = CosineBaseline.fit(RECORDS)
    rows = baseline.label_records(RECORDS, "cosine", progress=False)
    assert sorted(r["grade"] for r in rows) == sorted(r["grade"] for r in RECORDS)  # quantile cut points
    assert [(r["query_id"], r["doc_id"]) for r in rows] == [(r["query_id"], r["doc_id"]) for r in RECORDS]
    relevant = [r["expected_relevance"] for r, record in zip(rows, RECORDS) if record["grade"] == 3]
    unrelated = [r["expected_relevance"] for r, record in zip(rows, RECORDS) if record["grade"] == 0]
    assert min(relevant) > max(unrelated)  # the pretrained encoder alone ranks these obvious pairs
    with pytest.raises(ValueError, match="No training records"):
        CosineBaseline.fit([])


def test_throughput_times_a_cross_encoder_beside_the_causal_student(labeler, tiny_model_dir):
    import torch

    from labeler_utils import throughput as tp

    pairs = [(r["query"], r["document"]) for r in RECORDS]
    student = tp.load_student(tiny_model_dir, max_length=256)
    measurements, extras = tp.run_all(
        pairs,
        student,
        batch_sizes=[4],
        teacher_pairs=[],
        naive_pairs=pairs[:1],
        variants=["bfloat16"],
        other_students=[("minilm", labeler)],
        log=lambda _: None,
    )
    kinds = [(m.kind, m.variant) for m in measurements]
    assert kinds == [
        ("naive_generate", None),
        ("single_pass", None),
        ("single_pass", "bfloat16"),
        ("single_pass_other", None),
        ("single_pass_other", "bfloat16"),
    ]
    other = measurements[3]
    assert other.prompt_tokens_per_pair == pytest.approx(
        sum(len(labeler.encode_pair(q, d)[0]) for q, d in pairs) / len(pairs)
    )
    assert extras["variant_agreement"]["minilm bfloat16"]["grade_agreement"] >= 0.75
    assert next(labeler.model.parameters()).dtype == torch.float32  # the bfloat16 copy left the original alone
    summary = tp.summarize_throughput(measurements, tp.machine_info(), {})
    assert summary["other_students"]["minilm"]["labels_per_second"] == max(
        m.labels_per_second for m in measurements[3:]
    )
    ce_only, ce_extras = tp.run_all(
        pairs, labeler, batch_sizes=[4], teacher_pairs=[], variants=["prefix_cache", "int8"], log=lambda _: None
    )
    # no generate() and no prompt-prefix cache for an encoder; int8 applies to every linear layer of a copy
    assert [(m.kind, m.variant) for m in ce_only] == [("single_pass", None), ("single_pass", "int8")]
    assert ce_extras["variant_agreement"]["int8"]["grade_agreement"] >= 0.75
    assert not any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in labeler.model.modules())


def test_int8_quantizes_every_linear_layer_of_an_encoder_copy_and_keeps_its_grades():
    """The bi-encoder (and its untrained cosine) as int8 copies: weights int8, the original float, grades kept."""
    import torch

    from labeler_utils import throughput as tp
    from labeler_utils.students.bi_encoder import CosineBaseline

    baseline = CosineBaseline.fit(RECORDS)
    quantized = tp.quantize_int8(baseline)
    linear = (torch.nn.Linear, torch.ao.nn.quantized.dynamic.Linear)
    kinds = {type(m) for m in quantized.transformer().modules() if isinstance(m, linear)}
    assert kinds == {torch.ao.nn.quantized.dynamic.Linear}
    assert {type(m) for m in baseline.transformer().modules() if isinstance(m, linear)} == {torch.nn.Linear}
    plain, int8 = (b.label_records(RECORDS, progress=False) for b in (baseline, quantized))
    assert sum(a["grade"] == b["grade"] for a, b in zip(plain, int8)) >= 0.75 * len(RECORDS)
    cosines = [[row["expected_relevance"] for row in rows] for rows in (plain, int8)]  # 3 * (cos + 1) / 2
    assert np.corrcoef(*cosines)[0, 1] > 0.95 and cosines[0] != cosines[1]


def test_distilled_student_finds_the_most_recently_trained_of_both_families(tmp_path):
    import os

    from labeler_utils.students.registry import distilled_student

    assert distilled_student(tmp_path) is None
    for name, when in (("adapter", 1_000), ("model", 2_000)):
        (tmp_path / name).mkdir()
        (tmp_path / name / LABELER_MANIFEST).write_text("{}")
        os.utime(tmp_path / name / LABELER_MANIFEST, (when, when))
    assert distilled_student(tmp_path) == tmp_path / "model"
    os.utime(tmp_path / "adapter" / LABELER_MANIFEST, (3_000, 3_000))
    assert distilled_student(tmp_path) == tmp_path / "adapter"
    assert distilled_student(tmp_path / "model") == tmp_path / "model"


def test_a_causal_lm_name_for_the_cross_encoder_is_refused_clearly():
    with pytest.raises(ValueError, match="bundled causal LM: train it with student_family='causal_lm'"):
        CrossEncoderConfig(base_model="smollm2-135m-instruct")


def test_ordinal_targets_are_the_probabilities_of_exceeding_each_grade():
    records = [{"grade": 2, "distribution": [0.1, 0.2, 0.6, 0.1]}, {"grade": 0}, {"grade": 3}]
    ordinal = training_labels(records, CrossEncoderConfig(base_model="x", objective="ordinal"))
    np.testing.assert_allclose(ordinal, [[0.9, 0.7, 0.1], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    hard = training_labels(records, CrossEncoderConfig(base_model="x", objective="ordinal", soft_labels=False))
    np.testing.assert_allclose(hard, [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])


def test_ordinal_loss_is_the_mean_binary_cross_entropy_of_the_cumulative_logits():
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder

    model = CrossEncoder(bundled_minilm_path(), num_labels=3, max_length=64)
    records = RECORDS[:4]
    config = CrossEncoderConfig(objective="ordinal")
    targets = torch.tensor(training_labels(records, config))
    loss = cross_encoder_loss(model, records, config)(
        [[r["query"] for r in records], [r["document"] for r in records]], list(targets)
    )
    logits = torch.tensor(
        model.predict([(r["query"], r["document"]) for r in records], activation_fn=torch.nn.Identity())
    )
    by_hand = -(
        targets * torch.nn.functional.logsigmoid(logits) + (1 - targets) * torch.nn.functional.logsigmoid(-logits)
    )
    assert loss.item() == pytest.approx(by_hand.mean().item(), rel=1e-4)


def test_cumulative_probabilities_give_a_distribution_even_when_not_monotone():
    import torch

    from labeler_utils.students.cross_encoder import cumulative_distribution

    probabilities = cumulative_distribution(torch.tensor([[0.9, 0.5, 0.2], [0.3, 0.6, 0.1]]))
    assert probabilities[0].tolist() == pytest.approx([0.1, 0.4, 0.3, 0.2])
    assert probabilities[1].tolist() == pytest.approx([0.7, 0.0, 0.2, 0.1])  # 0.6 capped at 0.3 (cumulative minimum)
    assert torch.all(probabilities >= 0) and torch.allclose(probabilities.sum(-1), torch.ones(2))


def test_ordinal_head_trains_and_labels_through_the_shared_interface(tmp_path):
    manifest = train_cross_encoder(
        RECORDS,
        tmp_path,
        CrossEncoderConfig(objective="ordinal", max_steps=2, batch_size=4, max_length=64, logging_steps=1),
    )
    assert manifest["method"] == "cross-encoder-ordinal"
    labeler = load_labeler(tmp_path)
    assert labeler.objective == "ordinal"
    rows = labeler.label_records(RECORDS, "ordinal", progress=False)
    assert all(
        math.isclose(sum(r["distribution"]), 1.0, abs_tol=1e-6) and 0 <= r["expected_relevance"] <= 3 for r in rows
    )
    assert [r["grade"] for r in rows] == [int(np.argmax(r["distribution"])) for r in rows]


def test_a_family_loads_a_student_from_its_training_output_folder(tiny_model_dir, tmp_path):
    from labeler_utils.students.causal_lm.train import DistillConfig, train_student
    from labeler_utils.students.registry import get_family

    records = [{**r, "grade": r["grade"]} for r in RECORDS]
    train_student(
        records,
        tmp_path,
        DistillConfig(base_model=str(tiny_model_dir), max_steps=1, batch_size=4, max_length=128, logging_steps=1),
    )
    labeler = get_family("causal_lm").load(tmp_path)  # the folder above adapter/
    assert isinstance(labeler, StudentLabeler) and labeler.max_length == 128


@pytest.mark.parametrize("family", ["bi_encoder", "cross_encoder"])
def test_a_killed_encoder_training_resumes_from_its_checkpoint_to_the_same_weights(family, tmp_path):
    """Both encoder families checkpoint with ``save_steps``; a rerun after a kill resumes the very same training."""
    from safetensors.torch import load_file

    from labeler_utils.students import bi_encoder, cross_encoder

    module = bi_encoder if family == "bi_encoder" else cross_encoder
    config_class = bi_encoder.BiEncoderConfig if family == "bi_encoder" else CrossEncoderConfig
    train = bi_encoder.train_bi_encoder if family == "bi_encoder" else train_cross_encoder
    config = config_class(max_steps=4, batch_size=4, max_length=64, learning_rate=1e-4, save_steps=2)
    whole = train(RECORDS, tmp_path / "whole", config)
    checkpoints = tmp_path / "whole" / "checkpoints"
    assert whole["resumed_from"] is None and whole["global_steps"] == 4
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    killed = tmp_path / "killed" / "checkpoints"  # as if the run had been killed between steps 2 and 4
    shutil.copytree(checkpoints / "checkpoint-2", killed / "checkpoint-2")
    shutil.copy(checkpoints / "training_fingerprint.txt", killed)
    resumed = train(RECORDS, tmp_path / "killed", config)
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_steps"] == 4

    def weights(folder: Path) -> dict:
        (path,) = folder.rglob("model.safetensors")
        return {name: tensor.numpy() for name, tensor in load_file(path).items()}

    expected, got = (weights(tmp_path / run / module.MODEL_SUBDIR) for run in ("whole", "killed"))
    at_step_2 = weights(killed / "checkpoint-2")
    assert expected.keys() == got.keys() == at_step_2.keys()
    assert all(np.allclose(expected[name], got[name], atol=1e-6) for name in expected)
    assert any(not np.allclose(expected[name], at_step_2[name], atol=1e-6) for name in expected)  # steps 3-4 ran
    with pytest.raises(ValueError, match="checkpoints of another training"):
        train(RECORDS, tmp_path / "killed", config_class(**{**config.__dict__, "learning_rate": 5e-5}))
