"""engine-sweep: the sweep file, plan expansion (ids, seeds, hash), the output directory's refusal / --force /
--extend, runs with the real engine (random:tiny) killed and resumed, and the report's numbers."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support import ROOT, read_jsonl, write_jsonl
from support.processes import disk_taken, engine_sweep, make_sweep, wait_until

from engine.pipeline.request import derive_seed
from engine.apps.sweep.fields import SweepError
from engine.apps.sweep.outdir import ERRORS, RESULTS, prepare_directory
from engine.apps.sweep.plan import Plan
from engine.apps.sweep.spec import load_sweep
from engine.apps.sweep.report import write_report

def plan_ids(path: Path) -> dict[str, int]:
    plan = Plan(load_sweep(path))
    return {record["id"]: record["seed"] for model in plan.config.models for _, record in plan.requests(model)}


# ---------------------------------------------------------------- plan expansion
def test_ids_and_seeds_are_stable_and_independent_of_file_order(tmp_path):
    path = make_sweep(tmp_path / "a")
    plan = Plan(load_sweep(path))
    ids = plan_ids(path)
    assert len(ids) == 5 * 2 * 2  # (baseline + 2 layer sets x 2 coefs) x 2 prompts x 2 samples
    assert "tiny/none/prompts/hello/s0" in ids and "tiny/v@L0,2*4.0/prompts/2/s1" in ids
    assert all(seed == derive_seed(5, request_id) for request_id, seed in ids.items())
    # The same sweep written as JSON with its sections and axes in another order: same hash, ids and seeds.
    table = {"grid": {"baseline": True, "coefs": [4, 0.0], "layers": [[2, 0], 1], "vectors": ["v"]},
             "engine": {"max_num_seqs": 16, "device": "cpu"},  # speed settings are not part of the hash
             "generation": {"ignore_eos": True, "temperature": 0.9, "max_new_tokens": 4},
             "vectors": {"v": "v.npy"}, "prompts": ["prompts.jsonl"], "samples": 2, "seed": 5, "output": "elsewhere",
             "models": [{"label": "tiny", "model": "random:tiny"}]}
    (tmp_path / "a" / "same.json").write_text(json.dumps(table))
    assert Plan(load_sweep(tmp_path / "a" / "same.json")).config_hash == plan.config_hash
    assert plan_ids(tmp_path / "a" / "same.json") == ids
    # Requests go sample > prompt > point, so a sweep stopped early has every point about equally far along.
    first = [record["sweep"]["point"] for _, record in list(plan.requests(plan.config.models[0]))[:5]]
    assert first == ["none", "v@L1*0.0", "v@L1*4.0", "v@L0,2*0.0", "v@L0,2*4.0"]
    record = next(r for _, r in plan.requests(plan.config.models[0]) if r["id"] == "tiny/v@L1*4.0/prompts/hello/s1")
    assert record["steering"] == {"vector": str(tmp_path / "a" / "v.npy"), "layers": [1], "coef": 4.0,
                                  "positions": "all"}
    assert record["topic"] == "greeting" and record["sweep"]["coef"] == 4.0 and record["sweep"]["sample"] == 1


def test_paired_seeds_share_noise_across_points_and_a_prompts_own_seed_is_replaced(tmp_path):
    path = make_sweep(tmp_path, num_prompts=3)
    ids = plan_ids(path)
    assert len({seed for i, seed in ids.items() if i.endswith("/story/s0")}) == 5  # independent by default
    path.write_text("paired_seeds = true\n" + path.read_text())
    paired = plan_ids(path)
    assert {seed for i, seed in paired.items() if i.endswith("/story/s0")} == {derive_seed(5, "prompts/story/s0")}
    assert paired["tiny/none/prompts/story/s0"] != paired["tiny/none/prompts/story/s1"]


BAD_FILES = [
    ("coefs = [0, 4]", "coefs = [0, 4, \"x\"]", "grid.coefs[2] must be a number, got \"x\""),
    ("coefs = [0, 4]", "coef = [0, 4]", "unknown key(s) ['coef'] in [grid]"),
    ("layers = [1, [0, 2]]", "layers = [1, [0, -2]]", "grid.layers[1][1] is -2; it must be at least 0"),
    ("vectors = [\"v\"]", "vectors = [\"w\"]", "grid.vectors[0] 'w' is not in [vectors]"),
    ("samples = 2", "samples = 0", "samples is 0; it must be at least 1"),
    ("samples = 2", "samples = 100000000000000000000",
     "samples is 100000000000000000000; it must be at most 1,000,000"),
    ("label = \"tiny\"", "label = \"a/b\"", "models[0].label is 'a/b'"),
    ("v = \"v.npy\"", "v = \"missing.npy\"", "vectors.v:"),
    ("temperature = 0.9", "temperature = -1", "generation: temperature"),  # SamplingDefaults' check, its field named
    ("temperature = 0.9", "temperature = 0.9\ntop_p = 0", "generation: top_p"),
    ("temperature = 0.9", "temperature = nan", "generation.temperature is NaN; give a finite number"),
    ("temperature = 0.9", "temperature = -inf", "generation.temperature is -Infinity; give a finite number"),
    ("temperature = 0.9", "temperature = 0.9\ntop_p = inf", "generation.top_p is Infinity; give a finite number"),
    ("temperature = 0.9", "temperature = 0.9\nstop = [\"\"]", "generation.stop[0] must be a non-empty string"),
    ("coefs = [0, 4]", "coefs = [0, 4, 1e39]", "grid.coefs[2] is 1e+39"),  # float64, beyond float32: as records
    ("coefs = [0, 4]", "coefs = [-1e39, 4]", "grid.coefs[0] is -1e+39"),
    ("coefs = [0, 4]", "coefs = [0, nan]", "grid.coefs[1] is NaN; give a finite number"),
    ("ignore_eos = true", "ignore_eos = 1", "generation.ignore_eos must be true or false"),
    ("baseline = true", "baseline = true\npositions = [\"everywhere\"]", "grid.positions[0] is \"everywhere\""),
    ("max_num_seqs = 4", "max_num_seqs = \"4\"", "engine.max_num_seqs must be an integer"),
    ("device = \"cpu\"", "device = \"tpu\"", "engine: --device 'tpu'"),
    ("device = \"cpu\"", "device = \"cpu\"\nmodel = \"x\"", "unknown key(s) ['model'] in [engine]; known: dtype,"),
    ("device = \"cpu\"", "device = \"cpu\"\ncompile = \"sometimes\"", "engine: --compile 'sometimes'"),
    ("seed = 5", "seed = 5\n[[metrics]]\nregex = \"(\"", "metrics[0].regex '(' is not a valid regular expression"),
    ("coefs = [0, 4]", "coefs = [0, 4, 4.0]", "grid: the point v@L1*4.0 comes out twice"),
    ("seed = 5", "seed = 5\n[[metrics]]\nname = \"coef\"\nregex = \"a\"", "metrics[0].name 'coef' is a column"),
    ("seed = 5", "seed = 5\n[[metrics]]\nlogprob = 1", "metrics[0].logprob is 1; write logprob = true"),
    ("seed = 5", "seed = 5\nmodels = []", "Cannot overwrite a value"),  # a TOML syntax error is reported as such
]


@pytest.mark.parametrize("old,new,message", BAD_FILES, ids=[b[2][:30] for b in BAD_FILES])
def test_a_bad_sweep_file_names_the_field(tmp_path, old, new, message):
    path = make_sweep(tmp_path)
    text = path.read_text()
    assert old in text
    if new.startswith("seed = 5\n["):  # a table must come after the top-level keys
        text, new = text + new[len("seed = 5\n"):], old
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(SweepError) as info:
        Plan(load_sweep(path))
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value), str(info.value)


def test_a_bad_prompt_line_names_file_and_line_and_the_cli_says_it_in_one_line(tmp_path):
    path = make_sweep(tmp_path)
    with (tmp_path / "prompts.jsonl").open("a") as f:
        f.write('{"prompt": "x", "steering": null}\n')
    result = engine_sweep(path)
    assert result.returncode == 1
    assert "prompts.jsonl line 3: field(s) ['steering'] are set by the sweep" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def json_sweep(folder: Path, change) -> Path:
    """The test sweep as a JSON file, changed by `change(table)`: JSON holds what TOML cannot (huge integers)."""
    import tomllib

    table = tomllib.loads(make_sweep(folder).read_text())
    change(table)
    path = folder / "sweep.json"
    path.write_text(json.dumps(table))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda t: t["grid"].update(coefs=[0, 10 ** 400]), "grid.coefs[1] is an integer of 401 digits"),
    (lambda t: t["grid"].update(coefs=[10 ** 39]), "grid.coefs[0] is 1e+39"),
    (lambda t: t["generation"].update(temperature=float("nan")), "generation.temperature is NaN"),
    (lambda t: t["generation"].update(max_new_tokens=10 ** 30), "generation: max_new_tokens"),
    (lambda t: t["generation"].update(top_k=2 ** 70), "generation: top_k"),
    (lambda t: t.update(seed=2 ** 64), "seed is 18446744073709551616"),
    (lambda t: t.update(min_free_gb=10 ** 400), "min_free_gb is an integer of 401 digits"),
], ids=["coef-huge-int", "coef-1e39", "nan", "max_new_tokens", "top_k", "seed", "min_free_gb"])
def test_a_json_sweep_file_names_the_field_of_a_number_out_of_range(tmp_path, change, message):
    path = json_sweep(tmp_path, change)
    with pytest.raises(SweepError) as info:
        load_sweep(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value), str(info.value)


def test_every_grid_point_goes_through_the_record_parser(tmp_path, monkeypatch):
    import engine.apps.sweep.spec as sweep_module
    from engine.pipeline.request import RecordError, parse_steering

    seen = []

    def parse(value, where="field 'steering'"):
        seen.append(where)
        if where == "grid point v@L0,2*4.0":
            raise RecordError(f"{where}.layers: refused for the test")
        return parse_steering(value, where)

    monkeypatch.setattr(sweep_module, "parse_steering", parse)
    path = make_sweep(tmp_path)
    with pytest.raises(SweepError, match=r"sweep.toml: grid point v@L0,2\*4.0.layers: refused for the test"):
        load_sweep(path)
    assert {"grid.coefs[0]", "grid.coefs[1]", "grid point v@L1*0.0", "grid point v@L1*4.0"} <= set(seen)


def test_a_grid_without_layers_steers_each_vector_at_the_layers_its_file_names(tmp_path):
    """grid.layers left out: each vector's point steers the layers its file names, read from its header, so the
    point keys, the records' steering and the report name them; a file of one unnamed vector is refused by name."""
    import torch
    from engine.vectors import save_vectors

    path = make_sweep(tmp_path)
    save_vectors(str(tmp_path / "w.safetensors"), {1: torch.ones(64), 3: -torch.ones(64)})
    save_vectors(str(tmp_path / "g.gguf"), {2: torch.ones(64)})
    text = path.read_text().replace('v = "v.npy"', 'v = "v.npy"\nw = "w.safetensors"\ng = "g.gguf"')
    path.write_text(text.replace('vectors = ["v"]\nlayers = [1, [0, 2]]', 'vectors = ["w", "g"]'))
    plan = Plan(load_sweep(path))
    assert [p.key for p in plan.points] == ["none", "w@L1,3*0.0", "w@L1,3*4.0", "g@L2*0.0", "g@L2*4.0"]
    record = next(r for _, r in plan.requests(plan.config.models[0]) if r["sweep"]["point"] == "w@L1,3*4.0")
    assert record["steering"]["layers"] == [1, 3] and record["sweep"]["layers"] == [1, 3]
    path.write_text(text.replace('vectors = ["v"]\nlayers = [1, [0, 2]]', 'vectors = ["w", "v"]'))
    with pytest.raises(SweepError) as info:
        load_sweep(path)
    assert str(info.value) == (f"{path}: grid.layers is missing, and vector 'v' ({tmp_path / 'v.npy'}) is one vector "
                               "with no layer named; give the layers to steer, e.g. layers = [6]")


