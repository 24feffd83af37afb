"""Running a plan: SweepRunner, one Engine per model; status.json (StatusBoard); stopping (Stopper).

All grid points of a model run in one engine run (the engine mixes steering per request); models run one after
another, or side by side on several devices.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from pathlib import Path

from engine.storage.id_index import IdIndex
from engine.engine import Engine
from engine.pipeline.reader import read_requests
from engine.procs import stop_signals
from engine.storage.files import check_free_space, write_atomic
from engine.pipeline.writer import DiskLow, JsonlWriter, scan_done_ids
from engine.apps.sweep.fields import SweepError
from engine.apps.sweep.outdir import RESULTS, STATUS
from engine.apps.sweep.plan import Plan, utc_now
from engine.apps.sweep.spec import ModelEntry

log = logging.getLogger("engine.apps.sweep.runner")

STATUS_SECONDS = 2.0


class StatusBoard:
    """status.json, rewritten atomically every few seconds from a thread: per model done/total, errors, tok/s,
    ETA, the last error. `check` runs on every tick too (the free-space check)."""

    def __init__(self, path: Path, plan: Plan, done: IdIndex, check=None, interval: float = STATUS_SECONDS):
        self.path, self.plan, self.check, self.interval = path, plan, check, interval
        self.lock = threading.Lock()
        self.state, self.started, self.last_error = "starting", utc_now(), None
        self.models = {}
        for m in plan.config.models:
            num_done = done.count_prefix(m.label + "/")
            self.models[m.label] = {"model": m.model, "state": "done" if num_done >= plan.num_per_model else "waiting",
                                    "done": num_done, "total": plan.num_per_model, "errors": 0, "tokens": 0}
        self.num_records = self.num_tokens = 0  # this invocation's
        self.gen_seconds, self._gen_since, self._num_running = 0.0, None, 0  # time with any model generating
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sweep-status", daemon=True)

    def start(self) -> None:
        self.write()
        self._thread.start()

    def _loop(self) -> None:
        while not self._halt.wait(self.interval):
            if self.check is not None:
                self.check()
            self.write()

    def set_model(self, label: str, state: str, device: str | None = None) -> None:
        """A model's state: loading, running, done or stopped; tok/s counts the time any model is `running`."""
        with self.lock:
            entry, now = self.models[label], time.monotonic()
            was_running = self._num_running > 0
            self._num_running += (state == "running") - (entry["state"] == "running")
            entry["state"] = state
            if device is not None:
                entry["device"] = device
            self.state = "running"
            if was_running and not self._num_running:
                self.gen_seconds += now - self._gen_since
                self._gen_since = None
            elif self._num_running and not was_running:
                self._gen_since = now

    def record(self, label: str, outcome) -> None:
        with self.lock:
            entry = self.models[label]
            if outcome.is_error:
                entry["errors"] += 1
                self.last_error = f"{outcome.record.get('id')}: {outcome.record['error']}"
                return
            tokens = outcome.record["num_completion_tokens"]
            entry["done"] += 1
            entry["tokens"] += tokens
            self.num_records += 1
            self.num_tokens += tokens

    def finish(self, state: str, error: str | None = None) -> None:
        with self.lock:
            self.state = state
            if error:
                self.last_error = error
        self._halt.set()
        self._thread.join(timeout=5)
        self.write()

    def snapshot(self) -> dict:
        with self.lock:
            seconds = self.gen_seconds + (time.monotonic() - self._gen_since if self._gen_since else 0.0)
            done = sum(m["done"] for m in self.models.values())
            total = sum(m["total"] for m in self.models.values())
            rate = self.num_records / seconds if seconds > 0 else 0.0
            return {
                "state": self.state, "config_hash": self.plan.config_hash, "pid": os.getpid(), "started": self.started,
                "updated": utc_now(), "done": done, "total": total,
                "errors": sum(m["errors"] for m in self.models.values()),
                "tok_per_s": round(self.num_tokens / seconds, 1) if seconds > 0 else None,
                "records_per_s": round(rate, 3) if rate else None,
                "eta_s": round((total - done) / rate) if rate else None,
                "last_error": self.last_error, "models": {k: dict(v) for k, v in self.models.items()},
            }

    def write(self) -> None:
        write_atomic(self.path, (json.dumps(self.snapshot(), indent=2) + "\n").encode())


class Stopper:
    """SIGINT / SIGTERM, a low disk or a failed model stop the sweep: running engines stop admitting and drain,
    finished records are flushed, no further model starts (an engine still starting stops once it is up)."""

    def __init__(self):
        self.reason: str | None = None
        self.engines: set[Engine] = set()
        self.lock = threading.RLock()  # re-entrant: a signal may arrive while the main thread is inside stop()

    def on_signal(self, signum, frame) -> None:
        self.stop(signal.Signals(signum).name)

    def stop(self, reason: str) -> None:
        with self.lock:
            if self.reason is None:
                self.reason = reason
            engines = list(self.engines)
        for engine in engines:
            engine.interrupt()

    def attach(self, engine: Engine) -> None:
        with self.lock:
            self.engines.add(engine)
        if self.reason is not None:
            engine.interrupt()

    def detach(self, engine: Engine) -> None:
        with self.lock:
            self.engines.discard(engine)


