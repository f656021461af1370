"""Distil DeepSeek-V3's recorded TREC DL grades into small students; compare them with NIST's humans.

Protocol (``python -m labeler_utils reproduce``):

1. Load the judged pairs of one or more files (``--pairs``: NIST human grades plus recorded LLM
   grades; TREC DL 2019 and 2020 together hold 97 queries) and split them BY QUERY with a fixed
   seed: ``--test-fraction`` held out, ``--kfold K`` folds over all queries (every query held out
   once), or ``--cross-source`` (train on one file's queries, test on another's). No query is on
   both sides. ``--max-train-pairs-per-query`` spends the training budget on distinct queries:
   at most N pairs of each query, drawn within each teacher grade in proportion to its share.
2. The teacher's recorded grades of the training queries are the training records. The human
   grades are never used for training, only to score every labeler on the held-out queries.
3. Each student is trained (``labeler_utils.students.cross_encoder`` or ``labeler_utils.students.causal_lm.train``) and
   labels the held-out pairs, zero-shot and distilled:

   * causal LMs (SmolLM2, Gemma 3): zero-shot = the base model through the same one-pass
     grade-token scoring as the distilled adapter;
   * MiniLM cross-encoder: an untrained classification head means nothing, so its zero-shot row
     is the bi-encoder cosine similarity of the same MiniLM, cut into grades at thresholds that
     reproduce the teacher's grade shares on the training pairs (teacher grades only, never the
     humans'); its expected relevance is ``3 * (cos + 1) / 2`` (ranking metrics only).

4. Each distilled student is also reported "share-calibrated": its expected relevance cut into grades at the
   quantiles that give the teacher's grade shares on the training pairs, instead of the arg-max grade.
5. On each evaluation set (all held-out pairs, and the per-query capped subsample of slow
   students) every labeler is scored against the human grades, DeepSeek-V3 on exactly the same
   pairs, with percentile bootstrap intervals over queries. Labels/s, training time and peak RSS
   are measured on this machine.

``--learning-curve`` then retrains the students on growing subsets of each split's training queries
(``--curve-queries``) and pairs per query (``--curve-pairs``) and plots held-out QWK and Spearman
against them; ``--final-model DIR`` trains the first student on every query of the given files, for
``python -m labeler_utils label --model DIR``. ``summary.json`` holds the headline numbers.

Models, predictions and timings go to ``--work-dir`` (git-ignored ``runs/``); a student whose
model (and predictions) are there already is reused unless ``--force``. Every student's training
writes a checkpoint every 50 steps into ``<work-dir>/<student>/<split>/checkpoints`` (removed once it finished):
running the same command again after a crash resumes it (``--force`` too resumes a checkpoint of the
very same training), and labelling resumes after the last chunk of 1,000 pairs written. Results go to
``--output``: ``results.json``, ``results.md`` and ``forest_<set>.png``.

Examples (docs/results/trec_dl_2019, and the 5-fold run over both years of docs/results/trec_dl_cv):

    .venv/bin/python -m labeler_utils reproduce --students minilm-cross-encoder
    .venv/bin/python -m labeler_utils reproduce --pairs ../shared/benchmarks/trec-dl-2019/pairs.jsonl \\
        ../shared/benchmarks/trec-dl-2020/pairs.jsonl --kfold 5 --students minilm-cross-encoder,minilm-bi-encoder \\
        --max-train-pairs-per-query 32 --output docs/results/trec_dl_cv
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..benchmarks.fetch import default_output
from ..benchmarks.folds import SOURCE_COLUMN
from ..core.config import RUNS_DIR
from ..throughput import machine_info
from .learning_curve import learning_curve
from .protocols import (
    PER_STUDENT_OPTIONS,
    load_frame,
    per_student_settings,
    protocol_splits,
    split_records,
    splits_summary,
    teacher_column,
)
from .report import write_report
from .runner import final_model, run_students
from .scoring import evaluation_sets
from .students import DEFAULT_STUDENT, PAPER_STUDENT, STUDENTS, chosen_students, default_students

COMMAND = "python -m labeler_utils reproduce"
PROTOCOL = __doc__
DEFAULT_PAIRS = [default_output("trec-dl-2019")]  # where `python -m labeler_utils fetch trec-dl-2019` writes
DEFAULT_OUTPUT = RUNS_DIR / "reproduce"
DEFAULT_WORK_DIR = RUNS_DIR / "reproduce_trec_dl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options (``python -m labeler_utils reproduce --help``)."""
    per_student = "a number for every student, or name=value,name=value"
    parser.add_argument(
        "--pairs",
        type=Path,
        nargs="+",
        default=DEFAULT_PAIRS,
        help="judged pair files (TREC DL pairs.jsonl schema); several are read as one table with "
        "distinct query ids (default: %(default)s)",
    )
    parser.add_argument(
        "--teacher-column",
        default="deepseek_v3_umbrela",
        help="recorded labeler whose grades are distilled (llm_labels.<name>; default: %(default)s)",
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.5, help="share of queries held out (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="split, subsample, training and bootstrap seed (default: %(default)s)"
    )
    protocol = parser.add_mutually_exclusive_group()
    protocol.add_argument(
        "--kfold",
        type=int,
        default=None,
        help="K folds by query instead of one hold-out split; metrics pool the K held-out folds",
    )
    protocol.add_argument(
        "--cross-source",
        action="store_true",
        help="train on the queries of each --pairs file, test on those of each other file",
    )
    parser.add_argument(
        "--splits",
        help="comma list of the protocol's split names to run and pool (e.g. fold1of5,fold2of5; default: all), "
        "for a slow student on part of the folds",
    )
    parser.add_argument(
        "--students",
        default=None,
        help=f"comma list among {', '.join(STUDENTS)} (default: {PAPER_STUDENT} with a CUDA GPU, "
        f"{DEFAULT_STUDENT} without)",
    )
    parser.add_argument(
        "--epochs",
        help=f"training epochs ({per_student}); default per student: "
        + ", ".join(f"{n} {s.settings['epochs']:g}" for n, s in STUDENTS.items()),
    )
    parser.add_argument(
        "--max-train-pairs", help=f"random subsample of the training pairs ({per_student}); default all"
    )
    parser.add_argument(
        "--max-train-pairs-per-query",
        help=f"at most this many training pairs of each query, drawn within each teacher grade in "
        f"proportion to its share ({per_student}); default all",
    )
    parser.add_argument(
        "--max-eval-pairs-per-query",
        help=f"random held-out pairs per query ({per_student}); default all. "
        "DeepSeek-V3 and the other students are then also scored on exactly these pairs",
    )
    parser.add_argument(
        "--soft-labels",
        action="store_true",
        help="train on the teacher's grade distributions where records have them (TREC DL's recorded "
        "labels have none, so this changes nothing there)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast while training the causal LM students (a GPU, or a CPU with AVX512-BF16: "
        "1.2x faster than float32 here); default: float32 on a CPU, bfloat16 for QLoRA on a GPU",
    )
    parser.add_argument(
        "--learning-curve",
        action="store_true",
        help="also retrain each student on growing subsets of every split's training data",
    )
    parser.add_argument(
        "--curve-students", help="learning curve: comma list of the students it retrains (default: all)"
    )
    parser.add_argument(
        "--curve-queries",
        default="5,10,20,40,all",
        help="learning curve: training queries per split (default: %(default)s)",
    )
    parser.add_argument(
        "--curve-pairs",
        default="20,50",
        help="learning curve: pairs per query, 'all' for no cap (default: %(default)s)",
    )
    parser.add_argument(
        "--curve-eval-pairs-per-query",
        type=int,
        help="learning curve: score each point on at most this many random held-out pairs per query "
        "(default: the student's --max-eval-pairs-per-query)",
    )
    parser.add_argument(
        "--final-model",
        type=Path,
        help="after the splits, train the first student on every query of --pairs into this folder",
    )
    parser.add_argument("--eval-batch-size", type=int, default=16, help="labelling batch size (default: %(default)s)")
    parser.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap resamples over queries (default: %(default)s)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results folder (default: %(default)s)")
    parser.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="models, predictions and timings (default: %(default)s)"
    )
    parser.add_argument(
        "--force", action="store_true", help="retrain and relabel even when the work folder has results"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command's parser on its own (``python -m labeler_utils`` declares the same options as a subcommand)."""
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=PROTOCOL, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return parser


def options(**overrides: Any) -> argparse.Namespace:
    """The command's options as a notebook gives them: the defaults, with ``overrides`` by option name
    (``kfold=2``, ``students="minilm-bi-encoder"``, ``output=Path(...)``); a per-student option also takes
    one number for every student (``max_train_pairs_per_query=8``)."""
    args = build_parser().parse_args([])
    unknown = sorted(set(overrides) - set(vars(args)))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; the options are {sorted(vars(args))}")
    given = {k: str(v) if k in PER_STUDENT_OPTIONS and isinstance(v, (int, float)) else v for k, v in overrides.items()}
    return argparse.Namespace(**{**vars(args), **given})


def reproduce(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run every student on every split, score them, write results.json, summary.json and results.md into
    ``args.output``; returns the report. ``command`` is the command line results.md names."""
    missing = [str(path) for path in args.pairs if not Path(path).is_file()]
    if missing:
        raise SystemExit(
            f"no pairs file {', '.join(missing)}: download TREC DL with `python -m labeler_utils fetch trec-dl-2019` "
            "(and trec-dl-2020), or give --pairs"
        )
    import torch

    torch.manual_seed(0)
    args.students = args.students or default_students()
    students = chosen_students(args.students)
    settings = per_student_settings(args, students)
    teacher = teacher_column(args.teacher_column)
    machine = machine_info()
    frame = load_frame(args.pairs, teacher)
    splits, protocol = protocol_splits(frame, args)
    report_students = run_students(students, splits, frame, teacher, args, settings)
    sources = list(dict.fromkeys(frame[SOURCE_COLUMN]))
    report = {
        "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "protocol": protocol,
        "sources": sources,
        "sources_title": " + ".join(sources),
        "settings": {
            **{
                k: [str(p) for p in v] if k == "pairs" else str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
            },
            "teacher": teacher,
            "per_student": settings,
        },
        "splits": split_records(frame, splits),
        "splits_summary": splits_summary(frame, splits),
        "students": report_students,
        "evaluation_sets": evaluation_sets(frame, splits, students, report_students, teacher, settings, args),
    }
    if args.learning_curve:
        curve_students = [n.strip() for n in (args.curve_students or args.students).split(",") if n.strip()]
        if set(curve_students) - set(students):
            raise SystemExit(f"--curve-students {sorted(set(curve_students) - set(students))} are not in --students")
        report["learning_curve"] = learning_curve(frame, splits, curve_students, teacher, settings, args)
    if args.final_model:
        report["final_model"] = final_model(students[0], frame, teacher, settings, args)
    print(write_report(report, students, teacher, args.output))
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command with its own parser: ``argv`` are its options (default: this process's arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return reproduce(build_parser().parse_args(argv), f"{COMMAND} {shlex.join(argv)}")
