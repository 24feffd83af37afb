"""JobSetup: a job's output directory checked against the job, its parts and the actors' resources fixed."""

from __future__ import annotations

import json
import logging
import os

from engine.apps.cluster.parts import JOB_FILE, JOB_VERSION, RESULTS, ClusterError, Part, read_json
from engine.apps.run import manifest_of
from engine.apps.sweep.outdir import prepare_directory
from engine.pipeline.writer import ManifestMismatch, check_manifest
from engine.storage.files import move_aside, write_atomic
from engine.storage.output import OutputError

log = logging.getLogger("engine.apps.cluster.prepare")


class JobSetup:
    """The set-up of a ClusterJob, before any actor starts: `prepare` leaves use_gpu, num_actors, num_parts, the
    parts and `job` (what every actor is given)."""

    def __init__(self, ray, spec, options):  # a connected ray, the JobSpec and the ClusterOptions
        self.ray, self.spec, self.options = ray, spec, options
        self.out = spec.output

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
            old = read_json(job_file)
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
        started = read_json(job_file).get("num_parts") if job_file.exists() else None
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
