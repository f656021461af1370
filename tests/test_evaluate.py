"""Stage 06 metrics checked against reference implementations and hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import krippendorff
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from scipy import special, stats
from sklearn.metrics import cohen_kappa_score, ndcg_score

from labeler_utils import evaluate as ev
from labeler_utils.benchmarks.loaders import load_trec
from labeler_utils.core.artifacts import InputError
from labeler_utils.evaluate.bootstrap import _bootstrap_draws, _draw_counts
from labeler_utils.evaluate.ppi import _ppi_summary

DATA = Path(__file__).parent / "data"
LABELS = [0, 1, 2, 3]


def random_grades(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Human grades and a correlated, noisy labeler's grades."""
    rng = np.random.default_rng(seed)
    human = rng.choice(4, size=n, p=[0.5, 0.2, 0.2, 0.1])
    predicted = np.clip(human + rng.integers(-2, 3, size=n) * (rng.random(n) < 0.5), 0, 3)
    return human, predicted


def labelled_frame(seed: int = 0, n_queries: int = 12, docs_per_query: int = 10) -> pd.DataFrame:
    """A benchmark-like table with a teacher (grades, expected relevance, distribution) and a
    recorded labeler with some missing grades."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_queries):
        for d in range(docs_per_query):
            human = int(rng.choice(4, p=[0.45, 0.25, 0.2, 0.1]))
            logits = -1.5 * (np.arange(4) - human) ** 2 + rng.normal(0, 1.5, 4)
            distribution = special.softmax(logits * 2.0)  # over-confident on purpose
            recorded = int(np.clip(human + rng.integers(-1, 2), 0, 3)) if rng.random() > 0.05 else None
            rows.append(
                {
                    "query_id": f"q{q:02d}",
                    "query": f"query number {q} about topic {q % 3}",
                    "doc_id": f"d{q:02d}-{d}",
                    "document": f"document {d} text on topic {(q + d) % 3} and words",
                    "human": human,
                    "teacher": int(distribution.argmax()),
                    "teacher:expected": float(np.dot(np.arange(4), distribution)),
                    **{f"teacher:p{g}": float(distribution[g]) for g in range(4)},
                    "recorded:judge": recorded,
                }
            )
    frame = pd.DataFrame(rows)
    frame["teacher"] = frame["teacher"].astype("Int64")
    frame["recorded:judge"] = frame["recorded:judge"].astype("Int64")
    return frame


# --------------------------------------------------------------------------------------------
# Agreement metrics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
def test_kappas_match_sklearn(seed: int, weights: str | None) -> None:
    human, predicted = random_grades(seed)
    confusion = ev.confusion_matrix(human, predicted)
    assert ev.cohen_kappa(confusion, weights) == pytest.approx(
        cohen_kappa_score(human, predicted, labels=LABELS, weights=weights), abs=1e-12
    )


def test_weighted_kappa_uses_grade_distance_when_a_grade_is_absent() -> None:
    human, predicted = np.array([0, 0, 2, 3, 3, 2, 0, 2]), np.array([0, 2, 2, 3, 0, 3, 3, 0])  # grade 1 nowhere
    confusion = ev.confusion_matrix(human, predicted)
    for weights in ("linear", "quadratic"):
        expected = cohen_kappa_score(human, predicted, labels=LABELS, weights=weights)
        assert ev.cohen_kappa(confusion, weights) == pytest.approx(expected, abs=1e-12)
        # without labels= scikit-learn would put grades 0 and 2 one step apart
        assert expected != pytest.approx(cohen_kappa_score(human, predicted, weights=weights))


@pytest.mark.parametrize("threshold", [1, 2])
def test_binarized_kappa_matches_sklearn(threshold: int) -> None:
    human, predicted = random_grades(3)
    confusion = ev.binarize_confusion(ev.confusion_matrix(human, predicted), threshold)
    assert ev.cohen_kappa(confusion) == pytest.approx(cohen_kappa_score(human >= threshold, predicted >= threshold))


@pytest.mark.parametrize("seed", [0, 4])
def test_rank_correlations_match_scipy(seed: int) -> None:
    human, predicted = random_grades(seed)
    confusion = ev.confusion_matrix(human, predicted)
    assert ev.spearman_rho(confusion) == pytest.approx(stats.spearmanr(human, predicted).statistic, abs=1e-12)
    assert ev.kendall_tau_b(confusion) == pytest.approx(stats.kendalltau(human, predicted).statistic, abs=1e-12)


def test_accuracies_hand_computed() -> None:
    confusion = ev.confusion_matrix([0, 1, 2, 3, 3], [0, 2, 0, 3, 2])
    assert ev.exact_accuracy(confusion) == pytest.approx(2 / 5)
    assert ev.within_one_accuracy(confusion) == pytest.approx(4 / 5)  # only 2 -> 0 is off by two


def coincidence_from_ratings(ratings: list[list[float]], values: list[int]) -> np.ndarray:
    """Krippendorff's coincidence matrix of a coders x units table (NaN = not rated), from its definition."""
    index = {value: i for i, value in enumerate(values)}
    matrix = np.zeros((len(values), len(values)))
    for unit in np.array(ratings, dtype=float).T:
        given = [v for v in unit if not math.isnan(v)]
        for a in range(len(given)):
            for b in range(len(given)):
                if a != b:
                    matrix[index[int(given[a])], index[int(given[b])]] += 1 / (len(given) - 1)
    return matrix


