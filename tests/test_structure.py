"""The shape of src/hspace: an import graph with no circle in which no library module imports the front ends
(cli, ui), and no function or class longer than a reader can hold (60 and 400 lines).

Every import statement counts, those inside functions (lazy imports) included, so that a circle cannot hide
behind an import deferred to call time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FRONT_ENDS = ("hspace.cli", "hspace.ui")
# Entry points and a domain's command group belong to the front end too.
FRONT_END_MODULES = ("hspace.__main__", "hspace.toyfaces.cli")


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    modules = {}
    for path in (root / "hspace").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if package else parts)] = (path, package)
    return modules


def _imported(module: str, package: bool, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module.split(".") if package else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module
    return [name] + [f"{name}.{a.name}" for a in node.names]


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """module -> the hspace modules it imports (anywhere in its file)."""
    modules = _modules(root)
    graph = {m: set() for m in modules}
    for module, (path, package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module].update(n for n in _imported(module, package, node) if n in modules and n != module)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_finder_sees_a_circle_through_a_lazy_import(tmp_path):
    package = tmp_path / "hspace"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import x\n")
    (package / "b.py").write_text("def f():\n    from . import a\n")
    (package / "c.py").write_text("from . import a\n")
    assert circles(import_graph(tmp_path)) == [["hspace.a", "hspace.b"]]


def test_src_has_no_import_circle():
    assert circles(import_graph()) == []


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_no_library_module_imports_a_front_end(front_end):
    graph = import_graph()
    upward = {
        m: sorted(n for n in imports if n == front_end or n.startswith(front_end + "."))
        for m, imports in graph.items()
        if not any(m == f or m.startswith(f + ".") for f in FRONT_ENDS) and m not in FRONT_END_MODULES
    }
    assert {m: n for m, n in upward.items() if n} == {}


MAX_LINES = {"function": 60, "class": 400}  # what a reader can hold


def test_no_function_is_longer_than_60_lines_and_no_class_than_400():
    long = []
    for path in sorted((SRC / "hspace").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            kind = "class" if isinstance(node, ast.ClassDef) else "function" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if kind and node.end_lineno - node.lineno + 1 > MAX_LINES[kind]:
                long.append(f"{path.relative_to(SRC)}:{node.lineno} {kind} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
