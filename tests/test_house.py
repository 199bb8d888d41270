"""House rules of the package (docs/ARCHITECTURE.md): no import cycle, short functions, one home per concept.

Read from the source with ``ast``: every import counts, function-local ones included.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import wonderland

ROOT = Path(wonderland.__file__).parent
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The wonderland modules that ``name`` imports, at any depth of its code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # ``from pkg import mod`` imports the module mod; ``from mod import name`` the module mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_cycles() -> list[list[str]]:
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_cycle_anywhere_in_the_package():
    cycles = import_cycles()
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_sees_a_function_local_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "wonderland"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from wonderland import b\n")
    (pkg / "b.py").write_text("def f():\n    from wonderland.a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", pkg)
    assert ["wonderland.a", "wonderland.b", "wonderland.a"] in import_cycles()


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                n = node.end_lineno - first + 1
                if n > limit:
                    out.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_every_function_is_at_most_60_lines():
    assert long_functions() == []


def test_backends_live_in_one_subpackage_per_framework():
    backends = ROOT / "backends"
    assert sorted(p.name for p in backends.iterdir() if p.is_dir() and p.name != "__pycache__") == ["mlx_lora", "torch_peft"]
    assert not (ROOT / "evaluate.py").exists() and not (ROOT / "adapters.py").exists() and not (ROOT / "distributed.py").exists()
