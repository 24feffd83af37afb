"""Stages: the parent's handles on one engine's processes and the queues between them, started cores first,
watched for deaths and closed so that no process outlives the engine."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from typing import Callable

from engine.config import EngineConfig
from engine.messages import Fatal, Ready, RecordFailed, Result, Stats, StatsQuery
from engine.models import ModelSource, tokenizer_facts
from engine.pipeline.decoder_worker import run_decoder_worker
from engine.pipeline.ring import ShmRing
from engine.pipeline.router import CoreHandle, Router, core_handles
from engine.pipeline.tokenizer_worker import run_tokenizer_worker
from engine.procs import ByName, Lifeline, MsgQueue, start, wake

log = logging.getLogger("engine")

# The core's entry point by name: the parent never imports engine.core.proc (torch, transformers), so it starts
# the core at once instead of after seconds of imports, and imports torch later only if a run needs it
# (activations).
RUN_CORE = ByName("engine.core.proc", "run_core")


class EngineError(RuntimeError):
    """A stage of the pipeline failed; the message names the stage and the cause."""


class Stages:
    """Every process of one engine and its queues: tokenizer workers, the ring, one core handle per device (and a
    router when there are several), each core's decoder workers, and the events queue their results meet in."""

    def __init__(self, config: EngineConfig, source: ModelSource, max_model_len: int):
        self.config, self.source, self.max_model_len = config, source, max_model_len
        self.ctx = ctx = mp.get_context("spawn")
        devices = config.core_devices()
        self.events = MsgQueue(ctx)
        self.tok_in = MsgQueue(ctx, maxsize=2 * config.tokenizer_workers)
        # The ring grows with the cores so each keeps as many slots in flight as one core alone would.
        self.ring = ShmRing(ctx, config.ring_slots * len(devices), max(config.slot_tokens, max_model_len),
                            max_requests=256)
        self.lifeline = Lifeline(ctx)
        self.cores = core_handles(ctx, devices)
        self.router = Router(self.cores, MsgQueue(ctx), self.ring) if len(devices) > 1 else None
        self.core_q = self.router.inbox if self.router else self.cores[0].inbox  # where tokenizers send slots
        self.procs: list = []  # the tokenizer workers
        self.is_ready = False
        self.dtype = ""  # from the cores' ready messages
        self.startup_phases: dict[int, dict[str, float]] = {}  # core number -> its start-up phases (trace.Phases)
        self.core_failures: list[str] = []  # one line per core that died while others went on
        self.stopping = threading.Event()  # set by an interrupt or by close(): admit no more work
        self._closed = False

    def start(self) -> None:
        """Start every stage, each kept as soon as it runs (so close() reaches it if start-up is interrupted)."""
        c, ctx = self.config, self.ctx
        num_cpu = sum(core.device == "cpu" for core in self.cores)
        threads = max(1, len(os.sched_getaffinity(0)) // num_cpu) if num_cpu > 1 else 0
        for core in self.cores:  # the cores first: their start-up (model, compile) is the longest, the rest overlaps it
            # The core's results and its messages to the parent both go to its own decoders (see run_decoder_worker).
            core.proc = start(ctx, core.stage, core.fatal, RUN_CORE, c.for_core(core.device).to_dict(),
                              self.source.to_msg(), self.ring, core.inbox, core.dec_q, core.dec_q, self.lifeline,
                              core.number, threads)
        for i in range(c.tokenizer_workers):
            self.procs.append(start(ctx, f"tokenizer worker {i}", self.events, run_tokenizer_worker,
                                    self.source.tokenizer_dir, self.max_model_len, c.truncate, self.ring,
                                    self.tok_in, self.core_q, self.events, self.lifeline))
        for core in self.cores:
            prefix = "decoder worker " if len(self.cores) == 1 else f"decoder worker {core.number}."
            for i in range(c.decoder_workers):
                core.decoders.append(start(ctx, f"{prefix}{i}", self.events, run_decoder_worker,
                                           self.source.tokenizer_dir, c.cache_dir, c.return_tokens, core.dec_q,
                                           self.events, self.lifeline))
        _record_tokenizer_facts(self.source, self.config.cache_dir)

    def wait_ready(self) -> None:
        """Return once every core has loaded its model and said so; a stage's failure meanwhile is an EngineError."""
        waiting = {core.number for core in self.cores}
        while waiting:
            try:
                msg = self.events.get(timeout=0.5)
            except queue.Empty:
                for core in self.check_alive():
                    self.core_died(core)
                continue
            if isinstance(msg, Ready):
                self.cores[msg.core].name, self.dtype = msg.device, msg.dtype
                self.startup_phases[msg.core] = msg.phases
                waiting.discard(msg.core)
            else:
                self.handle_control(msg)
        self.is_ready = True
        if self.router:
            self.router.start()

    def handle_control(self, msg) -> None:
        """A message that is neither a result nor a record's error: a core's counters, or a stage's failure."""
        match msg:
            case Stats():
                self.cores[msg.core].stats = msg
            case Fatal():
                self.close()
                raise EngineError(f"{msg.stage} failed: {msg.error}\n{msg.traceback}".rstrip())
            case _:
                raise EngineError(f"the engine got an unexpected {type(msg).__name__} message: {msg}")

    def query_stats(self, query_id: int, timeout: float, check_alive: Callable[[], None]) -> None:
        """Ask every live core for its counters and wait for the answers (kept on the core handles), calling
        `check_alive` while none comes; results still arriving are an EngineError, as is a core that does not
        answer within `timeout` seconds."""
        waiting = {core.number for core in self.cores if core.is_alive}
        for core in self.cores:
            if core.is_alive:
                core.inbox.put(StatsQuery(query_id))
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            try:
                msg = self.events.get(timeout=0.2)
            except queue.Empty:
                check_alive()
                waiting &= {core.number for core in self.cores if core.is_alive}
                continue
            if isinstance(msg, (Result, RecordFailed)):
                raise EngineError("Engine.stats() was called while results were still arriving; call it between runs")
            self.handle_control(msg)
            if isinstance(msg, Stats) and msg.reply_to == query_id:
                waiting.discard(msg.core)
        if waiting:
            raise EngineError(f"the engine core did not answer a stats request within {timeout} s")

    def check_alive(self) -> list[CoreHandle]:
        """The cores that have died since the last look; any other dead process is an EngineError."""
        if self.router:
            self.router.check()
        dead = [core for core in self.cores if core.is_alive and core.proc.exitcode is not None]
        workers = self.procs + [proc for core in self.cores if core.is_alive for proc in core.decoders]
        proc = next((proc for proc in workers if proc.exitcode is not None), None)
        if proc is not None:
            try:  # prefer the stage's own explanation if it sent one before dying
                while True:
                    self.handle_control(self.events.get(timeout=0.2))
            except queue.Empty:
                pass
            self.close()
            raise EngineError(f"{proc.name} (pid {proc.pid}) died ({_exit_cause(proc)}); finished records are on disk")
        return dead

    def core_died(self, core: CoreHandle) -> list[int]:
        """Report a dead core and return its unfinished requests for the cores left; EngineError if none is left."""
        headline, detail = _core_report(core)
        survivors = [other for other in self.cores if other.is_alive and other is not core]
        if not survivors or not self.is_ready:
            core.is_alive = False
            left = "; no engine core is left" if self.is_ready and len(self.cores) > 1 else ""
            kept = "; finished records are on disk" if self.is_ready else ""
            self.close()
            raise EngineError("\n".join([*self.core_failures, f"{headline}{left}{kept}", *detail]))
        indices = self.router.fail(core)
        headline += f"; its {len(indices)} unfinished requests go to {', '.join(o.label for o in survivors)}"
        self.core_failures.append(headline)
        log.warning("%s", "\n".join([headline, *detail]))
        return indices

    def has_live_core(self) -> bool:
        return any(core.is_alive and core.proc.exitcode is None for core in self.cores)

    def close(self) -> None:
        """End every process (waiting for finished work to drain once ready), then free the queues and the ring."""
        if self._closed:
            return
        self._closed = True
        self.stopping.set()
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
        deadline = time.monotonic() + (10 if self.is_ready else 1)
        procs = self.procs + [proc for core in self.cores for proc in [core.proc, *core.decoders] if proc is not None]
        _end(procs, deadline)
        queues = [self.events, self.tok_in] + [q for core in self.cores for q in (core.inbox, core.fatal, core.dec_q)]
        for q in queues + ([self.router.inbox] if self.router else []):
            q.close()
        self.ring.close()


def _record_tokenizer_facts(source: ModelSource, cache_dir) -> None:
    """Record the tokenizer's facts for the cores while they import torch (seconds): the first run with a
    tokenizer would otherwise load it (1-2 s, holding the GIL) on the core's path to its first step. A core
    that gets there first computes them itself, and reports whatever fails."""
    try:
        tokenizer_facts(source.tokenizer_dir, cache_dir)
    except Exception as exc:  # noqa: BLE001 - only a head start; the core computes them again and reports
        log.debug("recording the tokenizer's facts ahead of the core failed: %s", exc)


def _end(procs: list, deadline: float) -> None:
    """Let each process end by itself until the deadline (monotonic), then kill what is left."""
    for proc in procs:
        proc.join(timeout=max(0.1, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


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
