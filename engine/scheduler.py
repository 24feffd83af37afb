"""Scheduler: which sequences the next step runs.

This first loop runs cohorts: when nothing is running it admits up to `max_num_seqs` waiting sequences for
one prefill, then decodes them until each finishes (finished rows leave the batch at once). The fast loop
replaces the cohort with slot-level continuous batching behind the same interface.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch


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
    steer_rows: dict[int, int]  # layer -> SteeringTable row
    steer_coef: float
    steer_positions: str
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def sampling_row(self) -> tuple[float, float, int, int]:
        return (self.temperature, self.top_p, self.top_k, self.seed)


@dataclass(slots=True)
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence]


class Scheduler:
    """Admits waiting sequences and hands the runner one batch per step."""

    def __init__(self, max_num_seqs: int):
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        if self.running:
            return ScheduledBatch(False, list(self.running))
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.popleft())
        return ScheduledBatch(True, list(self.running))

    def update(self, batch: ScheduledBatch, tokens: list[int], eos_ids: set[int]) -> list[Sequence]:
        """Append each row's new token; return the sequences that finished and drop them from the batch."""
        finished = []
        for seq, token in zip(batch.seqs, tokens):
            seq.output_ids.append(token)
            if token in eos_ids and not seq.ignore_eos:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= seq.max_new_tokens:
                seq.finish_reason = "length"
            else:
                continue
            finished.append(seq)
        if finished:
            done = {id(s) for s in finished}
            self.running = [s for s in self.running if id(s) not in done]
        return finished
