"""ShmRing: slot reuse and rising tickets, a full ring blocking producers, a crashed producer, real processes."""

import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from engine.pipeline.ring import FILLING, FREE, IN_USE, READY, RingError, ShmRing

CTX = mp.get_context("spawn")


@pytest.fixture
def ring():
    r = ShmRing(CTX, num_slots=3, slot_tokens=64, max_requests=4)
    yield r
    r.close()


def test_slot_cycle_and_zero_copy_views(ring):
    slot = ring.acquire(timeout=1)
    assert ring.state(slot) == FILLING
    ticket = ring.write(slot, [(10, np.arange(5)), (11, np.arange(100, 103))])
    assert ring.state(slot) == READY and ring.ticket(slot) == ticket and ring.is_held(slot, ticket)
    views = ring.read(slot, ticket)
    assert ring.state(slot) == IN_USE and ring.is_held(slot, ticket) and not ring.is_held(slot, ticket + 1)
    assert [(i, v.tolist()) for i, v in views] == [(10, [0, 1, 2, 3, 4]), (11, [100, 101, 102])]
    assert np.shares_memory(views[0][1], ring.tokens)
    ring.release(slot)
    assert ring.state(slot) == FREE and ring.num_free() == 3 and not ring.is_held(slot, ticket)


def test_wrap_around_reuses_slots_with_rising_tickets(ring):
    seen_slots, tickets = set(), []
    for n in range(10):
        slot = ring.acquire(timeout=1)
        ticket = ring.write(slot, [(n, np.full(3, n))])
        assert [v.tolist() for _, v in ring.read(slot, ticket)] == [[n, n, n]]
        ring.release(slot)
        seen_slots.add(slot)
        tickets.append(ticket)
    assert tickets == list(range(10)) and seen_slots <= {0, 1, 2}


def test_full_ring_blocks_producers_until_release(ring):
    held = [ring.acquire(timeout=1) for _ in range(3)]
    started = time.monotonic()
    assert ring.acquire(timeout=0.3) is None
    assert time.monotonic() - started >= 0.25
    ring.write(held[0], [(0, np.arange(2))])
    ring.read(held[0], ring.ticket(held[0]))
    ring.release(held[0])
    assert ring.acquire(timeout=1) == held[0]


def test_stale_or_oversized_use_is_refused(ring):
    slot = ring.acquire(timeout=1)
    with pytest.raises(RingError, match="do not fit"):
        ring.write(slot, [(0, np.arange(65))])
    ticket = ring.write(slot, [(0, np.arange(4))])
    with pytest.raises(RingError, match="expected READY with ticket"):
        ring.read(slot, ticket + 1)
    assert not ring.fits([1] * 5) and ring.fits([16] * 4)


def _produce(ring, start, count, crash_after_acquire):
    for n in range(start, start + count):
        slot = ring.acquire(timeout=5)
        if crash_after_acquire:
            os._exit(3)
        ring.write(slot, [(n, np.full(8, n, dtype=np.int32))])


def test_producer_process_data_arrives_intact(ring):
    proc = CTX.Process(target=_produce, args=(ring, 0, 3, False))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    ready = [s for s in range(ring.num_slots) if ring.state(s) == READY]
    got = sorted(v.tolist() for s in ready for _, v in ring.read(s, ring.ticket(s)))
    assert got == [[n] * 8 for n in range(3)]


def test_crashed_producer_slot_is_reclaimed(ring):
    proc = CTX.Process(target=_produce, args=(ring, 0, 1, True))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 3
    assert ring.num_free() == 2 and [ring.state(s) for s in range(3)].count(FILLING) == 1
    assert len(ring.reclaim_dead()) == 1
    assert ring.num_free() == 3
    assert None not in [ring.acquire(timeout=1) for _ in range(3)]  # all three slots usable again
