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
from engine.pipeline.ring import ShmRing


@dataclass(slots=True)
class CoreHandle:
    """A core handle: one engine-core process as the parent knows it."""

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
    slot_tickets: dict[int, int] = field(default_factory=dict)  # ticket -> ring slot, for slots this core may hold
    stats: Stats | None = None  # the core's last cumulative counters (steps, idle_s)
    num_requests: int = 0
    num_tokens: int = 0

    def counts(self) -> dict:
        return {"device": self.device, "label": self.label, "name": self.name, "is_alive": self.is_alive,
                "steps": self.stats.steps if self.stats else 0, "idle_s": self.stats.idle_s if self.stats else 0.0,
                "num_requests": self.num_requests, "num_tokens": self.num_tokens}


def merged_stats(cores: list[CoreHandle]) -> dict:
    """The cores' last cumulative counters: steps (all cores), idle_s (per core, averaged over cores),
    busy_starts (monotonic times at which a core went from idle to work, recent ones, all cores, sorted) and
    idle_since (when the last core to run out of work did so; None before any finished), graphs (decode graphs
    captured, re-captured and the seconds spent, all cores: ModelRunner.graph_stats); on CUDA also the
    largest core's torch_allocated_peak / torch_reserved_peak (bytes, since its start; None on CPU)."""
    stats = [core.stats for core in cores if core.stats is not None]
    ends = [s.idle_since for s in stats if s.idle_since is not None]
    peaks = {key: max((getattr(s, key) for s in stats if getattr(s, key) is not None), default=None)
             for key in ("torch_allocated_peak", "torch_reserved_peak")}
    graphs = [s.graphs for s in stats if s.graphs is not None]
    return {"steps": sum(s.steps for s in stats),
            "graphs": {k: sum(g[k] for g in graphs) for k in ("captures", "recaptures", "capture_s")},
            "idle_s": sum(s.idle_s for s in stats) / max(len(stats), 1),
            "busy_starts": sorted(t for s in stats for t in s.busy_starts),
            "idle_since": max(ends, default=None), **peaks}


def throughput_stats(cores: list[CoreHandle], generate_s: float) -> dict:
    """merged_stats, with per device (`devices`) its counts and tok/s over `generate_s`, and the totals."""
    devices = [core.counts() for core in cores]
    seconds = max(generate_s, 1e-9)
    for entry in devices:
        entry["tok_s"] = entry["num_tokens"] / seconds
    num_tokens = sum(entry["num_tokens"] for entry in devices)
    return {**merged_stats(cores), "num_tokens": num_tokens, "tok_s": num_tokens / seconds,
            "generate_s": generate_s, "devices": devices}


def core_handles(ctx, devices: list[str]) -> list[CoreHandle]:
    """One handle per device, each with its inbox, fatal channel and decoder queue."""
    return [CoreHandle(i, device, label, "engine core" if len(devices) == 1 else f"engine core {i}",
                       MsgQueue(ctx), MsgQueue(ctx), MsgQueue(ctx))
            for i, (device, label) in enumerate(zip(devices, core_labels(devices)))]


def core_labels(devices: list[str]) -> list[str]:
    """Progress labels: the device itself, unless a device repeats (cpu,cpu), then device#core."""
    if len(set(devices)) == len(devices):
        return list(devices)
    return [f"{device}#{i}" for i, device in enumerate(devices)]


class Router(threading.Thread):
    """Forwards slot messages from the tokenizer workers to the least-loaded live core (a parent thread)."""

    def __init__(self, cores: list[CoreHandle], inbox: MsgQueue, ring: ShmRing):
        super().__init__(name="router", daemon=True)
        self.cores, self.inbox, self.ring = cores, inbox, ring
        self.lock = threading.Lock()  # one assignment or one failure at a time, so none is lost between them
        self.owner: dict[int, CoreHandle] = {}
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
            live = [core for core in self.cores if core.is_alive]
            if not live:
                return  # the engine is stopping with an error: every core has died
            core = min(live, key=lambda core: len(core.unfinished))
            self._forget_released(core)
            core.slot_tickets[msg.ticket] = msg.slot
            for request in msg.requests:
                core.unfinished.add(request.index)
                self.owner[request.index] = core
            core.inbox.put(msg)

    def _forget_released(self, core: CoreHandle) -> None:
        """Drop slots the core has given back (freed, or refilled under a later ticket), so slot_tickets stays as
        small as the ring."""
        core.slot_tickets = {ticket: slot for ticket, slot in core.slot_tickets.items()
                             if self.ring.is_held(slot, ticket)}

    def finished(self, index: int) -> CoreHandle | None:
        """The core that ran request `index` (None for one that never reached a core)."""
        with self.lock:
            core = self.owner.pop(index, None)
            if core is not None:
                core.unfinished.discard(index)
            return core

    def fail(self, core: CoreHandle) -> list[int]:
        """Mark a core dead; free the ring slots it held; return its unfinished request indices."""
        with self.lock:
            core.is_alive = False
            indices = sorted(core.unfinished)
            core.unfinished = set()
            for index in indices:
                self.owner.pop(index, None)
            for ticket, slot in core.slot_tickets.items():
                if self.ring.is_held(slot, ticket):
                    self.ring.release(slot)
            core.slot_tickets = {}
            return indices

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._closing.set()
        if self.is_alive():
            self.join(timeout=2)
