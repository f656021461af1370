"""The TREC DL reproduction behind ``python -m labeler_utils reproduce`` and notebook 10.

It distils a recorded teacher's grades into small students by query folds and scores every labeler against the
human grades; the protocol is :mod:`.cli`'s docstring (the command's ``--help``). The modules, in the order a run
uses them: :mod:`.students` (the students table), :mod:`.protocols` (pairs, splits, per-query caps), :mod:`.runner`
(train or reuse, label, all cached), :mod:`.scoring` (pooled agreement with intervals), :mod:`.learning_curve`,
:mod:`.report` (results.json, summary.json, results.md), :mod:`.cli` (the command's options and its run) and
:mod:`.ceiling` (every labeler of several runs against the teacher on the same pairs, in one plot).
"""

from .ceiling import RECORDED_CEILING_RUNS, ceiling_rows, plot_ceiling, read_results
from .cli import build_parser, options, reproduce
from .protocols import (
    evaluation_pairs,
    load_frame,
    per_student_settings,
    query_splits,
    sample_per_query,
    split_records,
    splits_summary,
    teacher_column,
)
from .report import agreement_table, summary
from .runner import run_students
from .scoring import METRICS, evaluate_set, evaluation_sets
from .students import COSINE_LABELER, DEFAULT_STUDENT, STUDENTS

__all__ = [
    "COSINE_LABELER",
    "DEFAULT_STUDENT",
    "METRICS",
    "RECORDED_CEILING_RUNS",
    "STUDENTS",
    "agreement_table",
    "build_parser",
    "ceiling_rows",
    "evaluate_set",
    "evaluation_pairs",
    "evaluation_sets",
    "load_frame",
    "options",
    "per_student_settings",
    "plot_ceiling",
    "query_splits",
    "read_results",
    "reproduce",
    "run_students",
    "sample_per_query",
    "split_records",
    "splits_summary",
    "summary",
    "teacher_column",
]
