"""Interventions beyond adding (clamp, SAE features, gates), per request and mixed in one batch with unsteered and
`add` rows under KV-row refill: the engine's teacher-forced logits against plain forward hooks written from the
documented rules (support.reference.intervened_sequence); unsteered requests bit-identical to no steering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.pipeline.request import RecordError, parse_steering

HIDDEN, D_SAE = 64, 48


@pytest.fixture(scope="module")
def forced(tiny_source, tokenizer):
    from support import tiny_config
    from support.teacher_forcing import forced_case
    from engine.core.engine_core import EngineCore

    return forced_case(EngineCore(tiny_config(), tiny_source), tokenizer)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Directions u and w, a probe, and two Gemma-Scope-style SAEs (JumpReLU at layer 2; ReLU with b_dec subtracted
    at layer 1, SAELens style), with their arrays for the reference."""
    folder, rng = tmp_path_factory.mktemp("directions"), np.random.default_rng(7)
    paths = {name: str(folder / f"{name}.npy") for name in ("u", "w", "probe")}
    for name, path in paths.items():
        np.save(path, rng.standard_normal(HIDDEN).astype(np.float32) * (3 if name != "probe" else 1))
    saes = {}
    for name, layer in (("jump", 2), ("relu", 1)):
        arrays = {"W_enc": rng.standard_normal((HIDDEN, D_SAE)).astype(np.float32) / 4,
                  "W_dec": rng.standard_normal((D_SAE, HIDDEN)).astype(np.float32),
                  "b_enc": rng.standard_normal(D_SAE).astype(np.float32),
                  "b_dec": rng.standard_normal(HIDDEN).astype(np.float32)}
        if name == "jump":
            arrays["threshold"] = np.abs(rng.standard_normal(D_SAE)).astype(np.float32)
            path = folder / f"layer_{layer}" / "width_48" / "params.npz"
            path.parent.mkdir(parents=True)
            np.savez(path, **arrays)
        else:
            path = folder / "relu-sae"
            write_saelens(path, arrays, f"blocks.{layer}.hook_resid_post")
        saes[str(path)] = {**arrays, "threshold": arrays.get("threshold"), "layer": layer, "sub_b_dec": name == "relu"}
    paths["jump"], paths["relu"] = list(saes)
    paths["saes"] = saes
    return paths


def write_saelens(folder, arrays: dict, hook: str) -> None:
    import json

    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    save_file(arrays, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "d_in": HIDDEN, "d_sae": D_SAE, "architecture": "standard", "activation_fn_str": "relu", "hook_name": hook,
        "apply_b_dec_to_input": True, "normalize_activations": "none", "dtype": "float32"}))


def check(forced, model, specs: list, saes: dict, tolerance: float = 1e-4, must_change: bool = True) -> list:
    """Teacher-forced engine logits of request i under specs[i] equal a plain HF forward with intervened_sequence's
    hooks; unsteered requests are bit-identical to the run with no steering; with must_change, each intervention
    changed the logits (the specs are chosen so that every one does on the CPU's tiny model)."""
    from support.reference import intervened_sequence
    from support.teacher_forcing import forced_logits, hf_logits

    core, sequences, lens, plain = forced
    got = forced_logits(core, sequences, lens, [None if s is None else parse_steering(s) for s in specs])
    for i, spec in enumerate(specs):
        if spec is None:
            assert torch.equal(got[i], plain[i]), i
            continue
        with intervened_sequence(model, spec, lens[i], saes):
            expected = hf_logits(model, sequences[i], lens[i])[:-1].cpu()
        torch.testing.assert_close(got[i], expected, rtol=tolerance, atol=tolerance, msg=lambda m: f"request {i}: {m}")
        assert not must_change or not torch.equal(got[i], plain[i]), f"request {i}: the intervention changed nothing"
    return got


def add(path, layers, **extra) -> dict:
    return {"vector": path, "layers": layers, "coef": 2.0, **extra}


