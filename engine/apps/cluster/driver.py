"""The driver of a cluster job: ClusterJob hands the parts to Ray actors, gives the part of a dead actor to a new one,
gathers progress and merges the parts when all are complete; JobSpec and ClusterOptions say what it runs and how.

Each part has exactly one writer at a time (JsonlWriter, with its durability and resume rules); a restarted job
skips the ids in a part's results and in the merged results.jsonl. Ray is imported only when used.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from engine.apps.cluster.actor import EngineActor
from engine.apps.cluster.merge import count_done, is_complete, merge
from engine.apps.cluster.parts import RESULTS, STATUS_FILE, ClusterError, Part, require_ray
from engine.apps.cluster.prepare import JobSetup
from engine.apps.sweep.plan import Plan
from engine.config import EngineConfig
from engine.engine import EngineError
from engine.pipeline.writer import scan_done_ids
from engine.procs import stop_signals
from engine.storage.files import write_atomic


@dataclass(slots=True)
class JobSpec:
    """What a job runs: a batch over an input file (config, manifest) or a sweep (its plan)."""

    output: Path
    config: EngineConfig | None = None
    input: Path | None = None
    plan: Plan | None = None
    extend: bool = False
    force: bool = False

    @property
    def kind(self) -> str:
        return "batch" if self.plan is None else "sweep"

    @property
    def device(self) -> str:
        if self.plan is None:
            return self.config.device
        return self.plan.config.engine.get("device", "auto")

    def labels(self) -> list[str | None]:
        return [None] if self.plan is None else [m.label for m in self.plan.config.models]


@dataclass(slots=True)
class ClusterOptions:
    """How the job spreads over the cluster."""

    num_actors: int | None = None  # default: every GPU of the cluster (CPU: cluster CPUs // cpus_per_actor)
    num_parts: int | None = None  # default: the number the output was started with, else num_actors
    cpus_per_actor: float = 1.0
    max_retries: int = 3  # per part: a dead actor or engine, then the job stops
    progress_seconds: float = 10.0
    is_quiet: bool = False

    def __post_init__(self) -> None:
        if self.num_actors is not None and self.num_actors < 1:
            raise ClusterError(f"--num-actors {self.num_actors}: must be at least 1")
        if self.num_parts is not None and self.num_parts < 1:
            raise ClusterError(f"--num-parts {self.num_parts}: must be at least 1")
        if self.cpus_per_actor <= 0:
            raise ClusterError(f"--cpus-per-actor {self.cpus_per_actor}: must be above 0")
        if self.max_retries < 0:
            raise ClusterError(f"--max-retries {self.max_retries}: must be 0 or more")
        if self.progress_seconds <= 0:
            raise ClusterError(f"--progress-seconds {self.progress_seconds}: must be above 0")


@dataclass(slots=True)
class _Slot:
    """An actor the driver holds, and what it reported last."""

    number: int
    handle: object
    label: str | None = None  # the model its engine holds (a sweep)
    progress: dict = field(default_factory=dict)


class ActorPool:
    """The actors the driver holds, one slot each: started with the job's resources, handed parts (`running`: the
    part each one runs), told to stop, ended."""

    def __init__(self, ray, cpus_per_actor: float):
        self.ray = ray
        self.actor_class = ray.remote(EngineActor)
        self.cpus_per_actor = cpus_per_actor
        self.job: dict = {}
        self.use_gpu = False
        self.slots: list[_Slot] = []
        self.running: dict = {}  # ObjectRef -> (slot, part)
        self._next_slot = 0

    def start(self, job: dict, use_gpu: bool, count: int) -> None:
        """Start `count` actors, each given `job`: one GPU each, or cpus_per_actor CPUs."""
        self.job, self.use_gpu = job, use_gpu
        self.slots = [self.new_slot() for _ in range(count)]

    def new_slot(self) -> _Slot:
        options = {"num_gpus": 1} if self.use_gpu else {"num_cpus": self.cpus_per_actor}
        env = {k: os.environ[k] for k in ("ENGINE_CACHE_DIR", "HF_HOME") if k in os.environ}
        if env:
            options["runtime_env"] = {"env_vars": env}
        actor = self.actor_class.options(max_concurrency=2, max_restarts=0, **options).remote(self.job)
        self._next_slot += 1
        return _Slot(self._next_slot - 1, actor)

    def assign(self, pending: deque[Part]) -> None:
        """Hand each idle actor the next part of `pending`."""
        busy = {id(slot) for slot, _ in self.running.values()}
        for slot in self.slots:
            if not pending:
                return
            if id(slot) in busy:
                continue
            part = self._take(slot, pending)
            self.running[slot.handle.run_part.remote(part.index, part.label)] = (slot, part)

    @staticmethod
    def _take(slot: _Slot, pending: deque[Part]) -> Part:
        """The next part, preferring the model the actor's engine already holds."""
        for part in pending:
            if part.label == slot.label:
                pending.remove(part)
                return part
        return pending.popleft()

    def stop(self) -> None:
        """Tell every actor to stop admitting; its running part flushes what is finished and returns."""
        for slot in self.slots:
            slot.handle.stop.remote()

    def end(self, timeout: float = 30.0) -> None:
        """Close the engines (their processes end cleanly), then end the actors."""
        refs = [slot.handle.close.remote() for slot in self.slots]
        self.ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for slot in self.slots:
            self.ray.kill(slot.handle, no_restart=True)  # an engine left running follows its actor (Lifeline)
            slot.progress["state"] = "ended"


