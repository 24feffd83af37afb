"""LoRA adapters beside the base model: the engine with an adapter equals PEFT's own model (unmerged and merged, every
rank and alpha rule), a batch mixing base and adapter requests with steering and capture equals each request alone,
base rows are bit-identical to an engine without adapters, and bad adapters or names are clear errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from support import PROMPTS, core_request, tiny_config
from support.processes import TINY_ARGS, engine_run
from engine import Engine
from engine.adapters import AdapterError, check_adapters, read_adapter
from engine.config import ConfigError
from engine.core.engine_core import EngineCore
from engine.core.lora import AdapterRefused
from engine.core.scheduler import Scheduler
from support.lora import LINEARS, make_lora
from support.reference import hf_greedy

peft = pytest.importorskip("peft")
# name -> (LoraConfig settings, seed): every linear; rsLoRA on two of them in two layers; a regex with rank and alpha
# patterns
ADAPTERS = {
    "all": (dict(r=8, lora_alpha=16, target_modules=LINEARS), 1),
    "rslora": (dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                    layers_to_transform=[1, 2], layers_pattern="layers"), 2),
    "patterns": (dict(r=6, lora_alpha=4, target_modules=r".*\.(o_proj|down_proj|up_proj)",
                      rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 12}), 3),
}
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model):
    """name -> (directory, PEFT's model with that adapter on a copy of the tiny model); "all-bin": "all" saved as
    adapter_model.bin."""
    root = tmp_path_factory.mktemp("adapters")
    made = {name: (str(root / name), make_lora(tiny_model, root / name, seed, **settings))
            for name, (settings, seed) in ADAPTERS.items()}
    made["all"][1].save_pretrained(root / "all-bin", safe_serialization=False)
    made["all-bin"] = (str(root / "all-bin"), made["all"][1])
    return made


@pytest.fixture(scope="module")
def core(tiny_source, adapters):
    return EngineCore(tiny_config(adapters={name: d for name, (d, _) in adapters.items()}), tiny_source)


@pytest.fixture(scope="module")
def plain_core(tiny_source):
    return EngineCore(tiny_config(), tiny_source)


@pytest.fixture(scope="module")
def vector(tmp_path_factory):
    path = tmp_path_factory.mktemp("vec") / "v.npy"
    np.save(path, np.random.default_rng(0).standard_normal(64).astype(np.float32) * 2)
    return str(path)


def index_of(core, name: str | None) -> int:
    return core.lora.index(name)


def first_step_logits(core, tokenizer, adapter_names: list) -> torch.Tensor:
    """Prefill logits of PROMPTS[i] under adapter_names[i] (None: the base model), as one packed batch."""
    for i, name in enumerate(adapter_names):
        core.add(core_request(i, adapter=index_of(core, name)), torch.tensor(tokenizer(PROMPTS[i]).input_ids))
    batch = core.scheduler.schedule()
    assert batch.is_prefill and len(batch.seqs) == len(adapter_names)
    logits = core.runner.prefill_logits(batch.seqs)
    core.scheduler = Scheduler(core.cache.num_rows, core.max_prefill_tokens)  # drop them again
    return logits


def peft_greedy(model, ids: list[int], spec=None) -> list[int]:
    """PEFT's own greedy generate (EOS ignored), steered by plain forward hooks on its decoder layers."""
    return hf_greedy(model.get_base_model(), ids, NEW_TOKENS, spec)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_an_adapter_equals_peft_unmerged_and_merged(core, tokenizer, tiny_model, adapters, name):
    _, model = adapters[name]
    logits = first_step_logits(core, tokenizer, [name, None, name])
    for i in (0, 2):
        ids = tokenizer(PROMPTS[i]).input_ids
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4)
    merged = copy.deepcopy(model).merge_and_unload()
    prompts = [tokenizer(p).input_ids for p in PROMPTS[1:4]]
    done = core.generate([core_request(i, adapter=index_of(core, name)) for i in range(len(prompts))], prompts)
    changed = 0
    for i, ids in enumerate(prompts):
        got = done[i].output_ids
        assert got == peft_greedy(model, ids) == hf_greedy(merged, ids, NEW_TOKENS), i
        changed += got != hf_greedy(tiny_model, ids, NEW_TOKENS)
    assert changed  # the adapter changes what the model says, so the comparison is not vacuous


