"""Router: with several engine cores (one per device), the parent's assignment of ring slots to cores.

Tokenizer workers fill ring slots as with one core, but send the slot messages to the router instead of a core.
The router hands each slot to the live core with the fewest unfinished requests, and remembers which requests
and which slots each core holds. When a core dies, `fail` frees the ring slots it held and returns its
unfinished requests, for the engine to run again on the cores that are left.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

from engine.messages import SlotFilled, Stats
from engine.procs import MsgQueue
from engine.pipeline.ring import IN_USE, READY, ShmRing


@dataclass(slots=True)
class CoreLane:
    """One engine-core process and what the parent knows of it."""

    number: int
    device: str
    label: str  # how progress names it: the device, or device#number when devices repeat (cpu,cpu)
    stage: str  # the process's stage name in errors
    inbox: MsgQueue
    fatal: MsgQueue  # the core's own fatal channel, so its cause is found without draining the results
    dec_q: MsgQueue  # everything the core sends, to its own decoder workers
    proc: object = None
    decoders: list = field(default_factory=list)
    name: str = ""  # the card, from the core's ready message
    is_alive: bool = True
    unfinished: set[int] = field(default_factory=set)  # request indices given to this core, not yet finished
    slot_seqs: dict[int, int] = field(default_factory=dict)  # ring seq -> slot, for slots this core may hold
    stats: Stats | None = None  # the core's last cumulative counters (steps, idle_s)
    num_requests: int = 0
    num_tokens: int = 0

    def counts(self) -> dict:
        return {"device": self.device, "label": self.label, "name": self.name, "is_alive": self.is_alive,
                "steps": self.stats.steps if self.stats else 0, "idle_s": self.stats.idle_s if self.stats else 0.0,
                "num_requests": self.num_requests, "num_tokens": self.num_tokens}


def lane_labels(devices: list[str]) -> list[str]:
    """Progress labels: the device itself, unless a device repeats (cpu,cpu), then device#core."""
    if len(set(devices)) == len(devices):
        return list(devices)
    return [f"{device}#{i}" for i, device in enumerate(devices)]


class Router(threading.Thread):
    """Forwards slot messages from the tokenizer workers to the least-loaded live core (a parent thread)."""

    def __init__(self, lanes: list[CoreLane], inbox: MsgQueue, ring: ShmRing):
        super().__init__(name="router", daemon=True)
        self.lanes, self.inbox, self.ring = lanes, inbox, ring
        self.lock = threading.Lock()  # one assignment or one failure at a time, so none is lost between them
        self.owner: dict[int, CoreLane] = {}
        self.error: BaseException | None = None
        self._closing = threading.Event()

    def run(self) -> None:
        try:
            while not self._closing.is_set():
                try:
                    msg = self.inbox.get(timeout=0.2)
                except queue.Empty:
                    continue
                self.route(msg)
        except BaseException as exc:  # noqa: BLE001 - raised in the engine's thread by check()
            self.error = exc

    def route(self, msg: SlotFilled) -> None:
        with self.lock:
            live = [lane for lane in self.lanes if lane.is_alive]
            if not live:
                return  # the engine is stopping with an error: every core has died
            lane = min(live, key=lambda lane: len(lane.unfinished))
            self._forget_released(lane)
            lane.slot_seqs[msg.ticket] = msg.slot
            for request in msg.requests:
                lane.unfinished.add(request.index)
                self.owner[request.index] = lane
            lane.inbox.put(msg)

    def _forget_released(self, lane: CoreLane) -> None:
        """Drop slots the core has given back (their seq moved on), so slot_seqs stays as small as the ring."""
        slots = self.ring.slots
        held = {int(slots[slot, 2]) for slot in set(lane.slot_seqs.values()) if slots[slot, 0] in (READY, IN_USE)}
        lane.slot_seqs = {seq: slot for seq, slot in lane.slot_seqs.items() if seq in held}

    def finished(self, index: int) -> CoreLane | None:
        """The core that ran request `index` (None for one that never reached a core)."""
        with self.lock:
            lane = self.owner.pop(index, None)
            if lane is not None:
                lane.unfinished.discard(index)
            return lane

    def fail(self, lane: CoreLane) -> list[int]:
        """Mark a core dead; free the ring slots it held; return its unfinished request indices."""
        with self.lock:
            lane.is_alive = False
            indices = sorted(lane.unfinished)
            lane.unfinished = set()
            for index in indices:
                self.owner.pop(index, None)
            for seq, slot in lane.slot_seqs.items():
                state, _, slot_seq, _ = (int(x) for x in self.ring.slots[slot])
                if slot_seq == seq and state in (READY, IN_USE):
                    self.ring.release(slot)
            lane.slot_seqs = {}
            return indices

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._closing.set()
        if self.is_alive():
            self.join(timeout=2)
