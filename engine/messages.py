"""Every message that crosses a process, one type per kind, and Outcome (what the engine hands its caller).

The topology they travel (engine/pipeline's docstring draws it):

    parent --Feed--> tokenizer workers --SlotFilled--> (router) --> engine core --Finished--> decoder workers
    decoder workers --Result--> parent;  RecordFailed from any stage that refuses one record
    engine core --Progress (streaming requests' new tokens, passed on by its decoders)--> parent
    parent --Cancel--> engine cores
    engine core --Ready, Stats (via its decoders)--> parent;  parent --StatsQuery--> engine core
    any stage --Fatal--> parent;  parent --Stop--> any stage's inbox

On the wire (MsgQueue) a message is the msgpack list [kind, *fields]; `encode` and `decode` are the only codec, so a
field added to a type travels without touching any queue. Other packages (engine-bench) register kinds of their own
with `message(kind)`, at kind numbers from 100 up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

import msgpack

from engine.specs import CaptureSpec, SteeringSpec


class Kind(IntEnum):
    STOP = 0
    FEED = 1
    SLOT_FILLED = 2
    FINISHED = 3
    RESULT = 4
    RECORD_FAILED = 5
    READY = 6
    STATS = 7
    STATS_QUERY = 8
    FATAL = 9
    PROGRESS = 10
    CANCEL = 11


TYPES: dict[int, type] = {}


def message(kind: int):
    """Class decorator: register a dataclass as the message type of `kind` (one type per kind)."""

    def register(cls):
        if kind in TYPES:
            raise ValueError(f"message kind {kind} is taken by {TYPES[kind].__name__}; pick another for {cls.__name__}")
        cls.KIND = kind
        cls.NAMES = tuple(f.name for f in dataclasses.fields(cls))
        TYPES[kind] = cls
        return cls

    return register


class Message:
    """Base of every message type: its fields in order on the wire. Types with nested parts override the two."""

    __slots__ = ()
    KIND: ClassVar[int]
    NAMES: ClassVar[tuple[str, ...]]

    def wire_fields(self) -> list:
        return [getattr(self, name) for name in self.NAMES]

    @classmethod
    def from_wire(cls, values: list):
        return cls(*values)


def encode(msg: Message) -> bytes:
    return msgpack.packb([msg.KIND, *msg.wire_fields()], use_bin_type=True)


def decode(data: bytes) -> Message:
    """The message `encode` made; ValueError for bytes that are not one (an unknown kind)."""
    kind, *values = msgpack.unpackb(data, raw=False, strict_map_key=False)
    cls = TYPES.get(kind)
    if cls is None:
        raise ValueError(f"a message of unknown kind {kind!r} arrived; sender and receiver run different code")
    return cls.from_wire(values)


# -- requests, parent -> tokenizer workers -> engine core

@dataclass(slots=True)
class CoreRequest:
    """What the engine core needs of a request (its text, id and pass-through fields stay behind)."""

    index: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    ignore_eos: bool
    stop: list[str]
    steering: SteeringSpec | None
    capture: CaptureSpec | None = None
    stream: bool = False  # send its tokens as they are sampled (Progress), not only when it finishes
    logprobs: int = -1  # -1: none; k >= 0: each generated token's log-probability and the top k alternatives
    prompt_logprobs: int = -1  # likewise for the prompt's tokens (after the first)
    adapter: int = 0  # the LoRA adapter it runs with: engine.core.lora.LoraTable's index (0: the base model)

    def wire(self) -> list:
        """Its fields in order, the specs in their record form (as records state them)."""
        steering = None if self.steering is None else self.steering.to_record()
        capture = None if self.capture is None else self.capture.to_record()
        return [self.index, self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed,
                self.ignore_eos, self.stop, steering, capture, self.stream, self.logprobs, self.prompt_logprobs,
                self.adapter]

    @classmethod
    def from_wire(cls, values: list) -> "CoreRequest":
        *settings, steering, capture, stream, logprobs, prompt_logprobs, adapter = values
        return cls(*settings, None if steering is None else SteeringSpec.from_record(steering),
                   None if capture is None else CaptureSpec.from_record(capture), stream, logprobs, prompt_logprobs,
                   adapter)


@dataclass(slots=True)
class TokenizeRequest:
    """A request as the tokenizer workers get it: text or chat messages, and what goes on to the core."""

    prompt: str | list[int] | None  # text, or token ids as they are
    messages: list | None
    core: CoreRequest


@message(Kind.STOP)
@dataclass(slots=True)
class Stop(Message):
    """Put by the parent after Lifeline.stop, so a stage waiting on its inbox ends now, not at its poll."""


@message(Kind.FEED)
@dataclass(slots=True)
class Feed(Message):
    """A batch of requests for one tokenizer worker."""

    requests: list[TokenizeRequest]

    def wire_fields(self) -> list:
        return [[[r.prompt, r.messages, r.core.wire()] for r in self.requests]]

    @classmethod
    def from_wire(cls, values: list):
        return cls([TokenizeRequest(prompt, chat, CoreRequest.from_wire(core)) for prompt, chat, core in values[0]])


@message(Kind.SLOT_FILLED)
@dataclass(slots=True)
class SlotFilled(Message):
    """A ring slot holds these requests' token ids, in this order, under `ticket` (the ring's stamp)."""

    slot: int
    ticket: int
    requests: list[CoreRequest]

    def wire_fields(self) -> list:
        return [self.slot, self.ticket, [r.wire() for r in self.requests]]

    @classmethod
    def from_wire(cls, values: list):
        slot, ticket, requests = values
        return cls(slot, ticket, [CoreRequest.from_wire(r) for r in requests])


# -- results, engine core -> decoder workers -> parent

@dataclass(slots=True)
class FinishedSeq:
    """One finished sequence as the core sends it: generated ids (int32 bytes) and what decoding needs."""

    index: int
    tokens: bytes
    finish_reason: str
    num_prompt_tokens: int
    stop: list[str]
    activations: dict | None = None  # engine.pipeline.activation_messages describes it
    # per steering term, the layers it steered, when a term left them to its vector file; else None
    steering_layers: list[list[int]] | None = None
    logprobs: list[float] | None = None  # per generated token, when the request asked (CoreRequest.logprobs)
    top_logprobs: list | None = None  # per generated token, [[id, log-probability], ...]
    prompt: dict | None = None  # with prompt_logprobs: {"ids", "logprobs" (tokens 1..), "top_logprobs"?}


@message(Kind.FINISHED)
@dataclass(slots=True)
class Finished(Message):
    seqs: list[FinishedSeq]

    def wire_fields(self) -> list:
        return [[[getattr(s, f) for f in _FINISHED_FIELDS] for s in self.seqs]]

    @classmethod
    def from_wire(cls, values: list):
        return cls([FinishedSeq(*s) for s in values[0]])


_FINISHED_FIELDS = tuple(f.name for f in dataclasses.fields(FinishedSeq))


@message(Kind.RESULT)
@dataclass(slots=True)
class Result(Message):
    """One request's completion, decoded and cut at its stop strings."""

    index: int
    completion: str
    finish_reason: str
    num_prompt_tokens: int
    num_completion_tokens: int
    completion_token_ids: list[int] | None = None  # with return_tokens
    activations: dict | None = None
    steering_layers: list[list[int]] | None = None  # FinishedSeq.steering_layers
    logprobs: list[float] | None = None  # FinishedSeq.logprobs, cut where the text was
    top_logprobs: list | None = None
    prompt: dict | None = None  # FinishedSeq.prompt


