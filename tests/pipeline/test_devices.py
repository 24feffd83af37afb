"""Several engine cores on one host (--devices cpu,cpu as two GPUs would be): every request runs once, results equal
one core's token for token (greedy, seeded, steered, captured), a killed core's requests finish on the other, and
bad --devices values are named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from support import PROMPTS, tiny_config
from engine import Engine
from engine_bench.cli import bench_main
from engine.apps.run import throughput
from engine.config import ConfigError, EngineConfig, parse_devices
from engine.engine import EngineError
from engine.apps.sweep.fields import SweepError
from engine.apps.sweep.spec import load_sweep
from support.processes import engine_sweep, make_sweep

ROOT = Path(__file__).resolve().parents[2]
KILL_NEW_TOKENS = 40


def records(vector: str) -> list[dict]:
    """Enough records for several ring slots (32 requests each), so both cores get work: greedy, seeded,
    steered and captured ones, of staggered lengths."""
    rows = [{"id": f"g{i}", "prompt": f"{PROMPTS[i % 7]} {i}", "max_new_tokens": 3 + i % 9} for i in range(40)]
    rows += [{"id": f"s{i}", "prompt": PROMPTS[i % 7], "temperature": 0.9, "top_p": 0.9, "seed": 100 + i}
             for i in range(20)]
    rows += [{"id": f"v{i}", "prompt": PROMPTS[i % 7], "temperature": 0.7, "seed": i,
              "steering": {"vector": vector, "layers": [1], "coef": 4.0, "positions": "all"}} for i in range(8)]
    rows += [{"id": f"c{i}", "prompt": PROMPTS[i % 7], "capture": {"layers": [0, 2], "positions": "generated"},
              **({"steering": {"vector": vector, "layers": [2], "coef": -3.0}} if i % 2 else {})} for i in range(8)]
    return rows


def kill_records() -> list[dict]:
    """The killed-core run's input: long enough (max_num_seqs 1) that the kill lands mid-run."""
    return [{"id": f"k{i}", "prompt": f"{PROMPTS[i % 7]} {i}", "max_new_tokens": KILL_NEW_TOKENS, "ignore_eos": True,
             **({"temperature": 0.8, "seed": i} if i % 3 == 0 else {})} for i in range(48)]