def mixed_specs(files) -> list:
    """Clamps (value, range, gated), SAE values and coefs, gated additions, with add and unsteered rows."""
    u, w, probe, jump, relu = (files[k] for k in ("u", "w", "probe", "jump", "relu"))
    gate_above = {"vector": probe, "layer": 1, "above": 0.0}
    specs = [
        {"op": "clamp", "vector": u, "layers": [1, 3], "value": 0.0},  # the projection on u removed at 1 and 3
        None,
        {"op": "clamp", "vector": w, "layers": [2], "range": [None, -1.0], "positions": "generated"},
        add(u, [2]),
        [{"op": "clamp", "vector": u, "layers": [2], "range": [-0.5, 0.5]}, add(w, [2, 3], positions="prompt")],
        {"op": "sae", "sae": jump, "feature": [3, 17], "value": 6.0},  # its layer (2) from the path
        {"op": "sae", "sae": relu, "feature": 5, "coef": 3.0, "positions": {"prompt": [-2, None]}},
        {"op": "sae", "sae": relu, "feature": 9, "value": 0.0, "layers": [1]},
        [add(w, [2], when=gate_above), add(u, [3], coef=-1.0, when={**gate_above, "above": 0.5})],
        [{"op": "clamp", "vector": u, "layers": [3], "value": 4.0, "when": {"vector": probe, "layer": 2,
                                                                         "below": 0.0}},
         add(w, [1], positions="generated")],
    ]
    return specs


def ablation_specs(files) -> list:
    """Ablations (all layers, coef, positions, gates above and below, two directions) with clamps, additions and
    unsteered rows."""
    u, w, probe = (files[k] for k in ("u", "w", "probe"))
    specs = [
        {"op": "ablate", "vector": u, "layers": "all"},
        None,
        [{"op": "ablate", "vector": w, "layers": [0, 2], "coef": 0.5}, add(u, [3])],
        {"op": "ablate", "vector": u, "layers": [1, 3], "positions": "generated"},
        add(w, [2]),
        [{"op": "ablate", "vector": u, "layers": [2, 3], "when": {"vector": probe, "layer": 1, "above": 0.0}},
         {"op": "clamp", "vector": w, "layers": [3], "value": 1.0}],
        {"op": "ablate", "vector": w, "layers": "all", "positions": {"prompt": [-3, None], "generated": [2]}},
        [{"op": "ablate", "vector": u, "layers": [1]}, {"op": "ablate", "vector": w, "layers": [1]}],
        {"op": "ablate", "vector": u, "layers": [3], "when": {"vector": probe, "layer": 0, "below": 0.0}},
        None,
    ]
    return specs


def test_clamps_sae_features_and_gates_mixed_with_add_and_unsteered_rows(forced, tiny_model, files):
    check(forced, tiny_model, mixed_specs(files), files["saes"])


def test_ablation_mixed_with_clamps_additions_and_unsteered_rows(forced, tiny_model, files):
    """Ablation at every residual write (embeddings, attention and MLP post-norms on this Gemma-3-shaped model), its
    coef, positions and gates, mixed in one batch with clamps, additions and unsteered rows under KV-row refill."""
    check(forced, tiny_model, ablation_specs(files), {})


@pytest.mark.gpu
def test_every_op_inside_compiled_layers_and_cuda_graphs(files):
    """The same batches on the GPU (fp32): decode replayed from CUDA graphs, the layers compiled (ablation through
    its custom op inside them), against the plain hooks within 1e-3."""
    import os

    from support import tiny_config
    from support.teacher_forcing import forced_case
    from engine.core.engine_core import EngineCore
    from engine.models import load_hf_tokenizer, load_model, resolve_model

    config = tiny_config(tokenizer=os.environ.get("ENGINE_GPU_TEST_TOKENIZER"), device="cuda", dtype="float32")
    source = resolve_model(config.model, config.tokenizer, config.cache_dir)
    tokenizer = load_hf_tokenizer(source.tokenizer_dir)
    forced = forced_case(EngineCore(config, source), tokenizer)
    assert forced[0].runner.use_graphs
    model = load_model(source, torch.float32, "cuda", vocab_size=len(tokenizer))
    # the GPU's random weights are drawn on the device (not the CPU's): a gate may stay shut there, as the reference's
    check(forced, model, mixed_specs(files), files["saes"], tolerance=1e-3, must_change=False)
    check(forced, model, ablation_specs(files), {}, tolerance=1e-3, must_change=False)
    for positions in ("last_prompt", "all_prompt", "generated"):
        check_sae_capture(forced, files, positions, 1e-3)


