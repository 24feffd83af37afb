"""What engine-run and the resident process share: where the resident process lives (a folder under the cache dir,
a Linux abstract socket named from it), the key of the engine settings it serves, and the socket's two ends.

Only a process of the same user can talk to it: each end checks the other's uid (SO_PEERCRED) before a message
crosses, since the messages are pickles (Requests and Outcomes as the Engine uses them)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import sys
from multiprocessing.connection import Connection
from pathlib import Path

from engine.adapters import adapters_digest
from engine.config import EngineConfig, default_cache_dir

# Read only by the reader, per record: a resident engine serves any value of them.
PER_JOB_SETTINGS = ("sampling", "steering", "steering_specs")
# The environment that can change what the engine's processes do.
ENV_PREFIXES = ("ENGINE_", "TORCH", "PYTORCH_", "CUDA_", "TRITON_", "HF_", "TRANSFORMERS_", "OMP_", "MKL_")


class ResidentError(Exception):
    """The resident engine cannot be reached or ended mid-job; the message says what to do."""


def resident_dir(config: EngineConfig) -> Path:
    folder = Path(config.cache_dir or default_cache_dir()) / "resident"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def log_path(config: EngineConfig) -> Path:
    return resident_dir(config) / "engine.log"


def address(folder: Path) -> str:
    """The abstract socket of the resident engine of this folder (no file: nothing is left behind by a crash)."""
    return "\0steer-engine-" + hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:20]


def settings_key(config: EngineConfig) -> str:
    """What a resident engine must share with a run to serve it: every engine setting but the per-record defaults,
    the folder relative paths start from, the interpreter, the engine's own code and the environment it reads."""
    settings = {k: v for k, v in config.to_dict().items() if k not in PER_JOB_SETTINGS}
    if config.adapters:  # by content too: an adapter written again is another engine (its weights are loaded)
        settings["adapter_digests"] = adapters_digest(config.adapters)
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
    body = {"settings": settings, "cwd": os.getcwd(), "python": sys.executable, "code": _code_stamp(), "env": env}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _code_stamp() -> list:
    """The engine package's files by path, size and mtime: an edited or upgraded engine is another engine."""
    root = Path(__file__).resolve().parents[2]
    return sorted((str(p.relative_to(root)), s.st_size, s.st_mtime_ns) for p in root.rglob("*.py")
                  for s in [p.stat()])


def parse_duration(text: str) -> float:
    """`600`, `600s`, `10m`, `1h` -> seconds; ValueError naming the text otherwise."""
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:].lower(), None) if text else None
    number = text[:-1] if scale else text
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise ValueError(f"{text!r}: give a duration such as 600, 600s, 10m or 1h (0: off)")
    return value


def _peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def connect(folder: Path) -> Connection | None:
    """A connection to the folder's resident engine, or None if none listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address(folder))
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        return None
    pid, uid = _peer(sock)
    if uid != os.getuid():
        sock.close()
        raise ResidentError(f"the resident engine's socket for {folder} is held by process {pid} of another user "
                            f"(uid {uid}); give this run another cache dir (ENGINE_CACHE_DIR) or drop --keep-alive")
    return Connection(sock.detach())


def listen(folder: Path) -> socket.socket:
    """The resident engine's listening socket; OSError (address in use) if another one holds it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address(folder))
    sock.listen(16)
    return sock


def accept(listener: socket.socket) -> Connection | None:
    """The next connection of our own user, or None for another user's (closed)."""
    sock, _ = listener.accept()
    if _peer(sock)[1] != os.getuid():
        sock.close()
        return None
    return Connection(sock.detach())


def shut(conn: Connection) -> None:
    """End a connection even while another thread is blocked sending or receiving on it."""
    try:
        socket.socket(fileno=os.dup(conn.fileno())).shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or shut by the other end: nothing left to wake
    conn.close()
