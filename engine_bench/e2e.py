"""engine-bench --e2e: each system as the whole command a user runs, timed from process start to exit, cold and warm.

`engine-run` and the write-up's batched loop as a user's script (engine_bench/user_script.py, at each batch size) run
one after another as fresh processes over the same prompts file and the same model directory. The parent times each
command from just before it starts to its exit; the command's own --timings stamps split that into phases. Cold: the
command's cache folders (ENGINE_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR, CUDA_CACHE_PATH) start empty;
warm: the same command again over what the cold run left there (the script's too: the CUDA driver's JIT cache
holds its kernels). The OS page cache is not dropped. With --steering-specs, engine-run runs again after its warm run,
over the same cache folders and prompts, each record steered by one of N random vectors (one row per N).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import psutil

from engine.models import ModelSource, resolve_device, resolve_dtype, resolve_model
from engine_bench.e2e_report import READY, e2e_markdown, row_system, run_metrics, summarise, write_e2e_chart
from engine_bench.report import (append_results, cpu_card, cpu_name, no_gpu_metrics, run_stem, versions,
                                 write_outputs)
from engine_bench.config import BenchConfig, BenchError
from engine_bench.monitor import GpuMonitor, check_lengths
from engine_bench.runner import load_workloads
from engine_bench.systems import random_steering_specs
from engine_bench.workloads import Workload

SCRIPT = Path(__file__).with_name("user_script.py")
CACHE_STATES = ("cold", "warm")
KEEP_ALIVE = "10m"  # the kept-alive rows' --keep-alive: longer than any gap between their two runs
STOP_TIMEOUT_S = 120
CACHE_VARS = {"ENGINE_CACHE_DIR": "engine", "TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton",
              "CUDA_CACHE_PATH": "cuda"}
MODEL_MARK = "bench-model.json"  # written last into a materialised model directory: it is complete
STDERR_TAIL_CHARS = 3000


def dtype_name(config: BenchConfig) -> str:
    return str(resolve_dtype(config.engine.dtype, config.device)).removeprefix("torch.")


# ---------------------------------------------------------------- the model directory both systems load


def model_dir(config: BenchConfig, source: ModelSource) -> Path:
    """A plain Hugging Face directory (config, weights, tokenizer) that both systems load as a user would: a local
    one as is; anything else (random:<preset>, a .gguf, the embedded model, or a --tokenizer of its own) is saved
    once under <out>/e2e-models, in a child process, and reused while it matches."""
    model = config.engine.model
    if source.preset is None and config.engine.tokenizer is None and Path(model).is_dir():
        return Path(model)
    mark = {"model": model, "tokenizer_dir": source.tokenizer_dir, "dtype": dtype_name(config)}
    digest = hashlib.sha256(json.dumps(mark, sort_keys=True).encode()).hexdigest()[:8]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(model).stem if model.endswith(".gguf") else model)
    target = Path(config.out) / "e2e-models" / f"{slug.strip('-')}-{mark['dtype']}-{digest}"
    if _read_mark(target) == mark:
        return target
    print(f"engine-bench: saving {model} as a Hugging Face directory in {target}", file=sys.stderr, flush=True)
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        try:
            pool.submit(materialise, source.to_msg(), mark, config.device, str(target)).result()
        except BrokenProcessPool:
            raise BenchError(f"saving {model} into {target}: the process died (out of memory?); give --model "
                             "a local Hugging Face directory instead") from None
        except OSError as exc:
            raise BenchError(f"saving {model} into {target}: {exc}; free some space or give another --out") \
                from None
    return target


def _read_mark(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MODEL_MARK).read_text())
    except (OSError, ValueError):
        return None


def materialise(source_msg: dict, mark: dict, device: str, target: str) -> None:
    """Child: load the model as the engine does (seeded random weights for a preset) and save it with its tokenizer;
    built beside the target and renamed into place, so a half-written directory is never used."""
    import torch
    from transformers import AutoTokenizer

    from engine.models import load_model

    source = ModelSource(**source_msg)
    tok = AutoTokenizer.from_pretrained(source.tokenizer_dir, local_files_only=True)  # it can save itself
    model = load_model(source, getattr(torch, mark["dtype"]), device, vocab_size=len(tok))
    final = Path(target)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    (partial / MODEL_MARK).write_text(json.dumps(mark))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)


# ---------------------------------------------------------------- the commands


@dataclass(frozen=True, slots=True)
class Command:
    """One system as the command a user runs: engine-run (plain, steered by num_specs distinct vectors, prompt i
    by vector i % num_specs, or with --keep-alive: is_resident) or the script at one batch size."""

    system: str  # the program: engine-run | hf-script
    batch_size: int | None = None
    num_specs: int | None = None
    is_resident: bool = False

    @property
    def name(self) -> str:
        """Its rows' system."""
        return row_system(self.system, self.num_specs) + (" kept-alive" if self.is_resident else "")

    @property
    def key(self) -> str:
        """Its run folders' name."""
        return self.name.replace(" ", "-") if self.batch_size is None else f"{self.system}-b{self.batch_size}"

    @property
    def cache_key(self) -> str:
        """Its cache folders' name: a steered or kept-alive engine-run shares the plain one's, so it finds its
        compile artefacts."""
        return self.system if self.batch_size is None else self.key

    @property
    def caches(self) -> tuple[str, ...]:
        """Steered: warm only, right after the plain warm run (what a user's next, steered job meets). Kept-alive:
        warm (it starts the resident engine), then loaded (the next run finds it)."""
        if self.is_resident:
            return ("warm", "loaded")
        return CACHE_STATES if self.num_specs is None else ("warm",)

    def label(self, cache: str) -> str:
        return f"{self.name}{'' if self.batch_size is None else f' b{self.batch_size}'} {cache}"


