"""Peak memory of the resume/skip bookkeeping (no model): how much a run holds for the ids already done.

Writes a results file of --num-done synthetic records (sweep-shaped ids, every other one pointing at an activation
shard, with the shard index beside it) and an input of --num-done + --num-new records (the done ones first). Then,
in a fresh process, runs what a resumed engine-run / engine-sweep runs before and while it feeds the engine:
scan_done_ids on the results, JsonlWriter's start (which recovers the activation index), and read_requests over the
whole input (skipping the done ids, checking the new ones for duplicates). It reports the peak RSS above the RSS
after the imports, and the seconds each step took. One JSON result goes to benchmarks/results/resume-memory-<time>.json.

    python benchmarks/resume_memory.py --num-done 1000000 --num-new 1000000
    python benchmarks/resume_memory.py --code /tmp/old   # the engine of a worktree of an older commit
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def request_id(i: int) -> str:
    return f"gemma3-270m/joy@L{4 + i % 3}*{i % 5 * 2.0}/prompts/prompt-{i // 15:07d}/s{i % 2}"


def write_inputs(folder: Path, num_done: int, num_new: int) -> tuple[Path, Path]:
    results, source = folder / "results.jsonl", folder / "prompts.jsonl"
    shards = folder / "results.activations"
    shards.mkdir()
    with results.open("w") as out, (shards / "index.jsonl").open("w") as index:
        for i in range(num_done):
            record = {"id": request_id(i), "completion": "a short completion", "finish_reason": "length",
                      "num_prompt_tokens": 12, "num_completion_tokens": 4, "seed": i, "steering": None}
            if i % 2 == 0:
                pointer = {"shard": f"results.activations/{i // 10_000:05d}.safetensors",
                           "keys": [f"{record['id']}/layer.6"], "layers": [6], "positions": "last_prompt",
                           "dtype": "float32", "is_before_steering": False}
                record["activations"] = pointer
                index.write(json.dumps({"id": record["id"], **pointer}) + "\n")
            out.write(json.dumps(record) + "\n")
    with source.open("w") as f:
        for i in range(num_done + num_new):
            f.write(json.dumps({"id": request_id(i), "prompt": "Tell me about the weather today."}) + "\n")
    return results, source


def use_code(folder: str) -> None:
    """Import `engine` from `folder` instead of the installed (editable) package."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
    sys.path.insert(0, folder)


def measure(results: Path, source: Path) -> dict:
    """In this (fresh) process: the bookkeeping steps, their times and the peak RSS above the post-import RSS."""
    from engine.apps.run import input_lines
    from engine.config import EngineConfig
    from engine.engine import read_requests
    from engine.pipeline.writer import JsonlWriter, scan_done_ids

    import engine

    base_kb = _rss_kb()
    figures: dict = {"engine": str(Path(engine.__file__).parent), "rss_after_imports_mb": round(base_kb / 1024, 1)}

    def step(name: str, started: float) -> None:
        figures[f"{name}_s"] = round(time.perf_counter() - started, 2)
        figures[f"peak_above_imports_after_{name}_mb"] = round((_peak_kb() - base_kb) / 1024, 1)

    started = time.perf_counter()
    done = scan_done_ids(results)
    step("scan_done_ids", started)
    started = time.perf_counter()
    resumes_from_done = "done" in inspect.signature(JsonlWriter).parameters  # as engine-run does, where it can
    writer = JsonlWriter(results, {"version": 1}, ordered=False, **({"done": done} if resumes_from_done else {}))
    step("writer_start", started)
    started = time.perf_counter()
    num_new = num_errors = 0
    for item in read_requests(input_lines(source), EngineConfig(), done):
        if isinstance(item, dict):
            num_errors += 1
        else:
            num_new += 1
    step("read_requests", started)
    writer.close()
    figures |= {"num_done": len(done), "num_fed": num_new, "num_errors": num_errors,
                "peak_rss_mb": round(_peak_kb() / 1024, 1),
                "peak_above_imports_mb": round((_peak_kb() - base_kb) / 1024, 1)}
    return figures


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status (this script needs Linux)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-done", type=int, default=1_000_000, help="records already in the results file")
    p.add_argument("--num-new", type=int, default=1_000_000, help="input records not done yet")
    p.add_argument("--label", default="", help="a note for the JSON result, e.g. the commit measured")
    p.add_argument("--code", help="a checkout whose engine package to measure (default: the installed one)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--child", nargs=2, metavar=("RESULTS", "SOURCE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.code:
            use_code(args.code)
        print(json.dumps(measure(Path(args.child[0]), Path(args.child[1]))))
        return 0
    with tempfile.TemporaryDirectory(prefix="resume-memory-") as tmp:
        results, source = write_inputs(Path(tmp), args.num_done, args.num_new)
        code = ["--code", args.code] if args.code else []
        child = subprocess.run([sys.executable, __file__, "--child", str(results), str(source), *code],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return 1
        figures = json.loads(child.stdout.strip().splitlines()[-1])
    result = {"benchmark": "resume_memory", "label": args.label, "code": args.code or str(ROOT),
              "when": datetime.now(timezone.utc).isoformat(),
              "args": {"num_done": args.num_done, "num_new": args.num_new}, **figures}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"resume-memory-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
