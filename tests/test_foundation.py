"""Config, artifacts, documents, model resolution and the pipeline report."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
import sys

import pytest

from labeler_utils.core import config
from labeler_utils.core.artifacts import InputError, atomic_write, read_json, read_jsonl, write_json, write_jsonl
from labeler_utils.core.models import BUNDLED_MODELS, resolve_model, server_gguf_path
from labeler_utils.documents import (
    Document,
    document_card,
    load_corpus,
    parse_document,
    read_documents,
    save_documents,
    select_documents,
)
from labeler_utils.pipeline import record_metrics, render_report, stage_metrics

DOC = """---
title: VPN Timeout Runbook
author: Ana Silva
date: 2025-03-14
doc_type: runbook
department: IT
---
When the VPN client times out after 30 seconds, restart the gateway service and check the certificate.
"""


def test_profiles_and_overrides():
    smoke = config.get_profile("smoke", max_train_steps=3)
    assert smoke.max_train_steps == 3 and smoke.name == "smoke"
    assert config.get_profile("smoke", batch_size=None).batch_size == config.PROFILES["smoke"].batch_size
    with pytest.raises(ValueError, match="Unknown profile 'tiny'"):
        config.get_profile("tiny")
    with pytest.raises(ValueError, match="Unknown profile fields"):
        config.get_profile("smoke", epochs=2)


def without_cuda(tmp_path) -> dict[str, str]:
    """The environment of a subprocess that sees no CUDA GPU and writes runs under ``tmp_path``."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "LABELER_RUNS_DIR": str(tmp_path / "runs")}


def test_the_gpu_profile_is_refused_on_a_machine_without_cuda_naming_the_cpu_profiles(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "labeler_utils", "pipeline", "--profile", "gpu", "--run-id", "refused"],
        capture_output=True,
        text=True,
        timeout=300,
        env=without_cuda(tmp_path),
    )
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "--profile smoke" in done.stderr, done.stderr
    assert "CUDA GPU" in done.stderr and not (tmp_path / "runs").exists()  # refused before any work


def test_the_gpu_device_check_refuses_to_run_without_cuda(tmp_path):
    script = config.PROJECT_ROOT / "bench" / "gpu_device_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "check")],
        capture_output=True,
        text=True,
        timeout=300,
        env=without_cuda(tmp_path),
    )
    assert done.returncode == 2 and done.stdout == "" and not (tmp_path / "check").exists()
    assert done.stderr.startswith("error: no CUDA GPU is visible") and "--cpu-rehearsal" in done.stderr


