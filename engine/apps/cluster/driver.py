"""Cluster: a batch job or a sweep on a Ray cluster. Engine instances run as Ray actors (one GPU each, or some CPUs);
the work is cut into parts by a hash of each request's id; an actor runs a part into the part's own files on shared
storage; the driver hands out parts, gives the part of a dead actor to a new one, gathers progress and merges the
parts when all are complete.

The output directory (on storage every node mounts at the same path):
  cluster.json                   the job: kind, num_parts, the settings (batch) or the sweep's config hash
  parts/part-00003/              a batch part: results.jsonl, results.errors.jsonl, results.activations/, the manifest,
                                 complete.json once the part ran to its end (a sweep: parts/<model>/part-00003/)
  results.jsonl, results.errors.jsonl merged when every part is complete: a valid engine-run output (activation
                                 pointers rewritten to the part folders), which engine-run or engine-sweep can resume
  status.json                    progress, rewritten every few seconds
Each part has exactly one writer at a time (JsonlWriter, with its durability and resume rules); a restarted job
skips the ids in a part's results and in the merged results.jsonl. Ray is imported only here, and only when used.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from engine.apps.run import (EXIT_FATAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_REJECTED, add_engine_args, config_from_args,
                        input_lines, manifest_of)
from engine.config import ConfigError, EngineConfig
from engine.models import ModelNotFound
from engine.engine import Engine, EngineError, read_requests
from engine.procs import stop_signals
from engine.storage.files import complete_lines, move_aside, write_atomic
from engine.storage.output import OutputError
from engine.apps.sweep.runner import Plan, SweepError, load_sweep, prepare_directory
from engine.pipeline.writer import (JsonlWriter, ManifestMismatch, check_manifest, errors_path, manifest_path,
                                    scan_done_ids)

log = logging.getLogger("engine.apps.cluster.driver")

JOB_FILE, STATUS_FILE, RESULTS, COMPLETE = "cluster.json", "status.json", "results.jsonl", "complete.json"
JOB_VERSION = 1
INSTALL_HINT = "pip install 'steer-engine[ray]' (in a checkout: pip install -e '.[ray]')"


class ClusterError(RuntimeError):
    """The job cannot start or go on; the message names the cause and what to do."""


def require_ray():
    """The ray module, or ClusterError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ClusterError(f"engine-ray needs Ray, which is not installed ({exc}); install it on every node: "
                           f"{INSTALL_HINT}") from None
    return ray


# ---------------------------------------------------------------- parts
def part_of(request_id: str, num_parts: int) -> int:
    """The part a request belongs to: a stable hash of its id, so a repeated id lands in one part (and is reported
    there as engine-run reports it) and an input that grows keeps every id in its part."""
    return zlib.crc32(request_id.encode("utf-8", "surrogateescape")) % num_parts


def line_id(line: int, raw: bytes) -> str:
    """The id a raw input line will have (its `id`, else its line number); a line that will be rejected keeps its
    line number, which is enough to place it."""
    if b'"id"' not in raw:  # most inputs carry no ids: no need to parse
        return str(line)
    try:
        obj = json.loads(raw)
    except ValueError:  # not JSON or not UTF-8: rejected later, with the reason
        return str(line)
    if isinstance(obj, dict) and isinstance(obj.get("id"), str):
        return obj["id"]
    return str(line)


def part_folder(index: int, label: str | None) -> str:
    """A part's folder, relative to the output directory."""
    name = f"part-{index:05d}"
    return f"parts/{name}" if label is None else f"parts/{label}/{name}"


@dataclass(slots=True)
class Part:
    index: int
    label: str | None  # the sweep's model label; None for a batch job
    num_failures: int = 0
    last_error: str = ""

    @property
    def name(self) -> str:
        return part_folder(self.index, self.label).removeprefix("parts/")


