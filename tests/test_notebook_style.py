"""The notebooks read as tutorials: a sentence before every step, and no helper code written inline.

Functions, classes, loops over the student families and plotting code live in ``labeler_utils``,
where they are documented and unit-tested; a notebook calls them. Fast: the cells are parsed, not run.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest
from IPython.core.inputtransformer2 import TransformerManager

from labeler_utils.core.config import STAGES
from labeler_utils.pipeline import NOTEBOOKS_DIR

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def read_cells(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell: dict[str, Any]) -> str:
    return "".join(cell["source"])


def code_tree(cell: dict[str, Any]) -> ast.Module:
    """A code cell as Python, with its IPython magics (``%matplotlib inline``) turned into calls."""
    return ast.parse(TransformerManager().transform_cell(source(cell)))


def inline_helper(node: ast.AST) -> str | None:
    """What ``node`` defines or draws inline that belongs in the package, or None."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return f"function {node.name}"
    if isinstance(node, ast.ClassDef):
        return f"class {node.name}"
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) and isinstance(node.value, ast.Lambda):
        return "a lambda assigned to a name"
    if isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "matplotlib" for alias in node.names):
        return "a matplotlib import"
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "matplotlib":
        return "a matplotlib import"
    if isinstance(node, ast.Attribute) and node.attr == "plot":
        return "a pandas .plot call"
    if isinstance(node, ast.Name) and node.id == "FAMILIES":
        return "the student-family registry (loop over it in the package)"
    return None


def has_prose(markdown: str) -> bool:
    """True when the cell has a line of text besides headings: a heading alone does not say what a step does."""
    return any(line.strip() and not line.lstrip().startswith("#") for line in markdown.splitlines())


def test_every_stage_and_the_three_extra_notebooks_are_checked():
    assert {path.stem for path in NOTEBOOKS} >= set(STAGES) and len(NOTEBOOKS) == 11


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_no_code_cell_defines_a_function_or_class_or_draws_a_plot(path):
    for number, cell in enumerate(read_cells(path)):
        if cell["cell_type"] == "code":
            for node in ast.walk(code_tree(cell)):
                found = inline_helper(node)
                assert found is None, f"{path.name} cell {number} line {node.lineno}: {found}; move it to labeler_utils"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_every_step_after_the_parameters_has_a_sentence_before_it(path):
    cells = read_cells(path)
    parameters = [i for i, cell in enumerate(cells) if "parameters" in cell["metadata"].get("tags", [])]
    assert len(parameters) == 1 and cells[0]["cell_type"] == "markdown", path.name  # an intro, then the parameters
    for number in range(parameters[0] + 1, len(cells)):
        if cells[number]["cell_type"] == "code":
            before = cells[number - 1]
            assert before["cell_type"] == "markdown", f"{path.name} cell {number} has no markdown cell before it"
            assert has_prose(source(before)), f"{path.name} cell {number - 1} is only a heading"


def test_the_checks_catch_what_they_are_for():
    bad = {
        "def f(x):\n    return x": "function f",
        "class A:\n    pass": "class A",
        "key = lambda m: m.score": "a lambda assigned to a name",
        "import matplotlib.pyplot as plt": "a matplotlib import",
        "from matplotlib import pyplot": "a matplotlib import",
        "table['words'].plot.hist()": "a pandas .plot call",
        "for name in FAMILIES:\n    pass": "the student-family registry (loop over it in the package)",
    }
    for code, expected in bad.items():
        found = [f for node in ast.walk(code_tree({"source": [code]})) if (f := inline_helper(node))]
        assert found == [expected], code
    fine = "%matplotlib inline\nbest = max(rows, key=lambda m: m.score)\nfigure = hn.plot_negative_ranks(pairs)"
    assert not [node for node in ast.walk(code_tree({"source": [fine]})) if inline_helper(node)]
    assert not has_prose("## Grade the pairs") and has_prose("## Grade the pairs\nGrade every pair.")