def test_ordinal_alpha_reproduces_krippendorff_2011_example() -> None:
    """Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", four observers with
    missing values: ordinal alpha = 0.815 (nominal 0.743)."""
    n = math.nan
    ratings = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
        [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n],
    ]
    alpha = ev.ordinal_alpha(coincidence_from_ratings(ratings, [1, 2, 3, 4, 5]))
    assert round(float(alpha), 3) == 0.815
    assert alpha == pytest.approx(krippendorff.alpha(reliability_data=ratings, level_of_measurement="ordinal"))


def test_ordinal_alpha_two_coder_examples() -> None:
    # Krippendorff (2011), two observers, binary data: alpha = 0.095 (= 2/21)
    a, b = [0, 1, 0, 0, 0, 0, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    assert ev.agreement(a, b)["alpha_ordinal"] == pytest.approx(2 / 21)
    # By hand: coincidences o(2,3) = o(3,2) = 1 give sum(o * d2) = 8; sum(n_c n_k d2) = 624; n = 8
    # -> alpha = 1 - 7 * 8 / 624 = 71 / 78
    assert ev.agreement([0, 1, 2, 3], [0, 1, 3, 3])["alpha_ordinal"] == pytest.approx(71 / 78)


@pytest.mark.parametrize("seed", [0, 5])
def test_ordinal_alpha_matches_krippendorff_package(seed: int) -> None:
    human, predicted = random_grades(seed)
    expected = krippendorff.alpha(
        reliability_data=[human, predicted], level_of_measurement="ordinal", value_domain=LABELS
    )
    assert ev.agreement(human, predicted)["alpha_ordinal"] == pytest.approx(expected, abs=1e-12)


def test_metrics_accept_stacks_of_confusion_matrices() -> None:
    stack = np.stack([ev.confusion_matrix(*random_grades(seed)) for seed in range(4)])
    for name, fn in ev.CONFUSION_METRICS.items():
        assert np.allclose(fn(stack), [fn(matrix) for matrix in stack], equal_nan=True), name


def test_agreement_drops_missing_predictions_and_reports_them() -> None:
    result = ev.agreement(pd.Series([0, 1, 2, 3, 3]), pd.array([0, None, 2, 3, pd.NA], dtype="Int64"))
    assert (result["n"], result["n_missing"]) == (3, 2)
    assert result["accuracy"] == 1.0
    assert result["per_grade"]["3"] == {"precision": 1.0, "recall": 1.0, "human_count": 1, "predicted_count": 1}
    assert math.isnan(result["per_grade"]["1"]["precision"])  # grade 1 never predicted


def test_agreement_per_grade_and_distributions_hand_computed() -> None:
    result = ev.agreement([0, 0, 1, 2, 3], [0, 1, 1, 1, 3])
    assert result["per_grade"]["1"]["precision"] == pytest.approx(1 / 3)
    assert result["per_grade"]["0"]["recall"] == pytest.approx(1 / 2)
    assert result["human_distribution"] == pytest.approx([0.4, 0.2, 0.2, 0.2])
    assert result["predicted_distribution"] == pytest.approx([0.2, 0.6, 0.0, 0.2])


def test_agreement_with_a_single_shared_grade_is_nan_with_reasons() -> None:
    result = ev.agreement([2, 2, 2], [2, 2, 2])
    assert result["accuracy"] == 1.0
    for name in ("kappa", "qwk", "kappa_binary_ge2", "spearman", "alpha_ordinal"):
        assert math.isnan(result[name])
        assert name in result["undefined"]
    assert "chance agreement is 1" in result["undefined"]["kappa"]


def test_agreement_errors() -> None:
    with pytest.raises(ValueError, match="All 2 predicted grades are missing"):
        ev.agreement([0, 1], [None, None])
    with pytest.raises(ValueError, match="predicted grade 4 at position 1 is not an integer 0-3"):
        ev.agreement([0, 1], [0, 4])
    with pytest.raises(ValueError, match="human grades are missing"):
        ev.agreement([0, None], [0, 1])
    with pytest.raises(ValueError, match="3 human grades but 2 predicted"):
        ev.agreement([0, 1, 2], [0, 1])


# --------------------------------------------------------------------------------------------
# Ranking metrics
# --------------------------------------------------------------------------------------------


def test_ndcg_hand_computed() -> None:
    log3 = math.log2(3)
    # ranking gains 0, 3, 1 against the ideal 3, 1, 0
    assert ev.ndcg([3, 2, 1], [0, 3, 1]) == pytest.approx((3 / log3 + 1 / 2) / (3 + 1 / log3))
    # the first two tie: each gets mean gain 1.5 at positions 1 and 2
    assert ev.ndcg([1, 1, 0], [3, 0, 1]) == pytest.approx((1.5 * (1 + 1 / log3) + 1 / 2) / (3 + 1 / log3))
    assert ev.ndcg([1, 1, 0], [3, 0, 1], k=1) == pytest.approx(1.5 / 3)
    assert math.isnan(ev.ndcg([1, 2], [0, 0]))


@pytest.mark.parametrize("k", [None, 3, 10])
def test_tie_aware_ndcg_matches_sklearn(k: int | None) -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        grades, scores = rng.integers(0, 4, 15), rng.integers(0, 4, 15)  # many ties
        if grades.any():
            assert ev.ndcg(scores, grades, k) == pytest.approx(ndcg_score([grades], [scores], k=k))


def test_pairwise_counts_hand_computed() -> None:
    # human prefers 0>1, 0>2, 1>2; scores tie 0 and 1 (0.5) and reverse the other two
    assert ev.pairwise_counts([0.5, 0.5, 2.0], [2, 1, 0]) == (0.5, 3)
    assert ev.pairwise_counts([3, 2, 1], [1, 1, 0]) == (2.0, 2)  # the equal-grade pair is not counted


def test_ranking_metrics_average_over_queries_and_skip_queries_without_relevant_documents() -> None:
    frame = pd.DataFrame(
        {
            "query_id": ["a", "a", "b", "b", "c", "c"],
            "human": [2, 0, 0, 1, 0, 0],
            "lab": pd.array([1, 0, 1, 0, 1, 0], dtype="Int64"),
        }
    )
    # a: perfect (1.0); b: reversed -> (1/log2 3) / 1; c: no relevant document, left out
    assert ev.query_metric("ndcg", "lab")(frame) == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert ev.query_metric("pairwise_accuracy", "lab")(frame) == pytest.approx(1 / 2)


def test_labeler_score_prefers_expected_relevance() -> None:
    frame = pd.DataFrame({"lab": pd.array([1, None, 2], dtype="Int64"), "lab:expected": [1.4, 2.0, None]})
    assert ev.labeler_scores(frame, "lab").tolist()[::2] == [1.4, 2.0]
    assert math.isnan(ev.labeler_scores(frame, "lab")[1])  # no grade: not graded at all


def test_unknown_metric_name() -> None:
    with pytest.raises(ValueError, match="Unknown metric 'f1'"):
        ev.query_metric("f1", "teacher")


# --------------------------------------------------------------------------------------------
# Bootstrap over queries
# --------------------------------------------------------------------------------------------


def test_fast_bootstrap_equals_resampling_tables() -> None:
    frame = labelled_frame()
    fast = ev.bootstrap_ci(frame, ev.query_metric("kappa", "recorded:judge"), n_boot=40, seed=3)
    slow = ev.bootstrap_ci(frame, lambda f: ev.agreement(f["human"], f["recorded:judge"])["kappa"], n_boot=40, seed=3)
    assert fast == pytest.approx(slow)

    def mean_ndcg10(table: pd.DataFrame) -> float:
        values = [ev.ndcg(ev.labeler_scores(g, "teacher"), g["human"], 10) for _, g in table.groupby("query_id")]
        return float(np.nanmean(values))

    fast = ev.bootstrap_ci(frame, ev.query_metric("ndcg@10", "teacher"), n_boot=40, seed=3)
    assert fast == pytest.approx(ev.bootstrap_ci(frame, mean_ndcg10, n_boot=40, seed=3))
    assert fast["ci_low"] <= fast["estimate"] <= fast["ci_high"]


def spearman_of_resampled_table(labeler: str):
    """Spearman's rho of the labeler's scores with the human grades, by scipy on a whole table."""

    def metric(table: pd.DataFrame) -> float:
        scores = ev.labeler_scores(table, labeler)
        graded = scores.notna().to_numpy()
        return float(stats.spearmanr(scores[graded], table["human"][graded]).statistic)

    return metric


@pytest.mark.parametrize("labeler", ["teacher", "recorded:judge"])  # distinct expected relevances; tied grades
def test_spearman_of_scores_equals_scipy_on_resampled_tables(labeler: str) -> None:
    frame = labelled_frame()
    frame.loc[frame.index[:15], "teacher:expected"] = 1.5  # ties across queries
    fast = ev.bootstrap_ci(frame, ev.query_metric("spearman_expected", labeler), n_boot=60, seed=3)
    slow = ev.bootstrap_ci(frame, spearman_of_resampled_table(labeler), n_boot=60, seed=3)
    assert fast == pytest.approx(slow, rel=1e-12, abs=1e-12)
    assert fast["estimate"] == pytest.approx(spearman_of_resampled_table(labeler)(frame), rel=1e-12)


def test_spearman_of_scores_paired_and_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = labelled_frame()
    whole = ev.paired_bootstrap(frame, "teacher", "recorded:judge", "spearman_expected", n_boot=50, seed=1)
    monkeypatch.setattr("labeler_utils.evaluate.bootstrap._RESAMPLED_VALUES", 7)  # one replicate per block
    assert ev.paired_bootstrap(frame, "teacher", "recorded:judge", "spearman_expected", n_boot=50, seed=1) == whole
    both = frame[frame["recorded:judge"].notna()]
    assert whole["value_a"] == pytest.approx(spearman_of_resampled_table("teacher")(both), rel=1e-12)
    constant = frame.assign(flat=pd.array([2] * len(frame), dtype="Int64"))
    assert math.isnan(ev.bootstrap_ci(constant, ev.query_metric("spearman_expected", "flat"), n_boot=5)["estimate"])


def test_bootstrap_resamples_whole_queries() -> None:
    # one query all right, one all wrong: a replicate holds 0, 1 or 2 copies of the right one
    frame = pd.DataFrame(
        {"query_id": ["a"] * 3 + ["b"] * 3, "human": [0, 1, 2] * 2, "lab": pd.array([0, 1, 2, 3, 3, 3], dtype="Int64")}
    )
    metric = ev.query_metric("accuracy", "lab")
    counts = _draw_counts(_bootstrap_draws(2, 200, 0), 2)
    replicates = metric.combine(counts @ metric.query_statistics(frame))
    assert set(np.round(replicates, 6)) == {0.0, 0.5, 1.0}
    result = ev.bootstrap_ci(frame, metric, n_boot=200)
    assert (result["estimate"], result["ci_low"], result["ci_high"]) == (0.5, 0.0, 1.0)


def test_paired_bootstrap() -> None:
    frame = labelled_frame()
    frame["copy"] = frame["recorded:judge"]
    same = ev.paired_bootstrap(frame, "recorded:judge", "copy", "qwk", n_boot=50)
    assert (same["difference"], same["ci_low"], same["ci_high"], same["p_value_a_better"]) == (0.0, 0.0, 0.0, 1.0)
    frame["perfect"] = frame["human"].astype("Int64")
    better = ev.paired_bootstrap(frame, "perfect", "recorded:judge", "accuracy", n_boot=200)
    assert better["difference"] == pytest.approx(better["value_a"] - better["value_b"])
    assert better["value_a"] == 1.0 and better["ci_low"] > 0
    assert better["p_value_a_better"] == pytest.approx(1 / 201)
    assert better["n_pairs"] == frame["recorded:judge"].notna().sum()  # pairs both graded


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def test_reliability_table_and_ece_hand_computed() -> None:
    predicted, observed = [0.1, 0.2, 2.9, 3.0], [0, 1, 3, 2]
    table = ev.reliability_table(predicted, observed, n_bins=3)
    assert table["count"].tolist() == [2, 2]
    assert table["mean_predicted"].tolist() == pytest.approx([0.15, 2.95])
    assert table["mean_observed"].tolist() == pytest.approx([0.5, 2.5])
    assert table[["bin_low", "bin_high"]].to_numpy().tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert ev.expected_calibration_error(predicted, observed, n_bins=3) == pytest.approx((2 * 0.35 + 2 * 0.45) / 4)


def test_fit_temperature_recovers_the_generating_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(20000, 4))
    probabilities = special.softmax(logits / 2.5, axis=1)
    human = np.array([rng.choice(4, p=p) for p in probabilities])
    assert ev.fit_temperature(logits, human) == pytest.approx(2.5, rel=0.05)
    # probabilities are read as log-probabilities: the same fit as from logits
    assert ev.fit_temperature(special.softmax(logits, axis=1), human) == pytest.approx(
        ev.fit_temperature(logits, human), rel=1e-4
    )
    assert ev.apply_temperature(logits[:3], 2.5) == pytest.approx(probabilities[:3])


