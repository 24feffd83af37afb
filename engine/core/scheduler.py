"""Scheduler: continuous batching over KV rows.

A running sequence owns one KV row until it finishes, then the row is free at once. Waiting prompts are
prefilled in chunks (a token budget) when enough rows are free, and join the decode batch, which is
always "the first B rows" for a bucketed B, so decode shapes stay static for CUDA graphs.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.core.sampler import NON_FINITE

if TYPE_CHECKING:
    from engine.core.steering_plan import SteerPlan


@dataclass(slots=True)
class Sequence:
    """One request inside the engine core: its prompt tokens on the device and what it has generated."""

    index: int
    prompt_ids: torch.Tensor  # 1-D, on the device
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    ignore_eos: bool
    stop: list[str]
    steering: SteerPlan | None = None  # its steering resolved to SteeringTable rows; None: unsteered
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    row: int = -1  # its KV row while it runs
    num_scheduled: int = 0  # tokens sampled on the device, including one the host has not read yet
    error: str | None = None  # why it ended without a result (finish_reason "error"); the core words it
    num_streamed: int = -1  # streaming: how many of its tokens the core has sent (Progress); -1: not streaming
    queued_at: int = 0  # the scheduler's decode-step count when it was queued
    num_logprobs: int = -1  # -1: no log-probabilities; k >= 0: each token's, and the top k alternatives
    output_logprobs: list = field(default_factory=list)  # per output token: its log-probability
    output_top: list = field(default_factory=list)  # per output token: [[id, log-probability], ...] (k of them)
    num_prompt_logprobs: int = -1  # -1: none; k >= 0: each prompt token's log-probability and k alternatives
    prompt_scores: tuple | None = None  # after its prefill: (chosen [n - 1], top values, top ids) on the device
    adapter: int = 0  # its LoRA adapter (engine.core.lora.LoraTable's index; 0: the base model)

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Prompt plus every token sampled so far (read by the host or still in flight)."""
        return self.num_prompt_tokens + self.num_scheduled

    @property
    def needs_token(self) -> bool:
        return self.finish_reason is None and self.num_scheduled < self.max_new_tokens

    @property
    def sampling_row(self) -> tuple[float, float, int, int]:
        return (self.temperature, self.top_p, self.top_k, self.seed)


@dataclass(slots=True)
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence]  # prefill: the new sequences; decode: the running sequences that need a token
    num_rows: int = 0  # decode: the bucketed KV-row count the step runs over


