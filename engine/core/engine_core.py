"""EngineCore: the step loop, usable in one process (engine.core.proc runs it as the engine-core process).

The core is the only process that touches the device. It takes tokenized requests, runs the scheduler and model
runner, and returns finished sequences.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from engine.core.activations import ActivationRecorder
from engine.core.admission import Admission
from engine.core.attention import unsupported_reason
from engine.config import DEFAULT_NUM_SEQS, EngineConfig
from engine.messages import CANCELLED, CoreRequest
from engine.pipeline.request import RecordError
from engine.core.faults import is_device_error, non_finite_error  # noqa: F401 - is_device_error: re-exported
from engine.core.kv_cache import KVCache, plan_rows
from engine.core.lora import LoraTable
from engine.core.model_runner import ModelRunner
from engine.models import ModelNotFound, ModelSource, effective_max_len
from engine.core.scheduler import Scheduler, Sequence
from engine.core.startup import load_core_model, open_compile_cache
from engine.core.steering import SteeringTable
from engine.stops import StopScanner
from engine.core.trace import Phases

log = logging.getLogger("engine")

# Steering-table rows preallocated (distinct vectors before it grows): growing it re-captures the steered decode
# graphs, so a GPU reserves many (4096 x hidden x 6 bytes: 50 MB at hidden 2048); a CPU has no graphs.
STEERING_ROWS = {"gpu": 4096, "cpu": 1024}
MAX_CANCELLED = 65536  # cancelled indices kept for requests not yet arrived


class EngineCore:
    """Holds the model; `add` queues a tokenized request, `step` advances every running sequence by one token."""

    def __init__(self, config: EngineConfig, source: ModelSource):
        self.config = config
        self.phases = Phases()  # start-up, phase by phase (what engine-bench reports)
        self.device, self.dtype, self.model, self.eos_ids = load_core_model(config, source, self.phases)
        self.stops = StopScanner(source.tokenizer_dir)
        reason = unsupported_reason(self.model.config)
        if reason:
            raise ModelNotFound(reason + "; use a model without it")
        max_len = effective_max_len(config.max_model_len, source)
        wanted = config.max_num_seqs or DEFAULT_NUM_SEQS["cpu" if self.device == "cpu" else "gpu"]
        kv_rows, self.max_prefill_tokens = plan_rows(self.model.config, wanted, max_len, self.dtype, self.device,
                                                     config.gpu_memory_fraction, config.max_prefill_tokens,
                                                     is_default=config.max_num_seqs is None)
        self.cache = KVCache(self.model.config, kv_rows, max_len, self.dtype, self.device)
        table_rows = STEERING_ROWS["cpu" if self.device == "cpu" else "gpu"]
        self.steering = SteeringTable(self.model, self.device, kv_rows, capacity=table_rows)
        self.recorder = ActivationRecorder(self.model, self.steering, self.device, kv_rows, config.capture)
        self.lora = LoraTable(self.model, config.adapters, self.device, kv_rows)  # hooks before the layers compile
        if self.lora.is_loaded:
            self.phases.done("adapters")
        self.compile_cache = open_compile_cache(config, self.model.config, self.dtype, self.device)
        self.runner = ModelRunner(self.model, self.steering, self.cache, use_graphs=not config.enforce_eager,
                                  recorder=self.recorder, max_prefill_tokens=self.max_prefill_tokens,
                                  phases=self.phases, compile_cache=self.compile_cache, lora=self.lora)
        if self.compile_cache is not None:
            self.compile_cache.seal()
        self.scheduler = Scheduler(kv_rows, self.max_prefill_tokens)
        self.admission = Admission(self.steering, self.recorder, self.lora)
        self._inflight: tuple | None = None  # the last launched step, whose tokens the host has not read
        self._host_tokens = [torch.zeros(kv_rows, dtype=torch.int64, pin_memory=self.device.startswith("cuda"))
                             for _ in range(2)]
        self._flip = 0
        self.streaming: dict[int, Sequence] = {}  # the streaming sequences that have not finished, by index
        self.cancelled: set[int] = set()  # requests cancelled before they reached this core (refused on arrival)
        self.timing: dict = {}  # the last step's host timings (StepTrace)

    def close(self) -> None:
        """Record what this run compiled in the compile cache and let go of it."""
        if self.compile_cache is not None:
            self.compile_cache.seal()
            self.compile_cache.release()

    def add(self, request: CoreRequest, prompt_ids: torch.Tensor) -> None:
        """Queue one request, or raise RecordError and keep nothing of it (Admission.add)."""
        if request.index in self.cancelled:
            self.cancelled.discard(request.index)
            raise RecordError(CANCELLED)
        seq = self.admission.add(request, prompt_ids, self.scheduler)
        if request.stream:
            self.streaming[seq.index] = seq

    def cancel(self, indices: list[int]) -> list[int]:
        """End these requests now: waiting ones leave the queue, running ones their KV row (a step in flight that
        holds one still computes it; its token is dropped as for a sequence that ended). Returns those ended here;
        the others are refused if they arrive later (the set is bounded: the oldest indices go first)."""
        wanted = set(indices)
        ended = [seq for seq in self.scheduler.waiting if seq.index in wanted]
        for seq in ended:
            self.scheduler.waiting.remove(seq)
        for seq in list(self.scheduler.running.values()):
            if seq.index in wanted and seq.finish_reason is None:
                self.scheduler.drop(seq)
                ended.append(seq)
        for seq in ended:
            seq.finish_reason = "cancelled"
            self.recorder.pop(seq.index)
            self.streaming.pop(seq.index, None)
        done = {seq.index for seq in ended}
        self.cancelled |= wanted - done
        while len(self.cancelled) > MAX_CANCELLED:
            self.cancelled.discard(min(self.cancelled))
        return sorted(done)

    def progress(self, finished: list[Sequence]) -> list[list]:
        """The streaming sequences' tokens read since the last call, as Progress chunks [index, start, int32
        bytes, their log-probabilities, their top alternatives] (the last two None unless it asked for them);
        `finished` (the last step's) are dropped from the streaming set: their Result carries the rest."""
        for seq in finished:
            self.streaming.pop(seq.index, None)
        chunks = []
        for seq in self.streaming.values():
            end = len(seq.output_ids) if seq.num_logprobs < 0 else len(seq.output_logprobs)
            if end > seq.num_streamed:
                start = seq.num_streamed
                asked = seq.num_logprobs >= 0
                chunks.append([seq.index, start, np.asarray(seq.output_ids[start:end], dtype=np.int32).tobytes(),
                               seq.output_logprobs[start:end] if asked else None,
                               seq.output_top[start:end] if asked and seq.num_logprobs else None])
                seq.num_streamed = end
        return chunks

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._inflight is not None

    def step(self, on_wait: Callable[[], bool] | None = None) -> list[Sequence]:
        """Launch the next step, then read the previous one's tokens while the device works (one step ahead).
        While those tokens are not ready, `on_wait()` is called until it returns False (the core process admits
        new requests there, so their host work overlaps the GPU's)."""
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        tokens = None
        if batch is not None:
            tokens = self._prefill_backing_off(batch) if batch.is_prefill else self.runner.step(batch)
        elif self._inflight is None:
            raise RuntimeError("scheduler stalled: running sequences but nothing to launch or read")
        launched = None
        if tokens is not None:
            for seq in batch.seqs:
                seq.num_scheduled += 1
            launched = (batch, self._copy_to_host(tokens, batch))
        self.timing = _step_timing(batch, started)
        finished = self._read(*self._inflight, on_wait) if self._inflight is not None else []
        self._inflight = launched
        return finished

    def _prefill_backing_off(self, batch) -> torch.Tensor | None:
        """Prefill; on a CUDA out-of-memory error, requeue the batch and halve the prefill token budget."""
        try:
            return self.runner.step(batch)
        except torch.cuda.OutOfMemoryError:
            tokens = sum(s.num_prompt_tokens for s in batch.seqs)
            if len(batch.seqs) == 1:
                raise  # a single prompt that does not fit: nothing smaller to try
            self.scheduler.requeue(batch.seqs)
            self.scheduler.max_prefill_tokens = max(16, self.scheduler.max_prefill_tokens // 2)
            torch.cuda.empty_cache()
            log.warning("CUDA out of memory in a prefill of %d prompts (%d tokens); going on with "
                        "max_prefill_tokens=%d", len(batch.seqs), tokens, self.scheduler.max_prefill_tokens)
            return None

    def _copy_to_host(self, tokens: torch.Tensor, batch):
        host = self._host_tokens[self._flip][:tokens.shape[0]]
        self._flip ^= 1
        host.copy_(tokens, non_blocking=True)
        logprobs = self.runner.logprobs
        if logprobs is not None:  # asked for by few requests: copied as they come, on the same event
            logprobs = tuple(None if t is None else t.to("cpu", non_blocking=True) for t in logprobs)
        captured = self.recorder.stage(batch)  # the step's activations ride on the same event
        event = None
        if tokens.is_cuda:
            event = torch.cuda.Event()
            event.record()
        return host, event, captured, logprobs

    def _read(self, batch, copied, on_wait: Callable[[], bool] | None = None) -> list[Sequence]:
        host, event, captured, logprobs = copied
        waited, busy = time.perf_counter(), 0.0
        if event is not None:
            while on_wait is not None and not event.query():
                started = time.perf_counter()
                if not on_wait():
                    break
                busy += time.perf_counter() - started
            event.synchronize()
        read = time.perf_counter()
        values = host.tolist()
        tokens = values if batch.is_prefill else [values[s.row] for s in batch.seqs]  # decode row b is KV row b
        self.recorder.collect(batch, captured)
        finished = self.scheduler.update(batch.seqs, tokens, self.eos_ids, self.stops.hit)
        if logprobs is not None:
            _keep_logprobs(batch, logprobs)
        for seq in finished:
            if seq.finish_reason == "error":
                self._fail_non_finite(seq)
        self.timing.update(wait_ms=1e3 * (read - waited - busy), read_ms=1e3 * (time.perf_counter() - read))
        return finished

    def _fail_non_finite(self, seq: Sequence) -> None:
        """End a sequence whose forward overflowed (it sampled NON_FINITE: NaN or inf logits, or a collapsed final
        norm): its error, no activations, and its KV row cleared. The row's K/V may hold NaN by now, and attention
        over the next owner's masked columns would still spread them (a NaN times a zero weight is NaN). Its row is
        free already (Scheduler.update); the clearing is queued on the device after every step launched so far,
        before any that reuses the row."""
        seq.error = non_finite_error(seq, self.dtype)
        self.recorder.pop(seq.index)
        for tensor in (*self.cache.k, *self.cache.v):
            tensor[seq.row, :, :seq.num_tokens].zero_()  # every column it (or a step still in flight) wrote

    def generate(self, requests: list[CoreRequest], prompts: list[list[int]]) -> dict[int, Sequence]:
        """In-process convenience: run requests to completion; returns finished sequences by index (a sequence
        that failed has finish_reason "error" and its message in `error`)."""
        for request, ids in zip(requests, prompts):
            self.add(request, torch.tensor(ids, dtype=torch.int64, device=self.device))
        done: dict[int, Sequence] = {}
        while self.has_work:
            done.update((s.index, s) for s in self.step())
        return done


def _keep_logprobs(batch, logprobs: tuple) -> None:
    """The step's log-probabilities into the sequences that asked, for the token each took (none for a token
    dropped because its sequence had finished)."""
    chosen, top_values, top_ids = (None if t is None else t.tolist() for t in logprobs)
    for i, seq in enumerate(batch.seqs):
        if seq.num_logprobs < 0 or len(seq.output_logprobs) >= len(seq.output_ids):
            continue
        row = i if batch.is_prefill else seq.row
        seq.output_logprobs.append(chosen[row])
        if top_ids is not None:
            seq.output_top.append([[t, v] for t, v in zip(top_ids[row][:seq.num_logprobs],
                                                          top_values[row][:seq.num_logprobs])])


def _step_timing(batch, started: float) -> dict:
    """What a step launched and the host time it took (StepTrace's fields; the read adds wait_ms and read_ms)."""
    if batch is None:
        return {"step": "read", "launch_ms": 1e3 * (time.perf_counter() - started)}
    size = sum(s.num_prompt_tokens for s in batch.seqs) if batch.is_prefill else batch.num_rows
    return {"step": "prefill" if batch.is_prefill else "decode", "size": size,
            "launch_ms": 1e3 * (time.perf_counter() - started)}
