"""engine-bench: the same prompts through the naive loop, the batched HF loop and the engine, side by side.

Each system runs in its own spawned process (the baselines share one: naive, then each HF batch size), so
CPU time, GPU memory and start-up belong to that system alone. The parent samples the card through NVML and
turns each system's timed window into metrics; the JSON, Markdown table and PNG chart are written per workload.
With --e2e (engine_bench/e2e.py) each system runs instead as the whole command a user would type, cold and warm.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import multiprocessing as mp
import os
import queue
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from engine_bench.report import (GIB, agreement, append_results, cpu_card, cpu_name, gpu_metrics, markdown,
                                 no_gpu_metrics, notes, references, system_metrics, versions, work_window,
                                 write_outputs)
from engine.config import CAPTURE_POSITIONS, DTYPES, ConfigError, EngineConfig, SamplingDefaults, parse_devices
from engine.models import ModelNotFound, ModelSource, hidden_size, resolve_device, resolve_dtype, resolve_model
from engine.procs import MsgQueue, child_main
from engine_bench.workloads import (WORKLOADS, Prompt, Workload, WorkloadError, load_input, make_workload,
                                    prompts_from_msg,
                              prompts_to_msg)

SYSTEMS = ("naive", "hf", "engine")
NUM_WARMUP_PROMPTS = 2
MAX_WARMUP_TOKENS = 8
RESULTS_FILE = "benchmarks/RESULTS.md"


class BenchError(RuntimeError):
    """A benchmark could not run or produced wrong output; the message names the system and the cause."""


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@dataclass(slots=True)
class BenchConfig:
    """Everything one engine-bench invocation needs; validated once."""

    model: str = "random:gemma-2b"
    tokenizer: str | None = None
    device: str = "auto"  # with devices: where the baselines run (default the first of them)
    devices: list[str] = field(default_factory=list)  # several: the engine runs one core per device
    dtype: str = "auto"
    workloads: list[str] = field(default_factory=lambda: ["short"])
    input: str | None = None
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    num_prompts: int = 256
    naive_prompts: int = 8
    batch_sizes: list[int] = field(default_factory=lambda: [64, 128, 256])
    max_num_seqs: int = 256
    max_model_len: int | None = None  # the engine's; None: each workload's longest prompt + new tokens
    gpu_memory_fraction: float = 0.9  # the engine's share of the card (KV cache sized to fit it)
    max_new_tokens: int = 150  # for --input records without their own
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    sample_hz: float = 20.0
    out: str = "bench-out"
    append_results: str | None = None
    is_saving_outputs: bool = False
    is_quiet: bool = False
    cache_dir: str = ""
    steering_specs: list[int] = field(default_factory=list)  # one more engine row per count: that many distinct vectors
    steering_layers: list[int] = field(default_factory=lambda: [4, 8, 12])
    capture_layers: list[int] = field(default_factory=list)  # non-empty: one more engine row capturing these layers
    capture_positions: str = "last_prompt"
    trace: str | None = None  # a folder: the engine cores' loop timelines (engine.core.trace) and each run's window
    is_e2e: bool = False  # whole commands (engine-run and the user's script) instead of the steady-state rows
    engine_flags_given: list[str] = field(default_factory=list)  # engine settings the user set: --e2e passes only these

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or not self.systems:
            raise ConfigError(f"--systems {','.join(self.systems)}: use a comma list of {', '.join(SYSTEMS)}")
        if self.input is None:
            bad = [w for w in self.workloads if w not in WORKLOADS]
            if bad or not self.workloads:
                raise ConfigError(f"--workload {','.join(self.workloads)}: use a comma list of {', '.join(WORKLOADS)}"
                                  " or --input FILE.jsonl")
        for name in ("num_prompts", "naive_prompts", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"--batch-sizes {self.batch_sizes}: give batch sizes >= 1, like 64,128,256")
        if self.append_results is not None and not Path(self.append_results).is_file():
            raise ConfigError(f"--append-results {self.append_results}: no such file; run from the repository root "
                              f"or give the path of {RESULTS_FILE}")
        if isinstance(self.steering_specs, int):
            self.steering_specs = [self.steering_specs] if self.steering_specs else []
        if min(self.steering_specs, default=1) < 1 or not self.steering_layers or min(self.steering_layers) < 0:
            raise ConfigError(f"--steering-specs {self.steering_specs} / --steering-layers {self.steering_layers}: "
                              "give "
                              f"counts >= 1 (like 1,256) and layer indices >= 0")
        if min(self.capture_layers, default=0) < 0 or self.capture_positions not in CAPTURE_POSITIONS:
            raise ConfigError(f"--capture-layers {self.capture_layers} / --capture-positions {self.capture_positions}: "
                              f"give layer indices >= 0 and one of {', '.join(CAPTURE_POSITIONS)}")
        self.devices = parse_devices(self.devices) if self.devices else []
        if self.devices and self.device == "auto":
            self.device = self.devices[0]
        if self.is_e2e:
            self._check_e2e()
        if self.sample_hz < 10:
            raise ConfigError(f"--sample-hz {self.sample_hz}: sample at 10 Hz or more, or short idle gaps go unseen")
        self.cache_dir = self.engine_config().cache_dir  # EngineConfig checks device, dtype, sampling; fills cache_dir

    def _check_e2e(self) -> None:
        if not {"engine", "hf"} & set(self.systems):
            raise ConfigError(f"--e2e --systems {','.join(self.systems)}: whole commands are engine and hf (the naive "
                              "loop has no command of its own); name one of them")
        if self.capture_layers or self.trace:
            raise ConfigError("--e2e times whole commands, plain or steered; drop --capture-layers and --trace, or run "
                              "those without --e2e")
        if self.steering_specs and "engine" not in self.systems:
            raise ConfigError(f"--e2e --steering-specs runs engine-run steered, but --systems {','.join(self.systems)} "
                              "leaves engine-run out; add engine (the user's script has no steering)")

    def sampling(self) -> SamplingDefaults:
        return SamplingDefaults(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                top_k=self.top_k, seed=self.seed, ignore_eos=True)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(model=self.model, tokenizer=self.tokenizer, dtype=self.dtype,
                            device="auto" if self.devices else self.device, devices=self.devices,
                            max_num_seqs=self.max_num_seqs, max_model_len=self.max_model_len,
                            gpu_memory_fraction=self.gpu_memory_fraction, sampling=self.sampling(),
                            return_tokens=True, cache_dir=self.cache_dir, trace_dir=self.trace)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- child side: one process per system group


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its descendants (the engine's workers included)."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


class PhaseReporter:
    """Times one system's run inside its process and tells the parent: start, progress, outcome."""

    def __init__(self, events: MsgQueue, system: str, num_prompts: int):
        self.events, self.system, self.num_prompts = events, system, num_prompts
        self.started = self.ended = self.cpu_s = 0.0
        self.first_result_at: float | None = None

    def start(self) -> None:
        self.cpu_s = tree_cpu_seconds()
        self.started = time.monotonic()
        self.events.put({"t": "start", "system": self.system, "num_prompts": self.num_prompts})

    def on_result(self, num: int) -> None:
        if self.first_result_at is None:
            self.first_result_at = time.monotonic()
        self.events.put({"t": "progress", "n": num})

    def stop(self) -> float:
        self.ended = time.monotonic()
        self.cpu_s = tree_cpu_seconds() - self.cpu_s
        return self.ended

    def report(self, token_ids: list[list[int]], texts: list[str], num_generated_tokens: int, **extra) -> None:
        self.events.put({
            "t": "done", "system": self.system, "start": self.started, "end": self.ended,
            "first_result": self.first_result_at, "cpu_s": self.cpu_s, "token_ids": token_ids, "texts": texts,
            "num_generated_tokens": num_generated_tokens, **extra,
        })