def bucket(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


def batch_sizes(num_rows: int) -> list[int]:
    """Decode batch buckets: powers of two from 2 up to the row count, and the row count itself. None is 1 where
    there are two rows or more: a one-token row is a shape the compiled layers would specialise, and compile, for."""
    return sorted({min(2 ** i, num_rows) for i in range(1, num_rows.bit_length() + 1)})


# How many decode steps a few waiting requests may wait for others to join their prefill (~50 ms at a GPU's step of
# ~2 ms; engine-bench --serve measured what it buys).
PREFILL_WAIT_STEPS = 24


class Scheduler:
    """Admits waiting sequences into free KV rows and hands the runner one batch per step."""

    def __init__(self, num_rows: int, max_prefill_tokens: int):
        self.num_rows = num_rows
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self._free = list(range(num_rows))  # a heap: the lowest free row first keeps the batch compact
        self.batch_sizes = batch_sizes(num_rows)
        # Prefill once this many rows are free (or nothing runs): one prefill serves many new sequences.
        self.refill_at = max(1, num_rows // 8)
        self.num_decodes = 0  # decode steps scheduled so far

    def add(self, seq: Sequence) -> None:
        seq.queued_at = self.num_decodes
        self.waiting.append(seq)

    def prefill_ready(self) -> bool:
        """Whether the waiting sequences already fill a prefill: every free row, or the prefill token budget."""
        if len(self.waiting) >= len(self._free):
            return True
        return sum(s.num_prompt_tokens for s in self.waiting) >= self.max_prefill_tokens

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch; None when every running sequence waits for the host to read its last token."""
        if self.waiting and self._free and (len(self._free) >= self.refill_at or not self.running
                                            or len(self.waiting) < self.refill_at) and not self._gathering():
            return ScheduledBatch(True, self._admit())
        active = [s for s in self.running.values() if s.needs_token]
        if not active:
            return None
        self.num_decodes += 1
        return ScheduledBatch(False, active, bucket(max(s.row for s in active) + 1, self.batch_sizes))

    def _gathering(self) -> bool:
        """Whether to decode on while a few requests wait, so more join their prefill: a prefill's fixed cost (tens
        of ms on a GPU, whatever its size) is paid once for all it admits, and every running sequence waits for it.
        Sequences are decoding, the waiting ones fill neither the free rows, nor refill_at of them, nor the token
        budget, and the oldest has waited fewer than PREFILL_WAIT_STEPS decode steps. Requests that arrive one by
        one (a server's clients) then share prefills; a batch job's queue fills refills at once and never waits."""
        return (bool(self.running) and len(self.waiting) < min(len(self._free), self.refill_at)
                and self.num_decodes - self.waiting[0].queued_at < PREFILL_WAIT_STEPS
                and sum(s.num_prompt_tokens for s in self.waiting) < self.max_prefill_tokens)

    def _admit(self) -> list[Sequence]:
        """Waiting sequences for one prefill, in arrival order, while their prompt tokens fit the budget together
        (the prefill packs them without padding, so its cost is their sum); the first is always admitted."""
        admitted, num_tokens = [], 0
        while self.waiting and len(admitted) < len(self._free):
            n = self.waiting[0].num_prompt_tokens
            if admitted and num_tokens + n > self.max_prefill_tokens:
                break
            admitted.append(self.waiting.popleft())
            num_tokens += n
        for seq in admitted:
            seq.row = heapq.heappop(self._free)
            self.running[seq.row] = seq
        return admitted

    def drop(self, seq: Sequence) -> None:
        """Free a running sequence's KV row now (it was cancelled)."""
        del self.running[seq.row]
        heapq.heappush(self._free, seq.row)

    def requeue(self, seqs: list[Sequence]) -> None:
        """Put admitted sequences back at the front of the queue (their prefill did not run)."""
        for seq in reversed(seqs):
            del self.running[seq.row]
            heapq.heappush(self._free, seq.row)
            seq.row = -1
            self.waiting.appendleft(seq)

    def update(self, seqs: list[Sequence], tokens: list[int], eos_ids: set[int], stop_hit=None) -> list[Sequence]:
        """Append each sequence's new token; free the rows of those that finished and return them.

        A sequence that finished one step earlier (EOS seen late) was still computed; its token is dropped.
        `stop_hit(output_ids, stops)` says whether a stop string has appeared (the decoders cut the text there).
        A NON_FINITE token (the forward overflowed: see engine.core.sampler) ends its sequence with finish_reason
        "error", not appended.
        """
        finished = []
        for seq, token in zip(seqs, tokens):
            if seq.finish_reason is not None:
                continue
            seq.finish_reason = _finish_reason(seq, token, eos_ids, stop_hit)
            if seq.finish_reason is None:
                continue
            finished.append(seq)
            del self.running[seq.row]
            heapq.heappush(self._free, seq.row)
        return finished


def _finish_reason(seq: Sequence, token: int, eos_ids: set[int], stop_hit) -> str | None:
    """Take one sampled token into a running sequence; why it ends with it, or None if it goes on."""
    if token == NON_FINITE:
        return "error"
    seq.output_ids.append(token)
    if token in eos_ids and not seq.ignore_eos:
        return "stop"
    if len(seq.output_ids) >= seq.max_new_tokens:
        return "length"
    if seq.stop and stop_hit is not None and stop_hit(seq.output_ids, seq.stop):
        return "stop"
    return None
