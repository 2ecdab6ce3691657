"""
The benchmarks' modules import one another without a cycle, counting imports inside function bodies and modules
named in strings (``importlib.import_module``): an import graph read from the source, no server needed.
"""

from __future__ import annotations

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def import_graph(root: Path) -> dict[str, set[str]]:
    """
    Every module of the package at ``root`` and the modules of that package it imports or names.

    :param root: The package's folder.
    :return: Module name to the package's modules it depends on.
    """
    package = root.name
    names = {
        ".".join((package, *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        for path in root.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        module = ".".join((package, *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        edges = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = module.split(".")[: -node.level if path.name != "__init__.py" else len(module)]
                    base = ".".join([*parent, base] if base else parent)
                found = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found = [node.value]
            else:
                continue
            edges.update(name for name in found if name in names and name != module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """
    A cycle of the graph, if it has one.

    :param graph: Module to the modules it depends on.
    :return: The modules around a cycle, the first repeated at the end; `None` for a DAG.
    """
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for dependency in sorted(graph.get(module, ())):
            cycle = visit(dependency, [*path, module])
            if cycle:
                return cycle
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return None


def test_the_benchmarks_import_graph_has_no_cycle() -> None:
    graph = import_graph(BENCHMARKS)
    # The graph is read, not empty: the entry point reaches the harness and the child its contenders' modules.
    assert "benchmarks.runner" in graph["benchmarks.__main__"]
    assert {"benchmarks.peers", "benchmarks.baselines"} <= graph["benchmarks.child"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_a_cycle_through_a_function_body_or_a_module_name_is_found(tmp_path: Path) -> None:
    package = tmp_path / "benchmarks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def load():\n    from benchmarks.b import thing\n")
    (package / "b.py").write_text("import importlib\nimportlib.import_module('benchmarks.c')\n")
    (package / "c.py").write_text("from . import a\n")
    assert find_cycle(import_graph(package)) == ["benchmarks.a", "benchmarks.b", "benchmarks.c", "benchmarks.a"]
