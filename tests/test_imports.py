"""Modules of countdown import downward only: no cycle, function-level imports included.

Run it as a script to print the import graph:  python tests/test_imports.py
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "countdown"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    base = module if is_package else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        base = base.rsplit(".", 1)[0]
    target = f"{base}.{node.module}" if node.module else base
    # `from . import kernels` names a submodule; `from .api import sparsify` names the module
    return [f"{target}.{alias.name}" for alias in node.names] + [target]


def import_graph() -> dict[str, set[str]]:
    """{module: countdown modules it imports anywhere in its body}."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "tasks" not in p.relative_to(PACKAGE).parts[:1]}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                candidates = _resolve(name, path.name == "__init__.py", node)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("countdown"):
                candidates = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names if a.name.startswith("countdown")]
            else:
                continue
            edges.update(c for c in candidates if c in files)
        # a package's __init__ is imported by its submodules' importers; not an edge of its own
        graph[name] = {e for e in edges if e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # a submodule importing its own package's __init__ is how Python runs it, not a cycle
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_including_function_level_imports():
    graph = import_graph()
    assert "countdown.api" in graph and "countdown.ffn" in graph["countdown.api"]
    cycle = find_cycle({k: v - {"countdown"} for k, v in graph.items() if k != "countdown"})
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


if __name__ == "__main__":
    for module, imports in sorted(import_graph().items()):
        print(f"{module}: {', '.join(sorted(i.removeprefix('countdown.') for i in imports)) or '-'}")
