"""The import graph points one way: no module imports one that imports it back (lazy and type-checking imports
count too), and the packages stack in layers: stages above report above benchmark above runtime above batches."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = ("stages", "report", "benchmark", "runtime", "batches", "llm", "models", "transforms", "probe")
"""The packages whose graph must have no cycle (``io`` and ``config`` hold both the lowest helpers and the corpus
readers, which read the config: they are checked at module level only)."""


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "clipaudit").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the clipaudit modules it imports anywhere in its body."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
                targets += submodules if len(submodules) == len(node.names) else [base, *submodules]
            elif isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            graph[name] |= {t for t in targets if t in known and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    def package(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 2 and parts[1] in PACKAGES else None

    out: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for source, targets in graph.items():
        for target in targets:
            a, b = package(source), package(target)
            if a and b and a != b:
                out[a].add(b)
    return out


def test_no_module_imports_one_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_packages_stack_in_layers():
    graph = package_graph(import_graph())
    cycle = find_cycle(graph)
    assert cycle is None, "package cycle: " + " -> ".join(cycle)
    assert "benchmark" in graph["report"] and "report" in graph["stages"]
    for low, high in (("benchmark", "report"), ("report", "stages"), ("runtime", "stages"), ("batches", "runtime"),
                      ("llm", "runtime"), ("transforms", "report")):
        assert high not in graph[low], f"{low} imports {high}"


def test_the_checker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
