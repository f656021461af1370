"""Stage 02: synthetic enterprise search queries for seed documents, filtered and diagnosed.

For each document a seeded, weighted draw picks query types from an enterprise taxonomy (types
that do not fit the document are skipped); one LLM call writes the queries, prompted with the
document card (title, file, author, date, type, text), optional persona and few-shot examples
of real queries. Answers are parsed leniently (JSON, fenced JSON, numbered/bulleted lines).
Filters (:mod:`labeler_utils.query_filters`) then drop bad queries and report how many each
removed: length bounds, exact and near duplicates (also of the few-shot examples), copied spans
from the document, and the round-trip check that BM25 finds the seed document in its top-k
(InPars / Promptagator style); :func:`save_outputs` writes the stage's files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .core.artifacts import InputError, read_jsonl, write_json, write_jsonl
from .core.config import DATA_DIR, STAGES
from .documents import Document, document_card
from .llm.client import ChatResult, LLMClient, LLMError, Message, parse_with_retries
from .query_filters import FilterReport
from .text import normalize_query, word_tokens

STAGE = STAGES[2]  # this stage's folder in a run folder
DEFAULT_EXAMPLES_PATH = DATA_DIR / "example_queries.jsonl"

# --------------------------------------------------------------------------------------------
# Taxonomy
# --------------------------------------------------------------------------------------------

# Ticket ids and error codes (PAY-4012, INC-20517), constants (ERR_CERT_INVALID), hex codes (0x80070005).
CODE_TOKEN_RE = re.compile(r"\b(?:[A-Z]{2,}[-_]?\d{2,}|[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|0x[0-9A-Fa-f]{4,})\b")
# Upper-case abbreviations of 2-6 letters (CAB, PTO, SSO), optionally plural.
ACRONYM_RE = re.compile(r"\b[A-Z][A-Z0-9&]{1,5}s?\b")
HOW_TO_DOC_TYPE_RE = re.compile(r"polic|runbook|guide|how|wiki|faq|procedure|onboard|handbook|playbook|checklist", re.I)
NUMBERED_STEP_RE = re.compile(r"^\s*(?:\d+[.)]|step \d+)\s", re.I | re.M)


def _has_code(doc: Document) -> bool:
    return bool(CODE_TOKEN_RE.search(f"{doc.title}\n{doc.text}"))


def _has_acronym(doc: Document) -> bool:
    return bool(ACRONYM_RE.search(f"{doc.title}\n{doc.text}"))


def _explains_how(doc: Document) -> bool:
    return (
        bool(HOW_TO_DOC_TYPE_RE.search(f"{doc.doc_type} {doc.file_name}"))
        or len(NUMBERED_STEP_RE.findall(doc.text)) >= 3
    )


@dataclass(frozen=True)
class QueryType:
    """One kind of enterprise query: the instruction the prompt gives, and when it fits a document."""

    name: str
    instruction: str
    fits: Callable[[Document], bool]


QUERY_TYPES: dict[str, QueryType] = {
    qt.name: qt
    for qt in (
        QueryType("keyword", "2-5 keywords typed into a search box, not a sentence", lambda d: True),
        QueryType("question", "a natural-language question an employee would ask", lambda d: True),
        QueryType(
            "navigational",
            "looking for this exact document by part of its title or file name",
            lambda d: bool(d.title or d.file_name),
        ),
        QueryType(
            "people",
            "about who owns, wrote or knows about the topic, naming the person or team",
            lambda d: bool(d.author),
        ),
        QueryType("acronym", "using an acronym or internal jargon that appears in the document", _has_acronym),
        QueryType("error_code", "containing an error code, ticket number or identifier from the document", _has_code),
        QueryType("how_to", "asking how to do something or what the rule or policy is", _explains_how),
    )
}

DEFAULT_TYPE_WEIGHTS: dict[str, float] = {
    "keyword": 3.0,
    "question": 3.0,
    "navigational": 1.5,
    "people": 1.0,
    "acronym": 1.0,
    "error_code": 1.0,
    "how_to": 1.5,
}


def applicable_types(doc: Document, weights: dict[str, float]) -> list[str]:
    """Query types with a positive weight that fit the document, in taxonomy order."""
    unknown = set(weights) - set(QUERY_TYPES)
    if unknown:
        raise ValueError(f"Unknown query types {sorted(unknown)}; the taxonomy is {list(QUERY_TYPES)}")
    return [name for name, qt in QUERY_TYPES.items() if weights.get(name, 0) > 0 and qt.fits(doc)]


def draw_query_types(doc: Document, n: int, weights: dict[str, float] | None = None, seed: int = 0) -> list[str]:
    """``n`` query types for one document, drawn by weight without replacement (refilled when exhausted).

    The draw is seeded by ``seed`` and the doc id, so it does not depend on document order.
    """
    weights = DEFAULT_TYPE_WEIGHTS if weights is None else weights
    candidates = applicable_types(doc, weights)
    if not candidates:
        raise ValueError(f"No query type with a positive weight fits {doc.doc_id}; weights: {weights}")
    rng = random.Random(f"{seed}:{doc.doc_id}")
    drawn: list[str] = []
    remaining: list[str] = []
    while len(drawn) < n:
        if not remaining:
            remaining = list(candidates)
        choice = rng.choices(remaining, weights=[weights[name] for name in remaining])[0]
        remaining.remove(choice)
        drawn.append(choice)
    return drawn


def choose_persona(doc: Document, personas: Sequence[dict[str, str]] | None, seed: int = 0) -> dict[str, str] | None:
    """A persona (``role``, optional ``department``) for the document, preferring its department."""
    if not personas:
        return None
    department = str(doc.metadata.get("department", "")).lower()
    same_department = [p for p in personas if department and p.get("department", "").lower() == department]
    return random.Random(f"{seed}:persona:{doc.doc_id}").choice(same_department or list(personas))


# --------------------------------------------------------------------------------------------
# Few-shot examples and query logs
# --------------------------------------------------------------------------------------------


def read_queries(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Queries from JSONL (``query``, optional ``query_type``); None reads the built-in examples."""
    records = read_jsonl(path or DEFAULT_EXAMPLES_PATH, required=("query",))
    for line_no, record in enumerate(records, start=1):
        query_type = record.get("query_type")
        if query_type is not None and query_type not in QUERY_TYPES:
            raise InputError(
                f"{path or DEFAULT_EXAMPLES_PATH}: record {line_no} has unknown query_type "
                f"{query_type!r}; use one of {list(QUERY_TYPES)} or leave it out"
            )
    return records


