"""Fuzz engine-run: a few hundred records mixing valid ones with hostile values of every JSON type in every field
(pass-through fields included). The run exits 0 or 3, every valid record completes exactly once, every other line
ends as exactly one result or one error record, and no traceback reaches stderr."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from support import PROMPTS, read_jsonl
from engine.storage.output import errors_path
from support.processes import TINY_ARGS, engine_run

NUM_RECORDS = 300
FIELDS = ("id", "prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos",
          "steering", "capture", "meta")


def hostile_values(vectors: dict[str, Path]) -> list:
    """Every JSON type, at its edges; written with json.dumps, so NaN and lone surrogates reach the file as a user's
    tool would write them."""
    scalars = [None, True, False, 0, 1, -1, 7, 2 ** 31, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 10 ** 30,
               0.0, -0.0, 0.5, 1.5, -2.5, 1e-320, 1e38, 1e39, 1e308, float("nan"), float("inf"), float("-inf"),
               "", " ", "x", "0", "all", "prompt", "generated", "last_prompt", "\ud800", "a\udfffb", "\U0001f600",
               "é" * 50, "x" * 5000, "\x00", "\n"]
    steering = [{"vector": str(v), "layers": [1]} for v in vectors.values()]
    steering += [{"vector": str(vectors["good"]), "layers": x} for x in ([], [-1], [99], [2 ** 64], "1", [True])]
    steering += [{"vector": str(vectors["good"]), "layers": [1], "coef": x} for x in (1e38, 1e39, "2", None)]
    steering += [{"vector": str(vectors["good"]), "layers": [0], "positions": x}
                 for x in ({"prompt": [0, 2 ** 64]}, {"generated": [-1, 2]}, {"prompt": [3, 1]}, "middle", [])]
    structures = [[], [1, 2], [[]], {}, {"a": 1}, [{"role": "user", "content": "hi"}], {"layers": [1]},
                  {"layers": [2 ** 70]}, [None], {"": None}, {"\ud800": 1}]
    return scalars + steering + structures


def valid_record(rng: random.Random, i: int, vector: Path) -> dict:
    record = {"id": f"v{i}", "prompt": rng.choice(PROMPTS), "max_new_tokens": rng.randint(1, 3)}
    if rng.random() < 0.5:
        record.update(temperature=rng.choice([0.0, 0.7, 1.3]), top_p=rng.choice([1.0, 0.9]),
                      top_k=rng.choice([0, 5]), seed=rng.randint(0, 2 ** 40))
    if rng.random() < 0.3:
        record["steering"] = {"vector": str(vector), "layers": [rng.randint(0, 1)], "coef": rng.uniform(-4, 4)}
    if rng.random() < 0.2:
        record["capture"] = {"layers": [1]}
    if rng.random() < 0.2:
        record["stop"] = rng.choice(["e", ["the", "."]])
    if rng.random() < 0.5:  # pass-through fields, any valid JSON, big integers included
        record["meta"] = rng.choice([2 ** 70, -(2 ** 90), {"nested": [1, "x", None]}, "\U0001f600", 1e308, [], ""])
    return record


def vector_files(tmp_path: Path) -> dict[str, Path]:
    files = {"good": tmp_path / "good.npy", "cut": tmp_path / "cut.safetensors", "empty": tmp_path / "empty.pt",
             "wide": tmp_path / "wide.npy", "list": tmp_path / "list.pt", "folder": tmp_path / "folder.npy"}
    np.save(files["good"], np.random.default_rng(0).standard_normal(64).astype(np.float32))
    np.save(files["wide"], np.ones(65, dtype=np.float32))
    files["cut"].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"v\":")
    files["empty"].write_bytes(b"")
    torch.save([1, 2], files["list"])
    files["folder"].mkdir()
    return files


def test_fuzzed_records_never_kill_the_run_and_each_line_ends_once(tmp_path):
    rng = random.Random(20261201)
    vectors = vector_files(tmp_path)
    pool = hostile_values(vectors)
    lines, valid = [], {}
    for i in range(NUM_RECORDS):
        record = valid_record(rng, i, vectors["good"])
        if rng.random() < 0.4:
            valid[record["id"]] = record
        else:
            for _ in range(rng.randint(1, 3)):
                field = rng.choice(FIELDS)
                if rng.random() < 0.15:
                    record.pop(field, None)
                else:
                    record[field] = rng.choice(pool)
        lines.append(json.dumps(record))
    lines[7:7] = ["{broken", "[1, 2]", "null", '"just a string"', "\ufeff{}", '{"prompt": "x"} trailing']
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "fuzz.out.jsonl"
    result = engine_run("--input", str(path), "--output", str(out), *TINY_ARGS, "--max-model-len", "96",
                        "--max-num-seqs", "8", timeout=900)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 3), result.stderr
    results, errors = read_jsonl(out), read_jsonl(errors_path(out))
    ids = [r["id"] for r in results]
    assert len(ids) == len(set(ids))
    error_lines = [e["line"] for e in errors]
    assert len(error_lines) == len(set(error_lines))
    assert len(results) + len(errors) == len(lines), "every line ends as exactly one result or one error"
    by_id = {r["id"]: r for r in results}
    assert set(valid) <= set(by_id), [e for e in errors if e.get("id") in valid]
    for record_id, record in valid.items():
        if "meta" in record:
            assert by_id[record_id]["meta"] == record["meta"]
    assert all(isinstance(e["error"], str) and e["error"] for e in errors)
