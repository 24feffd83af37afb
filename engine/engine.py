"""Engine: the Python API over the multiprocess pipeline (tokenizer workers -> ring -> core -> decoders).

Build it once from an EngineConfig; `generate(records)` yields result records as they finish, and
`generate_all(records)` returns them in input order. The CLI is a thin layer over `Engine.run`.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections import deque
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from engine.bytecode import use_bytecode_cache
from engine.config import EngineConfig
from engine.messages import Cancel, Feed, Outcome, Progress, RecordFailed, Result
from engine.models import effective_max_len, resolve_model
from engine.pipeline.reader import error_record, read_requests
from engine.pipeline.request import Request
from engine.pipeline.router import merged_stats, throughput_stats
from engine.pipeline.stages import EngineError, Stages
from engine.procs import MsgQueue

__all__ = ["Engine", "EngineError", "Streamed"]

FEED_BATCH = 32
HEALTH_CHECK_S = 0.5  # how often a running engine looks for dead processes while results keep arriving


class Streamed(NamedTuple):
    """Tokens a streaming request sampled: `ids` are its generated tokens from place `start` on, with their
    log-probabilities and top alternatives when it asked (engine.messages.Progress says why they may come out of
    order, or after the request's Outcome)."""

    position: int
    start: int
    ids: list[int]
    logprobs: list[float] | None = None
    top: list[list] | None = None


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
        self.stages = Stages(config, self.source, self.max_model_len)
        self.cores = self.stages.cores
        self.core_failures = self.stages.core_failures  # one line per core that died while others went on
        self.startup_phases = self.stages.startup_phases  # core number -> its start-up phases (trace.Phases)
        self.events: MsgQueue = self.stages.events
        self.pending: dict[int, tuple[int, Request]] = {}
        self._indices = itertools.count()  # request indices; next() on it is atomic, so two threads may draw
        self._abandoned: set[int] = set()  # indices of a dead core's requests, run again under new indices
        self._next_check = 0.0
        self._stats_id = 0
        self.generate_s = 0.0  # time spent inside run(), for throughput
        try:  # whatever stops start-up (a signal, a stage's failure), no process outlives it
            self.stages.start()
            self.stages.wait_ready()
        except BaseException:
            self.close()
            raise
        self.device = _devices_name([core.name for core in self.cores])
        self.dtype = self.stages.dtype
        self.startup_s = time.perf_counter() - started

    @property
    def core_stats(self) -> dict:
        """The cores' last cumulative counters (router.merged_stats says what each means)."""
        return merged_stats(self.cores)

    def _check_health(self) -> None:
        """While results keep arriving, the queue never times out; look for dead processes every so often."""
        if time.monotonic() >= self._next_check:
            self._check_alive()
            self._next_check = time.monotonic() + HEALTH_CHECK_S

    def _check_alive(self) -> None:
        for core in self.stages.check_alive():
            self._rerun(self.stages.core_died(core))

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
        self._feed(batch)

    def _feed(self, batch: list) -> None:
        for at in range(0, len(batch), FEED_BATCH):
            self.stages.tok_in.put_until(Feed(batch[at:at + FEED_BATCH]), self._is_stuck)

    def submit(self, items: list[tuple[int, Request]]) -> None:
        """Queue (position, Request) pairs for a long-lived caller (engine-serve) that reads `poll`; safe from another
        thread than poll's. Blocks while the tokenizers' queue is full (backpressure)."""
        batch = []
        for position, request in items:
            request.index = next(self._indices)
            self.pending[request.index] = (position, request)
            batch.append(request.to_wire())
        self._feed(batch)

    def cancel(self, requests: list[Request]) -> None:
        """End submitted requests that have not finished (their caller lost interest): each core ends those it
        holds, and each comes back as an error Outcome (engine.messages.CANCELLED) unless it finished first."""
        indices = [r.index for r in requests if r.index in self.pending]
        if indices:
            for core in self.cores:
                if core.is_alive:
                    core.inbox.put(Cancel(indices))

    def poll(self, timeout: float, max_messages: int = 256) -> list[Outcome | Streamed]:
        """What arrived for the submitted requests: an Outcome per finished request, and the tokens of streaming ones
        as Streamed. Waits up to `timeout` seconds for the first message, then takes what else has arrived (up to
        `max_messages`) without waiting, so a caller that fell behind catches up in one call. A dead engine core
        raises EngineError here, as in run."""
        try:
            msgs = [self.events.get(timeout=timeout)]
        except queue.Empty:
            self._check_alive()
            return []
        while len(msgs) < max_messages:
            try:
                msgs.append(self.events.get_nowait())
            except queue.Empty:
                break
        self._check_health()
        out: list[Outcome | Streamed] = []
        for msg in msgs:
            if isinstance(msg, Progress):
                for index, start, data, logprobs, top in msg.chunks:
                    entry = self.pending.get(index)
                    if entry is not None:
                        out.append(Streamed(entry[0], start, np.frombuffer(data, dtype=np.int32).tolist(), logprobs,
                                            top))
                continue
            outcome = self._outcome(msg)
            if outcome is not None:
                out.append(outcome)
        return out

    def _is_stuck(self) -> bool:
        """Stop waiting on the tokenizers: interrupted, or no core is left to free the ring for them."""
        return self.is_interrupted or not self.stages.has_live_core()

    def device_counts(self) -> list[dict]:
        """Per core: device, label, card name, whether it is alive, its cumulative steps / idle_s, and the
        requests and completion tokens it finished."""
        return [core.counts() for core in self.cores]

    def stats(self, timeout: float = 10.0) -> dict:
        """The cores' cumulative counters now: steps run, idle_s (time a core had nothing to run and waited on the
        ring; averaged over cores), and per device (`devices`) those counters, requests and tokens finished and
        tok/s over the time spent generating. Call it between runs; results still arriving are an error here."""
        self._stats_id += 1
        self.stages.query_stats(self._stats_id, timeout, self._check_alive)
        return throughput_stats(self.cores, self.generate_s)

    def interrupt(self) -> None:
        """Stop admitting work; `run` returns at its next check (from a signal handler or another thread)."""
        self.stages.stopping.set()

    @property
    def is_interrupted(self) -> bool:
        return self.stages.stopping.is_set()

    def run(self, items: Iterable[Request | dict]) -> Iterator[Outcome]:
        """Generate for Requests (error dicts pass through); yields one Outcome per item as each finishes."""
        local: deque[Outcome] = deque()
        feeder = _Feeder(self, items, local)
        feeder.start()
        started = time.perf_counter()
        try:
            while not self.is_interrupted:
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
                outcome = None if isinstance(msg, Progress) else self._outcome(msg)
                if outcome is not None:
                    yield outcome
        finally:
            self.generate_s += time.perf_counter() - started
        feeder.join_checked()

    def _outcome(self, msg) -> Outcome | None:
        if not isinstance(msg, (Result, RecordFailed)):
            self.stages.handle_control(msg)
            return None
        if msg.index in self._abandoned:
            self._abandoned.discard(msg.index)  # a dead core's request, already sent to another core
            return None
        position, request = self.pending.pop(msg.index)
        core = self.stages.router.finished(msg.index) if self.stages.router else self.cores[0]
        if isinstance(msg, RecordFailed):
            return Outcome(position, error_record(request.line, request.id, msg.error), True)
        if core is not None:
            core.num_requests += 1
            core.num_tokens += msg.num_completion_tokens
        return Outcome(position, request.result_record(msg), False, msg.activations)

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
        self.stages.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _devices_name(names: list[str]) -> str:
    """The cards as the summary line names them: one name, `2x NAME` for identical cards, else a list."""
    if len(names) == 1:
        return names[0]
    return f"{len(names)}x {names[0]}" if len(set(names)) == 1 else ", ".join(names)


def _with_tensors(outcome: Outcome) -> dict:
    if outcome.activations is None:
        return outcome.record
    from engine.storage.activations import tensors_of  # torch: not imported by the parent until activations arrive

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
        self.engine.stages.tok_in.put_until(Feed(batch), lambda: self.engine.is_interrupted)

    def join_checked(self) -> None:
        self.join(timeout=5)
        if self.error is not None:
            raise self.error
