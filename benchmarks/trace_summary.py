"""Summarise an `engine-bench --trace DIR` folder: per engine run, where the core loop's host time went.

    python benchmarks/trace_summary.py DIR [--bins 0.1] [--top 8]

For each run (runs.jsonl) over its first-work..last-work window: host milliseconds in admission, step launch (by
kind), waiting on the GPU and reading tokens, GC pauses; the share of steps where the host found the previous step
already done (wait < 0.05 ms: the GPU may have idled, waiting on the host); the longest iterations; and a timeline
in bins (admitted requests, host ms, wait ms per bin).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

HOST_BOUND_WAIT_MS = 0.05


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def host_ms(e: dict) -> float:
    return e.get("admit_ms", 0) + e.get("launch_ms", 0) + e.get("read_ms", 0)


def summarise(run: dict, events: list[dict], bins: float, top: int) -> str:
    start, end = run["first_work"] - 0.1, run["last_work"]
    inside = [e for e in events if start <= e["at"] <= end]
    steps = [e for e in inside if "step" in e]
    gcs = [e for e in inside if "gc" in e]
    wall = 1e3 * (end - run["first_work"])
    launch = defaultdict(float)
    for e in steps:
        launch[e["step"]] += e.get("launch_ms", 0)
    waited = [e for e in steps if "wait_ms" in e]
    host_bound = [e for e in waited if e["wait_ms"] < HOST_BOUND_WAIT_MS]
    lines = [f"## {run['system']} ({run['prompts']} prompts): {wall:.0f} ms window, {len(steps)} iterations",
             f"admission {sum(e['admit_ms'] for e in steps):.1f} ms ({sum(e['admitted'] for e in steps)} requests); "
             + "; ".join(f"launch {k} {v:.1f} ms" for k, v in sorted(launch.items()))
             + f"; wait {sum(e['wait_ms'] for e in waited):.1f} ms"
             + f"; read {sum(e.get('read_ms', 0) for e in steps):.1f} ms; "
             f"GC {sum(e['ms'] for e in gcs):.1f} ms in {len(gcs)} pauses "
             f"(gen 2: {sum(1 for e in gcs if e['gc'] == 2)})",
             f"steps that found the previous one done (host-bound): {len(host_bound)}/{len(waited)}, "
             f"their host time {sum(host_ms(e) for e in host_bound):.1f} ms",
             "longest iterations (host ms = admit + launch + read):"]
    for e in sorted(steps, key=host_ms, reverse=True)[:top]:
        lines.append(f"  +{1e3 * (e['at'] - run['first_work']):7.1f} ms  host {host_ms(e):6.2f}  "
                     f"admit {e['admit_ms']:6.2f} "
                     f"({e['admitted']})  {e['step']} {e.get('size', '')}  launch {e.get('launch_ms', 0):6.2f}  "
                     f"wait {e.get('wait_ms', 0):6.2f}")
    for e in sorted(gcs, key=lambda g: g["ms"], reverse=True)[:3]:
        lines.append(f"  GC gen {e['gc']} at +{1e3 * (e['at'] - run['first_work']):.1f} ms: {e['ms']:.2f} ms")
    lines.append(f"timeline ({bins * 1e3:.0f} ms bins): admitted / host ms / wait ms / steps")
    binned: dict[int, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0])
    for e in steps:
        b = binned[int((e["at"] - run["first_work"]) // bins)]
        b[0] += e["admitted"]
        b[1] += host_ms(e)
        b[2] += e.get("wait_ms", 0)
        b[3] += 1
    for k in sorted(binned):
        a, h, w, n = binned[k]
        lines.append(f"  {k * bins:5.2f}s  {a:4d}  {h:7.1f}  {w:7.1f}  {n:4d}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--bins", type=float, default=0.1)
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    folder = Path(args.folder)
    events = [e for path in sorted(folder.glob("core*.jsonl")) for e in read(path)]
    for run in read(folder / "runs.jsonl"):
        print(summarise(run, events, args.bins, args.top) + "\n")


if __name__ == "__main__":
    main()