# ---------------------------------------------------------------- the actor
class EngineActor:
    """One engine on one GPU (or some CPUs), running parts. Ray runs it as a threaded actor (max_concurrency=2), so
    `progress` and `stop` answer while `run_part` runs; the engine is kept between parts of the same model."""

    def __init__(self, job: dict):
        self.job = job
        self.out = Path(job["output"])
        if Path(job["cwd"]).is_dir():  # relative paths in records (steering vectors) mean what they meant on the driver
            os.chdir(job["cwd"])
        self.plan: Plan | None = None
        self.engine: Engine | None = None
        self.engine_label: str | None = None
        self.lock = threading.Lock()
        self.is_stopping = False
        self.state, self.part = "idle", None
        self.num_results = self.num_errors = self.num_tokens = 0
        self.part_done = self.part_todo = self.part_tokens = 0
        self.gen_seconds, self._gen_since = 0.0, None

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        """Stop admitting; the running part flushes what is finished and returns."""
        with self.lock:
            self.is_stopping = True
            engine = self.engine
        if engine is not None:
            engine.interrupt()

    def progress(self) -> dict:
        with self.lock:
            seconds = self.gen_seconds + (time.monotonic() - self._gen_since if self._gen_since else 0.0)
            return {"pid": os.getpid(), "node": _node_ip(), "state": self.state, "part": self.part,
                    "part_done": self.part_done, "part_todo": self.part_todo, "part_tokens": self.part_tokens,
                    "records": self.num_results,
                    "errors": self.num_errors, "tokens": self.num_tokens, "gen_s": round(seconds, 3),
                    "device": None if self.engine is None else str(self.engine.device)}

    def run_part(self, index: int, label: str | None) -> dict:
        """Run one part to its end (or until stopped) into its folder, skipping the ids already in its results or
        in the merged results. Returns the part's counts and whether it ran to its end."""
        folder = self.out / part_folder(index, label)
        output = folder / RESULTS
        config, manifest = self._config(label), self._manifest()
        done = scan_done_ids(output)
        for request_id in self._merged_ids(index, label):
            done.add(request_id)
        todo = sum(1 for line, item in self._sources(index, label) if _item_id(line, item) not in done)
        self._set(state="loading", part=part_folder(index, label), part_done=0, part_todo=todo, part_tokens=0)
        engine = self._engine(label, config)
        if engine is None:
            return {"complete": False, "results": 0, "errors": 0, "tokens": 0}
        writer = JsonlWriter(output, manifest, ordered=False)
        self._running(True)
        try:
            # a batch part's results carry their input digests, so engine-run can resume the merged output
            for outcome in engine.run(read_requests(self._sources(index, label), config, done, digests=label is None)):
                writer.write(outcome)
                self._count(outcome)
        except EngineError:
            self.engine, self.engine_label = None, None  # it closed itself; a retried part starts a fresh one
            raise
        finally:
            self._running(False)
            writer.close()
        complete = not engine.is_interrupted
        if complete:
            write_atomic(folder / COMPLETE, (json.dumps(self.job["complete_key"]) + "\n").encode())
        self._set(state="idle")
        return {"complete": complete, "results": writer.num_results, "errors": writer.num_errors,
                "tokens": writer.num_tokens}

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    # ---- helpers
    def _config(self, label: str | None) -> EngineConfig:
        if label is None:
            return EngineConfig.from_dict(self.job["config"])
        plan = self._plan()
        model = next(m for m in plan.config.models if m.label == label)
        return plan.config.engine_config(model, self.job["device"])

    def _manifest(self) -> dict:
        if self.job["kind"] == "batch":
            return self.job["manifest"]
        return {"version": 1, "sweep_config_hash": self.job["config_hash"]}

    def _plan(self) -> Plan:
        if self.plan is None:
            plan = Plan(load_sweep(self.job["sweep"], self.job["output"]))
            if plan.config_hash != self.job["config_hash"]:
                raise ClusterError(f"{self.job['sweep']} changed while the sweep ran (config {plan.config_hash}, the "
                                   f"driver has {self.job['config_hash']}); run engine-ray again to resume")
            self.plan = plan
        return self.plan

    def _merged_ids(self, index: int, label: str | None) -> Iterator[str]:
        """This part's ids in the merged results.jsonl (read only: the driver owns that file)."""
        for raw in complete_lines(self.out / RESULTS):
            request_id = json.loads(raw).get("id")
            if (isinstance(request_id, str) and part_of(request_id, self.job["num_parts"]) == index
                    and (label is None or request_id.startswith(label + "/"))):
                yield request_id

    def _sources(self, index: int, label: str | None) -> Iterator[tuple[int, object]]:
        """(number, raw line or sweep record) of the part's requests, in input order."""
        num_parts = self.job["num_parts"]
        if label is None:
            return ((line, raw) for line, raw in input_lines(Path(self.job["input"]))
                    if part_of(line_id(line, raw), num_parts) == index)
        model = next(m for m in self._plan().config.models if m.label == label)
        return ((n, record) for n, record in self._plan().requests(model) if part_of(record["id"], num_parts) == index)

    def _engine(self, label: str | None, config: EngineConfig) -> Engine | None:
        """The engine for this model, started if needed; None when the job stopped meanwhile."""
        if self.engine is not None and self.engine_label != label:
            self.close()
        if self.engine is None and not self.is_stopping:
            engine = Engine(config)
            with self.lock:
                self.engine, self.engine_label = engine, label
        if self.is_stopping:
            if self.engine is not None:
                self.engine.interrupt()
            return None
        return self.engine

    def _set(self, **values) -> None:
        with self.lock:
            for key, value in values.items():
                setattr(self, key, value)

    def _running(self, is_running: bool) -> None:
        with self.lock:
            now = time.monotonic()
            if is_running:
                self.state, self._gen_since = "running", now
            elif self._gen_since is not None:
                self.gen_seconds += now - self._gen_since
                self._gen_since = None

    def _count(self, outcome) -> None:
        with self.lock:
            self.part_done += 1
            if outcome.is_error:
                self.num_errors += 1
            else:
                tokens = outcome.record["num_completion_tokens"]
                self.num_results += 1
                self.num_tokens += tokens
                self.part_tokens += tokens


