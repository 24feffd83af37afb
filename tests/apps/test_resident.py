"""engine-run --keep-alive: the engine stays loaded in a resident process and the next engine-run with the same
settings runs in it, with the same records as a fresh engine gives; a vector file written again is read again;
other settings replace it; it ends when idle, when stopped, when its client goes; killed mid-run, the run fails
with a message and the same command resumes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from support import PROMPTS, ROOT, read_jsonl, write_jsonl
from support.processes import wait_for_records
from engine.procs import is_pid_alive
from engine.storage.activations import load

FLAGS = ["--model", "random:tiny", "--device", "cpu", "--max-new-tokens", "6", "--ignore-eos", "--return-tokens",
         "--max-num-seqs", "4", "--quiet"]


@pytest.fixture
def env(tmp_path):
    """A cache dir of the test's own, so its resident engine is the test's; any left at the end is ended."""
    cache = tmp_path / "cache"
    env = {**os.environ, "ENGINE_CACHE_DIR": str(cache)}
    yield env
    resident(env, "stop")


def engine_run(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.apps.run", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def start_run(env: dict, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.apps.run", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def resident(env: dict, action: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.apps.resident", action], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)


def resident_pid(stderr: str, how: str) -> int:
    found = re.search(rf"resident engine pid (\d+) \({how}\)", stderr)
    assert found, stderr
    return int(found.group(1))


def wait_gone(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while is_pid_alive(pid):
        assert time.monotonic() < deadline, f"resident engine {pid} still runs"
        time.sleep(0.1)


def records(path: Path) -> dict:
    return {r["id"]: r for r in read_jsonl(path)}


def test_a_kept_alive_engine_serves_the_next_run_and_gives_what_a_fresh_engine_gives(tmp_path, env):
    vector = tmp_path / "v.npy"
    np.save(vector, np.random.default_rng(0).standard_normal(64).astype(np.float32) * 4)
    rows = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS[:4])]
    rows += [{"id": f"s{i}", "prompt": p, "steering": {"vector": str(vector), "layers": [1], "coef": 2.0}}
             for i, p in enumerate(PROMPTS[:3])]
    rows += [{"id": "t", "prompt": PROMPTS[0], "temperature": 0.9, "seed": 7}]
    rows += [{"id": f"c{i}", "prompt": p, "capture": {"layers": [1], "positions": "last_prompt"}}
             for i, p in enumerate(PROMPTS[:2])]
    source = write_jsonl(tmp_path / "in.jsonl", rows)

    first = engine_run(env, "--input", source, "--output", tmp_path / "a.jsonl", "--keep-alive", "120", *FLAGS)
    assert first.returncode == 0, first.stderr
    pid = resident_pid(first.stderr, "started")
    second = engine_run(env, "--input", source, "--output", tmp_path / "b.jsonl", "--keep-alive", "120", *FLAGS)
    assert second.returncode == 0, second.stderr
    assert resident_pid(second.stderr, "already loaded") == pid
    assert "10 records, 0 errors, 60 tokens" in second.stderr
    fresh = engine_run(env, "--input", source, "--output", tmp_path / "c.jsonl", *FLAGS)
    assert fresh.returncode == 0 and "resident" not in fresh.stderr, fresh.stderr
    expected = records(tmp_path / "c.jsonl")
    strip = lambda path: {k: {f: v for f, v in r.items() if f != "activations"}  # noqa: E731 - shard names differ
                          for k, r in records(path).items()}
    assert strip(tmp_path / "a.jsonl") == strip(tmp_path / "b.jsonl") == strip(tmp_path / "c.jsonl")
    fresh_activations = load(tmp_path / "c.jsonl")
    for name in ("a.jsonl", "b.jsonl"):
        activations = load(tmp_path / name)
        assert set(activations) == set(fresh_activations) == {"c0", "c1"}
        for request_id, layers in activations.items():
            torch.testing.assert_close(layers[1], fresh_activations[request_id][1], rtol=0, atol=0)

    # The vector file written again: the resident engine reads the new one, as a fresh engine would.
    np.save(vector, np.random.default_rng(1).standard_normal(64).astype(np.float32) * 4)
    third = engine_run(env, "--input", source, "--output", tmp_path / "d.jsonl", "--keep-alive", "120", *FLAGS)
    assert resident_pid(third.stderr, "already loaded") == pid
    assert engine_run(env, "--input", source, "--output", tmp_path / "e.jsonl", *FLAGS).returncode == 0
    changed = strip(tmp_path / "d.jsonl")
    assert changed == strip(tmp_path / "e.jsonl")
    assert any(changed[f"s{i}"]["completion_token_ids"] != expected[f"s{i}"]["completion_token_ids"]
               for i in range(3)), "the steered records did not change with their vector"

    # Other engine settings: the resident engine is ended and one for them starts.
    other = engine_run(env, "--input", source, "--output", tmp_path / "f.jsonl", "--keep-alive", "120",
                       *FLAGS[:-2], "2", "--quiet")
    assert other.returncode == 0, other.stderr
    assert "ending the resident engine of other settings" in other.stderr
    new_pid = resident_pid(other.stderr, "started")
    assert new_pid != pid and not is_pid_alive(pid)
    status = resident(env, "status")
    assert f"resident engine pid {new_pid}: random:tiny on cpu float32" in status.stderr, status.stderr
    stopped = resident(env, "stop")
    assert stopped.returncode == 0 and f"resident engine pid {new_pid} ended" in stopped.stderr, stopped.stderr
    assert not is_pid_alive(new_pid)
    assert "no resident engine for" in resident(env, "status").stderr


def long_job(tmp_path: Path) -> Path:
    rows = [{"id": f"r{i}", "prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}", "max_new_tokens": 120} for i in range(24)]
    return write_jsonl(tmp_path / "long.jsonl", rows)


def start_long_job(tmp_path: Path, env: dict) -> tuple[list, Path, subprocess.Popen, int]:
    """A 24-record job on a kept-alive engine, once its first record is written: (its command, its output, the
    running engine-run, the resident engine's pid)."""
    out = tmp_path / "out.jsonl"
    command = ["--input", long_job(tmp_path), "--output", out, "--keep-alive", "120", *FLAGS]
    proc = start_run(env, *command)
    wait_for_records(out, 1, proc)
    return command, out, proc, int(re.search(r"pid (\d+)", resident(env, "status").stderr).group(1))


def test_a_resident_engine_killed_mid_run_fails_the_run_in_one_line_and_the_same_command_resumes(tmp_path, env):
    command, out, proc, pid = start_long_job(tmp_path, env)
    os.kill(pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert f"the resident engine (pid {pid}) ended mid-run" in stderr and "Run the same command to resume" in stderr
    assert "Traceback" not in stderr, stderr
    done = len(read_jsonl(out))
    resumed = engine_run(env, *command)
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipped {done} done" in resumed.stderr
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(24)), "a record is missing or written twice"


def test_an_interrupted_run_ends_its_resident_engine_and_resumes(tmp_path, env):
    command, out, proc, pid = start_long_job(tmp_path, env)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr, stderr
    wait_gone(pid)  # the requests it still held are no one's: it ends rather than run them
    resumed = engine_run(env, *command)
    assert resumed.returncode == 0, resumed.stderr
    assert len({r["id"] for r in read_jsonl(out)}) == len(read_jsonl(out)) == 24


def test_an_idle_resident_engine_ends_after_its_keep_alive(tmp_path, env):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": PROMPTS[0]}])
    result = engine_run(env, "--input", source, "--keep-alive", "1s", *FLAGS)
    assert result.returncode == 0, result.stderr
    wait_gone(resident_pid(result.stderr, "started"))
    assert "no job for 1 s (--keep-alive): ending" in (tmp_path / "cache" / "resident" / "engine.log").read_text()


def test_bad_settings_fail_with_keep_alive_as_they_do_without(tmp_path, env):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": PROMPTS[0]}])
    missing = tmp_path / "no-such-model"
    plain = engine_run(env, "--input", source, *FLAGS[:1], missing, *FLAGS[2:])
    kept = engine_run(env, "--input", source, *FLAGS[:1], missing, *FLAGS[2:], "--keep-alive", "60")
    assert plain.returncode == kept.returncode == 1
    assert kept.stderr == plain.stderr and len(kept.stderr.splitlines()) == 1, kept.stderr
    bad = engine_run(env, "--input", source, *FLAGS, "--keep-alive", "soon")
    assert bad.returncode == 2 and "'soon': give a duration such as 600, 600s, 10m or 1h" in bad.stderr


def test_the_duration_forms():
    from engine.apps.resident.channel import parse_duration

    assert [parse_duration(t) for t in ("0", "90", "90s", "10m", "1.5h", "2M")] == [0, 90, 90, 600, 5400, 120]
    for text in ("", "-1", "inf", "nan", "10d", "m"):
        with pytest.raises(ValueError, match="give a duration"):
            parse_duration(text)