def test_stage_05_trains_the_papers_qlora_student_when_a_gpu_is_present(monkeypatch):
    import torch

    from labeler_utils.students.registry import stage_student

    full, smoke, gpu = (config.get_profile(name) for name in ("full", "smoke", "gpu"))
    assert gpu.student_family == "causal_lm" and gpu.student_model == config.GPU_STUDENT_MODEL and gpu.needs_cuda
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [(f.name, m) for f, m in map(stage_student, (full, gpu))] == [
        ("bi_encoder", None),
        ("causal_lm", gpu.student_model),
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    chosen = {name: stage_student(profile) for name, profile in (("full", full), ("smoke", smoke))}
    assert {name: (f.name, m) for name, (f, m) in chosen.items()} == {
        "full": ("causal_lm", config.GPU_STUDENT_MODEL),
        "smoke": ("causal_lm", smoke.student_model),  # the bundled model: a pipeline check downloads nothing
    }
    family, model = stage_student(full, "bi_encoder")
    assert (family.name, model) == ("bi_encoder", None)  # a family given is kept
    family, model = stage_student(full, "causal_lm", "my/model")
    assert (family.name, model) == ("causal_lm", "my/model")


def test_run_and_stage_folders(tmp_path):
    run = config.run_dir(tmp_path / "r1")
    assert config.stage_dir(run, "04_teacher_labels").is_dir()
    with pytest.raises(ValueError, match="Unknown stage"):
        config.stage_dir(run, "99_magic")
    with pytest.raises(FileNotFoundError, match="run notebook 03_hard_negatives.ipynb"):
        config.require_artifact(run, "03_hard_negatives", "pairs.jsonl")


def test_jsonl_round_trip_and_line_precise_errors(tmp_path):
    path = tmp_path / "a.jsonl"
    assert write_jsonl(path, [{"a": 1}, {"a": 2, "b": "é"}]) == 2
    assert read_jsonl(path, required=("a",)) == [{"a": 1}, {"a": 2, "b": "é"}]
    path.write_text('{"a": 1}\n\n{"b": 2}\n')
    with pytest.raises(InputError, match=r"a.jsonl:3: missing or empty field\(s\) \['a'\]"):
        read_jsonl(path, required=("a",))
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(InputError, match="a.jsonl:2: expected a JSON object"):
        read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(InputError, match="a.jsonl:2: not valid UTF-8"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")


def test_atomic_write_leaves_the_old_file_on_a_crash(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(path) as handle:
            handle.write('{"v": 2')
            raise RuntimeError("crash mid-write")
    assert read_json(path) == {"v": 1} and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_write_gives_the_mode_the_umask_allows(umask, tmp_path):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "manifest.json", {"v": 1})
        with atomic_write(tmp_path / "weights.bin", "wb") as handle:
            handle.write(b"\0")
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {
        "manifest.json": 0o666 & ~umask,
        "weights.bin": 0o666 & ~umask,
    }


def test_a_full_disk_names_the_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(fd: int) -> None:  # error path only: a real full disk is not portable in a test
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as failure:
        write_json(tmp_path / "labels.json", {"v": 1})
    assert (failure.value.errno, failure.value.filename) == (errno.ENOSPC, str(tmp_path / "labels.json"))
    assert list(tmp_path.iterdir()) == []


def test_importing_peft_prints_no_bitsandbytes_kernels_notice():
    """peft imports bitsandbytes even when no 4-bit model is used; its notice about ``kernels`` is dropped."""
    done = subprocess.run(
        [sys.executable, "-c", "import labeler_utils, peft"], capture_output=True, text=True, timeout=300, check=True
    )
    assert "kernels" not in done.stderr, done.stderr


def test_parse_document_takes_metadata_from_front_matter_and_path():
    doc = parse_document(DOC, "it/runbooks/vpn-timeout.md", "corpus/it/runbooks/vpn-timeout.md")
    assert (doc.title, doc.author, doc.date, doc.doc_type) == (
        "VPN Timeout Runbook",
        "Ana Silva",
        "2025-03-14",
        "runbook",
    )
    assert (doc.file_name, doc.path, doc.metadata) == ("vpn-timeout.md", "it/runbooks", {"department": "IT"})
    card = document_card(doc)
    assert card.startswith("Title: VPN Timeout Runbook\nFile: it/runbooks/vpn-timeout.md\nAuthor: Ana Silva")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("---\ntitle: x\n---\n", "body is empty"),
        ("---\ntitle: [unclosed\n---\n" + "body " * 20, "front matter is not valid YAML"),
        ("---\ntitle: x\n" + "body " * 20, "never closes"),
        ("---\n- a\n- b\n---\n" + "body " * 20, "must be a mapping"),
    ],
)
def test_bad_documents_fail_naming_the_file(tmp_path, text, message):
    (tmp_path / "bad.md").write_text(text)
    with pytest.raises(InputError, match=f"bad.md.*{message}"):
        load_corpus(tmp_path)


def test_corpus_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_corpus(tmp_path / "nowhere")
    with pytest.raises(InputError, match="no documents"):
        load_corpus(tmp_path)
    (tmp_path / "latin1.md").write_bytes("caf\xe9 ".encode("latin-1") * 20)
    with pytest.raises(InputError, match="latin1.md: not valid UTF-8"):
        load_corpus(tmp_path)


