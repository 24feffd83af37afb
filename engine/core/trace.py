"""The core loop's timeline, for finding where host time goes (`EngineConfig.trace_dir`, engine-bench --trace).

One JSON line per loop iteration that admitted requests or ran a step, and one per garbage-collector pause:
  {"at": time.monotonic() (one clock for all processes; engine-bench marks its runs with it), "admit_ms": ...,
   "admitted": n, "step": "prefill"|"decode"|"read",
   "size": prompt tokens or decode rows, "launch_ms": host time to schedule and launch, "wait_ms": host time
   blocked on the previous step's tokens (long: the GPU is the bottleneck; ~0: the host is), "read_ms": ...}
  {"at": ..., "gc": generation, "ms": pause}
Nothing here touches the device; the timers are perf_counter reads around work the loop does anyway.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path


class StepTrace:
    """Appends the core loop's timeline to <trace_dir>/core<N>.jsonl (buffered; flushed once a second; a later
    engine with the same folder appends)."""

    def __init__(self, trace_dir: str, number: int):
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        self._file = (Path(trace_dir) / f"core{number}.jsonl").open("a", encoding="utf-8")
        self._gc_from = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_from = time.monotonic()
        else:
            self._write({"at": self._gc_from, "gc": info["generation"], "ms": 1e3 * (time.monotonic() - self._gc_from)})

    def iteration(self, at: float, admit_s: float, admitted: int, step: dict | None) -> None:
        if admitted or step:
            self._write({"at": at, "admit_ms": 1e3 * admit_s, "admitted": admitted, **(step or {})})

    def _write(self, entry: dict) -> None:
        self._file.write(json.dumps({k: round(v, 6 if k == "at" else 3) if isinstance(v, float) else v
                                     for k, v in entry.items()}) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        gc.callbacks.remove(self._on_gc)
        self._file.close()


def process_age() -> float:
    """Seconds since this process started (Linux: its start time in /proc; elsewhere 0), so the interpreter's start
    and the imports before any engine code ran count in start-up phases."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


class Phases:
    """A process's start-up, phase by phase: {name: seconds} in the order they ended; the first phase, `imports`,
    runs from the process's start to this object's creation."""

    def __init__(self):
        self.seconds: dict[str, float] = {"imports": round(process_age(), 3)}
        self._last = time.perf_counter()

    def done(self, name: str) -> None:
        """End phase `name` (the time since the last phase ended; a name given twice adds up)."""
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 3)
        self._last = now
