"""The compile cache that persists across runs: Inductor's and Triton's artefacts under the engine's cache dir.

torch.compile'd decoder layers and the engine's Triton kernels cost seconds to build and a fraction of that to load
from their caches (Inductor's FX-graph and AOTAutograd caches, Triton's kernel cache). Those caches live in /tmp by
default, shared by everything on the machine and gone after a reboot; here each (model shape, dtype, device,
versions) key gets its own folder, `<cache dir>/compile/<key digest>/`, with a manifest of the key and of every
file's size and digest, written once a run's start-up has compiled what it needs.

A run verifies the folder before it compiles: a folder without a manifest, with another key (other versions of
torch, Triton, CUDA or the engine), or whose files differ from the manifest (a truncated or damaged file) is
ignored with one logged line and compiled afresh, so a damaged cache costs the cold start-up, never a crash or a
wrong result. Several runs may share a folder: each holds a shared lock on it while it runs; a folder is cleared only
under the exclusive lock (no other run using it), and otherwise a run that finds it unusable compiles into a folder
of its own, removed when it ends.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

from engine.storage.files import write_atomic

log = logging.getLogger("engine")

MANIFEST = "manifest.json"
USE_LOCK = "use.lock"  # shared while a run uses the folder, exclusive to clear it
MANIFEST_LOCK = "manifest.lock"  # exclusive while the manifest is read or rewritten
OWN_FILES = {MANIFEST, USE_LOCK, MANIFEST_LOCK}
FORMAT = 1


def cache_key(model_config, dtype, device: str) -> dict:
    """What compiled artefacts depend on: the model's shape (its text config), dtype, the device and the versions of
    everything that generates or runs code. A change in any of them is another folder."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        from importlib.metadata import version

        engine_version = version("steer-engine")
    except ImportError:
        engine_version = None
    shape = json.loads(json.dumps(model_config.get_text_config().to_dict(), sort_keys=True, default=str))
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        device_name = f"{props.name} sm_{props.major}{props.minor}"
    else:
        device_name = f"cpu {platform.machine()}"
    return {"format": FORMAT, "model": shape, "dtype": str(dtype), "device": device_name, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_version, "python": platform.python_version(),
            "engine": engine_version}


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class CompileCache:
    """One run's use of a key's folder: `open` verifies it and points Inductor and Triton at it; `seal` records what
    the run compiled; `close` lets go of it."""

    def __init__(self, cache_dir: str, key: dict):
        self.key = key
        self.root = Path(cache_dir) / "compile"
        self.folder = self.root / _digest(json.dumps(key, sort_keys=True).encode())
        self.is_private = False  # compiling into a folder of its own (the shared one was unusable and in use)
        self.is_warm = False  # it holds a sealed, verified build of this key: start-up loads instead of compiling
        self._use_fd: int | None = None

    # ---- opening
    def open(self) -> None:
        """Verify the folder (clearing or leaving it, see the module doc) and make it the compile caches' home."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._use_fd = os.open(self.folder / USE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._use_fd, fcntl.LOCK_SH)
            problem, unsealed = self._check()
            self.is_warm = problem is None and (self.folder / MANIFEST).exists()
            if problem is not None:
                self._start_afresh(problem)
            elif unsealed and self._try_exclusive():
                self._remove(unsealed)  # a run that died before sealing left them, and no run uses them now
                fcntl.flock(self._use_fd, fcntl.LOCK_SH)
        except OSError as exc:  # an unwritable cache dir: compile into a private folder, the same results
            log.warning("compile cache %s cannot be used (%s); this run compiles into a temporary folder",
                        self.folder, exc)
            self._go_private()
        self._point_caches()

    def _check(self) -> tuple[str | None, list[Path]]:
        """(why the folder cannot be used, or None; files no manifest lists)."""
        files = self._files()
        with self._manifest_lock():
            path = self.folder / MANIFEST
            if not path.exists():
                return ("it has no manifest (left by a run that stopped before its start-up ended)" if files
                        else None), []
            try:
                manifest = json.loads(path.read_text(encoding="utf-8"))
                listed = manifest["files"]
                key = manifest["key"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                return f"its manifest is unreadable ({type(exc).__name__}: {exc})", []
        if key != self.key:
            changed = sorted(k for k in set(key) | set(self.key) if key.get(k) != self.key.get(k))
            return f"it was built for other {', '.join(changed)}", []
        present = {p.relative_to(self.folder).as_posix(): p for p in files}
        for name, entry in listed.items():
            path = present.get(name)
            if path is None:
                return f"{name} is missing", []
            if not isinstance(entry, list) or len(entry) != 2 or path.stat().st_size != entry[0]:
                return f"{name} has the wrong size", []
            if _digest(path.read_bytes()) != entry[1]:
                return f"{name} is damaged (its digest differs from the manifest's)", []
        return None, [p for name, p in present.items() if name not in listed]

    def _start_afresh(self, problem: str) -> None:
        if self._try_exclusive():
            self._remove(self._files() + [self.folder / MANIFEST])
            fcntl.flock(self._use_fd, fcntl.LOCK_SH)
            log.warning("compile cache %s ignored: %s; compiling afresh (one cold start-up)", self.folder, problem)
            return
        log.warning("compile cache %s ignored: %s; another run uses it, so this run compiles into a temporary "
                    "folder", self.folder, problem)
        self._go_private()

    def _go_private(self) -> None:
        self.release()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            base = str(self.root)
        except OSError:
            base = None  # the system's temporary folder
        self.folder = Path(tempfile.mkdtemp(prefix="private-", dir=base))
        self.is_private = True

    def _try_exclusive(self) -> bool:
        try:
            fcntl.flock(self._use_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _point_caches(self) -> None:
        """Inductor reads TORCHINDUCTOR_CACHE_DIR whenever it looks something up, Triton its own variable when it
        builds a kernel; both are set before anything compiles. A warm folder also turns off Inductor's pool of
        compile worker processes: it would start a process per core (each importing torch, contending with this
        one's start-up, and slow to stop at exit) to compile nothing."""
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.folder / "inductor")
        os.environ["TRITON_CACHE_DIR"] = str(self.folder / "triton")
        if self.is_warm:
            import torch._inductor.config

            torch._inductor.config.compile_threads = 1

    # ---- after compiling
    def seal(self) -> None:
        """Write the manifest: the key and every file now in the folder (files already listed with the same size are
        not read again). Called once start-up has compiled, and when the run ends."""
        if self.is_private or self._use_fd is None:
            return
        try:
            with self._manifest_lock():
                path = self.folder / MANIFEST
                try:
                    old = json.loads(path.read_text(encoding="utf-8"))["files"] if path.exists() else {}
                except (OSError, ValueError, KeyError, TypeError):
                    old = {}
                listed = {}
                for file in self._files():
                    name, size = file.relative_to(self.folder).as_posix(), file.stat().st_size
                    entry = old.get(name)
                    listed[name] = entry if isinstance(entry, list) and entry[:1] == [size] else \
                        [size, _digest(file.read_bytes())]
                write_atomic(path, json.dumps({"key": self.key, "files": listed}, indent=1).encode())
        except OSError as exc:
            log.warning("compile cache %s: could not write its manifest (%s); the next run compiles afresh",
                        self.folder, exc)

    def discard(self) -> None:
        """Stop using this folder's artefacts (a compile failed with them): compile into a private folder."""
        log.warning("compile cache %s: compiling with it failed; compiling afresh in a temporary folder", self.folder)
        self.is_warm = False
        self._go_private()
        self._point_caches()

    def release(self) -> None:
        """Let go of the shared folder; a private one is removed."""
        if self._use_fd is not None:
            os.close(self._use_fd)
            self._use_fd = None
        if self.is_private:
            shutil.rmtree(self.folder, ignore_errors=True)

    # ---- files
    def _files(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file() and not p.is_symlink()
                      and not (p.parent == self.folder and p.name in OWN_FILES))

    def _remove(self, paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)
        for sub in ("inductor", "triton"):
            if (self.folder / sub).exists() and not any(p.is_file() for p in (self.folder / sub).rglob("*")):
                shutil.rmtree(self.folder / sub, ignore_errors=True)

    def _manifest_lock(self):
        return _Flock(self.folder / MANIFEST_LOCK)


class _Flock:
    """An exclusive flock on `path` for a `with` block."""

    def __init__(self, path: Path):
        self.path, self._fd = path, None

    def __enter__(self):
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._fd)
