"""The commands as a user runs them, in child processes from the repository root (engine-run, engine-sweep), and
what tests that stop or starve them need: waiting on a running process, a sweep file for the tiny model, a disk
that fills."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from support import ROOT, read_jsonl, write_jsonl

TINY_ARGS = ["--model", "random:tiny", "--device", "cpu", "--quiet", "--max-new-tokens", "6"]


def engine_run(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.apps.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def start_run(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.apps.run", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_records(path: Path, count: int, proc: subprocess.Popen, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while len(read_jsonl(path)) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no output in time"
        time.sleep(0.2)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll `condition` while `proc` runs; fail if it ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.05)


@contextmanager
def disk_taken(folder: Path, num_bytes: int):
    """Take num_bytes of the file system with a real, allocated file, as another program filling the disk would."""
    path = folder / "filler.bin"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, num_bytes)
        yield path
    finally:
        os.close(fd)
        path.unlink()


SWEEP = """\
output = "out"
seed = 5
samples = 2
models = [{{model = "random:tiny", label = "tiny"}}]
prompts = ["prompts.jsonl"]

[vectors]
v = "v.npy"

[grid]
vectors = ["v"]
layers = [1, [0, 2]]
coefs = {coefs}
baseline = true

[generation]
max_new_tokens = {max_new_tokens}
temperature = 0.9
ignore_eos = true

[engine]
device = "cpu"
max_num_seqs = {max_num_seqs}
{extra}"""


def make_sweep(folder: Path, coefs="[0, 4]", max_num_seqs=4, extra="", num_prompts=2, max_new_tokens=4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "v.npy", np.random.default_rng(0).standard_normal(64).astype(np.float32))
    prompts = [{"id": "hello", "prompt": "Hello there", "topic": "greeting"}, {"prompt": "The capital of France is"},
               {"id": "story", "prompt": "Once upon a time", "seed": 99}, {"id": "digits", "prompt": "1 2 3 4"}]
    write_jsonl(folder / "prompts.jsonl", prompts[:num_prompts])
    path = folder / "sweep.toml"
    path.write_text(SWEEP.format(coefs=coefs, max_num_seqs=max_num_seqs, extra=extra, max_new_tokens=max_new_tokens))
    return path


def engine_sweep(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.apps.sweep.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)
