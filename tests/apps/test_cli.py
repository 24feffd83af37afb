"""engine-run end to end: bad input, exit codes, resume, interruption, a dead stage, the manifest."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import psutil
import pytest

from support import PROMPTS, ROOT, read_jsonl, write_jsonl
from support.processes import TINY_ARGS, engine_run, start_run, wait_for_records

def test_bad_input_is_reported_per_line_and_the_rest_completes(tmp_path):
    vector = tmp_path / "v.npy"
    np.save(vector, np.ones(32, dtype=np.float32))  # tiny model's hidden size is 64: wrong width
    lines = [
        json.dumps({"id": "ok1", "prompt": "Hello there", "colour": "blue"}),     # 1
        "{this is not json",                                                       # 2
        json.dumps({"id": "np", "text": "no prompt field"}),                       # 3
        json.dumps({"id": "bad-type", "prompt": "x", "max_new_tokens": "many"}),   # 4
        json.dumps({"id": "ok1", "prompt": "duplicate id"}),                       # 5
        json.dumps({"id": "nofile", "prompt": "x",
                    "steering": {"vector": str(tmp_path / "missing.pt"), "layers": [1]}}),
        json.dumps({"id": "width", "prompt": "x", "steering": {"vector": str(vector), "layers": [1]}}),  # 7
        json.dumps({"id": "long", "prompt": "word " * 200}),                       # 8
        json.dumps({"id": "empty", "prompt": ""}),                                 # 9
        '{"id": "utf", "prompt": "caf\xe9"}',                                      # 10 (latin-1 bytes below)
        json.dumps({"id": "huge", "prompt": "a" * 10_000_000}),                    # 11: a 10 MB line
        json.dumps({"id": "chat", "messages": [{"role": "user", "content": "hi"}]}),  # 12
        "",                                                                        # 13: blank, skipped
        json.dumps({"id": "layer", "prompt": "x", "steering": {"vector": str(vector), "layers": [99]}}),  # 14
        json.dumps({"id": "ok2", "prompt": "Bye", "max_new_tokens": 3}),           # 15
    ]
    path = tmp_path / "in.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").replace("caf\xe9", "caf\udcff").encode("utf-8", "surrogateescape"))
    out = tmp_path / "out.jsonl"
    result = engine_run("--input", str(path), "--output", str(out), "--max-model-len", "64", *TINY_ARGS)
    assert result.returncode == 3, result.stderr
    done = {r["id"]: r for r in read_jsonl(out)}
    assert set(done) == {"ok1", "empty", "ok2"}
    assert done["ok1"]["colour"] == "blue" and done["ok2"]["num_completion_tokens"] == 3
    errors = {e["line"]: e for e in read_jsonl(tmp_path / "out.errors.jsonl")}
    expect = {2: "not valid JSON", 3: "exactly one of 'prompt'", 4: "field 'max_new_tokens'", 5: "duplicate id",
              6: "no such file", 7: "hidden size is 64", 8: "exceeds max_model_len=64", 10: "not valid UTF-8",
              11: "exceeds max_model_len=64", 12: "no chat template", 14: "out of range"}
    assert set(errors) == set(expect)
    for line, fragment in expect.items():
        assert fragment in errors[line]["error"], (line, errors[line])
    assert errors[8]["id"] == "long" and "id" not in errors[2]
    assert "3 records, 11 errors" in result.stderr


def test_truncate_left_keeps_the_end_of_a_long_prompt(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "long", "prompt": "word " * 200}])
    out = tmp_path / "out.jsonl"
    result = engine_run("--input", str(path), "--output", str(out), "--max-model-len", "64", "--truncate", "left",
                        *TINY_ARGS)
    assert result.returncode == 0, result.stderr
    assert read_jsonl(out)[0]["num_prompt_tokens"] == 64 - 6


def test_empty_input_file_is_a_clean_run(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    result = engine_run("--input", str(path), *TINY_ARGS)
    assert result.returncode == 0, result.stderr
    assert "0 records, 0 errors" in result.stderr
    assert (tmp_path / "empty.out.jsonl").read_text() == ""


def test_missing_model_and_missing_input_are_one_line_errors(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    result = engine_run("--input", str(path), "--model", str(tmp_path / "nowhere"), "--quiet")
    assert result.returncode == 1 and "not found; looked for a local Hugging Face directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = engine_run("--input", str(tmp_path / "nope.jsonl"))
    assert result.returncode == 1 and "no such file" in result.stderr


def many_prompts(tmp_path: Path, count: int) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": PROMPTS[i % len(PROMPTS)] + f" {i}",
                                                "max_new_tokens": 48} for i in range(count)])


def assert_complete(out: Path, count: int) -> None:
    ids = [r["id"] for r in read_jsonl(out)]  # read_jsonl fails on any invalid line
    assert len(ids) == len(set(ids)) == count


def test_sigint_then_resume_loses_nothing_and_duplicates_nothing(tmp_path):
    path, out = many_prompts(tmp_path, 60), tmp_path / "out.jsonl"
    args = ("--input", str(path), "--output", str(out), *TINY_ARGS)
    proc = start_run(*args, "--max-num-seqs", "1")
    wait_for_records(out, 3, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    partial = read_jsonl(out)
    assert 3 <= len(partial) < 60
    with out.open("a") as f:
        f.write('{"id": "half-writ')  # what a power cut mid-write would leave
    result = engine_run(*args, "--max-num-seqs", "16")  # batch size is not part of the settings
    assert result.returncode == 0, result.stderr
    assert f"skipped {len(partial)} done" in result.stderr
    assert_complete(out, 60)


def test_changed_settings_are_refused_unless_forced(tmp_path):
    path, out = many_prompts(tmp_path, 2), tmp_path / "out.jsonl"
    assert engine_run("--input", str(path), "--output", str(out), *TINY_ARGS).returncode == 0
    result = engine_run("--input", str(path), "--output", str(out), *TINY_ARGS, "--temperature", "0.5")
    assert result.returncode == 1 and "was made with other settings" in result.stderr and "--force" in result.stderr
    result = engine_run("--input", str(path), "--output", str(out), *TINY_ARGS, "--temperature", "0.5", "--force")
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("out.jsonl.replaced-*"))) == 1
    assert_complete(out, 2)


def test_a_killed_engine_core_is_reported_and_finished_records_stay(tmp_path):
    path, out = many_prompts(tmp_path, 60), tmp_path / "out.jsonl"
    proc = start_run("--input", str(path), "--output", str(out), "--max-num-seqs", "1", *TINY_ARGS)
    wait_for_records(out, 2, proc)
    core = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "engine-core"]
    assert len(core) == 1
    os.kill(core[0].pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "engine core" in stderr and "SIGKILL" in stderr
    records = read_jsonl(out)
    assert 2 <= len(records) < 60 and all(r["num_completion_tokens"] == 48 for r in records)


@pytest.mark.slow
def test_example_file_with_the_embedded_model(tmp_path):
    out = tmp_path / "examples.out.jsonl"
    result = engine_run("--input", str(ROOT / "examples" / "prompts.jsonl"), "--output", str(out), "--quiet",
                        "--ordered", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    records = read_jsonl(out)
    assert [r["id"] for r in records] == ["capital", "story", "recipe", "science", "list", "poem"]
    assert "Paris" in records[0]["completion"] or "France" in records[0]["completion"]
    assert records[3]["topic"] == "biology"
    assert records[2]["finish_reason"] == "stop" and "\n\n" not in records[2]["completion"]


def test_records_may_name_specs_from_a_steering_specs_file(tmp_path):
    vector = tmp_path / "v.npy"
    np.save(vector, np.random.default_rng(0).standard_normal(64).astype(np.float32))
    specs = tmp_path / "specs.toml"
    specs.write_text(f'["v+4@L1"]\nvector = "{vector}"\nlayers = [1]\ncoef = 4.0\n')
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "Hello", "steering": "v+4@L1"},
                                               {"id": "b", "prompt": "Hello", "steering": "missing"}])
    out = tmp_path / "out.jsonl"
    result = engine_run("--input", str(path), "--output", str(out), "--steering-specs", str(specs), *TINY_ARGS)
    assert result.returncode == 3, result.stderr
    [record] = read_jsonl(out)
    assert record["steering_name"] == "v+4@L1" and record["steering"]["coef"] == 4.0
    assert "not a named spec" in read_jsonl(tmp_path / "out.errors.jsonl")[0]["error"]


def test_steer_positions_flag_takes_ranges_as_a_record_does(tmp_path):
    vector = tmp_path / "v.npy"
    np.save(vector, np.random.default_rng(1).standard_normal(64).astype(np.float32) * 8)
    positions = {"prompt": [-1, None], "generated": [1, 3]}
    path = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "flag", "prompt": "Hello there"},
        {"id": "record", "prompt": "Hello there",
         "steering": {"vector": str(vector), "layers": [1], "coef": 3.0, "positions": positions}},
        {"id": "plain", "prompt": "Hello there", "steering": None}])
    out = tmp_path / "out.jsonl"
    result = engine_run("--input", str(path), "--output", str(out), "--steer", str(vector), "--steer-layer", "1",
                        "--steer-coef", "3", "--steer-positions", json.dumps(positions), "--return-tokens", *TINY_ARGS)
    assert result.returncode == 0, result.stderr
    by_id = {r["id"]: r for r in read_jsonl(out)}
    assert by_id["flag"]["steering"]["positions"] == {"prompt": [[-1, None]], "generated": [[1, 3]]}
    assert by_id["flag"]["completion_token_ids"] == by_id["record"]["completion_token_ids"]
    assert by_id["flag"]["completion_token_ids"] != by_id["plain"]["completion_token_ids"]
    bad = engine_run("--input", str(path), "--output", str(tmp_path / "bad.jsonl"), "--steer", str(vector),
                     "--steer-layer", "1", "--steer-positions", '{"generated": [-2, 3]}', *TINY_ARGS)
    assert bad.returncode != 0 and "--steer-positions.generated" in bad.stderr and "cannot be negative" in bad.stderr


def test_steer_without_layers_applies_the_layers_the_file_names(tmp_path, tiny_model, tokenizer):
    """A record's term without layers, a named spec without layers and --steer FILE without --steer-layer steer the
    layers the file names (layer.<L>, a control vector's direction.<L>): exactly the tokens of the same spec with
    layers [1, 3] given, which equal HF forward hooks; the records state the layers steered. A file of one unnamed
    vector is that record's error (exit 3), and as --steer without --steer-layer it is refused at start-up."""
    import torch

    from engine.vectors import save_vectors
    from support.reference import hf_greedy

    gen = torch.Generator().manual_seed(3)
    vectors = {1: torch.randn(64, generator=gen) * 3, 3: torch.randn(64, generator=gen) * 3}
    st, gg, one = (str(tmp_path / name) for name in ("v.safetensors", "v.gguf", "one.npy"))
    save_vectors(st, vectors)
    save_vectors(gg, vectors)
    np.save(one, vectors[1].numpy())
    specs = tmp_path / "specs.toml"
    specs.write_text(f'[file]\nvector = "{st}"\ncoef = 4.0\n')
    prompt = PROMPTS[1]
    steer = {"plain": None, "file-st": {"vector": st, "coef": 4},
             "given-st": {"vector": st, "layers": [1, 3], "coef": 4}, "file-gguf": {"vector": gg, "coef": 4},
             "given-gguf": {"vector": gg, "layers": [3, 1], "coef": 4},
             "layer-1": {"vector": st, "layers": [1], "coef": 4}, "one": {"vector": one, "coef": 4}}
    records = [{"id": name, "prompt": prompt, "steering": spec} for name, spec in steer.items()]
    records += [{"id": "named", "prompt": prompt, "steering": "file"}, {"id": "flag", "prompt": prompt}]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    result = engine_run("--input", str(path), "--output", str(out), "--steer", gg, "--steer-coef", "4",
                        "--steering-specs", str(specs), "--return-tokens", "--ignore-eos", *TINY_ARGS)
    assert result.returncode == 3, result.stderr
    by_id = {r["id"]: r for r in read_jsonl(out)}
    assert sorted(by_id) == sorted((set(steer) | {"named", "flag"}) - {"one"})
    tokens = {name: r["completion_token_ids"] for name, r in by_id.items()}
    for name in ("file-st", "named", "given-gguf", "file-gguf", "flag"):
        assert tokens[name] == tokens["given-st"], name
        assert by_id[name]["steering"]["layers"] == [1, 3], name  # the layers steered, as a researcher reads them
    assert by_id["file-st"]["steering"] == by_id["given-st"]["steering"]
    expected = hf_greedy(tiny_model, tokenizer(prompt).input_ids, 6, by_id["given-st"]["steering"])
    assert tokens["given-st"] == expected
    assert len({tuple(tokens["given-st"]), tuple(tokens["plain"]), tuple(tokens["layer-1"])}) == 3  # both layers count
    [error] = read_jsonl(tmp_path / "out.errors.jsonl")
    assert error["id"] == "one" and error["error"] == (
        f"steering vector {one}: one vector with no layer named; give the layers to steer (\"layers\": [6] in a "
        f"record, --steer-layer 6)")
    refused = engine_run("--input", str(path), "--output", str(tmp_path / "refused.jsonl"), "--steer", one,
                         *TINY_ARGS)
    assert refused.returncode == 1 and not (tmp_path / "refused.jsonl").exists()
    assert refused.stderr.strip() == (f"engine-run: --steer {one}: one vector with no layer named; give the layers to "
                                      f"steer with --steer-layer (e.g. --steer-layer 6 or 4,6,8)")
