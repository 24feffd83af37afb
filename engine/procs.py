"""Process plumbing: msgpack message queues, child start-up, liveness of the parent."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.spawn
import multiprocessing.util
import os
import queue
import signal
import sys
import threading
import traceback

from engine.bytecode import use_bytecode_cache
from engine.config import UserError
from engine.messages import Fatal, Message, Stop, decode, encode

log = logging.getLogger("engine")
PR_SET_PDEATHSIG = 1
# The tokenizer and decoder workers start in every run, so they stay off these (seconds of imports each).
HEAVY_MODULES = ("torch", "transformers")
CHECK_IMPORTS_ENV = "ENGINE_CHECK_IMPORTS"  # "1": the light workers fail if they import a heavy module


class MsgQueue:
    """A multiprocessing queue of messages (engine.messages types; only their msgpack bytes cross the process
    boundary)."""

    def __init__(self, ctx, maxsize: int = 0):
        self._q = ctx.Queue(maxsize)

    def put(self, msg: Message, timeout: float | None = None) -> None:
        self._q.put(encode(msg), timeout=timeout)

    def get(self, timeout: float | None = None) -> Message:
        """The next message; raises queue.Empty after `timeout` seconds."""
        return decode(self._q.get(timeout=timeout))

    def get_nowait(self) -> Message:
        return decode(self._q.get_nowait())

    def put_until(self, msg: Message, should_stop, poll: float = 0.5) -> bool:
        """Blocking put that gives up (False) once `should_stop()` is true; for bounded queues."""
        data = encode(msg)
        while not should_stop():
            try:
                self._q.put(data, timeout=poll)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        self._q.cancel_join_thread()
        self._q.close()


class Lifeline:
    """Made by the parent, passed to every child: tells a child to stop when the parent asks or has died."""

    def __init__(self, ctx):
        # A bare shared byte, not an Event: an Event's check takes a shared lock, and a child killed while holding
        # it (one of several engine cores, say) would block every other process that checks.
        self._stop = ctx.RawValue("b", 0)
        self._parent_pid = os.getpid()

    def ok(self) -> bool:
        return not self._stop.value and os.getppid() == self._parent_pid

    def stop(self) -> None:
        self._stop.value = 1


def messages(inbox: MsgQueue, lifeline: Lifeline, poll: float = 0.5):
    """A worker's inbox as an iterator that ends when the lifeline says stop (or a Stop message arrives)."""
    while lifeline.ok():
        try:
            msg = inbox.get(timeout=poll)
        except queue.Empty:
            continue
        if isinstance(msg, Stop):
            return
        yield msg


def wake(inbox: MsgQueue) -> None:
    """Put Stop without waiting (a full inbox's reader is busy and sees the lifeline soon anyway)."""
    try:
        inbox.put(Stop(), timeout=0)
    except queue.Full:
        pass


def run_child(stage: str, events: MsgQueue, target, *args) -> None:
    """Entry point of every spawned process: the parent owns signals; errors become one fatal message."""
    _set_name(stage)
    _die_with_parent()
    use_bytecode_cache()  # before the stage imports its modules (the parent's environment usually set it already)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logging.basicConfig(level=logging.WARNING, format=f"[{stage}] %(message)s", stream=sys.stderr)
    try:
        target(*args)
        _exit_now()
    except Exception as exc:  # noqa: BLE001 - reported to the parent as this stage's fatal error
        if isinstance(exc, UserError):  # its message says what to do; a traceback would only bury it
            detail, tb = str(exc), ""
        else:
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            tb = traceback.format_exc(limit=-3)
        try:
            events.put(Fatal(stage, detail, tb), timeout=5)
        except queue.Full:
            pass
        sys.exit(1)


def _exit_now() -> None:
    """End a stage that finished: multiprocessing's own exit work (its queues' feeder threads flush what was put),
    the standard streams, then no interpreter teardown (with torch loaded, ~1 s of every run's end on a CPU)."""
    multiprocessing.util._exit_function()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies, however it dies (SIGKILL included): a stage loading a
    model for a minute would otherwise outlive a killed run. Elsewhere the Lifeline's parent check still ends it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl took effect
        os._exit(1)


def _set_name(stage: str) -> None:
    """Name the process after its stage (what `top` and psutil show), e.g. engine-core, engine-core-1 (one of
    several), engine-tok-0."""
    short = "engine-" + (stage.replace("tokenizer worker ", "tok-").replace("decoder worker ", "dec-")
                         .replace("engine ", "").replace("core ", "core-"))
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(short[:15])
    except OSError:
        pass  # not Linux: names are cosmetic


def is_checking_imports() -> bool:
    """Whether the light workers check their imports (ENGINE_CHECK_IMPORTS=1; the tests set it)."""
    return os.environ.get(CHECK_IMPORTS_ENV) == "1"


def check_light_imports(stage: str) -> None:
    """Fail this stage if its process has imported torch or transformers (called only when is_checking_imports)."""
    loaded = [name for name in HEAVY_MODULES if name in sys.modules]
    if loaded:
        raise RuntimeError(f"the {stage} imported {', '.join(loaded)}; tokenizer and decoder workers must use only "
                           f"the Rust tokenizers, numpy and msgpack ({CHECK_IMPORTS_ENV}=1 checks this)")


_starting = threading.local()  # is_main_hidden: this thread is starting a child that needs no __main__
_spawn_preparation_data = multiprocessing.spawn.get_preparation_data


def _preparation_data(name: str) -> dict:
    """multiprocessing.spawn.get_preparation_data, less the parent's main module while this thread starts a child
    whose code lives outside it. Spawn would otherwise re-run that module in the child before it unpickles its
    target: engine-run's imports torch, pytest's imports pytest, a user's script may have side effects."""
    data = _spawn_preparation_data(name)
    if getattr(_starting, "is_main_hidden", False):
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
    return data


# popen_spawn_posix (and forkserver) look this up at each start; unflagged, it is the original.
multiprocessing.spawn.get_preparation_data = _preparation_data


class ByName:
    """A child's entry point given as module and function name: picklable without importing the module, so the
    parent need not import what only the child runs (the engine core's torch and transformers)."""

    def __init__(self, module: str, name: str):
        self.__module__ = module  # what start() reads to tell an entry point outside __main__
        self.module, self.name = module, name

    def __call__(self, *args):
        import importlib

        return getattr(importlib.import_module(self.module), self.name)(*args)

    def __reduce__(self):
        return ByName, (self.module, self.name)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def is_pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (one of another user counts: it exists, it is just not ours to signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def stop_signals(handler):
    """Inside the block, SIGINT and SIGTERM call `handler(signum, frame)` (a command's drain: stop taking work,
    finish and flush what is done); the old handlers come back after it. Only the main thread may set handlers, so
    a block run in another thread keeps the process's own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def start(ctx, stage: str, events: MsgQueue, target, *args):
    """Start `target(*args)` in a child process under run_child. A target defined outside the parent's __main__
    (every engine stage) starts without re-running __main__; its arguments must not need __main__ either."""
    proc = ctx.Process(target=run_child, args=(stage, events, target, *args), name=stage, daemon=True)
    # Per thread, so a thread starting another child (ours or not) meanwhile gets spawn's usual behaviour.
    _starting.is_main_hidden = getattr(target, "__module__", "__main__") != "__main__"
    try:
        proc.start()
    finally:
        _starting.is_main_hidden = False
    return proc
