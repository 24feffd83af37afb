"""Engine: the Python API over the multiprocess pipeline (tokenizer workers -> ring -> core -> decoders).

Build it once from an EngineConfig; `generate(records)` yields result records as they finish, and
`generate_all(records)` returns them in input order. The CLI is a thin layer over `Engine.run`.
"""

from __future__ import annotations

import logging
import os
import multiprocessing as mp
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Container, Iterable, Iterator

from engine.activations import tensors_of
from engine.config import EngineConfig
from engine.core import core_main
from engine.decoder_worker import decoder_main
from engine.id_index import IdIndex
from engine.models import effective_max_len, resolve_model
from engine.procs import Lifeline, MsgQueue, start
from engine.request import Request, RecordError, decode_line, load_named_specs, parse_record
from engine.ring import ShmRing
from engine.tokenizer_worker import tokenizer_main

log = logging.getLogger("engine")

FEED_BATCH = 32
RESERVED_OUTPUT = ("completion", "finish_reason", "num_prompt_tokens", "num_completion_tokens",
                   "completion_token_ids", "error", "line", "steering_name", "activations")


class EngineError(RuntimeError):
    """A stage of the pipeline failed; the message names the stage and the cause."""


@dataclass(slots=True)
class Outcome:
    """One input item's end: its position in the input and its output record (a result or an error)."""

    position: int
    record: dict
    is_error: bool
    activations: dict | None = None  # captured activations as the core sent them (engine.activations.tensors_of)


def error_record(line: int | None, request_id: str | None, error: str) -> dict:
    record: dict = {"line": line}
    if request_id is not None:
        record["id"] = request_id
    record["error"] = error
    return record


def read_requests(sources: Iterable[tuple[int, object]], config: EngineConfig, skip_ids: Container[str] = frozenset()
                  ) -> Iterator[Request | dict]:
    """(line number, raw bytes or dict or str) -> Requests, or error records for lines that cannot run.

    Ids in `skip_ids` (already in the output: a set, or engine.writer.scan_done_ids's IdIndex) are dropped silently;
    a repeated id is an error. The ids seen are kept on disk (IdIndex), so memory does not grow with the input.
    """
    steering, capture = config.steering.as_record(), config.capture.as_record()
    named = load_named_specs(config.steering_specs) if config.steering_specs else {}
    seen = IdIndex()  # its temporary file goes when the generator ends or is dropped
    for line, raw in sources:
        request_id = None
        try:
            obj = decode_line(raw, line) if isinstance(raw, bytes) else {"prompt": raw} if isinstance(raw, str) else raw
            if not isinstance(obj, dict):
                raise RecordError(f"record {line} is a {type(obj).__name__}; give a dict with 'prompt' or 'messages'")
            request_id = obj.get("id") if isinstance(obj.get("id"), str) else None
            request = parse_record(obj, -1, line, config.sampling, steering, named, capture)
            request_id = request.id
            clash = [k for k in request.extra if k in RESERVED_OUTPUT]
            if clash:
                raise RecordError(f"field(s) {clash} are output fields of the engine; rename them in the input")
            if request.id in skip_ids:
                continue
            if not seen.add(request.id):
                raise RecordError(f"duplicate id {request.id!r}; ids must be unique within the input")
            yield request
        except RecordError as exc:
            yield error_record(line, request_id, str(exc))


