"""EngineActor: one engine on one GPU (or some CPUs) as a Ray actor, running parts into their folders."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Iterator

from engine.apps.cluster.parts import COMPLETE, RESULTS, ClusterError, line_id, part_folder, part_of
from engine.apps.run import input_lines
from engine.apps.sweep.plan import Plan
from engine.apps.sweep.spec import load_sweep
from engine.config import EngineConfig
from engine.engine import Engine, EngineError
from engine.pipeline.reader import read_requests
from engine.pipeline.writer import JsonlWriter, scan_done_ids
from engine.storage.files import complete_lines, write_atomic


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
