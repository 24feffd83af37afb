"""What an engine-bench child process (one system group) tells the parent, as engine.messages types of its own."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from engine.messages import Message, message


class BenchKind(IntEnum):
    START = 100  # engine.messages.Kind leaves kinds from 100 up to other packages
    PROGRESS = 101
    DONE = 102
    EXIT = 103


@message(BenchKind.START)
@dataclass(slots=True)
class SystemStarted(Message):
    system: str
    num_prompts: int


@message(BenchKind.PROGRESS)
@dataclass(slots=True)
class Progress(Message):
    num: int  # results since the last Progress


@message(BenchKind.DONE)
@dataclass(slots=True)
class SystemDone(Message):
    """One system's run: `done` is the row's raw material (system, start, end, first_result, cpu_s, token_ids,
    texts, num_generated_tokens and what the system adds), as engine_bench.report reads it."""

    done: dict


@message(BenchKind.EXIT)
@dataclass(slots=True)
class ChildExit(Message):
    """The child ran every system of its group."""
