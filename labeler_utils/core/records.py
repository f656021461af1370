"""The grade scale and the schema of a labeler's prediction rows, and reading a grade from a value or an answer.

Grades are integers 0-3 (:data:`GRADES`). A prediction row holds ``query_id``, ``doc_id``, the hard ``grade``,
the ``expected_relevance`` ``sum(g * p_g)`` and the distribution ``p0`` ... ``p3`` (:data:`PREDICTION_COLUMNS`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .artifacts import InputError

GRADES = (0, 1, 2, 3)
PROBABILITY_COLUMNS = tuple(f"p{grade}" for grade in GRADES)
PREDICTION_COLUMNS = ("query_id", "doc_id", "grade", "expected_relevance", *PROBABILITY_COLUMNS, "labeler")


def is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def parse_grade(value: Any, where: str, allow_missing: bool = False) -> int | None:
    """A grade 0–3 from a JSON, TSV or table value; ``InputError`` naming ``where`` otherwise."""
    if is_missing(value):
        if allow_missing:
            return None
        raise InputError(f"{where}: the grade is missing")
    number = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            raise InputError(f"{where}: grade {value!r} is not an integer 0-3") from None
    if isinstance(number, (float, np.floating)) and float(number).is_integer():
        number = int(number)
    if isinstance(number, (int, np.integer)) and not isinstance(number, bool) and number in GRADES:
        return int(number)
    raise InputError(f"{where}: grade {value!r} is not an integer 0-3")


@dataclass(frozen=True)
class LabelScale:
    """A graded scale: the grades in order and what each means to the teacher."""

    grades: tuple[int, ...] = (0, 1, 2, 3)
    descriptions: dict[int, str] = field(
        default_factory=lambda: {
            3: "Perfectly relevant: the document is dedicated to the query and fully answers it.",
            2: "Highly relevant: the document answers the query, though with extra or missing detail.",
            1: "Related: the document is on the query's topic but does not answer it.",
            0: "Irrelevant: the document has nothing to do with the query.",
        }
    )

    def describe(self) -> str:
        return "\n".join(f"{g} = {self.descriptions[g]}" for g in sorted(self.grades, reverse=True))

    @classmethod
    def from_wording(cls, wording: dict[Any, str], source: str = "label_scale") -> LabelScale:
        """A scale from ``{grade: description}`` (keys may be strings, as in JSON); every grade needs a non-empty text."""
        try:
            descriptions = {int(grade): str(text).strip() for grade, text in wording.items()}
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(
                f"{source}: expected a mapping of integer grades to descriptions, got {wording!r}"
            ) from exc
        empty = sorted(g for g, text in descriptions.items() if not text)
        if empty or len(descriptions) < 2:
            raise ValueError(f"{source}: needs at least two grades, each with a description (empty: {empty})")
        return cls(grades=tuple(sorted(descriptions)), descriptions=descriptions)


_FINAL_GRADE = re.compile(r"final\s+grade\s*[:=]\s*\**\s*\[?([0-9]+)\]?", re.IGNORECASE)
_BARE_GRADE = re.compile(r"^\s*(?:grade\s*[:=]\s*)?\**([0-9]+)\**\s*\.?\s*$", re.IGNORECASE)


def parse_grade_answer(text: str, scale: LabelScale = LabelScale()) -> int:
    """The grade from ``Final grade: N`` (last occurrence), an answer that is only the digit, or JSON.

    Anything else raises ValueError: a digit somewhere in free text is never taken as a grade.
    """
    matches = _FINAL_GRADE.findall(text)
    bare = _BARE_GRADE.match(text)
    if matches:
        value = int(matches[-1])
    elif bare:
        value = int(bare.group(1))
    else:
        try:
            payload = json.loads(text.strip().removeprefix("```json").removesuffix("```").strip())
            value = int(payload["grade"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError("no 'Final grade: N' line and no JSON grade in the answer") from exc
    if value not in scale.grades:
        raise ValueError(f"grade {value} is outside the scale {scale.grades}")
    return value