def _item_id(line: int, item) -> str:
    """The id of a source item: a sweep record's id, or a raw line's."""
    return item["id"] if isinstance(item, dict) else line_id(line, item)


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


# ---------------------------------------------------------------- the driver
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


class ClusterJob:
    """The driver: checks the output directory, starts the actors, hands out parts, retries the part of a dead
    actor on a new one, writes status.json and a progress line, and merges the parts at the end. Needs a connected
    Ray (ray.init) before `run`."""

    def __init__(self, spec: JobSpec, options: ClusterOptions):
        self.spec, self.options = spec, options
        self.out = spec.output
        self.ray = require_ray()
        self.actor_class = self.ray.remote(EngineActor)
        self.stop_reason: str | None = None
        self._is_stop_sent = False
        self.failure: str | None = None
        self.slots: list[_Slot] = []
        self.running: dict = {}  # ObjectRef -> (slot, part)
        self.pending: deque[Part] = deque()
        self.num_restarts = self.num_done_before = 0
        self.num_results = self.num_errors = self.num_tokens = 0
        self.parts: list[Part] = []
        self.started = time.monotonic()
        self._next_slot = 0

    # ---- set-up
    def prepare(self) -> None:
        """Check the output directory against this job (refusing a change unless --force), fix num_parts and the
        actors' resources, write cluster.json."""
        if not self.ray.is_initialized():
            raise ClusterError("Ray is not connected; call ray.init(address=...) first (engine-ray does it)")
        self._check_device()
        if self.spec.kind == "sweep":
            prepare_directory(self.out, self.spec.plan, self.spec.force, self.spec.extend)
        else:
            self._check_batch_output()
        self.out.mkdir(parents=True, exist_ok=True)
        self.num_actors = self.options.num_actors or self._default_actors()
        self.num_parts = self._num_parts()
        key = self._complete_key()
        self.job = {"kind": self.spec.kind, "output": str(self.out), "cwd": os.getcwd(), "num_parts": self.num_parts,
                    "device": "cuda" if self.use_gpu else "cpu", "complete_key": key}
        if self.spec.kind == "batch":  # cache_dir "" : each node resolves its own (ENGINE_CACHE_DIR or ~/.cache)
            self.job |= {"input": str(self.spec.input), "manifest": manifest_of(self.spec.config),
                         "config": self.spec.config.to_dict() | {"cache_dir": "", "device": self.job["device"]}}
        else:
            self.job |= {"sweep": self.spec.plan.config.source, "config_hash": self.spec.plan.config_hash}
        record = {"version": JOB_VERSION, "kind": self.spec.kind, "num_parts": self.num_parts}
        if self.spec.kind == "batch":
            record |= {"input": str(self.spec.input), "manifest": self.job["manifest"]}
        write_atomic(self.out / JOB_FILE, (json.dumps(record, indent=2) + "\n").encode())
        self.parts = [Part(i, label) for label in self.spec.labels() for i in range(self.num_parts)]

    def _check_device(self) -> None:
        device = self.spec.device
        if device.startswith("cuda:"):
            raise ClusterError(f"device {device}: under Ray every actor gets its own GPU; use cuda or auto (--device, "
                               f"or a sweep's [engine] device), and --num-actors to choose how many")
        num_gpus = self.ray.cluster_resources().get("GPU", 0)
        if device == "cuda" and num_gpus < 1:
            raise ClusterError("--device cuda, but the Ray cluster has no GPUs; start the nodes with GPUs visible "
                               "(ray start --num-gpus N) or use --device cpu")
        self.use_gpu = device == "cuda" or (device == "auto" and num_gpus >= 1)

    def _default_actors(self) -> int:
        resources = self.ray.cluster_resources()
        if self.use_gpu:
            return int(resources["GPU"])
        return max(1, int(resources.get("CPU", 1) // self.options.cpus_per_actor))

    def _check_batch_output(self) -> None:
        manifest = manifest_of(self.spec.config)
        job_file = self.out / JOB_FILE
        if job_file.exists():
            old = _read_json(job_file)
            if old.get("kind") != "batch":
                raise ClusterError(f"{self.out} holds a {old.get('kind')} job; use another --output")
            changed = sorted(k for k in set(old["manifest"]) | set(manifest)
                             if old["manifest"].get(k) != manifest.get(k))
            if changed and not self.spec.force:
                shown = "; ".join(f"{k}: was {json.dumps(old['manifest'].get(k))}, now {json.dumps(manifest.get(k))}"
                                  for k in changed)
                raise ManifestMismatch(f"{self.out} was made with other settings ({shown}). Use a new --output, or "
                                       f"pass --force to move the old directory aside (renamed *.replaced-<time>) "
                                       f"and start again.")
            if changed:
                self._move_aside()
        elif (self.out / RESULTS).exists():  # an engine-run output: resume it if its settings match
            try:
                check_manifest(self.out / RESULTS, manifest, force=False)
            except OutputError:  # other settings, or a file engine-run did not write
                if not self.spec.force:
                    raise
                self._move_aside()

    def _move_aside(self) -> None:
        [aside] = move_aside([self.out])
        log.warning("moved the old output aside to %s", aside)

    def _num_parts(self) -> int:
        job_file = self.out / JOB_FILE
        started = _read_json(job_file).get("num_parts") if job_file.exists() else None
        wanted = self.options.num_parts
        if started is not None and wanted is not None and wanted != started:
            raise ClusterError(f"--num-parts {wanted}: {self.out} was split into {started} parts; leave --num-parts "
                               f"out (or give {started}) to resume it, or use a new --output")
        return started or wanted or self.num_actors

    def _complete_key(self) -> dict:
        """What a part's complete.json must say for the part to count as done without running it again."""
        if self.spec.kind == "sweep":
            return {"config_hash": self.spec.plan.config_hash}
        stat = self.spec.input.stat()
        return {"input": str(self.spec.input), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "manifest": manifest_of(self.spec.config)}

    # ---- running
    def run(self) -> str:
        """Run every part that is not complete; returns how the job ended: done, interrupted or failed."""
        self.prepare()
        scan_done_ids(self.out / RESULTS)  # cut a line an interrupted engine-run or engine-sweep left half-written
        self.pending = deque(p for p in self.parts if not self._is_complete(p))
        self.num_done_before = self._count_done()
        skipped = len(self.parts) - len(self.pending)
        self._say(f"{self.spec.kind} into {self.out}: {len(self.parts)} parts ({skipped} complete), "
                  f"{min(self.num_actors, len(self.pending))} {'GPU' if self.use_gpu else 'CPU'} actors")
        if self.pending:
            self.slots = [self._new_slot() for _ in range(min(self.num_actors, len(self.pending)))]
        try:
            with stop_signals(self._on_signal):
                self._loop()
                if self.slots:
                    self.poll()  # the actors' last counts, for status.json
        finally:
            self._end_actors()
        if self.failure is not None:
            self._write_status("failed")
            return "failed"
        if self.stop_reason is not None:
            self._write_status("interrupted")
            return "interrupted"
        self.merge()
        self._write_status("done")
        return "done"

    def _is_complete(self, part: Part) -> bool:
        marker = self.out / part_folder(part.index, part.label) / COMPLETE
        return marker.exists() and _read_json(marker) == self.job["complete_key"]

    def _count_done(self) -> int:
        total = 0
        for part in self.parts:
            path = self.out / part_folder(part.index, part.label) / RESULTS
            if path.exists():
                with path.open("rb") as f:
                    total += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        return total

    def _new_slot(self) -> _Slot:
        options = {"num_gpus": 1} if self.use_gpu else {"num_cpus": self.options.cpus_per_actor}
        env = {k: os.environ[k] for k in ("ENGINE_CACHE_DIR", "HF_HOME") if k in os.environ}
        if env:
            options["runtime_env"] = {"env_vars": env}
        actor = self.actor_class.options(max_concurrency=2, max_restarts=0, **options).remote(self.job)
        self._next_slot += 1
        return _Slot(self._next_slot - 1, actor)

    def _loop(self) -> None:
        next_report = time.monotonic() + self.options.progress_seconds
        while True:
            if self.stop_reason is None:
                self._assign()
            elif not self._is_stop_sent:
                self._is_stop_sent = True
                for slot in self.slots:
                    slot.handle.stop.remote()
            if not self.running:
                return
            ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=0.5)
            for ref in ready:
                self._finished(ref)
            if time.monotonic() >= next_report:
                self.poll()
                self._report()
                next_report = time.monotonic() + self.options.progress_seconds

    def _assign(self) -> None:
        busy = {id(slot) for slot, _ in self.running.values()}
        for slot in self.slots:
            if not self.pending:
                return
            if id(slot) in busy:
                continue
            part = self._take(slot)
            self.running[slot.handle.run_part.remote(part.index, part.label)] = (slot, part)

    def _take(self, slot: _Slot) -> Part:
        """The next part, preferring the model the actor's engine already holds."""
        for part in self.pending:
            if part.label == slot.label:
                self.pending.remove(part)
                return part
        return self.pending.popleft()

    def _finished(self, ref) -> None:
        slot, part = self.running.pop(ref)
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
        self._say(f"{reason}; {part.name} goes to a new actor (retry {part.num_failures} of "
                  f"{self.options.max_retries}), continuing from what it wrote")
        self.num_restarts += 1
        self.slots[self.slots.index(slot)] = self._new_slot()
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

    def _end_actors(self, timeout: float = 30.0) -> None:
        """Close the engines (their processes end cleanly), then end the actors."""
        refs = [slot.handle.close.remote() for slot in self.slots]
        self.ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for slot in self.slots:
            self.ray.kill(slot.handle, no_restart=True)  # an engine left running follows its actor (Lifeline)
            slot.progress["state"] = "ended"

    # ---- progress
    def poll(self, timeout: float = 5.0) -> list[dict]:
        """Ask every actor for its progress; an actor that does not answer in time keeps its last report."""
        refs = {slot.handle.progress.remote(): slot for slot in self.slots}
        ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        for ref in ready:
            try:
                refs[ref].progress.update(self.ray.get(ref))
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.RayTaskError):
                continue  # a dead actor: its run_part reports it
        self._write_status("running")
        return [dict(slot.progress) for slot in self.slots]

    def snapshot(self, state: str) -> dict:
        actors = []
        for slot in self.slots:
            p = slot.progress
            rate = p["tokens"] / p["gen_s"] if p.get("gen_s") else 0.0
            actors.append({"actor": slot.number, **p, "tok_per_s": round(rate, 1)})
        elapsed = time.monotonic() - self.started
        running = [slot.progress for slot, _ in self.running.values()]
        records = self.num_results + self.num_errors + sum(p.get("part_done", 0) for p in running)
        tokens = self.num_tokens + sum(p.get("part_tokens", 0) for p in running)
        return {"state": state, "kind": self.spec.kind,
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "parts": len(self.parts), "parts_left": len(self.pending) + len(self.running),
                "done_before": self.num_done_before, "records": records,
                "errors": self.num_errors, "tok_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
                "restarts": self.num_restarts, "failure": self.failure, "stop_reason": self.stop_reason,
                "actors": actors}

    def _write_status(self, state: str) -> None:
        write_atomic(self.out / STATUS_FILE, (json.dumps(self.snapshot(state), indent=2) + "\n").encode())

    def _report(self) -> None:
        s = self.snapshot("running")
        actors = " | ".join(f"a{a['actor']} {a.get('node', '?')} {a.get('part') or '-'} {a.get('state', 'starting')} "
                            f"{a['tok_per_s']:,.0f} tok/s" for a in s["actors"])
        self._say(f"{s['done_before'] + s['records']} records ({s['records']} this run), {s['errors']} errors, "
                  f"{s['parts'] - s['parts_left']}/{s['parts']} parts, {s['tok_per_s'] or 0:,.0f} tok/s; {actors}")

    def _say(self, message: str) -> None:
        if not self.options.is_quiet:
            print(f"engine-ray: {message}", file=sys.stderr, flush=True)

    # ---- the end
    def merge(self) -> tuple[int, int]:
        """results.jsonl: the merged records kept, plus every part's records not yet in it (activation pointers
        made relative to the output directory); results.errors.jsonl: every part's errors. Both written atomically.
        Returns (records, errors) in the merged files."""
        results, merged_ids = self.out / RESULTS, scan_done_ids(self.out / RESULTS)
        write_atomic(results, self._merged_lines(results, merged_ids))
        num_records = len(merged_ids)  # the kept records' ids, and each part record's as it was added
        errors = b"".join(b"".join(complete_lines(errors_path(self.out / part_folder(p.index, p.label) / RESULTS)))
                          for p in self.parts)
        write_atomic(errors_path(results), errors)
        if self.spec.kind == "batch":  # so engine-run can resume the merged file too
            write_atomic(manifest_path(results), (json.dumps(self.job["manifest"], indent=2) + "\n").encode())
        return num_records, errors.count(b"\n")

    def _merged_lines(self, results: Path, merged_ids) -> Iterator[bytes]:
        """The merged file's lines: the kept file's as they are, then each part's records not in it yet (added to
        `merged_ids` as they go), their activation shards named from the output directory."""
        yield from complete_lines(results)
        for part in self.parts:
            folder = part_folder(part.index, part.label)
            for raw in complete_lines(self.out / folder / RESULTS):
                record = json.loads(raw)
                if record["id"] in merged_ids:
                    continue
                merged_ids.add(record["id"])
                if isinstance(record.get("activations"), dict):
                    pointer = record["activations"]
                    record["activations"] = {**pointer, "shard": f"{folder}/{pointer['shard']}"}
                    raw = (json.dumps(record, ensure_ascii=False) + "\n").encode()
                yield raw


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ClusterError(f"{path} cannot be read ({exc}); move the output directory aside or use another "
                           f"--output") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------- the command