def _warmup(prompts: list[Prompt]) -> list[Prompt]:
    """A few short generations first, so CUDA start-up and kernel selection stay out of the timed window."""
    return [dataclasses.replace(p, id=f"warmup-{p.id}", max_new_tokens=min(p.max_new_tokens, MAX_WARMUP_TOKENS))
            for p in prompts[:NUM_WARMUP_PROMPTS]]


def baselines_main(config_msg: dict, prompts_msg: list[dict], events: MsgQueue) -> None:
    """Child: the naive loop on its subset, then the batched HF loop at each batch size, one model load."""
    import torch

    from engine_bench.baselines import batched_loop, load_hf, naive_loop

    config = BenchConfig(**config_msg)
    prompts = prompts_from_msg(prompts_msg)
    started = time.monotonic()
    source = resolve_model(config.model, config.tokenizer, config.cache_dir)
    model, tok, attn = load_hf(source, resolve_dtype(config.dtype, config.device), config.device)
    load_s = time.monotonic() - started
    sampling = config.sampling()
    runs = []
    if "naive" in config.systems:
        runs.append(("naive", prompts[:config.naive_prompts], lambda ps, cb: naive_loop(model, tok, ps, sampling, cb)))
    if "hf" in config.systems:
        runs += [(f"hf-b{b}", prompts, lambda ps, cb, b=b: batched_loop(model, tok, ps, b, sampling, cb))
                 for b in config.batch_sizes]
    for system, subset, loop in runs:
        loop(_warmup(subset), lambda n: None)
        torch.manual_seed(config.seed)
        reporter = PhaseReporter(events, system, len(subset))
        reporter.start()
        out = loop(subset, reporter.on_result)  # ends in .tolist(), so the device is done when it returns
        reporter.stop()
        reporter.report(out.token_ids, out.texts, out.num_generated_tokens, startup_s=load_s, attn=attn)
        if config.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the next system's memory peak starts from the model alone
    events.put({"t": "exit"})


