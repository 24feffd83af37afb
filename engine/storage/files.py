"""Durable-file helpers, one copy each: atomic writes with a directory fsync, complete-line reading, moving files
aside, an exclusive lock per file, free-space checks; and the one reader of JSON that comes from outside."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path


class JsonUnreadable(ValueError):
    """Text that is not JSON this process can read; the message says why, worded to follow "is not valid JSON: "."""


def parse_json(text: str | bytes, constants: bool = False):
    """json.loads for input from outside (records, request bodies, user files): every way that fails is
    JsonUnreadable, so one except clause covers them: a syntax error, bytes that are not UTF-8, NaN or Infinity (not
    JSON; with `constants` they read as floats, for a caller whose own checks name the field that holds one),
    nesting deeper than Python's parser recurses (RecursionError) and an integer of more digits than Python converts
    (a plain ValueError)."""
    try:
        return json.loads(text, parse_constant=None if constants else _no_constant)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}" if exc.lineno > 1 else f"column {exc.colno}"
        raise JsonUnreadable(f"{exc.msg} at {where}") from None
    except UnicodeDecodeError as exc:
        raise JsonUnreadable(f"it is not UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except RecursionError:
        raise JsonUnreadable("it nests arrays or objects too deeply to read") from None
    except JsonUnreadable:
        raise
    except ValueError as exc:
        raise JsonUnreadable(f"it holds a number too long to read ({exc})") from None


def _no_constant(name: str):
    raise JsonUnreadable(f"{name} is not a JSON number (the JSON standard has no NaN or Infinity); write a number, "
                         f"null or a string")


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by its path; a folder's makes a rename or a new file in it durable (a file's own fsync
    does not cover its directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write `data` (bytes, or chunks streamed one by one, which may still read the old file) to a temporary file,
    fsync, rename, fsync the folder: readers see the old file or the new one, never a part. A crash or an error
    while writing leaves `path` as it was (and at most the temporary file, which the next write replaces)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            f.writelines(data)
    commit_file(tmp, path)


def commit_file(tmp: Path, path: Path) -> None:
    """Make the finished file `tmp` (written by anything: safetensors, a vector writer) the file `path`, durably:
    fsync it, rename it over `path`, fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def complete_lines(path: Path, cut: bool = False) -> Iterator[bytes]:
    """The complete lines of a file, streamed: a last line cut short by a crash is left out (with `cut`, truncated
    away first, so appending goes on after the last whole line); nothing if the file is absent."""
    if not path.exists():
        return
    if cut:
        with path.open("rb") as f:
            good_end = sum(len(raw) for raw in f if raw.endswith(b"\n"))
        if good_end < path.stat().st_size:
            with path.open("r+b") as f:
                f.truncate(good_end)
    with path.open("rb") as f:
        yield from (raw for raw in f if raw.endswith(b"\n"))


def complete_records(path: Path) -> Iterator:
    """The JSON values of a file's complete lines, streamed; a line that is not JSON is skipped."""
    for raw in complete_lines(path):
        try:
            yield json.loads(raw)
        except json.JSONDecodeError:
            continue


def write_problem(folder: Path) -> str | None:
    """Why files could not be made in `folder` (which may not exist yet: its nearest existing ancestor is tried), in
    words a user can act on; None if they can. Probed with a temporary file, since permissions alone do not tell
    (root, read-only mounts)."""
    try:
        folder = folder.absolute()
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    except OSError as exc:  # e.g. a name too long for the file system
        return f"cannot use it ({exc.strerror or exc})"
    if not folder.is_dir():
        return f"{folder} is a file, not a folder, so nothing can be made under it"
    try:
        handle, name = tempfile.mkstemp(prefix=".engine-probe-", dir=folder)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        return f"cannot write in {folder} ({exc.strerror or exc})"
    return None


def time_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def aside_path(path: Path, stamp: str | None = None) -> Path:
    """Where `path` goes when it is moved (or copied) aside: `<name>.replaced-<UTC time>` beside it."""
    return path.with_name(f"{path.name}.replaced-{stamp or time_stamp()}")


def move_aside(paths: list[Path], stamp: str | None = None) -> list[Path]:
    """Rename each existing path (file or folder) to `aside_path(path)`, all with one time; returns the new paths."""
    stamp = stamp or time_stamp()
    return [path.rename(aside_path(path, stamp)) for path in paths if path.exists()]


class Locked(RuntimeError):
    """Another process holds the lock; the message names it."""


class FileLock:
    """An exclusive advisory lock held through `<path>` (flock: released by the kernel when the holder dies, however it
    dies); the file names its holder for the message another process gets, and is removed on release."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        self._fd: int | None = None

    def acquire(self) -> "FileLock":
        """Take the lock, or Locked naming the process that has it. OSError if the file cannot be made."""
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode("utf-8", "replace")
                os.close(fd)
                raise Locked(f"{self.what} is being written by another process ({_holder(holder)}); wait for it to "
                             f"finish or stop it, or choose another output") from None
            if _same_file(fd, self.path):
                self._fd = fd
            else:  # the holder removed the file between our open and our lock: lock the new one
                os.close(fd)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                                       "command": " ".join(sys.argv)[:1000]}).encode())
        return self

    def release(self) -> None:
        """Remove the file, then unlock (in that order, so nobody can lock a file that is about to go)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        since = datetime.fromtimestamp(info["since"]).strftime("%Y-%m-%d %H:%M:%S")
        return f"pid {info['pid']} on {info['host']}, since {since}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "its pid is not recorded yet"


class DiskLow(OSError):
    """Too little free disk for the next write; nothing of it was written. The message says how much is free and
    what was needed."""


def require_free(path: Path, num_bytes: float, detail: str) -> None:
    """DiskLow("disk low: <free> GB free in <folder><detail>") if the file system of `path` (or of its nearest
    existing parent: it may not be made yet) has less than num_bytes free."""
    folder = next(p for p in (path, *path.resolve().parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if free < num_bytes:
        raise DiskLow(f"disk low: {free / 1e9:.2f} GB free in {folder}{detail}")


class OutputWriteError(OSError):
    """A results, errors or manifest file could not be written (disk full, say); the message names it."""


def check_free_space(folder: Path, min_free_gb: float, option: str) -> None:
    """DiskLow, naming the option that sets the limit, if `folder`'s file system has less than min_free_gb free."""
    require_free(folder, min_free_gb * 1e9, f", below {option} = {min_free_gb:g}")
