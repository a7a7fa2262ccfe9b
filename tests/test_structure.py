"""The package's shape: no import cycle, small modules, no private names across modules."""

from __future__ import annotations

import ast
from pathlib import Path

import forget_me_not

ROOT = Path(forget_me_not.__file__).parent
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> list[tuple[str, list[str]]]:
    """Imports executed when the module loads (not those inside functions)."""
    found = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for target, names in _top_level_imports(path):
            if not target.startswith("forget_me_not"):
                continue
            for sub in names:  # `from pkg import module` imports the module
                if f"{target}.{sub}" in modules:
                    edges.add(f"{target}.{sub}")
            if target in modules:
                edges.add(target)
        graph[name] = edges - {name}
    return graph


def test_the_import_graph_has_no_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_a_cycle_is_found_when_there_is_one(monkeypatch):
    # The check itself can fail: a graph with a -> b -> a is reported.
    graph = {"a": {"b"}, "b": {"a"}}
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: graph, raising=False)
    state: dict[str, str] = {}
    found = []

    def visit(node):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                found.append((node, nxt))
            elif nxt not in state:
                visit(nxt)
        state[node] = "done"

    visit("a")
    assert found == [("b", "a")]


def test_modules_are_small_and_import_no_private_names():
    long = [(str(p.relative_to(ROOT)), n) for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    private = [(str(p.relative_to(ROOT)), target, name) for p in ROOT.rglob("*.py")
               for target, names in _top_level_imports(p) if target.startswith("forget_me_not")
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert not private, f"private names imported across modules: {private}"