def test_ablation_on_all_layers_leaves_no_projection_at_any_layer(forced, files, tmp_path):
    """After ablating u on every layer, capture reads h . u = 0 at the output of every layer (the residual is the sum
    of writes, each made orthogonal to u); unablated, the direction is there."""
    core, sequences, lens, _ = forced
    prompt_ids = sequences[0][:lens[0]]
    u = np.load(files["u"])
    unit = u / np.linalg.norm(u)
    spec = parse_steering({"op": "ablate", "vector": files["u"], "layers": "all"})
    states = capture_all_layers(core, prompt_ids, spec, tmp_path)
    assert np.abs(states @ unit).max() < 1e-4, np.abs(states @ unit).max()
    plain = capture_all_layers(core, prompt_ids, None, tmp_path)
    assert np.abs(plain @ unit).max() > 0.1


def test_ablation_reaches_every_write_of_a_family_without_post_norms(tmp_path, tokenizer):
    """Llama-shaped layers (attention and MLP outputs added as they are): ablating on all layers leaves h . u = 0."""
    from support import PROMPTS, tiny_config
    from engine.config import EngineConfig
    from engine.core.engine_core import EngineCore
    from engine.models import resolve_model

    core = EngineCore(tiny_config(model="random:tiny-llama"), resolve_model("random:tiny-llama", None,
                                                                            EngineConfig().cache_dir))
    u = np.random.default_rng(3).standard_normal(core.steering.hidden_size).astype(np.float32)
    np.save(tmp_path / "u.npy", u)
    spec = parse_steering({"op": "ablate", "vector": str(tmp_path / "u.npy"), "layers": "all"})
    states = capture_all_layers(core, tokenizer(PROMPTS[1]).input_ids, spec, tmp_path)
    assert np.abs(states @ (u / np.linalg.norm(u))).max() < 1e-4


def test_a_value_clamp_sets_the_projection_read_back_by_capture(forced, files, tiny_source, tokenizer, tmp_path):
    """Clamping the projection on u to 0 at every layer: capture reads h . u = 0 at every layer's output."""
    from support import PROMPTS, tiny_config
    from engine.core.engine_core import EngineCore

    u = np.load(files["u"])
    unit = u / np.linalg.norm(u)
    core = EngineCore(tiny_config(), tiny_source)
    spec = parse_steering({"op": "clamp", "vector": files["u"], "layers": "all", "value": 0.0})
    states = capture_all_layers(core, tokenizer(PROMPTS[0]).input_ids, spec, tmp_path)
    assert np.abs(states @ unit).max() < 1e-4, np.abs(states @ unit).max()
    plain = capture_all_layers(core, tokenizer(PROMPTS[0]).input_ids, None, tmp_path)
    assert np.abs(plain @ unit).max() > 0.1  # without the clamp the direction is there


def capture_all_layers(core, prompt_ids, spec, folder) -> np.ndarray:
    """[layers, tokens, H]: the residual after each layer at every prompt token, captured by the engine (the last
    layer's too: capture reads the decoder layer's output, before the final norm)."""
    from support import core_request
    from engine.storage.activations import tensors_of

    layers = list(range(core.steering.num_layers))
    core.generate([core_request(0, spec, {"layers": layers, "positions": "all_prompt"}, max_new_tokens=1)],
                  [prompt_ids])
    captured = tensors_of(core.recorder.pop(0))
    return np.stack([captured[layer].float().numpy() for layer in layers])