def select_examples(
    examples: Sequence[dict[str, Any]], query_types: Sequence[str], k: int, rng: random.Random
) -> list[dict[str, Any]]:
    """Up to ``k`` examples: one of each requested type first (when available), then any others."""
    by_type: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for example in examples:
        by_type[example.get("query_type")].append(example)
    chosen: list[dict[str, Any]] = []
    for query_type in dict.fromkeys(query_types):
        if by_type.get(query_type) and len(chosen) < k:
            chosen.append(rng.choice(by_type[query_type]))
    rest = [e for e in examples if e not in chosen]
    chosen.extend(rng.sample(rest, min(k - len(chosen), len(rest))))
    return chosen


# --------------------------------------------------------------------------------------------
# Prompt
# --------------------------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You write realistic search queries that employees type into their company's internal search "
    "engine. Queries are short, specific and written the way people really search. Answer with JSON only."
)
USER_TEMPLATE = """Here is a document from the company intranet.

<document>
{card}
</document>

Examples of real queries from employees (for style only, do not copy them):
{examples}
{persona}
Write {n} different search queries that this document answers, one per line of this list:
{requests}

Do not copy whole sentences from the document. Answer with JSON like
{{"queries": [{{"query_type": "{first_type}", "query": "..."}}]}}"""
PERSONA_TEMPLATE = "\nWrite them as a {role}{department} would search.\n"
PROMPT_HASH = hashlib.sha256(
    json.dumps(
        [SYSTEM_PROMPT, USER_TEMPLATE, PERSONA_TEMPLATE, {name: qt.instruction for name, qt in QUERY_TYPES.items()}]
    ).encode("utf-8")
).hexdigest()