# ---------------------------------------------------------------- the output directory
def sweep_main_in_process(path: Path, *args, capsys) -> tuple[int, str]:
    from engine.apps.sweep.cli import sweep_main

    code = sweep_main([str(path), *map(str, args)])
    return code, capsys.readouterr().err


def test_an_output_that_is_a_file_is_refused_before_anything_starts(tmp_path, capsys):
    path = make_sweep(tmp_path)
    (tmp_path / "out").write_text("my notes\n")
    result = engine_sweep(path)
    assert result.returncode == 1
    assert result.stderr == (f"engine-sweep: output {tmp_path / 'out'} is a file; a sweep writes a directory; choose "
                             f"another output (the sweep file's `output`, or --output)\n"), result.stderr
    assert (tmp_path / "out").read_text() == "my notes\n"
    code, err = sweep_main_in_process(path, "--force", capsys=capsys)  # --force does not set a file aside either
    assert code == 1 and "is a file; a sweep writes a directory" in err and "resume" not in err
    assert (tmp_path / "out").read_text() == "my notes\n"


def test_an_output_that_cannot_be_made_or_written_is_refused_before_anything_starts(tmp_path, capsys):
    path = make_sweep(tmp_path)
    (tmp_path / "a-file").write_text("x")
    cases = [(tmp_path / "a-file" / "sweep",
              f"{tmp_path / 'a-file'} is a file, not a folder, so nothing can be made under it"),
             (tmp_path / ("x" * 300), "cannot use it (File name too long")]
    if Path("/proc/self").is_dir():  # a folder nobody may write in, even root
        cases.append((Path("/proc/engine-sweep-test"), "cannot write in /proc ("))
    for out, fragment in cases:
        code, err = sweep_main_in_process(path, "--output", out, capsys=capsys)
        assert code == 1 and err.startswith(f"engine-sweep: output {out}") and fragment in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "resume" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "prompts.jsonl", "sweep.toml", "v.npy"]


