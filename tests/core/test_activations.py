"""Activation capture: values equal HF hidden states (every position mode, continuous batching, with and without
steering, before and after it); the pipeline, the CLI's shards and index, resume after a crash, and read-back."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from support import PROMPTS, TINY, core_request, read_jsonl, tiny_config, write_jsonl
from engine import Engine
from engine.pipeline.activation_messages import trim_generated
from engine.storage.activations import INDEX_NAME, activations_dir, load, tensors_of
from engine.config import CaptureDefaults, ConfigError
from engine.core.engine_core import EngineCore
from engine.messages import CoreRequest, Outcome
from engine.pipeline.writer import JsonlWriter
from support.reference import expected_capture, hf_states
from support.processes import disk_taken, wait_until

ROOT = Path(__file__).resolve().parents[2]
MODES = ("last_prompt", "mean_prompt", "all_prompt", "generated")
LAYERS = [1, 2]  # the tiny model has 4; HF's hidden_states for the last layer is after the final norm
STEER_LAYER, COEF = 1, 3.0


@pytest.fixture(scope="module")
def vector(tmp_path_factory):
    path = tmp_path_factory.mktemp("vec") / "v.npy"
    np.save(path, np.random.default_rng(0).standard_normal(64).astype(np.float32))
    return str(path)


def request(i: int, positions: str, steering=None, layers=LAYERS) -> CoreRequest:
    return core_request(i, steering, {"layers": layers, "positions": positions}, max_new_tokens=3 + (i * 3) % 7)


def run_core(core, tokenizer, specs: list) -> tuple[dict, dict]:
    """Every prompt with every mode, mixed lengths, more requests than KV rows; (sequences, activations) by index."""
    requests, prompts = [], []
    for m, mode in enumerate(MODES):
        for p, prompt in enumerate(PROMPTS):
            i = m * len(PROMPTS) + p
            requests.append(request(i, mode, specs[i % len(specs)]))
            prompts.append(tokenizer(prompt).input_ids)
    done = core.generate(requests, prompts)
    return done, {i: tensors_of(core.recorder.pop(i)) for i in done}


def specs_of(vector) -> list:
    """Unsteered, steered everywhere and steered at generated positions only, one layer (see check_against_hf)."""
    return [None] + [{"vector": vector, "layers": [STEER_LAYER], "coef": COEF, "positions": p}
                     for p in ("all", "generated")]


@pytest.mark.parametrize("is_before_steering", [False, True], ids=["after", "before"])
def test_captured_values_equal_hf_hidden_states(tiny_source, tokenizer, tiny_model, vector, is_before_steering):
    config = tiny_config(max_num_seqs=3, capture=CaptureDefaults(is_before_steering=is_before_steering))
    core = EngineCore(config, tiny_source)
    done, captured = run_core(core, tokenizer, specs_of(vector))
    check_against_hf(done, captured, tokenizer, tiny_model, specs_of(vector), is_before_steering, 1e-5)
    assert not core.recorder.requests


@pytest.fixture(scope="module")
def gpu_parts():
    """Source, tokenizer and reference model (random weights are drawn on the device, so the reference is there too);
    ENGINE_GPU_TEST_TOKENIZER where the embedded package is missing."""
    from engine.config import EngineConfig
    from engine.models import load_model, resolve_model
    from engine.models import load_hf_tokenizer

    source = resolve_model(TINY, os.environ.get("ENGINE_GPU_TEST_TOKENIZER"), EngineConfig().cache_dir)
    tok = load_hf_tokenizer(source.tokenizer_dir)
    return source, tok, load_model(source, torch.float32, "cuda", vocab_size=len(tok))


@pytest.mark.gpu
@pytest.mark.parametrize("is_before_steering", [False, True], ids=["after", "before"])
def test_decode_capture_inside_cuda_graphs_equals_hf(gpu_parts, vector, is_before_steering):
    """Decode replays CUDA graphs: capture and steering that first appear after graphs were captured re-capture
    nothing, the values (fp32 on the GPU) equal HF's, and capturing makes no host sync."""
    source, tokenizer, model = gpu_parts
    config = tiny_config(device="cuda", dtype="float32", max_num_seqs=4,
                         capture=CaptureDefaults(is_before_steering=is_before_steering))
    core = EngineCore(config, source)
    assert core.runner.use_graphs
    core.generate([dataclasses.replace(request(i, "last_prompt"), capture=None) for i in range(3)],
                  [tokenizer(p).input_ids for p in PROMPTS[:3]])  # graphs captured with no capture hooks
    hooks = [len(layer._forward_hooks) for layer in core.recorder.layers]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            done, captured = run_core(core, tokenizer, specs_of(vector))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})
    print("\nhost syncs seen (file:line):", syncs)
    assert not [where for where in syncs if where.startswith("activations.py")]
    # capture and steering that first appear mid-run add no hook and re-capture nothing
    assert [len(layer._forward_hooks) for layer in core.recorder.layers] == hooks
    assert core.runner.graph_stats["recaptures"] == 0
    check_against_hf(done, captured, tokenizer, model, specs_of(vector), is_before_steering, 1e-4)