def query_messages(
    doc: Document,
    query_types: Sequence[str],
    examples: Sequence[dict[str, Any]],
    persona: dict[str, str] | None = None,
    card_chars: int = 1500,
) -> list[Message]:
    """The chat messages asking for one query per entry of ``query_types``."""
    requests = "\n".join(f"{i}. {name}: {QUERY_TYPES[name].instruction}" for i, name in enumerate(query_types, 1))
    example_lines = (
        "\n".join(
            json.dumps(
                {"query_type": e.get("query_type"), "query": e["query"]}
                if e.get("query_type")
                else {"query": e["query"]},
                ensure_ascii=False,
            )
            for e in examples
        )
        or "(none)"
    )
    persona_line = ""
    if persona:
        department = f" in {persona['department']}" if persona.get("department") else ""
        persona_line = PERSONA_TEMPLATE.format(role=persona["role"], department=department)
    user = USER_TEMPLATE.format(
        card=document_card(doc, max_chars=card_chars),
        examples=example_lines,
        persona=persona_line,
        n=len(query_types),
        requests=requests,
        first_type=query_types[0],
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def queries_schema(n: int) -> dict[str, Any]:
    """JSON schema of a structured answer: an object whose ``queries`` list holds exactly ``n`` queries."""
    item = {
        "type": "object",
        "properties": {"query_type": {"type": "string"}, "query": {"type": "string"}},
        "required": ["query_type", "query"],
        "additionalProperties": False,
    }
    queries = {"type": "array", "items": item, "minItems": n, "maxItems": n}
    return {
        "type": "object",
        "properties": {"queries": queries},
        "required": ["queries"],
        "additionalProperties": False,
    }


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

FENCE_RE = re.compile(r"```(?:json|jsonl)?\s*(.*?)```", re.S | re.I)
LIST_ITEM_RE = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•+])\s+(.+?)\s*$", re.M)
_TYPE_NAMES = "|".join(QUERY_TYPES)
# "keyword: ...", "(keyword) ...", "[question] - ..." in front of a listed query.
TYPE_PREFIX_RE = re.compile(rf"^(?:[(\[]({_TYPE_NAMES})[)\]]\s*[:\-–—]?|({_TYPE_NAMES})\s*[:\-–—])\s*", re.I)
JSON_START_RE = re.compile(r"[\[{]")
QUERY_LABEL_RE = re.compile(r"^(?:query|search)\s*[:=]\s*", re.I)


MARKDOWN_LINK_RE = re.compile(r"\[([^\]]*)\]\([^)]*\)")


def _clean_query(text: str) -> str:
    """Drop labels, markdown links and emphasis, quotes and stray brackets around a query."""
    text = MARKDOWN_LINK_RE.sub(r"\1", QUERY_LABEL_RE.sub("", text.strip()))
    text = re.sub(r"\s+", " ", text).strip().strip("\"'`“”‘’*_[]{} ").strip()
    return text.rstrip(",;").strip()


def _items_from_json(value: Any) -> list[dict[str, Any]] | None:
    """Query items from a parsed JSON value, or None when it has no recognisable shape."""
    if isinstance(value, dict):
        if isinstance(value.get("queries"), list):
            return _items_from_json(value["queries"])
        if "query" in value:
            value = [value]
        else:
            return None
    if not isinstance(value, list):
        return None
    items = []
    for element in value:
        if isinstance(element, str):
            items.append({"query": element})
        elif isinstance(element, dict) and isinstance(element.get("query"), str):
            items.append({"query": element["query"], "query_type": element.get("query_type")})
    return items or None


def _json_values(text: str) -> list[Any]:
    """Every JSON value that starts at a ``[`` or ``{`` in the text, outermost first."""
    decoder = json.JSONDecoder()
    values, position = [], 0
    while (match := JSON_START_RE.search(text, position)) is not None:
        try:
            value, end = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            position = match.start() + 1
            continue
        values.append(value)
        position = end
    return values


def prompt_reference_queries(examples: Sequence[dict[str, Any]]) -> list[str]:
    """Texts a model may parrot from the prompt: the few-shot example queries and the type instructions."""
    return [e["query"] for e in examples] + [qt.instruction for qt in QUERY_TYPES.values()]