class JobStatus:
    """A job's progress: asked of its actors, written to status.json, printed as a line."""

    def __init__(self, job: ClusterJob):
        self.cluster = job
        self.started = time.monotonic()

    def poll(self, timeout: float = 5.0) -> list[dict]:
        """Ask every actor for its progress; an actor that does not answer in time keeps its last report."""
        ray = self.cluster.ray
        refs = {slot.handle.progress.remote(): slot for slot in self.cluster.slots}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        for ref in ready:
            try:
                refs[ref].progress.update(ray.get(ref))
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
                continue  # a dead actor: its run_part reports it
        self.write("running")
        return [dict(slot.progress) for slot in self.cluster.slots]

    def snapshot(self, state: str) -> dict:
        job = self.cluster
        actors = []
        for slot in job.slots:
            p = slot.progress
            rate = p["tokens"] / p["gen_s"] if p.get("gen_s") else 0.0
            actors.append({"actor": slot.number, **p, "tok_per_s": round(rate, 1)})
        elapsed = time.monotonic() - self.started
        running = [slot.progress for slot, _ in job.actors.running.values()]
        records = job.num_results + job.num_errors + sum(p.get("part_done", 0) for p in running)
        tokens = job.num_tokens + sum(p.get("part_tokens", 0) for p in running)
        return {"state": state, "kind": job.spec.kind,
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "parts": len(job.parts), "parts_left": len(job.pending) + len(job.actors.running),
                "done_before": job.num_done_before, "records": records,
                "errors": job.num_errors, "tok_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
                "restarts": job.num_restarts, "failure": job.failure, "stop_reason": job.stop_reason,
                "actors": actors}

    def write(self, state: str) -> None:
        write_atomic(self.cluster.out / STATUS_FILE, (json.dumps(self.snapshot(state), indent=2) + "\n").encode())

    def report(self) -> None:
        s = self.snapshot("running")
        actors = " | ".join(f"a{a['actor']} {a.get('node', '?')} {a.get('part') or '-'} {a.get('state', 'starting')} "
                            f"{a['tok_per_s']:,.0f} tok/s" for a in s["actors"])
        self.say(f"{s['done_before'] + s['records']} records ({s['records']} this run), {s['errors']} errors, "
                 f"{s['parts'] - s['parts_left']}/{s['parts']} parts, {s['tok_per_s'] or 0:,.0f} tok/s; {actors}")

    def say(self, message: str) -> None:
        if not self.cluster.options.is_quiet:
            print(f"engine-ray: {message}", file=sys.stderr, flush=True)


