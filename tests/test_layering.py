"""Layering: no import cycles inside trimrt, and the runtime stays light to embed."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import trimrt

SRC = Path(trimrt.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """trimrt module -> the trimrt modules it imports, at module level or lazily inside functions."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    found = f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
                    if found in modules and found != name:
                        edges[name].add(found)
            elif isinstance(node, ast.Import):
                edges[name].update(a.name for a in node.names if a.name in modules and a.name != name)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    edges = _imports()
    assert "trimrt.compiler.driver" in edges and edges["trimrt.compiler.driver"]  # the scan sees imports
    assert _cycles(edges) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _new_top_level_modules(statement: str) -> list[str]:
    code = ("import sys, json\nbefore = set(sys.modules)\n" + statement + "\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [m for m in json.loads(out) if m not in sys.stdlib_module_names and not m.startswith("_")]


def test_runtime_imports_only_numpy_and_onnxruntime():
    assert set(_new_top_level_modules("import trimrt.runtime")) <= {"trimrt", "numpy", "onnxruntime"}


def test_plugins_import_no_gpu_stack():
    """The op registry (schemas, references, decompositions) loads without torch, triton or tensorrt."""
    loaded = set(_new_top_level_modules("import trimrt.plugins"))
    assert not loaded & {"torch", "triton", "tensorrt"}
