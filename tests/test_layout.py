"""The house rules that a reviewer would otherwise check by eye: ruff is clean (its settings are in pyproject.toml),
no module imports, at load time, a module that imports it back, and the arrows between folders point one way (the
engine never imports the bench harness; the core and the pipeline never import the console commands)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (ROOT / "engine", ROOT / "engine_bench")


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in package.rglob("*.py"))


def test_ruff_check_is_clean():
    pytest.importorskip("ruff")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def load_time_imports(path: Path, modules: set[str]) -> set[str]:
    """The engine modules `path` imports when it loads: module-level import statements, not those inside functions
    or under `if TYPE_CHECKING:`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_engine_module_imports_itself_back_at_load_time():
    files = source_files()
    modules = {module_name(p) for p in files}
    graph = {module_name(p): load_time_imports(p, modules) for p in files}
    assert "engine.core.engine_core" in graph and "engine.storage.files" in graph["engine.apps.run"]  # the real graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("importer,imported", [("engine", "engine_bench"), ("engine.core", "engine.apps"),
                                               ("engine.pipeline", "engine.apps")])
def test_arrows_between_folders_point_one_way(importer, imported):
    files = source_files()
    modules = {module_name(p) for p in files}
    wrong = sorted(f"{module_name(p)} imports {m}" for p in files
                   if _within(module_name(p), importer) and not _within(module_name(p), imported)
                   for m in all_imports(p, modules) if _within(m, imported))
    assert not wrong, wrong


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# Cycles held together by function-local imports: the folder split removed the last ones (engine_bench's runner and
# e2e, the sweep's runner and report); the test fails on any that comes back.
KNOWN_CYCLES: set[frozenset[str]] = set()


def all_imports(path: Path, modules: set[str]) -> set[str]:
    """The engine modules `path` imports anywhere in it, function bodies included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != module_name(path)}


def test_import_cycles_through_function_local_imports_are_only_the_known_ones():
    files = source_files()
    modules = {module_name(p) for p in files}
    graph = {module_name(p): all_imports(p, modules) for p in files}
    cycles = set()
    while (cycle := find_cycle(graph)) is not None:
        cycles.add(frozenset(cycle))
        graph[cycle[-2]] = graph[cycle[-2]] - {cycle[-1]}  # cut the cycle's last edge, look for the next
    assert cycles == KNOWN_CYCLES


def test_engine_runs_parent_imports_neither_torch_nor_transformers():
    """The parent (the command, its writer, the engine's stages) runs beside the engine core's start-up; importing
    torch there (~2 s of CPU) slows the core's own imports on a machine with few cores. torch comes in only with
    activations (engine.storage.activations imports it where it makes tensors)."""
    code = ("import sys, engine.apps.run, engine.pipeline.writer, engine.storage.output; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
