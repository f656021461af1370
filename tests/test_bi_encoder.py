"""The bi-encoder student family: its losses, query batches, thresholds and the shared labeler interface."""

from __future__ import annotations

import math
import os
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from labeler_utils.students import bi_encoder as be
from labeler_utils.students.base import LABELER_MANIFEST, grades_at_thresholds
from labeler_utils.students.registry import distilled_student, get_family, load_labeler

TOPICS = {
    "vpn error": [
        "The VPN gateway returns error 809 when the tunnel times out; restart the client.",
        "VPN clients reconnect after a timeout.",
        "The cafeteria serves pizza on Fridays.",
        "Printer toner is in room 4.",
    ],
    "travel policy": [
        "Employees book flights through the travel portal; economy class under six hours.",
        "Travel must be approved by a manager.",
        "The parking garage closes at 10 pm.",
        "Lunch menus change weekly.",
    ],
    "expense report": [
        "Submit the expense report with receipts within 30 days of the trip.",
        "Receipts are scanned in the finance app.",
        "The gym opens at 6 am.",
        "Wi-Fi password is on the wall.",
    ],
}
RECORDS = [
    {"query_id": f"q{qi}", "query": query, "doc_id": f"q{qi}-d{di}", "document": doc, "grade": 3 - di}
    for qi, (query, docs) in enumerate(TOPICS.items())
    for di, doc in enumerate(docs)
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A bi-encoder trained under the usual umask 022."""
    folder = tmp_path_factory.mktemp("bi_encoder")
    config = be.BiEncoderConfig(max_steps=3, batch_size=4, max_length=64, logging_steps=1)
    umask = os.umask(0o022)
    try:
        return folder, be.train_bi_encoder(RECORDS, folder, config, {"note": "test"})
    finally:
        os.umask(umask)


def test_cosent_loss_equals_the_hand_computed_formula():
    """CoSENT: log(1 + sum over pairs (i, j) with y_i > y_j of exp(scale * (cos_j - cos_i)))."""
    model = be.SentenceTransformer(be.bundled_minilm_path(), device="cpu")
    loss = be.bi_encoder_loss(model, "cosent")
    torch.manual_seed(0)
    queries, documents = torch.randn(4, 8), torch.randn(4, 8)
    targets = torch.tensor([1.0, 0.0, 2 / 3, 1 / 3])
    cos = torch.nn.functional.cosine_similarity(queries, documents)
    expected = math.log(
        1 + sum(math.exp(20.0 * (cos[j] - cos[i])) for i in range(4) for j in range(4) if targets[i] > targets[j])
    )
    assert loss.compute_loss_from_embeddings([queries, documents], targets).item() == pytest.approx(expected, rel=1e-5)
    assert isinstance(be.bi_encoder_loss(model, "angle"), be.losses.AnglELoss)
    assert isinstance(be.bi_encoder_loss(model, "cosine_mse"), be.losses.CosineSimilarityLoss)
    with pytest.raises(ValueError, match="loss must be one of"):
        be.BiEncoderConfig(base_model="x", loss="triplet")


def test_query_batches_hold_one_query_each_and_cover_every_pair():
    from datasets import Dataset

    dataset = Dataset.from_dict(
        {"query": [r["query"] for r in RECORDS] * 2, "document": ["d"] * 24, "score": [0.0] * 24}
    )
    sampler = be.QueryBatchSampler(dataset, batch_size=3, drop_last=False, seed=1)
    batches = list(sampler)
    assert all(len({dataset["query"][i] for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(24))
    assert len(batches) == len(sampler) == 3 * math.ceil(8 / 3)


def test_targets_are_the_expected_grade_over_three():
    soft = {**RECORDS[0], "distribution": [0.0, 0.0, 0.5, 0.5]}
    assert be.training_targets([RECORDS[0], RECORDS[3], soft], soft_labels=True) == pytest.approx([1.0, 0.0, 2.5 / 3])
    assert be.training_targets([soft], soft_labels=False) == pytest.approx([1.0])


def test_expected_relevance_maps_the_cut_points_to_the_half_grades():
    thresholds = [0.1, 0.3, 0.5]
    values = np.array([-1.0, 0.1, 0.3, 0.5, 1.0, 0.2, 0.4])
    assert be.expected_from_cosine(values, thresholds).tolist() == pytest.approx([0, 0.5, 1.5, 2.5, 3, 1.0, 2.0])
    grid = np.linspace(-1, 1, 201)
    assert np.all(np.diff(be.expected_from_cosine(grid, thresholds)) >= 0)  # ranking by it is ranking by cosine


def test_training_writes_the_family_thresholds_and_a_loadable_student(trained):
    folder, manifest = trained
    assert manifest["family"] == "bi_encoder" and manifest["train_examples"] == len(RECORDS)
    assert manifest["global_steps"] == 3 and len(manifest["thresholds"]) == 3
    assert distilled_student(folder) == folder / be.MODEL_SUBDIR
    assert (folder / be.MODEL_SUBDIR / LABELER_MANIFEST).exists()
    # every file follows the umask, the weights too (safetensors writes 0600): another user may read the student
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (folder / be.MODEL_SUBDIR).rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
    labeler = load_labeler(folder)
    assert isinstance(labeler, be.BiEncoderLabeler) and labeler.max_length == 64
    # the cut points reproduce the teacher's grade shares (3 pairs of each grade) on the training pairs
    values = be.cosines(labeler.model, [r["query"] for r in RECORDS], [r["document"] for r in RECORDS])
    assert Counter(grades_at_thresholds(values, labeler.thresholds).tolist()) == {0: 3, 1: 3, 2: 3, 3: 3}


def test_labels_through_the_shared_interface(trained):
    labeler = load_labeler(trained[0])
    rows = labeler.label_records(RECORDS, labeler="bi", batch_size=5, progress=False)
    values = be.cosines(labeler.model, [r["query"] for r in RECORDS], [r["document"] for r in RECORDS])
    assert [r["doc_id"] for r in rows] == [r["doc_id"] for r in RECORDS]
    assert [r["grade"] for r in rows] == grades_at_thresholds(values, labeler.thresholds).tolist()
    assert all(math.isclose(sum(r["distribution"]), 1.0) for r in rows)
    assert np.corrcoef([r["expected_relevance"] for r in rows], values)[0, 1] > 0.9
    again = labeler.label_records(RECORDS, labeler="bi", batch_size=2, progress=False)
    assert [r["grade"] for r in again] == [r["grade"] for r in rows]  # batching does not change a label


def test_the_family_is_one_registration():
    family = get_family("bi_encoder")
    assert family.labeler_class is be.BiEncoderLabeler and family.config_class is be.BiEncoderConfig
    config = family.make_config({"epochs": 1.0}, where_defined={"soft_labels": False, "bf16": True})
    assert config.soft_labels is False and config.epochs == 1.0  # bf16 is not a bi-encoder setting: left out
    with pytest.raises(ValueError, match="has no setting"):
        family.make_config({"prompt_format": "query-document"})
    baseline = family.zero_shot(RECORDS, config)
    assert isinstance(baseline, be.CosineBaseline)


def test_an_untrained_encoder_folder_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="not a trained bi-encoder"):
        be.BiEncoderLabeler.load(tmp_path)


def test_epoch_losses_average_the_logged_losses_of_each_epoch():
    from labeler_utils.students.base import epoch_losses

    history = [
        {"loss": 4.0, "epoch": 0.5, "step": 1},
        {"loss": 2.0, "epoch": 1.0, "step": 2},
        {"loss": 1.0, "epoch": 1.5, "step": 3},
        {"loss": 0.0, "epoch": 2.0, "step": 4},
        {"train_runtime": 1.0},
    ]
    assert epoch_losses(history) == [3.0, 0.5]
