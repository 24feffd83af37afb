"""engine-bench: exact workloads, and all three systems end to end on CPU with identical greedy completions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from support import read_jsonl, write_jsonl
from engine_bench import monitor
from engine_bench import runner as bench
from engine_bench.cli import bench_main
from engine_bench.config import BenchConfig, BenchError
from engine_bench.monitor import GpuMonitor
from engine_bench.report import agreement, cpu_card, markdown, no_gpu_metrics, notes, references, system_metrics
from engine.config import ConfigError
from engine_bench.workloads import WORKLOADS, Prompt, Workload, WorkloadError, load_input, make_workload

NEW_TOKENS = [5, 12, 3, 9]  # unequal within each HF batch of 2, so the per-row cut of a static batch is tested


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_workload_prompts_encode_to_their_exact_length(tokenizer, name):
    spec = WORKLOADS[name]
    workload = make_workload(name, tokenizer, 6, seed=3)
    for p in workload.prompts:
        assert len(tokenizer(p.text)["input_ids"]) == p.num_prompt_tokens
        assert spec.min_prompt_tokens <= p.num_prompt_tokens <= spec.max_prompt_tokens
        assert spec.min_new_tokens <= p.max_new_tokens <= spec.max_new_tokens
    assert len({p.text for p in workload.prompts}) == 6
    assert len({p.num_prompt_tokens for p in workload.prompts}) > 1
    # Prompt i does not depend on how many prompts were asked for: the naive subset is a true prefix.
    assert make_workload(name, tokenizer, 2, seed=3).prompts == workload.prompts[:2]
    assert make_workload(name, tokenizer, 2, seed=4).prompts != workload.prompts[:2]


def test_input_file_errors_name_the_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "fine"}, {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(WorkloadError, match="line 2.*'prompt'"):
        load_input(str(path), tokenizer, 8)
    write_jsonl(path, [{"prompt": "a", "max_new_tokens": 0}])
    with pytest.raises(WorkloadError, match="line 1.*max_new_tokens"):
        load_input(str(path), tokenizer, 8)
    with pytest.raises(WorkloadError, match="no such file"):
        load_input(str(tmp_path / "missing.jsonl"), tokenizer, 8)


@pytest.mark.parametrize("bad, message", [
    (dict(systems=["naive", "vllm"]), "--systems"),
    (dict(workloads=["huge"]), "--workload"),
    (dict(sample_hz=5), "--sample-hz"),
    (dict(batch_sizes=[0]), "--batch-sizes"),
    (dict(device="tpu"), "--device"),
    (dict(append_results="/nowhere/RESULTS.md"), "--append-results"),
    (dict(steering_specs=[0]), "--steering-specs"),
    (dict(capture_layers=[1], capture_positions="first"), "--capture-positions"),
    (dict(is_e2e=True, systems=["naive"]), "--e2e --systems naive"),
    (dict(is_e2e=True, capture_layers=[1]), "--e2e times whole commands"),
    (dict(interventions=["erase"]), "--interventions erase: use a comma list of ablate"),
    (dict(is_e2e=True, systems=["hf"], steering_specs=[2]), "leaves engine-run out"),
])
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ConfigError, match=message):
        BenchConfig.from_dict(bad)


def test_the_bench_config_holds_its_engine_config_and_round_trips_its_flat_settings(tmp_path):
    import dataclasses

    from engine.config import EngineConfig, SamplingDefaults
    from engine_bench.config import ENGINE_SETTINGS, SAMPLING_SETTINGS

    assert set(ENGINE_SETTINGS) <= {f.name for f in dataclasses.fields(EngineConfig)}
    assert set(SAMPLING_SETTINGS) <= {f.name for f in dataclasses.fields(SamplingDefaults)}
    values = dict(model="random:tiny", tokenizer="tok.json", dtype="float32", max_num_seqs=8, max_model_len=300,
                  gpu_memory_fraction=0.5, cache_dir=str(tmp_path), max_new_tokens=9, temperature=0.5, top_p=0.75,
                  top_k=5, seed=11)
    assert set(values) == set(ENGINE_SETTINGS + SAMPLING_SETTINGS)
    bench_config = BenchConfig.from_dict({"device": "cpu", "trace": str(tmp_path), **values})
    config = bench_config.engine
    assert {name: getattr(config, name) for name in ENGINE_SETTINGS} == {n: values[n] for n in ENGINE_SETTINGS}
    assert {name: getattr(config.sampling, name) for name in SAMPLING_SETTINGS} == {
        n: values[n] for n in SAMPLING_SETTINGS}
    assert config.sampling.ignore_eos and config.return_tokens and config.device == "cpu"
    assert config.trace_dir == str(tmp_path)
    settings = bench_config.to_dict()  # a report's settings, and what a child process rebuilds its config from
    assert {n: settings[n] for n in values} == values and settings["trace"] == str(tmp_path)
    assert BenchConfig.from_dict(settings) == bench_config


def _done(system: str, ids: list[list[int]], seconds: float) -> dict:
    return {"system": system, "start": 100.0, "end": 100.0 + seconds, "first_result": 100.5, "cpu_s": seconds / 2,
            "token_ids": ids, "texts": [""] * len(ids), "num_generated_tokens": sum(map(len, ids)),
            "startup_s": 1.0, "attn": "sdpa"}


def test_subset_run_is_extrapolated_by_output_tokens_and_says_so():
    workload = Workload("t", 0, [Prompt(f"p{i}", "x", 3, n) for i, n in enumerate([10, 30, 20, 40])])
    naive = system_metrics(_done("naive", [[1] * 10, [2] * 30], 4.0), workload, no_gpu_metrics())
    assert naive["is_extrapolated"] and naive["num_prompts_run"] == 2
    assert naive["output_tokens_per_s"] == pytest.approx(10.0)  # 40 tokens in 4 s
    assert naive["wall_s"] == pytest.approx(10.0)  # all 100 tokens at that rate
    assert naive["prompts_per_s"] == pytest.approx(0.4) and naive["s_per_1k_prompts"] == pytest.approx(2500)
    assert naive["cpu_util_pct"] == pytest.approx(50) and naive["time_to_first_result_s"] == pytest.approx(0.5)
    assert naive["gpu_util_mean_pct"] is None and naive["ring_empty_share"] is None
    report = {"systems": [naive], "host": {"num_cpus": 2}, "settings": {"sample_hz": 20}, "agreement": {},
              "errors": [{"systems": "engine", "error": "engine: core failed: CUDA out of memory\ntraceback"}]}
    assert references([_done("naive", [[1]], 1.0), _done("hf-b2", [[1]] * 4, 1.0)], 4) == ["naive", "hf-b2"]
    assert references([_done("naive", [[1]] * 4, 1.0), _done("hf-b2", [[1]] * 4, 1.0)], 4) == ["naive"]
    assert any("first 2 of 4 prompts" in n and "extrapolated" in n for n in notes(report))
    assert notes(report)[0] == "**engine failed** and has no row: engine: core failed: CUDA out of memory"


def test_a_failing_system_is_reported_and_the_others_kept(monkeypatch):
    def fake_spawn_group(main, config, prompts, label):
        if main is bench.run_engine:
            raise BenchError("bench engine failed: CUDA out of memory")
        return [_done("naive", [[1, 2], [3, 4]], 1.0)]

    monkeypatch.setattr(bench, "spawn_group", fake_spawn_group)
    workload = Workload("t", 0, [Prompt("p0", "x", 3, 2), Prompt("p1", "y", 3, 2)])
    env = {"card": cpu_card(), "host": {"num_cpus": 2}, "dtype": "float32",
           "versions": {"torch": "t", "transformers": "t", "engine": "e", "commit": None}}
    report, _ = bench.run_workload(BenchConfig.from_dict({"device": "cpu"}), workload, None, env)
    assert [m["system"] for m in report["systems"]] == ["naive"]
    assert report["errors"] == [{"systems": "engine", "error": "bench engine failed: CUDA out of memory"}]
    assert "**engine failed** and has no row" in markdown(report)


def test_baselines_pad_with_the_model_configs_id_when_given_a_bare_tokenizer_json(tiny_source, tmp_path):
    import shutil

    from engine_bench.baselines import set_pad_token
    from engine.models import load_hf_tokenizer

    shutil.copy(Path(tiny_source.tokenizer_dir) / "tokenizer.json", tmp_path)  # no tokenizer_config.json: no roles
    bare = load_hf_tokenizer(str(tmp_path))
    assert bare.pad_token_id is None and bare.eos_token_id is None
    set_pad_token(bare, SimpleNamespace(pad_token_id=0, eos_token_id=1))
    assert bare.pad_token_id == 0
    nameless = load_hf_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="tokenizer_config.json names pad_token or eos_token"):
        set_pad_token(nameless, SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_agreement_counts_identical_sequences_and_prefixes():
    outputs = {"naive": [[1, 2, 3, 4], [5, 6]], "engine": [[1, 2, 9, 9], [5, 6], [7, 7]]}
    result = agreement(outputs, "naive")
    assert result["naive"]["num_identical"] == 2
    assert result["engine"] == {"reference": "naive", "num_compared": 2, "num_identical": 1, "mean_prefix_share": 0.75}


class FakeNvml:
    """Stands in for pynvml: the card is busy (95%) for 0.3 s, then nearly idle, with 2 of 80 GiB used."""

    def __init__(self):
        self.busy_until = time.monotonic() + 0.3

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("card", index)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=95 if time.monotonic() < self.busy_until else 5)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=2 << 30, total=80 << 30)

    def nvmlDeviceGetName(self, handle):
        return "Fake H100"

    def nvmlSystemGetDriverVersion(self):
        return "580.1"


def test_gpu_monitor_samples_at_10_hz_or_more_and_summarises_a_window(monkeypatch):
    monkeypatch.setattr(monitor, "_nvml", FakeNvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with GpuMonitor("cuda:1", 20) as gpu:
        start = time.monotonic()
        time.sleep(0.6)
        end = time.monotonic()
    assert gpu.handle == ("card", 5)  # NVML numbers cards ignoring CUDA_VISIBLE_DEVICES
    m = gpu.window(start, end)
    assert m["gpu_sample_hz"] >= 10 and m["gpu_samples"] >= 8
    assert 0.25 < m["gpu_util_above_90_share"] < 0.75 and 5 < m["gpu_util_mean_pct"] < 95
    assert m["gpu_mem_peak_gib"] == 2
    assert len(m["gpu_util_samples"]) == m["gpu_samples"]  # kept in order, to see where a window's low samples fall
    assert gpu.window(end + 10, end + 11) == no_gpu_metrics()  # a window without samples is n/a, not zero
    assert gpu.card("cuda:1")["name"] == "Fake H100" and gpu.card("cuda:1")["memory_gib"] == 80


def test_gpu_monitor_window_reads_the_cards_a_row_ran_on(monkeypatch):
    class TwoCards(FakeNvml):  # card 1 stays idle: a one-card row must not be diluted by it
        def nvmlDeviceGetUtilizationRates(self, handle):
            return SimpleNamespace(gpu=90 if handle == ("card", 0) else 10)

    monkeypatch.setattr(monitor, "_nvml", TwoCards)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with GpuMonitor(["cuda:0", "cuda:1"], 20) as gpu:
        start = time.monotonic()
        time.sleep(0.3)
        end = time.monotonic()
    one, both = gpu.window(start, end), gpu.window(start, end, num_cards=2)
    assert one["gpu_util_mean_pct"] == 90 and both["gpu_util_mean_pct"] == 50
    assert one["gpu_mem_peak_gib"] == 2 and both["gpu_mem_peak_gib"] == 4


def input_and_results(folder: Path, tokenizer, workload: str) -> tuple[Path, Path, list[dict]]:
    """(an --input file of the workload's first prompts with NEW_TOKENS new tokens each, a RESULTS.md, its rows)."""
    prompts = make_workload(workload, tokenizer, len(NEW_TOKENS)).prompts
    rows = [{"id": p.id, "prompt": p.text, "max_new_tokens": n} for p, n in zip(prompts, NEW_TOKENS)]
    return write_jsonl(folder / "prompts.jsonl", rows), write_jsonl(folder / "RESULTS.md", ["# Results"]), rows


@pytest.fixture(scope="module")
def cpu_run(tokenizer, tmp_path_factory):
    """All three systems over one input file on CPU: varied prompt lengths, unequal new-token counts."""
    folder = tmp_path_factory.mktemp("bench")
    source, results, rows = input_and_results(folder, tokenizer, "varied")
    with pytest.MonkeyPatch.context() as patch:
        # One thread per spawned process: on a 2-core CI runner the systems' threads would otherwise fight.
        patch.setenv("OMP_NUM_THREADS", "1")
        code = bench_main(["--model", "random:tiny", "--device", "cpu", "--input", str(source), "--naive-prompts", "4",
                           "--batch-sizes", "2,4", "--max-num-seqs", "4", "--out", str(folder / "out"),
                           "--save-outputs", "--append-results", str(results), "--quiet"])
    assert code == 0
    return folder, rows


def test_cpu_run_systems_give_identical_greedy_completions(cpu_run):
    folder, rows = cpu_run
    outputs = read_jsonl(next((folder / "out").glob("*-outputs.jsonl")))
    by_system: dict[str, dict[str, list[int]]] = {}
    for record in outputs:
        by_system.setdefault(record["system"], {})[record["id"]] = record["completion_token_ids"]
        assert isinstance(record["completion"], str) and record["completion"]
    assert list(by_system) == ["naive", "hf-b2", "hf-b4", "engine"]
    naive = by_system["naive"]
    assert [len(naive[r["id"]]) for r in rows] == NEW_TOKENS
    assert len({tuple(ids[:3]) for ids in naive.values()}) == len(rows)  # real, prompt-dependent generations
    for system, ids in by_system.items():
        assert ids == naive, f"{system} differs from the naive loop"


def test_cpu_run_writes_json_table_chart_and_results(cpu_run, tokenizer):
    folder, rows = cpu_run
    report = json.loads(next((folder / "out").glob("prompts-*.json")).read_text())
    assert report["card"]["name"].startswith("CPU") and report["card"]["driver"] is None
    assert {"torch", "transformers", "python"} <= set(report["versions"])
    assert report["settings"]["batch_sizes"] == [2, 4] and report["workload"]["num_output_tokens"] == sum(NEW_TOKENS)
    longest = max(len(tokenizer(r["prompt"])["input_ids"]) + r["max_new_tokens"] for r in rows)
    assert report["settings"]["max_model_len"] == longest  # the engine's cache is sized to the workload
    assert report["errors"] == []
    assert list(report["agreement"]) == ["naive"]  # the naive loop ran every prompt: one reference is enough
    by_name = {m["system"]: m for m in report["systems"]}
    for m in by_name.values():
        assert m["num_prompts_run"] == len(rows) and not m["is_extrapolated"]
        assert m["wall_s"] > 0 and m["output_tokens_per_s"] > 0 and m["cpu_util_pct"] > 0
        assert 0 < m["time_to_first_result_s"] <= m["wall_s"]
        assert m["gpu_util_mean_pct"] is None and m["gpu_mem_peak_gib"] is None
        assert m.get("torch_reserved_peak_gib") is None  # the engine core's allocator peaks: CUDA only
        assert report["agreement"]["naive"][m["system"]]["num_identical"] == len(rows)
    assert by_name["hf-b2"]["num_generated_tokens"] == 2 * 12 + 2 * 9  # each batch runs to its longest row
    assert 0 <= by_name["engine"]["ring_empty_share"] <= 1
    assert 0 <= by_name["engine"]["first_work_s"] <= by_name["engine"]["time_to_first_result_s"]
    assert 0 <= by_name["engine"]["last_result_after_last_work_s"] < by_name["engine"]["measured_wall_s"]
    table = next((folder / "out").glob("prompts-*.md")).read_text()
    assert table == markdown(report)
    engine_row = next(line for line in table.splitlines() if line.startswith("| engine |"))
    assert engine_row.count("n/a") == 3  # GPU util, >90%, memory: not zero on a CPU run
    assert next((folder / "out").glob("prompts-*.png")).read_bytes()[:4] == b"\x89PNG"
    results = (folder / "RESULTS.md").read_text()
    assert results.startswith("# Results") and "| hf-b4 |" in results and report["card"]["name"] in results


@pytest.mark.gpu
def test_gpu_run_samples_nvml(tmp_path):
    tokenizer = os.environ.get("ENGINE_GPU_TEST_TOKENIZER")  # a GPU machine may lack the embedded model's package
    code = bench_main(["--model", "random:tiny", "--device", "cuda", "--workload", "short", "--num-prompts", "8",
                       "--naive-prompts", "2", "--batch-sizes", "8", "--max-num-seqs", "8", "--out", str(tmp_path),
                       "--quiet", *(["--tokenizer", tokenizer] if tokenizer else [])])
    assert code == 0
    report = json.loads(next(Path(tmp_path).glob("short-*.json")).read_text())
    assert report["card"]["driver"]
    for m in report["systems"]:
        assert m["gpu_util_mean_pct"] is not None and m["gpu_mem_peak_gib"] > 0
        assert m["gpu_sample_hz"] is None or m["gpu_sample_hz"] >= 10
    assert next(m for m in report["systems"] if m["system"] == "naive")["is_extrapolated"]
    engine = next(m for m in report["systems"] if m["system"] == "engine")
    assert 0 < engine["torch_allocated_peak_gib"] <= engine["torch_reserved_peak_gib"] <= engine["gpu_mem_peak_gib"]


def test_engine_under_steering_and_capture_adds_engine_rows(tmp_path):
    code = bench_main(["--model", "random:tiny", "--device", "cpu", "--workload", "short", "--systems", "engine",
                       "--num-prompts", "3", "--steering-specs", "3", "--steering-layers", "1,3", "--max-num-seqs", "4",
                       "--capture-layers", "0,2", "--out", str(tmp_path), "--save-outputs", "--quiet",
                       "--trace", str(tmp_path / "trace"), "--also-model", "random:tiny",
                       "--interventions", "ablate,clamp,sae,sae-capture,gated"])
    assert code == 0
    outputs = read_jsonl(next(tmp_path.glob("*-outputs.jsonl")))
    by_system: dict[str, dict[str, list[int]]] = {}
    for record in outputs:
        by_system.setdefault(record["system"], {})[record["id"]] = record["completion_token_ids"]
    ops = ["ablate", "clamp", "sae", "sae-capture", "gated"]
    assert list(by_system) == ["engine", "engine+steer3@L1,3", *(f"engine+{op}" for op in ops),
                               "engine+capture@L0,2:last_prompt", "engine (random:tiny)"]
    plain, steered, *intervened, captured, again = by_system.values()
    assert captured == plain == intervened[3]  # capturing (hidden states, SAE features) changes nothing it generates
    assert all(rows != plain for op, rows in zip(ops, intervened) if op != "sae-capture")  # each op was applied
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert any(note.startswith("engine+ablate: ") and "x engine's output tok/s" in note for note in report["notes"])
    assert again == plain  # --also-model: the same model in its own engine, a row of its own
    assert [len(v) for v in steered.values()] == [len(v) for v in plain.values()] == [150] * 3
    assert steered != plain  # the vectors really were applied
    runs = read_jsonl(tmp_path / "trace" / "runs.jsonl")
    assert [r["system"] for r in runs] == list(by_system)[:-1]  # the --also-model engine writes no trace
    timeline = read_jsonl(tmp_path / "trace" / "core0.jsonl")
    steps = [e for e in timeline if "step" in e]
    assert sum(e["admitted"] for e in steps) >= 3 * 3  # each run's prompts (and the warm-ups) were admitted
    # an iteration's "at" is its start, before it admits the prompts that mark a run's first work
    in_run = [e for e in steps if any(r["first_work"] - 0.1 <= e["at"] <= r["last_work"] for r in runs)]
    assert {e["step"] for e in in_run} >= {"prefill", "decode"}
    assert all(e["launch_ms"] >= 0 and e.get("wait_ms", 0) >= 0 for e in in_run)
    assert sum(e["size"] for e in in_run if e["step"] == "decode") >= 3 * 149 * 3  # 149 decode tokens a prompt


# ---------------------------------------------------------------- --e2e: whole commands, cold and warm


E2E_LABELS = ["engine-run cold", "engine-run warm", "engine-run steered-1 warm", "engine-run steered-2 warm",
              "engine-run kept-alive warm", "engine-run kept-alive loaded", "hf-script b2 cold", "hf-script b2 warm",
              "hf-script b4 cold", "hf-script b4 warm"]


@pytest.fixture(scope="module")
def e2e_run(tokenizer, tmp_path_factory):
    """engine-run and the user's script (batches of 2 and 4) as whole commands on CPU, cold and warm, and engine-run
    steered by 1 and by 2 vectors (warm), and with --keep-alive (starting its resident engine, then finding it);
    unequal new-token counts, few of them, since process start-ups are what
    this measures."""
    folder = tmp_path_factory.mktemp("e2e")
    source, results, rows = input_and_results(folder, tokenizer, "short")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # the children inherit it: one thread each on a 2-core runner
        code = bench_main(["--e2e", "--model", "random:tiny", "--device", "cpu", "--input", str(source),
                           "--batch-sizes", "2,4", "--steering-specs", "1,2", "--steering-layers", "1", "--keep-alive",
                           "--out", str(folder / "out"), "--append-results", str(results), "--quiet"])
    assert code == 0
    return folder, json.loads(next((folder / "out").glob("prompts-e2e-*.json")).read_text())


def test_e2e_runs_each_system_cold_and_warm_and_times_its_phases(e2e_run):
    report = e2e_run[1]
    assert report["mode"] == "e2e" and report["errors"] == []
    assert [m["label"] for m in report["runs"]] == E2E_LABELS
    for m in report["runs"]:
        stamps = m["stamps_s"]
        ready = stamps["engine_ready" if m["program"] == "engine-run" else "load_done"]
        assert 0 < stamps["imports_done"] <= ready <= stamps["first_result"] <= stamps["last_result"] <= stamps["exit"]
        assert m["exit_code"] == 0 and m["launch_s"] >= 0
        # The process start is read from /proc in clock ticks: a first result at the very end of a command (the
        # kept-alive run, which has no engine to stop after it) may read up to a tick past the command's end.
        assert 0 < m["time_to_first_result_s"] < m["wall_s"] + 1 / os.sysconf("SC_CLK_TCK")
        assert sum(v or 0 for v in m["phases_s"].values()) == pytest.approx(m["wall_s"], abs=0.05)
        assert m["phases_s"]["generation"] > 0 and (m["phases_s"]["load"] > 0) == (m["cache"] != "loaded")
        assert m["num_output_tokens"] == sum(NEW_TOKENS) and m["output_tokens_per_s"] > 0
        assert m["gpu_util_mean_pct"] is None and m["gpu_util_generation_pct"] is None
        if m["num_steering_specs"] is None:
            assert report["agreement"]["engine-run cold"][m["label"]]["num_identical"] == len(NEW_TOKENS)
    engine = report["runs"][0]
    assert {"imports", "tokenizer", "load"} <= set(engine["core_phases"]["0"])
    assert engine["phases_s"]["compile"] is None  # no torch.compile on CPU: n/a, not zero
    assert "--max-num-seqs" not in engine["command"]  # engine-run's own default is what is measured
    assert report["best_batch_size"] in (2, 4) and set(report["ratios"]) == {"cold", "warm"}
    best = next(m for m in report["runs"] if m["label"] == f"hf-script b{report['best_batch_size']} warm")
    assert report["ratios"]["warm"]["best_script_over_engine"] == pytest.approx(best["vs_engine_run"])
    model = Path(report["model_dir"])
    assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file()


def _completions(folder: Path) -> dict[str, list[int]]:
    """A run's completion token ids by prompt id (engine-run writes its records as they finish)."""
    return {r["id"]: r["completion_token_ids"] for r in read_jsonl(folder / "results.jsonl")}


def test_e2e_steered_engine_runs_share_the_warm_cache_and_are_compared_with_it(e2e_run):
    report = e2e_run[1]
    runs = {m["label"]: m for m in report["runs"]}
    plain = runs["engine-run warm"]
    assert set(report["steered_ratios"]) == {"engine-run steered-1", "engine-run steered-2"}
    assert set(report["agreement"]["engine-run cold"]) == {m["label"] for m in runs.values()
                                                            if m["num_steering_specs"] is None}
    run_dir = Path(report["run_dir"])
    completions = {}
    for count in (1, 2):
        m = runs[f"engine-run steered-{count} warm"]
        assert m["system"] == f"engine-run steered-{count}" and m["program"] == "engine-run"
        assert m["cache"] == "warm" and m["num_steering_specs"] == count
        assert m["vs_unsteered_speed"] == pytest.approx({"whole_command": plain["wall_s"] / m["wall_s"],
                                                         "generation": plain["generation_s"] / m["generation_s"]})
        assert report["steered_ratios"][m["system"]]["is_within_target"] == (
            m["vs_unsteered_speed"]["whole_command"] >= 0.95)
        argv = m["command"]
        assert argv[argv.index("--input") + 1] == str(run_dir / f"prompts-engine-run-steered-{count}.jsonl")
        records = read_jsonl(run_dir / f"prompts-engine-run-steered-{count}.jsonl")
        vectors = [r["steering"]["vector"] for r in records]
        assert len(set(vectors)) == count and vectors[count % len(vectors)] == vectors[0]
        assert all(r["steering"]["layers"] == [1] and Path(r["steering"]["vector"]).is_file() for r in records)
        completions[count] = _completions(run_dir / f"engine-run-steered-{count}-warm")
        assert [len(completions[count][r["id"]]) for r in records] == NEW_TOKENS
    assert completions[1] != _completions(run_dir / "engine-run-warm")  # the vectors really were applied
    assert not (Path(report["settings"]["out"]) / "e2e-cache" / "engine-run-steered-1").exists()  # the plain cache


def test_e2e_kept_alive_rows_run_in_one_resident_engine_which_ends_after_them(e2e_run):
    report = e2e_run[1]
    runs = {m["label"]: m for m in report["runs"]}
    started, loaded = runs["engine-run kept-alive warm"], runs["engine-run kept-alive loaded"]
    assert started["system"] == loaded["system"] == "engine-run kept-alive" and "--keep-alive" in loaded["command"]
    run_dir = Path(report["run_dir"])
    pid = re.search(r"resident engine pid (\d+) \(started\)",
                    (run_dir / "engine-run-kept-alive-warm" / "stderr.log").read_text()).group(1)
    assert f"resident engine pid {pid} (already loaded)" in (run_dir / "engine-run-kept-alive-loaded" /
                                                            "stderr.log").read_text()
    assert loaded["core_phases"] == {} and started["core_phases"]["0"]["load"] > 0
    assert loaded["vs_engine_run"] == pytest.approx(loaded["wall_s"] / runs["engine-run warm"]["wall_s"])
    env = {**os.environ, "ENGINE_CACHE_DIR": str(Path(report["settings"]["out"]) / "e2e-cache" / "engine-run" /
                                                 "engine")}
    status = subprocess.run([sys.executable, "-m", "engine.apps.resident", "status"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert "no resident engine for" in status.stderr, status.stderr  # the bench ended it


def test_e2e_writes_json_table_chart_and_results(e2e_run):
    from engine_bench.e2e_report import e2e_markdown
    from engine.apps.run import run_parser

    folder, report = e2e_run
    out = folder / "out"
    table = next(out.glob("prompts-e2e-*.md")).read_text()
    assert table == e2e_markdown(report)
    default = run_parser().get_default("max_num_seqs")
    assert f"| engine-run | cold | max_num_seqs {'auto' if default is None else default} (default) |" in table
    assert "| hf-script | warm | 4" in table and report["command"].startswith("engine-bench --e2e") and (
        report["command"] in table)
    assert "| engine-run steered-2 | warm | max_num_seqs" in table and "speed × unsteered, generation" in table
    assert "hf-script is not run steered" in table and "≥ 0.95×" in table and "not compared (steered)" in table
    assert next(out.glob("prompts-e2e-*.png")).read_bytes()[:4] == b"\x89PNG"
    results = (folder / "RESULTS.md").read_text()
    assert results.startswith("# Results") and "whole command, cold and warm" in results
    assert results.count("| hf-script |") == 4


def test_engine_run_writes_its_timings_file(e2e_run):
    """engine-run --timings, as the e2e engine runs wrote it: wall-clock stamps in order and the cores' phases."""
    report = e2e_run[1]
    timings = json.loads((Path(report["run_dir"]) / "engine-run-cold" / "timings.json").read_text())
    order = ["process_start", "imports_done", "engine_ready", "first_result", "last_result", "exit"]
    assert [timings[k] for k in order] == sorted(timings[k] for k in order)
    assert time.time() - 600 < timings["process_start"] < timings["exit"] < time.time()
    assert timings["core_phases"]["0"]["load"] > 0


def test_run_timings_is_a_no_op_without_a_path_and_refuses_a_missing_folder(tmp_path):
    from engine.apps.run import RunTimings

    quiet = RunTimings(None)
    quiet.mark("first_result")
    quiet.write({})
    assert "first_result" not in quiet.stamps
    with pytest.raises(ConfigError, match="--timings .*does not exist"):
        RunTimings(str(tmp_path / "missing" / "t.json"))
    timings = RunTimings(str(tmp_path / "t.json"))
    timings.mark("first_result")
    first = timings.stamps["first_result"]
    timings.mark("first_result")  # the first stamp is kept
    timings.write({0: {"load": 1.0}})
    written = json.loads((tmp_path / "t.json").read_text())
    assert written["first_result"] == first and written["core_phases"] == {"0": {"load": 1.0}}
    assert written["process_start"] <= written["imports_done"] <= written["exit"]


def test_e2e_cold_runs_start_from_empty_caches(tmp_path):
    from engine_bench.e2e import CACHE_VARS, cache_env

    root = tmp_path / "cache"
    env = cache_env(root, "cold")
    assert {env[var] for var in CACHE_VARS} == {str(root / name) for name in CACHE_VARS.values()}
    (root / "inductor" / "kernel.py").write_text("# compiled")
    assert cache_env(root, "warm")["TORCHINDUCTOR_CACHE_DIR"] == str(root / "inductor")
    assert (root / "inductor" / "kernel.py").exists()  # warm: what the cold run left
    cache_env(root, "cold")
    assert not (root / "inductor" / "kernel.py").exists() and (root / "inductor").is_dir()


def test_e2e_failed_command_names_itself_and_shows_its_stderr(tmp_path):
    from engine_bench.e2e import read_results, run_command

    argv = [sys.executable, "-c", "import sys; sys.stderr.write('CUDA out of memory'); sys.exit(3)"]
    with pytest.raises(BenchError, match="(?s)engine-run cold exited with code 3.*CUDA out of memory"):
        run_command("engine-run cold", argv, tmp_path / "run", dict(os.environ))
    write_jsonl(tmp_path / "results.jsonl", [{"id": "p0", "completion": "x", "completion_token_ids": [1, 2]}])
    workload = Workload("t", 0, [Prompt("p0", "x", 3, 2), Prompt("p1", "y", 3, 2)])
    with pytest.raises(BenchError, match="1 of 2 prompts have no record .*first: p1"):
        read_results("engine-run cold", tmp_path / "results.jsonl", workload)


def test_run_files_are_named_by_workload_card_and_commit():
    from engine_bench.report import run_stem

    stem = run_stem({"card": {"name": "2x NVIDIA H100 80GB HBM3"}, "versions": {"commit": "abc1234"}}, "long-e2e")
    assert re.fullmatch(r"long-e2e-2x-h100-80gb-hbm3-abc1234-\d{8}-\d{6}", stem)
    stem = run_stem({"card": cpu_card(), "versions": {"commit": None}}, "short")
    assert stem.startswith("short-cpu-") and "-uncommitted-" in stem
