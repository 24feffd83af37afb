"""ShmRing: slot reuse, wrap-around, a full ring blocking producers, a crashed producer, real processes."""

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
    assert ring.slots[slot, 0] == FILLING
    seq = ring.write(slot, [(10, np.arange(5)), (11, np.arange(100, 103))])
    assert ring.slots[slot, 0] == READY
    views = ring.read(slot, seq)
    assert ring.slots[slot, 0] == IN_USE
    assert [(i, v.tolist()) for i, v in views] == [(10, [0, 1, 2, 3, 4]), (11, [100, 101, 102])]
    assert np.shares_memory(views[0][1], ring.tokens)
    ring.release(slot)
    assert ring.slots[slot, 0] == FREE and ring.num_free() == 3


def test_wrap_around_reuses_slots_with_rising_seq(ring):
    seen_slots, seqs = set(), []
    for n in range(10):
        slot = ring.acquire(timeout=1)
        seq = ring.write(slot, [(n, np.full(3, n))])
        assert [v.tolist() for _, v in ring.read(slot, seq)] == [[n, n, n]]
        ring.release(slot)
        seen_slots.add(slot)
        seqs.append(seq)
    assert seqs == list(range(10)) and seen_slots <= {0, 1, 2}


def test_full_ring_blocks_producers_until_release(ring):
    held = [ring.acquire(timeout=1) for _ in range(3)]
    started = time.monotonic()
    assert ring.acquire(timeout=0.3) is None
    assert time.monotonic() - started >= 0.25
    ring.write(held[0], [(0, np.arange(2))])
    ring.read(held[0], int(ring.slots[held[0], 2]))
    ring.release(held[0])
    assert ring.acquire(timeout=1) == held[0]


def test_stale_or_oversized_use_is_refused(ring):
    slot = ring.acquire(timeout=1)
    with pytest.raises(RingError, match="do not fit"):
        ring.write(slot, [(0, np.arange(65))])
    seq = ring.write(slot, [(0, np.arange(4))])
    with pytest.raises(RingError, match="expected READY with seq"):
        ring.read(slot, seq + 1)
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
    ready = np.flatnonzero(ring.slots[:, 0] == READY)
    got = sorted(v.tolist() for s in ready for _, v in ring.read(int(s), int(ring.slots[s, 2])))
    assert got == [[n] * 8 for n in range(3)]


def test_crashed_producer_slot_is_reclaimed(ring):
    proc = CTX.Process(target=_produce, args=(ring, 0, 1, True))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 3
    assert ring.num_free() == 2 and int(np.count_nonzero(ring.slots[:, 0] == FILLING)) == 1
    assert len(ring.reclaim_dead()) == 1
    assert ring.num_free() == 3
    assert None not in [ring.acquire(timeout=1) for _ in range(3)]  # all three slots usable again
