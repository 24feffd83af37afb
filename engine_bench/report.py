"""What an engine-bench run reports: per-system metrics, agreement of completions, the environment, and the
JSON, Markdown table and PNG chart that carry them."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

from engine_bench.workloads import Workload

GIB = float(1 << 30)


def no_gpu_metrics() -> dict:
    """The GPU columns of a run without a GPU (or a window too short for a sample): n/a, never zero."""
    return {"gpu_util_mean_pct": None, "gpu_util_above_90_share": None, "gpu_mem_peak_gib": None,
            "gpu_samples": 0, "gpu_sample_hz": None, "gpu_util_samples": []}


def work_window(done: dict) -> tuple[float, float]:
    """The span GPU utilisation and ring-empty are measured over: the engine's first to last token (its core's
    first work to its last sequence's end), the whole timed run for the baselines."""
    return done.get("first_work", done["start"]), done.get("last_work", done["end"])


def system_metrics(done: dict, workload: Workload, gpu_metrics: dict) -> dict:
    """One system's metrics from its 'done' message and the GPU samples of its window; a subset run (the naive
    loop) is extrapolated to the workload by output tokens."""
    num_prompts, num_run = len(workload.prompts), len(done["token_ids"])
    measured = done["end"] - done["start"]
    tokens_run = sum(len(ids) for ids in done["token_ids"])
    wall = measured * workload.num_output_tokens / tokens_run
    ring_empty = done.get("ring_empty_s")
    window_start, window_end = work_window(done)
    return {
        "system": done["system"], "num_prompts": num_prompts, "num_prompts_run": num_run,
        "is_extrapolated": num_run < num_prompts, "wall_s": wall, "measured_wall_s": measured,
        "num_output_tokens_run": tokens_run, "num_generated_tokens": done["num_generated_tokens"],
        "output_tokens_per_s": tokens_run / measured, "prompts_per_s": num_prompts / wall,
        "s_per_1k_prompts": 1000 * wall / num_prompts,
        "time_to_first_result_s": done["first_result"] - done["start"],
        "cpu_util_pct": 100 * done["cpu_s"] / measured,
        "ring_empty_share": None if ring_empty is None else ring_empty / (window_end - window_start),
        "first_work_s": done["first_work"] - done["start"] if "first_work" in done else None,
        "last_result_after_last_work_s": done["end"] - done["last_work"] if "last_work" in done else None,
        "startup_s": done["startup_s"], "attn_implementation": done["attn"],
        **_torch_peaks(done.get("torch_peaks")),
        **gpu_metrics,
    }


def _torch_peaks(peaks: tuple | None) -> dict:
    """The engine core's allocator peaks since its start (warm-up included), beside NVML's card-wide figure."""
    allocated, reserved = peaks or (None, None)
    return {"torch_allocated_peak_gib": None if allocated is None else allocated / GIB,
            "torch_reserved_peak_gib": None if reserved is None else reserved / GIB}


def gpu_metrics(samples: list[tuple[float, int, int]], start: float, end: float) -> dict:
    """GPU columns from NVML samples (time, utilisation %, memory used bytes) taken between start and end."""
    inside = [s for s in samples if start <= s[0] <= end]
    if not inside:
        return no_gpu_metrics()
    utils = [u for _, u, _ in inside]
    span = inside[-1][0] - inside[0][0]
    return {
        "gpu_util_mean_pct": sum(utils) / len(utils),
        "gpu_util_above_90_share": sum(u > 90 for u in utils) / len(utils),
        "gpu_mem_peak_gib": max(m for _, _, m in inside) / GIB,
        "gpu_samples": len(inside),
        "gpu_sample_hz": (len(inside) - 1) / span if span > 0 else None,
        "gpu_util_samples": utils,
    }


def references(done: list[dict], num_prompts: int) -> list[str]:
    """Systems to compare completions with: the first one run (the naive loop, often on a subset), and the first
    that ran every prompt, so the rest are also compared over the whole workload."""
    full = next((d["system"] for d in done if len(d["token_ids"]) == num_prompts), done[0]["system"])
    return list(dict.fromkeys([done[0]["system"], full]))


def agreement(outputs: dict[str, list[list[int]]], reference: str) -> dict[str, dict]:
    """Per system: over the prompts both ran, how many token sequences equal the reference's, and the mean
    share of each sequence before the first difference."""
    ref = outputs[reference]
    result = {}
    for system, rows in outputs.items():
        pairs = list(zip(rows, ref))
        prefix = [_common_prefix(a, b) / max(len(b), 1) for a, b in pairs]
        result[system] = {"reference": reference, "num_compared": len(pairs),
                          "num_identical": sum(a == b for a, b in pairs),
                          "mean_prefix_share": sum(prefix) / len(prefix)}
    return result