class ClusterJob:
    """The driver: checks the output directory, starts the actors, hands out parts, retries the part of a dead
    actor on a new one, writes status.json and a progress line, and merges the parts at the end. Needs a connected
    Ray (ray.init) before `run`. The set-up is JobSetup's, the actors ActorPool's, the progress JobStatus's."""

    def __init__(self, spec: JobSpec, options: ClusterOptions):
        self.spec, self.options = spec, options
        self.out = spec.output
        self.ray = require_ray()
        self.actors = ActorPool(self.ray, options.cpus_per_actor)
        self.status = JobStatus(self)
        self.stop_reason: str | None = None
        self._is_stop_sent = False
        self.failure: str | None = None
        self.pending: deque[Part] = deque()
        self.num_restarts = self.num_done_before = 0
        self.num_results = self.num_errors = self.num_tokens = 0
        self.parts: list[Part] = []

    @property
    def slots(self) -> list[_Slot]:
        """The actors held now."""
        return self.actors.slots

    def prepare(self) -> None:
        """Check the output directory against this job (refusing a change unless --force), fix num_parts and the
        actors' resources, write cluster.json."""
        setup = JobSetup(self.ray, self.spec, self.options)
        setup.prepare()
        self.use_gpu, self.num_actors, self.num_parts = setup.use_gpu, setup.num_actors, setup.num_parts
        self.job, self.parts = setup.job, setup.parts

    # ---- running
    def run(self) -> str:
        """Run every part that is not complete; returns how the job ended: done, interrupted or failed."""
        self.prepare()
        scan_done_ids(self.out / RESULTS)  # cut a line an interrupted engine-run or engine-sweep left half-written
        self.pending = deque(p for p in self.parts if not is_complete(self.out, p, self.job["complete_key"]))
        self.num_done_before = count_done(self.out, self.parts)
        skipped = len(self.parts) - len(self.pending)
        self.status.say(f"{self.spec.kind} into {self.out}: {len(self.parts)} parts ({skipped} complete), "
                        f"{min(self.num_actors, len(self.pending))} {'GPU' if self.use_gpu else 'CPU'} actors")
        if self.pending:
            self.actors.start(self.job, self.use_gpu, min(self.num_actors, len(self.pending)))
        try:
            with stop_signals(self._on_signal):
                self._loop()
                if self.slots:
                    self.status.poll()  # the actors' last counts, for status.json
        finally:
            self.actors.end()
        if self.failure is not None:
            self.status.write("failed")
            return "failed"
        if self.stop_reason is not None:
            self.status.write("interrupted")
            return "interrupted"
        merge(self.out, self.parts, self.job)
        self.status.write("done")
        return "done"

    def _loop(self) -> None:
        next_report = time.monotonic() + self.options.progress_seconds
        while True:
            if self.stop_reason is None:
                self.actors.assign(self.pending)
            elif not self._is_stop_sent:
                self._is_stop_sent = True
                self.actors.stop()
            if not self.actors.running:
                return
            ready, _ = self.ray.wait(list(self.actors.running), num_returns=1, timeout=0.5)
            for ref in ready:
                self._finished(ref)
            if time.monotonic() >= next_report:
                self.status.poll()
                self.status.report()
                next_report = time.monotonic() + self.options.progress_seconds

    def _finished(self, ref) -> None:
        slot, part = self.actors.running.pop(ref)
        exceptions = self.ray.exceptions
        try:
            result = self.ray.get(ref)
        except exceptions.RayActorError as exc:
            self._retry(slot, part, f"actor {slot.number} died ({_first_line(exc)})")
            return
        except exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            if isinstance(cause, EngineError):
                self._retry(slot, part, f"the engine of actor {slot.number} failed: {_first_line(cause)}")
            else:
                self._fail(f"{part.name} failed on actor {slot.number}: {type(cause).__name__}: {cause}")
            return
        slot.label = part.label
        slot.progress.update(part_done=0, part_tokens=0, state="idle")
        self.num_results += result["results"]
        self.num_errors += result["errors"]
        self.num_tokens += result["tokens"]
        if not result["complete"] and self.stop_reason is None:
            self._fail(f"{part.name} stopped on actor {slot.number} without being asked to")

    def _retry(self, slot: _Slot, part: Part, reason: str) -> None:
        part.num_failures += 1
        part.last_error = reason
        self.ray.kill(slot.handle, no_restart=True)
        if part.num_failures > self.options.max_retries:
            self._fail(f"{part.name} failed {part.num_failures} times (last: {reason}); --max-retries is "
                       f"{self.options.max_retries}. Every finished record is on disk: fix the cause and run the same "
                       f"command to resume")
            self.slots.remove(slot)
            return
        if self.stop_reason is not None:
            self.slots.remove(slot)
            return
        self.status.say(f"{reason}; {part.name} goes to a new actor (retry {part.num_failures} of "
                        f"{self.options.max_retries}), continuing from what it wrote")
        self.num_restarts += 1
        self.slots[self.slots.index(slot)] = self.actors.new_slot()
        self.pending.appendleft(part)

    def _fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
        print(f"engine-ray: {message}", file=sys.stderr, flush=True)
        self.stop(f"failed: {message}")

    def stop(self, reason: str) -> None:
        """Stop the job: no new parts; running parts flush what is finished and return. Only sets a flag (the loop
        tells the actors), so a signal handler or another thread may call it."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def _on_signal(self, signum, frame) -> None:
        if self.stop_reason is not None:  # a second signal: stop waiting for the actors to drain
            raise KeyboardInterrupt
        self.stop(signal.Signals(signum).name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
