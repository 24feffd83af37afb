"""Bytecode of the heavy imports: kept under the cache dir where Python would compile torch and transformers from
source at every start, and compiled in parallel, ahead of the stages' imports, where none exists yet.

A start-up without bytecode for torch, transformers and what they import (sympy, numpy, triton, ...) compiles a
few thousand modules one after another in every process that imports them; a pool of processes compiling the same
files, in the order the imports reach them, has the bytecode there before most imports ask for it. Python checks
each bytecode file against its source, so what runs is the same either way.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import py_compile
import subprocess
import sys
import threading

from engine.config import default_cache_dir

log = logging.getLogger("engine")
PACKAGES = ("torch", "transformers")  # the heavy imports whose bytecode decides a start-up's imports
# What a core imports, heaviest first (the order the pool compiles them in): torch and transformers, then what
# torch.compile and the model load bring in.
PRECOMPILED = ("torch", "transformers", "sympy", "numpy", "triton", "mpmath", "jinja2", "markupsafe",
               "huggingface_hub", "safetensors", "tokenizers", "filelock", "fsspec", "packaging", "yaml", "tqdm",
               "regex", "networkx", "typing_extensions")
# Folders no start-up imports: test suites, and transformers' model folders (a run imports one of them; its
# auto mappings are imported always).
SKIPPED = ("tests", "test", "_internal", "benchmarks", "examples")
MIN_WORKERS = 4  # with fewer free cores the pool would slow the imports it is meant to speed up


def use_bytecode_cache() -> None:
    """Where torch or transformers has no bytecode that Python will write itself (installed with `pip install
    --no-compile` into a folder this user cannot write, or with writing turned off by PYTHONDONTWRITEBYTECODE, as
    many container images do), Python compiles their modules from source at every start. Then keep the compiled
    bytecode under the engine's cache dir instead (PYTHONPYCACHEPREFIX, for this process and the processes it
    starts; the install itself is never written): logged at info level. Where the bytecode Python will use does
    not exist yet (that cache's first run, or an install made without bytecode, as uv makes them), compile it in
    the background now. ENGINE_BYTECODE_CACHE=0 turns both off."""
    if os.environ.get("ENGINE_BYTECODE_CACHE") == "0":
        return
    prefix = os.path.join(default_cache_dir(), "pycache")
    if sys.pycache_prefix == prefix:  # a stage of an engine process that chose it: spawn passes its parent's
        sys.dont_write_bytecode = False  # start-up flags (-B under PYTHONDONTWRITEBYTECODE), not its later choice
        return
    name = None if sys.pycache_prefix else _missing_bytecode()
    if name is not None:
        sys.pycache_prefix = os.environ["PYTHONPYCACHEPREFIX"] = prefix
        if sys.dont_write_bytecode:
            sys.dont_write_bytecode = False
            os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # so the stages this process starts write it there too
        log.info("%s has no bytecode Python would write: compiled modules are kept in %s (ENGINE_BYTECODE_CACHE=0 "
                 "turns this off)", name, prefix)
    if not sys.dont_write_bytecode:
        precompile()


def _missing_bytecode() -> str | None:
    """The first of PACKAGES whose bytecode is absent and would not be written by Python itself."""
    for name in PACKAGES:
        cached = _cached_init(name)
        if cached is None or os.path.exists(cached):
            continue
        folder = os.path.dirname(cached)
        if sys.dont_write_bytecode or not os.access(folder if os.path.isdir(folder) else os.path.dirname(folder),
                                                    os.W_OK):
            return name
    return None


def _cached_init(name: str) -> str | None:
    """Where the bytecode of package `name`'s __init__ is (under the current pycache prefix), found without
    importing it; None where the package is absent or has no source."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return importlib.util.cache_from_source(spec.origin)


def precompile(packages: tuple[str, ...] = PRECOMPILED, workers: int | None = None) -> list[subprocess.Popen]:
    """Start `workers` processes (default: the free cores but two, at least MIN_WORKERS) that compile the bytecode
    of `packages` where Python will look for it, unless the first package's already exists. They write as Python
    does (atomically, so an import never reads half a file), end on their own when done (about a second on 16
    cores), and run at a lower priority than the engine."""
    cached = _cached_init(packages[0])
    if cached is None or os.path.exists(cached):
        return []
    count = workers if workers is not None else len(os.sched_getaffinity(0)) - 2
    if count < MIN_WORKERS and workers is None:
        log.debug("no bytecode for %s yet; %d free cores are too few to compile it ahead", packages[0], count)
        return []
    procs = [subprocess.Popen([sys.executable, "-m", "engine.bytecode", str(count), str(i), *packages],
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
             for i in range(count)]
    threading.Thread(target=_reap, args=(procs,), name="bytecode-reaper", daemon=True).start()
    log.info("no bytecode for %s yet: %d processes compile it ahead of the imports", packages[0], count)
    return procs


def _reap(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.wait()


def source_files(packages: tuple[str, ...]) -> list[str]:
    """Every module source of `packages` a start-up may import, package by package in the given order, each
    package's folders in sorted order (so its __init__ and the modules it imports first come early)."""
    files = []
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        if not spec.submodule_search_locations:
            files.extend([spec.origin] if spec.origin and spec.origin.endswith(".py") else [])
            continue
        for root in spec.submodule_search_locations:
            files.extend(_walk(root, name))
    return files


def _walk(root: str, package: str) -> list[str]:
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED and not d.startswith((".", "__"))
                         and not (package == "transformers" and os.path.basename(folder) == "models" and d != "auto"))
        found.extend(os.path.join(folder, n) for n in sorted(names) if n.endswith(".py"))
    return found


def compile_share(index: int, count: int, packages: tuple[str, ...]) -> int:
    """Compile every `count`-th file of `packages` from the `index`-th on, skipping those that have bytecode
    already; a file that does not compile is left to the import that needs it (which reports it). Returns how many
    were compiled."""
    done = 0
    for path in source_files(packages)[index::count]:
        if os.path.exists(importlib.util.cache_from_source(path)):
            continue
        try:
            py_compile.compile(path, doraise=True, quiet=2)
        except (py_compile.PyCompileError, OSError, ValueError):
            continue
        done += 1
    return done


def main(argv: list[str]) -> int:
    """`python -m engine.bytecode COUNT INDEX PACKAGE...`: one of the workers precompile starts."""
    os.nice(10)
    compile_share(int(argv[1]), int(argv[0]), tuple(argv[2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
