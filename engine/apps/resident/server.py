"""The resident engine's process: started by engine-run (client.start), in a session of its own, with its config as
a pickle on stdin; it says `ready` (or what stopped it) in one JSON line on stdout, then serves jobs one at a time.

A connection's first message says what it wants:
- {"op": "job", "key", "keep_alive"}: with this engine's key, the job runs here: ("items", [Request or error
  dict, ...]) and ("end",) come in, ("outcome", Outcome) go out, then ("done", counts) or ("failed", message).
  Another key is told {"ok": False} and this engine ends, handing the device to the run with other settings.
- {"op": "status"}: what runs here; {"op": "stop"}: end now.
It ends too after keep_alive seconds without a job, and after a job that was interrupted, lost its client, or lost
an engine core (a fresh engine then starts whole)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time

from engine.apps.resident.channel import accept, listen, resident_dir, shut
from engine.config import ConfigError
from engine.engine import Engine, EngineError
from engine.models import ModelNotFound

log = logging.getLogger("engine")
ITEMS_BUFFERED = 64  # batches of items read ahead of the engine (the client's sends wait beyond that)
END = object()


def serve(engine: Engine, listener, key: str, keep_alive: float) -> None:
    """Jobs in the order they came, one at a time, until one of the ends in the module's docstring."""
    info = {"pid": os.getpid(), "key": key, "started": time.time(), "device": engine.device, "dtype": engine.dtype,
            "model": engine.config.model, "keep_alive": keep_alive, "busy": False}
    door = Door(listener, engine, info)
    door.start()
    try:
        while True:
            try:
                job = door.jobs.get(timeout=info["keep_alive"])
            except queue.Empty:
                log.warning("no job for %.0f s (--keep-alive): ending", info["keep_alive"])
                return
            if job is END:  # asked to stop
                return
            conn, hello = job
            try:
                if hello.get("key") != key:
                    conn.send({"ok": False, "reason": "other settings", **info})
                    log.warning("a run with other engine settings needs the device: ending")
                    return
                info["keep_alive"] = float(hello.get("keep_alive", info["keep_alive"]))
                conn.send({"ok": True, **info})
                info["busy"] = True
                if not run_job(engine, conn):
                    return
            except (EOFError, OSError) as exc:
                log.warning("a client went away before its job (%s)", exc)
            finally:
                info["busy"] = False
                shut(conn)
    finally:
        door.close()


class Door(threading.Thread):
    """Every connection's first message, at once: status and stop are answered here (stop interrupts a running job
    and ends the engine), jobs wait in `jobs`. Once the engine is ending (close), a job is told so, with the pid to
    wait for: its engine-run starts a new engine when this one has freed the device."""

    def __init__(self, listener, engine: Engine, info: dict):
        super().__init__(name="door", daemon=True)
        self.listener, self.engine, self.info = listener, engine, info
        self.jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._is_closing = False

    def run(self) -> None:
        while True:
            conn = accept(self.listener)
            if conn is not None:
                self._answer(conn)

    def _answer(self, conn) -> None:
        try:
            hello = conn.recv() if conn.poll(10) else None
            op = hello.get("op") if isinstance(hello, dict) else None
            if op == "job":
                with self._lock:
                    if not self._is_closing:
                        self.jobs.put((conn, hello))
                        return
                conn.send({"ok": False, "reason": "ending", **self.info})
            elif op in ("status", "stop"):
                conn.send({"ok": True, **self.info})
            if op == "stop":
                log.warning("asked to stop: ending")
                self.engine.interrupt()
                self.jobs.put(END)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            log.warning("a client went away mid-message (%s)", exc)
        shut(conn)

    def close(self) -> None:
        """From now on jobs are told the engine is ending; those waiting are told now."""
        with self._lock:
            self._is_closing = True
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not END:
                conn, _ = job
                try:
                    conn.send({"ok": False, "reason": "ending", **self.info})
                except OSError:
                    pass  # that engine-run has gone already
                shut(conn)


