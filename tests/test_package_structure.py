"""The package's shape: no import cycle between its modules (imports inside functions count), layers, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

from labeler_utils.core.config import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "labeler_utils"
MAX_MODULE_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(source: str, name: str, is_package: bool) -> set[str]:
    """The package modules that module ``name`` imports anywhere: at the top, inside functions, under ``if``."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("labeler_utils")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            if base.startswith("labeler_utils"):
                found.add(base)
                found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def import_graph(sources: dict[str, tuple[str, bool]] | None = None) -> dict[str, set[str]]:
    """Module -> the package modules it imports; ``sources`` (name -> (code, is a package)) defaults to the package."""
    if sources is None:
        sources = {module_name(p): (p.read_text(), p.name == "__init__.py") for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in package_imports(code, name, is_package) if m in sources and m != name}
        for name, (code, is_package) in sources.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_circle_closed_inside_a_function_is_found():
    sources = {
        "labeler_utils.a": ("from .b import thing\n", False),
        "labeler_utils.b": ("def later():\n    from .a import other\n    return other\n", False),
    }
    assert find_cycle(import_graph(sources)) == ["labeler_utils.a", "labeler_utils.b", "labeler_utils.a"]


def test_no_import_cycle_between_package_modules():
    graph = import_graph()
    assert (
        "labeler_utils.students.registry" in graph
        and "labeler_utils.students.base" in graph["labeler_utils.students.registry"]
    )
    assert find_cycle(graph) is None


def test_no_module_is_over_600_lines():
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


# Each part of the package and the floor it stands on: a part imports only parts on lower floors (and itself).
FLOORS = {
    "core": 0,
    "llm": 1,
    "documents": 1,
    "students": 1,
    "text": 2,
    "benchmarks": 2,
    "query_filters": 3,
    "teacher": 3,
    "query_synthesis": 4,
    "hard_negatives": 4,
    "labeling": 5,
    "evaluate": 5,
    "throughput": 5,
    "experiments": 6,
    "pipeline": 7,
    "domain": 8,
    "__main__": 9,
}


def part_of(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_part_of_the_package_has_a_floor():
    assert {part_of(name) for name in import_graph()} - {""} <= set(FLOORS)


def test_parts_import_only_from_lower_floors():
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if part_of(module) and part_of(target) != part_of(module) and FLOORS[part_of(target)] >= FLOORS[part_of(module)]
    )
    assert upward == []