@pytest.mark.parametrize("spec, fragment", [
    ({"op": "erase", "vector": "v.npy"}, "op is \"erase\"; use one of add, ablate, clamp, sae"),
    ({"op": "ablate", "vector": "v.npy", "layers": [2], "value": 0}, "unknown key(s) ['value'] for op ablate"),
    ({"op": "ablate", "vector": "v.npy", "layers": [2], "when": {"vector": "p.npy", "layer": 2, "above": 0}},
     "the ablated layer 2 itself"),
    ({"op": "clamp", "vector": "v.npy", "layers": [1]}, "a clamp takes value"),
    ({"op": "clamp", "vector": "v.npy", "layers": [1], "value": 0, "range": [0, 1]}, "a clamp takes value"),
    ({"op": "clamp", "vector": "v.npy", "layers": [1], "range": [2, 1]}, "lo must not be above hi"),
    ({"op": "clamp", "vector": "v.npy", "layers": [1], "range": [None, None]}, "either end null"),
    ({"op": "clamp", "vector": "v.npy", "layers": [1], "value": 0, "coef": 2}, "unknown key(s) ['coef'] for op clamp"),
    ({"op": "sae", "sae": "s.npz", "feature": 1}, "give value"),
    ({"op": "sae", "sae": "s.npz", "feature": -1, "value": 1}, "feature must be a feature index >= 0"),
    ({"op": "sae", "vector": "s.npz", "feature": 1, "value": 1}, "unknown key(s) ['vector'] for op sae"),
    ({"vector": "v.npy", "layers": [1], "when": {"vector": "p.npy", "layer": 3, "above": 0}},
     "when.layer is 3, after the term's first layer 1"),
    ({"vector": "v.npy", "layers": [1], "when": {"vector": "p.npy", "layer": 0}}, "give above or below"),
    ({"vector": "v.npy", "layers": [1], "when": {"vector": "p.npy", "layer": 0, "above": 0, "below": 1}},
     "give above or below"),
])
def test_bad_op_terms_are_clear_record_errors(spec, fragment):
    with pytest.raises(RecordError) as info:
        parse_steering(spec)
    assert fragment in str(info.value), str(info.value)


def test_op_terms_that_cannot_apply_to_the_model_are_that_records_error(forced, files, tmp_path):
    core = forced[0]
    jump, probe, u = files["jump"], files["probe"], files["u"]
    np.save(tmp_path / "zero.npy", np.zeros(HIDDEN, np.float32))
    cases = [
        ({"op": "sae", "sae": jump, "feature": D_SAE, "value": 1.0}, f"feature(s) [{D_SAE}] out of range"),
        ({"op": "sae", "sae": jump, "feature": 1, "value": 1.0, "layers": [1, 2]}, "acts at the one layer"),
        ({"op": "clamp", "vector": str(tmp_path / "zero.npy"), "layers": [1], "value": 1.0}, "non-zero direction"),
        ({"vector": u, "layers": "all", "when": {"vector": probe, "layer": 9, "above": 0}},
         "when.layer 9 out of range"),
        ({"op": "sae", "sae": jump, "feature": 1, "value": 1.0, "when": {"vector": probe, "layer": 3, "above": 0}},
         "when.layer is 3, after the term's first layer 2"),  # the SAE's layer, known once it is read
        ({"vector": u, "layers": [2], "norm_match": True, "when": {"vector": probe, "layer": 1, "above": 0}},
         "cannot use norm_match"),
        ([{"vector": u, "layers": [2], "when": {"vector": probe, "layer": 1, "above": t}} for t in (0, 1, 2)],
         "more than 2 distinct gates"),
        ([{"op": "clamp", "vector": u, "layers": [2], "value": float(v)} for v in range(5)], "at most 4 fit"),
        ({"op": "ablate", "vector": str(tmp_path / "zero.npy"), "layers": [1]}, "an ablation needs a non-zero"),
        ([{"op": "ablate", "vector": p, "layers": [1]} for p in (u, probe, files["w"])], "ablates 3 directions"),
        ({"op": "ablate", "vector": u, "layers": "all", "when": {"vector": probe, "layer": 0, "above": 0}},
         "the ablated layer 0 itself"),
    ]
    for spec, fragment in cases:
        with pytest.raises(RecordError) as info:
            core.steering.resolve(parse_steering(spec), 5)
        assert fragment in str(info.value), str(info.value)