def run_job(engine: Engine, conn) -> bool:
    """One client's records through the engine, outcomes back as they finish; whether the engine can serve again."""
    items: queue.Queue = queue.Queue(ITEMS_BUFFERED)
    lost = threading.Event()
    reader = threading.Thread(target=_read_items, args=(engine, conn, items, lost), name="job-reader", daemon=True)
    reader.start()
    counts = engine.device_counts()
    num_failures = len(engine.core_failures)
    try:
        for outcome in engine.run(_items(items)):
            conn.send(("outcome", outcome))
        if lost.is_set():
            return False
        if engine.is_interrupted:  # asked to stop: what it did not finish runs again on resume
            _send_quietly(conn, ("failed", f"the resident engine (pid {os.getpid()}) was stopped mid-run; run the "
                                           f"same command to resume"))
            return False
        conn.send(("done", {"device_counts": _since(counts, engine.device_counts()),
                            "core_failures": engine.core_failures[num_failures:]}))
    except EngineError as exc:
        _send_quietly(conn, ("failed", f"{exc} (in the resident engine, pid {os.getpid()}, which has ended)"))
        log.warning("%s", exc)
        return False
    except (OSError, EOFError) as exc:
        log.warning("the client went away mid-job (%s): ending", exc)
        return False
    return len(engine.core_failures) == num_failures


def _read_items(engine: Engine, conn, items: queue.Queue, lost: threading.Event) -> None:
    """The client's messages: batches of items into `items` (bounded), ("interrupt",) or a lost connection stop
    the engine's intake; END goes in last, whatever happened."""
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "items":
                _put(items, msg[1], engine)
            elif msg[0] == "end":
                return
            else:  # "interrupt"
                engine.interrupt()
    except (EOFError, OSError, pickle.UnpicklingError):
        lost.set()
        engine.interrupt()
    finally:
        _put(items, END, engine, force=True)


def _put(items: queue.Queue, value, engine: Engine, force: bool = False) -> None:
    """Put `value` in the bounded queue, waiting while the engine takes items. An interrupted engine takes no
    more: a batch is then dropped, and END (force) replaces what is still queued."""
    while True:
        try:
            items.put(value, timeout=0.5)
            return
        except queue.Full:
            if engine.is_interrupted and not force:
                return
            if engine.is_interrupted:
                with contextlib.suppress(queue.Empty):
                    while True:
                        items.get_nowait()


def _items(items: queue.Queue):
    while (batch := items.get()) is not END:
        yield from batch


def _since(before: list[dict], after: list[dict]) -> list[dict]:
    """Per core, its counts with this job's requests and tokens only."""
    return [{**now, "num_requests": now["num_requests"] - then["num_requests"],
             "num_tokens": now["num_tokens"] - then["num_tokens"]} for then, now in zip(before, after)]


def _send_quietly(conn, msg) -> None:
    try:
        conn.send(msg)
    except OSError:
        pass  # the client has gone: its run ends on the lost connection instead


def _say(**body) -> None:
    """The one line the starting engine-run waits for."""
    sys.stdout.write(json.dumps(body) + "\n")
    sys.stdout.flush()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s engine-resident[%(process)d]: %(message)s")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # ends the engine's processes on the way out
    start = pickle.load(sys.stdin.buffer)
    config, key, keep_alive = start["config"], start["key"], start["keep_alive"]
    folder = resident_dir(config)
    try:
        listener = listen(folder)
    except OSError as exc:
        _say(error=f"another resident engine holds {folder} ({exc})", kind="busy")
        return
    try:
        engine = Engine(config)
    except (ConfigError, ModelNotFound, EngineError) as exc:
        _say(error=str(exc), kind=type(exc).__name__)
        return
    with engine:
        _say(ready=True, pid=os.getpid(), startup_s=engine.startup_s, device=engine.device, dtype=engine.dtype,
             startup_phases={str(k): v for k, v in engine.startup_phases.items()})
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nobody reads stdout after that line
        log.warning("serving %s on %s %s, %.0f s keep-alive", config.model, engine.device, engine.dtype, keep_alive)
        serve(engine, listener, key, keep_alive)
    listener.close()


if __name__ == "__main__":
    main()
