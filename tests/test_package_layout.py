"""The package's layout: no module of scrapy_ingest imports, even from inside a function, a
module that imports it back (directly or through others).

The graph is read from the source, not from ``sys.modules``: every ``import`` statement counts,
at module level or in a function, except those in an ``if TYPE_CHECKING:`` block (never run).
A package's ``__init__`` run by importing one of its modules is not an edge: only what a
statement names is.

The types are layered the same way: with the ``TYPE_CHECKING`` imports counted too, the only
cycles allowed go through ``scrapy_ingest/__init__.py``, whose type-only imports name the
classes it exports lazily (on first use).
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import scrapy_ingest

#: module -> {imported module: the line of the first statement that imports it}
Graph = dict[str, dict[str, int]]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Each module of the package in *root* (its directory), by dotted name."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph(root: Path, package: str, *, typing: bool = False) -> Graph:
    """The imports of the package in *root* between its own modules; with *typing*, those under
    ``if TYPE_CHECKING:`` too."""
    modules = module_names(root, package)
    return {
        name: _imports(name, path, set(modules), typing=typing) for name, path in modules.items()
    }


def _imports(name: str, path: Path, modules: set[str], *, typing: bool) -> dict[str, int]:
    found: dict[str, int] = {}
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in sorted(_statements(tree, typing=typing), key=lambda node: node.lineno):
        if isinstance(node, ast.Import):
            targets = [_known(alias.name, modules) for alias in node.names]
        else:
            base = _absolute(node, here)
            # ``from pkg import mod`` imports pkg.mod; ``from pkg import name`` imports pkg
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        for target in targets:
            if target in modules and target != name:
                found.setdefault(target, node.lineno)
    return found


def _statements(tree: ast.AST, *, typing: bool) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of *tree*, except under ``if TYPE_CHECKING:`` (unless *typing*)."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and not typing and _is_type_checking(node.test):
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))
    return found


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _absolute(node: ast.ImportFrom, here: str) -> str:
    if not node.level:
        return node.module or ""
    parts = here.split(".")
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _known(name: str, modules: set[str]) -> str:
    """The module ``import a.b.c`` binds and runs last: the longest prefix that is ours."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle of *graph* (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done, no cycle through it
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        state[start] = 1
        branches = [iter(sorted(graph[start]))]
        while branches:
            target = next(branches[-1], None)
            if target is None:
                state[path.pop()] = 2
                branches.pop()
            elif state.get(target) == 1:
                return [*path[path.index(target) :], target]
            elif not state.get(target):
                state[target] = 1
                path.append(target)
                branches.append(iter(sorted(graph.get(target, ()))))
    return None


def describe_cycle(cycle: list[str], graph: Graph) -> str:
    steps = [
        f"{source} imports {target} (line {graph[source][target]})"
        for source, target in itertools.pairwise(cycle)
    ]
    return "import cycle: " + " -> ".join(cycle) + "\n  " + "\n  ".join(steps)


ROOT = Path(scrapy_ingest.__file__).parent


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(ROOT, "scrapy_ingest")
    assert "scrapy_ingest.backends.base" in graph["scrapy_ingest.backends.postgres"]
    cycle = find_cycle(graph)
    assert cycle is None, describe_cycle(cycle, graph)


def test_no_type_only_import_cycle_either() -> None:
    # the backends and the spill journal once imported each other's types: the rows and
    # outcomes they share are below both now (scrapy_ingest/_shapes.py)
    graph = import_graph(ROOT, "scrapy_ingest", typing=True)
    assert "scrapy_ingest.schema" in graph["scrapy_ingest.spill"]  # a type-only import
    graph["scrapy_ingest"] = {}
    cycle = find_cycle(graph)
    assert cycle is None, describe_cycle(cycle, graph)


def test_cycles_through_functions_count_type_checking_does_not(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import low\n")
    (package / "sub" / "low.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.top import Top\n"
    )
    (package / "top.py").write_text("import pkg.sub.low\n")
    graph = import_graph(package, "pkg")
    assert graph["pkg.sub"] == {"pkg.sub.low": 1}
    assert graph["pkg.top"] == {"pkg.sub.low": 1}
    assert find_cycle(graph) is None
    assert find_cycle(import_graph(package, "pkg", typing=True)) == [
        "pkg.sub.low",
        "pkg.top",
        "pkg.sub.low",
    ]

    (package / "sub" / "low.py").write_text(
        "def later():\n    from ..top import Top\n    return Top\n"
    )
    graph = import_graph(package, "pkg")
    assert find_cycle(graph) == ["pkg.sub.low", "pkg.top", "pkg.sub.low"]
    assert "pkg.sub.low imports pkg.top (line 2)" in describe_cycle(
        ["pkg.sub.low", "pkg.top", "pkg.sub.low"], graph
    )
