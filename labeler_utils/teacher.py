"""Stage 04: graded relevance labels from a teacher LLM, or imported from recorded judgments.

The teacher reads a rubric (search intent, how well the document matches it, how trustworthy
the document is, considered step by step) and ends its answer with ``Final grade: N``. A strict
parser accepts only that line (or a JSON ``{"grade": N}``); an answer without it is recorded as
unparseable and asked again with a new sampling seed — it never becomes a grade silently.

Beside the hard grade each label keeps a distribution over grades: from the ``top_logprobs`` of
the grade token when the endpoint returns them, otherwise from ``n_samples`` sampled answers.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .core.artifacts import InputError, iter_jsonl_located
from .core.config import STAGES
from .core.records import GRADES, LabelScale, parse_grade_answer
from .llm.client import LLMClient, LLMError, Message, map_concurrent, parse_with_retries
from .students.base import PairLabeler

STAGE = STAGES[4]  # this stage's folder in a run folder


RUBRIC_TEMPLATE = """You judge search results for a company's internal search engine.
Given a search query and a document, decide how relevant the document is to the query.

Scale:
{scale}

Work through it briefly:
1. Intent: what is the person searching for?
2. Match: does the document contain what they need, partly, or not at all?
3. Trust: is the document authoritative and current for that need?

Query: {query}

Document:
{document}

{answer_instruction}"""

ANSWER_WITH_REASONING = "Write at most three short sentences, then end with the line: Final grade: <digit>"
ANSWER_DIRECTLY = "Answer with one line only: Final grade: <digit>"
ANSWER_AS_JSON = 'Answer in JSON: {"reasoning": "<at most three short sentences>", "grade": <digit>}'
ANSWER_AS_JSON_DIRECTLY = 'Answer in JSON: {"grade": <digit>}'


def grade_schema(scale: LabelScale, reasoning: bool) -> dict[str, Any]:
    """JSON schema of a structured answer: optional short reasoning, then the grade from the scale."""
    properties: dict[str, Any] = {"grade": {"type": "integer", "enum": list(scale.grades)}}
    if reasoning:
        properties = {"reasoning": {"type": "string", "maxLength": 400}, **properties}
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def rubric_messages(
    query: str,
    document: str,
    scale: LabelScale = LabelScale(),
    template: str = RUBRIC_TEMPLATE,
    reasoning: bool = True,
    max_document_chars: int = 4000,
    structured: bool = False,
) -> list[Message]:
    """The teacher's chat messages for one pair (``template`` fields: scale, query, document, answer_instruction)."""
    if structured:
        instruction = ANSWER_AS_JSON if reasoning else ANSWER_AS_JSON_DIRECTLY
    else:
        instruction = ANSWER_WITH_REASONING if reasoning else ANSWER_DIRECTLY
    prompt = template.format(
        scale=scale.describe(), query=query, document=document[:max_document_chars], answer_instruction=instruction
    )
    return [{"role": "user", "content": prompt}]


def distribution_from_logprobs(
    tokens: Sequence[str], top_logprobs: Sequence[dict[str, float]], text: str, scale: LabelScale = LabelScale()
) -> tuple[list[float], float] | None:
    """Grade distribution from the alternatives at the grade token; returns (distribution, covered mass).

    The grade token is the last generated token that is a grade digit (the parser reads the last
    ``Final grade`` line). Alternatives that are grade digits are renormalised; ``covered mass``
    says how much of the probability at that step they held.
    """
    digits = {str(g) for g in scale.grades}
    for step in range(len(tokens) - 1, -1, -1):
        if tokens[step].strip() in digits:
            mass = {g: 0.0 for g in scale.grades}
            for token, logprob in top_logprobs[step].items():
                if token.strip() in digits:
                    mass[int(token.strip())] += math.exp(logprob)
            covered = sum(mass.values())
            if covered <= 0:
                return None
            return [mass[g] / covered for g in scale.grades], covered
    return None