@pytest.fixture(scope="module")
def vector(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("devices") / "v.npy"
    np.save(path, (np.random.default_rng(1).standard_normal(64) * 3).astype(np.float32))
    return str(path)


@pytest.fixture(scope="module")
def one_core(vector):
    """One core's results: the reference for the two-core runs, and for the killed-core run's input."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # as each of two CPU cores gets; two threads fight on a 2-core runner
        with Engine(tiny_config()) as engine:
            main = {r["id"]: r for r in engine.generate_all(records(vector))}
            kill = {r["id"]: r for r in engine.generate_all(kill_records())}
    return main, kill


@pytest.fixture(scope="module")
def two_cores(vector):
    """Two CPU engine cores; the results and stats are taken at once, the engine stays open for the last test."""
    with Engine(tiny_config(device="auto", devices="cpu,cpu")) as engine:
        got = engine.generate_all(records(vector))
        yield engine, got, engine.stats()


def test_two_cores_run_every_request_once_and_equal_one_core(one_core, two_cores, vector):
    _, got, _ = two_cores
    reference, _ = one_core
    assert [r["id"] for r in got] == [r["id"] for r in records(vector)]
    for record in got:
        want = reference[record["id"]]
        assert "error" not in record, record
        assert record["completion_token_ids"] == want["completion_token_ids"], record["id"]
        assert record["completion"] == want["completion"] and record["seed"] == want["seed"]
    by_id = {r["id"]: r for r in got}
    for i in range(8):
        mine, want = by_id[f"c{i}"]["activations"], reference[f"c{i}"]["activations"]
        assert sorted(mine) == [0, 2]
        for layer in mine:
            assert torch.allclose(mine[layer], want[layer], atol=1e-5), (i, layer)  # one core's threads vs two's


def test_both_cores_worked_and_stats_give_per_device_throughput(two_cores, vector):
    _, got, stats = two_cores
    devices = stats["devices"]
    assert [d["label"] for d in devices] == ["cpu#0", "cpu#1"] and all(d["is_alive"] for d in devices)
    assert all(d["num_requests"] > 0 and d["steps"] > 0 and d["tok_s"] > 0 for d in devices)
    assert sum(d["num_requests"] for d in devices) == len(records(vector))
    assert stats["num_tokens"] == sum(r["num_completion_tokens"] for r in got) == sum(d["num_tokens"] for d in devices)
    assert stats["steps"] == sum(d["steps"] for d in devices) and stats["tok_s"] > 0
    line = throughput(stats["num_tokens"], devices, 2.0)
    assert line.startswith(f"{stats['num_tokens'] / 2:,.0f} tok/s (cpu#0 ") and ", cpu#1 " in line


def test_a_killed_core_s_requests_finish_on_the_other(two_cores, one_core):
    """SIGKILL one of the two cores mid-run: the run still yields every request exactly once, each as one core
    would have made it, and says which core died and where its requests went."""
    engine, _, _ = two_cores
    _, reference = one_core
    got = []
    for record in engine.generate(kill_records()):
        got.append(record)
        if len(got) == 2:
            os.kill(engine.cores[1].proc.pid, signal.SIGKILL)
    assert sorted(r["id"] for r in got) == sorted(reference)  # every request, exactly once
    for record in got:
        assert record["completion_token_ids"] == reference[record["id"]]["completion_token_ids"], record["id"]
    [line] = engine.core_failures
    assert line.startswith("engine core 1 on cpu (pid ") and "died (killed by SIGKILL)" in line
    assert "unfinished requests go to cpu#0" in line
    assert [d["is_alive"] for d in engine.device_counts()] == [True, False]


@pytest.mark.parametrize("devices, message", [
    ("cpu,cuda:0", "mixes cpu and GPUs"),
    ("gpu0", "'gpu0' is not a device"),
    ("0,,1", "'' is not a device"),
    ("cuda:0,cuda:0", "cuda:0 twice"),
    ("cuda:99", "cuda:99 is not a visible GPU"),
])
def test_bad_devices_are_named_with_the_fix(devices, message):
    with pytest.raises(ConfigError, match=message) as info:
        EngineConfig(devices=devices)
    assert devices in str(info.value)


def test_devices_all_without_a_gpu_says_so():
    if torch.cuda.is_available():
        assert parse_devices("all") == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return
    with pytest.raises(ConfigError, match="--devices all: no CUDA GPU is visible"):
        EngineConfig(devices="all")


def test_devices_forms_and_a_clash_with_device():
    assert EngineConfig(devices="cpu,cpu").core_devices() == ["cpu", "cpu"]
    assert EngineConfig(devices=["cpu"]).core_devices() == ["cpu"]
    assert EngineConfig(device="cpu").core_devices() == ["cpu"]
    with pytest.raises(ConfigError, match="give one of them"):
        EngineConfig(device="cpu", devices="cpu,cpu")


def test_engine_run_rejects_a_bad_devices_value():
    result = subprocess.run([sys.executable, "-m", "engine.apps.run", "--input", __file__, "--model", "random:tiny",
                             "--devices", "cpu,gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "--devices 'cpu,gpu': 'gpu' is not a device" in result.stderr


def test_a_sweep_lane_may_run_one_model_on_several_devices(tmp_path):
    path = make_sweep(tmp_path, extra='devices = ["cpu,cpu"]')
    config = load_sweep(path)
    assert config.devices() == ["cpu,cpu"]
    assert config.engine_config(config.models[0], "cpu,cpu").core_devices() == ["cpu", "cpu"]
    path.write_text(path.read_text().replace('"cpu,cpu"', '"cpu,tpu"'))
    with pytest.raises(SweepError, match="engine.devices\\[0\\] is 'cpu,tpu'.*'tpu' is not a device"):
        load_sweep(path)


def test_engine_sweep_devices_flag_overrides_the_file_and_keeps_the_hash(tmp_path):
    path = make_sweep(tmp_path)
    run = engine_sweep(path, "--devices", "cpu,cpu")
    assert run.returncode == 0, run.stderr
    assert "starting random:tiny on cpu,cpu" in run.stderr and "20 of 20 done" in run.stderr
    again = engine_sweep(path)  # without the flag: the same sweep (devices are speed only), so a resume, not a refusal
    assert again.returncode == 0 and "20 of 20 done" in again.stderr and "0 records" in again.stderr, again.stderr
    bad = engine_sweep(path, "--devices", "cpu,tpu")
    assert bad.returncode == 1 and "--devices[0] is 'cpu,tpu'" in bad.stderr and "'tpu' is not a device" in bad.stderr


def test_engine_bench_runs_the_engine_on_two_cpu_cores(tmp_path):
    code = bench_main(["--model", "random:tiny", "--devices", "cpu,cpu", "--workload", "short", "--systems", "engine",
                       "--num-prompts", "6", "--max-num-seqs", "2", "--max-new-tokens", "8", "--out", str(tmp_path),
                       "--save-outputs", "--quiet"])
    assert code == 0
    report = json.loads(next(tmp_path.glob("short-*.json")).read_text())
    assert report["settings"]["devices"] == ["cpu", "cpu"] and report["errors"] == []
    # the engine on the first device alone and on both, in the same run: the scaling ratio's two rows
    assert [m["system"] for m in report["systems"]] == ["engine", "engine-2dev"]
    assert all(m["output_tokens_per_s"] > 0 for m in report["systems"])
    assert report["agreement"]["engine"]["engine-2dev"]["num_identical"] == 6  # greedy: the same completions


def test_with_every_core_dead_the_run_stops_naming_them(two_cores, vector):
    """Last, as it ends the module's two-core engine: the cores still alive are killed mid-run -> EngineError."""
    engine, _, _ = two_cores
    rows = [{**r, "id": f"dead-{r['id']}", "max_new_tokens": 64, "ignore_eos": True} for r in records(vector)[:40]]
    seen = []
    with pytest.raises(EngineError) as info:
        for record in engine.generate(rows):
            seen.append(record["id"])
            alive = [core for core in engine.cores if core.is_alive and core.proc.exitcode is None]
            if len(seen) in (1, 3) and alive:
                os.kill(alive[-1].proc.pid, signal.SIGKILL)
    message = str(info.value)
    assert "engine core 1 on cpu" in message and "engine core 0 on cpu" in message and "SIGKILL" in message
    assert "no engine core is left; finished records are on disk" in message
    assert len(seen) == len(set(seen)) < len(rows)
