"""Adapting to a new domain: document loaders, chunking, the pipeline config file and parameter routing."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from labeler_utils.__main__ import main
from labeler_utils.core.artifacts import InputError
from labeler_utils.core.config import STAGES
from labeler_utils.documents import (
    DOCUMENT_SUFFIXES,
    ChunkPolicy,
    Document,
    chunk_documents,
    chunk_text,
    document_table,
    load_corpus,
    plot_chunk_lengths,
    plot_corpus,
)
from labeler_utils.domain import ConfigError, declared_parameters, load_pipeline_config, route_parameters
from labeler_utils.hard_negatives import document_groups, source_id

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "domain_corpus"
PROJECT_ROOT = Path(__file__).parent.parent


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> dict[str, Document]:
    return {doc.doc_id: doc for doc in load_corpus(CORPUS, DOCUMENT_SUFFIXES)}


def test_default_suffixes_still_load_only_markdown_and_text():
    assert [d.doc_id for d in load_corpus(CORPUS)] == ["wiki/it/reset-badge-pin.md", "wiki/meeting-room-etiquette.txt"]


def test_markdown_front_matter_and_text_file_metadata(corpus):
    md = corpus["wiki/it/reset-badge-pin.md"]
    assert (md.title, md.author, md.date, md.doc_type) == (
        "Reset your door badge PIN",
        "Noor Haddad",
        "2025-03-14",
        "wiki_howto",
    )
    assert (md.file_name, md.path, md.metadata) == ("reset-badge-pin.md", "wiki/it", {"department": "Facilities"})
    txt = corpus["wiki/meeting-room-etiquette.txt"]
    assert (txt.title, txt.path, txt.author) == ("meeting room etiquette", "wiki", "")  # title from the file name


def test_html_title_meta_and_visible_text_only(corpus):
    page = corpus["wiki/it/printer-setup.html"]
    assert (page.title, page.author, page.date, page.doc_type) == (
        "Printer set-up & scanning",
        "Ivo Petrov",
        "2024-11-02",
        "wiki_howto",
    )
    assert page.text.split("\n\n") == [
        "Printer set-up",
        "Add the printer FLOOR2-MFP from the Software Centre; the driver installs itself.",
        "Scan to e-mail: press Scan, then your badge.",
        "Toner: call extension 4410.",
    ]
    assert "tracking" not in page.text and "font-family" not in page.text and "JavaScript" not in page.text


def test_json_object_list_and_jsonl_records(corpus):
    single = corpus["exports/holiday-policy.json"]
    assert (single.title, single.author, single.date, single.metadata) == (
        "Holiday policy 2025",
        "Mina Kovacs",
        "2025-01-06",
        {"department": "HR"},
    )
    assert corpus["exports/faq.json#vpn"].text.startswith("Update the VPN client")  # body field, id field
    assert corpus["exports/faq.json#2"].title == "Expense receipts"  # no id: its position
    ticket = corpus["exports/tickets.jsonl#INC-102"]  # a blank line before it changes nothing
    assert (ticket.file_name, ticket.path, ticket.metadata) == ("tickets.jsonl", "exports", {"priority": "P3"})
    assert len(corpus) == 8


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.json", '{"title": "x",\n "text": }', r"bad.json:2: not valid JSON"),
        ("records.jsonl", '{"title": "no text here"}\n', r"records.jsonl \[record 1\]: needs a string field 'text'"),
        ("short.json", '{"title": "t", "text": "too short"}', "shorter than 40 characters"),
        ("twice.jsonl", ('{"id": "a", "text": "' + "long enough text " * 4 + '"}\n') * 2, "id 'a' is already used"),
        ("latin1.html", b"<title>caf\xe9</title><p>" + b"menu " * 20, "not valid UTF-8"),
    ],
)
def test_bad_files_name_the_file_and_place(name, content, message, tmp_path):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError, match=message):
        load_corpus(tmp_path, DOCUMENT_SUFFIXES)


def test_unsupported_suffix_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"Cannot read \['.xlsx'\]"):
        load_corpus(CORPUS, (".md", ".xlsx"))


def _pdf_bytes(text: str, title: str, author: str) -> bytes:
    """A one-page PDF with a text layer (Helvetica), written by hand: no PDF writer library needed."""
    content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        f"<< /Title ({title}) /Author ({author}) /CreationDate (D:20250203120000Z) >>".encode(),
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R /Info 6 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.mark.skipif(
    importlib.util.find_spec("pypdf") is None, reason="pypdf (optional extra 'documents') is not installed"
)
def test_pdf_text_layer_and_metadata(tmp_path):
    (tmp_path / "policies").mkdir()
    text = "Visitors must sign in at reception and wear a visitor badge at all times."
    (tmp_path / "policies" / "visitors.pdf").write_bytes(_pdf_bytes(text, "Visitor policy", "Ana Silva"))
    [doc] = load_corpus(tmp_path, (".pdf",))
    assert (doc.doc_id, doc.title, doc.author, doc.date) == (
        "policies/visitors.pdf",
        "Visitor policy",
        "Ana Silva",
        "2025-02-03",
    )
    assert doc.text == text and doc.metadata == {"pages": 1}


@pytest.mark.skipif(
    importlib.util.find_spec("docx") is None, reason="python-docx (optional extra 'documents') is not installed"
)
def test_docx_paragraphs_tables_and_core_properties(tmp_path):
    import docx

    word = docx.Document()
    word.core_properties.title = "On-call rota"
    word.core_properties.author = "Sam Lee"
    word.core_properties.created = dt.datetime(2025, 4, 1, 9, 30)
    word.core_properties.category = "rota"
    word.add_paragraph("The on-call engineer answers pages within fifteen minutes, day and night.")
    table = word.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text, table.rows[0].cells[1].text = "Week 14", "Sam Lee"
    word.save(tmp_path / "rota.docx")
    [doc] = load_corpus(tmp_path, (".docx",))
    assert (doc.title, doc.author, doc.date, doc.doc_type) == ("On-call rota", "Sam Lee", "2025-04-01", "rota")
    assert doc.text.split("\n\n") == [
        "The on-call engineer answers pages within fifteen minutes, day and night.",
        "Week 14 | Sam Lee",
    ]


@pytest.mark.parametrize(
    ("suffix", "module", "package"), [(".pdf", "pypdf", "pypdf"), (".docx", "docx", "python-docx")]
)
def test_a_missing_optional_extra_says_how_to_install_it(suffix, module, package, tmp_path, monkeypatch):
    (tmp_path / f"file{suffix}").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    with pytest.raises(
        ModuleNotFoundError, match=rf"pip install 'labeler-utils\[documents\]' \(or pip install {package}\)"
    ):
        load_corpus(tmp_path, (suffix,))


# --------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------


def _paragraphs(*sizes: int) -> str:
    return "\n\n".join(" ".join(f"p{i}w{j}" for j in range(size)) for i, size in enumerate(sizes))


def test_short_documents_are_not_chunked():
    text = _paragraphs(30, 30)
    assert chunk_text(text, ChunkPolicy(max_words=60, overlap_words=10)) == [text]


def test_chunks_pack_paragraphs_up_to_the_limit_with_overlap():
    policy = ChunkPolicy(max_words=50, overlap_words=10)
    chunks = chunk_text(_paragraphs(20, 20, 20, 20, 5), policy)
    words = [c.split() for c in chunks]
    assert all(len(w) <= 50 for w in words)
    assert words[0] == [f"p{i}w{j}" for i in (0, 1) for j in range(20)]  # whole paragraphs, no cut
    for previous, current in zip(words, words[1:]):
        assert current[:10] == previous[-10:]  # the overlap
    covered = {w for chunk in words for w in chunk}
    assert covered == set(_paragraphs(20, 20, 20, 20, 5).split())  # nothing lost


def test_a_paragraph_longer_than_the_limit_is_cut_into_runs_of_words():
    chunks = chunk_text(_paragraphs(130), ChunkPolicy(max_words=50, overlap_words=10))
    assert [len(c.split()) for c in chunks] == [40, 50, 50, 20]  # runs of 40 new words, 10 repeated
    assert " ".join(chunks[-1].split()[-3:]) == "p0w127 p0w128 p0w129"


def test_chunk_ids_are_siblings_for_the_hard_negative_guard():
    long_doc = Document(doc_id="kb/handbook.md", title="Handbook", text=_paragraphs(40, 40, 40), metadata={"a": 1})
    short_doc = Document(doc_id="kb/note.md", title="Note", text=_paragraphs(10))
    chunks = chunk_documents([long_doc, short_doc], ChunkPolicy(max_words=50, overlap_words=5))
    assert [c.doc_id for c in chunks] == [
        "kb/handbook.md#chunk-1",
        "kb/handbook.md#chunk-2",
        "kb/handbook.md#chunk-3",
        "kb/note.md",
    ]
    assert chunks[1].metadata == {"a": 1, "chunk": 2, "chunks": 3, "source_doc_id": "kb/handbook.md"}
    assert chunks[1].title == "Handbook" and {source_id(c.doc_id) for c in chunks[:3]} == {"kb/handbook.md"}
    groups = document_groups([c.doc_id for c in chunks], [])
    assert len({groups[c.doc_id] for c in chunks[:3]}) == 1 and groups["kb/note.md"] != groups[chunks[0].doc_id]


def test_load_corpus_applies_the_chunk_policy():
    docs = load_corpus(PROJECT_ROOT / "data" / "second_domain_corpus", chunking=ChunkPolicy(150, 25))
    assert len(docs) > 27 and all(len(d.text.split()) <= 150 for d in docs)
    assert {source_id(d.doc_id) for d in docs} == {
        d.doc_id for d in load_corpus(PROJECT_ROOT / "data" / "second_domain_corpus")
    }


def test_document_table_adds_file_type_and_length(corpus):
    table = document_table(corpus.values()).set_index("doc_id")
    assert table.loc["wiki/it/reset-badge-pin.md", ["title", "file_type", "words"]].tolist() == [
        corpus["wiki/it/reset-badge-pin.md"].title,
        ".md",
        46,
    ]
    assert table["file_type"].value_counts().to_dict() == {".json": 3, ".jsonl": 2, ".html": 1, ".md": 1, ".txt": 1}
    assert list(document_table([]).columns[-2:]) == ["file_type", "words"]


def test_plot_corpus_counts_types_file_types_and_lengths(corpus):
    types_ax, files_ax, words_ax = plot_corpus(document_table(corpus.values())).axes
    assert [bar.get_width() for bar in types_ax.patches] == [1, 2, 2, 3]  # policy, faq, wiki_howto, (none): ascending
    assert [bar.get_height() for bar in files_ax.patches] == [3, 2, 1, 1, 1]
    assert len(words_ax.patches) == 20 and sum(bar.get_height() for bar in words_ax.patches) == len(corpus)


def test_plot_chunk_lengths_shows_documents_beside_chunks_and_the_limit():
    chunks = chunk_documents(
        [Document("a", "A", _paragraphs(40, 40, 40)), Document("b", "B", _paragraphs(10))],
        ChunkPolicy(max_words=50, overlap_words=5),
    )
    figure = plot_chunk_lengths([120, 10], [len(c.text.split()) for c in chunks], max_words=50)
    (ax,) = figure.axes
    assert len(ax.patches) == 2 * 15
    assert sum(bar.get_height() for bar in ax.patches[:15]) == 2 and sum(b.get_height() for b in ax.patches[15:]) == 4
    assert [line.get_xdata()[0] for line in ax.lines] == [50]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["documents", "chunks", "max_words = 50"]


def test_chunk_policy_is_checked():
    with pytest.raises(ValueError, match="overlap_words < max_words"):
        ChunkPolicy(max_words=20, overlap_words=20)


# --------------------------------------------------------------------------------------------
# Config files and parameter routing
# --------------------------------------------------------------------------------------------

FAKE_PARAMETERS = {
    "00_setup": "run_dir = 'runs/demo'\nprofile = 'smoke'",
    "01_seed_documents": "run_dir = 'x'\nprofile = 'smoke'\ncorpus_dir = None   # None = demo corpus (an '=' papermill skips)",
    "02_query_synthesis": "run_dir = 'x'\nprofile = 'smoke'\ntype_weights = None\npersonas = None\nllm_base_url = None",
    "03_hard_negatives": "run_dir = 'x'\nprofile = 'smoke'\nbenchmark_path = None",
    "04_teacher_labels": "run_dir = 'x'\nprofile = 'smoke'\nllm_base_url = None\nbenchmark_path = None\ncorpus_dir = None",
    "05_distill": "run_dir = 'x'\nprofile = 'smoke'\nstudent_model: str | None = None\nmax_steps = None",
    "06_evaluate": "run_dir = 'x'\nprofile = 'smoke'\nbenchmark_path = None\ncorpus_dir = None",
    "07_throughput_cost": "run_dir = 'x'\nprofile = 'smoke'\nstudent_model = None",
}


@pytest.fixture
def notebooks_dir(tmp_path) -> Path:
    """A notebooks folder whose parameters cells declare FAKE_PARAMETERS."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for stage, source in FAKE_PARAMETERS.items():
        cells = [
            {"cell_type": "markdown", "metadata": {}, "source": ["# x"]},
            {
                "cell_type": "code",
                "metadata": {"tags": ["parameters"]},
                "source": source.splitlines(keepends=True),
                "outputs": [],
                "execution_count": None,
            },
        ]
        (folder / f"{stage}.ipynb").write_text(
            json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5})
        )
    return folder