def test_linears_reading_one_input_share_one_x_times_a(core, tokenizer):
    # q/k/v of each attention and gate/up of each MLP: one stacked A each; k, v and up reuse the first's product
    layers = core.model.config.num_hidden_layers
    width = core.lora.num_columns
    assert sorted(a.shape[0] for a in core.lora.group_a) == [2 * width] * layers + [3 * width] * layers
    before = core.lora.shared_hits
    first_step_logits(core, tokenizer, [None, None])
    assert core.lora.shared_hits == before  # a base-only forward runs no LoRA
    first_step_logits(core, tokenizer, ["all", None])  # equal to PEFT: test_an_adapter_equals_peft_unmerged_...
    assert core.lora.shared_hits - before == 3 * layers


def test_siblings_that_read_different_tensors_each_use_their_own(core, tokenizer, adapters):
    # q_proj and k_proj fed tensors of their own (pre-hooks), q's freed before k's is made, so k's may be allocated
    # where q's was: a shared x A^T matched by address alone would be q's
    _, model = adapters["all"]

    def hooked(root):
        attention = [m for name, m in root.named_modules() if name.endswith("self_attn")]
        return [h for m in attention for h in (m.q_proj.register_forward_pre_hook(lambda _, a: (a[0] * 2,)),
                                               m.k_proj.register_forward_pre_hook(lambda _, a: (a[0] * -3,)))]

    handles = hooked(core.model) + hooked(model)
    try:
        logits = first_step_logits(core, tokenizer, ["all"])
        ids = tokenizer(PROMPTS[0]).input_ids
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-4)


def test_an_adapter_saved_as_bin_loads_the_same_weights(core, tokenizer):
    # the same numbers in other columns of the stacked layout: equal up to the GEMM's summation order
    safetensors, torch_bin = (first_step_logits(core, tokenizer, [name, None]) for name in ("all", "all-bin"))
    torch.testing.assert_close(safetensors, torch_bin, rtol=1e-6, atol=1e-6)


def test_a_mixed_batch_equals_each_request_alone_and_peft(core, tokenizer, tiny_model, adapters, vector):
    steer = {"vector": vector, "layers": [1, 2], "coef": 3.0, "positions": "all"}
    capture = {"layers": [1, 2], "positions": "generated"}
    rows = [(None, None, None), ("all", None, None), ("rslora", None, None), (None, steer, None),
            ("all", steer, capture), ("patterns", None, capture), ("rslora", steer, None)]
    requests = [core_request(i, spec, cap, adapter=index_of(core, name)) for i, (name, spec, cap) in enumerate(rows)]
    prompts = [tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids for i in range(len(rows))]
    done = core.generate(requests, prompts)  # 7 requests over 4 KV rows: some join a running batch
    together = {i: core.recorder.pop(i) for i in done}
    for i, ((name, spec, cap), request, ids) in enumerate(zip(rows, requests, prompts)):
        alone = core.generate([request], [ids])
        assert done[i].output_ids == alone[i].output_ids, i
        model = tiny_model if name is None else adapters[name][1].get_base_model()
        assert done[i].output_ids == hf_greedy(model, ids, NEW_TOKENS, steer if spec else None), i
        captured = core.recorder.pop(i)
        assert (together[i] is None) == (cap is None)
        if cap is not None:
            assert sorted(together[i]["layers"]) == cap["layers"]
            for layer in cap["layers"]:
                torch.testing.assert_close(_array(together[i], layer), _array(captured, layer), rtol=1e-5, atol=1e-5)
    assert {key[4] for key in core.runner.graphs.by_key} == {False, True}  # decode steps with and without LoRA
    assert core.runner.graph_stats["recaptures"] == 0


def _array(message: dict, layer: int) -> torch.Tensor:
    """One layer of a capture message (ActivationRecorder.pop), float32."""
    shape, raw = message["layers"][layer]
    return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).reshape(shape).copy())


def test_base_rows_are_bit_identical_to_an_engine_without_adapters(core, plain_core, tokenizer):
    logits = first_step_logits(core, tokenizer, [None, "all", None, "patterns"])
    plain = first_step_logits(plain_core, tokenizer, [None] * 4)
    assert torch.equal(logits[0], plain[0]) and torch.equal(logits[2], plain[2])
    assert not torch.equal(logits[1], plain[1])
    prompts = [tokenizer(p).input_ids for p in PROMPTS[:4]]
    names = [None, "all", None, "rslora"]
    done = core.generate([core_request(i, adapter=index_of(core, n)) for i, n in enumerate(names)], prompts)
    alone = plain_core.generate([core_request(i) for i in range(4)], prompts)
    assert done[0].output_ids == alone[0].output_ids and done[2].output_ids == alone[2].output_ids


def test_a_one_token_prompt_alone_is_padded_and_still_equals_peft(core, tiny_model, adapters):
    # a prefill of one token in all is padded to two (engine.core.warmup.placeholder), the pad a base-model token
    done = core.generate([core_request(0, adapter=index_of(core, "all"))], [[17]])
    assert done[0].output_ids == peft_greedy(adapters["all"][1], [17]) != hf_greedy(tiny_model, [17], NEW_TOKENS)