def test_calibration_report_recalibration_helps_on_held_out_queries() -> None:
    frame = labelled_frame(n_queries=30)
    dev = {f"q{q:02d}" for q in range(10)}
    report = ev.calibration_report(frame, "teacher", dev)
    assert report["score_source"] == "expected_relevance"
    assert report["n_dev_pairs"] == 100 and report["n_held_out_pairs"] == 200
    assert report["graded"]["rmse_isotonic"] < report["graded"]["rmse"]
    binary = report["binary_ge2"]
    assert binary["temperature"] > 1.2  # the distributions were made over-confident
    assert binary["log_loss_temperature"] < binary["log_loss"]
    grade_only = ev.calibration_report(frame, "recorded:judge", dev)
    assert grade_only["score_source"] == "grade" and grade_only["binary_ge2"] is None
    with pytest.raises(ValueError, match="both in and outside the dev queries"):
        ev.calibration_report(frame, "teacher", set(frame["query_id"]))


# --------------------------------------------------------------------------------------------
# System ranking
# --------------------------------------------------------------------------------------------


def trec_frame() -> pd.DataFrame:
    return load_trec(DATA / "trec/qrels.txt", DATA / "trec/topics.tsv", DATA / "trec/collection.tsv")


def test_read_trec_run_and_run_ndcg_hand_computed() -> None:
    runs = ev.read_trec_run(DATA / "run.trec")
    assert runs.columns.tolist() == list(ev.RUN_COLUMNS) and len(runs) == 7
    table = ev.run_query_ndcg(runs, trec_frame(), "human", k=10)
    # sysA ranks the relevant document first for both queries; sysB second (d9 is unjudged: gain 0)
    assert table["sysA"].tolist() == pytest.approx([1.0, 1.0])
    assert table["sysB"].tolist() == pytest.approx([1 / math.log2(3)] * 2)


