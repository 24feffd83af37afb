"""Soak test of engine-sweep (not in CI): a sweep over two tiny random models, killed at random and resumed for
--minutes, then checked.

Each round starts `engine-sweep` in its own process group and ends it after a random time with one of: SIGKILL of
the whole group (power loss / OOM killer), SIGINT (Ctrl-C), SIGTERM; or lets it finish. Whenever the sweep has
finished, its records are checked and the sweep is grown by one sample per prompt (`--extend`), so the soak never
runs out of work. At the end the sweep is run to completion and checked once more:
  - every line of results.jsonl is valid JSON, no id appears twice, the ids are exactly the plan's, each with the
    plan's seed and the full number of tokens;
  - status.json says done, summary.csv counts every record.
One JSON result goes to benchmarks/results/soak-sweep-<time>.json; the exit status is 0 only if every check held.

    python benchmarks/soak_sweep.py --minutes 30
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.apps.sweep.plan import Plan  # noqa: E402 - after the path insert, so it runs from a checkout
from engine.apps.sweep.spec import load_sweep  # noqa: E402

SWEEP = """\
output = "out"
seed = {seed}
samples = {samples}
models = [{{model = "random:tiny", label = "gemma"}}, {{model = "random:tiny-llama", label = "llama"}}]
prompts = ["prompts.jsonl"]

[vectors]
v = "v.npy"

[grid]
vectors = ["v"]
layers = [0, [1, 3]]
coefs = [-4, 4, 8]
positions = ["all", "generated"]
baseline = true

[generation]
max_new_tokens = 12
temperature = 0.9
top_p = 0.95
ignore_eos = true

[engine]
device = "cpu"
max_num_seqs = 8

[[metrics]]
name = "vowels"
regex = "[aeiou]{{3}}"
"""
ENDINGS = ("SIGKILL", "SIGKILL", "SIGKILL", "SIGINT", "SIGTERM", "finish")


def make_sweep(folder: Path, seed: int, samples: int) -> Path:
    rng = np.random.default_rng(seed)
    np.save(folder / "v.npy", rng.standard_normal(64).astype(np.float32))
    words = "the a river moon quiet engine steering vector model token sample night morning".split()
    with (folder / "prompts.jsonl").open("w") as f:
        for i in range(12):
            f.write(json.dumps({"id": f"p{i}", "prompt": " ".join(rng.choice(words, size=3 + i % 9))}) + "\n")
    path = folder / "sweep.toml"
    path.write_text(SWEEP.format(seed=seed, samples=samples))
    return path


def run_round(path: Path, extend: bool, ending: str, seconds: float) -> dict:
    """Start the sweep; end it as `ending` says after `seconds` (or let it finish); what happened."""
    command = [sys.executable, "-m", "engine.apps.sweep.cli", str(path)] + (["--extend"] if extend else [])
    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        proc.wait(timeout=None if ending == "finish" else seconds)
    except subprocess.TimeoutExpired:
        if ending == "SIGKILL":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(getattr(signal, ending))
    _, stderr = proc.communicate(timeout=600)
    return {"ending": ending, "after_s": round(time.monotonic() - started, 1), "returncode": proc.returncode,
            "stderr_tail": stderr.strip().splitlines()[-1:] if stderr.strip() else []}


def check(path: Path) -> list[str]:
    """What is wrong with a finished sweep's output (empty: nothing)."""
    plan = Plan(load_sweep(path))
    expected = {r["id"]: r["seed"] for m in plan.config.models for _, r in plan.requests(m)}
    out, problems, ids = path.parent / "out", [], []
    for number, raw in enumerate((out / "results.jsonl").read_bytes().split(b"\n")[:-1], 1):
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            problems.append(f"results.jsonl line {number} is not valid JSON")
            continue
        ids.append(record["id"])
        if expected.get(record["id"]) != record["seed"] or record["num_completion_tokens"] != 12:
            problems.append(f"{record['id']}: seed or length differs from the plan")
    if len(ids) != len(set(ids)):
        problems.append(f"{len(ids) - len(set(ids))} duplicated ids")
    if set(ids) != set(expected):
        problems.append(f"{len(set(expected) - set(ids))} ids missing, {len(set(ids) - set(expected))} unexpected")
    status = json.loads((out / "status.json").read_text())
    if status["state"] != "done" or status["done"] != len(expected):
        problems.append(f"status.json: {status['state']}, {status['done']} of {len(expected)}")
    with (out / "summary.csv").open() as f:
        counted = sum(int(row["num_records"]) for row in csv.DictReader(f))
    if counted != len(expected):
        problems.append(f"summary.csv counts {counted} records, the plan has {len(expected)}")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0, help="seeds the kill schedule and the sweep")
    p.add_argument("--max-round-s", type=float, default=90.0, help="longest time before a round is ended")
    p.add_argument("--dir", help="work directory (default: a new temporary one, kept)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="soak-sweep-"))
    folder.mkdir(parents=True, exist_ok=True)
    samples = 1
    path = make_sweep(folder, args.seed, samples)
    deadline, rounds, checks, extend = time.monotonic() + args.minutes * 60, [], [], False
    while time.monotonic() < deadline:
        ending = rng.choice(ENDINGS)
        result = run_round(path, extend, ending, rng.uniform(1.0, args.max_round_s))
        rounds.append(result)
        print(json.dumps(result), flush=True)
        extend = False
        if result["returncode"] == 0:  # finished: check, then grow the sweep so the next round has work
            checks.append({"samples": samples, "problems": check(path)})
            print(json.dumps(checks[-1]), flush=True)
            samples += 1
            path.write_text(path.read_text().replace(f"samples = {samples - 1}", f"samples = {samples}"))
            extend = True
    final = run_round(path, extend, "finish", 0)
    rounds.append(final)
    print(json.dumps(final), flush=True)
    checks.append({"samples": samples, "problems": check(path) if final["returncode"] == 0 else ["final run failed"]})
    problems = [p for c in checks for p in c["problems"]]
    # 130: drained after SIGINT / SIGTERM; -2 / -15: the signal came before Python installed any handler.
    unexpected = [r for r in rounds if r["returncode"] not in (0, 130, -9, -2, -15)]
    result = {"benchmark": "soak_sweep", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "minutes": args.minutes, "seed": args.seed, "dir": str(folder), "num_rounds": len(rounds),
              "endings": {e: sum(r["ending"] == e for r in rounds) for e in set(ENDINGS)},
              "num_records": sum(1 for _ in (folder / "out" / "results.jsonl").open()), "checks": checks,
              "unexpected_exits": unexpected, "is_ok": not problems and not unexpected}
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    target = results / f"soak-sweep-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}.json"
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"soak: {'OK' if result['is_ok'] else 'FAILED'}; {len(rounds)} rounds, {result['num_records']} records; "
          f"{target}")
    return 0 if result["is_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