def ray_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-ray", description="Run a batch job (as engine-run) or a sweep (as "
                                "engine-sweep) on a Ray cluster: one engine per GPU, parts of the input on shared "
                                "storage, resumable.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", help="JSONL prompts on shared storage (as engine-run --input)")
    what.add_argument("--sweep", help="a sweep file on shared storage (as engine-sweep); engine flags come from it")
    p.add_argument("--output", help="output directory on shared storage (default: <input stem>.ray-out beside the "
                   "input; for a sweep, the file's `output`)")
    p.add_argument("--address", help="the Ray cluster (default: RAY_ADDRESS, else a cluster started on this node "
                   "with `ray start`, else a new local one)")
    p.add_argument("--num-actors", type=int, help="engines to start (default: one per GPU of the cluster; on CPU, "
                   "cluster CPUs / --cpus-per-actor)")
    p.add_argument("--num-parts", type=int, help="parts the work is cut into (default: --num-actors; fixed once the "
                   "output is started)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs each CPU actor reserves")
    p.add_argument("--max-retries", type=int, default=3, help="new actors a part may get after a failure")
    p.add_argument("--progress-seconds", type=float, default=10.0, help="how often progress is gathered and printed")
    p.add_argument("--force", action="store_true", help="settings changed: move the old output aside, start again")
    p.add_argument("--extend", action="store_true", help="(sweep) the sweep only grew: run just the added requests")
    p.add_argument("--no-report", action="store_true", help="(sweep) skip the report at the end")
    p.add_argument("--return-tokens", action="store_true", help="add completion_token_ids to each record")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_engine_args(p)
    return p


