"""ShmRing: K slots of token ids in one shared-memory block, filled by tokenizer workers, read by the core.

Slot life: FREE -> FILLING (a producer claimed it) -> READY (data complete, message sent) -> IN_USE (the
core is reading it) -> FREE. A counting semaphore holds the number of FREE slots, so a full ring blocks
producers; a lock makes claiming a slot atomic. Each slot records its producer's pid, so slots held by a
producer that died mid-fill can be reclaimed. Claiming a slot stamps it with a ticket, the ring's running count
of claims, so a slot message names one fill of a slot and a stale message is recognised.
"""

from __future__ import annotations

import logging
import os
from multiprocessing import shared_memory

import numpy as np

from engine.procs import is_pid_alive

log = logging.getLogger("engine")

FREE, FILLING, READY, IN_USE = 0, 1, 2, 3
MAGIC = 0x52494E47  # "RING"
_HEADER = 8  # int64: magic, num_slots, slot_tokens, max_requests, next_ticket
_SLOT_FIELDS = 4  # int64 per slot: state, owner pid, ticket, num_requests


class RingError(RuntimeError):
    """The ring was used against its protocol (a stale slot, a batch that cannot fit)."""


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


class ShmRing:
    """Shared token-id slots; create in the parent, pass to spawned processes as an argument."""

    def __init__(self, ctx, num_slots: int, slot_tokens: int, max_requests: int):
        self.num_slots, self.slot_tokens, self.max_requests = num_slots, slot_tokens, max_requests
        self._lock = ctx.Lock()
        self._free = ctx.Semaphore(num_slots)
        self._owner = True
        self._shm = shared_memory.SharedMemory(create=True, size=self._size())
        self._map()
        self.header[:] = [MAGIC, num_slots, slot_tokens, max_requests, 0, 0, 0, 0]
        self.slots[:] = 0
        self._pinned = False

    def _size(self) -> int:
        s, r, t = self.num_slots, self.max_requests, self.slot_tokens
        return _align(_HEADER * 8) + _align(s * _SLOT_FIELDS * 8) + _align(s * r * 3 * 8) + s * t * 4

    def _map(self) -> None:
        buf, s, r, t = self._shm.buf, self.num_slots, self.max_requests, self.slot_tokens
        off = 0
        self.header = np.ndarray((_HEADER,), np.int64, buf, off)
        off += _align(_HEADER * 8)
        self.slots = np.ndarray((s, _SLOT_FIELDS), np.int64, buf, off)
        off += _align(s * _SLOT_FIELDS * 8)
        self.meta = np.ndarray((s, r, 3), np.int64, buf, off)  # request index, token offset, token count
        off += _align(s * r * 3 * 8)
        self.tokens = np.ndarray((s, t), np.int32, buf, off)

    def __getstate__(self):
        return (self._lock, self._free, self._shm.name, self.num_slots, self.slot_tokens, self.max_requests)

    def __setstate__(self, state):
        self._lock, self._free, name, self.num_slots, self.slot_tokens, self.max_requests = state
        self._owner, self._pinned = False, False
        self._shm = _attach(name)
        self._map()
        if self.header[0] != MAGIC:
            raise RingError(f"shared memory {name} is not a ring")

    # producer side
    def acquire(self, timeout: float | None = None) -> int | None:
        """Claim a FREE slot for filling; None if none freed within `timeout` seconds."""
        if not self._free.acquire(timeout=timeout):
            return None
        with self._lock:
            free = np.flatnonzero(self.slots[:, 0] == FREE)
            if len(free) == 0:
                raise RingError("ring semaphore and slot states disagree: no FREE slot after acquire")
            slot = int(free[0])
            ticket = int(self.header[4])
            self.header[4] = ticket + 1
            self.slots[slot] = [FILLING, os.getpid(), ticket, 0]
        return slot

    def fits(self, lengths: list[int]) -> bool:
        return len(lengths) <= self.max_requests and sum(lengths) <= self.slot_tokens

    def write(self, slot: int, entries: list[tuple[int, np.ndarray]]) -> int:
        """Fill a claimed slot with (request index, token ids) pairs; mark it READY; return its ticket."""
        if self.slots[slot, 0] != FILLING or self.slots[slot, 1] != os.getpid():
            raise RingError(f"slot {slot} is not being filled by this process")
        if not self.fits([len(tokens) for _, tokens in entries]):
            raise RingError(f"{len(entries)} requests do not fit one slot ({self.max_requests} requests, "
                            f"{self.slot_tokens} tokens)")
        offset = 0
        for i, (index, tokens) in enumerate(entries):
            self.tokens[slot, offset:offset + len(tokens)] = tokens
            self.meta[slot, i] = [index, offset, len(tokens)]
            offset += len(tokens)
        self.slots[slot, 3] = len(entries)
        self.slots[slot, 0] = READY
        return int(self.slots[slot, 2])

    # consumer side
    def read(self, slot: int, ticket: int) -> list[tuple[int, np.ndarray]]:
        """Zero-copy views of a READY slot's requests; the slot stays IN_USE until release()."""
        state, _, slot_ticket, count = (int(x) for x in self.slots[slot])
        if state != READY or slot_ticket != ticket:
            raise RingError(f"slot {slot} is in state {state} with ticket {slot_ticket}, "
                            f"expected READY with ticket {ticket}")
        self.slots[slot, 0] = IN_USE
        return [(int(index), self.tokens[slot, off:off + n]) for index, off, n in self.meta[slot, :count]]

    def release(self, slot: int) -> None:
        # Without the lock, so an engine core killed here leaves no lock held for the others. One aligned store of
        # the state is all it takes: a producer claiming the slot rewrites every other field under the lock.
        self.slots[slot, 0] = FREE
        self._free.release()

    def reclaim_dead(self) -> list[int]:
        """Free slots left FILLING by producers that no longer exist; return their indices."""
        reclaimed = []
        with self._lock:
            for slot in np.flatnonzero(self.slots[:, 0] == FILLING):
                if not is_pid_alive(int(self.slots[slot, 1])):
                    self.slots[slot] = [FREE, 0, -1, 0]
                    reclaimed.append(int(slot))
        for _ in reclaimed:
            self._free.release()
        return reclaimed

    # what the parent's router may ask
    def state(self, slot: int) -> int:
        return int(self.slots[slot, 0])

    def ticket(self, slot: int) -> int:
        """The ticket the slot carries now (its last claim's)."""
        return int(self.slots[slot, 2])

    def is_held(self, slot: int, ticket: int) -> bool:
        """The slot is READY or IN_USE and still carries `ticket`: that fill has not been given back yet."""
        state, _, slot_ticket, _ = (int(x) for x in self.slots[slot])
        return slot_ticket == ticket and state in (READY, IN_USE)

    def num_free(self) -> int:
        return int(np.count_nonzero(self.slots[:, 0] == FREE))

    def pin(self) -> bool:
        """Page-lock the block for async H2D copies (cudaHostRegister); False if CUDA refused."""
        import torch

        if not torch.cuda.is_available():
            return False
        ptr, size = self.header.ctypes.data, self._shm.size
        err = torch.cuda.cudart().cudaHostRegister(ptr, size, 0)
        self._pinned = int(err) == 0
        if not self._pinned:
            log.warning("cudaHostRegister of the ring failed (%s); copies stay correct but synchronous", err)
        return self._pinned

    def close(self) -> None:
        if self._pinned:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.header.ctypes.data)
            self._pinned = False
        self.header = self.slots = self.meta = self.tokens = None
        self._shm.close()
        if self._owner:
            self._shm.unlink()


def _attach(name: str) -> shared_memory.SharedMemory:
    # Attaching processes must not unlink the block at exit; only the creator owns it (track= is 3.13+).
    try:
        return shared_memory.SharedMemory(name=name, track=False)
    except TypeError:
        return shared_memory.SharedMemory(name=name)