@message(Kind.PROGRESS)
@dataclass(slots=True)
class Progress(Message):
    """Streaming requests' tokens sampled since the core last sent theirs: [index, start, int32 bytes, logprobs,
    top] each, `start` the first one's place among the request's generated tokens, `logprobs` their
    log-probabilities and `top` their [[id, log-probability], ...] alternatives, each None unless the request asked
    (with several decoder workers two Progress messages may pass each other, and the last may come after the
    Result, which holds every token, log-probability and the final text)."""

    chunks: list[list]


@message(Kind.CANCEL)
@dataclass(slots=True)
class Cancel(Message):
    """Parent -> engine cores: end these requests now (their client went away); each core ends those it has, and
    refuses those that reach it later, with RecordFailed (CANCELLED)."""

    indices: list[int]


CANCELLED = "cancelled: its client went away"


@message(Kind.RECORD_FAILED)
@dataclass(slots=True)
class RecordFailed(Message):
    """One request cannot run (a stage refused it); the others go on."""

    index: int
    error: str


# -- control

@message(Kind.READY)
@dataclass(slots=True)
class Ready(Message):
    """An engine core has loaded, compiled and captured, and takes requests."""

    core: int
    startup_s: float
    device: str  # the card's name, or "cpu"
    phases: dict  # start-up phase -> seconds
    dtype: str
    pinned: bool


@message(Kind.STATS)
@dataclass(slots=True)
class Stats(Message):
    """An engine core's cumulative counters (router.merged_stats says what each means); `reply_to` answers a
    StatsQuery, None for the core's own report every second."""

    core: int
    steps: int = 0
    idle_s: float = 0.0
    busy_starts: list[float] = dataclasses.field(default_factory=list)
    idle_since: float | None = None
    graphs: dict | None = None
    torch_allocated_peak: int | None = None
    torch_reserved_peak: int | None = None
    reply_to: int | None = None


@message(Kind.STATS_QUERY)
@dataclass(slots=True)
class StatsQuery(Message):
    id: int


@message(Kind.FATAL)
@dataclass(slots=True)
class Fatal(Message):
    """A stage failed as a whole; the run ends with this."""

    stage: str
    error: str
    traceback: str = ""


@dataclass(slots=True)
class Outcome:
    """One input item's end: its position in the input and its output record (a result or an error)."""

    position: int
    record: dict
    is_error: bool
    activations: dict | None = None  # the captured activations as the core sent them (storage.activations.tensors_of)