def write_config(folder: Path, text: str) -> Path:
    path = folder / "configs" / "domain.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_declared_parameters_are_read_even_where_papermill_gives_up(notebooks_dir):
    assert declared_parameters("01_seed_documents", notebooks_dir) == ("run_dir", "profile", "corpus_dir")
    assert declared_parameters("05_distill", notebooks_dir) == ("run_dir", "profile", "student_model", "max_steps")


def test_each_parameter_goes_only_to_the_notebooks_that_declare_it(notebooks_dir):
    routed = route_parameters(
        {"corpus_dir": "/c", "llm_base_url": "http://x", "student_model": "m"},
        STAGES,
        {"05_distill": {"max_steps": 3}},
        notebooks_dir,
    )
    assert routed["00_setup"] == {} and routed["03_hard_negatives"] == {}
    assert routed["01_seed_documents"] == routed["06_evaluate"] == {"corpus_dir": "/c"}
    assert routed["02_query_synthesis"] == {"llm_base_url": "http://x"}
    assert routed["04_teacher_labels"] == {"corpus_dir": "/c", "llm_base_url": "http://x"}
    assert routed["05_distill"] == {"student_model": "m", "max_steps": 3}
    assert routed["07_throughput_cost"] == {"student_model": "m"}


def test_config_file_resolves_paths_from_its_folder_and_routes(notebooks_dir, tmp_path):
    (tmp_path / "docs").mkdir()
    path = write_config(
        tmp_path,
        "profile: full\nrun_id: hospital\ncorpus_dir: ../docs\nbenchmark_path: ir_datasets:x/y\n"
        "stages: [01_seed_documents, 04_teacher_labels]\nnotebooks:\n  05_distill: {max_steps: 2}\n",
    )
    config = load_pipeline_config(path, notebooks_dir=notebooks_dir)
    assert (config.profile, config.run_id, config.stages) == (
        "full",
        "hospital",
        ("01_seed_documents", "04_teacher_labels"),
    )
    assert config.parameters == {"corpus_dir": str((tmp_path / "docs").resolve()), "benchmark_path": "ir_datasets:x/y"}
    routed = config.stage_parameters()
    assert set(routed) == {"01_seed_documents", "04_teacher_labels"}
    assert routed["04_teacher_labels"] == config.parameters


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "corpus_dir: ../docs\ntype_weigths: {keyword: 1}\n",
            "'type_weigths' is not a parameter of any notebook "
            r"\(did you mean 'type_weights'\?\)",
        ),
        ("corpus_dir: ../nowhere\n", "corpus_dir .*nowhere is not a folder"),
        ("profile: huge\n", "profile 'huge' is not one of"),
        ("stages: [01_seed_documents, 08_magic]\n", "stages must be a list of"),
        (
            "notebooks:\n  05_distil: {max_steps: 2}\n",
            r"'05_distil' is not a notebook of the pipeline \(did you mean '05_distill'",
        ),
        ("notebooks:\n  05_distill: {corpus_dir: x}\n", "'corpus_dir' is not a parameter of notebook 05_distill"),
        ("run_dir: runs/x\n", "'run_dir' is set by the pipeline"),
        ("corpus_dir: [unclosed\n", "not valid YAML"),
        ("- a list\n", "must be a mapping"),
    ],
)
def test_config_errors_name_the_file_and_key(text, message, notebooks_dir, tmp_path):
    (tmp_path / "docs").mkdir()
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=f"{path}: .*{message}"):
        load_pipeline_config(path, notebooks_dir=notebooks_dir)