def test_read_trec_run_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.run"
    path.write_text("1 Q0 d1 1 2.0 sys\n1 Q0 d2 two 1.0 sys\n")
    with pytest.raises(InputError, match=rf"{path}:2: rank must be an integer"):
        ev.read_trec_run(path)
    path.write_text("1 Q0 d1 1 2.0 sys\n\n1 Q0 d2 2 1.0\n")
    with pytest.raises(InputError, match=rf"{path}:3: expected 6 whitespace-separated fields, found 5"):
        ev.read_trec_run(path)
    path.write_text("1 Q0 d1 1 2.0 sys\n1 Q0 d1 2 1.0 sys\n")
    with pytest.raises(InputError, match=rf"{path}:2: run 'sys' ranks document 'd1' for query '1' twice"):
        ev.read_trec_run(path)


def test_synthetic_runs_and_system_ranking_agreement() -> None:
    frame = labelled_frame()
    frame["oracle"] = frame["human"].astype("Int64")
    runs = ev.synthetic_runs(frame, ["oracle", "teacher"])
    assert set(runs["run"]) == {*ev.BM25_RUNS, "bm25_reversed", "random", "oracle", "teacher"}
    ranks = runs.groupby(["run", "query_id"])["rank"].apply(sorted)
    assert all(r == list(range(1, 11)) for r in ranks)
    human = ev.run_query_ndcg(runs, frame, "human").mean()
    assert human["oracle"] == pytest.approx(1.0)  # ranking by the human grades themselves
    system = ev.system_ranking_agreement(frame, ["oracle", "teacher"], runs)
    assert system["agreement"]["oracle"] == pytest.approx({"kendall_tau": 1.0, "spearman": 1.0, "same_best_run": True})
    assert system["runs_source"] == "given" and set(system["ndcg"]) == set(runs["run"])


