"""The typed protocol: every kind has one type, and each type crosses the wire unchanged."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp

import msgpack
import pytest

from engine.messages import (TYPES, Cancel, CoreRequest, Fatal, Feed, Finished, FinishedSeq, Kind, Message,
                             Progress, Ready, RecordFailed, Result, SlotFilled, Stats, StatsQuery, Stop,
                             TokenizeRequest, decode, encode, message)
from engine.procs import MsgQueue
from engine.specs import parse_capture, parse_steering

STEERING = parse_steering([{"vector": "v.pt", "layers": [3], "coef": 2.0, "positions": {"prompt": [-1, None]}}])
CORE = CoreRequest(7, 16, 0.7, 0.9, 40, 2**63 - 1, False, ["\n\n"], STEERING,
                   parse_capture({"layers": [1, 2], "positions": "generated"}, None), adapter=2)
ACTIVATIONS = {"positions": "generated", "dtype": "float32", "is_before_steering": False,
               "layers": {3: [[2, 4], b"\x00" * 32]}}
EXAMPLES = [
    Stop(),
    Feed([TokenizeRequest("hi", None, CORE), TokenizeRequest(None, [{"role": "user", "content": "x"}], CORE)]),
    SlotFilled(3, 41, [CORE, dataclasses.replace(CORE, index=8, steering=None, capture=None, stream=True)]),
    Progress([[7, 0, b"\x01\x00\x00\x00", None, None], [8, 3, b"\x02\x00\x00\x00", [-0.5], [[[2, -0.5]]]]]),
    Cancel([7, 9]),
    Finished([FinishedSeq(7, b"\x01\x00\x00\x00", "length", 12, [], ACTIVATIONS, [[1, 3], [0]]),
              FinishedSeq(8, b"", "stop", 3, ["x"])]),
    Result(7, "text", "stop", 12, 1, [5], ACTIVATIONS, [[1, 3], [0]]),
    Result(8, "", "length", 3, 0),
    RecordFailed(9, "field 'seed' is -1"),
    Ready(0, 12.5, "NVIDIA H200", {"load_s": 1.0}, "bfloat16", True),
    Stats(1, 10, 0.5, [1.0, 2.0], 3.0, {"captures": 2, "recaptures": 0, "capture_s": 0.1}, 10, 20, 4),
    Stats(0),
    StatsQuery(4),
    Fatal("engine core", "RuntimeError: CUDA error", "Traceback ..."),
]


def test_every_kind_has_one_type_and_an_example():
    assert {kind: TYPES[kind] for kind in Kind} == {type(m).KIND: type(m) for m in EXAMPLES}


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_a_message_decodes_to_what_was_encoded(msg):
    assert decode(encode(msg)) == msg


def test_messages_cross_a_process_queue_typed():
    queue = MsgQueue(mp.get_context("spawn"))
    try:
        for msg in EXAMPLES:
            queue.put(msg)
        assert [queue.get(timeout=5) for _ in EXAMPLES] == EXAMPLES
    finally:
        queue.close()


def test_an_unknown_kind_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown kind 99"):
        decode(msgpack.packb([99, 1]))


def test_a_kind_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="kind 4 is taken by Result"):
        @message(Kind.RESULT)
        @dataclasses.dataclass(slots=True)
        class Another(Message):
            x: int
