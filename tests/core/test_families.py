"""The model families steering researchers use, each as a tiny random Hugging Face model directory run through the
whole pipeline (engine.Engine): greedy completions equal transformers' generate prompt by prompt, with more prompts
than KV rows; for some, steering equals a plain forward hook and capture equals output_hidden_states. An
architecture the engine cannot run is refused by engine-run in one line."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Engine
from engine.config import EngineConfig, SamplingDefaults
from engine.models import SUPPORTED_MODEL_TYPES, load_hf_tokenizer
from support import PROMPTS, write_jsonl
from support.families import FAMILIES, HIDDEN, NUM_LAYERS, save_small_tokenizer, save_tiny_model
from support.processes import engine_run
from support.reference import expected_capture, hf_greedy, hf_states

ALL = list(FAMILIES)
STEERED = ["llama", "qwen3", "gemma3_text", "gemma2"]  # steering and capture checked too (one family per lineage)
NUM_KV_ROWS = 2  # fewer than len(PROMPTS): finished sequences' KV rows are refilled mid-run
STEER_LAYER, COEF = 1, 4.0
CAPTURES = [  # (record id, prompt, capture, steering positions or None); the last layer's HF state is after the norm
    ("c0", 1, {"layers": list(range(NUM_LAYERS - 1)), "positions": "generated"}, None),
    ("c1", 3, {"layers": list(range(NUM_LAYERS - 1)), "positions": "all_prompt"}, "all"),
    ("c2", 4, {"layers": [STEER_LAYER], "positions": "mean_prompt"}, "prompt"),
]


def num_new(i: int) -> int:
    """Staggered completion lengths, so sequences finish at different steps."""
    return 3 + i % 4


@dataclass
class Family:
    model_type: str
    model: object  # the HF model, loaded from the family's directory
    tokenizer: object  # transformers' tokenizer of that directory (the reference the engine's tokens must equal)
    run: Future  # the engine's results for the family's records: record id -> result record

    @property
    def results(self) -> dict:
        return self.run.result()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return str(save_small_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def vector(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vector") / "v.npy"
    np.save(path, np.random.default_rng(0).standard_normal(HIDDEN).astype(np.float32))
    return str(path)


def steering(vector: str, positions: str) -> dict:
    return {"vector": vector, "layers": [STEER_LAYER], "coef": COEF, "positions": positions}


def records(model_type: str, vector: str) -> list[dict]:
    """Greedy records for every prompt; for a STEERED family also steered and capturing ones."""
    rows = [{"id": f"g{i}", "prompt": p, "max_new_tokens": num_new(i)} for i, p in enumerate(PROMPTS)]
    if model_type in STEERED:
        rows += [{"id": f"s{i}", "prompt": PROMPTS[i], "max_new_tokens": num_new(i), "steering": steering(vector, pos)}
                 for i, pos in enumerate(("all", "generated", "prompt"))]
        rows += [{"id": rid, "prompt": PROMPTS[p], "max_new_tokens": num_new(p), "capture": capture,
                  **({"steering": steering(vector, pos)} if pos else {})} for rid, p, capture, pos in CAPTURES]
    return rows


def engine_results(folder: Path, rows: list[dict]) -> dict:
    """The records run through the whole pipeline on the model in `folder`: record id -> result record."""
    config = EngineConfig(model=str(folder), device="cpu", dtype="float32", max_num_seqs=NUM_KV_ROWS,
                          return_tokens=True, sampling=SamplingDefaults(max_new_tokens=6, ignore_eos=True))
    with Engine(config) as engine:
        return {r["id"]: r for r in engine.generate_all(rows)}


@pytest.fixture(scope="module")
def families(request, tmp_path_factory, tokenizer_dir, vector) -> dict[str, Family]:
    """Every family the collected tests use, built and loaded in HF here, and run through the engine two at a time
    in the background while the tests compare the finished ones (an engine's start-up is mostly its core process
    importing torch, on one core). transformers stays in this thread: its lazy imports are not thread-safe."""
    from transformers import AutoModelForCausalLM

    wanted = {item.callspec.params.get("family") for item in request.session.items if hasattr(item, "callspec")}
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="family") as pool:
        built = {}
        for model_type in (m for m in FAMILIES if m in wanted):
            folder = save_tiny_model(tmp_path_factory.mktemp(model_type), model_type, tokenizer_dir)
            run = pool.submit(engine_results, folder, records(model_type, vector))
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            built[model_type] = Family(model_type, model, load_hf_tokenizer(str(folder)), run)
        yield built


@pytest.fixture
def family(request, families) -> Family:
    """The family named by the test's parameter, once the engine has run it (its error if the engine refused it)."""
    chosen = families[request.param]
    chosen.run.result()
    return chosen


@pytest.mark.parametrize("family", ALL, indirect=True)
def test_greedy_equals_hf_generate(family):
    for i, prompt in enumerate(PROMPTS):
        ids = family.tokenizer(prompt).input_ids
        got = family.results[f"g{i}"]
        assert got["num_prompt_tokens"] == len(ids), prompt
        assert got["completion_token_ids"] == hf_greedy(family.model, ids, num_new(i)), (family.model_type, prompt)


@pytest.mark.parametrize("family", STEERED, indirect=True)
def test_steering_equals_hf_forward_hook(family, vector):
    for i, positions in enumerate(("all", "generated", "prompt")):
        got = family.results[f"s{i}"]["completion_token_ids"]
        ids = family.tokenizer(PROMPTS[i]).input_ids
        assert got == hf_greedy(family.model, ids, num_new(i), steering(vector, positions)), positions
        # the steered completion differs from the plain one, so the comparison above is not vacuous
        assert got != family.results[f"g{i}"]["completion_token_ids"], positions


@pytest.mark.parametrize("family", STEERED, indirect=True)
def test_capture_equals_hf_hidden_states(family, vector):
    for rid, p, capture, positions in CAPTURES:
        got = family.results[rid]
        ids = family.tokenizer(PROMPTS[p]).input_ids
        sequence, num_completion = ids + got["completion_token_ids"], len(got["completion_token_ids"])
        spec = steering(vector, positions) if positions else None
        states = hf_states(family.model, sequence, spec, len(ids))
        plain = hf_states(family.model, sequence, None, len(ids))
        assert sorted(got["activations"]) == capture["layers"], rid
        for layer, value in got["activations"].items():
            want = expected_capture(states, layer, capture["positions"], len(ids), num_completion)
            torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-5, msg=f"{rid} layer {layer}")
            if spec is not None and layer == STEER_LAYER:  # steering moved what was captured: not vacuous
                assert not torch.allclose(value, expected_capture(plain, layer, capture["positions"], len(ids),
                                                                  num_completion)), rid


def test_every_supported_model_type_is_in_the_matrix():
    assert set(SUPPORTED_MODEL_TYPES) == set(FAMILIES)


def test_an_unsupported_architecture_is_refused_in_one_line(tmp_path, tokenizer_dir):
    """GPT-2 (no model.model.layers, its own attention): engine-run names it and the model types it runs."""
    folder = save_tiny_model(tmp_path / "gpt2", "gpt2", tokenizer_dir)
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x"}])
    result = engine_run("--input", str(path), "--model", str(folder), "--device", "cpu", "--quiet")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "model_type 'gpt2' (GPT2LMHeadModel)" in lines[0], lines[0]
    assert ", ".join(SUPPORTED_MODEL_TYPES) in lines[0], lines[0]
    assert not Path(tmp_path, "in.out.jsonl").exists()  # refused before anything ran
