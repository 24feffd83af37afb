"""run_core: the engine-core process around EngineCore. It takes token ids out of ring slots (SlotReader, one copy
to the device per slot), admits them between steps (Admission), steps the core, and sends finished sequences to the
decoder workers and its stats to the parent.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import time

import numpy as np
import torch

from engine.config import EngineConfig
from engine.messages import (CANCELLED, Cancel, Finished, FinishedSeq, Progress, Ready, RecordFailed, SlotFilled,
                             Stats, StatsQuery, Stop)
from engine.core.engine_core import EngineCore
from engine.core.scheduler import Sequence
from engine.core.trace import StepTrace
from engine.core.hf_imports import skip_unused_imports
from engine.models import ModelSource
from engine.pipeline.request import RecordError
from engine.pipeline.ring import ShmRing
from engine.procs import Lifeline, MsgQueue

log = logging.getLogger("engine")


def finished_seq(seq: Sequence, activations: dict | None = None) -> FinishedSeq:
    """What the decoders get of a finished sequence, with the layers its steering's terms steered when some term
    took them from its vector file (the result record states them)."""
    term_layers = None if seq.steering is None else seq.steering.term_layers
    asked = seq.num_logprobs >= 0
    return FinishedSeq(seq.index, np.asarray(seq.output_ids, dtype=np.int32).tobytes(), seq.finish_reason,
                       seq.num_prompt_tokens, seq.stop, activations,
                       None if term_layers is None else [list(layers) for layers in term_layers],
                       seq.output_logprobs if asked else None, seq.output_top if asked and seq.num_logprobs else None,
                       _prompt_scores(seq))


def _prompt_scores(seq: Sequence) -> dict | None:
    """A scored prompt's ids, its tokens' log-probabilities (from the second on) and their alternatives."""
    if seq.prompt_scores is None:
        return None
    chosen, values, ids = seq.prompt_scores
    out = {"ids": seq.prompt_ids.tolist(), "logprobs": chosen.tolist()}
    if values is not None:
        out["top_logprobs"] = [[[t, v] for t, v in zip(step_ids, step_values)]
                               for step_ids, step_values in zip(ids.tolist(), values.tolist())]
    return out


class SlotReader:
    """Moves a slot's tokens to the device with one copy and frees the slot once that copy is done."""

    def __init__(self, ring: ShmRing, device: str):
        self.ring, self.device = ring, device
        self.is_cuda = device.startswith("cuda")
        self.pinned = ring.pin() if self.is_cuda else False
        self._pending: list[tuple[torch.cuda.Event, int]] = []

    def read(self, slot: int, ticket: int) -> list[tuple[int, torch.Tensor]]:
        views = self.ring.read(slot, ticket)
        total = sum(len(v) for _, v in views)
        host = torch.from_numpy(self.ring.tokens[slot, :total])
        if self.is_cuda:
            flat = host.to(self.device, non_blocking=self.pinned).long()
            event = torch.cuda.Event()
            event.record()
            self._pending.append((event, slot))
        else:
            flat = host.long()  # a copy, so the slot can go back at once
            self.ring.release(slot)
        out, offset = [], 0
        for index, view in views:
            out.append((index, flat[offset:offset + len(view)]))
            offset += len(view)
        return out

    def release_done(self) -> None:
        still = []
        for event, slot in self._pending:
            if event.query():
                self.ring.release(slot)
            else:
                still.append((event, slot))
        self._pending = still


MAX_BUSY_STARTS = 16


def run_core(config_msg: dict, source_msg: dict, ring: ShmRing, inbox: MsgQueue, dec_q: MsgQueue,
              events: MsgQueue, lifeline: Lifeline, number: int = 0, num_threads: int = 0) -> None:
    """One engine core's process; `number` tags its messages when there are several, `num_threads` (CPU only)
    shares the host's cores between several CPU engine cores instead of each taking them all."""
    started = time.perf_counter()
    if num_threads:
        torch.set_num_threads(num_threads)
    config = EngineConfig.from_dict(config_msg)
    skip_unused_imports(config.cache_dir)
    core = EngineCore(config, ModelSource(**source_msg))
    reader = SlotReader(ring, core.device)
    name = torch.cuda.get_device_name(core.device) if reader.is_cuda else "cpu"
    events.put(Ready(number, time.perf_counter() - started, name, core.phases.seconds,
                     str(core.dtype).removeprefix("torch."), reader.pinned))
    # idle: no sequence to run, waiting for the ring; busy_starts: when work last resumed after idling, idle_since:
    # when the last sequence finished (both monotonic; engine-bench's window runs between them)
    stats = Stats(number)
    admission = Admission(core, reader, inbox, events, stats, max_waiting=2 * core.scheduler.num_rows)
    last_report = time.monotonic()
    trace = StepTrace(config.trace_dir, number) if config.trace_dir else None
    while lifeline.ok():
        iteration = time.monotonic()
        reader.release_done()
        admission.between_steps()
        stepped = core.has_work
        if stepped:
            finished = core.step(on_wait=admission.take)
            stats.steps += 1
            if core.streaming:
                chunks = core.progress(finished)
                if chunks:
                    dec_q.put(Progress(chunks))
            if finished:
                _send_finished(dec_q, core, finished)
                if not core.has_work:
                    stats.idle_since = time.monotonic()
        if trace is not None:
            trace.iteration(iteration, admission.seconds, admission.count, core.timing if stepped else None)
        admission.seconds, admission.count = 0.0, 0
        if time.monotonic() - last_report > 1.0:
            events.put(_report(stats, reader, graphs=core.runner.graph_stats))
            last_report = time.monotonic()
            if trace is not None:
                trace.flush()
    if trace is not None:
        trace.close()
    core.close()