class Engine:
    """The running pipeline; use as a context manager so its processes always end."""

    def __init__(self, config: EngineConfig):
        started = time.perf_counter()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub, in any process
        self.config = config
        self.source = resolve_model(config.model, config.tokenizer, config.cache_dir)
        self.max_model_len = effective_max_len(config.max_model_len, self.source)
        ctx = mp.get_context("spawn")
        self.events = MsgQueue(ctx)
        self.tok_in = MsgQueue(ctx, maxsize=2 * config.tokenizer_workers)
        self.core_q = MsgQueue(ctx)
        self.dec_q = MsgQueue(ctx)
        self.ring = ShmRing(ctx, config.ring_slots, max(config.slot_tokens, self.max_model_len), max_requests=256)
        self.lifeline = Lifeline(ctx)
        self.procs = self._start(ctx)
        self.pending: dict[int, tuple[int, Request]] = {}
        self._next_index = 0
        self._stop = threading.Event()
        self._closed = False
        self.core_stats: dict = {"steps": 0, "idle_s": 0.0}  # cumulative, reported by the core every second
        self._stats_id = 0
        ready = self._wait_ready()
        self.device, self.dtype = ready["device"], ready["dtype"]
        self.startup_s = time.perf_counter() - started

    def _start(self, ctx) -> list:
        c = self.config
        procs = [start(ctx, f"tokenizer worker {i}", self.events, tokenizer_main, self.source.tokenizer_dir,
                       self.max_model_len, c.truncate, self.ring, self.tok_in, self.core_q, self.events, self.lifeline)
                 for i in range(c.tokenizer_workers)]
        procs.append(start(ctx, "engine core", self.events, core_main, c.to_dict(), self.source.to_msg(),
                           self.ring, self.core_q, self.dec_q, self.events, self.lifeline))
        procs += [start(ctx, f"decoder worker {i}", self.events, decoder_main, self.source.tokenizer_dir,
                        c.return_tokens, self.dec_q, self.events, self.lifeline)
                  for i in range(c.decoder_workers)]
        return procs

    def _wait_ready(self) -> dict:
        while True:
            try:
                msg = self.events.get(timeout=0.5)
            except queue.Empty:
                self._check_alive()
                continue
            if msg["t"] == "ready":
                return msg
            self._handle_control(msg)

    def _handle_control(self, msg: dict) -> None:
        if msg["t"] == "stats":
            self.core_stats = msg
        elif msg["t"] == "fatal":
            self.close()
            raise EngineError(f"{msg['stage']} failed: {msg['error']}\n{msg.get('traceback', '')}".rstrip())

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.exitcode is None:
                continue
            try:  # prefer the stage's own explanation if it sent one before dying
                while True:
                    self._handle_control(self.events.get(timeout=0.2))
            except queue.Empty:
                pass
            code = proc.exitcode
            cause = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            self.close()
            raise EngineError(f"{proc.name} (pid {proc.pid}) died ({cause}); finished records are on disk")

    def stats(self, timeout: float = 10.0) -> dict:
        """The core's cumulative counters now: steps run, and idle_s (time it had nothing to run and waited on
        the ring). Call it between runs; results still arriving are an error here."""
        self._stats_id += 1
        self.core_q.put({"t": "stats?", "id": self._stats_id})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.events.get(timeout=0.2)
            except queue.Empty:
                self._check_alive()
                continue
            if msg["t"] in ("result", "error"):
                raise EngineError("Engine.stats() was called while results were still arriving; call it between runs")
            self._handle_control(msg)
            if msg.get("reply_to") == self._stats_id:
                return dict(self.core_stats)
        raise EngineError(f"the engine core did not answer a stats request within {timeout} s")

    def interrupt(self) -> None:
        """Stop admitting work; `run` returns at its next check (from a signal handler or another thread)."""
        self._stop.set()

    @property
    def is_interrupted(self) -> bool:
        return self._stop.is_set()

    def run(self, items: Iterable[Request | dict]) -> Iterator[Outcome]:
        """Generate for Requests (error dicts pass through); yields one Outcome per item as each finishes."""
        local: deque[Outcome] = deque()
        feeder = _Feeder(self, items, local)
        feeder.start()
        while not self._stop.is_set():
            while local:
                yield local.popleft()
            if feeder.is_done and not self.pending and not local:
                break
            try:
                msg = self.events.get(timeout=0.2)
            except queue.Empty:
                self._check_alive()
                continue
            outcome = self._outcome(msg)
            if outcome is not None:
                yield outcome
        feeder.join_checked()

    def _outcome(self, msg: dict) -> Outcome | None:
        kind = msg["t"]
        if kind not in ("result", "error"):
            self._handle_control(msg)
            return None
        position, request = self.pending.pop(msg["index"])
        if kind == "error":
            return Outcome(position, error_record(request.line, request.id, msg["error"]), True)
        record = {"id": request.id, "completion": msg["completion"], "finish_reason": msg["finish_reason"],
                  "num_prompt_tokens": msg["num_prompt_tokens"], "num_completion_tokens": msg["num_completion_tokens"],
                  "seed": request.seed, "steering": request.steering}
        if request.steering_name is not None:
            record["steering_name"] = request.steering_name
        if "completion_token_ids" in msg:
            record["completion_token_ids"] = msg["completion_token_ids"]
        record.update(request.extra)
        return Outcome(position, record, False, msg.get("activations"))

    def generate(self, records: Iterable[dict | str]) -> Iterator[dict]:
        """Records (dicts as in the JSONL input, or plain prompt strings) -> result records as they finish; a record
        that captured activations carries them as `"activations": {layer: tensor}`."""
        for outcome in self.run(read_requests(enumerate(records, 1), self.config)):
            yield _with_tensors(outcome)

    def generate_all(self, records: Iterable[dict | str]) -> list[dict]:
        """Like generate, but returns every record in input order."""
        outcomes = list(self.run(read_requests(enumerate(records, 1), self.config)))
        return [_with_tensors(o) for o in sorted(outcomes, key=lambda o: o.position)]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.lifeline.stop()
        deadline = time.monotonic() + 10
        for proc in self.procs:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for q in (self.events, self.tok_in, self.core_q, self.dec_q):
            q.close()
        self.ring.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _with_tensors(outcome: Outcome) -> dict:
    if outcome.activations is None:
        return outcome.record
    return {**outcome.record, "activations": tensors_of(outcome.activations)}


class _Feeder(threading.Thread):
    """Sends requests to the tokenizer workers in batches; bounded by the tokenizer queue (backpressure)."""

    def __init__(self, engine: Engine, items: Iterable[Request | dict], local: deque):
        super().__init__(name="feeder", daemon=True)
        self.engine, self.items, self.local = engine, items, local
        self.is_done = False
        self.error: BaseException | None = None

    def run(self) -> None:
        engine, batch = self.engine, []
        try:
            for position, item in enumerate(self.items):
                if engine.is_interrupted:
                    return
                if isinstance(item, dict):
                    self.local.append(Outcome(position, item, True))
                    continue
                item.index = engine._next_index
                engine._next_index += 1
                engine.pending[item.index] = (position, item)
                batch.append(item.to_msg())
                if len(batch) >= FEED_BATCH:
                    self._send(batch)
                    batch = []
            if batch:
                self._send(batch)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consuming thread by join_checked
            self.error = exc
            engine.interrupt()
        finally:
            self.is_done = True

    def _send(self, batch: list[dict]) -> None:
        self.engine.tok_in.put_until({"requests": batch}, lambda: self.engine.is_interrupted)

    def join_checked(self) -> None:
        self.join(timeout=5)
        if self.error is not None:
            raise self.error
