"""The parent side of engine-bench: GPU sampling through NVML, progress, and a child process per system group."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import threading
import time

from engine.messages import Fatal
from engine.procs import MsgQueue, run_child
from engine_bench.messages import ChildExit, Progress, SystemDone, SystemStarted
from engine_bench.config import BenchConfig, BenchError, csv_list
from engine_bench.report import GIB, gpu_metrics
from engine_bench.workloads import Prompt, prompts_to_msg


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
    visible = csv_list(os.environ.get("CUDA_VISIBLE_DEVICES", ""))
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


def spawn_group(target, config: BenchConfig, prompts: list[Prompt], label: str) -> list[dict]:
    """Run one system group in a fresh process; returns its 'done' messages. The process is not a daemon
    because the engine starts processes of its own."""
    ctx = mp.get_context("spawn")
    events = MsgQueue(ctx)
    stage = f"bench {target.__name__.removeprefix('run_')}"
    proc = ctx.Process(target=run_child, name=stage,
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
            match msg:
                case SystemStarted():
                    progress.start(msg.system, msg.num_prompts)
                case Progress():
                    progress.update(msg.num)
                case SystemDone():
                    progress.close()
                    done.append(msg.done)
                    print(f"engine-bench: {label} {_done_line(msg.done)}", file=sys.stderr, flush=True)
                case Fatal():
                    raise BenchError(f"{msg.stage} failed: {msg.error}\n{msg.traceback}".rstrip())
                case ChildExit():
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