# --------------------------------------------------------------------------------------------
# Prediction-powered inference
# --------------------------------------------------------------------------------------------


def test_ppi_mean_hand_computed() -> None:
    unlabelled, labelled, human = [1.0, 2.0, 3.0, 2.0], [1.0, 2.0, 2.0], [1.0, 3.0, 2.0]
    result = ev.ppi_mean(unlabelled, labelled, human)
    # mean(model_u) + mean(human - model_l) = 2 + 1/3
    assert result["estimate"] == pytest.approx(2 + 1 / 3)
    # var(human - model_l) / n + var(model_u) / N, sample variances
    assert result["std_error"] == pytest.approx(math.sqrt((1 / 3) / 3 + (2 / 3) / 4))
    assert result["ci_high"] - result["estimate"] == pytest.approx(stats.norm.ppf(0.975) * result["std_error"])


def test_ppi_is_narrower_than_human_labels_alone_with_a_good_model() -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(1.0, 1.0, 5000)
    model = truth + rng.normal(0.3, 0.2, 5000)  # biased but precise
    labelled = np.zeros(5000, dtype=bool)
    labelled[:200] = True
    summary = _ppi_summary("mean", truth.mean(), model, truth, labelled, 0.05)
    assert summary["width_ratio_ppi"] < 0.5
    assert summary["ppi"]["ci_low"] <= truth.mean() <= summary["ppi"]["ci_high"]
    noise = ev.ppi_mean(rng.normal(size=4800), rng.normal(size=200), truth[:200], power_tuning=True)
    assert noise["lambda"] < 0.2  # an unrelated model gets little weight