def test_a_parameter_for_a_notebook_not_written_yet_warns_and_goes_nowhere(notebooks_dir, tmp_path):
    (notebooks_dir / "02_query_synthesis.ipynb").unlink()
    with pytest.warns(UserWarning, match="'personas' .*02_query_synthesis do not exist yet"):
        routed = route_parameters({"personas": [{"role": "nurse"}]}, STAGES, notebooks_dir=notebooks_dir)
    assert all("personas" not in params for params in routed.values())


def test_the_shipped_configs_load_and_route_to_the_real_notebooks():
    for path in sorted((PROJECT_ROOT / "configs").glob("*.yaml")):
        config = load_pipeline_config(path)
        routed = config.stage_parameters()
        for stage, params in routed.items():
            assert set(params) <= set(declared_parameters(stage)), (path, stage)
        assert Path(config.parameters["corpus_dir"]).is_dir()
        assert routed["01_seed_documents"]["corpus_dir"] == config.parameters["corpus_dir"]


@pytest.mark.parametrize("notebook", sorted(p.name for p in (PROJECT_ROOT / "notebooks").glob("*.ipynb")))
def test_papermill_reads_every_parameter_with_a_name_type_and_default(notebook, caplog):
    import papermill

    path = PROJECT_ROOT / "notebooks" / notebook
    with caplog.at_level("WARNING", logger="papermill"):
        inspected = papermill.inspect_notebook(str(path))
    assert not [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert list(inspected) == list(declared_parameters(path.stem))  # papermill skips no assignment
    for name, parameter in inspected.items():
        assert parameter["inferred_type_name"] not in ("", "None") and parameter["default"], (notebook, name)


def test_cli_pipeline_config_error_exits_2(tmp_path, capsys):
    path = write_config(tmp_path, "corpus_dir: ../missing\n")
    assert main(["pipeline", "--config", str(path)]) == 2
    assert "is not a folder" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# End to end: the second domain through notebook 09 (real server, real models)
# --------------------------------------------------------------------------------------------


@pytest.mark.notebooks
def test_second_domain_runs_through_notebook_09(tmp_path):
    """The hospital corpus through stages 01-07, driven by configs/second_domain.yaml (one query per seed document
    instead of the smoke profile's two, and the benchmark's first three queries instead of its twelve, to keep the
    suite short: the routing, not the amount, is under test)."""
    from labeler_utils.core.config import DATA_DIR, PROJECT_ROOT
    from labeler_utils.pipeline import execute_notebook

    benchmark = tmp_path / "second_domain_benchmark.jsonl"  # 12 pairs the teacher grades for stage 06, not 24
    lines = (DATA_DIR / "second_domain_benchmark.jsonl").read_text().splitlines(keepends=True)
    benchmark.write_text("".join(line for line in lines if json.loads(line)["query_id"] in {"h001", "h002", "h003"}))
    shipped = (PROJECT_ROOT / "configs" / "second_domain.yaml").read_text()
    config = tmp_path / "second_domain.yaml"
    config.write_text(
        shipped.replace("../data/second_domain_benchmark.jsonl", str(benchmark)).replace("../data/", f"{DATA_DIR}/")
        + "queries_per_document: 1\n"
    )
    execute_notebook("09_adapt_to_your_domain", tmp_path, {"profile": "smoke", "config_path": str(config)})
    metrics = json.loads((tmp_path / "09_adapt_to_your_domain" / "metrics.json").read_text())
    assert metrics["stages"] == list(STAGES[1:])
    assert metrics["documents"] == metrics["documents_loaded_by_stage_01"] == 27
    assert metrics["benchmark_pairs"] == 12 and metrics["preview_passages"] > 27
    sub_run = Path(metrics["sub_run"])
    documents = [
        json.loads(line) for line in (sub_run / "01_seed_documents" / "documents.jsonl").read_text().splitlines()
    ]
    assert {d["doc_type"] for d in documents} >= {"clinical_procedure", "pharmacy_policy", "incident_report"}
    queries = [json.loads(q) for q in (sub_run / "02_query_synthesis" / "queries.jsonl").read_text().splitlines()]
    assert queries and all(q["seed_doc_id"] in {d["doc_id"] for d in documents} for q in queries)
    assert (sub_run / "03_hard_negatives" / "pairs.jsonl").exists()
    stage = metrics["stage_metrics"]
    synthesis = stage["02_query_synthesis"]
    assert 0 < synthesis["queries_generated"] <= synthesis["seed_documents"]  # queries_per_document: 1 was routed
    assert stage["04_teacher_labels"]["graded"] > 0
    assert (
        "hospital's procedure or policy" in (sub_run / "notebooks" / "04_teacher_labels.ipynb").read_text()
    )  # label_scale
    assert stage["05_distill"]["family"] == "cross_encoder" and stage["05_distill"]["train_examples"] > 0
    report = json.loads((sub_run / "06_evaluate" / "report.json").read_text())
    assert "student_distilled" in json.dumps(report)
    assert stage["07_throughput_cost"]["student_labels_per_second"] > 0
    assert (sub_run / "report.md").exists()
    shutil.rmtree(sub_run / "notebooks", ignore_errors=True)
