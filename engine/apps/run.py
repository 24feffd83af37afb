"""Console entry points; thin layers over engine.engine.Engine."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from engine.adapters import adapters_digest
from engine.apps.flags import add_engine_args, add_engine_flag, config_from_args
from engine.apps.resident.channel import ResidentError, parse_duration
from engine.apps.resident.client import ResidentEngine, open_resident
from engine.config import ConfigError, EngineConfig
from engine.models import ModelNotFound
from engine.engine import Engine, EngineError
from engine.pipeline.reader import read_requests
from engine.pipeline.writer import JsonlWriter
from engine.procs import stop_signals
from engine.specs import not_a_file
from engine.storage.files import DiskLow, OutputWriteError, check_free_space, write_atomic
from engine.storage.output import (OutputError, changed_message, check_input, check_manifest, check_output_path,
                                   drop_records, errors_path, lock_output, scan_done_ids)
from engine.core.trace import process_age

EXIT_OK, EXIT_FATAL, EXIT_REJECTED, EXIT_INTERRUPTED = 0, 1, 3, 130


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-run", description="Generate completions for a JSONL file of prompts.")
    p.add_argument("--input", required=True, help="JSONL: one {\"prompt\": ...} or {\"messages\": ...} per line")
    p.add_argument("--output", help="results JSONL (default: <input stem>.out.jsonl beside the input)")
    p.add_argument("--ordered", action="store_true", help="write results in input order")
    p.add_argument("--force", action="store_true", help="settings changed: move old results aside and start again")
    add_engine_flag(p, "return_tokens")
    p.add_argument("--min-free-gb", type=_gigabytes, default=1.0, metavar="GB",
                   help="disk space to keep free: checked before starting and before each activation shard; when low, "
                        "the run stops cleanly and the same command resumes it (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--keep-alive", type=_duration, default=os.environ.get("ENGINE_KEEP_ALIVE", "0"),
                   metavar="DURATION", help="keep the engine loaded for DURATION after the run (600, 10m, 1h; "
                   "default 0: off, or $ENGINE_KEEP_ALIVE): the next engine-run with the same engine settings from "
                   "the same folder uses it and starts at once; `python -m engine.apps.resident stop` ends it")
    p.add_argument("--timings", metavar="PATH", help="write JSON wall-clock stamps (process start, engine ready, first "
                   "and last result, exit) and the engine cores' start-up phases to PATH (engine-bench --e2e reads it)")
    add_engine_args(p)
    return p


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give the gigabytes to keep free as a number >= 0, e.g. 1 or 0.5")
    return value


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def input_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) for each non-blank line; bytes so bad UTF-8 is reported per line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                yield number, raw


def manifest_of(config: EngineConfig) -> dict:
    """The settings that make an output what it is; a resume must match them."""
    manifest = {
        "version": 1, "model": config.model, "tokenizer": config.tokenizer,
        "dtype": config.dtype, "max_model_len": config.max_model_len, "truncate": config.truncate,
        "sampling": config.to_dict()["sampling"], "steering": config.to_dict()["steering"],
        "steering_specs": _file_digest(config.steering_specs),
    }
    if config.capture.layers:  # only then, so outputs made before capture existed still resume
        manifest["capture"] = config.to_dict()["capture"]
    if config.adapters:  # by content, not path: the same adapter moved is the same output
        manifest["adapters"] = adapters_digest(config.adapters)
    return manifest


def _file_digest(path: str | None) -> str | None:
    """A named-specs file by content: editing it changes what the output means."""
    if path is None:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


class Progress:
    """A tqdm bar on a terminal (prompts/s, output tok/s in all and per device, ETA); silent otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.started = time.perf_counter()
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="prompt", dynamic_ncols=True, file=sys.stderr)

    def update(self, tokens: int, devices: list[dict] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(throughput(tokens, devices or [], time.perf_counter() - self.started),
                                     refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def throughput(tokens: int, devices: list[dict], seconds: float) -> str:
    """`1,234 tok/s`, and with several devices each one's share: `(cuda:0 610, cuda:1 624)`; a dead one is marked."""
    seconds = max(seconds, 1e-9)
    text = f"{tokens / seconds:,.0f} tok/s"
    if len(devices) > 1:
        text += " (" + ", ".join(f"{d['label']} {d['num_tokens'] / seconds:,.0f}" + ("" if d["is_alive"] else " dead")
                                 for d in devices) + ")"
    return text


def _died(engine: Engine) -> str:
    """The summary's note of engine cores that died while others finished their requests (the warnings name them)."""
    num = len(engine.core_failures)
    return f"; {num} engine core{'s' * (num != 1)} died, the others ran their requests" if num else ""


def _resident(engine) -> str:
    """The summary's note of a resident engine: its pid, and whether this run started it."""
    if not isinstance(engine, ResidentEngine):
        return ""
    return f"; resident engine pid {engine.pid} ({'started' if engine.was_started else 'already loaded'})"


@contextmanager
def interrupt_on_signals():
    """From a command's first line, SIGINT and SIGTERM raise KeyboardInterrupt (start-up stops, children are ended,
    exit 130); once generation runs, a drain replaces that. The old handlers come back at the end (a caller in a
    thread other than the main one keeps its own: only the main thread may set them)."""
    with stop_signals(signal.default_int_handler):
        yield


def run_main(argv: list[str] | None = None) -> int:
    with interrupt_on_signals():
        return _run_main(argv)


def _run_main(argv: list[str] | None) -> int:
    try:
        args = run_parser().parse_args(argv)
        logging.basicConfig(level=logging.WARNING, format="engine-run: %(message)s")
        source = Path(args.input)
        problem = not_a_file(source)
        if problem:
            print(f"engine-run: --input {source}: {problem}", file=sys.stderr)
            return EXIT_FATAL
        output = Path(args.output) if args.output else source.with_name(source.stem + ".out.jsonl")
        return _run(source, output, args)
    except (ConfigError, ModelNotFound, OutputError) as exc:
        print(f"engine-run: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except (EngineError, ResidentError) as exc:
        print(f"engine-run: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except DiskLow as exc:
        print(f"engine-run: {exc}. Free some space (or lower --min-free-gb), then run the same command to resume",
              file=sys.stderr)
        return EXIT_FATAL
    except OutputWriteError as exc:
        print(f"engine-run: {exc.strerror}; every record before it is on disk: fix that (free some space, say), then "
              f"run the same command to resume", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print("engine-run: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


class RunTimings:
    """--timings: when this run reached each milestone (time.time(), so another process can line them up) and the cores'
    start-up phases, written atomically as JSON at the end; does nothing without a path."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        if self.path is not None and not self.path.parent.is_dir():
            raise ConfigError(f"--timings {path}: folder {self.path.parent} does not exist; create it or give another "
                              "path")
        now = time.time()
        self.stamps = {"process_start": now - process_age(), "imports_done": now}  # imports: to the command's start

    def mark(self, name: str) -> None:
        """Stamp `name` now, once: a later call keeps the first stamp."""
        if self.path is not None and name not in self.stamps:
            self.stamps[name] = time.time()

    def write(self, core_phases: dict[int, dict[str, float]]) -> None:
        if self.path is not None:
            self.mark("exit")
            body = {**self.stamps, "core_phases": {str(core): phases for core, phases in core_phases.items()}}
            try:
                write_atomic(self.path, (json.dumps(body, indent=1) + "\n").encode())
            except OSError as exc:  # the run's results are complete by now: say so, do not fail the run
                logging.getLogger("engine").warning("--timings %s: could not write it (%s); the results are complete",
                                                    self.path, exc)


def _run(source: Path, output: Path, args) -> int:
    wall = time.perf_counter()
    timings = RunTimings(args.timings)
    check_output_path(output, source)
    config = config_from_args(args)
    lock = lock_output(output)
    try:
        manifest = manifest_of(config)
        check_manifest(output, manifest, args.force)
        check_free_space(output.parent, args.min_free_gb, "--min-free-gb")
        done = _resume_index(source, output, args.force)
        return _generate(config, source, output, manifest, done, args, wall, timings)
    finally:
        lock.release()


def _resume_index(source: Path, output: Path, force: bool):
    """The output's done ids, once the input is known to match them (changed records refused, or with --force their
    old results moved aside so they run again)."""
    done = scan_done_ids(output)
    if not len(done):
        return done
    changed = check_input(input_lines(source), done)
    if not changed:
        return done
    if not force:
        done.close()
        raise OutputError(changed_message(output, changed))
    aside = drop_records(output, {request_id for _, request_id in changed})
    logging.getLogger("engine").warning("%d changed record(s) run again; the output before is kept as %s",
                                        len(changed), aside.name)
    done.close()
    return scan_done_ids(output)


def _generate(config: EngineConfig, source: Path, output: Path, manifest: dict, done, args, wall: float,
              timings: RunTimings) -> int:
    if config.capture.layers and len(os.sched_getaffinity(0)) > 2:
        # Captured activations reach the writer as tensors: import torch (~2 s) while the engine starts, where
        # spare cores hide it (on two it would slow the core's own imports).
        threading.Thread(target=importlib.import_module, args=("torch",), daemon=True).start()
    with (open_resident(config, args.keep_alive) if args.keep_alive else Engine(config)) as engine:
        timings.mark("engine_ready")
        writer = JsonlWriter(output, manifest, args.ordered, min_free_gb=args.min_free_gb, done=done)
        progress = Progress(max(_count_lines(source) - len(done), 0), not args.quiet)
        stop = lambda signum, frame: engine.interrupt()  # noqa: E731 - stop admitting, then flush below
        gen_started = time.perf_counter()
        is_complete = False
        with stop_signals(stop):
            try:
                for outcome in engine.run(read_requests(input_lines(source), config, done, digests=True)):
                    writer.write(outcome)
                    timings.mark("first_result")
                    progress.update(writer.num_tokens, engine.device_counts())
                timings.mark("last_result")
                is_complete = not engine.is_interrupted
            finally:
                try:
                    writer.close(is_complete)  # DiskLow if the last activation shard does not fit
                finally:
                    progress.close()
        elapsed = time.perf_counter() - gen_started
        interrupted = engine.is_interrupted
    print(
        f"engine-run: {writer.num_results} records, {writer.num_errors} errors, {writer.num_tokens} tokens in "
        f"{elapsed:.1f} s ({throughput(writer.num_tokens, engine.device_counts(), elapsed)}); start-up "
        f"{engine.startup_s:.1f} s, wall {time.perf_counter() - wall:.1f} s; {engine.device} {engine.dtype}; "
        f"skipped {len(done)} done" + _resident(engine) + _died(engine) + ("; interrupted" if interrupted else ""),
        file=sys.stderr,
    )
    if writer.num_errors:
        print(f"engine-run: {writer.num_errors} record(s) could not run; see {errors_path(output)}", file=sys.stderr)
    timings.write(engine.startup_phases)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_REJECTED if writer.num_errors else EXIT_OK


def main() -> None:
    """The engine-run command: run_main, then end the process without the interpreter's teardown. Every output
    file is closed and fsynced by then and every engine process has ended; what is left (torch's and transformers'
    module teardown) took ~1 s of an engine-run's exit on a CPU for nothing."""
    code = run_main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