def _send_finished(dec_q: MsgQueue, core: EngineCore, finished: list[Sequence]) -> None:
    """Finished sequences to the decoders; a failed one as its error, which a decoder passes on to the parent."""
    for seq in finished:
        if seq.error is not None:
            dec_q.put(RecordFailed(seq.index, seq.error))
    results = [finished_seq(s, core.recorder.pop(s.index)) for s in finished if s.error is None]
    if results:
        dec_q.put(Finished(results))


class Admission:
    """Takes ring messages off the inbox into the core: between steps, and while the host waits for the GPU."""

    def __init__(self, core: EngineCore, reader: SlotReader, inbox: MsgQueue, events: MsgQueue, stats: Stats,
                 max_waiting: int):
        self.core, self.reader, self.inbox, self.events, self.stats = core, reader, inbox, events, stats
        self.max_waiting = max_waiting
        self.seconds, self.count = 0.0, 0  # admission time and requests since the trace last read them

    def between_steps(self) -> None:
        """Admit what the inbox holds (waiting on it while there is nothing to run), up to a full prefill on a GPU:
        the rest is admitted while that prefill runs (`take` as the core's on_wait), not while the GPU sits idle.
        It does not stop sooner: a prefill costs ~20-50 ms of host time whatever its size, so launching one per
        ring message when admission is slow (new steering vectors) leaves the host, not the GPU, the bottleneck."""
        while self.take(block=not self.core.has_work):
            if self.reader.is_cuda and self.core.scheduler.prefill_ready():
                break

    def take(self, block: bool = False) -> bool:
        """Handle one inbox message; False if there was none (after up to 0.5 s when blocking) or no room."""
        if len(self.core.scheduler.waiting) >= self.max_waiting:
            return False
        idle_from = time.perf_counter() if block else None
        try:
            msg = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return False
        finally:
            if idle_from is not None:
                self.stats.idle_s += time.perf_counter() - idle_from
        match msg:
            case Stop():  # the lifeline says stop too: the loop ends at its next check
                return False
            case StatsQuery(id=query):
                self.events.put(_report(self.stats, self.reader, reply_to=query))
                return True
            case Cancel(indices=indices):
                for index in self.core.cancel(indices):
                    self.events.put(RecordFailed(index, CANCELLED))
                return True
            case SlotFilled():
                started = time.perf_counter()
                self.count += _admit(self.core, self.reader, msg, self.events)
                self.seconds += time.perf_counter() - started
            case _:
                raise TypeError(f"an engine core got a {type(msg).__name__} message; it takes SlotFilled, "
                                f"StatsQuery, Cancel and Stop")
        if block and self.core.has_work:
            self.stats.busy_starts = [*self.stats.busy_starts[-(MAX_BUSY_STARTS - 1):], time.monotonic()]
        return True


def _report(stats: Stats, reader: SlotReader, **changes) -> Stats:
    """The counters as sent now, with the caching allocator's peaks since the core started (bytes in live tensors,
    bytes it holds from the card): NVML's figure is the second plus the CUDA context, so together they say whether
    memory went to tensors or to the allocator's blocks."""
    if reader.is_cuda:
        changes.update(torch_allocated_peak=torch.cuda.max_memory_allocated(),
                       torch_reserved_peak=torch.cuda.max_memory_reserved())
    return dataclasses.replace(stats, **changes)


def _admit(core: EngineCore, reader: SlotReader, msg: SlotFilled, events: MsgQueue) -> int:
    """Queue a ring slot's requests, each refused one as its error record (EngineCore.add makes every admission
    error a RecordError, except device errors, which end the core); returns how many."""
    for request, (index, ids) in zip(msg.requests, reader.read(msg.slot, msg.ticket)):
        try:
            core.add(request, ids)
        except RecordError as exc:
            events.put(RecordFailed(index, str(exc)))
    return len(msg.requests)