def parse_queries(text: str, echoes: Collection[str] = ()) -> list[dict[str, Any]]:
    """Queries from a model answer: a JSON list/object(s), possibly fenced, else list lines.

    Returns dicts with ``query`` and, when the answer gave one, ``query_type``. Raises
    ``ValueError`` when nothing usable is found, or when every query only repeats one of the
    ``echoes`` (prompt texts, see :func:`prompt_reference_queries`), so that
    :func:`parse_with_retries` records the answer and asks again.
    """
    candidates = [block for block in FENCE_RE.findall(text)] + [text]
    for candidate in candidates:
        items: list[dict[str, Any]] = []
        for value in _json_values(candidate):
            items.extend(_items_from_json(value) or [])
        if items:
            break
    else:
        items = []
        for line in LIST_ITEM_RE.findall(text):
            match = TYPE_PREFIX_RE.match(line)
            query_type = (match.group(1) or match.group(2)).lower() if match else None
            items.append({"query": line[match.end() :] if match else line, "query_type": query_type})
    cleaned = [{**item, "query": _clean_query(item["query"])} for item in items]
    cleaned = [item for item in cleaned if item["query"]]
    if not cleaned:
        raise ValueError("no queries found: expected a JSON list of queries or numbered/bulleted lines")
    echo_keys = {normalize_query(echo) for echo in echoes}
    if all(normalize_query(item["query"]) in echo_keys for item in cleaned):
        raise ValueError("the answer only repeats the prompt's example queries or instructions")
    return cleaned


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    """How queries are generated (recorded as ``params`` on every query)."""

    queries_per_document: int = 4
    type_weights: dict[str, float] | None = None  # None = DEFAULT_TYPE_WEIGHTS
    few_shot_examples: int = 6
    card_chars: int = 1500
    temperature: float = 0.7
    max_tokens_per_query: int = 40
    parse_attempts: int = 2
    structured_output: bool = True  # constrain answers to a JSON schema where the endpoint supports it
    seed: int = 0


def _query_id(doc_id: str, position: int, query: str) -> str:
    return "q_" + hashlib.sha256(f"{doc_id}\n{position}\n{query}".encode()).hexdigest()[:16]


@dataclass
class PromptPlan:
    """What will be asked for one document: the query types in order, the persona, the messages."""

    document: Document
    query_types: list[str]
    persona: dict[str, str] | None
    messages: list[Message]


def plan_prompts(
    documents: Sequence[Document],
    settings: GenerationSettings,
    examples: Sequence[dict[str, Any]],
    personas: Sequence[dict[str, str]] | None = None,
) -> list[PromptPlan]:
    """The seeded type draw, persona, few-shot examples and messages for every document."""
    weights = settings.type_weights or DEFAULT_TYPE_WEIGHTS
    plans = []
    for doc in documents:
        query_types = draw_query_types(doc, settings.queries_per_document, weights, settings.seed)
        persona = choose_persona(doc, personas, settings.seed)
        shots = select_examples(
            examples, query_types, settings.few_shot_examples, random.Random(f"{settings.seed}:examples:{doc.doc_id}")
        )
        plans.append(
            PromptPlan(doc, query_types, persona, query_messages(doc, query_types, shots, persona, settings.card_chars))
        )
    return plans