def test_a_changed_sweep_is_refused_unless_extend_or_force(tmp_path):
    path = make_sweep(tmp_path)
    out = tmp_path / "out"
    assert prepare_directory(out, Plan(load_sweep(path)), force=False, extend=False) == "new"
    assert (out / "sweep.toml").read_text() == path.read_text() and json.loads((out / "plan.json").read_text())
    assert prepare_directory(out, Plan(load_sweep(path)), force=False, extend=False) == "resume"
    path.write_text(path.read_text().replace("coefs = [0, 4]", "coefs = [0, 4, 8]"))
    with pytest.raises(SweepError, match=r"changed since .* \(points: added v@L0,2\*8.0, v@L1\*8.0\).*--extend"):
        prepare_directory(out, Plan(load_sweep(path)), force=False, extend=False)
    assert prepare_directory(out, Plan(load_sweep(path)), force=False, extend=True) == "extend"
    path.write_text(path.read_text().replace("coefs = [0, 4, 8]", "coefs = [4, 8]").replace("0.9", "0.5"))
    with pytest.raises(SweepError) as info:
        prepare_directory(out, Plan(load_sweep(path)), force=False, extend=True)
    assert "generation.temperature: was 0.9, now 0.5" in str(info.value)
    assert "points: removed v@L0,2*0.0, v@L1*0.0" in str(info.value) and "--force" in str(info.value)
    assert prepare_directory(out, Plan(load_sweep(path)), force=True, extend=False) == "replaced"
    assert len(list(tmp_path.glob("out.replaced-*"))) == 1
    assert json.loads((out / "plan.json").read_text())["settings"]["generation"]["temperature"] == 0.5


