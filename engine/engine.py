"""Engine: the Python API over the multiprocess pipeline (tokenizer workers -> ring -> core -> decoders).

Build it once from an EngineConfig; `generate(records)` yields result records as they finish, and
`generate_all(records)` returns them in input order. The CLI is a thin layer over `Engine.run`.
"""

from __future__ import annotations

import itertools
import logging
import os
import multiprocessing as mp
import queue
import signal
import threading
import time
from collections import deque
from typing import Iterable, Iterator

from engine.bytecode import use_bytecode_cache
from engine.config import EngineConfig
from engine.messages import Fatal, Feed, Outcome, Ready, RecordFailed, Result, Stats, StatsQuery
from engine.models import effective_max_len, resolve_model, tokenizer_facts
from engine.pipeline.decoder_worker import run_decoder_worker
from engine.pipeline.reader import error_record, read_requests
from engine.pipeline.request import Request
from engine.pipeline.ring import ShmRing
from engine.pipeline.router import CoreHandle, Router, core_labels
from engine.pipeline.tokenizer_worker import run_tokenizer_worker
from engine.procs import ByName, Lifeline, MsgQueue, start, wake

log = logging.getLogger("engine")

FEED_BATCH = 32
# The core's entry point by name: the parent never imports engine.core.proc (torch, transformers), so it starts
# the core
# at once instead of after seconds of imports, and imports torch later only if a run needs it (activations).
RUN_CORE = ByName("engine.core.proc", "run_core")
HEALTH_CHECK_S = 0.5  # how often a running engine looks for dead processes while results keep arriving
class EngineError(RuntimeError):
    """A stage of the pipeline failed; the message names the stage and the cause."""


