"""The engine-sweep command: `engine-sweep SWEEP_FILE` runs a sweep, `engine-sweep report DIR` rewrites its report."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from engine.apps.run import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_REJECTED
from engine.config import ConfigError
from engine.models import ModelNotFound
from engine.engine import EngineError
from engine.apps.sweep.fields import SweepError
from engine.apps.sweep.outdir import LOG, prepare_directory, why
from engine.apps.sweep.plan import Plan
from engine.apps.sweep.report import write_report
from engine.apps.sweep.runner import SweepRunner
from engine.apps.sweep.spec import engine_settings, load_sweep

log = logging.getLogger("engine.apps.sweep.cli")


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-sweep", description="Run a grid of steering configurations over prompt "
                                "sets and models, resumably; `engine-sweep report DIR` rewrites the report.")
    p.add_argument("sweep", help="the sweep file (.toml or .json)")
    p.add_argument("--output", help="output directory (default: the file's `output`, or its name beside it)")
    p.add_argument("--force", action="store_true", help="the sweep changed: set the old directory aside, start again")
    p.add_argument("--extend", action="store_true", help="the sweep only grew: run just the added requests")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.add_argument("--devices", action="append", metavar="all|0,1|cuda:0",
                   help="where models run, instead of the file's [engine] devices: each --devices runs one model at a "
                        "time on those GPUs together (--devices all: every GPU; --devices 0 --devices 1: two models "
                        "at a time, one GPU each). Speed only: the results and the sweep's hash do not change")
    return p


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-sweep report", description="summary.csv, summary.md and plots of a "
                                "sweep directory (also of a sweep still running or stopped).")
    p.add_argument("directory")
    return p


def sweep_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return _report_main(report_parser().parse_args(argv[1:]))
    args = sweep_parser().parse_args(argv)
    if args.force and args.extend:
        print("engine-sweep: --force and --extend exclude each other: --extend keeps the results, --force sets them "
              "aside", file=sys.stderr)
        return EXIT_FATAL
    try:
        config = load_sweep(args.sweep, args.output)
        if args.devices:
            config.engine.update(engine_settings({"devices": args.devices}, "--devices"))
        plan = Plan(config)
        if args.dry_run:
            print(json.dumps(plan.to_json(), indent=2))
            return EXIT_OK
        out = Path(plan.config.output)
        how = prepare_directory(out, plan, args.force, args.extend)
        try:
            _log_to(out / LOG)
        except OSError as exc:
            raise SweepError(f"cannot open {out / LOG} ({why(exc)}); nothing has run: fix that and run again") \
                from None
        log.info("engine-sweep %s: %s into %s (config %s): %d models x %d points x %d prompts x %d samples", args.sweep,
                 how, out, plan.config_hash, len(plan.config.models), len(plan.points), plan.num_prompts,
                 plan.config.samples)
        return _run(plan, out, args)
    except SweepError as exc:
        print(f"engine-sweep: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except (ConfigError, ModelNotFound, EngineError) as exc:
        log.error("%s", exc)
        return EXIT_FATAL
    except KeyboardInterrupt:  # before the engine's drain handler is installed, or after it is removed
        print("engine-sweep: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        log.error("cannot write the sweep's files (%s: %s); every finished record is on disk: fix that and run the "
                  "same command to resume", type(exc).__name__, exc)
        return EXIT_FATAL


def _run(plan: Plan, out: Path, args) -> int:
    started = time.perf_counter()
    runner = SweepRunner(plan, out)
    ended, writer = runner.run()
    status = runner.status.snapshot()
    log.info("%d records, %d errors, %d tokens this run in %.1f s; %d of %d done%s", writer.num_results,
             writer.num_errors, writer.num_tokens, time.perf_counter() - started, status["done"], status["total"],
             f"; stopped: {runner.stopper.reason}" if ended != "done" else "")
    if ended == "disk":
        log.error("%s: free some space (or lower min_free_gb), then run the same command to resume",
                  runner.stopper.reason)
        return EXIT_FATAL
    if ended == "interrupted":
        return EXIT_INTERRUPTED
    if not args.no_report:
        try:
            paths = write_report(out)
        except SweepError as exc:
            log.error("the sweep finished but its report failed: %s; fix that and run engine-sweep report %s", exc, out)
            return EXIT_FATAL
        log.info("report: %s", ", ".join(str(p) for p in paths))
    return EXIT_REJECTED if writer.num_errors else EXIT_OK


def _report_main(args) -> int:
    try:
        paths = write_report(Path(args.directory))
    except SweepError as exc:
        print(f"engine-sweep report: {exc}", file=sys.stderr)
        return EXIT_FATAL
    print("\n".join(str(p) for p in paths))
    return EXIT_OK


def _log_to(path: Path) -> None:
    """sweep.log gets the engine's and the sweep's messages with times; stderr gets them plain."""
    engine_log = logging.getLogger("engine")
    engine_log.setLevel(logging.INFO)
    for handler in list(engine_log.handlers):
        if getattr(handler, "is_sweep", False):
            engine_log.removeHandler(handler)
            handler.close()
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("engine-sweep: %(message)s"))
    for handler in (file_handler, console):
        handler.is_sweep = True
        engine_log.addHandler(handler)
    engine_log.propagate = False


if __name__ == "__main__":
    # Run the module's own copy, not this __main__ one, so that every name the command uses is the one the other
    # modules see: a class defined here would be a second class (__main__.X), which their handlers would not catch.
    # SweepError, which the report raises, lives in engine.apps.sweep.fields, shared by both copies.
    from engine.apps.sweep.cli import sweep_main as main

    sys.exit(main())
