"""engine-bench --serve: engine-serve under load, beside engine-run on the same prompts, in the same run.

engine-run first runs the workload's prompts file with --max-num-seqs set to the number of clients (the server can
never have more requests in flight than it has clients, so this is the batch job at the same concurrency), then
with its own default; its generation rate is completion tokens over the time from its engine being ready to its last
result. Then engine-serve starts with the same engine settings, and C clients (asyncio + httpx, spread over a few
processes so the clients are not what limits) each send the prompts in turn as streaming completions, greedy, each
to its full length (ignore_eos), for a warm-up and then the measured window. Output tok/s counts the completion
tokens of the requests that ended inside the window; time to first token is from sending a request to its first
text; inter-token latency is the gap between consecutive text chunks of a request (one chunk per decode step the
server delivers; a chunk can hold more than one token when the server falls behind).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import multiprocessing as mp
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil

from engine.models import resolve_device, resolve_model
from engine_bench.config import BenchConfig, BenchError
from engine_bench.e2e import dtype_name, write_prompts
from engine_bench.monitor import GpuMonitor
from engine_bench.report import append_results, cpu_card, cpu_name, run_stem, versions
from engine_bench.runner import load_workloads

CLIENTS_PER_PROCESS = 16
READY_TIMEOUT_S = 600
TARGET = 0.8  # issue's bar: served output tok/s at least this share of engine-run's at the same concurrency


def engine_flags(config: BenchConfig) -> list[str]:
    """The engine settings both commands get: model, tokenizer, device, dtype, length limit, seed."""
    engine = config.engine
    argv = ["--model", engine.model, "--dtype", dtype_name(config), "--device", config.device,
            "--seed", str(engine.sampling.seed)]
    if engine.tokenizer:
        argv += ["--tokenizer", engine.tokenizer]
    if engine.max_model_len is not None:
        argv += ["--max-model-len", str(engine.max_model_len)]
    return argv


def run_engine_run(config: BenchConfig, prompts: Path, folder: Path, max_num_seqs: int | None) -> dict:
    """engine-run over the prompts: its generation rate (tokens from engine ready to last result) and whole time."""
    folder.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "engine.apps.run", "--input", str(prompts), "--output", str(folder / "results.jsonl"),
            "--ignore-eos", "--force", "--quiet", "--timings", str(folder / "timings.json"), *engine_flags(config)]
    if max_num_seqs is not None:
        argv += ["--max-num-seqs", str(max_num_seqs)]
    started = time.time()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"engine-run failed ({done.returncode}): {done.stderr[-2000:]}")
    stamps = json.loads((folder / "timings.json").read_text())
    tokens = sum(json.loads(line)["num_completion_tokens"]
                 for line in (folder / "results.jsonl").read_text().splitlines() if line.strip())
    window = stamps["last_result"] - stamps["engine_ready"]
    return {"system": "engine-run", "max_num_seqs": max_num_seqs, "completion_tokens": tokens,
            "generation_s": window, "output_tok_s": tokens / window, "whole_s": time.time() - started}


def start_server(config: BenchConfig, folder: Path) -> tuple[subprocess.Popen, str]:
    folder.mkdir(parents=True, exist_ok=True)
    log = (folder / "serve.log").open("w")
    trace = ["--trace", config.engine.trace_dir] if config.engine.trace_dir else []
    proc = subprocess.Popen([sys.executable, "-m", "engine.apps.serve.cli", "--port", "0", *engine_flags(config),
                             *trace], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        line = proc.stderr.readline()
        log.write(line)
        found = re.search(r" at (http://\S+) ", line)
        if found:
            break
        if not line or time.monotonic() > deadline:
            proc.kill()
            raise BenchError(f"engine-serve did not start: see {folder / 'serve.log'}")
    threading.Thread(target=_copy_lines, args=(proc.stderr, log), daemon=True).start()  # the rest of its stderr
    return proc, found.group(1)


def _copy_lines(source, log) -> None:
    for line in source:
        log.write(line)
        log.flush()


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def client_process(url: str, model: str, prompts: list[dict], first: int, count: int, step: int, start: float,
                   end: float) -> list[dict]:
    """`count` clients (client k sends prompts first+k, first+k+step, ...) until `end`; one dict per request."""
    return asyncio.run(_clients(url, model, prompts, first, count, step, start, end))


async def _clients(url, model, prompts, first, count, step, start, end) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        await asyncio.sleep(max(0.0, start - time.time()))
        done = await asyncio.gather(*(_client(http, model, prompts, first + k, step, end) for k in range(count)))
    return [r for requests in done for r in requests]


async def _client(http, model: str, prompts: list[dict], at: int, step: int, end: float) -> list[dict]:
    out = []
    while time.time() < end:
        p = prompts[at % len(prompts)]
        at += step
        body = {"model": model, "prompt": p["prompt"], "max_tokens": p["max_new_tokens"], "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        sent = time.time()
        request = {"sent": sent, "chunks": [], "tokens": 0, "error": None}
        try:
            async with http.stream("POST", "/v1/completions", json=body) as reply:
                if reply.status_code != 200:
                    request["error"] = f"{reply.status_code}: {(await reply.aread())[:200]!r}"
                else:
                    async for line in reply.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        obj = json.loads(line[6:])
                        if obj.get("choices") and obj["choices"][0].get("text"):
                            request["chunks"].append(time.time())
                        if obj.get("usage"):
                            request["tokens"] = obj["usage"]["completion_tokens"]
                        if "error" in obj:
                            request["error"] = obj["error"]["message"]
        except Exception as exc:  # noqa: BLE001 - a failed request is counted, and the load goes on
            request["error"] = f"{type(exc).__name__}: {exc}"
        request["ended"] = time.time()
        out.append(request)
    return out


def _quantile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return 1e3 * ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def load_metrics(requests: list[dict], start: float, end: float) -> dict:
    """Output tok/s over [start, end) (requests that ended inside it), TTFT and ITL quantiles (requests sent inside
    it), errors (all)."""
    ended = [r for r in requests if start <= r["ended"] < end and r["error"] is None]
    sent = [r for r in requests if start <= r["sent"] < end and r["error"] is None and r["chunks"]]
    ttft = [r["chunks"][0] - r["sent"] for r in sent]
    gaps = [b - a for r in sent for a, b in zip(r["chunks"], r["chunks"][1:])]
    per_token = [(r["chunks"][-1] - r["chunks"][0]) / (r["tokens"] - 1) for r in sent if r["tokens"] > 1]
    return {"output_tok_s": sum(r["tokens"] for r in ended) / (end - start), "requests": len(ended),
            "errors": sum(r["error"] is not None for r in requests),
            "first_errors": [r["error"] for r in requests if r["error"] is not None][:3],
            "ttft_p50_ms": _quantile_ms(ttft, 0.5), "ttft_p99_ms": _quantile_ms(ttft, 0.99),
            "itl_p50_ms": _quantile_ms(gaps, 0.5), "itl_p99_ms": _quantile_ms(gaps, 0.99),
            "tpot_mean_ms": 1e3 * sum(per_token) / len(per_token) if per_token else None,
            "chunks_per_token": sum(len(r["chunks"]) for r in sent) / max(1, sum(r["tokens"] for r in sent))}


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the server process and of each of its children, by name."""
    proc = psutil.Process(pid)
    out = {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            times = p.cpu_times()
            name = "server" if p.pid == pid else f"child {p.pid}"
            out[name] = times.user + times.system
        except psutil.Error:
            continue
    return out


def run_load(config: BenchConfig, url: str, prompts: list[dict], server_pid: int) -> dict:
    clients, warmup, seconds = config.serve_clients, config.serve_warmup_s, config.serve_seconds
    num_procs = max(1, math.ceil(clients / CLIENTS_PER_PROCESS))
    start = time.time() + 3.0  # every client process imported and connected before the first request
    measured = start + warmup
    end = measured + seconds
    per = [clients // num_procs + (i < clients % num_procs) for i in range(num_procs)]
    firsts = [sum(per[:i]) for i in range(num_procs)]
    with ProcessPoolExecutor(num_procs, mp_context=mp.get_context("spawn")) as pool:
        jobs = [pool.submit(client_process, url, config.engine.model, prompts, firsts[i], per[i], clients, start,
                            end) for i in range(num_procs)]
        time.sleep(max(0.0, measured - time.time()))
        before = cpu_seconds(server_pid)
        time.sleep(max(0.0, end - time.time()))
        after = cpu_seconds(server_pid)
        requests = [r for job in jobs for r in job.result()]
    # The share of one CPU each process of the server used over the window: the server's own near 100% means its
    # Python threads (the HTTP loop and the hub) are what holds the load back.
    cpu = {name: round(100 * (after[name] - before[name]) / seconds, 1) for name in after if name in before}
    return {"system": "engine-serve", "clients": clients, "client_processes": num_procs, "warmup_s": warmup,
            "window_s": seconds, **load_metrics(requests, measured, end), "cpu_pct": cpu}


def serve_markdown(report: dict) -> str:
    card, v = report["card"], report["versions"]
    served = report["serve"]
    runs = {r["max_num_seqs"]: r for r in report["engine_run"]}
    same = runs[served["clients"]]
    lines = [f"### engine-serve under load: {served['clients']} streaming clients, `{report['workload']['name']}` "
             f"prompts, {report['settings']['model']} ({report['dtype']})",
             "",
             f"{card['name']}, driver {card.get('driver')}, CUDA {card.get('cuda')}; torch {v.get('torch')}, "
             f"transformers {v.get('transformers')}; commit {v.get('commit') or 'uncommitted'}; "
             f"{report['created']}; `{report['command']}`",
             "",
             "| system | output tok/s | vs engine-run at the same concurrency | TTFT p50 / p99 (ms) | "
             "ITL p50 / p99 (ms) | TPOT mean (ms) | requests | errors |",
             "|---|---|---|---|---|---|---|---|"]
    ratio = served["output_tok_s"] / same["output_tok_s"]
    lines.append(f"| engine-serve, {served['clients']} clients, {served['window_s']:.0f} s | "
                 f"{served['output_tok_s']:,.0f} | **{ratio:.2f}×** (target ≥ {TARGET}) | "
                 f"{served['ttft_p50_ms']:.0f} / {served['ttft_p99_ms']:.0f} | "
                 f"{served['itl_p50_ms']:.1f} / {served['itl_p99_ms']:.1f} | {served['tpot_mean_ms']:.1f} | "
                 f"{served['requests']} | {served['errors']} |")
    cpu = ", ".join(f"{name} {pct:.0f}%" for name, pct in served.get("cpu_pct", {}).items())
    for r in report["engine_run"]:
        seqs = r["max_num_seqs"] or "default"
        lines.append(f"| engine-run, --max-num-seqs {seqs} | {r['output_tok_s']:,.0f} | "
                     f"{r['output_tok_s'] / same['output_tok_s']:.2f}× | | | | {report['workload']['num_prompts']} "
                     f"| 0 |")
    lines += ["", f"CPU over the window (share of one core): {cpu}; text chunks per token "
                  f"{served['chunks_per_token']:.2f}."]
    return "\n".join(lines) + "\n"


def run_serve(config: BenchConfig, command: str) -> list[dict]:
    from engine.models import load_tokenizer

    config = config.on_device(resolve_device(config.device))
    source = resolve_model(config.engine.model, config.engine.tokenizer, config.engine.cache_dir)
    workloads = load_workloads(config, load_tokenizer(source.tokenizer_dir), source.max_position_embeddings)
    gpu = GpuMonitor([config.device], config.sample_hz) if config.device.startswith("cuda") else None
    env = {"card": gpu.card(config.device) if gpu else cpu_card(), "versions": versions(),
           "host": {"cpu": cpu_name(), "num_cpus": psutil.cpu_count()}, "dtype": dtype_name(config)}
    reports = []
    for workload in workloads:
        run_dir = Path(config.out) / "serve" / f"{workload.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
        run_dir.mkdir(parents=True, exist_ok=True)
        prompts_file = run_dir / "prompts.jsonl"
        write_prompts(workload, config, prompts_file)
        prompts = [json.loads(line) for line in prompts_file.read_text().splitlines()]
        baselines = [run_engine_run(config, prompts_file, run_dir / f"run-{n or 'default'}", n)
                     for n in (config.serve_clients, None)]
        proc, url = start_server(config, run_dir)
        try:
            served = run_load(config, url, prompts, proc.pid)
        finally:
            code = stop_server(proc)
        report = {"schema": 1, "mode": "serve", "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                  **env, "command": command, "settings": config.to_dict(), "workload": workload.describe(),
                  "engine_run": baselines, "serve": {**served, "server_exit": code}, "run_dir": str(run_dir),
                  "errors": [] if not served["errors"] else [{"systems": "engine-serve",
                                                              "error": f"{served['errors']} failed requests"}]}
        stem = run_stem(report, f"{workload.name}-serve")
        out = Path(config.out)
        (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / f"{stem}.md").write_text(serve_markdown(report))
        if config.append_results:
            append_results(report, config.append_results, render=serve_markdown)
        print(serve_markdown(report))
        reports.append(report)
    return reports
