"""The package's shape: no import cycle among ffnskip modules (module-level imports, the
ones that run at import time), the engine free of grpc, redis and protobuf and of our own
settings (it is told them), a short top level beside the packages; the command line on top
(only ffnskip.cli reads flags, and nothing outside it imports it); modules short enough to read
(at most MAX_LINES lines, the engine's facade under ENGINE_FACADE_LINES beside its scheduler); one
decode path in the engine (the device-captured step is the GPU benchmark's); and scripts that
import the installed package as it is, without editing sys.path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ffnskip

ROOT = Path(ffnskip.__file__).parent
REPO = ROOT.parent.parent
GENERATED = "ffnskip.v1"
CLI = "ffnskip.cli"
CODE_DIRS = ("shared", "services", "scripts")  # what the line limit and the sys.path rule cover
MAX_LINES = 400
ENGINE_FACADE_LINES = 200


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: path for name, path in found.items() if not name.startswith(GENERATED)}


def top_level_imports(path: Path, known: set[str], type_only: bool = False) -> set[str]:
    """ffnskip modules imported at module level (not inside functions); with `type_only`, those
    imported for type checking only (`if TYPE_CHECKING:`) too."""
    imported: set[str] = set()
    body = ast.parse(path.read_text()).body
    if type_only:
        body += [inner for node in body if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
                 for inner in node.body]
    for node in body:
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


def test_no_cycle_even_through_imports_for_type_checking_only() -> None:
    """A type-only import that closes a circle is a circle all the same (two modules that each need
    the other's names): none, among the package's modules and the services'."""
    found = modules() | {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
                         for p in (REPO / "services").rglob("*.py")}
    edges = {name: top_level_imports(path, set(found), type_only=True) - {name} for name, path in found.items()}
    assert any(name.startswith("services.gateway") and edges[name] for name in edges)  # the services are read
    assert cycles(edges) == []


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


def test_the_gateway_loads_no_model_library() -> None:
    """The gateway routes and validates requests; it never runs a model, so its process loads
    neither torch nor transformers (they took its resident memory from about 60 MB to 400)."""
    probe = ("import sys, services.gateway.main; "
             "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def test_a_short_top_level() -> None:
    top = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "__init__")
    assert len(top) <= 10, top


def code_files(*dirs: str) -> list[Path]:
    """Python files under the repository's `dirs`, less the generated protobuf modules."""
    generated = ROOT / "v1"
    return sorted(p for d in dirs for p in (REPO / d).rglob("*.py") if generated not in p.parents)


def imported_names(tree: ast.AST) -> set[str]:
    """Every module an import statement names, anywhere in the file (functions included), with
    `from package import module` spelled `package.module`."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def in_cli(path: Path) -> bool:
    return ROOT / "cli" in path.parents


def test_only_the_command_line_imports_the_command_line() -> None:
    """ffnskip.cli is the top of the tree: library modules, services and scripts take typed
    arguments and never import it (not even inside a function)."""
    offenders = [f"{path.relative_to(REPO)} imports {name}"
                 for path in code_files(*CODE_DIRS) if not in_cli(path)
                 for name in sorted(imported_names(ast.parse(path.read_text())))
                 if name == CLI or name.startswith(CLI + ".")]
    assert not offenders, offenders


def test_only_the_command_line_reads_flags() -> None:
    """Commands are registered, and an argparse.Namespace handled, in ffnskip.cli only: the
    modules below it are given dataclasses of options (StackOptions, BenchOptions, ...)."""
    offenders = []
    for path in code_files("shared"):
        if in_cli(path):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            namespace = (isinstance(node, ast.Attribute) and node.attr == "Namespace"
                         and isinstance(node.value, ast.Name) and node.value.id == "argparse")
            namespace |= (isinstance(node, ast.ImportFrom) and node.module == "argparse"
                          and any(alias.name == "Namespace" for alias in node.names))
            registers = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                         and node.func.attr in ("add_parser", "add_subparsers"))
            if namespace or registers:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_no_module_is_over_the_line_limit() -> None:
    """A module over MAX_LINES lines does more than one job: split it by job (generated
    protobuf modules aside)."""
    lengths = {path: len(path.read_text().splitlines()) for path in code_files(*CODE_DIRS)}
    offenders = sorted((f"{path.relative_to(REPO)} ({n} lines)" for path, n in lengths.items() if n > MAX_LINES))
    assert not offenders, f"over {MAX_LINES} lines: {', '.join(offenders)}"


def test_the_engine_facade_stays_a_facade() -> None:
    """engine/engine.py adds, steps and streams requests; the admission and chunk bookkeeping lives in
    engine/scheduler.py and the model work in the executor, so the facade stays short."""
    assert (ROOT / "engine" / "scheduler.py").is_file()
    lines = len((ROOT / "engine" / "engine.py").read_text().splitlines())
    assert lines < ENGINE_FACADE_LINES, f"engine/engine.py has {lines} lines (under {ENGINE_FACADE_LINES} expected)"


def test_the_engine_has_one_decode_path() -> None:
    """The engine decodes with ModelRunner.decode on every device; the step captured whole on a device
    (and the skip rule's tensor driver) is the GPU benchmark's, in ffnskip.bench.gpu."""
    assert not (ROOT / "engine" / "device_step.py").exists() and not (ROOT / "engine" / "device_skips.py").exists()
    for name in ("device_step", "device_skips"):
        assert (ROOT / "bench" / "gpu" / f"{name}.py").is_file()
        assert not any(name in imported for path in (ROOT / "engine").glob("*.py")
                       for imported in imported_names(ast.parse(path.read_text())))


def sys_path_uses(tree: ast.AST) -> list[int]:
    """Lines that touch sys.path (insert, append, assign, `from sys import path`)."""
    lines = [node.lineno for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr == "path"
             and isinstance(node.value, ast.Name) and node.value.id == "sys"]
    lines += [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module == "sys"
              and any(alias.name == "path" for alias in node.names)]
    return sorted(lines)


def test_no_sys_path_edits() -> None:
    """Scripts (and the package and services) import ffnskip as it is installed: a helper a
    script needs lives in the package (e.g. ffnskip.bench.gpu for scripts/gpu_bench.py)."""
    offenders = [f"{path.relative_to(REPO)}:{line}" for path in code_files(*CODE_DIRS)
                 for line in sys_path_uses(ast.parse(path.read_text()))]
    assert not offenders, offenders


def test_the_checks_find_what_they_look_for() -> None:
    planted = ast.parse("import sys\nsys.path.insert(0, 'x')\nfrom sys import path\n"
                        "def f():\n    from ffnskip.cli.ops import follow_job\n    from ffnskip import cli\n")
    assert sys_path_uses(planted) == [2, 3]
    assert {"ffnskip.cli.ops", "ffnskip.cli"} <= imported_names(planted)
