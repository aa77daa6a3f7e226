"""The package's shape: no import cycle among ffnskip modules (module-level imports, the
ones that run at import time), the engine free of grpc, redis and protobuf and of our own
settings (it is told them), and a short top level beside the packages."""

from __future__ import annotations

import ast
from pathlib import Path

import ffnskip

ROOT = Path(ffnskip.__file__).parent
GENERATED = "ffnskip.v1"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: path for name, path in found.items() if not name.startswith(GENERATED)}


def top_level_imports(path: Path, known: set[str]) -> set[str]:
    """ffnskip modules imported at module level (not inside functions)."""
    imported: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            imported |= submodules
            if len(submodules) < len(node.names):  # names defined by the module (or package face) itself
                imported.add(node.module)
    return {name for name in imported if name in known}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: top_level_imports(path, set(found)) - {name} for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_cycle_detection_finds_a_planted_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_engine_imports_no_transport() -> None:
    for name, path in modules().items():
        if name.startswith("ffnskip.engine"):
            source = path.read_text()
            for banned in ("import grpc", "import redis", "google.protobuf", "ffnskip.v1", "ffnskip.rpc", "ffnskip.store"):
                assert banned not in source, f"{name} uses {banned}"


def test_the_engine_reads_no_settings_of_its_own() -> None:
    """Settings are read once, by ffnskip.settings and the services' settings; the engine is
    passed what it needs (the cache root, compile on or off)."""
    for name, path in modules().items():
        if name.startswith("ffnskip.engine"):
            tree = ast.parse(path.read_text())
            read = [node.value for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("FFNSKIP_")]
            assert not read, f"{name} reads {read}"
            imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
            assert "ffnskip.settings" not in imported, f"{name} imports the settings reader"


def test_a_short_top_level() -> None:
    top = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "__init__")
    assert len(top) <= 10, top