@dataclass
class TeacherLabeler(PairLabeler):
    """Grades pairs through an :class:`LLMClient` with the rubric prompt."""

    FAMILY = "teacher"

    client: LLMClient
    scale: LabelScale = field(default_factory=LabelScale)
    template: str = RUBRIC_TEMPLATE
    reasoning: bool = True
    max_tokens: int = 160
    top_logprobs: int | None = 10
    n_samples: int = 0
    parse_attempts: int = 2
    structured_output: bool = True  # constrain answers to a JSON schema where the endpoint supports it

    def label_pair(self, query: str, document: str) -> dict[str, Any]:
        """One label: grade (or None), distribution, how it was obtained, the raw answer."""
        response_format = (
            self.client.endpoint.response_format("relevance_grade", grade_schema(self.scale, self.reasoning))
            if self.structured_output
            else None
        )
        messages = rubric_messages(
            query, document, self.scale, self.template, self.reasoning, structured=response_format is not None
        )
        try:
            grade, result = parse_with_retries(
                self.client,
                messages,
                lambda text: parse_grade_answer(text, self.scale),
                STAGE,
                attempts=self.parse_attempts,
                max_tokens=self.max_tokens,
                top_logprobs=self.top_logprobs,
                response_format=response_format,
            )
        except LLMError as exc:
            return {"grade": None, "distribution": None, "distribution_source": None, "answer": None, "error": str(exc)}
        label: dict[str, Any] = {
            "grade": grade,
            "distribution": None,
            "distribution_source": None,
            "answer": result.text,
            "error": None if grade is not None else "unparseable",
        }
        if grade is None:
            return label
        if result.tokens and result.top_logprobs:
            found = distribution_from_logprobs(result.tokens, result.top_logprobs, result.text, self.scale)
            if found:
                label.update(distribution=found[0], distribution_source="logprobs", logprob_mass=found[1])
        if label["distribution"] is None and self.n_samples > 0:
            label.update(
                distribution=self._sampled_distribution(messages, response_format), distribution_source="samples"
            )
        return label

    def _sampled_distribution(
        self, messages: list[Message], response_format: dict[str, Any] | None
    ) -> list[float] | None:
        counts: Counter[int] = Counter()
        for seed in range(1, self.n_samples + 1):
            try:
                text = self.client.chat(
                    messages, max_tokens=self.max_tokens, temperature=0.8, seed=seed, response_format=response_format
                ).text
            except LLMError:
                continue  # counted in the client's ledger; the distribution rests on the other samples
            try:
                counts[parse_grade_answer(text, self.scale)] += 1
            except ValueError:
                self.client.record_unparseable(
                    STAGE, messages + [{"role": "sample", "content": str(seed)}], text, "sample without a grade"
                )
        total = sum(counts.values())
        return [counts[g] / total for g in self.scale.grades] if total else None

    def label_records(
        self, records: Sequence[dict[str, Any]], labeler: str | None = None, batch_size: int = 16, progress: bool = True
    ) -> list[dict[str, Any]]:
        """Label records having ``query`` and ``document``; returns them with the label fields added.

        Besides the prediction-row fields (``grade``, ``distribution``, ``expected_relevance``, ``labeler``,
        default ``teacher:<model>``) a row keeps the record's own fields, the answer and any ``error``; a pair the
        teacher could not grade has ``grade`` None. The client's ``max_concurrency`` sets how many pairs are in
        flight at once, so ``batch_size`` is not used.
        """
        name = labeler or f"teacher:{self.client.endpoint.model}"
        labels = map_concurrent(
            lambda r: self.label_pair(r["query"], r["document"]),
            records,
            self.client.max_concurrency,
            f"{name} labels",
            progress,
        )
        return [
            {**record, **label, "expected_relevance": expected_relevance(label, self.scale.grades), "labeler": name}
            for record, label in zip(records, labels)
        ]


def expected_relevance(label: dict[str, Any], grades: Sequence[int]) -> float | None:
    """``sum(g * p_g)`` of a teacher label's distribution over ``grades``, its grade when it has none, None when it
    has no grade."""
    if label["grade"] is None:
        return None
    if label["distribution"] is None:
        return float(label["grade"])
    return float(sum(g * p for g, p in zip(grades, label["distribution"])))


def grades_by_role(labels: pd.DataFrame) -> pd.DataFrame:
    """Graded pairs counted by role (rows; one row ``all`` when the labels carry no role) and grade (columns)."""
    graded = labels[labels["grade"].notna()]
    roles = graded.get("role", pd.Series("all", index=graded.index))
    return pd.crosstab(roles.rename("role"), graded["grade"].astype(int).rename("grade"))


