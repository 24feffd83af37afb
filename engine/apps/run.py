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

from engine.config import (CAPTURE_DTYPES, CAPTURE_POSITIONS, COMPILE_MODES, DTYPES, STEER_POSITIONS, TRUNCATE_MODES,
                           CaptureDefaults, ConfigError, EngineConfig, SamplingDefaults, SteeringDefaults)
from engine.models import ModelNotFound
from engine.engine import Engine, EngineError
from engine.pipeline.reader import read_requests
from engine.procs import stop_signals
from engine.specs import not_a_file
from engine.storage.files import DiskLow, OutputWriteError, check_free_space, write_atomic
from engine.storage.output import (OutputError, changed_message, check_input, check_manifest, check_output_path,
                                   drop_records, errors_path, lock_output, scan_done_ids)
from engine.core.trace import process_age

EXIT_OK, EXIT_FATAL, EXIT_REJECTED, EXIT_INTERRUPTED = 0, 1, 3, 130


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give layer indices like 6 or 4,6,8") from None


def _steer_positions(text: str) -> str | dict:
    """prompt | generated | all, or a JSON object of ranges (checked with the rest of the steering flags)."""
    if text in STEER_POSITIONS:
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: use one of {', '.join(STEER_POSITIONS)}, or a JSON object of "
                                         f"ranges like '{{\"prompt\": [-1, null], \"generated\": [0, 20]}}'")
    return value


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that builds an engine."""
    p.add_argument("--model", default="embedded", help="embedded | local HF dir | file.gguf | random:<preset>")
    p.add_argument("--tokenizer", help="tokenizer.json (or its dir) to use instead of the model's")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--devices", default="", metavar="all|0,1,...",
                   help="one engine core per device, requests shared between them: all (every visible GPU), GPU "
                        "indices like 0,1, devices like cuda:0,cuda:1, or cpu,cpu")
    p.add_argument("--max-num-seqs", type=int,
                   help="sequences decoded together (default: 512 on a GPU, as memory allows; 64 on a CPU)")
    p.add_argument("--max-model-len", type=int, help="prompt + new tokens limit (default: the model's, at most 4096)")
    p.add_argument("--gpu-memory-fraction", type=float, default=0.9, help="share of the GPU the engine may fill")
    p.add_argument("--max-prefill-tokens", type=int,
                   help="prompt tokens in one prefill (packed, no padding; default: 32768, less where the KV cache "
                        "would otherwise get fewer than --max-num-seqs slots)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs and no torch.compile (debugging)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="auto",
                   help="torch.compile the decoder layers: auto (on a GPU), on, off; compiled artefacts persist in "
                        "<cache dir>/compile")
    p.add_argument("--tokenizer-workers", type=int, default=1)
    p.add_argument("--decoder-workers", type=int, default=1)
    p.add_argument("--truncate", default="none", choices=TRUNCATE_MODES, help="cut prompts that are too long")
    g = p.add_argument_group("generation defaults (a record's own fields win)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0,
                   help="base seed; a record without 'seed' gets one derived from it and its id")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="always generate max_new_tokens")
    s = p.add_argument_group("steering (a record's 'steering' object replaces it)")
    s.add_argument("--steer", metavar="FILE", help="vector file: .safetensors, .pt, .npy or a .gguf control vector")
    s.add_argument("--steer-layer", type=_layers, default=[], metavar="L[,L2..]",
                   help="decoder layer(s) whose output is steered")
    s.add_argument("--steer-coef", type=float, default=1.0)
    s.add_argument("--steer-positions", default="all", type=_steer_positions, metavar="prompt|generated|all|JSON",
                   help=f"{'|'.join(STEER_POSITIONS)}, or ranges as in a record, e.g. '{{\"generated\": [0, 20]}}'")
    s.add_argument("--steering-specs", metavar="TOML", help="named specs; records then say \"steering\": \"name\"")
    c = p.add_argument_group("activation capture (a record's 'capture' field overrides layers and positions)")
    c.add_argument("--capture-layers", type=_layers, default=[], metavar="L[,L2..]",
                   help="decoder layer(s) whose output (the residual stream after the layer) is recorded")
    c.add_argument("--capture-positions", default="last_prompt", choices=CAPTURE_POSITIONS)
    c.add_argument("--capture-dtype", default="float32", choices=CAPTURE_DTYPES)
    c.add_argument("--capture-before-steering", action="store_true",
                   help="record the layer's output before that layer's steering is added (default: after)")


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, devices=args.devices,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, tokenizer_workers=args.tokenizer_workers,
        gpu_memory_fraction=args.gpu_memory_fraction, max_prefill_tokens=args.max_prefill_tokens,
        enforce_eager=args.enforce_eager, compile=args.compile,
        decoder_workers=args.decoder_workers, truncate=args.truncate,
        return_tokens=getattr(args, "return_tokens", False), steering_specs=args.steering_specs,
        sampling=SamplingDefaults(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos),
        steering=SteeringDefaults(vector=args.steer, layers=args.steer_layer, coef=args.steer_coef,
                                  positions=args.steer_positions),
        capture=CaptureDefaults(layers=args.capture_layers, positions=args.capture_positions, dtype=args.capture_dtype,
                                is_before_steering=args.capture_before_steering),
    )


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-run", description="Generate completions for a JSONL file of prompts.")
    p.add_argument("--input", required=True, help="JSONL: one {\"prompt\": ...} or {\"messages\": ...} per line")
    p.add_argument("--output", help="results JSONL (default: <input stem>.out.jsonl beside the input)")
    p.add_argument("--ordered", action="store_true", help="write results in input order")
    p.add_argument("--force", action="store_true", help="settings changed: move old results aside and start again")
    p.add_argument("--return-tokens", action="store_true", help="add completion_token_ids to each record")
    p.add_argument("--min-free-gb", type=_gigabytes, default=1.0, metavar="GB",
                   help="disk space to keep free: checked before starting and before each activation shard; when low, "
                        "the run stops cleanly and the same command resumes it (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
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
    except EngineError as exc:
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
    # The writer's module imports torch (its activation store): ~2 s, done while the engine starts, not after.
    threading.Thread(target=importlib.import_module, args=("engine.pipeline.writer",), daemon=True).start()
    with Engine(config) as engine:
        timings.mark("engine_ready")
        from engine.pipeline.writer import (
            JsonlWriter,  # here: its activation store imports torch, now beside the core's start
        )

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
        f"skipped {len(done)} done" + _died(engine) + ("; interrupted" if interrupted else ""),
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