def ray_main(argv: list[str] | None = None) -> int:
    parser = ray_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        spec, options = job_spec(parser, args), job_options(args)
        ray = require_ray()
        is_ours = not ray.is_initialized()  # a script (or a test) may have connected already
        if is_ours:
            ray.init(address=args.address, log_to_driver=not args.quiet)
        try:
            return _run(ClusterJob(spec, options), args)
        finally:
            if is_ours:
                ray.shutdown()
    except (ClusterError, ConfigError, ModelNotFound, OutputError, SweepError, EngineError) as exc:
        print(f"engine-ray: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print("engine-ray: interrupted; run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def job_options(args: argparse.Namespace) -> ClusterOptions:
    return ClusterOptions(args.num_actors, args.num_parts, args.cpus_per_actor, args.max_retries,
                          args.progress_seconds, args.quiet)


def job_spec(parser: argparse.ArgumentParser, args: argparse.Namespace) -> JobSpec:
    """What engine-ray's flags ask for: a sweep (engine flags refused: the sweep file has them) or a batch job."""
    if args.sweep is not None:
        given = [f"--{name.replace('_', '-')}" for name in _engine_dests(parser)
                 if getattr(args, name) != parser.get_default(name)]
        if given:
            raise ClusterError(f"{', '.join(given)}: with --sweep the engine settings come from the sweep file's "
                               f"[engine], [generation] and [capture] tables; set them there")
        plan = Plan(load_sweep(args.sweep, str(Path(args.output).resolve()) if args.output else None))
        if "devices" in plan.config.engine:
            log.warning("engine-ray: the sweep's [engine] devices is for one host; under Ray every actor has one "
                        "device, and --num-actors says how many")
        return JobSpec(Path(plan.config.output), plan=plan, extend=args.extend, force=args.force)
    if getattr(args, "devices", ""):
        raise ClusterError(f"--devices {args.devices}: under Ray every actor is one engine on one GPU; leave --devices "
                           f"out and use --num-actors (default: every GPU of the cluster)")
    if args.extend or args.no_report:
        raise ClusterError("--extend and --no-report are for --sweep; a batch job resumes by running it again")
    source = Path(args.input).resolve()
    if not source.is_file():
        raise ClusterError(f"--input {args.input}: no such file")
    output = Path(args.output).resolve() if args.output else source.with_name(source.stem + ".ray-out")
    if output.exists() and not output.is_dir():
        raise ClusterError(f"--output {output} is a file; engine-ray writes a directory (parts and the merged "
                           f"results.jsonl): give a directory")
    config = config_from_args(args)
    config = EngineConfig.from_dict({**config.to_dict(), **_absolute_paths(config)})
    return JobSpec(output, config=config, input=source, force=args.force)


def _engine_dests(parser: argparse.ArgumentParser) -> list[str]:
    probe = argparse.ArgumentParser(add_help=False)
    add_engine_args(probe)
    return [a.dest for a in probe._actions if a.dest != "help"]


def _absolute_paths(config: EngineConfig) -> dict:
    """Paths the actors open, made absolute (an actor's working directory is not the driver's)."""
    fixed: dict = {}
    if config.tokenizer:
        fixed["tokenizer"] = str(Path(config.tokenizer).resolve())
    if config.steering_specs:
        fixed["steering_specs"] = str(Path(config.steering_specs).resolve())
    if config.steering.vector:
        fixed["steering"] = {**config.to_dict()["steering"], "vector": str(Path(config.steering.vector).resolve())}
    if config.model != "embedded" and not config.model.startswith("random:") and Path(config.model).exists():
        fixed["model"] = str(Path(config.model).resolve())
    return fixed


def _run(job: ClusterJob, args) -> int:
    started = time.perf_counter()
    ended = job.run()
    elapsed = time.perf_counter() - started
    print(f"engine-ray: {ended}: {job.num_results} records, {job.num_errors} errors, {job.num_tokens} tokens this run "
          f"in {elapsed:.1f} s ({job.num_tokens / max(elapsed, 1e-9):,.0f} tok/s); {job.num_restarts} actor restarts; "
          f"{job.out}", file=sys.stderr)
    if ended == "failed":
        return EXIT_FATAL
    if ended == "interrupted":
        print("engine-ray: interrupted; every finished record is on disk: run the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if job.spec.kind == "sweep" and not args.no_report:
        from engine.apps.sweep.report import write_report

        write_report(job.out)
    num_errors = sum(1 for _ in complete_lines(errors_path(job.out / RESULTS)))
    return EXIT_REJECTED if num_errors else EXIT_OK


if __name__ == "__main__":
    sys.exit(ray_main())