def _common_prefix(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


# ---------------------------------------------------------------- environment and report


def cpu_card() -> dict:
    """The 'card' of a CPU run: named, and the GPU fields n/a."""
    return {"name": f"CPU: {cpu_name()}", "driver": None, "cuda": None, "memory_gib": None,
            "memory_used_before_gib": None}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The checkout's commit; ENGINE_BENCH_COMMIT names it for a tree copied without its git metadata."""
    if os.environ.get("ENGINE_BENCH_COMMIT"):
        return os.environ["ENGINE_BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict:
    import torch
    import transformers

    try:
        engine_version = metadata.version("steer-engine")
    except metadata.PackageNotFoundError:
        engine_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "engine": engine_version, "commit": _git_commit()}


def fmt(value, digits: int = 1, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:,.{digits}f}"


COLUMNS = ("system", "prompts run", "wall s", "output tok/s", "prompts/s", "s per 1k prompts", "first result s",
           "GPU util %", "GPU >90%", "GPU mem peak GiB", "CPU %", "ring empty %")


def _row(m: dict, agreements: dict[str, dict]) -> list[str]:
    run = f"{m['num_prompts_run']} of {m['num_prompts']}*" if m["is_extrapolated"] else str(m["num_prompts_run"])
    same = ["ref" if ref == m["system"] else f"{a[m['system']]['num_identical']}/{a[m['system']]['num_compared']}"
            for ref, a in agreements.items()]
    return [m["system"], run, fmt(m["wall_s"]), fmt(m["output_tokens_per_s"], 0), fmt(m["prompts_per_s"], 2),
            fmt(m["s_per_1k_prompts"]), fmt(m["time_to_first_result_s"], 2), fmt(m["gpu_util_mean_pct"]),
            fmt(m["gpu_util_above_90_share"], 0, 100), fmt(m["gpu_mem_peak_gib"], 2), fmt(m["cpu_util_pct"], 0),
            fmt(m["ring_empty_share"], 1, 100), *same]


def markdown(report: dict) -> str:
    """The run as a Markdown section: heading with card and date, settings line, table, notes."""
    card, ver, s, w = report["card"], report["versions"], report["settings"], report["workload"]
    columns = [*COLUMNS, *(f"same ids as {ref}" for ref in report["agreement"])]
    sampling = ("greedy" if s["temperature"] == 0
                else f"temperature {s['temperature']}, top-p {s['top_p']}, top-k {s['top_k']}")
    attn = next((m["attn_implementation"] for m in report["systems"] if not m["system"].startswith("engine")), "n/a")
    engine = f"engine {ver['engine']}" if ver["engine"] else "engine"
    lines = [
        f"### {w['name']} · {card['name']} · {report['created'][:10]}", "",
        f"`{s['model']}` {report['dtype']} on {card['name']} (driver {card['driver'] or 'n/a'}, CUDA "
        f"{card['cuda'] or 'n/a'}); torch {ver['torch']}, transformers {ver['transformers']}, {engine}"
        f" at commit {ver['commit'] or 'n/a (no git)'}.",
        f"Workload {w['name']}: {w['num_prompts']} prompts of {span(w['prompt_tokens'])} tokens, "
        f"{span(w['new_tokens'])} new tokens each (exact, EOS ignored), {w['num_output_tokens']:,} output tokens; "
        f"{sampling}; HF attention {attn}, batch sizes {', '.join(map(str, s['batch_sizes']))}; engine max_num_seqs "
        f"{s['max_num_seqs']}, max_model_len {s['max_model_len']}, "
        f"gpu_memory_fraction {s.get('gpu_memory_fraction', 0.9)}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|---|" + "---:|" * (len(columns) - 1),
    ]
    for m in report["systems"]:
        lines.append("| " + " | ".join(_row(m, report["agreement"])) + " |")
    lines += [""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def span(spread: dict) -> str:
    if spread["min"] == spread["max"]:
        return str(spread["min"])
    return f"{spread['min']}–{spread['max']} (mean {spread['mean']})"


def notes(report: dict) -> list[str]:
    out = [f"**{e['systems']} failed** and has no row: {e['error'].splitlines()[0]}" for e in report["errors"]]
    for m in report["systems"]:
        if m["is_extrapolated"]:
            out.append(f"\\* {m['system']} ran the first {m['num_prompts_run']} of {m['num_prompts']} prompts; its "
                       "wall time, prompts/s and s per 1k prompts are extrapolated by output tokens (measured tok/s "
                       "over all the workload's tokens).")
    out += [
        "Wall time is the timed run after model load and a short warm-up; start-up (load, process spawn) is in the "
        "JSON as startup_s.",
        f"CPU % sums all of a system's processes (100 = one core; this host has {report['host']['num_cpus']}).",
        "GPU util is NVML utilization.gpu (share of time a kernel ran, over the driver's sample period), sampled "
        f"at {report['settings']['sample_hz']:g} Hz; GPU mem is the card's used memory (NVML), peak in the window. "
        "For the engine the window runs from when its core first had work (the first prompts tokenized and "
        "admitted; the time to that is first_work_s in the JSON) to when its last sequence finished (the last texts "
        "are decoded and delivered after that: last_result_after_last_work_s).",
        "Ring empty: share of that window in which the engine's core had no sequence to run and waited for "
        "tokenized prompts (the core's idle_s).",
    ]
    rates = {m["system"]: m["output_tokens_per_s"] for m in report["systems"]}
    for system, rate in rates.items():  # steered, capturing and intervention rows against their plain engine row
        base = system.split("+")[0]
        if "+" in system and rates.get(base):
            out.append(f"{system}: {rate / rates[base]:.2f}x {base}'s output tok/s, same run.")
    devices = report["settings"].get("devices") or []
    if len(devices) > 1:  # old reports have no devices setting
        out.append(f"engine-{len(devices)}dev ran one engine core per device on {len(devices)} devices "
                   f"({', '.join(devices)}); engine and the naive and HF loops ran on {report['settings']['device']} "
                   f"alone, in the same run. For engine-{len(devices)}dev GPU util is the devices' mean, GPU mem their "
                   "sum, and ring empty a core's idle share averaged over the cores.")
    if report["agreement"]:
        out.append("Same ids as X: greedy completions token for token equal to X's, over the prompts both ran "
                   "(batching reorders floating-point sums, so bf16 runs may differ after some tokens).")
    return out


def write_chart(report: dict, path: Path) -> None:
    """Throughput and GPU utilisation per system, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = [m["system"] for m in report["systems"]]
    rates = [m["output_tokens_per_s"] for m in report["systems"]]
    utils = [m["gpu_util_mean_pct"] for m in report["systems"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.6 * len(systems) + 2.2))
    left.barh(systems, rates, color="#3b6ea8")
    is_log = max(rates) > 20 * min(rates)  # the naive loop is often ~100x slower than the rest
    if is_log:
        left.set_xscale("log")
    left.set_xlabel("output tokens/s" + (" (log scale)" if is_log else ""))
    for y, rate in enumerate(rates):
        left.text(rate, y, f" {rate:,.0f}", va="center")
    right.barh(systems, [u or 0 for u in utils], color="#5a9e5a")
    right.set_xlim(0, 100)
    right.set_xlabel("GPU utilisation, mean %")
    for y, util in enumerate(utils):
        right.text(util or 0, y, " n/a (no GPU)" if util is None else f" {util:.0f}", va="center")
    for axis in (left, right):
        axis.invert_yaxis()
    fig.suptitle(f"{report['workload']['name']}: {report['settings']['model']} on {report['card']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_stem(report: dict, name: str) -> str:
    """A run's file name without suffix: `name` (the workload, `-e2e` for whole commands), the card, the commit and
    the time, e.g. long-e2e-h200-d1eb2ab-20261201-190945, so a results folder says what each file measured."""
    card = re.sub(r"[^a-z0-9]+", "-", report["card"]["name"].lower().replace("nvidia ", "")).strip("-") or "card"
    commit = report.get("versions", {}).get("commit") or "uncommitted"
    return f"{name}-{card}-{commit}-{dt.datetime.now():%Y%m%d-%H%M%S}"


def write_outputs(report: dict, outputs: dict[str, dict], out_dir: Path, stem: str, is_saving: bool,
                  render=markdown, chart=write_chart) -> list[Path]:
    """The JSON, Markdown and PNG of one run (and the completions with --save-outputs); returns the paths. render and
    chart draw the Markdown and the PNG (the steady-state rows' by default; --e2e passes its own)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(render(report))
    chart(report, paths[2])
    if is_saving:
        paths.append(out_dir / f"{stem}-outputs.jsonl")
        with paths[-1].open("w") as f:
            for system, done in outputs.items():
                for prompt_id, ids, text in zip(done["prompt_ids"], done["token_ids"], done["texts"]):
                    f.write(json.dumps({"system": system, "id": prompt_id, "completion": text,
                                        "completion_token_ids": ids}) + "\n")
    return paths


def append_results(report: dict, path: str, render=markdown) -> None:
    with Path(path).open("a") as f:
        f.write("\n" + render(report))