def test_ppi_on_a_benchmark_table() -> None:
    frame = labelled_frame(n_queries=20)
    relevance = ev.ppi_relevance(frame, "teacher", labelled_fraction=0.25, seed=1)
    assert relevance["human_only"]["n"] == 50 and relevance["ppi"]["n_unlabelled"] == 150
    assert relevance["true_value"] == pytest.approx(frame["human"].mean())
    runs = ev.synthetic_runs(frame)
    ndcg = ev.ppi_ndcg(frame, "teacher", runs, {f"q{q:02d}" for q in range(6)})
    assert ndcg["estimand"] == "mean nDCG@10 of run 'bm25' over queries"
    assert ndcg["ppi"]["n_labelled"] == 6 and ndcg["ppi"]["n_unlabelled"] == 14
    skipped = ev.ppi_ndcg(frame, "teacher", runs, {"q00"})
    assert "needs >= 2 labelled" in skipped["skipped"]


# --------------------------------------------------------------------------------------------
# Plots and the report
# --------------------------------------------------------------------------------------------


def test_evaluation_report_writes_everything(tmp_path: Path) -> None:
    frame = labelled_frame()
    frame["query_type"] = np.where(frame["query_id"] < "q06", "informational", "navigational")
    report = ev.evaluation_report(frame, ["teacher", "recorded:judge"], tmp_path, n_boot=30, dev_fraction=0.25)
    strict = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert strict["labelers"]["teacher"]["metrics"]["qwk"]["estimate"] == pytest.approx(
        ev.agreement(frame["human"], frame["teacher"])["qwk"]
    )
    assert strict["labelers"]["recorded:judge"]["n_missing"] == frame["recorded:judge"].isna().sum()
    assert {c["metric"] for c in strict["comparisons"]} == set(ev.COMPARISON_METRICS)
    assert strict["calibration"]["teacher"]["binary_ge2"]["temperature"] > 0
    assert strict["settings"]["dev_queries"] == 3
    assert strict["system_ranking"]["runs_source"] == "synthetic"
    assert {row["query_type"] for row in strict["by_query_type"]} == {"informational", "navigational"}
    for path in report["figures"].values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "report.md").read_text()
    assert "## Agreement (estimate [interval])" in markdown and "| teacher |" in markdown
    with pytest.raises(ValueError, match=r"Labeler column\(s\) \['student'\] not in the table"):
        ev.evaluation_report(frame, ["student"], tmp_path)


