"""No two megahf modules import each other, directly or through others.

The graph is read from the source with `ast` (nothing is imported). Every `import` / `from ... import` statement of a
megahf module counts, wherever it stands: at module level, under `if TYPE_CHECKING:`, and inside functions. A cycle
hidden in a function-level or type-checking import is still two modules that need each other: the circle this test
was written against (tasks.finetuning -> tasks.race -> tasks.task_data -> tasks.finetuning) ran through exactly such
imports. An edge goes to the deepest megahf module the statement names (`from . import glue` -> `megahf.tasks.glue`,
`from ..parallel import x` -> `megahf.parallel`); a package's `__init__` reached only because a submodule is imported
is not an edge (Python runs it first, whatever the submodule imports).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names a statement imports, relative imports resolved against `module`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    """megahf module -> the megahf modules it imports (see the module docstring for what counts)."""
    files = {module_name(p): p for p in (SRC / "megahf").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in imported_names(module, path.name == "__init__.py", node):
                while name and name not in files:  # `from pkg import function` names the module pkg
                    name = name.rpartition(".")[0]
                if name and name != module:
                    edges.add(name)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_is_read():
    graph = import_graph()
    assert "megahf.tasks.finetuning" in graph and "megahf.tasks.glue" in graph["megahf.tasks.finetuning"]
    assert "megahf.parallel" in graph["megahf.tasks.common"]  # `from .. import parallel`


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_megahf_modules():
    found = cycles(import_graph())
    assert not found, "megahf modules that import each other (put what they share in a lower module): " + "; ".join(
        " <-> ".join(component) for component in found)