@pytest.mark.gpu
def test_bfloat16_capture_on_the_gpu_reports_its_error(gpu_parts, vector):
    """The engine in bf16 on the GPU (CUDA graphs, packed prefill) against HF's fp32 forward over the same tokens: the
    largest relative error of each captured value (norm of the difference over norm of the reference)."""
    source, tokenizer, model = gpu_parts
    core = EngineCore(tiny_config(device="cuda", dtype="bfloat16", max_num_seqs=4), source)
    done, captured = run_core(core, tokenizer, specs_of(vector))
    worst = 0.0
    for i, seq in done.items():
        prompt_ids, spec_i = tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids, specs_of(vector)[i % 3]
        states = hf_states(model, prompt_ids + seq.output_ids, spec_i, len(prompt_ids))
        for layer, value in captured[i].items():
            want = expected_capture(states, layer, MODES[i // len(PROMPTS)], len(prompt_ids), len(seq.output_ids))
            worst = max(worst, ((value.float() - want).norm() / want.norm()).item())
    print(f"\nbf16 capture vs HF fp32 forward: largest relative error {worst:.4f}")
    assert worst < 0.05


def check_against_hf(done, captured, tokenizer, model, specs, is_before_steering, tol) -> None:
    moved = 0
    for i, seq in done.items():
        prompt_ids, spec_i = tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids, specs[i % len(specs)]
        mode = MODES[i // len(PROMPTS)]
        states = hf_states(model, prompt_ids + seq.output_ids, spec_i, len(prompt_ids))
        unsteered = hf_states(model, prompt_ids + seq.output_ids, None, len(prompt_ids))
        assert sorted(captured[i]) == LAYERS
        for layer, value in captured[i].items():
            # before steering, the steered layer's own output is the unsteered one (nothing upstream is steered)
            source = unsteered if is_before_steering and layer == STEER_LAYER else states
            want = expected_capture(source, layer, mode, len(prompt_ids), len(seq.output_ids))
            assert value.shape == want.shape, (i, mode, layer)
            torch.testing.assert_close(value, want, rtol=tol, atol=tol)
            plain = expected_capture(unsteered, layer, mode, len(prompt_ids), len(seq.output_ids))
            moved += spec_i is not None and not torch.allclose(value, plain)
    assert moved > 0  # steering changed captured values, so the comparison above is not vacuous


def test_a_new_steered_layer_after_capture_hooks_keeps_the_order(tiny_source, tokenizer, tiny_model, vector):
    """Steering hooks added after the capture hooks (prepend=True) still run after a before-steering capture."""
    config = tiny_config(max_num_seqs=2, capture=CaptureDefaults(is_before_steering=True))
    core = EngineCore(config, tiny_source)
    ids = tokenizer(PROMPTS[1]).input_ids
    core.generate([request(0, "generated")], [ids])  # capture hooks first, no steering yet
    core.recorder.pop(0)
    spec = {"vector": vector, "layers": LAYERS, "coef": COEF, "positions": "all"}
    seq = core.generate([request(1, "generated", spec)], [ids])[1]
    got = tensors_of(core.recorder.pop(1))
    states = hf_states(tiny_model, ids + seq.output_ids, {**spec, "layers": [1]}, len(ids))  # layer 2 before its own
    torch.testing.assert_close(got[2], expected_capture(states, 2, "generated", len(ids), len(seq.output_ids)),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_capture_and_record_errors(tiny_source, tokenizer):
    core = EngineCore(tiny_config(max_num_seqs=2, capture=CaptureDefaults(dtype="bfloat16")), tiny_source)
    ids = tokenizer(PROMPTS[0]).input_ids
    core.generate([request(0, "generated"), request(1, "mean_prompt")], [ids, ids])
    got = {i: tensors_of(core.recorder.pop(i)) for i in (0, 1)}
    assert got[0][1].dtype == torch.bfloat16 and got[0][1].shape == (2, 64)  # max_new_tokens 3: rows for 2
    assert got[1][2].shape == (64,)
    with pytest.raises(ValueError, match=r"capture layer\(s\) \[4\] out of range; the model has layers 0..3"):
        core.add(request(2, "last_prompt", layers=[1, 4]), torch.tensor(ids))


def test_stop_cut_keeps_rows_aligned_with_completion_tokens():
    message = {"positions": "generated", "dtype": "float16",
               "layers": {3: [[5, 2], np.arange(10, dtype=np.float16).tobytes()]}}
    cut = tensors_of(trim_generated(message, 3))[3]
    assert cut.shape == (2, 2) and cut.flatten().tolist() == [0, 1, 2, 3]
    assert tensors_of(trim_generated(message, 1))[3].shape == (0, 2)


def test_bad_capture_settings_name_the_value():
    with pytest.raises(ConfigError, match="--capture-positions 'first'"):
        CaptureDefaults(layers=[1], positions="first")
    with pytest.raises(ConfigError, match="--capture-dtype 'int8'"):
        CaptureDefaults(layers=[1], dtype="int8")
    with pytest.raises(ConfigError, match=r"--capture-layers \[-1\]"):
        CaptureDefaults(layers=[-1])


def test_pipeline_records_carry_activations_with_per_record_overrides(tiny_source, tokenizer, tiny_model):
    config = tiny_config(max_num_seqs=3, capture=CaptureDefaults(layers=[2], positions="mean_prompt"))
    records = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    records[1]["capture"] = False
    records[2]["capture"] = {"layers": [0, 1], "positions": "generated"}
    records[3]["capture"] = {"positions": "last_prompt"}
    records.append({"id": "bad", "prompt": "x", "capture": {"layers": [2], "positions": "first"}})
    with Engine(config) as engine:
        got = {r["id"]: r for r in engine.generate_all(records)}
    assert "capture.positions" in got["bad"]["error"] and '"first"' in got["bad"]["error"]
    assert "activations" not in got["r1"]
    assert sorted(got["r2"]["activations"]) == [0, 1] and sorted(got["r0"]["activations"]) == [2]
    for rid, layer, mode in (("r0", 2, "mean_prompt"), ("r2", 1, "generated"), ("r3", 2, "last_prompt")):
        ids = tokenizer(PROMPTS[int(rid[1])]).input_ids
        states = hf_states(tiny_model, ids + got[rid]["completion_token_ids"], None, len(ids))
        want = expected_capture(states, layer, mode, len(ids), len(got[rid]["completion_token_ids"]))
        torch.testing.assert_close(got[rid]["activations"][layer], want, rtol=1e-5, atol=1e-5)


def engine_run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.apps.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_writes_shards_an_index_and_resumes_without_duplicates(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    out = tmp_path / "out.jsonl"
    args = ["--input", str(source), "--output", str(out), "--model", "random:tiny", "--device", "cpu", "--quiet",
            "--max-new-tokens", "4", "--capture-layers", "1,2", "--capture-positions", "generated",
            "--capture-dtype", "float16", "--ignore-eos"]
    done = engine_run(*args)
    assert done.returncode == 0, done.stderr
    records = {r["id"]: r for r in read_jsonl(out)}
    pointer = records["p0"]["activations"]
    assert pointer["shard"] == "out.activations/00000.safetensors" and pointer["keys"] == ["p0/layer.1", "p0/layer.2"]
    assert pointer["positions"] == "generated" and pointer["dtype"] == "float16" and not pointer["is_before_steering"]
    first = load(out)
    assert set(first) == set(records) and first["p3"][2].shape == (3, 64) and first["p3"][2].dtype == torch.float16
    # a crash: the last two results lost, a partial shard and their index lines left behind
    folder = activations_dir(out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-2]))
    (folder / "00001.safetensors.tmp").write_bytes(b"partial")
    lost = {json.loads(line)["id"] for line in lines[-2:]}
    again = engine_run(*args)
    assert again.returncode == 0, again.stderr
    assert "skipped 5 done" in again.stderr
    index = read_jsonl(folder / INDEX_NAME)
    assert sorted(e["id"] for e in index) == sorted(records)  # each id once
    assert {e["shard"] for e in index if e["id"] in lost} == {"out.activations/00001.safetensors"}
    assert not list(folder.glob("*.tmp"))
    second = load(out)
    assert set(second) == set(records)
    for rid in records:  # the re-run ones were batched differently: equal up to float reordering
        for layer in (1, 2):
            if rid in lost:
                torch.testing.assert_close(second[rid][layer], first[rid][layer], rtol=1e-2, atol=1e-2)
            else:
                assert torch.equal(second[rid][layer], first[rid][layer])


def outcome(i: int, rows: int, positions: str = "all_prompt") -> Outcome:
    data = np.full((rows, 4), i, dtype=np.float32)
    message = {"positions": positions, "dtype": "float32", "is_before_steering": False,
               "layers": {3: [[rows, 4], data.tobytes()]}}
    record = {"id": f"r{i}", "completion": "", "num_completion_tokens": 1}
    return Outcome(i, record, False, message)


def test_writer_rolls_shards_and_holds_result_lines_until_their_shard_is_on_disk(tmp_path):
    out = tmp_path / "res.jsonl"
    writer = JsonlWriter(out, {}, ordered=True, max_shard_bytes=100, flush_seconds=3600)
    writer.write(outcome(0, 2))  # 32 bytes: buffered, its line held
    writer.write(Outcome(1, {"id": "plain", "completion": "", "num_completion_tokens": 1}, False))
    writer.sync()
    assert read_jsonl(out) == []  # the plain record waits behind it, to keep the order
    writer.write(outcome(2, 5))  # 32 + 80 bytes >= 100: the shard is written, then the lines
    writer.sync()
    assert [r["id"] for r in read_jsonl(out)] == ["r0", "plain", "r2"]
    writer.write(outcome(3, 1))
    writer.close()
    shards = sorted(p.name for p in activations_dir(out).glob("*.safetensors"))
    assert shards == ["00000.safetensors", "00001.safetensors"]
    got = load(out)
    assert got["r2"][3].shape == (5, 4) and float(got["r3"][3][0, 0]) == 3.0 and "plain" not in got
    assert list(load(out, ids=["r3", "plain"])) == ["r3"]


# ---------------------------------------------------------------- free disk space before each shard
def free_gb(folder: Path) -> float:
    import shutil

    return shutil.disk_usage(folder).free / 1e9


def test_a_shard_that_does_not_fit_is_not_written_and_its_records_run_again_on_resume(tmp_path):
    from engine.pipeline.writer import DiskLow, scan_done_ids

    out = tmp_path / "res.jsonl"
    writer = JsonlWriter(out, {}, ordered=False, max_shard_bytes=100, flush_seconds=3600, min_free_gb=0.0)
    for i in (0, 1):  # 80 + 80 bytes: the second one fills shard 0
        writer.write(outcome(i, 5))
    writer.close()
    assert [r["id"] for r in read_jsonl(out)] == ["r0", "r1"]
    # The disk is "full": min_free_gb above what the file system has.
    too_much = free_gb(tmp_path) + 1000
    writer = JsonlWriter(out, {}, ordered=False, max_shard_bytes=100, flush_seconds=3600, min_free_gb=too_much,
                         done=scan_done_ids(out))
    writer.write(outcome(2, 5))
    writer.write(Outcome(3, {"id": "plain", "completion": "", "num_completion_tokens": 1}, False))  # held behind r2
    with pytest.raises(DiskLow) as info:
        writer.write(outcome(4, 5))
    message = str(info.value)
    assert message.startswith("disk low: ") and "res.activations/00001.safetensors (2 records" in message, message
    assert f"the {too_much:g} GB to keep free" in message and "Nothing of that shard was written" in message
    assert writer.num_results == 0 and writer.num_tokens == 0
    writer.write(outcome(5, 1))  # 16 bytes: buffered until close, which finds the disk still low
    with pytest.raises(DiskLow):
        writer.close()
    assert writer.results.closed and writer.errors.closed
    folder = activations_dir(out)
    assert [r["id"] for r in read_jsonl(out)] == ["r0", "r1"]  # everything before the refused shard, nothing after
    assert sorted(p.name for p in folder.iterdir()) == ["00000.safetensors", INDEX_NAME]
    assert [e["id"] for e in read_jsonl(folder / INDEX_NAME)] == ["r0", "r1"]
    # Space again (a lower limit): the same records run again, into the next shard; nothing lost or doubled.
    done = scan_done_ids(out)
    assert len(done) == 2 and "r1" in done and "r2" not in done
    writer = JsonlWriter(out, {}, ordered=False, max_shard_bytes=100, flush_seconds=3600, min_free_gb=0.0, done=done)
    for item in (outcome(2, 5), Outcome(3, {"id": "plain", "completion": "", "num_completion_tokens": 1}, False),
                 outcome(4, 5), outcome(5, 1)):
        writer.write(item)
    writer.close()
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == ["plain", "r0", "r1", "r2", "r4", "r5"] and len(ids) == len(set(ids))
    got = load(out)
    assert sorted(got) == ["r0", "r1", "r2", "r4", "r5"] and float(got["r4"][3][0, 0]) == 4.0
    assert sorted(e["id"] for e in read_jsonl(folder / INDEX_NAME)) == ["r0", "r1", "r2", "r4", "r5"]


def engine_run_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.apps.run", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_engine_run_refuses_to_start_on_a_low_disk_and_checks_the_option(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi"}])
    out = tmp_path / "out.jsonl"
    args = ["--input", source, "--output", out, "--model", TINY, "--device", "cpu", "--quiet"]
    result = engine_run(*map(str, args), "--min-free-gb", "1e9")
    assert result.returncode == 1, result.stderr
    assert "disk low: " in result.stderr and "below --min-free-gb = 1e+09" in result.stderr, result.stderr
    assert "Free some space (or lower --min-free-gb), then run the same command to resume" in result.stderr
    assert not out.exists()
    result = engine_run(*map(str, args), "--min-free-gb", "-1")
    assert result.returncode == 2 and "'-1': give the gigabytes to keep free as a number >= 0" in result.stderr


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_engine_run_stops_cleanly_when_the_disk_fills_before_a_shard_and_the_same_command_resumes(tmp_path):
    if free_gb(tmp_path) < 4:
        pytest.skip("needs 4 GB free disk to take 0.5 GB of it")
    plain = [{"id": f"p{i}", "prompt": PROMPTS[i], "max_new_tokens": 4} for i in range(6)]
    captured = [{"id": f"c{i}", "prompt": PROMPTS[i], "max_new_tokens": 250,  # seconds of decoding after the plain ones
                 "capture": {"layers": [1], "positions": "generated"}} for i in range(4)]
    source = write_jsonl(tmp_path / "in.jsonl", plain + captured)
    out = tmp_path / "out.jsonl"
    args = ["--input", source, "--output", out, "--model", TINY, "--device", "cpu", "--quiet", "--ignore-eos",
            "--max-num-seqs", "1"]  # one at a time: records finish in input order
    # The limit leaves 256 MB of today's free space; taking 512 MB once records are on disk puts the disk below it.
    proc = engine_run_cli(*args, "--min-free-gb", f"{free_gb(tmp_path) - 0.256:.3f}")
    # plain records are written as they come (synced every 2 s)
    wait_until(lambda: count_lines(out) >= len(plain), proc)
    with disk_taken(tmp_path, 512 << 20):
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    assert "engine-run: disk low: " in stderr and ".safetensors (" in stderr and "Nothing of that shard was written; " \
        "every record before it is on disk. Free some space (or lower --min-free-gb), then run the same command to " \
        "resume" in stderr, stderr
    ids = [r["id"] for r in read_jsonl(out)]
    everything = [r["id"] for r in plain + captured]
    assert len(plain) <= len(ids) < len(everything) and ids == everything[:len(ids)]
    assert not list(activations_dir(out).glob("*.tmp"))
    # The same command with a lower limit finishes: nothing lost, nothing twice, every capture readable.
    again = engine_run(*map(str, args), "--min-free-gb", "0")
    assert again.returncode == 0, again.stderr
    assert f"skipped {len(ids)} done" in again.stderr
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids) == sorted(everything) and len(ids) == len(set(ids))
    got = load(out)
    assert sorted(got) == sorted(r["id"] for r in captured) and all(got[i][1].shape == (249, 64) for i in got)
    assert sorted(e["id"] for e in read_jsonl(activations_dir(out) / INDEX_NAME)) == sorted(got)


