"""No import circle among the first-party packages, and nothing below toolkit/cli/ imports it.

The graph is built with ``ast`` (nothing is imported). Imports inside functions count as
edges too: they only delay a circle to the first call, and the circle still couples the
modules both ways. Imports under ``if TYPE_CHECKING:`` do not count (they never run).
A ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("toolkit", "exporters", "device_runtime", "broker_server")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, level: str = "module"):
    """(name, imported names, relative level, where) for each import, where is "module"
    or "function"; ``if TYPE_CHECKING:`` bodies skipped."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (i for child in node.orelse for i in _imports_of(child, level))
            continue
        yield from _imports_of(node, level)


def _imports_of(node: ast.AST, level: str):
    if isinstance(node, ast.Import):
        for a in node.names:
            yield a.name, (), 0, level
    elif isinstance(node, ast.ImportFrom):
        yield node.module or "", tuple(a.name for a in node.names), node.level, level
    else:
        inner = "function" if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.Lambda)) else level
        yield from _imports(node, inner)


def import_graph() -> dict[str, dict[str, str]]:
    """module -> {imported first-party module: "module" or "function"} (module-level wins)."""
    mods = _modules()
    graph: dict[str, dict[str, str]] = {m: {} for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for name, names, rel, where in _imports(ast.parse(path.read_text(), str(path))):
            if rel:
                base = mod.split(".")[: len(mod.split(".")) - rel + (1 if is_pkg else 0)]
                name = ".".join(base + ([name] if name else []))
            targets = [f"{name}.{n}" if f"{name}.{n}" in mods else name for n in names] \
                or [name]
            for t in targets:
                while t and t not in mods:  # import a.b.c where c is not a module
                    t = t.rpartition(".")[0]
                if t and t != mod and graph[mod].get(t) != "module":
                    graph[mod][t] = where
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One shortest circle through each strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def strong(v: str) -> None:  # Tarjan; the graph is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return [_shortest_circle(graph, g) for g in groups]


def _shortest_circle(graph: dict[str, dict[str, str]], group: list[str]) -> list[str]:
    members, best = set(group), None
    for start in group:
        paths, seen = [[start]], {start}
        while paths and (best is None or len(paths[0]) + 1 < len(best)):
            nxt = []
            for p in paths:
                for w in graph[p[-1]]:
                    if w == start and (best is None or len(p) + 1 < len(best)):
                        best = p + [start]
                    elif w in members and w not in seen:
                        seen.add(w)
                        nxt.append(p + [w])
            paths = nxt
    return best


# Circles in files other work on issue 21 is rewriting (strategies as plugins, wire's
# re-export); each goes when that lands, and then leaves this set: it must end empty.
KNOWN: set[frozenset] = set()  # circles tolerated for now: none


def test_no_import_circle():
    found = [c for c in cycles(import_graph()) if frozenset(c) not in KNOWN]
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_finder_finds_a_circle():
    graph = {"a": {"b": "module"}, "b": {"c": "function"}, "c": {"a": "function"}, "d": {}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_nothing_below_cli_imports_cli():
    # toolkit/__main__.py is the command's entry point (python -m toolkit), above cli/
    graph = import_graph()
    bad = sorted((m, t) for m, ts in graph.items() for t in ts
                 if t.startswith("toolkit.cli") and not m.startswith("toolkit.cli")
                 and m != "toolkit.__main__")
    assert not bad, f"imports of toolkit.cli from below it: {bad}"


if __name__ == "__main__":  # the list, with where each edge is imported
    g = import_graph()
    for c in cycles(g):
        print(" -> ".join(f"{a} ({g[a][b]})" for a, b in zip(c, c[1:])))