def _engine_records(prompts: list[Prompt]) -> list[dict]:
    return [{"id": p.id, "prompt": p.text, "max_new_tokens": p.max_new_tokens, "ignore_eos": True} for p in prompts]


def _core_idle(engine) -> tuple[float, float]:
    """(the core's cumulative idle seconds, when it answered)."""
    return engine.stats()["idle_s"], time.monotonic()


def engine_main(config_msg: dict, prompts_msg: list[dict], events: MsgQueue) -> None:
    """Child: the engine over all prompts (and again under steering if asked); its ring-empty share comes from
    the core's idle time."""
    from engine.engine import Engine

    config = BenchConfig(**config_msg)
    prompts = prompts_from_msg(prompts_msg)
    base = "engine" if len(config.devices) < 2 else f"engine-{len(config.devices)}dev"
    with Engine(config.engine_config()) as engine, tempfile.TemporaryDirectory() as folder:
        runs = [(base, _engine_records(prompts))]
        layers = ",".join(map(str, config.steering_layers))
        for count in config.steering_specs:
            specs = random_steering_specs(engine.source, config, count, Path(folder))
            steered = [{**r, "steering": specs[i % len(specs)]} for i, r in enumerate(_engine_records(prompts))]
            runs.append((f"{base}+steer{count}@L{layers}", steered))
        if config.capture_layers:
            capture = {"layers": config.capture_layers, "positions": config.capture_positions}
            runs.append((f"{base}+capture@L{','.join(map(str, config.capture_layers))}:{config.capture_positions}",
                         [{**r, "capture": capture} for r in _engine_records(prompts)]))
        for system, records in runs:
            window = _timed_engine_run(engine, system, records[:NUM_WARMUP_PROMPTS], records, events, prompts,
                                       max(1, len(config.devices)))
            if config.trace:
                with (Path(config.trace) / "runs.jsonl").open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"system": system, "prompts": len(records), "first_work": window[0],
                                        "last_work": window[1]}) + "\n")
    events.put({"t": "exit"})


def random_steering_specs(source: ModelSource, config: BenchConfig, count: int, folder: Path) -> list[dict]:
    """`count` distinct random unit-scale vectors for the source's model, one file each in folder, as record
    `steering` specs on the configured layers (seeded: the same vectors every run)."""
    import numpy as np

    hidden = hidden_size(source)
    rng = np.random.default_rng(config.seed)
    specs = []
    for i in range(count):
        path = folder / f"v{i}.npy"
        np.save(path, (rng.standard_normal(hidden) / np.sqrt(hidden)).astype(np.float32))
        specs.append({"vector": str(path), "layers": config.steering_layers, "coef": 4.0, "positions": "all"})
    return specs