def test_steering_and_capture_that_start_mid_run_recapture_nothing(tiny_source, tokenizer, vector, monkeypatch):
    """Hooks exist from the start and the buffers the decode graphs read are sized ahead, so requests that first
    steer (plain and norm-aware) and first capture generated tokens after the run began add no hook and re-capture
    no graph; only a steering table that outgrows its preallocated rows does (the count is not always zero)."""
    import engine.core.engine_core

    monkeypatch.setitem(engine.core.engine_core.STEERING_ROWS, "cpu", 3)  # row 0 (zero) and two vectors before it grows
    core = EngineCore(tiny_config(max_num_seqs=3), tiny_source)
    hooks = [len(layer._forward_hooks) for layer in core.recorder.layers]
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    plain = [dataclasses.replace(request(i, "generated"), capture=None) for i in range(3)]
    core.generate(plain, ids)
    assert core.runner.graph_stats["captures"] > 0 and core.runner.graph_stats["recaptures"] == 0

    mid_run = [request(3, "generated", specs_of(vector)[1]),
               request(4, "last_prompt", None, [3]),
               request(5, "generated",
                       {"vector": vector, "layers": [2], "coef": 2.0, "norm_match": True})]
    core.generate(mid_run, ids)
    again = [dataclasses.replace(r, index=r.index + 3) for r in mid_run]
    core.generate(again, ids)  # the same variants again: no new capture
    assert core.runner.graph_stats["recaptures"] == 0
    assert [len(layer._forward_hooks) for layer in core.recorder.layers] == hooks
    grown = [request(9 + i, "generated", {"vector": vector, "layers": [1], "coef": 5.0 + i})
             for i in range(3)]
    core.generate(grown, ids)  # two new rows: the table grows, and the steered graphs read the old one
    assert core.runner.graph_stats["recaptures"] > 0