def test_rank_and_alpha_rules_are_peft_s(adapters):
    rslora = read_adapter("rslora", adapters["rslora"][0])
    assert rslora.rank_and_scale("model.layers.1.self_attn.q_proj") == (4, 8 / math.sqrt(4))
    assert rslora.targets("model.layers.1.self_attn.q_proj", True)
    assert not rslora.targets("model.layers.0.self_attn.q_proj", True)  # layers_to_transform [1, 2]
    assert not rslora.targets("model.layers.1.self_attn.k_proj", True)
    patterns = read_adapter("patterns", adapters["patterns"][0])
    assert patterns.rank_and_scale("model.layers.0.mlp.down_proj") == (2, 4 / 2)
    assert patterns.rank_and_scale("model.layers.0.self_attn.o_proj") == (6, 12 / 6)
    assert patterns.rank_and_scale("model.layers.0.mlp.up_proj") == (6, 4 / 6)
    assert not patterns.targets("model.layers.0.mlp.gate_proj", True)
    # each module's scale is PEFT's own
    for name in ADAPTERS:
        adapter = read_adapter(name, adapters[name][0])
        for key, module in adapters[name][1].get_base_model().named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                assert adapter.rank_and_scale(key)[1] == pytest.approx(module.scaling["default"]), (name, key)


def _adapter_dir(tmp_path, source: str, name: str, **changes):
    """A copy of adapter `source`'s directory with its adapter_config.json changed (a value None: the key removed)."""
    target = tmp_path / name
    shutil.copytree(source, target)
    path = target / "adapter_config.json"
    settings = json.loads(path.read_text())
    settings.update(changes)
    path.write_text(json.dumps({k: v for k, v in settings.items() if v is not None}))
    return str(target)


@pytest.mark.parametrize("changes, message", [
    ({"peft_type": "IA3"}, "peft_type is 'IA3'; the engine runs LoRA adapters"),
    ({"use_dora": True}, "sets use_dora, which the engine does not implement"),
    ({"lora_bias": True}, "sets lora_bias, which the engine does not implement"),
    ({"fan_in_fan_out": True}, "sets fan_in_fan_out, which the engine does not implement"),
    ({"modules_to_save": ["lm_head"]}, "sets modules_to_save, which the engine does not implement"),
    ({"bias": "all"}, "sets bias='all', which the engine does not implement"),
    ({"target_modules": None}, "names no target_modules"),
    ({"r": 0}, "r is 0; a LoRA's rank is an integer >= 1"),
])
def test_an_adapter_the_engine_does_not_run_is_refused_before_start(tmp_path, adapters, changes, message):
    directory = _adapter_dir(tmp_path, adapters["all"][0], "bad", **changes)
    with pytest.raises(ConfigError) as info:
        tiny_config(adapters={"bad": directory})
    assert str(info.value).startswith(f"--adapter bad={directory}: ") and message in str(info.value)


def test_a_missing_directory_or_file_or_bad_name_is_refused_before_start(tmp_path, adapters):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(adapters["all"][0] + "/adapter_config.json", no_weights)
    for name, directory, message in [("x", str(tmp_path / "nowhere"), "no such directory"),
                                     ("x", str(empty), "no adapter_config.json there"),
                                     ("x", str(no_weights), "no adapter_model.safetensors or adapter_model.bin"),
                                     ("base", adapters["all"][0], "not 'base', which names the base model"),
                                     ("a b", adapters["all"][0], "an adapter's name is letters")]:
        with pytest.raises(ConfigError, match="--adapter ") as info:
            tiny_config(adapters={name: directory})
        assert message in str(info.value)
    with pytest.raises(AdapterError, match="give a mapping"):
        check_adapters(["x"])


def test_an_adapter_that_does_not_fit_the_model_is_refused_at_load(tmp_path, tiny_source, adapters):
    cases = [(_adapter_dir(tmp_path, adapters["all"][0], "nothing", target_modules=["w_qkv"]),
              "match no module of this model"),
             (_adapter_dir(tmp_path, adapters["all"][0], "rank", r=4), "needs [4, 64]"),
             (_adapter_dir(tmp_path, adapters["all"][0], "fewer", target_modules=["q_proj"]),
              "which its target_modules do not target"),
             (_adapter_dir(tmp_path, adapters["all"][0], "head", target_modules=["q_proj", "lm_head"]),
              "it targets the output layer 'lm_head', which the engine runs at the sampled positions only"),
             (_adapter_dir(tmp_path, adapters["all"][0], "embed", target_modules=["embed_tokens"]),
              "it targets 'model.embed_tokens', a Gemma3TextScaledWordEmbedding; the engine runs LoRA on nn.Linear")]
    for directory, message in cases:
        with pytest.raises(AdapterRefused) as info:
            EngineCore(tiny_config(adapters={"a": directory}), tiny_source)
        assert str(info.value).startswith(f"--adapter a={directory}: ") and message in str(info.value)