# ---------------------------------------------------------------- running with the engine
def check_output(folder: Path, path: Path, max_new_tokens: int = 4) -> list[dict]:
    """Every line valid JSON, no id twice, exactly the plan's ids, each with the plan's seed and token count."""
    out = folder / "out"
    records = read_jsonl(out / "results.jsonl")  # fails on any invalid line
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    expected = plan_ids(path)
    assert set(ids) == set(expected)
    assert all(r["seed"] == expected[r["id"]] and r["num_completion_tokens"] == max_new_tokens for r in records)
    return records


def test_run_then_extend_with_a_coefficient_and_a_model_runs_only_the_new_requests(tmp_path):
    path = make_sweep(tmp_path, extra='\n[capture]\nlayers = [1]\npositions = "mean_prompt"\n'
                                      '\n[[metrics]]\nname = "proj"\nprojection = "v"\nlayer = 1\n')
    path.write_text(path.read_text().replace("samples = 2", "samples = 1"))
    result = engine_sweep(path)
    assert result.returncode == 0, result.stderr
    records = check_output(tmp_path, path)
    record = next(r for r in records if r["id"] == "tiny/v@L0,2*4.0/prompts/hello/s0")
    assert record["sweep"] == {"model": "tiny", "point": "v@L0,2*4.0", "vector": "v", "layers": [0, 2], "coef": 4.0,
                               "positions": "all", "normalize": False, "norm_match": False, "op": "add", "sae": None,
                               "feature": None, "value": None, "adapter": None, "prompt_set": "prompts",
                               "prompt_id": "hello", "sample": 0}
    assert record["topic"] == "greeting" and record["steering"]["coef"] == 4.0
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["state"] == "done" and status["done"] == status["total"] == 10 and status["errors"] == 0
    assert status["models"]["tiny"]["state"] == "done" and status["tok_per_s"] > 0
    assert "finished" in (tmp_path / "out" / "sweep.log").read_text()
    # The projection metric equals the captured activations projected by hand.
    from engine.storage.activations import load
    activations = load(tmp_path / "out" / "results.jsonl")
    v = np.load(tmp_path / "v.npy")
    unit = v / np.linalg.norm(v)
    by_hand = np.mean([activations[r["id"]][1].numpy() @ unit for r in records if r["sweep"]["point"] == "v@L1*4.0"])
    rows = {(r["model"], r["point"]): r for r in read_csv(tmp_path / "out" / "summary.csv")}
    assert float(rows["tiny", "v@L1*4.0"]["proj"]) == pytest.approx(by_hand, rel=1e-5)
    assert (tmp_path / "out" / "plots" / "proj.png").stat().st_size > 0

    before = (tmp_path / "out" / "results.jsonl").read_bytes()
    path.write_text(path.read_text().replace("coefs = [0, 4]", "coefs = [0, 4, 8]").replace(
        'models = [{model = "random:tiny", label = "tiny"}]',
        'models = [{model = "random:tiny", label = "tiny"}, "random:tiny-llama"]'))
    assert engine_sweep(path).returncode == 1  # changed: refused without --extend
    # Two devices (as two GPUs would be): the two models run side by side. Devices are not part of the hash.
    path.write_text(path.read_text().replace('device = "cpu"', 'device = "cpu"\ndevices = ["cpu", "cpu"]'))
    result = engine_sweep(path, "--extend")
    assert result.returncode == 0, result.stderr
    events = [line for line in result.stderr.splitlines() if "starting" in line or "finished" in line]
    assert ["starting" in line for line in events] == [True, True, False, False], events
    after = (tmp_path / "out" / "results.jsonl").read_bytes()
    assert after.startswith(before)  # nothing already run was touched
    new = [json.loads(line) for line in after[len(before):].splitlines()]
    assert sorted(r["id"] for r in new if r["sweep"]["model"] == "tiny") == [
        f"tiny/v@L{layers}*8.0/prompts/{prompt}/s0" for layers in ("0,2", "1") for prompt in ("2", "hello")]
    assert len([r for r in new if r["sweep"]["model"] == "random-tiny-llama"]) == 7 * 2
    check_output(tmp_path, path)
    result = engine_sweep(path)  # finished: nothing to run, no engine started
    assert result.returncode == 0 and "0 records" in result.stderr and "starting" not in result.stderr