def _timed_engine_run(engine, system: str, warmup: list[dict], records: list[dict], events: MsgQueue,
                      prompts: list[Prompt], num_devices: int) -> tuple[float, float]:
    """One timed engine run after a short warm-up; returns its (first work, last work) monotonic window."""
    engine.generate_all([{**r, "id": f"warmup-{r['id']}", "max_new_tokens": min(r["max_new_tokens"], MAX_WARMUP_TOKENS)}
                         for r in warmup])
    idle_before = _core_idle(engine)
    reporter = PhaseReporter(events, system, len(records))
    reporter.start()
    by_id: dict[str, dict] = {}
    for record in engine.generate(records):
        if "error" in record:
            raise BenchError(f"{system}: prompt {record.get('id')} failed: {record['error']}")
        by_id[record["id"]] = record
        reporter.on_result(1)
    ended = reporter.stop()
    idle_after = _core_idle(engine)
    # GPU utilisation and ring-empty count from the first token to the last: from when a core first had work (until
    # then it idles while the first prompts are tokenized: that start is first_work_s) to when the last core ran
    # out of work (after that only the last texts are decoded and delivered).
    stats = engine.core_stats
    first_work = next((t for t in stats["busy_starts"] if t >= reporter.started), reporter.started)
    last_work = stats["idle_since"] if stats["idle_since"] and first_work <= stats["idle_since"] <= ended else ended
    ring_empty = _ring_empty_s(idle_before, idle_after, first_work - reporter.started, last_work)
    ordered = [by_id[p.id] for p in prompts]
    token_ids = [r["completion_token_ids"] for r in ordered]
    reporter.report(token_ids, [r["completion"] for r in ordered], sum(map(len, token_ids)),
                    startup_s=engine.startup_s, attn="engine", num_devices=num_devices, first_work=first_work,
                    last_work=last_work, ring_empty_s=ring_empty,
                    torch_peaks=(stats["torch_allocated_peak"], stats["torch_reserved_peak"]))
    return first_work, last_work


def _ring_empty_s(before: tuple[float, float] | None, after: tuple[float, float] | None, idle_at_start: float,
                  last_work: float) -> float | None:
    """Core idle seconds between its first work and its last: the idle total over the call, less the wait for the
    first prompts and everything after the last sequence finished (the core had no work left then)."""
    if before is None or after is None:
        return None
    return max(0.0, after[0] - before[0] - idle_at_start - (after[1] - last_work))


# ---------------------------------------------------------------- parent side: processes, sampling, metrics


class GpuMonitor:
    """Samples the cards' utilisation and memory through NVML in a background thread. A row's window reads the
    cards it ran on (the first, or all of them for the engine on --devices): utilisation their mean, memory
    their sum."""

    def __init__(self, devices: str | list[str], hz: float):
        self.nvml = _nvml()
        self.handles = [_nvml_handle(self.nvml, device)
                        for device in ([devices] if isinstance(devices, str) else devices)]
        self.handle = self.handles[0]
        self.period = 1.0 / hz
        self.samples: list[tuple[float, list[int], list[int]]] = []  # (monotonic time, util % and bytes per card)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-monitor", daemon=True)

    def __enter__(self) -> "GpuMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def memory_used(self) -> int:
        return sum(self._memory())

    def _memory(self) -> list[int]:
        return [int(self.nvml.nvmlDeviceGetMemoryInfo(handle).used) for handle in self.handles]

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            utils = [int(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu) for h in self.handles]
            self.samples.append((time.monotonic(), utils, self._memory()))
            next_at = max(next_at + self.period, time.monotonic())  # a slow read delays, never bunches, samples

    def card(self, device: str) -> dict:
        import torch

        name, driver = self.nvml.nvmlDeviceGetName(self.handle), self.nvml.nvmlSystemGetDriverVersion()
        name = name if isinstance(name, str) else name.decode()
        return {"name": name if len(self.handles) == 1 else f"{len(self.handles)}x {name}", "device": device,
                "driver": driver if isinstance(driver, str) else driver.decode(), "cuda": torch.version.cuda,
                "memory_gib": sum(self.nvml.nvmlDeviceGetMemoryInfo(h).total for h in self.handles) / GIB,
                "memory_used_before_gib": self.memory_used() / GIB}

    def window(self, start: float, end: float, num_cards: int = 1) -> dict:
        """Metrics of the first num_cards cards between start and end."""
        cards = [(t, sum(u[:num_cards]) / num_cards, sum(m[:num_cards])) for t, u, m in self.samples]
        return gpu_metrics(cards, start, end)