class Engine:
    """The running pipeline; use as a context manager so its processes always end.

    With several devices (`config.devices`) there is one engine core per device, fed from the same tokenizer
    workers and ring through a Router; each core has its own decoder workers, whose results meet in one events
    queue. A core that dies is reported and its unfinished requests run again on the others; the run fails only
    when no core is left.
    """

    def __init__(self, config: EngineConfig):
        started = time.perf_counter()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub, in any process
        use_bytecode_cache()
        self.config = config
        self.source = resolve_model(config.model, config.tokenizer, config.cache_dir)
        self.max_model_len = effective_max_len(config.max_model_len, self.source)
        ctx = mp.get_context("spawn")
        devices = config.core_devices()
        self.events = MsgQueue(ctx)
        self.tok_in = MsgQueue(ctx, maxsize=2 * config.tokenizer_workers)
        # The ring grows with the cores so each keeps as many slots in flight as one core alone would.
        self.ring = ShmRing(ctx, config.ring_slots * len(devices), max(config.slot_tokens, self.max_model_len),
                            max_requests=256)
        self.lifeline = Lifeline(ctx)
        self.cores = [CoreHandle(i, device, label, "engine core" if len(devices) == 1 else f"engine core {i}",
                               MsgQueue(ctx), MsgQueue(ctx), MsgQueue(ctx))
                      for i, (device, label) in enumerate(zip(devices, core_labels(devices)))]
        self.router = Router(self.cores, MsgQueue(ctx), self.ring) if len(devices) > 1 else None
        self.core_q = self.router.inbox if self.router else self.cores[0].inbox  # where tokenizers send slots
        self.procs: list = []
        self.pending: dict[int, tuple[int, Request]] = {}
        self._indices = itertools.count()  # request indices; next() on it is atomic, so two threads may draw
        self._abandoned: set[int] = set()  # indices of a dead core's requests, run again under new indices
        self.core_failures: list[str] = []  # one line per core that died while others went on
        self._stop = threading.Event()
        self._closed = False
        self._is_ready = False
        self._next_check = 0.0
        self._stats_id = 0
        self.dtype = ""  # from the cores' ready messages
        self.startup_phases: dict[int, dict[str, float]] = {}  # core number -> its start-up phases (trace.Phases)
        self.generate_s = 0.0  # time spent inside run(), for throughput
        try:  # whatever stops start-up (a signal, a stage's failure), no process outlives it
            self._start(ctx)
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        self._is_ready = True
        if self.router:
            self.router.start()
        self.device = _devices_name([core.name for core in self.cores])
        self.startup_s = time.perf_counter() - started

    def _start(self, ctx) -> None:
        """Start every stage, each kept as soon as it runs (so close() reaches it if start-up is interrupted)."""
        c = self.config
        num_cpu = sum(core.device == "cpu" for core in self.cores)
        threads = max(1, len(os.sched_getaffinity(0)) // num_cpu) if num_cpu > 1 else 0
        for core in self.cores:  # the cores first: their start-up (model, compile) is the longest, the rest overlaps it
            # The core's results and its messages to the parent both go to its own decoders (see run_decoder_worker).
            core.proc = start(ctx, core.stage, core.fatal, RUN_CORE, c.for_core(core.device).to_dict(),
                              self.source.to_msg(), self.ring, core.inbox, core.dec_q, core.dec_q, self.lifeline,
                              core.number, threads)
        for i in range(c.tokenizer_workers):
            self.procs.append(start(ctx, f"tokenizer worker {i}", self.events, run_tokenizer_worker,
                                    self.source.tokenizer_dir,
                                    self.max_model_len, c.truncate, self.ring, self.tok_in, self.core_q, self.events,
                                    self.lifeline))
        for core in self.cores:
            prefix = "decoder worker " if len(self.cores) == 1 else f"decoder worker {core.number}."
            for i in range(c.decoder_workers):
                core.decoders.append(start(ctx, f"{prefix}{i}", self.events, run_decoder_worker,
                                           self.source.tokenizer_dir, c.cache_dir, c.return_tokens, core.dec_q,
                                           self.events, self.lifeline))
        self._record_tokenizer_facts()

    def _record_tokenizer_facts(self) -> None:
        """Record the tokenizer's facts for the cores while they import torch (seconds): the first run with a
        tokenizer would otherwise load it (1-2 s, holding the GIL) on the core's path to its first step. A core
        that gets there first computes them itself, and reports whatever fails."""
        try:
            tokenizer_facts(self.source.tokenizer_dir, self.config.cache_dir)
        except Exception as exc:  # noqa: BLE001 - only a head start; the core computes them again and reports
            log.debug("recording the tokenizer's facts ahead of the core failed: %s", exc)

    def _wait_ready(self) -> None:
        waiting = {core.number for core in self.cores}
        while waiting:
            try:
                msg = self.events.get(timeout=0.5)
            except queue.Empty:
                self._check_alive()
                continue
            if isinstance(msg, Ready):
                self.cores[msg.core].name, self.dtype = msg.device, msg.dtype
                self.startup_phases[msg.core] = msg.phases
                waiting.discard(msg.core)
            else:
                self._handle_control(msg)

    def _handle_control(self, msg) -> None:
        """A message that is neither a result nor a record's error: a core's counters, or a stage's failure."""
        match msg:
            case Stats():
                self.cores[msg.core].stats = msg
            case Fatal():
                self.close()
                raise EngineError(f"{msg.stage} failed: {msg.error}\n{msg.traceback}".rstrip())
            case _:
                raise EngineError(f"the engine got an unexpected {type(msg).__name__} message: {msg}")

    @property
    def core_stats(self) -> dict:
        """The cores' last cumulative counters: steps (all cores), idle_s (per core, averaged over cores),
        busy_starts (monotonic times at which a core went from idle to work, recent ones, all cores, sorted) and
        idle_since (when the last core to run out of work did so; None before any finished), graphs (decode graphs
        captured, re-captured and the seconds spent, all cores: ModelRunner.graph_stats); on CUDA also the
        largest core's torch_allocated_peak / torch_reserved_peak (bytes, since its start; None on CPU)."""
        stats = [core.stats for core in self.cores if core.stats is not None]
        ends = [s.idle_since for s in stats if s.idle_since is not None]
        peaks = {key: max((getattr(s, key) for s in stats if getattr(s, key) is not None), default=None)
                 for key in ("torch_allocated_peak", "torch_reserved_peak")}
        graphs = [s.graphs for s in stats if s.graphs is not None]
        return {"steps": sum(s.steps for s in stats),
                "graphs": {k: sum(g[k] for g in graphs) for k in ("captures", "recaptures", "capture_s")},
                "idle_s": sum(s.idle_s for s in stats) / max(len(stats), 1),
                "busy_starts": sorted(t for s in stats for t in s.busy_starts),
                "idle_since": max(ends, default=None), **peaks}

    def _check_health(self) -> None:
        """While results keep arriving, the queue never times out; look for dead processes every so often."""
        if time.monotonic() >= self._next_check:
            self._check_alive()
            self._next_check = time.monotonic() + HEALTH_CHECK_S

    def _check_alive(self) -> None:
        if self.router:
            self.router.check()
        for core in self.cores:
            if core.is_alive and core.proc.exitcode is not None:
                self._core_died(core)
        for proc in self.procs + [proc for core in self.cores if core.is_alive for proc in core.decoders]:
            if proc.exitcode is None:
                continue
            try:  # prefer the stage's own explanation if it sent one before dying
                while True:
                    self._handle_control(self.events.get(timeout=0.2))
            except queue.Empty:
                pass
            self.close()
            raise EngineError(f"{proc.name} (pid {proc.pid}) died ({_exit_cause(proc)}); finished records are on disk")

    def _core_died(self, core: CoreHandle) -> None:
        """Report a dead core; run its unfinished requests on the cores left, or fail if none is left."""
        headline, detail = _core_report(core)
        survivors = [other for other in self.cores if other.is_alive and other is not core]
        if not survivors or not self._is_ready:
            core.is_alive = False
            left = "; no engine core is left" if self._is_ready and len(self.cores) > 1 else ""
            kept = "; finished records are on disk" if self._is_ready else ""
            self.close()
            raise EngineError("\n".join([*self.core_failures, f"{headline}{left}{kept}", *detail]))
        indices = self.router.fail(core)
        headline += f"; its {len(indices)} unfinished requests go to {', '.join(o.label for o in survivors)}"
        self.core_failures.append(headline)
        log.warning("%s", "\n".join([headline, *detail]))
        self._rerun(indices)

    def _rerun(self, indices: list[int]) -> None:
        """Send a dead core's requests through the tokenizers again, under new indices: a late result under an
        old index (already decoded when the core died) is dropped, so each request yields exactly once."""
        batch = []
        for index in indices:
            entry = self.pending.pop(index, None)
            if entry is None:
                continue  # its result (or error) has already been yielded
            self._abandoned.add(index)
            position, request = entry
            request.index = next(self._indices)
            self.pending[request.index] = (position, request)
            batch.append(request.to_wire())
        for at in range(0, len(batch), FEED_BATCH):
            self.tok_in.put_until(Feed(batch[at:at + FEED_BATCH]), self._is_stuck)

    def _is_stuck(self) -> bool:
        """Stop waiting on the tokenizers: interrupted, or no core is left to free the ring for them."""
        return self.is_interrupted or not any(core.is_alive and core.proc.exitcode is None for core in self.cores)

    def device_counts(self) -> list[dict]:
        """Per core: device, label, card name, whether it is alive, its cumulative steps / idle_s, and the
        requests and completion tokens it finished."""
        return [core.counts() for core in self.cores]

    def stats(self, timeout: float = 10.0) -> dict:
        """The cores' cumulative counters now: steps run, idle_s (time a core had nothing to run and waited on the
        ring; averaged over cores), and per device (`devices`) those counters, requests and tokens finished and
        tok/s over the time spent generating. Call it between runs; results still arriving are an error here."""
        self._stats_id += 1
        waiting = {core.number for core in self.cores if core.is_alive}
        for core in self.cores:
            if core.is_alive:
                core.inbox.put(StatsQuery(self._stats_id))
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            try:
                msg = self.events.get(timeout=0.2)
            except queue.Empty:
                self._check_alive()
                waiting &= {core.number for core in self.cores if core.is_alive}
                continue
            if isinstance(msg, (Result, RecordFailed)):
                raise EngineError("Engine.stats() was called while results were still arriving; call it between runs")
            self._handle_control(msg)
            if isinstance(msg, Stats) and msg.reply_to == self._stats_id:
                waiting.discard(msg.core)
        if waiting:
            raise EngineError(f"the engine core did not answer a stats request within {timeout} s")
        return self._stats_now()

    def _stats_now(self) -> dict:
        devices = self.device_counts()
        seconds = max(self.generate_s, 1e-9)
        for entry in devices:
            entry["tok_s"] = entry["num_tokens"] / seconds
        num_tokens = sum(entry["num_tokens"] for entry in devices)
        return {**self.core_stats, "num_tokens": num_tokens, "tok_s": num_tokens / seconds,
                "generate_s": self.generate_s, "devices": devices}

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
        started = time.perf_counter()
        try:
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
                self._check_health()
                outcome = self._outcome(msg)
                if outcome is not None:
                    yield outcome
        finally:
            self.generate_s += time.perf_counter() - started
        feeder.join_checked()

    def _outcome(self, msg) -> Outcome | None:
        if not isinstance(msg, (Result, RecordFailed)):
            self._handle_control(msg)
            return None
        if msg.index in self._abandoned:
            self._abandoned.discard(msg.index)  # a dead core's request, already sent to another core
            return None
        position, request = self.pending.pop(msg.index)
        core = self.router.finished(msg.index) if self.router else self.cores[0]
        if isinstance(msg, RecordFailed):
            return Outcome(position, error_record(request.line, request.id, msg.error), True)
        if core is not None:
            core.num_requests += 1
            core.num_tokens += msg.num_completion_tokens
        record = {"id": request.id, "completion": msg.completion, "finish_reason": msg.finish_reason,
                  "num_prompt_tokens": msg.num_prompt_tokens, "num_completion_tokens": msg.num_completion_tokens,
                  "seed": request.seed,
                  "steering": None if request.steering is None else request.steering.to_record()}
        if request.steering_name is not None:
            record["steering_name"] = request.steering_name
        if msg.completion_token_ids is not None:
            record["completion_token_ids"] = msg.completion_token_ids
        if request.digest is not None:
            record["input_digest"] = request.digest
        record.update(request.extra)
        return Outcome(position, record, False, msg.activations)

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
        for inbox in [self.tok_in] * self.config.tokenizer_workers + [core.inbox for core in self.cores] + \
                [core.dec_q for core in self.cores for _ in core.decoders]:
            wake(inbox)
        if self.router:
            self.router.close()
        for core in self.cores:
            if not core.is_alive:  # a dead core's decoders may wait forever on a message it never finished
                for proc in core.decoders:
                    proc.kill()
        # A core still loading its model cannot have finished anything: an interrupted start-up need not wait for it.
        deadline = time.monotonic() + (10 if self._is_ready else 1)
        procs = self.procs + [proc for core in self.cores for proc in [core.proc, *core.decoders] if proc is not None]
        for proc in procs:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        queues = [self.events, self.tok_in] + [q for core in self.cores for q in (core.inbox, core.fatal, core.dec_q)]
        for q in queues + ([self.router.inbox] if self.router else []):
            q.close()
        self.ring.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _exit_cause(proc) -> str:
    code = proc.exitcode
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _core_report(core: CoreHandle) -> tuple[str, list[str]]:
    """What killed a core, as (one line, traceback lines): its own fatal message (a CUDA error, say) if it sent
    one, else how it exited."""
    where = f"{core.stage} on {core.device} (pid {core.proc.pid})"
    try:
        msg = core.fatal.get(timeout=0.5)
    except queue.Empty:
        return f"{where} died ({_exit_cause(core.proc)})", []
    return f"{where} failed: {msg.error}", msg.traceback.rstrip().splitlines()


def _devices_name(names: list[str]) -> str:
    """The cards as the summary line names them: one name, `2x NAME` for identical cards, else a list."""
    if len(names) == 1:
        return names[0]
    return f"{len(names)}x {names[0]}" if len(set(names)) == 1 else ", ".join(names)


def _with_tensors(outcome: Outcome) -> dict:
    if outcome.activations is None:
        return outcome.record
    from engine.core.activations import tensors_of  # torch: not imported by the parent until activations arrive

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
                item.index = next(engine._indices)
                engine.pending[item.index] = (position, item)
                batch.append(item.to_wire())
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

    def _send(self, batch: list) -> None:
        self.engine.tok_in.put_until(Feed(batch), lambda: self.engine.is_interrupted)

    def join_checked(self) -> None:
        self.join(timeout=5)
        if self.error is not None:
            raise self.error