def synthesize_queries(
    client: LLMClient,
    documents: Sequence[Document],
    settings: GenerationSettings = GenerationSettings(),
    examples: Sequence[dict[str, Any]] | None = None,
    personas: Sequence[dict[str, str]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Generate queries for every document; returns (query rows, counts of documents by outcome).

    Each document gets one call asking for ``queries_per_document`` typed queries. A query's type
    is the one requested at its position (small models relabel types unreliably); surplus
    queries are dropped. Answers that never parse are recorded by ``parse_with_retries``.
    """
    examples = read_queries() if examples is None else examples
    n = settings.queries_per_document
    plans = plan_prompts(documents, settings, examples, personas)
    parse = functools.partial(parse_queries, echoes=prompt_reference_queries(examples))
    chat_kwargs = {
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens_per_query * n + 32,
        "seed": settings.seed,
    }
    if settings.structured_output:
        chat_kwargs["response_format"] = client.endpoint.response_format("search_queries", queries_schema(n))

    def generate(messages: list[Message]) -> tuple[Any | None, ChatResult] | LLMError:
        try:
            return parse_with_retries(client, messages, parse, STAGE, settings.parse_attempts, **chat_kwargs)
        except LLMError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=client.max_concurrency) as pool:
        outcomes = list(
            tqdm(pool.map(generate, [plan.messages for plan in plans]), total=len(plans), desc="Query synthesis")
        )

    params = {
        **asdict(settings),
        "type_weights": settings.type_weights or DEFAULT_TYPE_WEIGHTS,
        "max_tokens": chat_kwargs["max_tokens"],
    }
    rows: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    for plan, outcome in zip(plans, outcomes):
        if isinstance(outcome, LLMError):
            counts["documents_failed_call"] += 1
            continue
        parsed, _ = outcome
        if parsed is None:
            counts["documents_unparseable"] += 1
            continue
        counts["documents_with_queries"] += 1
        counts["queries_surplus_dropped"] += max(0, len(parsed) - n)
        counts["queries_missing"] += max(0, n - len(parsed))
        for position, (item, query_type) in enumerate(zip(parsed, plan.query_types)):
            rows.append(
                {
                    "query_id": _query_id(plan.document.doc_id, position, item["query"]),
                    "query": item["query"],
                    "query_type": query_type,
                    "seed_doc_id": plan.document.doc_id,
                    "persona": plan.persona,
                    "generator_model": client.endpoint.model,
                    "prompt_hash": PROMPT_HASH,
                    "params": params,
                }
            )
    return rows, dict(counts)


def save_outputs(
    stage_path: str | Path,
    kept: Sequence[dict[str, Any]],
    rejected: Sequence[dict[str, Any]],
    report: FilterReport,
    generation_counts: dict[str, int],
) -> dict[str, Path]:
    """Write ``queries.jsonl``, ``rejected_queries.jsonl`` and ``filter_report.json``."""
    stage_path = Path(stage_path)
    paths = {name: stage_path / name for name in ("queries.jsonl", "rejected_queries.jsonl", "filter_report.json")}
    write_jsonl(paths["queries.jsonl"], kept)
    write_jsonl(paths["rejected_queries.jsonl"], rejected)
    write_json(
        paths["filter_report.json"],
        {
            **report.to_dict(),
            "generation": generation_counts,
            "kept_by_type": dict(Counter(r["query_type"] for r in kept)),
            "prompt_hash": PROMPT_HASH,
        },
    )
    return paths


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------


def plot_type_mix(kept: Sequence[dict[str, Any]], rejected: Sequence[dict[str, Any]]) -> Figure:
    """Stacked bars of kept and rejected queries per query type."""
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    names = list(QUERY_TYPES)
    kept_counts = Counter(r["query_type"] for r in kept)
    rejected_counts = Counter(r["query_type"] for r in rejected)
    ax.bar(names, [kept_counts[n] for n in names], label="kept", color="tab:green")
    ax.bar(
        names,
        [rejected_counts[n] for n in names],
        bottom=[kept_counts[n] for n in names],
        label="rejected",
        color="tab:gray",
    )
    ax.set(ylabel="queries", title="Query type mix")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_length_distribution(
    queries: Sequence[dict[str, Any]], query_log: Sequence[dict[str, Any]] | None = None
) -> Figure:
    """Histogram of query lengths in words, optionally against a real query log (as shares)."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    lengths = [len(word_tokens(r["query"])) for r in queries]
    log_lengths = [len(word_tokens(r["query"])) for r in query_log or ()]
    bins = np.arange(0, max(lengths + log_lengths + [1]) + 2) - 0.5
    ax.hist(lengths, bins=bins, density=True, alpha=0.6, label=f"synthetic (n={len(lengths)})")
    if log_lengths:
        ax.hist(log_lengths, bins=bins, density=True, alpha=0.6, label=f"real query log (n={len(log_lengths)})")
    ax.set(xlabel="words", ylabel="share of queries", title="Query length")
    ax.legend()
    fig.tight_layout()
    return fig
