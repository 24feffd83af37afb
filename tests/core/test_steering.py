"""Steering vector files: every format read and written, GGUF control vectors as repeng / llama.cpp write
them, and a clear error for each bad vector."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.pipeline.request import RecordError, parse_steering
from engine.vectors import load_vectors, named_layers, save_vectors

LAYERS, HIDDEN = 6, 8


def per_layer() -> dict[int, torch.Tensor]:
    return {layer: torch.arange(HIDDEN, dtype=torch.float32) * (layer + 1) for layer in (1, 3, 5)}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".gguf"])
def test_per_layer_vectors_round_trip(tmp_path, suffix):
    path = str(tmp_path / f"v{suffix}")
    save_vectors(path, per_layer(), model_hint="gemma3")
    loaded = load_vectors(path, LAYERS, HIDDEN)
    assert set(loaded) == {1, 3, 5}
    for layer, vector in per_layer().items():
        assert torch.equal(loaded[layer], vector)


def test_single_vectors_apply_to_every_layer(tmp_path):
    v = np.linspace(-1, 1, HIDDEN, dtype=np.float32)
    np.save(tmp_path / "v.npy", v)
    torch.save(torch.from_numpy(v), tmp_path / "v.pt")
    save_file({"anything": torch.from_numpy(v)}, str(tmp_path / "v.safetensors"))
    for name in ("v.npy", "v.pt", "v.safetensors"):
        loaded = load_vectors(str(tmp_path / name), LAYERS, HIDDEN)
        assert list(loaded) == [None] and torch.equal(loaded[None], torch.from_numpy(v))
    rows = np.stack([v * i for i in range(LAYERS)])
    np.save(tmp_path / "rows.npy", rows)  # one row per layer
    assert torch.equal(load_vectors(str(tmp_path / "rows.npy"), LAYERS, HIDDEN)[4], torch.from_numpy(rows[4]))


def test_reads_a_control_vector_written_the_way_repeng_writes_it(tmp_path):
    path = tmp_path / "repeng.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", 2)
    for layer in (2, 4):
        writer.add_tensor(f"direction.{layer}", np.full(HIDDEN, layer / 10, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    loaded = load_vectors(str(path), LAYERS, HIDDEN)
    assert set(loaded) == {2, 4} and torch.allclose(loaded[4], torch.full((HIDDEN,), 0.4))


def bad_gguf(path) -> str:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("direction.1", np.zeros(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.mark.parametrize("make, fragment", [
    (lambda d: str(d / "missing.npy"), "no such file"),
    (lambda d: (d / "v.txt").write_text("1 2 3") and str(d / "v.txt"), "unsupported format"),
    (lambda d: (d / "v.npy").write_bytes(b"not numpy") and str(d / "v.npy"), "cannot read it"),
    (lambda d: np.save(d / "w.npy", np.ones(HIDDEN + 1, np.float32)) or str(d / "w.npy"), "hidden size is 8"),
    (lambda d: np.save(d / "n.npy", np.array([np.nan] * HIDDEN, np.float32)) or str(d / "n.npy"), "NaN or inf"),
    (lambda d: np.save(d / "i.npy", np.ones(HIDDEN, np.int64)) or str(d / "i.npy"), "floating point"),
    (lambda d: save_file({"layer.9": torch.ones(HIDDEN)}, str(d / "o.safetensors")) or str(d / "o.safetensors"),
     "out of range"),
    (lambda d: save_file({"a": torch.ones(HIDDEN), "b": torch.ones(HIDDEN)}, str(d / "k.safetensors"))
     or str(d / "k.safetensors"), "names them layer.<L>"),
    (lambda d: bad_gguf(d / "model.gguf"), "not a control vector"),
])
def test_each_bad_vector_is_a_clear_error(tmp_path, make, fragment):
    with pytest.raises(RecordError) as info:
        load_vectors(make(tmp_path), LAYERS, HIDDEN)
    assert fragment in str(info.value)


def files_of_every_kind(folder) -> dict[str, tuple[int, ...] | None]:
    """Vector files of each layout, with the layers each names (None: one vector with no layer named)."""
    for suffix in (".safetensors", ".pt", ".gguf"):
        save_vectors(str(folder / f"v{suffix}"), per_layer())
    save_file({"layer.2": torch.ones(HIDDEN)}, str(folder / "one-layer.safetensors"))
    v = torch.linspace(-1, 1, HIDDEN)
    np.save(folder / "v.npy", v.numpy())
    torch.save(v, folder / "one.pt")
    save_file({"anything": v}, str(folder / "one.safetensors"))
    np.save(folder / "rows.npy", np.stack([v.numpy() * i for i in range(LAYERS)]))
    save_file({"rows": torch.stack([v * i for i in range(LAYERS)])}, str(folder / "rows.safetensors"))
    return {"v.safetensors": (1, 3, 5), "v.pt": (1, 3, 5), "v.gguf": (1, 3, 5), "one-layer.safetensors": (2,),
            "v.npy": None, "one.pt": None, "one.safetensors": None, "rows.npy": tuple(range(LAYERS)),
            "rows.safetensors": tuple(range(LAYERS))}


def test_named_layers_are_the_layers_load_vectors_keys(tmp_path):
    for name, layers in files_of_every_kind(tmp_path).items():
        path = str(tmp_path / name)
        loaded = load_vectors(path, LAYERS, HIDDEN)
        assert named_layers(path) == layers == (None if None in loaded else tuple(sorted(loaded))), name


def test_named_layers_reads_headers_in_a_process_without_torch(tmp_path):
    """engine-run's parent checks --steer FILE without --steer-layer, and it never imports torch."""
    import subprocess
    import sys

    from support import ROOT

    files_of_every_kind(tmp_path)
    paths = [str(tmp_path / name) for name in ("v.safetensors", "v.gguf", "v.npy", "rows.npy")]
    code = "import sys; from engine.vectors import named_layers; print([named_layers(p) for p in sys.argv[1:]], " \
           "'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, *paths], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[(1, 3, 5), (1, 3, 5), None, (0, 1, 2, 3, 4, 5)] False"


