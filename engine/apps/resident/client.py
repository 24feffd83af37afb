"""engine-run's side of the resident engine: `open_resident(config, keep_alive)` finds the resident engine of these
settings (or starts one, or replaces one of other settings) and returns a ResidentEngine, which engine-run uses as
it uses an Engine: run(items) yields Outcomes as they finish, interrupt() stops the intake."""

from __future__ import annotations

import fcntl
import json
import logging
import pickle
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Iterator

from engine.apps.resident.channel import ResidentError, connect, log_path, resident_dir, settings_key, shut
from engine.config import ConfigError, EngineConfig
from engine.engine import EngineError
from engine.messages import Outcome
from engine.models import ModelNotFound
from engine.procs import is_pid_alive

log = logging.getLogger("engine")
FEED_BATCH = 32
BUSY_NOTICE_S = 2.0  # say that another job holds the resident engine after this long without its answer
STOP_WAIT_S = 120.0
_STARTED: list[subprocess.Popen] = []
ERRORS = {"ConfigError": ConfigError, "ModelNotFound": ModelNotFound, "EngineError": EngineError}


class ResidentEngine:
    """One job's connection to the resident engine, with the Engine attributes engine-run reads."""

    def __init__(self, conn, info: dict, startup_s: float, startup_phases: dict, was_started: bool):
        self.conn, self.info = conn, info
        self.pid = info["pid"]
        self.device, self.dtype = info["device"], info["dtype"]
        self.startup_s, self.startup_phases, self.was_started = startup_s, startup_phases, was_started
        self.core_failures: list[str] = []
        self._counts: list[dict] = []
        self._interrupted = threading.Event()

    def interrupt(self) -> None:
        """Stop: run() returns at its next check and the connection closes, which ends the resident engine (a job
        cut short leaves requests in it that no one waits for)."""
        self._interrupted.set()

    @property
    def is_interrupted(self) -> bool:
        return self._interrupted.is_set()

    def device_counts(self) -> list[dict]:
        return self._counts

    def run(self, items: Iterable) -> Iterator[Outcome]:
        sender = _Sender(self.conn, items, self._interrupted)
        sender.start()
        try:
            while not self.is_interrupted:
                if sender.error is not None:
                    raise sender.error
                if not self.conn.poll(0.2):
                    continue
                msg = self._recv()
                if msg[0] == "outcome":
                    yield msg[1]
                elif msg[0] == "done":
                    self._counts, self.core_failures = msg[1]["device_counts"], msg[1]["core_failures"]
                    return
                else:  # "failed": the message says what ended it and what to do
                    raise EngineError(msg[1])
        finally:
            if self.is_interrupted:
                shut(self.conn)
            sender.join(timeout=5)

    def _recv(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            raise EngineError(f"the resident engine (pid {self.pid}) ended mid-run ({exc or 'connection closed'}); "
                              f"its log is {self.info['log']}. Run the same command to resume") from None

    def close(self) -> None:
        shut(self.conn)

    def __enter__(self) -> "ResidentEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Sender(threading.Thread):
    """Sends the items (Requests, and error dicts that pass through) in batches, then ("end",); the socket's buffer
    and the resident engine's read-ahead bound what is in flight."""

    def __init__(self, conn, items: Iterable, interrupted: threading.Event):
        super().__init__(name="resident-sender", daemon=True)
        self.conn, self.items, self.interrupted = conn, items, interrupted
        self.error: BaseException | None = None

    def run(self) -> None:
        batch = []
        try:
            for item in self.items:
                if self.interrupted.is_set():
                    return
                batch.append(item)
                if len(batch) >= FEED_BATCH:
                    self.conn.send(("items", batch))
                    batch = []
            if batch:
                self.conn.send(("items", batch))
            self.conn.send(("end",))
        except OSError:
            if not self.interrupted.is_set():  # the engine's end shows in the receiving loop, with its message
                self.interrupted.set()
                self.error = EngineError("the resident engine stopped taking records; run the same command to "
                                         "resume")
        except BaseException as exc:  # noqa: BLE001 - a bad record's reading error, re-raised by run()
            self.error = exc


def open_resident(config: EngineConfig, keep_alive: float) -> ResidentEngine:
    """The resident engine for these settings, started here if none runs; an engine of other settings is asked to
    end first (one resident engine per cache dir, so two never share a device)."""
    key, folder = settings_key(config), resident_dir(config)
    started = time.perf_counter()
    with _locked(folder / "lock"):
        job = _ask(folder, key, keep_alive, config)
        if job is not None:
            conn, info = job
            return ResidentEngine(conn, info, time.perf_counter() - started, {}, was_started=False)
        phases = start(config, key, keep_alive)
        job = _ask(folder, key, keep_alive, config)
    if job is None:
        raise ResidentError(f"the resident engine started but does not answer; see {log_path(config)}")
    conn, info = job
    return ResidentEngine(conn, info, time.perf_counter() - started, phases, was_started=True)


def _ask(folder, key: str, keep_alive: float, config: EngineConfig):
    """(connection, info) with the job accepted, or None if no engine listens (one of other settings is ended)."""
    conn = connect(folder)
    if conn is None:
        return None
    conn.send({"op": "job", "key": key, "keep_alive": keep_alive})
    if not conn.poll(BUSY_NOTICE_S):
        log.warning("the resident engine is running another job; this run starts when it ends")
    info = _answer(conn, config)
    if info["ok"]:
        return conn, {**info, "log": str(log_path(config))}
    shut(conn)
    if info.get("reason") == "other settings":
        log.warning("ending the resident engine of other settings (pid %d) to start one for these", info["pid"])
    wait_gone(info["pid"])  # it frees the device before one for these settings starts
    return None


def _answer(conn, config: EngineConfig) -> dict:
    try:
        return conn.recv()
    except (EOFError, OSError, pickle.UnpicklingError) as exc:
        raise ResidentError(f"the resident engine closed the connection ({exc}); see {log_path(config)}") from None


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + STOP_WAIT_S
    while is_pid_alive(pid):
        if time.monotonic() > deadline:
            raise ResidentError(f"the resident engine (pid {pid}) did not end in {STOP_WAIT_S:.0f} s; end it "
                                f"(kill {pid}) and run again")
        time.sleep(0.05)



def start(config: EngineConfig, key: str, keep_alive: float) -> dict:
    """Start the resident engine and wait for it to be ready: its cores' start-up phases. The errors a fresh engine
    raises (a bad model directory, say) are raised here the same; interrupted, it is ended."""
    log_file = log_path(config).open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "engine.apps.resident.server"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log_file, start_new_session=True)
    log_file.close()
    _STARTED.append(proc)  # it outlives this run: no Popen may be collected (and warn) while it runs
    try:
        proc.stdin.write(pickle.dumps({"config": config, "key": key, "keep_alive": keep_alive}))
        proc.stdin.close()
        line = proc.stdout.readline()
    except BaseException:
        proc.terminate()
        raise
    finally:
        proc.stdout.close()
    try:
        said = json.loads(line)
    except ValueError:
        proc.wait()
        raise ResidentError(f"the resident engine ended while starting (exit {proc.returncode}); see "
                            f"{log_path(config)}") from None
    if "error" in said:
        proc.wait()
        raise ERRORS.get(said["kind"], ResidentError)(said["error"])
    return {int(core): phases for core, phases in said["startup_phases"].items()}


@contextmanager
def _locked(path):
    """One engine-run at a time looks for, replaces or starts the resident engine."""
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
