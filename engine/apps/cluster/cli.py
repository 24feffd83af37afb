"""The engine-ray command: its flags, the JobSpec and ClusterOptions they ask for, and the run of one ClusterJob."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from engine.apps.cluster.driver import ClusterJob, ClusterOptions, JobSpec
from engine.apps.cluster.parts import RESULTS, ClusterError, require_ray
from engine.apps.flags import add_engine_args, add_engine_flag, config_from_args
from engine.apps.run import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_REJECTED
from engine.apps.sweep.fields import SweepError
from engine.apps.sweep.plan import Plan
from engine.apps.sweep.spec import load_sweep
from engine.config import ConfigError, EngineConfig
from engine.engine import EngineError
from engine.models import ModelNotFound
from engine.pipeline.writer import errors_path
from engine.storage.files import complete_lines
from engine.storage.output import OutputError

log = logging.getLogger("engine.apps.cluster.cli")


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
    add_engine_flag(p, "return_tokens")
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
    if config.adapters:
        fixed["adapters"] = {name: str(Path(directory).resolve()) for name, directory in config.adapters.items()}
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