def test_plots_return_figures() -> None:
    frame = labelled_frame()
    assert isinstance(ev.plot_confusion_matrices(frame, ["teacher"]), Figure)
    assert isinstance(ev.plot_grade_distributions(frame, ["teacher", "recorded:judge"]), Figure)
    metrics = {"teacher": {m: ev.bootstrap_ci(frame, ev.query_metric(m, "teacher"), 20) for m in ev.FOREST_METRICS}}
    assert isinstance(ev.plot_forest(metrics), Figure)


def test_report_sets_aside_a_labeler_without_any_grade(tmp_path):
    frame = pd.DataFrame(
        {
            "query_id": ["a"] * 4 + ["b"] * 4 + ["c"] * 4,
            "doc_id": [str(i) for i in range(12)],
            "query": ["vpn timeout"] * 12,
            "document": [f"document {i} about vpn" for i in range(12)],
            "human": [0, 1, 2, 3] * 3,
            "good": [0, 1, 2, 3] * 3,
            "silent": pd.array([None] * 12, dtype="Int64"),
        }
    )
    report = ev.evaluation_report(frame, ["good", "silent"], tmp_path, n_boot=20)
    assert report["labelers_without_grades"] == ["silent"]
    assert list(report["labelers"]) == ["good"]
    assert report["labelers"]["good"]["metrics"]["accuracy"]["estimate"] == 1.0


def test_ndcg_equals_trec_eval_through_ir_measures_when_no_scores_tie():
    """Without ties the tie-aware nDCG is trec_eval's (through ir-measures); with ties it averages over tie orders."""
    import ir_measures
    from ir_measures import nDCG

    rng = np.random.default_rng(0)
    qrels, run, ours = [], [], {}
    for q in range(6):
        grades, scores = rng.integers(0, 4, size=25), rng.normal(size=25)
        qrels += [ir_measures.Qrel(f"q{q}", f"d{d}", int(g)) for d, g in enumerate(grades)]
        run += [ir_measures.ScoredDoc(f"q{q}", f"d{d}", float(s)) for d, s in enumerate(scores)]
        ours[f"q{q}"] = ev.ndcg(scores, grades, k=10)
    theirs = {m.query_id: m.value for m in ir_measures.iter_calc([nDCG @ 10], qrels, run)}
    assert theirs == pytest.approx(ours, abs=1e-9)


def test_learning_curves_are_read_from_reproduction_results(tmp_path):
    interval = {"estimate": 0.4, "ci_low": 0.3, "ci_high": 0.5}
    point = {
        "student": "s",
        "queries": "all",
        "pairs_per_query": None,
        "mean_train_pairs": 99.6,
        "eval_pairs": 40,
        **{key: interval for key in ("qwk", "qwk_calibrated", "spearman")},
    }
    splits = [{"train_queries": [f"q{i}" for i in range(n)]} for n in (8, 9)]  # query ids, as the script writes
    results = {"splits": splits, "learning_curve": {"points": [point]}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    points, all_queries = ev.read_learning_curves([tmp_path / "results.json"])
    assert points == [point] and all_queries == 8.5
    table = ev.learning_curve_table(points)
    assert table.loc[0, "pairs per query"] == "all" and table.loc[0, "mean training pairs"] == 100
    assert table.loc[0, "QWK share-calibrated"] == "0.400 [0.300, 0.500]"
    (tmp_path / "plain.json").write_text(json.dumps({"splits": []}))
    with pytest.raises(ValueError, match="plain.json: no 'learning_curve'"):
        ev.read_learning_curves([tmp_path / "plain.json"])
