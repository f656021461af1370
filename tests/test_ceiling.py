"""The ceiling plot: every labeler of reproduce runs beside the teacher on the same pairs."""

from __future__ import annotations

import json

import pytest

from labeler_utils.__main__ import main
from labeler_utils.experiments.ceiling import RECORDED_CEILING_RUNS, ceiling_rows, plot_ceiling, read_results

TEACHER = "recorded:deepseek_v3_umbrela"


def _labeler(qwk: float, n: int, minus_teacher: float | None = None) -> dict:
    result = {"n": n, "metrics": {"qwk": {"estimate": qwk, "ci_low": qwk - 0.05, "ci_high": qwk + 0.05}}}
    if minus_teacher is not None:
        result["qwk_minus_teacher"] = {"difference": minus_teacher, "ci_low": minus_teacher - 0.04, "ci_high": 0.0}
    return result


def _report(protocol: str) -> dict:
    """A results.json with two evaluation sets; the cosine is scored on both, the cross-encoder on the capped one."""
    return {
        "protocol": protocol,
        "settings": {"teacher": TEACHER},
        "evaluation_sets": [
            {
                "title": "All held-out pairs",
                "labelers": {TEACHER: _labeler(0.58, 100), "cosine": _labeler(0.37, 100, -0.21)},
            },
            {
                "title": "At most 5 random held-out pairs per query",
                "labelers": {
                    TEACHER: _labeler(0.60, 20),
                    "cosine": _labeler(0.40, 20, -0.20),
                    "cross-encoder": _labeler(0.0, 20),
                },
            },
        ],
    }


def test_ceiling_rows_score_each_labeler_once_on_its_largest_set_beside_the_teacher_on_those_pairs():
    rows = ceiling_rows({"a": _report("5-fold"), "b": _report("cross-source")})
    assert len(rows) == 4 and TEACHER not in set(rows["labeler"])
    cosine = rows[(rows["run"] == "a (5-fold)") & (rows["labeler"] == "cosine")].iloc[0]
    assert (cosine["pairs"], cosine["qwk"], cosine["teacher_qwk"], cosine["minus_teacher"]) == (100, 0.37, 0.58, -0.21)
    cross = rows[(rows["run"] == "b (cross-source)") & (rows["labeler"] == "cross-encoder")].iloc[0]
    assert (cross["pairs"], cross["teacher_qwk"]) == (20, 0.60) and cross["minus_teacher"] != cross["minus_teacher"]
    figure = plot_ceiling(rows)
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["cosine", "cross-encoder"] * 2


def test_ceiling_command_plots_results_folders_and_names_a_missing_one(tmp_path, capsys):
    run = tmp_path / "runs" / "cv"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(_report("5-fold")))
    assert main(["ceiling", str(run), "--output", str(tmp_path / "ceiling.png")]) == 0
    assert (tmp_path / "ceiling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cross-encoder" in capsys.readouterr().out
    assert main(["ceiling", str(run), str(tmp_path / "absent"), "--output", str(tmp_path / "x.png")]) == 2
    assert f"no results.json at {tmp_path / 'absent'} " in capsys.readouterr().err and not (tmp_path / "x.png").exists()
    with pytest.raises(FileNotFoundError):
        read_results([tmp_path / "absent.json"])


def test_ceiling_command_defaults_to_the_recorded_runs(tmp_path, capsys):
    assert main(["ceiling", "--output", str(tmp_path / "ceiling.png")]) == 0
    printed = capsys.readouterr().out
    recorded = ceiling_rows(read_results(RECORDED_CEILING_RUNS))
    assert len(recorded) >= len(RECORDED_CEILING_RUNS) and all(run in printed for run in set(recorded["run"]))


def test_runs_are_named_from_just_above_their_common_folder(tmp_path):
    for folder in ("cv", "cv/cross_year", "cv/mpnet"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "results.json").write_text(json.dumps(_report("5-fold")))
    found = read_results([tmp_path / "cv", tmp_path / "cv/cross_year", tmp_path / "cv/mpnet/results.json"])
    assert list(found) == ["cv", "cv/cross_year", "cv/mpnet"]
    assert list(read_results([tmp_path / "cv/mpnet"])) == ["mpnet"]
