"""The child side of engine-bench: one process per system group (the baselines, the engine), each timing its
runs and sending rows to the parent."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import psutil

from engine.models import ModelSource, hidden_size, resolve_dtype, resolve_model
from engine.procs import MsgQueue
from engine_bench.config import MAX_WARMUP_TOKENS, NUM_WARMUP_PROMPTS, BenchConfig, BenchError
from engine_bench.interventions import intervention_records
from engine_bench.lora import NAME as LORA_NAME, lora_rows, write_random_lora
from engine_bench.messages import ChildExit, Progress, SystemDone, SystemStarted
from engine_bench.workloads import Prompt, prompts_from_msg


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
        self.events.put(SystemStarted(self.system, self.num_prompts))

    def on_result(self, num: int) -> None:
        if self.first_result_at is None:
            self.first_result_at = time.monotonic()
        self.events.put(Progress(num))

    def stop(self) -> float:
        self.ended = time.monotonic()
        self.cpu_s = tree_cpu_seconds() - self.cpu_s
        return self.ended

    def report(self, token_ids: list[list[int]], texts: list[str], num_generated_tokens: int, **extra) -> None:
        self.events.put(SystemDone({
            "system": self.system, "start": self.started, "end": self.ended,
            "first_result": self.first_result_at, "cpu_s": self.cpu_s, "token_ids": token_ids, "texts": texts,
            "num_generated_tokens": num_generated_tokens, **extra,
        }))


def _warmup(prompts: list[Prompt]) -> list[Prompt]:
    """A few short generations first, so CUDA start-up and kernel selection stay out of the timed window."""
    return [dataclasses.replace(p, id=f"warmup-{p.id}", max_new_tokens=min(p.max_new_tokens, MAX_WARMUP_TOKENS))
            for p in prompts[:NUM_WARMUP_PROMPTS]]


def run_baselines(config_msg: dict, prompts_msg: list[dict], events: MsgQueue) -> None:
    """Child: the naive loop on its subset, then the batched HF loop at each batch size, one model load."""
    import torch

    from engine_bench.baselines import batched_loop, load_hf, naive_loop

    config = BenchConfig.from_dict(config_msg)
    prompts = prompts_from_msg(prompts_msg)
    started = time.monotonic()
    source = resolve_model(config.engine.model, config.engine.tokenizer, config.engine.cache_dir)
    model, tok, attn = load_hf(source, resolve_dtype(config.engine.dtype, config.device), config.device)
    load_s = time.monotonic() - started
    sampling = config.engine.sampling
    runs = []
    if "naive" in config.systems:
        runs.append(("naive", prompts[:config.naive_prompts], lambda ps, cb: naive_loop(model, tok, ps, sampling, cb)))
    if "hf" in config.systems:
        runs += [(f"hf-b{b}", prompts, lambda ps, cb, b=b: batched_loop(model, tok, ps, b, sampling, cb))
                 for b in config.batch_sizes]
    for system, subset, loop in runs:
        loop(_warmup(subset), lambda n: None)
        torch.manual_seed(sampling.seed)
        reporter = PhaseReporter(events, system, len(subset))
        reporter.start()
        out = loop(subset, reporter.on_result)  # ends in .tolist(), so the device is done when it returns
        reporter.stop()
        reporter.report(out.token_ids, out.texts, out.num_generated_tokens, startup_s=load_s, attn=attn)
        if config.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the next system's memory peak starts from the model alone
    events.put(ChildExit())


def _engine_records(prompts: list[Prompt]) -> list[dict]:
    return [{"id": p.id, "prompt": p.text, "max_new_tokens": p.max_new_tokens, "ignore_eos": True} for p in prompts]


def _core_idle(engine) -> tuple[float, float]:
    """(the core's cumulative idle seconds, when it answered)."""
    return engine.stats()["idle_s"], time.monotonic()


def run_engine(config_msg: dict, prompts_msg: list[dict], events: MsgQueue) -> None:
    """Child: the engine over all prompts (and again under steering if asked); its ring-empty share comes from
    the core's idle time."""
    from engine.engine import Engine

    config = BenchConfig.from_dict(config_msg)
    prompts = prompts_from_msg(prompts_msg)
    base = config.engine_label if len(config.engine.devices) < 2 else f"engine-{len(config.engine.devices)}dev"
    with tempfile.TemporaryDirectory() as folder:
        with Engine(config.engine) as engine:
            _engine_rows(engine, config, base, prompts, Path(folder), events)
        if config.lora_rank:  # a second engine, the adapter loaded (the first has ended: one on the card at a time)
            adapter = write_random_lora(resolve_model(config.engine.model, config.engine.tokenizer,
                                                      config.engine.cache_dir), config.lora_rank,
                                        Path(folder) / "lora", config.engine.sampling.seed)
            with Engine(dataclasses.replace(config.engine, adapters={LORA_NAME: str(adapter)})) as engine:
                for system, records in lora_rows(base, config.lora_rank, _engine_records(prompts)):
                    _timed_engine_run(engine, system, records[:NUM_WARMUP_PROMPTS], records, events, prompts,
                                      max(1, len(config.engine.devices)))
    events.put(ChildExit())


def _engine_rows(engine, config: BenchConfig, base: str, prompts: list[Prompt], folder: Path,
                 events: MsgQueue) -> None:
    """The plain row, then a row per steering count, intervention and capture, on one engine."""
    runs = [(base, _engine_records(prompts))]
    layers = ",".join(map(str, config.steering_layers))
    for count in config.steering_specs:
        specs = random_steering_specs(engine.source, config, count, folder)
        steered = [{**r, "steering": specs[i % len(specs)]} for i, r in enumerate(_engine_records(prompts))]
        runs.append((f"{base}+steer{count}@L{layers}", steered))
    for name in config.interventions:
        runs.append((f"{base}+{name}", intervention_records(name, _engine_records(prompts), hidden_size(
            engine.source), config.steering_layers, config.engine.sampling.seed, folder)))
    if config.capture_layers:
        capture = {"layers": config.capture_layers, "positions": config.capture_positions}
        runs.append((f"{base}+capture@L{','.join(map(str, config.capture_layers))}:{config.capture_positions}",
                     [{**r, "capture": capture} for r in _engine_records(prompts)]))
    for system, records in runs:
        window = _timed_engine_run(engine, system, records[:NUM_WARMUP_PROMPTS], records, events, prompts,
                                   max(1, len(config.engine.devices)))
        if config.engine.trace_dir:
            with (Path(config.engine.trace_dir) / "runs.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps({"system": system, "prompts": len(records), "first_work": window[0],
                                    "last_work": window[1]}) + "\n")


def random_steering_specs(source: ModelSource, config: BenchConfig, count: int, folder: Path) -> list[dict]:
    """`count` distinct random unit-scale vectors for the source's model, one file each in folder, as record
    `steering` specs on the configured layers (seeded: the same vectors every run)."""
    import numpy as np

    hidden = hidden_size(source)
    rng = np.random.default_rng(config.engine.sampling.seed)
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