def read_csv(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


def start_sweep(path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.apps.sweep.cli", str(path), "--no-report"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for_more_records(path: Path, than: int, proc: subprocess.Popen, timeout=120) -> None:
    deadline = time.monotonic() + timeout
    while count_lines(path) <= than:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no records in time"
        time.sleep(0.1)


def test_kill_9_of_the_process_group_at_random_moments_loses_and_duplicates_nothing(tmp_path):
    # 7 points x 4 prompts x 2 = 56 records, long enough (64 tokens each, 2 at a time) that no round finishes them
    path = make_sweep(tmp_path, coefs="[0, 2, 4]", max_num_seqs=2, num_prompts=4, max_new_tokens=64)
    results = tmp_path / "out" / "results.jsonl"
    rng = random.Random(int(os.environ.get("SWEEP_KILL_SEED", "0")))
    # Power loss as the process group dying: twice at any moment of the first seconds (loading the plan, starting
    # the engine, the first records), once while records are being written.
    for round_ in range(3):
        proc = start_sweep(path)
        if round_ < 2:
            time.sleep(rng.uniform(0.5, 12.0))
        else:
            wait_for_more_records(results, count_lines(results), proc)
            time.sleep(rng.uniform(0.0, 2.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        if results.exists():
            read_jsonl_prefix(results)
    # SIGINT drains: stops admitting, flushes, exits 130, says so in status.json.
    proc = start_sweep(path)
    wait_for_more_records(results, count_lines(results), proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert json.loads((tmp_path / "out" / "status.json").read_text())["state"] == "interrupted"
    num_before = len(read_jsonl(results))
    assert 3 <= num_before < 56
    result = engine_sweep(path)
    assert result.returncode == 0, result.stderr
    assert f"{56 - num_before} records" in result.stderr
    check_output(tmp_path, path, max_new_tokens=64)


def read_jsonl_prefix(path: Path) -> None:
    """After a kill: complete lines are valid JSON; only the last line may be cut short (resume removes it)."""
    lines = path.read_bytes().split(b"\n")
    for line in lines[:-1]:
        json.loads(line)


# ---------------------------------------------------------------- the report
METRICS = """
[[metrics]]
name = "greeting"
keywords = ["hello", "hi"]

[[metrics]]
name = "digits"
regex = "[0-9]"

[[metrics]]
name = "custom"
function = "my_metrics:exclaims"
"""


def test_report_numbers_on_a_known_case(tmp_path):
    path = make_sweep(tmp_path, extra=METRICS)
    (tmp_path / "my_metrics.py").write_text(
        "def exclaims(record):\n"
        "    return None if record['sweep']['sample'] == 1 else record['completion'].count('!')\n")
    out = tmp_path / "out"
    plan = Plan(load_sweep(path))
    prepare_directory(out, plan, force=False, extend=False)
    # Four records of the baseline and two of v@L1*4.0, written as the engine writes them, and one error.
    made = {r["id"]: r for _, r in plan.requests(plan.config.models[0])}
    known = [("tiny/none/prompts/hello/s0", "Hello! Hi!", 3, "stop"),
             ("tiny/none/prompts/hello/s1", "hi 2", 4, "length"),
             ("tiny/none/prompts/2/s0", "Oh!", 1, "stop"),
             ("tiny/none/prompts/2/s1", "Philosophy", 4, "length"),
             ("tiny/v@L1*4.0/prompts/hello/s0", "9 lives", 2, "stop"),
             ("tiny/v@L1*4.0/prompts/2/s0", "nothing", 4, "length")]
    rows = [{"id": i, "completion": c, "finish_reason": f, "num_prompt_tokens": 3, "num_completion_tokens": n,
             "seed": made[i]["seed"], "steering": made[i]["steering"], "sweep": made[i]["sweep"]}
            for i, c, n, f in known]
    write_jsonl(out / RESULTS, rows)
    write_jsonl(out / ERRORS, [{"line": 7, "id": "tiny/v@L1*4.0/prompts/2/s1", "error": "x"}])
    paths = write_report(out)
    summary = {r["point"]: r for r in read_csv(out / "summary.csv")}
    base, steered = summary["none"], summary["v@L1*4.0"]
    counts = (base["num_records"], base["num_errors"], steered["num_records"], steered["num_errors"])
    assert counts == ("4", "0", "2", "1")
    assert float(base["mean_completion_tokens"]) == 3.0 and float(base["median_completion_tokens"]) == 3.5
    assert float(steered["mean_completion_tokens"]) == 3.0 and float(steered["median_completion_tokens"]) == 3.0
    assert (base["finish_stop"], base["finish_length"], steered["finish_stop"]) == ("2", "2", "1")
    assert float(base["greeting"]) == 0.5  # "Hello! Hi!" and "hi 2" (keywords match whole words, any case)
    assert float(base["digits"]) == 0.25 and float(steered["digits"]) == 0.5
    assert float(base["custom"]) == 1.5  # sample 0 only: "Hello! Hi!" and "Oh!"
    assert float(steered["custom"]) == 0.0
    assert summary["v@L1*0.0"]["num_records"] == "0" and summary["v@L1*0.0"]["mean_completion_tokens"] == ""
    assert {p.name for p in paths} >= {"summary.csv", "summary.md", "greeting.png", "custom.png"}
    assert "| tiny | none | 4 | 0 | 3 | 3.5 | 2 | 2 | 0.5 | 0.25 | 1.5 |" in (out / "summary.md").read_text()


def test_too_little_free_disk_is_refused_before_any_engine_starts(tmp_path):
    path = make_sweep(tmp_path)
    path.write_text("min_free_gb = 1e9\n" + path.read_text())
    result = engine_sweep(path)
    assert result.returncode == 1
    assert "disk low" in result.stderr and "below min_free_gb = 1e+09" in result.stderr, result.stderr
    assert "starting" not in result.stderr and not (tmp_path / "out" / "results.jsonl").exists()


def test_the_example_sweep_file_plans():
    plan = Plan(load_sweep(ROOT / "examples" / "sweep.toml"))
    assert plan.num_per_model == 10 * 6 * 2 and plan.config.output == str(ROOT / "examples" / "sweep-out")
    assert [m.label for m in plan.config.models] == ["gemma3-270m"] and plan.config.capture.layers == [6]


def test_a_dead_engine_core_fails_the_sweep_with_the_stage_named_and_records_kept(tmp_path):
    import psutil

    path = make_sweep(tmp_path, coefs="[0, 2, 4]", max_num_seqs=2, num_prompts=4)
    results = tmp_path / "out" / "results.jsonl"
    proc = start_sweep(path)
    wait_for_more_records(results, 0, proc)
    core = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "engine-core"]
    assert len(core) == 1
    os.kill(core[0].pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "engine core" in stderr and "SIGKILL" in stderr
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["state"] == "failed" and "engine core" in status["last_error"]
    assert 1 <= len(read_jsonl(results)) < 56


def test_logprob_metric_scores_the_completion_under_the_unsteered_model(tmp_path, tiny_model, tokenizer):
    import torch

    path = make_sweep(tmp_path, extra="\n[[metrics]]\nname = \"lp\"\nlogprob = true\n")
    path.write_text(path.read_text().replace("samples = 2", "samples = 1")
                    .replace("temperature = 0.9", "temperature = 0")
                    .replace("layers = [1, [0, 2]]", "layers = [1]").replace("coefs = [0, 4]", "coefs = [8]"))
    result = engine_sweep(path)
    assert result.returncode == 0, result.stderr
    records = read_jsonl(tmp_path / "out" / "results.jsonl")
    prompts = {"hello": "Hello there", "2": "The capital of France is"}
    by_point: dict[str, list[float]] = {}
    for r in records:
        prompt_ids = tokenizer(prompts[r["sweep"]["prompt_id"]])["input_ids"]
        ids = torch.tensor([prompt_ids + r["completion_token_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny_model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1], dim=-1)
        if r["sweep"]["point"] == "none":  # greedy and unsteered: every completion token is the model's argmax
            assert logprobs.argmax(-1).tolist() == r["completion_token_ids"]
        picked = logprobs.gather(1, torch.tensor(r["completion_token_ids"])[:, None])
        by_point.setdefault(r["sweep"]["point"], []).append(picked.mean().item())
    rows = {r["point"]: r for r in read_csv(tmp_path / "out" / "summary.csv")}
    for point, values in by_point.items():
        assert float(rows[point]["lp"]) == pytest.approx(np.mean(values), rel=1e-4)
    assert float(rows["v@L1*8.0"]["lp"]) < float(rows["none"]["lp"])  # steered text is less likely unsteered


def test_a_disk_filling_mid_sweep_stops_it_cleanly_and_the_same_command_resumes(tmp_path):
    import shutil

    if shutil.disk_usage(tmp_path).free < 4e9:
        pytest.skip("needs 4 GB free disk to take 0.5 GB of it")
    # 56 requests of 16 tokens: long enough that the sweep is still generating when the disk fills (with 4 tokens
    # a fast start could finish them all before the next shard found the disk low).
    path = make_sweep(tmp_path, coefs="[0, 2, 4]", max_num_seqs=2, num_prompts=4, max_new_tokens=16,
                      extra='\n[capture]\nlayers = [1]\npositions = "generated"\n')
    # The limit leaves 256 MB of today's free space; taking 512 MB once records are done puts the disk below it.
    text = path.read_text()
    path.write_text(f"min_free_gb = {shutil.disk_usage(tmp_path).free / 1e9 - 0.256:.3f}\n" + text)
    status = tmp_path / "out" / "status.json"
    proc = start_sweep(path)
    wait_until(lambda: status.exists() and json.loads(status.read_text())["done"] >= 2, proc)
    with disk_taken(tmp_path, 512 << 20):
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert "engine-sweep: disk low: " in stderr and "then run the same command to resume" in stderr, stderr
    state = json.loads(status.read_text())
    assert state["state"] == "stopped" and state["last_error"].startswith("disk low: "), state
    results = tmp_path / "out" / "results.jsonl"
    num_before = len(read_jsonl(results))
    assert num_before < 56
    path.write_text("min_free_gb = 0\n" + text)  # a lower limit: not part of the plan, so no --force needed
    result = engine_sweep(path)
    assert result.returncode == 0, result.stderr
    assert f"{56 - num_before} records" in result.stderr
    records = check_output(tmp_path, path, max_new_tokens=16)
    from engine.storage.activations import load
    assert sorted(load(results)) == sorted(r["id"] for r in records)


def test_report_of_a_folder_that_is_no_sweep_says_so_in_one_line(tmp_path):
    """Through `python -m engine.apps.sweep.cli`, whose handler must catch the SweepError that the report
    module raises."""
    for target in (tmp_path / "nothing-here", make_sweep(tmp_path)):
        result = engine_sweep("report", target)
        assert result.returncode == 1
        assert result.stderr == (f"engine-sweep report: {target}: no plan.json; give the output directory of an "
                                 f"engine-sweep run\n"), result.stderr


def test_a_grid_of_ops_ablation_against_addition_clamps_and_sae_features_runs_and_reports(tmp_path):
    """ops = add, ablate, clamp at the same layers, and an SAE's features x values and coefs: every point's records
    carry its op's term, and the report has a row, an op column and a plot line per point."""
    import csv

    rng = np.random.default_rng(1)
    np.save(tmp_path / "v.npy", rng.standard_normal(64).astype(np.float32))
    (tmp_path / "layer_1").mkdir()
    np.savez(tmp_path / "layer_1" / "params.npz", W_enc=rng.standard_normal((64, 16)).astype(np.float32),
             W_dec=rng.standard_normal((16, 64)).astype(np.float32), b_enc=np.zeros(16, np.float32),
             b_dec=np.zeros(64, np.float32), threshold=np.full(16, 0.1, np.float32))
    write_jsonl(tmp_path / "prompts.jsonl", [{"id": "hello", "prompt": "Hello there"}])
    path = tmp_path / "sweep.toml"
    path.write_text('''output = "out"
models = [{model = "random:tiny", label = "tiny"}]
prompts = ["prompts.jsonl"]

[vectors]
v = "v.npy"

[saes]
gs = "layer_1/params.npz"

[grid]
vectors = ["v"]
layers = [[1, 2]]
ops = ["add", "ablate", "clamp"]
coefs = [4]
ablate_coefs = [1, 0.5]
clamp_values = [0]
saes = ["gs"]
features = [3, 7]
feature_values = [5]
feature_coefs = [2]
baseline = true

[generation]
max_new_tokens = 4
ignore_eos = true

[engine]
device = "cpu"
max_num_seqs = 4
''')
    keys = ["none", "v@L1,2*4.0", "ablate:v@L1,2", "ablate:v@L1,2*0.5", "clamp:v@L1,2=0.0", "sae:gs#3=5.0",
            "sae:gs#3*2.0", "sae:gs#7=5.0", "sae:gs#7*2.0"]
    assert [p.key for p in Plan(load_sweep(path)).points] == keys
    result = engine_sweep(path)
    assert result.returncode == 0, result.stderr
    records = {r["sweep"]["point"]: r for r in read_jsonl(tmp_path / "out" / "results.jsonl")}
    assert set(records) == set(keys)
    assert records["ablate:v@L1,2*0.5"]["steering"] == {"op": "ablate", "vector": str(tmp_path / "v.npy"),
                                                        "layers": [1, 2], "coef": 0.5, "positions": "all"}
    assert records["sae:gs#7=5.0"]["steering"]["op"] == "sae" and records["sae:gs#7=5.0"]["sweep"]["feature"] == 7
    assert records["clamp:v@L1,2=0.0"]["steering"]["value"] == 0.0
    completions = [records[k]["completion_token_ids"] for k in keys] if "completion_token_ids" in records["none"] \
        else [records[k]["completion"] for k in keys]
    assert len({json.dumps(c) for c in completions}) > 1  # the ops changed what was generated
    written = write_report(tmp_path / "out")
    with (tmp_path / "out" / "summary.csv").open() as f:
        rows = {r["point"]: r for r in csv.DictReader(f)}
    assert [rows[k]["op"] for k in keys] == ["", "add", "ablate", "ablate", "clamp", "sae", "sae", "sae", "sae"]
    assert rows["sae:gs#3=5.0"]["value"] == "5.0" and rows["sae:gs#3=5.0"]["sae"] == "gs"
    assert any(p.suffix == ".png" for p in written)


@pytest.mark.parametrize("grid, message", [
    ('vectors = ["v"]\nops = ["erase"]\ncoefs = [1]', "grid.ops[0] is 'erase'; use add, ablate, clamp"),
    ('vectors = ["v"]\nops = ["clamp"]', "clamp_values is missing"),
    ('saes = ["gs"]\nfeatures = [1]', "grid.saes needs grid.features"),
    ('saes = ["other"]\nfeatures = [1]\nfeature_values = [1]', "grid.saes[0] 'other' is not in [saes]"),
])
def test_bad_op_grids_name_the_field(tmp_path, grid, message):
    np.save(tmp_path / "v.npy", np.ones(64, np.float32))
    np.savez(tmp_path / "s.npz", W_enc=np.ones((64, 4), np.float32))
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    path = tmp_path / "sweep.toml"
    path.write_text(f'models = ["random:tiny"]\nprompts = ["p.jsonl"]\n[vectors]\nv = "v.npy"\n[saes]\ngs = "s.npz"\n'
                    f'[grid]\n{grid}\n')
    with pytest.raises(SweepError, match=re.escape(message)):
        load_sweep(path)


def _adapter_sweep(tmp_path, tiny_model) -> Path:
    pytest.importorskip("peft")
    from support.lora import LINEARS, make_lora

    make_lora(tiny_model, tmp_path / "poet", seed=1, r=8, lora_alpha=16, target_modules=LINEARS)
    path = make_sweep(tmp_path, coefs="[4]", extra='return_tokens = true\n\n[adapters]\npoet = "poet"\n')
    text = path.read_text().replace("baseline = true\n", 'baseline = true\nadapters = ["base", "poet"]\n')
    path.write_text(text.replace("temperature = 0.9", "temperature = 0.0"))  # greedy: an adapter's tokens differ
    return path


def test_an_adapter_axis_runs_every_point_under_each_adapter(tmp_path, tiny_model):
    from engine import Engine
    from engine.config import SamplingDefaults
    from support import tiny_config

    path = _adapter_sweep(tmp_path, tiny_model)
    plan = Plan(load_sweep(path))
    assert [p.key for p in plan.points] == ["none", "none+adapter:poet", "v@L1*4.0", "v@L1*4.0+adapter:poet",
                                            "v@L0,2*4.0", "v@L0,2*4.0+adapter:poet"]
    assert list(plan.settings["adapters"]) == ["poet"]
    result = engine_sweep(path)
    assert result.returncode == 0, result.stderr
    records = {r["id"]: r for r in read_jsonl(tmp_path / "out" / RESULTS)}
    assert len(records) == 6 * 2 * 2
    poet = records["tiny/v@L1*4.0+adapter:poet/prompts/hello/s0"]
    assert poet["adapter"] == "poet" and poet["sweep"]["adapter"] == "poet"
    assert "adapter" not in records["tiny/v@L1*4.0/prompts/hello/s0"]
    # the adapter record is what the engine makes of that record with that adapter (its seed, its steering)
    again = {"prompt": "Hello there", "seed": poet["seed"], "steering": poet["steering"]}
    sampling = SamplingDefaults(max_new_tokens=4, ignore_eos=True)
    with Engine(tiny_config(adapters={"poet": str(tmp_path / "poet")}, sampling=sampling)) as engine:
        with_adapter, without = engine.generate_all([{**again, "adapter": "poet"}, again])
    assert with_adapter["completion_token_ids"] == poet["completion_token_ids"] != without["completion_token_ids"]
    rows = {r["point"]: r for r in read_csv(tmp_path / "out" / "summary.csv")}
    assert rows["none+adapter:poet"]["adapter"] == "poet" and rows["none"]["adapter"] == ""
    assert rows["v@L1*4.0+adapter:poet"]["num_records"] == "4"


def test_bad_adapters_in_a_sweep_name_the_field(tmp_path, tiny_model):
    path = _adapter_sweep(tmp_path, tiny_model)
    text = path.read_text()
    path.write_text(text.replace('adapters = ["base", "poet"]', 'adapters = ["base", "poem"]'))
    with pytest.raises(SweepError, match=r"grid.adapters\[1\] 'poem' is not in \[adapters\] \(known: poet; "):
        load_sweep(path)
    path.write_text(text.replace('poet = "poet"', 'poet = "nowhere"'))
    with pytest.raises(SweepError, match=r"adapters.poet: --adapter poet=.*nowhere: no such directory"):
        load_sweep(path)
    path.write_text(text.replace('max_num_seqs = 4', 'max_num_seqs = 4\nadapters = {poet = "poet"}'))
    with pytest.raises(SweepError, match=r"unknown key\(s\) \['adapters'\] in \[engine\]"):
        load_sweep(path)