def test_all_linear_targets_every_linear_but_the_output_layer(tmp_path, tiny_source, tokenizer, adapters):
    every = _adapter_dir(tmp_path, adapters["all"][0], "every", target_modules="all-linear")
    excluded = _adapter_dir(tmp_path, adapters["all"][0], "excluded", target_modules="all-linear",
                            exclude_modules=["down_proj"])
    named = EngineCore(tiny_config(adapters={"all": adapters["all"][0], "every": every}), tiny_source)
    logits = [first_step_logits(named, tokenizer, [name, None]) for name in ("all", "every")]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-6, atol=1e-6)
    with pytest.raises(AdapterRefused, match=r"its weights are for 'model.layers.0.mlp.down_proj', which its "
                                             r"target_modules do not target"):
        EngineCore(tiny_config(adapters={"x": excluded}), tiny_source)


def test_records_name_adapters_through_the_pipeline(core, tokenizer, adapters, tmp_path):
    """The whole pipeline: a record's adapter by name, its result stating it; an unknown name or a non-string is
    that record's error naming the loaded adapters; null is the base model."""
    records = [{"id": "a", "prompt": PROMPTS[0], "adapter": "all"}, {"id": "base", "prompt": PROMPTS[0]},
               {"id": "null", "prompt": PROMPTS[0], "adapter": None}, {"id": "typo", "prompt": PROMPTS[0],
                                                                        "adapter": "al"},
               {"id": "number", "prompt": PROMPTS[0], "adapter": 1}]
    config = tiny_config(adapters={"all": adapters["all"][0]}, sampling=dataclasses.replace(
        tiny_config().sampling, max_new_tokens=NEW_TOKENS))
    with Engine(config) as engine:
        got = {r["id"]: r for r in engine.generate_all(records)}
    ids = tokenizer(PROMPTS[0]).input_ids
    assert got["a"]["adapter"] == "all" and got["a"]["completion_token_ids"] == peft_greedy(adapters["all"][1], ids)
    base = core.generate([core_request(0)], [ids])[0].output_ids
    assert "adapter" not in got["base"] and got["base"]["completion_token_ids"] == base
    assert got["null"]["completion_token_ids"] == base
    assert got["typo"]["error"] == "field 'adapter' names 'al', which is not a loaded adapter (loaded: all)"
    assert got["number"]["error"].startswith("field 'adapter' is 1; give the name of a loaded adapter")


def test_engine_run_reports_a_bad_adapter_in_one_line(tmp_path, adapters):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    bad = _adapter_dir(tmp_path, adapters["all"][0], "dora", use_dora=True)
    result = engine_run("--input", str(path), "--adapter", f"d={bad}", "--quiet", *TINY_ARGS)
    assert result.returncode == 1 and "sets use_dora, which the engine does not implement" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    unfit = _adapter_dir(tmp_path, adapters["all"][0], "unfit", target_modules=["w_qkv"])
    result = engine_run("--input", str(path), "--adapter", f"u={unfit}", "--quiet", *TINY_ARGS)
    assert result.returncode == 1 and f"--adapter u={unfit}: its target_modules" in result.stderr
    assert "Traceback" not in result.stderr


def test_engine_run_with_adapters_states_them_and_resumes_only_with_the_same(tmp_path, adapters, tokenizer):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"id": "a", "prompt": PROMPTS[1], "adapter": "poet"},
                                                            {"id": "b", "prompt": PROMPTS[1]}]))
    out = tmp_path / "out.jsonl"
    args = ["--input", str(path), "--output", str(out), "--return-tokens", "--ignore-eos", *TINY_ARGS]
    result = engine_run(*args, "--adapter", f"poet={adapters['all'][0]}")
    assert result.returncode == 0, result.stderr
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    ids = tokenizer(PROMPTS[1]).input_ids
    assert got["a"]["adapter"] == "poet" and got["a"]["completion_token_ids"] == peft_greedy(adapters["all"][1], ids)
    assert "adapter" not in got["b"]
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert list(manifest["adapters"]) == ["poet"]
    result = engine_run(*args, "--adapter", f"poet={adapters['rslora'][0]}")  # the same name, other weights
    assert result.returncode == 1 and "adapters: was" in result.stderr, result.stderr
