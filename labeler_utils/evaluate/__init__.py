"""Stage 06: how well each labeler's grades agree with the human grades, with intervals by query.

Conventions used throughout:

* Grades are 0–3. Confusion matrices have the human grade as row and the labeler's as column.
* Kappas measure disagreement by grade distance on the whole 0–3 scale: 1 for any difference
  (unweighted), ``|i - j|`` (linear), ``(i - j)**2`` (quadratic, "qwk"). This equals scikit-learn's
  ``cohen_kappa_score(..., labels=[0, 1, 2, 3])``.
* Statistics that are undefined for the data are NaN, never an exception: a kappa when both sides
  give every pair one and the same grade (chance agreement is 1), a correlation when one side is
  constant, Krippendorff's alpha when every grade given is the same. :func:`agreement` lists them
  under ``undefined`` with the reason.
* A pair without a labeler grade (null prediction) is left out for that labeler and counted in
  ``n_missing``; paired comparisons use the pairs both labelers graded.
* A labeler's *score* (used to rank documents) is its expected relevance where it has one, else its grade.
* nDCG uses linear gains (gain = human grade, as ``trec_eval``) and is tie-aware: the expected
  nDCG when documents with equal scores are put in random order (McSherry & Najork, 2008). It is
  computed per query over all judged documents ("ndcg") and at cutoff 10 ("ndcg@10") and averaged
  over queries; a query whose documents are all grade 0 has nothing to rank and is left out.
* Pairwise accuracy: over all pairs of documents of one query with different human grades, pooled
  over queries, the share the labeler orders the same way; a tie in the labeler's scores counts 0.5.
* Intervals are percentile bootstrap intervals that resample queries with replacement, because
  the pairs of one query are not independent.

The subpackage, by topic (every name is importable from ``labeler_utils.evaluate`` itself):

* :mod:`.agreement_metrics` — grade constants, confusion-matrix metrics, :func:`agreement`, a labeler's columns;
* :mod:`.ranking` — nDCG and pairwise accuracy of one query, TREC runs, system-ranking agreement;
* :mod:`.bootstrap` — metrics from per-query statistics (Spearman of scores too), the query bootstrap, paired
  comparisons;
* :mod:`.calibration` — reliability tables, ECE, temperature scaling, isotonic recalibration;
* :mod:`.ppi` — prediction-powered inference of mean relevance and mean nDCG;
* :mod:`.plots` — the figures (each ``plot_*`` function returns a Figure; :func:`report_figures`, the report's);
* :mod:`.report` — :func:`evaluation_report` and its JSON, Markdown and tables.
"""

from .agreement_metrics import (
    CONFUSION_METRICS,
    GRADE_VALUES,
    N_GRADES,
    agreement,
    binarize_confusion,
    cohen_kappa,
    confusion_matrix,
    exact_accuracy,
    kendall_tau_b,
    labeler_probabilities,
    labeler_scores,
    ordinal_alpha,
    spearman_rho,
    within_one_accuracy,
)
from .bootstrap import (
    METRIC_NAMES,
    RANKING_METRICS,
    SCORE_METRICS,
    QueryMetric,
    bootstrap_ci,
    paired_bootstrap,
    query_metric,
)
from .calibration import (
    RELEVANT_GRADE,
    apply_temperature,
    calibration_report,
    expected_calibration_error,
    fit_isotonic,
    fit_temperature,
    reliability_table,
)
from .plots import (
    FOREST_METRICS,
    plot_confusion_matrices,
    plot_forest,
    plot_grade_distributions,
    plot_learning_curve,
    plot_ppi,
    plot_reliability,
    plot_system_ranking,
    plot_training_loss,
    report_figures,
)
from .ppi import mean_interval, ppi_mean, ppi_ndcg, ppi_relevance
from .ranking import (
    BM25_RUNS,
    NDCG_CUTOFF,
    RUN_COLUMNS,
    ndcg,
    pairwise_counts,
    read_trec_run,
    run_query_ndcg,
    synthetic_runs,
    system_ranking_agreement,
)
from .report import (
    COMPARISON_METRICS,
    agreement_by_group,
    evaluation_report,
    learning_curve_table,
    read_learning_curves,
    report_markdown,
    summary_tables,
)

__all__ = [
    # agreement_metrics
    "CONFUSION_METRICS",
    "GRADE_VALUES",
    "N_GRADES",
    "agreement",
    "binarize_confusion",
    "cohen_kappa",
    "confusion_matrix",
    "exact_accuracy",
    "kendall_tau_b",
    "labeler_probabilities",
    "labeler_scores",
    "ordinal_alpha",
    "spearman_rho",
    "within_one_accuracy",
    # ranking
    "BM25_RUNS",
    "NDCG_CUTOFF",
    "RUN_COLUMNS",
    "ndcg",
    "pairwise_counts",
    "read_trec_run",
    "run_query_ndcg",
    "synthetic_runs",
    "system_ranking_agreement",
    # bootstrap
    "METRIC_NAMES",
    "RANKING_METRICS",
    "SCORE_METRICS",
    "QueryMetric",
    "bootstrap_ci",
    "paired_bootstrap",
    "query_metric",
    # calibration
    "RELEVANT_GRADE",
    "apply_temperature",
    "calibration_report",
    "expected_calibration_error",
    "fit_isotonic",
    "fit_temperature",
    "reliability_table",
    # ppi
    "mean_interval",
    "ppi_mean",
    "ppi_ndcg",
    "ppi_relevance",
    # plots
    "FOREST_METRICS",
    "plot_confusion_matrices",
    "plot_forest",
    "plot_learning_curve",
    "plot_grade_distributions",
    "plot_ppi",
    "plot_reliability",
    "plot_system_ranking",
    "plot_training_loss",
    "report_figures",
    # report
    "COMPARISON_METRICS",
    "agreement_by_group",
    "learning_curve_table",
    "read_learning_curves",
    "evaluation_report",
    "report_markdown",
    "summary_tables",
]