def write_prompts(workload: Workload, config: BenchConfig, path: Path, steering: list[dict] | None = None) -> None:
    """The workload as the JSONL a user would hand engine-run: prompt, length and sampling settings per record, and
    with steering specs given, record i's `steering` the (i % len)-th of them."""
    sampling = config.engine.sampling
    with path.open("w", encoding="utf-8") as f:
        for i, p in enumerate(workload.prompts):
            record = {"id": p.id, "prompt": p.text, "max_new_tokens": p.max_new_tokens,
                      "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                      "ignore_eos": True}
            if steering:
                record["steering"] = steering[i % len(steering)]
            f.write(json.dumps(record) + "\n")


def engine_argv(config: BenchConfig, model: Path, prompts: Path, folder: Path, is_resident: bool = False) -> list[str]:
    """engine-run with its own defaults, except the engine settings the user gave engine-bench (and --keep-alive
    for the kept-alive rows)."""
    argv = [sys.executable, "-m", "engine.apps.run", "--input", str(prompts), "--output", str(folder / "results.jsonl"),
            "--model", str(model), "--dtype", dtype_name(config), "--seed", str(config.engine.sampling.seed),
            "--ignore-eos", "--return-tokens", "--force", "--quiet", "--timings", str(folder / "timings.json")]
    engine = config.engine
    argv += ["--devices", ",".join(engine.devices)] if engine.devices else ["--device", config.device]
    if engine.max_model_len is not None:
        argv += ["--max-model-len", str(engine.max_model_len)]
    for name in config.engine_flags_given:
        argv += [f"--{name.replace('_', '-')}", str(getattr(engine, name))]
    return argv + (["--keep-alive", KEEP_ALIVE] if is_resident else [])


def script_argv(config: BenchConfig, model: Path, prompts: Path, folder: Path, batch_size: int) -> list[str]:
    return [sys.executable, str(SCRIPT), "--input", str(prompts), "--output", str(folder / "results.jsonl"),
            "--model", str(model), "--batch-size", str(batch_size), "--dtype", dtype_name(config),
            "--device", config.device, "--seed", str(config.engine.sampling.seed),
            "--timings", str(folder / "timings.json")]


def systems(config: BenchConfig) -> list[Command]:
    """The commands in run order: engine-run, engine-run steered at each --steering-specs count, then the script
    at each batch size (it has no steering)."""
    out = [Command("engine-run")] if "engine" in config.systems else []
    out += [Command("engine-run", num_specs=n) for n in dict.fromkeys(config.steering_specs) if out]
    out += [Command("engine-run", is_resident=True)] if out and config.is_keep_alive else []
    return out + ([Command("hf-script", b) for b in config.batch_sizes] if "hf" in config.systems else [])


def cache_env(root: Path, cache: str) -> dict[str, str]:
    """The child's environment with its own cache folders under root; emptied first for a cold run."""
    if cache == "cold" and root.exists():
        shutil.rmtree(root)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for var, name in CACHE_VARS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        env[var] = str(root / name)
    return env


def run_command(label: str, argv: list[str], folder: Path, env: dict[str, str]) -> dict:
    """Run one command to its exit, timed from just before it starts; stdout and stderr go to files in folder.
    A non-zero exit is a BenchError showing the end of its stderr."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "stdout.log").open("wb") as out, (folder / "stderr.log").open("wb") as err:
        started_wall, started = time.time(), time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        try:
            code = proc.wait()
        finally:
            _end(proc)
        ended = time.monotonic()
    if code != 0:
        tail = (folder / "stderr.log").read_text(errors="replace")[-STDERR_TAIL_CHARS:].strip()
        raise BenchError(f"{label} exited with code {code}; the end of its stderr ({folder / 'stderr.log'}):\n{tail}")
    return {"exit_code": code, "start": started, "end": ended, "started_wall": started_wall, "wall_s": ended - started,
            "timings": _read_timings(label, folder / "timings.json")}


def _end(proc: subprocess.Popen) -> None:
    """Stop a command still running (the bench was interrupted): SIGTERM lets engine-run drain, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _read_timings(label: str, path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"{label} exited 0 but its --timings file {path} is unreadable ({exc})") from None


def read_results(label: str, path: Path, workload: Workload) -> dict:
    """A command's completions in prompt order; a prompt without a record is a BenchError (its output is wrong)."""
    by_id: dict[str, dict] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_id[record["id"]] = record
    missing = [p.id for p in workload.prompts if p.id not in by_id]
    if missing:
        raise BenchError(f"{label}: {len(missing)} of {len(workload.prompts)} prompts have no record in {path} "
                         f"(first: {missing[0]}); see {path.parent / 'stderr.log'}")
    rows = [by_id[p.id] for p in workload.prompts]
    done = {"system": label, "token_ids": [r["completion_token_ids"] for r in rows],
            "texts": [r["completion"] for r in rows], "prompt_ids": [p.id for p in workload.prompts]}
    check_lengths(done, workload.prompts)
    return done


# ---------------------------------------------------------------- orchestration


def run_system(config: BenchConfig, command: Command, model: Path, prompts: Path, run_dir: Path,
               workload: Workload, gpu: GpuMonitor | None) -> tuple[list[dict], dict[str, dict]]:
    """One command at each of its cache states (cold, then warm): (metrics per run, completions per run label)."""
    metrics, outputs = [], {}
    root = Path(config.out) / "e2e-cache" / command.cache_key
    try:
        for cache in command.caches:
            metrics.append(_run_once(config, command, cache, model, prompts, run_dir, workload, gpu, root, outputs))
    finally:
        if command.is_resident:  # its resident engine holds the device: end it before the next system
            stop_resident(cache_env(root, "warm"))
    return metrics, outputs


def _run_once(config: BenchConfig, command: Command, cache: str, model: Path, prompts: Path, run_dir: Path,
              workload: Workload, gpu: GpuMonitor | None, root: Path, outputs: dict) -> dict:
    batch = command.batch_size
    label = command.label(cache)
    folder = run_dir / f"{command.key}-{cache}"
    argv = (engine_argv(config, model, prompts, folder, command.is_resident) if batch is None
            else script_argv(config, model, prompts, folder, batch))
    run = run_command(label, argv, folder, cache_env(root, cache))
    outputs[label] = read_results(label, folder / "results.jsonl", workload)
    m = run_metrics(run, command.system, cache, batch, label, argv, outputs[label]["token_ids"], command.num_specs,
                command.name)
    m.update(gpu_columns(gpu, run, m, max(1, len(config.engine.devices)) if batch is None else 1))
    print(f"engine-bench: {workload.name} {label}: {m['wall_s']:.1f} s whole command, first result at "
          f"{m['time_to_first_result_s']:.1f} s, {m['output_tokens_per_s']:,.0f} output tok/s", file=sys.stderr,
          flush=True)
    return m


def stop_resident(env: dict[str, str]) -> None:
    """End the resident engine of a cache root's folders (none running: nothing to do)."""
    subprocess.run([sys.executable, "-m", "engine.apps.resident", "stop"], env=env, capture_output=True,
                   timeout=STOP_TIMEOUT_S, check=False)


def gpu_columns(gpu: GpuMonitor | None, run: dict, m: dict, num_cards: int) -> dict:
    """NVML figures of a command's cards over the whole command, and utilisation over its generation phase."""
    if gpu is None:
        return {**no_gpu_metrics(), "gpu_util_generation_pct": None}
    generation_start = run["start"] + m["launch_s"] + m["stamps_s"][READY[m["program"]]]
    generation = gpu.window(generation_start, generation_start + m["generation_s"], num_cards)
    return {**gpu.window(run["start"], run["end"], num_cards),
            "gpu_util_generation_pct": generation["gpu_util_mean_pct"]}


def engine_run_defaults() -> dict:
    """engine-run's own values of the engine settings engine-bench leaves to it unless given (the table names them)."""
    from engine.apps.run import run_parser

    parser = run_parser()
    return {name: parser.get_default(name) for name in ("max_num_seqs", "max_model_len", "gpu_memory_fraction")}


def command_prompts(config: BenchConfig, command: Command, source: ModelSource, workload: Workload,
                    run_dir: Path) -> Path:
    """The prompts file a command reads: the plain one, or for a steered engine-run the same records steered, its
    vector files beside it."""
    if command.num_specs is None:
        return run_dir / "prompts.jsonl"
    path = run_dir / f"prompts-{command.key}.jsonl"
    vectors = run_dir / f"vectors-{command.num_specs}"
    vectors.mkdir(exist_ok=True)
    write_prompts(workload, config, path, random_steering_specs(source, config, command.num_specs, vectors))
    return path


def run_e2e_workload(config: BenchConfig, workload: Workload, source: ModelSource, model: Path,
                     gpu: GpuMonitor | None, env: dict, command: str) -> tuple[dict, dict]:
    """Every system on one workload, cold and warm (steered engine-run warm only) -> (report, completions by run
    label)."""
    stamp = f"{dt.datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(config.out) / "e2e" / f"{workload.name}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_prompts(workload, config, run_dir / "prompts.jsonl")
    runs: list[dict] = []
    outputs: dict[str, dict] = {}
    errors: list[dict] = []
    for cmd in systems(config):
        name = cmd.name if cmd.batch_size is None else f"{cmd.name} b{cmd.batch_size}"
        if cmd.num_specs is not None and not any(m["system"] == "engine-run" for m in runs):
            errors.append({"systems": name, "error": "not run: engine-run failed, so there is no warm cache or "
                           "unsteered time to compare it with"})
            continue
        try:
            prompts = command_prompts(config, cmd, source, workload, run_dir)
            metrics, done = run_system(config, cmd, model, prompts, run_dir, workload, gpu)
        except BenchError as exc:  # the other systems' numbers are still worth the time they took
            errors.append({"systems": name, "error": str(exc)})
            print(f"engine-bench: {workload.name}: {exc}", file=sys.stderr)
            continue
        runs += metrics
        outputs.update(done)
    if not runs:
        raise BenchError(f"workload {workload.name}: every system failed; first: {errors[0]['error']}")
    report = {
        "schema": 1, "mode": "e2e", "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **env,
        "command": command, "settings": config.to_dict(), "engine_run_defaults": engine_run_defaults(),
        "workload": workload.describe(), "model_dir": str(model), "run_dir": str(run_dir), "runs": runs,
        "errors": errors,
    }
    report.update(summarise(report, {label: d["token_ids"] for label, d in outputs.items()}, config.is_greedy))
    return report, outputs


def run_e2e(config: BenchConfig, command: str) -> list[dict]:
    """Every workload of the config as whole commands; each workload's files are written as soon as it finishes."""
    from engine.models import load_tokenizer

    config = config.on_device(resolve_device(config.device))
    source = resolve_model(config.engine.model, config.engine.tokenizer, config.engine.cache_dir)
    workloads = load_workloads(config, load_tokenizer(source.tokenizer_dir), source.max_position_embeddings)
    model = model_dir(config, source)
    cards = config.engine.devices or [config.device]
    gpu = GpuMonitor(cards, config.sample_hz) if config.device.startswith("cuda") else None
    env = {"card": gpu.card(",".join(cards)) if gpu else cpu_card(), "versions": versions(),
           "host": {"cpu": cpu_name(), "num_cpus": psutil.cpu_count()}, "dtype": dtype_name(config)}
    reports = []
    with gpu if gpu is not None else contextlib.nullcontext():
        for workload in workloads:
            report, outputs = run_e2e_workload(config, workload, source, model, gpu, env, command)
            stem = run_stem(report, f"{workload.name}-e2e")
            paths = write_outputs(report, outputs, Path(config.out), stem, config.is_saving_outputs,
                                  render=e2e_markdown, chart=write_e2e_chart)
            if config.append_results:
                append_results(report, config.append_results, render=e2e_markdown)
            print(e2e_markdown(report))
            print(f"engine-bench: wrote {', '.join(map(str, paths))}", file=sys.stderr)
            reports.append(report)
    return reports