@pytest.mark.parametrize("make, fragment", [
    (lambda d: str(d / "missing.gguf"), "no such file"),
    (lambda d: (d / "v.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"not json") and str(d / "v.safetensors"),
     "cannot read it as a .safetensors file"),
    (lambda d: (d / "v.npy").write_bytes(b"not numpy") and str(d / "v.npy"), "cannot read it as a .npy file"),
    (lambda d: save_file({"a": torch.ones(HIDDEN), "b": torch.ones(HIDDEN)}, str(d / "k.safetensors"))
     or str(d / "k.safetensors"), "key 'a'; a file of several tensors names them layer.<L>"),
    (lambda d: bad_gguf(d / "model.gguf"), "not a control vector"),
    (lambda d: np.save(d / "c.npy", np.ones((2, 2, HIDDEN), np.float32)) or str(d / "c.npy"), "shape (2, 2, 8)"),
])
def test_named_layers_of_a_bad_file_is_a_clear_error(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(RecordError) as info:
        named_layers(path)
    assert str(info.value).startswith(f"steering vector {path}: ") and fragment in str(info.value)


def test_a_2d_array_with_other_than_one_row_per_layer_is_refused_by_its_rows(tmp_path):
    np.save(tmp_path / "rows.npy", np.ones((LAYERS - 1, HIDDEN), np.float32))
    with pytest.raises(RecordError, match=r"a 2-D array of 5 row\(s\); an array of one row per layer needs 6"):
        load_vectors(str(tmp_path / "rows.npy"), LAYERS, HIDDEN)


# ---- positions, normalize, norm_match: the engine under continuous batching against plain forward hooks


@pytest.fixture(scope="module")
def forced(tiny_source, tokenizer):
    from support import tiny_config
    from support.teacher_forcing import forced_case
    from engine.core.engine_core import EngineCore

    return forced_case(EngineCore(tiny_config(), tiny_source), tokenizer)


@pytest.fixture(scope="module")
def vectors(tmp_path_factory) -> tuple[str, str]:
    folder, rng = tmp_path_factory.mktemp("vectors"), np.random.default_rng(1)
    paths = (str(folder / "a.npy"), str(folder / "b.npy"))
    for path in paths:
        np.save(path, rng.standard_normal(64).astype(np.float32) * 2)
    return paths


def term(vector: str, layers, positions="all", coef: float = 3.0, **flags) -> dict:
    return {"vector": vector, "layers": layers, "coef": coef, "positions": positions, **flags}


def normalised(spec):
    """A spec as a record gives it -> the typed spec the core receives (its to_record() is the normalised form)."""
    return None if spec is None else parse_steering(spec)


def check_against_hooks(forced, model, specs: list, tolerance: float = 1e-4) -> list[torch.Tensor]:
    """Teacher-forced engine logits of request i under specs[i] equal a plain HF forward with steered_sequence's
    hooks; unsteered requests are bit-identical to the run with no steering."""
    from support.reference import steered_sequence
    from support.teacher_forcing import forced_logits, hf_logits

    core, sequences, lens, plain = forced
    got = forced_logits(core, sequences, lens, [normalised(spec) for spec in specs])
    for i, spec in enumerate(specs):
        if spec is None:
            assert torch.equal(got[i], plain[i]), i
            continue
        with steered_sequence(model, normalised(spec).to_record(), lens[i]):
            expected = hf_logits(model, sequences[i], lens[i])[:-1].cpu()
        torch.testing.assert_close(got[i], expected, rtol=tolerance, atol=tolerance, msg=lambda m: f"request {i}: {m}")
    return got


def first_changed(got: torch.Tensor, plain: torch.Tensor) -> int | None:
    """The first logits row (row j: the forward at prompt position P - 1 + j) that steering changed."""
    changed = [j for j in range(len(got)) if not torch.equal(got[j], plain[j])]
    return changed[0] if changed else None


def position_cases(a: str, b: str) -> list[tuple]:
    return [  # (spec, first logits row it changes): generated position k is the forward consuming token k (row k + 1)
        (term(a, [1, 3], {"prompt": [0, 3]}), 0),
        (term(a, [1], {"generated": [2, 5]}), 3),
        (None, None),
        (term(b, [2], {"generated": [[0, 1], [4, None]]}), 1),
        (term(a, [1, 3], {"prompt": [-1, None]}), 0),  # the last prompt token only
        ([term(a, [1], {"generated": [0, 4]}), term(b, [1, 3], {"generated": [2, None]}, coef=-2.0),
          term(a, [3], "prompt")], 0),  # ranges overlap on layer 1: the sum there from generated position 2 to 4
        (term(b, [0, 2], {"prompt": [[1, 3], [-2]], "generated": [3]}), 0),
        (None, None),
        (term(a, [2], {"prompt": [2, -1]}), 0),
        (term(b, [1], "generated"), 1),
    ]


def norm_specs(a: str, b: str) -> list:
    return [
        term(a, [2], coef=0.5, norm_match=True),
        term(b, [1], coef=4.0, normalize=True),
        None,
        term(a, [1, 3], {"generated": [1, 3]}, coef=2.0, normalize=True, norm_match=True),
        [term(a, [2], "prompt"), term(b, [2], {"generated": [0, 3]}, coef=0.3, norm_match=True),
         term(a, [2], {"prompt": [-2, None], "generated": [2, None]}, coef=-1.0, normalize=True)],
        None,
        term(b, [0], coef=-0.4, norm_match=True),
        [term(a, [0, 3], "generated", coef=-1.0), term(b, [3], {"prompt": [-1]}, coef=0.2, norm_match=True)],
        None,
        None,
    ]


def test_position_ranges_under_continuous_batching(forced, tiny_model, vectors):
    cases = position_cases(*vectors)
    core, _, _, plain = forced
    got = check_against_hooks(forced, tiny_model, [spec for spec, _ in cases])
    assert [first_changed(g, p) for g, p in zip(got, plain)] == [first for _, first in cases]
    assert not core.steering.norm_layers  # no norm_match / normalize asked: every hook stays one gather-add


def test_normalize_and_norm_match_against_the_formula(forced, tiny_model, vectors):
    a, b = vectors
    core, sequences, lens, plain = forced
    plain_layer0 = [None, None, term(a, [0], coef=2.0)] + [None] * 7
    before = check_against_hooks(forced, tiny_model, plain_layer0)
    key = core.steering.graph_key(True)
    check_against_hooks(forced, tiny_model, norm_specs(a, b))
    # the norm-aware hooks are a new decode-graph variant, not a re-capture of the old ones
    assert core.steering.norm_layers == {0, 1, 2, 3} and core.steering.graph_key(True) != key
    assert core.runner.graph_stats["recaptures"] == 0
    after = check_against_hooks(forced, tiny_model, plain_layer0)
    assert all(torch.equal(x, y) for x, y in zip(before, after))  # plain terms: the same bits under the norm hook


def test_norm_match_needs_a_nonzero_vector(forced, tmp_path):
    np.save(tmp_path / "zero.npy", np.zeros(64, np.float32))
    with pytest.raises(RecordError, match="zero at layer 1; norm_match needs a non-zero direction"):
        forced[0].steering.resolve(parse_steering(term(str(tmp_path / "zero.npy"), [1], norm_match=True)), 5)


def test_pipeline_records_state_the_normalised_spec_and_match_the_core(forced, tokenizer, vectors):
    from support import PROMPTS, core_request, tiny_config
    from engine import Engine

    a, b = vectors
    spec = [{"vector": a, "layers": 1, "positions": {"prompt": [-2], "generated": [1, 3]}, "normalize": True},
            {"vector": b, "layers": [2], "coef": 0.5, "positions": {"generated": [[2]]}, "norm_match": True}]
    steered = [i % 2 == 0 for i in range(len(PROMPTS))]
    rows = [core_request(i, spec if s else None, temperature=0.8) for i, s in enumerate(steered)]
    done = forced[0].generate(rows, [tokenizer(p).input_ids for p in PROMPTS])
    records = [{"prompt": p, "max_new_tokens": 6, "temperature": 0.8, "seed": i, **({"steering": spec} if s else {})}
               for i, (p, s) in enumerate(zip(PROMPTS, steered))]
    with Engine(tiny_config(max_num_seqs=3)) as engine:
        got = engine.generate_all(records)
    assert [r["completion_token_ids"] for r in got] == [done[i].output_ids for i in range(len(PROMPTS))]
    assert got[0]["steering"] == [
        {"vector": a, "layers": [1], "coef": 1.0, "positions": {"prompt": [[-2, None]], "generated": [[1, 3]]},
         "normalize": True},
        {"vector": b, "layers": [2], "coef": 0.5, "positions": {"generated": [[2, None]]}, "norm_match": True},
    ] and got[1]["steering"] is None


# ---- a term without layers: the layers its vector file names


@pytest.fixture(scope="module")
def layer_files(tmp_path_factory) -> dict[str, str]:
    """Distinct vectors at layers 1 and 3 of the tiny model (4 layers, hidden size 64), as .safetensors (`layer.<L>`)
    and as a GGUF control vector (`direction.<L>`); and one unnamed 1-D vector as .npy."""
    folder, gen = tmp_path_factory.mktemp("layer-files"), torch.Generator().manual_seed(7)
    vectors = {1: torch.randn(64, generator=gen) * 2, 3: torch.randn(64, generator=gen) * 2}
    paths = {"safetensors": str(folder / "v.safetensors"), "gguf": str(folder / "v.gguf"), "npy": str(folder / "v.npy")}
    save_vectors(paths["safetensors"], vectors)
    save_vectors(paths["gguf"], vectors, model_hint="gemma3")
    np.save(paths["npy"], vectors[1].numpy())
    return paths


def file_layer_specs(files: dict[str, str], layers) -> list:
    """Specs over the two per-layer files, each term with `layers` given, or (None) left to the file."""
    given = {} if layers is None else {"layers": layers}
    st, gg = files["safetensors"], files["gguf"]
    return [{"vector": st, "coef": 3.0, **given}, None,
            {"vector": gg, "coef": -2.0, "positions": {"generated": [1, None]}, **given},
            [{"vector": gg, "coef": 1.5, "positions": "prompt", **given}, term(files["npy"], [2], coef=1.0)],
            {"vector": st, "coef": 0.5, "norm_match": True, **given}, None,
            {"vector": gg, "coef": 2.0, "positions": {"prompt": [-2, None]}, "normalize": True, **given},
            None, {"vector": st, "coef": 4.0, "positions": "generated", **given}, None]


def test_a_term_without_layers_steers_the_layers_its_file_names(forced, tiny_model, layer_files):
    """Teacher-forced logits of each spec with its layers left to the file are the very bits of the same spec with
    layers [1, 3] given, and those equal plain HF forward hooks adding each layer's vector of the file."""
    from support.teacher_forcing import forced_logits

    core, sequences, lens, plain = forced
    given = check_against_hooks(forced, tiny_model, file_layer_specs(layer_files, [1, 3]))
    by_file = forced_logits(core, sequences, lens, [normalised(s) for s in file_layer_specs(layer_files, None)])
    assert all(torch.equal(a, b) for a, b in zip(by_file, given))
    assert all(not torch.equal(given[i], plain[i]) for i in (0, 2, 3, 4, 6, 8))  # the steering moved every one


def test_a_file_of_one_unnamed_vector_needs_layers(forced, layer_files):
    path = layer_files["npy"]
    with pytest.raises(RecordError) as info:
        forced[0].steering.resolve(parse_steering({"vector": path, "coef": 4}), 5)
    assert str(info.value) == (f"steering vector {path}: one vector with no layer named; give the layers to steer "
                               f"(\"layers\": [6] in a record, --steer-layer 6)")


def test_the_file_layers_are_hooked_checked_against_the_model_and_reported(layer_files, tmp_path):
    """on_steer (the hooks, and whether they are norm-aware) gets the file's layers; a layer the model lacks is the
    record's error; the plan carries the layers each term steered when one left them to its file."""
    from engine.core.interventions import OpTable
    from engine.core.steering_plan import SteeringResolver, VectorTable

    marked = []
    resolver = SteeringResolver(VectorTable(64, "cpu", 4, torch.float32), OpTable("cpu"), 4, 64,
                                lambda layer, uses_norm, uses_ops, uses_ablate: marked.append((layer, uses_norm)))
    spec = parse_steering([{"vector": layer_files["gguf"], "norm_match": True}, term(layer_files["npy"], [2])])
    assert resolver.resolve(spec, 5).term_layers == ((1, 3), (2,))
    assert marked == [(1, True), (3, True), (2, False)]
    assert resolver.resolve(parse_steering(term(layer_files["gguf"], [1, 3])), 5).term_layers is None
    save_vectors(str(tmp_path / "deep.gguf"), {1: torch.ones(64), 7: torch.ones(64)})
    with pytest.raises(RecordError, match=r"\(layer.7\): layer 7 is out of range; the model has layers 0..3"):
        resolver.resolve(parse_steering({"vector": str(tmp_path / "deep.gguf")}), 5)


@pytest.mark.gpu
def test_ranges_and_norms_inside_cuda_graphs(vectors):
    """The same checks with decode replayed from CUDA graphs (fp32): the KV rows' table rows switch between replays, and
    the norm-aware hooks are captured after the re-capture they trigger."""
    import os

    from support import tiny_config
    from support.teacher_forcing import forced_case
    from engine.core.engine_core import EngineCore
    from engine.models import load_model, resolve_model
    from engine.models import load_hf_tokenizer

    config = tiny_config(tokenizer=os.environ.get("ENGINE_GPU_TEST_TOKENIZER"), device="cuda", dtype="float32")
    source = resolve_model(config.model, config.tokenizer, config.cache_dir)
    tokenizer = load_hf_tokenizer(source.tokenizer_dir)
    forced = forced_case(EngineCore(config, source), tokenizer)
    assert forced[0].runner.use_graphs
    model = load_model(source, torch.float32, "cuda", vocab_size=len(tokenizer))  # random weights: drawn on the device
    cases = position_cases(*vectors)
    got = check_against_hooks(forced, model, [spec for spec, _ in cases], tolerance=1e-3)
    assert [first_changed(g, p) for g, p in zip(got, forced[3])] == [first for _, first in cases]
    check_against_hooks(forced, model, norm_specs(*vectors), tolerance=1e-3)