def test_records_state_op_terms_as_given():
    spec = [{"op": "clamp", "vector": "v.npy", "layers": "all", "range": [None, 2.0]},
            {"op": "sae", "sae": "s.npz", "feature": [4, 2], "value": 3.0, "positions": "generated"},
            {"vector": "w.npy", "layers": [1], "coef": 2.0, "when": {"vector": "p.npy", "layer": 0, "below": -1.0}}]
    record = parse_steering(spec).to_record()
    assert record == [
        {"op": "clamp", "vector": "v.npy", "layers": "all", "range": [None, 2.0], "positions": "all"},
        {"op": "sae", "sae": "s.npz", "feature": [4, 2], "value": 3.0, "positions": "generated"},
        {"vector": "w.npy", "layers": [1], "coef": 2.0, "positions": "all",
         "when": {"vector": "p.npy", "layer": 0, "below": -1.0}}]
    assert parse_steering(record).to_record() == record
    from engine.specs import SteeringSpec

    assert SteeringSpec.from_record(record) == parse_steering(spec)


def numpy_top(sae: dict, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """An SAE's top-k features of residuals x [n, H], from its arrays as the test wrote them."""
    inputs = x - sae["b_dec"] if sae["sub_b_dec"] else x
    pre = inputs @ sae["W_enc"] + sae["b_enc"]
    f = np.where(pre > sae["threshold"], pre, 0.0) if sae.get("threshold") is not None else np.maximum(pre, 0.0)
    order = np.argsort(-f, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(f, order, axis=-1), order


@pytest.mark.parametrize("positions", ["last_prompt", "mean_prompt", "all_prompt", "generated"])
def test_sae_capture_equals_a_numpy_encode_of_the_captured_residual(forced, files, positions):
    """SAE capture (on the device, in the engine's forwards) against numpy encoding the same request's captured
    residual at the SAE's layer; mixed with steered and plain requests, two SAEs (JumpReLU at 2, ReLU with b_dec
    subtracted at 1) in one batch."""
    check_sae_capture(forced, files, positions, 1e-4)


def check_sae_capture(forced, files, positions: str, tolerance: float) -> None:
    from support import core_request
    from engine.storage.activations import tensors_of

    core, sequences, lens, _ = forced
    saes, k = files["saes"], 5
    requests = [
        core_request(0, None, {"layers": [2], "positions": positions, "sae": files["jump"], "top_k": k}),
        core_request(1, add(files["u"], [1]), {"layers": [1], "positions": positions, "sae": files["relu"],
                                                "top_k": k}),
        core_request(2, None, None),
        core_request(3, {"op": "ablate", "vector": files["w"], "layers": "all"},
                     {"layers": [2], "positions": positions, "sae": files["jump"], "top_k": 2 * k}),
    ]
    prompts = [sequences[i][:lens[i]] for i in range(4)]
    core.generate(requests, prompts)
    for request, path in ((0, "jump"), (1, "relu"), (3, "jump")):
        sae = saes[files[path]]
        got = tensors_of(core.recorder.pop(request))
        layer, top_k = sae["layer"], k if request != 3 else 2 * k
        hidden = got[layer].float().numpy().reshape(-1, HIDDEN)
        values, indices = got[f"sae.{layer}.values"].numpy(), got[f"sae.{layer}.indices"].numpy()
        assert indices.dtype == np.int32 and values.shape == (*got[layer].shape[:-1], top_k)
        want_values, want_indices = numpy_top(sae, hidden, top_k)
        np.testing.assert_allclose(values.reshape(-1, top_k), want_values, rtol=tolerance, atol=tolerance)
        distinct = np.diff(-want_values, axis=-1, append=-np.inf) > 10 * tolerance  # not tied with the next
        positive = (want_values > 10 * tolerance) & distinct & np.roll(distinct, 1, axis=-1)
        assert (indices.reshape(-1, top_k)[positive] == want_indices[positive]).all()
        assert positive.any()
    assert core.recorder.pop(2) is None


def test_sae_capture_through_engine_run_to_the_shards_and_load(files, tmp_path):
    """engine-run writes the features beside the hidden states (`<id>/sae.<L>.values|indices`), and
    engine.activations' load returns them; a capture whose SAE does not fit is that record's error."""
    import subprocess
    import sys

    from support import PROMPTS, ROOT, read_jsonl, write_jsonl
    from engine.storage.activations import load

    records = [{"id": "s", "prompt": PROMPTS[0], "capture": {"sae": files["jump"], "top_k": 3,
                                                              "positions": "generated"}},
               {"id": "both", "prompt": PROMPTS[1], "capture": {"layers": [0], "sae": files["relu"], "top_k": 4,
                                                                 "positions": "last_prompt"}},
               {"id": "bad", "prompt": PROMPTS[2], "capture": {"sae": files["jump"], "top_k": D_SAE + 1}},
               {"id": "plain", "prompt": PROMPTS[3]}]
    source, out = write_jsonl(tmp_path / "in.jsonl", records), tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-m", "engine.apps.run", "--input", str(source), "--output", str(out),
                           "--model", "random:tiny", "--device", "cpu", "--quiet", "--max-new-tokens", "5",
                           "--ignore-eos"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr  # the one bad record: its error beside the results
    results = {r["id"]: r for r in read_jsonl(out)}
    [error] = read_jsonl(tmp_path / "out.errors.jsonl")
    assert error["id"] == "bad" and f"SAE {files['jump']} has {D_SAE} features" in error["error"], error
    assert results["s"]["activations"]["sae_keys"] == ["s/sae.2.indices", "s/sae.2.values"]
    got = load(out)
    assert sorted(got["s"]) == ["sae.2.indices", "sae.2.values"] and got["s"]["sae.2.values"].shape == (4, 3)
    assert sorted(got["both"], key=str) == [0, "sae.1.indices", "sae.1.values"]
    assert got["both"]["sae.1.indices"].dtype == torch.int32 and got["both"]["sae.1.values"].shape == (4,)
    assert list(load(out, layers=[0])["both"]) == [0]


@pytest.mark.gpu
def test_the_cuda_kernels_equal_the_torch_forms():
    """apply_ops and ablate: the Triton kernels (CUDA) against the torch forms (CPU) on the same op rows: slots with
    and without encoder columns, gates above and below, ablations gated and not, and tokens with no ops (copied)."""
    import math

    from engine.core import interventions as ops_module
    from engine.core.interventions import Ablation, GateRead, OpTable, Slot

    torch.manual_seed(0)
    size, tokens = 2304, 37
    table = torch.randn(10, size)
    table[0] = 0
    results = {}
    for device in ("cpu", "cuda"):
        ops = OpTable(device)
        rows = [0, ops.row((Slot(1, 1, 0.0, -math.inf, 0.5, 0.5),), ()),
                ops.row((Slot(2, 3, 0.3, 0.1, 2.0, 2.0, gate=1), Slot(0, 4, lo=1.0, hi=1.0, gate=2)),
                        (GateRead(1, 5, 0.0, 1.0), GateRead(2, 6, 0.2, -1.0)), (Ablation(7, 0.5),)),
                ops.row((), (), (Ablation(8, 1.0), Ablation(9, 0.25, gate=1)))]
        ops.upload_rows()
        op_rows = torch.tensor([[rows[i % 4] for i in range(tokens)]], device=device)
        x = torch.randn(1, tokens, size, generator=torch.Generator().manual_seed(1)).to(device)
        gates = torch.zeros(1, tokens, 3, device=device)
        gates[..., 0] = 1
        out = ops_module.apply_ops(x, op_rows, ops, table.to(device), gates)
        ops_module.ablate(x, op_rows, ops, table.to(device), gates)
        results[device] = (out.cpu(), gates.cpu(), x.cpu())
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-4)
    assert torch.equal(results["cuda"][0][0, ::4], results["cuda"][2][0, ::4])  # no ops: bit for bit (no ablation)
