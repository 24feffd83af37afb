"""The steady-state runner: each workload through each system group in its own process, metrics per row."""


from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import sys
from pathlib import Path

import psutil

from engine.models import resolve_device, resolve_dtype, resolve_model
from engine_bench.config import BenchConfig, BenchError
from engine_bench.monitor import GpuMonitor, check_lengths, spawn_group
from engine_bench.report import (agreement, append_results, cpu_card, cpu_name, markdown, no_gpu_metrics, notes,
                                 references, run_stem, system_metrics, versions, work_window, write_outputs)
from engine_bench.systems import run_baselines, run_engine
from engine_bench.workloads import Workload, WorkloadError, load_input, make_workload


def load_workloads(config: BenchConfig, tok, max_positions: int) -> list[Workload]:
    if config.input is not None:
        workloads = [load_input(config.input, tok, config.engine.sampling.max_new_tokens, config.num_prompts)]
    else:
        seed = config.engine.sampling.seed
        workloads = [make_workload(name, tok, config.num_prompts, seed) for name in config.workloads]
    for workload in workloads:
        for p in workload.prompts:
            if p.num_prompt_tokens + p.max_new_tokens > max_positions:
                raise WorkloadError(f"prompt {p.id}: {p.num_prompt_tokens} tokens + {p.max_new_tokens} new exceed the "
                                    f"model's {max_positions} positions; shorten it or lower max_new_tokens")
    return workloads


def run_workload(config: BenchConfig, workload: Workload, gpu: GpuMonitor | None, env: dict) -> tuple[dict, dict]:
    """All chosen systems on one workload -> (report, outputs by system)."""
    # The engine's KV cache is sized by max_model_len; the workload's own longest sequence is the fair size.
    engine = dataclasses.replace(config.engine, max_model_len=config.engine.max_model_len or workload.max_total_tokens)
    config = dataclasses.replace(config, engine=engine)
    groups = [(main, name, config) for main, name, wanted in ((run_baselines, "naive/hf", {"naive", "hf"}),
                                                               (run_engine, "engine", {"engine"}))
              if wanted & set(config.systems)]
    if len(config.engine.devices) > 1 and "engine" in config.systems:  # the scaling ratio needs one card, same run
        engine = dataclasses.replace(config.engine, devices=[], device=config.device)
        one_card = dataclasses.replace(config, engine=engine, steering_specs=[], capture_layers=[],
                                       interventions=[])
        groups.insert(len(groups) - 1, (run_engine, "engine (one card)", one_card))
    for model in config.also_models if "engine" in config.systems else ():
        other = dataclasses.replace(config, engine=dataclasses.replace(config.engine, model=model, trace_dir=None),
                                    also_models=[], steering_specs=[], capture_layers=[], interventions=[],
                                    engine_label=f"engine ({model})")
        groups.append((run_engine, f"engine ({model})", other))
    done: list[dict] = []
    errors: list[dict] = []
    for main, name, child_config in groups:
        try:
            done += spawn_group(main, child_config, workload.prompts, workload.name)
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

    config = config.on_device(resolve_device(config.device))
    source = resolve_model(config.engine.model, config.engine.tokenizer, config.engine.cache_dir)
    workloads = load_workloads(config, load_tokenizer(source.tokenizer_dir), source.max_position_embeddings)
    cards = config.engine.devices or [config.device]  # with --devices, the engine's cards (the baselines use the first)
    gpu = GpuMonitor(cards, config.sample_hz) if config.device.startswith("cuda") else None
    env = {"card": gpu.card(",".join(cards)) if gpu else cpu_card(), "versions": versions(),
           "host": {"cpu": cpu_name(), "num_cpus": psutil.cpu_count()},
           "dtype": str(resolve_dtype(config.engine.dtype, config.device)).removeprefix("torch.")}
    reports = []
    with gpu if gpu is not None else contextlib.nullcontext():
        for workload in workloads:
            report, outputs = run_workload(config, workload, gpu, env)
            stem = run_stem(report, workload.name)
            paths = write_outputs(report, outputs, Path(config.out), stem, config.is_saving_outputs)
            if config.append_results:
                append_results(report, config.append_results)
            print(markdown(report))
            print(f"engine-bench: wrote {', '.join(map(str, paths))}", file=sys.stderr)
            reports.append(report)
    return reports


