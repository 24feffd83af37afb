"""The persistent compile cache: compiled layers equal eager ones, a second run loads what the first compiled, and a
cache that is damaged, from other versions or unsealed is ignored with one logged line, never a crash or a wrong
result; a folder another run uses is never cleared under it."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from support import PROMPTS, tiny_config
from engine import Engine
from engine.core.compile_cache import MANIFEST, CompileCache
from engine.config import SamplingDefaults

KEY = {"format": 1, "model": {"hidden_size": 64}, "torch": "2.13.0", "device": "cpu x86_64"}


@pytest.fixture(autouse=True)
def _compile_env(monkeypatch, tmp_path):
    """CompileCache.open points this process's Inductor and Triton at its folder: put them back after each test."""
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "before"))


def greedy(cache_dir: Path, mode: str) -> list[list[int]]:
    sampling = SamplingDefaults(max_new_tokens=4, ignore_eos=True, temperature=0.0)
    with Engine(tiny_config(compile=mode, cache_dir=str(cache_dir), sampling=sampling)) as engine:
        return [r["completion_token_ids"] for r in engine.generate_all([{"prompt": p} for p in PROMPTS[:3]])]


def compile_folder(cache_dir: Path) -> Path:
    (folder,) = [p for p in (cache_dir / "compile").iterdir() if p.is_dir() and not p.name.startswith("private-")]
    return folder


def artefacts(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*")
            if p.is_file() and p.name not in ("use.lock", "manifest.lock")}


def cache_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "compile cache" in line]


def test_compiled_layers_load_from_the_cache_and_a_damaged_cache_is_compiled_afresh(tmp_path, capfd):
    cache_dir = tmp_path / "cache"
    eager = greedy(cache_dir, "off")
    assert greedy(cache_dir, "on") == eager  # cold: Inductor's C++ kernels on the CPU, the same tokens
    folder = compile_folder(cache_dir)
    sealed = artefacts(folder)
    assert MANIFEST in sealed and any(name.startswith("inductor/") for name in sealed)
    capfd.readouterr()
    assert greedy(cache_dir, "on") == eager  # warm: everything found, nothing compiled again
    assert artefacts(folder) == sealed and not cache_lines(capfd.readouterr().err)
    listed = json.loads((folder / MANIFEST).read_text())["files"]
    victim = folder / max(listed, key=lambda name: listed[name][0])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert greedy(cache_dir, "on") == eager
    (line,) = cache_lines(capfd.readouterr().err)
    assert "damaged" in line and "compiling afresh" in line
    assert json.loads((folder / MANIFEST).read_text())["files"]  # compiled again and sealed again


def make_sealed(tmp_path: Path) -> CompileCache:
    cache = CompileCache(str(tmp_path), KEY)
    cache.open()
    kernel = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "fxgraph" / "ab" / "entry"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(b"compiled code" * 100)
    cache.seal()
    cache.release()
    return cache


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "wrong size"), ("versions", "built for other torch"), ("manifest", "manifest is unreadable"),
    ("no manifest", "no manifest"), ("missing", "is missing"),
])
def test_a_cache_that_cannot_be_trusted_is_cleared_with_one_line(tmp_path, caplog, damage, reason):
    folder = make_sealed(tmp_path).folder
    manifest = folder / MANIFEST
    entry = folder / "inductor" / "fxgraph" / "ab" / "entry"
    if damage == "truncate":
        entry.write_bytes(b"compiled")
    elif damage == "versions":
        data = json.loads(manifest.read_text())
        data["key"]["torch"] = "2.0.0"
        manifest.write_text(json.dumps(data))
    elif damage == "manifest":
        manifest.write_text('{"key": ')
    elif damage == "no manifest":
        manifest.unlink()
    else:
        entry.unlink()
    cache = CompileCache(str(tmp_path), KEY)
    with caplog.at_level(logging.WARNING, logger="engine"):
        cache.open()
    (record,) = [r for r in caplog.records if "compile cache" in r.getMessage()]
    assert reason in record.getMessage() and "compiling afresh" in record.getMessage()
    assert not entry.exists() and not manifest.exists() and cache.folder == folder  # cleared, used again
    cache.release()


def test_a_sound_cache_is_used_as_it_is_and_files_no_run_sealed_go(tmp_path, caplog):
    folder = make_sealed(tmp_path).folder
    stray = folder / "inductor" / "stray"
    stray.write_bytes(b"half written by a run that was killed")
    cache = CompileCache(str(tmp_path), KEY)
    with caplog.at_level(logging.WARNING, logger="engine"):
        cache.open()
    assert not caplog.records and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder / "inductor")
    assert (folder / "inductor" / "fxgraph" / "ab" / "entry").exists() and not stray.exists()
    cache.release()


def test_a_folder_in_use_by_another_run_is_never_cleared_under_it(tmp_path, caplog):
    folder = make_sealed(tmp_path).folder
    other = CompileCache(str(tmp_path), KEY)
    other.open()  # another run, still running: it holds the folder's shared lock
    stray = folder / "inductor" / "being-written"
    stray.write_bytes(b"the other run's fresh kernel")
    (folder / "inductor" / "fxgraph" / "ab" / "entry").write_bytes(b"damaged")
    cache = CompileCache(str(tmp_path), KEY)
    with caplog.at_level(logging.WARNING, logger="engine"):
        cache.open()
    (record,) = [r for r in caplog.records if "compile cache" in r.getMessage()]
    assert "another run uses it" in record.getMessage() and cache.is_private and cache.folder != folder
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(cache.folder)) and stray.exists()
    private = cache.folder
    cache.release()
    other.release()
    assert not private.exists()