def test_demo_corpus_round_trip_and_selection(tmp_path):
    documents = load_corpus(config.DEMO_CORPUS_DIR)
    assert len(documents) >= 60 and len({d.doc_type for d in documents}) >= 6
    save_documents(documents, tmp_path / "documents.jsonl")
    assert read_documents(tmp_path / "documents.jsonl") == documents
    chosen = select_documents(documents, 12)
    assert len(chosen) == 12 and len({d.doc_type for d in chosen}) >= 6
    assert select_documents(documents, 12) == chosen


def test_select_documents_round_robin():
    docs = [Document(f"{t}{i}", "t", "x" * 50, doc_type=t) for t in "ab" for i in range(3)]
    assert [d.doc_id for d in select_documents(docs, 3)] == ["a0", "a1", "b0"]


def test_model_resolution(tmp_path):
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError):
        resolve_model(tmp_path / "missing.gguf")
    assert server_gguf_path("smollm2-135m-instruct").suffix == ".gguf"
    assert set(BUNDLED_MODELS) == {"smollm2-135m-instruct", "gemma3-270m"}


def test_the_server_gets_a_float16_copy_of_a_bundled_gguf_made_once(tmp_path):
    import gguf

    from labeler_utils.core.models import bundled_gguf_path, float16_gguf

    source = bundled_gguf_path("smollm2-135m-instruct")
    copy = float16_gguf(source, tmp_path / "copy.f16.gguf")
    original, converted = gguf.GGUFReader(source), gguf.GGUFReader(copy)
    assert sorted(t.name for t in converted.tensors) == sorted(t.name for t in original.tensors)
    assert {t.tensor_type.name for t in original.tensors} == {"F32", "Q4_1", "Q8_0"}
    assert {t.tensor_type.name for t in converted.tensors} == {"F32", "F16"}  # every 4- and 8-bit tensor dequantized
    written = copy.stat().st_mtime_ns
    assert float16_gguf(source, copy) == copy and copy.stat().st_mtime_ns == written  # made once
    assert list(tmp_path.iterdir()) == [copy]  # no partial file left
    assert server_gguf_path("smollm2-135m-instruct") == config.CACHE_DIR / "gguf" / "smollm2-135m-instruct.f16.gguf"


def test_bundled_model_converts_to_a_loadable_folder():
    folder = resolve_model("smollm2-135m-instruct")
    assert json.loads((config.CACHE_DIR / "models" / "smollm2-135m-instruct" / "config.json").read_text())
    assert folder.endswith("smollm2-135m-instruct")


def test_pipeline_report_lists_stages_and_metrics(tmp_path):
    record_metrics(tmp_path, "05_distill", {"train_loss": 0.5, "method": "lora", "history": [1, 2]})
    assert stage_metrics(tmp_path, "05_distill")["method"] == "lora"
    report = render_report(
        {
            "profile": "smoke",
            "run_dir": str(tmp_path),
            "machine": "test",
            "total_seconds": 3.0,
            "seconds": {"05_distill": 3.0},
            "metrics": {"05_distill": stage_metrics(tmp_path, "05_distill")},
        }
    )
    assert "| 05_distill | 3 | train_loss=0.500, method=lora |" in report


def test_pipeline_report_says_what_the_agreement_figures_mean(tmp_path):
    run = config.PROJECT_ROOT / "runs" / "smoke-test"
    report = render_report(
        {
            "profile": "smoke",
            "run_dir": str(run),
            "machine": "test",
            "total_seconds": 3.0,
            "seconds": {"06_evaluate": 3.0},
            "metrics": {"06_evaluate": {"teacher qwk": 0.1}},
        }
    )
    assert "exercise the pipeline" in report and "not how good the labels are" in report
    link = re.search(
        r"\[Reproducing the central claim[^\]]*\]\(([^)#]+)#reproducing-the-central-claim-on-97-trec-dl-queries-2019--2020\)",
        report,
    )
    assert link and (run / link.group(1)).resolve() == config.PROJECT_ROOT / "docs" / "reproduction.md"
    assert (
        "## Reproducing the central claim on 97 TREC DL queries (2019 + 2020)"
        in (config.PROJECT_ROOT / "docs" / "reproduction.md").read_text()
    )