def _nvml():
    try:
        import pynvml
    except ImportError:
        raise BenchError("GPU metrics need NVML bindings: pip install nvidia-ml-py") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise BenchError(f"NVML did not start ({exc}); is the NVIDIA driver loaded? (nvidia-smi)") from None
    return pynvml


def _nvml_handle(nvml, device: str):
    """The NVML handle of the torch device, honouring CUDA_VISIBLE_DEVICES (NVML ignores it)."""
    index = int(device.split(":")[1]) if ":" in device else 0
    visible = _csv(os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    if not visible:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    entry = visible[index]
    return nvml.nvmlDeviceGetHandleByIndex(int(entry)) if entry.isdigit() else nvml.nvmlDeviceGetHandleByUUID(entry)


class _Progress:
    """One tqdm bar per system on a terminal; silent otherwise (or with --quiet)."""

    def __init__(self, label: str, is_quiet: bool):
        self.label, self.is_quiet, self.bar = label, is_quiet, None

    def start(self, system: str, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=f"{self.label} {system}", unit="prompt", dynamic_ncols=True,
                        file=sys.stderr, disable=True if self.is_quiet else None)

    def update(self, num: int) -> None:
        if self.bar is not None:
            self.bar.update(num)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_child(target, config: BenchConfig, prompts: list[Prompt], label: str) -> list[dict]:
    """Run one system group in a fresh process; returns its 'done' messages. The process is not a daemon
    because the engine starts processes of its own."""
    ctx = mp.get_context("spawn")
    events = MsgQueue(ctx)
    stage = f"bench {target.__name__.removesuffix('_main')}"
    proc = ctx.Process(target=child_main, name=stage,
                       args=(stage, events, target, config.to_dict(), prompts_to_msg(prompts), events))
    proc.start()
    progress = _Progress(label, config.is_quiet)
    done: list[dict] = []
    try:
        while True:
            try:
                msg = events.get(timeout=0.5)
            except queue.Empty:
                if proc.exitcode is not None:
                    raise BenchError(f"{stage} (pid {proc.pid}) exited with code {proc.exitcode} before finishing")
                continue
            if msg["t"] == "start":
                progress.start(msg["system"], msg["num_prompts"])
            elif msg["t"] == "progress":
                progress.update(msg["n"])
            elif msg["t"] == "done":
                progress.close()
                done.append(msg)
                print(f"engine-bench: {label} {_done_line(msg)}", file=sys.stderr, flush=True)
            elif msg["t"] == "fatal":
                raise BenchError(f"{msg['stage']} failed: {msg['error']}\n{msg.get('traceback', '')}".rstrip())
            elif msg["t"] == "exit":
                return done
    finally:
        progress.close()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
        events.close()


def _done_line(done: dict) -> str:
    seconds = done["end"] - done["start"]
    tokens = sum(len(ids) for ids in done["token_ids"])
    num = len(done["token_ids"])
    return f"{done['system']}: {num} prompt{'s' * (num != 1)} in {seconds:.1f} s ({tokens / seconds:,.0f} output tok/s)"


def check_lengths(done: dict, prompts: list[Prompt]) -> None:
    """Every system must produce exactly max_new_tokens per prompt, or the comparison is not like for like."""
    for prompt, ids in zip(prompts, done["token_ids"]):
        if len(ids) != prompt.max_new_tokens:
            raise BenchError(f"{done['system']} produced {len(ids)} tokens for prompt {prompt.id}, expected "
                             f"{prompt.max_new_tokens}: the forced-length setting did not hold")


# ---------------------------------------------------------------- orchestration and CLI


def load_workloads(config: BenchConfig, tok, max_positions: int) -> list[Workload]:
    if config.input is not None:
        workloads = [load_input(config.input, tok, config.max_new_tokens, config.num_prompts)]
    else:
        workloads = [make_workload(name, tok, config.num_prompts, config.seed) for name in config.workloads]
    for workload in workloads:
        for p in workload.prompts:
            if p.num_prompt_tokens + p.max_new_tokens > max_positions:
                raise WorkloadError(f"prompt {p.id}: {p.num_prompt_tokens} tokens + {p.max_new_tokens} new exceed the "
                                    f"model's {max_positions} positions; shorten it or lower max_new_tokens")
    return workloads


def run_workload(config: BenchConfig, workload: Workload, gpu: GpuMonitor | None, env: dict) -> tuple[dict, dict]:
    """All chosen systems on one workload -> (report, outputs by system)."""
    # The engine's KV cache is sized by max_model_len; the workload's own longest sequence is the fair size.
    config = dataclasses.replace(config, max_model_len=config.max_model_len or workload.max_total_tokens)
    groups = [(main, name, config) for main, name, wanted in ((baselines_main, "naive/hf", {"naive", "hf"}),
                                                                (engine_main, "engine", {"engine"}))
              if wanted & set(config.systems)]
    if len(config.devices) > 1 and "engine" in config.systems:  # the scaling ratio needs one card, same run
        one_card = dataclasses.replace(config, devices=[], steering_specs=[], capture_layers=[])
        groups.insert(len(groups) - 1, (engine_main, "engine (one card)", one_card))
    done: list[dict] = []
    errors: list[dict] = []
    for main, name, child_config in groups:
        try:
            done += run_child(main, child_config, workload.prompts, workload.name)
        except BenchError as exc:  # the other systems' numbers are still worth the device time they took
            errors.append({"systems": name, "error": str(exc)})
            print(f"engine-bench: {workload.name}: {exc}", file=sys.stderr)
    if not done:
        raise BenchError(f"workload {workload.name}: every system failed; first: {errors[0]['error']}")
    outputs = {}
    for d in done:
        check_lengths(d, workload.prompts)
        d["prompt_ids"] = [p.id for p in workload.prompts[:len(d["token_ids"])]]
        outputs[d["system"]] = d
    report = {
        "schema": 1, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **env,
        "settings": config.to_dict(), "workload": workload.describe(),
        "systems": [system_metrics(d, workload, gpu.window(*work_window(d), d.get("num_devices", 1))
                                   if gpu else no_gpu_metrics()) for d in done],
        "agreement": {ref: agreement({s: d["token_ids"] for s, d in outputs.items()}, ref)
                      for ref in references(done, len(workload.prompts))} if config.is_greedy else {},
        "errors": errors,
    }
    report["notes"] = notes(report)
    return report, outputs


def run_bench(config: BenchConfig) -> list[dict]:
    """Every workload of the config; each run's files are written as soon as it finishes."""
    from engine.models import load_tokenizer

    config = dataclasses.replace(config, device=resolve_device(config.device))
    source = resolve_model(config.model, config.tokenizer, config.cache_dir)
    workloads = load_workloads(config, load_tokenizer(source.tokenizer_dir), source.max_position_embeddings)
    cards = config.devices or [config.device]  # with --devices, the engine's cards (the baselines use the first)
    gpu = GpuMonitor(cards, config.sample_hz) if config.device.startswith("cuda") else None
    env = {"card": gpu.card(",".join(cards)) if gpu else cpu_card(), "versions": versions(),
           "host": {"cpu": cpu_name(), "num_cpus": psutil.cpu_count()},
           "dtype": str(resolve_dtype(config.dtype, config.device)).removeprefix("torch.")}
    reports = []
    with gpu if gpu is not None else contextlib.nullcontext():
        for workload in workloads:
            report, outputs = run_workload(config, workload, gpu, env)
            stem = f"{workload.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
            paths = write_outputs(report, outputs, Path(config.out), stem, config.is_saving_outputs)
            if config.append_results:
                append_results(report, config.append_results)
            print(markdown(report))
            print(f"engine-bench: wrote {', '.join(map(str, paths))}", file=sys.stderr)
            reports.append(report)
    return reports


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers like 64,128,256") from None


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:gemma-2b", help="random:<preset> | local HF dir | file.gguf | embedded")
    p.add_argument("--tokenizer", help="tokenizer.json (or its dir) to use instead of the model's")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--devices", default="", metavar="all|0,1,...",
                   help="run the engine with one core per device (all, 0,1, cuda:0,cuda:1 or cpu,cpu); the naive "
                        "and HF loops run on the first")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--workload", type=_csv, help=f"comma list of {', '.join(WORKLOADS)} (default short)")
    p.add_argument("--input", help="JSONL of {\"prompt\": ..., \"max_new_tokens\"?: N} instead of a workload")
    p.add_argument("--systems", type=_csv, default=list(SYSTEMS), help="comma list of naive, hf, engine")
    p.add_argument("--num-prompts", type=int, default=256, help="prompts per workload (an --input file: at most)")
    p.add_argument("--naive-prompts", type=int, default=8,
                   help="the naive loop runs the first N prompts; the rest is extrapolated")
    p.add_argument("--batch-sizes", type=_ints, default=[64, 128, 256], help="batch sizes of the HF loop")
    p.add_argument("--max-num-seqs", type=int, help="the engine's sequences decoded together (default 256; with --e2e, "
                   "engine-run's own default unless given)")
    p.add_argument("--max-model-len", type=int, help="the engine's prompt + new tokens limit (default: the "
                   "workload's longest)")
    p.add_argument("--gpu-memory-fraction", type=float,
                   help="the engine's share of the card's memory (its KV cache is sized to fit; default 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=150, help="for --input records without their own")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (and completions are compared)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="workload and sampling seed")
    p.add_argument("--sample-hz", type=float, default=20.0, help="NVML sampling rate (>= 10)")
    p.add_argument("--out", default="bench-out", help="directory for the JSON, Markdown and PNG of each run")
    p.add_argument("--append-results", nargs="?", const=RESULTS_FILE, metavar="FILE",
                   help=f"append each run's table to FILE (default {RESULTS_FILE})")
    p.add_argument("--save-outputs", action="store_true", help="also write every system's completions as JSONL")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--steering-specs", type=_ints, default=[],
                   help="also run the engine with N distinct steering vectors (prompt i gets vector i %% N), one row "
                        "per N in a comma list like 1,256, to measure the overhead; with --e2e, engine-run steered "
                        "(cache warm) after its unsteered runs")
    p.add_argument("--steering-layers", type=_ints, default=[4, 8, 12], help="layers those vectors steer")
    p.add_argument("--capture-layers", type=_ints, default=[],
                   help="also run the engine capturing activations at these layers, to measure the overhead")
    p.add_argument("--capture-positions", default="last_prompt", help=f"what that run captures: "
                   f"{', '.join(CAPTURE_POSITIONS)}")
    p.add_argument("--trace", metavar="DIR", help="write the engine cores' loop timelines (core<N>.jsonl: admission, "
                   "launch and wait per step, GC pauses) and each engine run's window (runs.jsonl) to DIR")
    p.add_argument("--e2e", action="store_true",
                   help="time whole commands instead: engine-run, and the batched HF loop as a user's script at each "
                        "batch size, each a fresh process from start to exit, on empty caches (cold) and again (warm); "
                        "with --steering-specs, engine-run steered too (warm), against its plain warm run")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    if args.input is not None and args.workload is not None:
        raise ConfigError("give --workload or --input, not both")
    # Engine settings left out keep BenchConfig's defaults here and engine-run's own under --e2e.
    given = {name: getattr(args, name) for name in ("max_num_seqs", "gpu_memory_fraction")
             if getattr(args, name) is not None}
    return BenchConfig(
        model=args.model, tokenizer=args.tokenizer, device=args.device, devices=args.devices, dtype=args.dtype,
        workloads=args.workload or ([] if args.input else ["short"]), input=args.input, systems=args.systems,
        num_prompts=args.num_prompts, naive_prompts=args.naive_prompts, batch_sizes=args.batch_sizes,
        max_model_len=args.max_model_len, max_new_tokens=args.max_new_tokens, **given,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        sample_hz=args.sample_hz, out=args.out, append_results=args.append_results,
        is_saving_outputs=args.save_outputs, is_quiet=args.quiet, steering_specs=args.steering_specs,
        steering_layers=args.steering_layers, capture_layers=args.capture_layers,
        capture_positions=args.capture_positions,
        trace=args.trace, is_e2e=args.e2e, engine_flags_given=list(given),
    )


def bench_main(argv: list[str] | None = None) -> int:
    args = bench_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        config = config_from_args(args)
        if config.is_e2e:
            from engine_bench.e2e import run_e2e  # it imports this module

            reports = run_e2e(config, shlex.join(["engine-bench", *(sys.argv[1:] if argv is None else argv)]))
        else:
            reports = run_bench(config)
    except (BenchError, ConfigError, ModelNotFound, WorkloadError) as exc:
        print(f"engine-bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("engine-bench: interrupted", file=sys.stderr)
        return 130
    return 1 if any(r["errors"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(bench_main())
