"""The package's import graph: every intra-package import (lazy ones inside functions included) points
down the layers, so the graph has no cycles, and ``fptq.paths`` sits at the bottom."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """``{module: the fptq modules it imports}``, read with :mod:`ast` (nothing is imported). ``from X import
    name`` counts as an import of ``X.name`` when that is a module, else of ``X``."""
    files = {_module_name(p, src): p for p in (src / "fptq").rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    targets.add(sub if sub in files else target)
        graph[mod] = {t for t in targets if t in files and t != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_graph_is_read():
    graph = import_graph()
    assert "fptq.kernels.native.build" in graph["fptq.kernels.native"]
    assert "fptq.paths" in graph["fptq.kernels.native.build"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_paths_is_the_bottom():
    assert import_graph()["fptq.paths"] == set()


def test_kernels_do_not_import_model_loading():
    graph = import_graph()
    kernels = [m for m in graph if m == "fptq.kernels" or m.startswith("fptq.kernels.")]
    assert not any(t.startswith("fptq.models") for k in kernels for t in graph[k])