class SweepRunner:
    """Runs a plan into an output directory: one Engine per model, one model per device at a time (side by side
    when there are several devices), every record through one JsonlWriter owned by the calling thread."""

    def __init__(self, plan: Plan, out: Path):
        self.plan, self.out = plan, out
        self.results = out / RESULTS
        self.done = scan_done_ids(self.results)
        self.stopper = Stopper()
        self.status = StatusBoard(out / STATUS, plan, self.done, check=self._check_disk)
        self.outcomes: queue.Queue = queue.Queue(maxsize=4096)  # (model label, Outcome) from the lanes to the writer
        self.failures: list[BaseException] = []

    def _check_disk(self) -> None:
        try:
            check_free_space(self.out, self.plan.config.min_free_gb, "min_free_gb")
        except DiskLow as exc:
            self.stopper.stop(str(exc))

    def run(self) -> tuple[str, JsonlWriter]:
        """Run every model that has requests left; returns (how it ended: done | interrupted | disk, the writer)."""
        self._check_disk()
        if self.stopper.reason:
            raise SweepError(f"{self.stopper.reason}: free some space (or lower min_free_gb) and run again")
        writer = JsonlWriter(self.results, {"version": 1, "sweep_config_hash": self.plan.config_hash}, ordered=False,
                             min_free_gb=self.plan.config.min_free_gb, done=self.done)
        todo = deque(m for m in self.plan.config.models if self.status.models[m.label]["state"] != "done")
        lanes = [threading.Thread(target=self._lane, args=(device, todo), name=f"sweep-{device}", daemon=True)
                 for device in self.plan.config.devices()[:len(todo)]]
        self.status.start()
        with stop_signals(self.stopper.on_signal):
            try:
                for lane in lanes:
                    lane.start()
                self._write_outcomes(lanes, writer)
            except DiskLow as exc:  # the next activation shard does not fit: stop as on a low disk
                self._disk_low(exc)
            except BaseException as exc:  # noqa: BLE001 - stops the lanes, then re-raised below once they drained
                self.stopper.stop(f"failed: {type(exc).__name__}")
                self.failures.append(exc)
            finally:
                for lane in lanes:
                    lane.join()
                try:
                    writer.close()
                except DiskLow as exc:  # the last shard does not fit: its records run again on resume
                    self._disk_low(exc)
                finally:
                    self.done.close()
        if self.failures:
            exc = self.failures[0]
            self.status.finish("failed", f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc))
            raise exc
        reason = self.stopper.reason
        ended = "done" if reason is None else "disk" if reason.startswith("disk") else "interrupted"
        self.status.finish({"done": "done", "disk": "stopped", "interrupted": "interrupted"}[ended], reason)
        return ended, writer

    def _disk_low(self, exc: DiskLow) -> None:
        if self.stopper.reason is not None and not self.stopper.reason.startswith("disk"):
            log.error("%s; those records run again on resume", exc)  # the sweep was stopping for another reason
        self.stopper.stop(str(exc))

    def _write_outcomes(self, lanes: list[threading.Thread], writer: JsonlWriter) -> None:
        while any(lane.is_alive() for lane in lanes) or not self.outcomes.empty():
            try:
                label, outcome = self.outcomes.get(timeout=0.2)
            except queue.Empty:
                continue
            writer.write(outcome)
            self.status.record(label, outcome)
            if outcome.is_error:
                log.warning("%s", self.status.last_error)

    def _lane(self, device: str, todo: deque) -> None:
        """One device's thread: runs models from `todo` one after another until none is left or the sweep stops."""
        try:
            while self.stopper.reason is None:
                try:
                    model = todo.popleft()
                except IndexError:
                    return
                self._run_model(model, device)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which stops the sweep and re-raises
            self.failures.append(exc)
            self.stopper.stop(f"failed: {exc}")

    def _run_model(self, model: ModelEntry, device: str) -> None:
        config = self.plan.config.engine_config(model, device)
        entry = self.status.models[model.label]
        log.info("%s: %d of %d requests left; starting %s on %s", model.label, entry["total"] - entry["done"],
                 entry["total"], model.model, device)
        self.status.set_model(model.label, "loading", device)
        with Engine(config) as engine:
            self.stopper.attach(engine)
            self.status.set_model(model.label, "running")
            try:
                for outcome in engine.run(read_requests(self.plan.requests(model), config, self.done)):
                    self._hand_over(model.label, outcome)
            finally:
                self.stopper.detach(engine)
            stopped = engine.is_interrupted
        self.status.set_model(model.label, "stopped" if stopped else "done")
        log.info("%s: %s (%d done, %d errors)", model.label, "stopped" if stopped else "finished", entry["done"],
                 entry["errors"])

    def _hand_over(self, label: str, outcome) -> None:
        """To the writer's thread; once the sweep stops, an outcome that finds the queue full is dropped (its
        request runs again on resume), so a lane never waits on a writer that has gone."""
        while True:
            try:
                self.outcomes.put((label, outcome), timeout=0.5)
                return
            except queue.Full:
                if self.stopper.reason is not None:
                    return