def plot_teacher_grades(labels: pd.DataFrame) -> Figure:
    """Stacked bars of the grades per pair role, beside the mean soft label of the pairs with a distribution."""
    by_role = grades_by_role(labels)
    fig = Figure(figsize=(11, 3.5))
    roles_ax, soft_ax = fig.subplots(1, 2)
    colormap = matplotlib.colormaps["viridis"]
    bottom = np.zeros(len(by_role))
    for grade in by_role.columns:  # one colour per grade, the same in every run
        roles_ax.bar(
            by_role.index,
            by_role[grade].to_numpy(),
            bottom=bottom,
            color=colormap(grade / max(GRADES)),
            label=str(grade),
        )
        bottom += by_role[grade].to_numpy()
    roles_ax.set(title="teacher grades by pair role", ylabel="pairs")
    if len(by_role.columns):
        roles_ax.legend(title="grade", fontsize=8)
    with_distribution = labels[labels["grade"].notna() & labels["distribution"].notna()]
    if len(with_distribution):
        mean = np.mean(np.stack(with_distribution["distribution"].to_list()), axis=0)
        soft_ax.bar(range(len(mean)), mean, color="tab:orange")
        soft_ax.set_xticks(range(len(mean)))
    soft_ax.set(title=f"mean soft label ({len(with_distribution)} pairs with a distribution)", xlabel="grade")
    fig.tight_layout()
    return fig


def import_labels(path: str | Path, source: str = "imported") -> list[dict[str, Any]]:
    """Read labels a teacher already produced: JSONL lines with ``query``, ``document``, ``grade``.

    Optional fields: ``query_id``, ``doc_id``, ``distribution`` (probabilities of grades 0..3).
    Errors name the file and line. TREC qrels go through
    :func:`labeler_utils.benchmarks.loaders.load_trec` and :func:`labels_from_frame`.
    """
    records = []
    for where, record in iter_jsonl_located(path, required=("query", "document", "grade")):
        grade = record["grade"]
        if not isinstance(grade, int) or grade not in LabelScale().grades:
            raise InputError(f"{where}: grade {grade!r} is not an integer 0-3")
        distribution = record.get("distribution")
        if distribution is not None and (
            len(distribution) != 4 or not math.isclose(sum(distribution), 1, abs_tol=1e-3)
        ):
            raise InputError(f"{where}: distribution must be 4 probabilities summing to 1")
        line = where.rsplit(":", 1)[1]
        records.append(
            {
                "query_id": str(record.get("query_id", f"q{line}")),
                "doc_id": str(record.get("doc_id", f"d{line}")),
                "query": record["query"],
                "document": record["document"],
                "grade": grade,
                "distribution": distribution,
                "distribution_source": "imported" if distribution else None,
                "labeler": source,
            }
        )
    return records


def labels_from_frame(
    frame: Any, grade_column: str, source: str, distribution_prefix: str | None = None
) -> list[dict[str, Any]]:
    """Training records from a benchmark frame column (e.g. ``recorded:deepseek_v3_umbrela``); null grades skipped.

    With ``distribution_prefix`` each record also carries the distribution in the columns
    ``<prefix>:p0`` .. ``<prefix>:p3`` (e.g. a committee's, see :func:`add_committee`).
    """
    rows = frame[frame[grade_column].notna()]
    columns = [f"{distribution_prefix}:p{g}" for g in GRADES] if distribution_prefix else None
    return [
        {
            "query_id": str(r.query_id),
            "doc_id": str(r.doc_id),
            "query": r.query,
            "document": r.document,
            "grade": int(r[grade_column]),
            "distribution": [float(r[c]) for c in columns] if columns else None,
            "distribution_source": distribution_prefix,
            "labeler": source,
        }
        for _, r in rows.iterrows()
    ]


def add_committee(frame: Any, judges: Sequence[str], name: str = "committee") -> Any:
    """The frame with a committee of recorded judges: columns ``<name>:p0..p3`` and ``<name>`` (its grade).

    Per pair, ``p_g`` is the share of the judges (columns ``judges``) that gave grade g, over the
    judges that graded the pair; the committee's grade is the grade nearest to its expected grade
    (ties go down). A pair no judge graded has no committee grade.
    """
    if not judges:
        raise ValueError("a committee needs at least one recorded judge")
    votes = np.stack(
        [np.stack([(frame[j] == g).fillna(False).to_numpy(dtype=float) for g in GRADES], axis=1) for j in judges]
    )
    counts = votes.sum(axis=0)
    graded = counts.sum(axis=1)
    shares = counts / np.maximum(graded, 1)[:, None]
    expected = shares @ np.asarray(GRADES, dtype=float)
    grade = np.ceil(expected - 0.5).astype(int)  # nearest grade, ties down
    out = frame.copy()
    for g in GRADES:
        out[f"{name}:p{g}"] = shares[:, g]
    out[name] = pd.array(np.where(graded > 0, grade, 0), dtype="Int64")
    out.loc[graded == 0, name] = pd.NA
    return out
