"""Parsing input records: defaults, carried fields, and a clear error for each bad field."""

import pytest

from engine.config import SamplingDefaults
from engine.pipeline.request import RecordError, decode_line, derive_seed, parse_record, parse_steering
from engine.specs import Ranges

DEFAULTS = SamplingDefaults(max_new_tokens=32, temperature=0.5, seed=9)


def parse(obj, steering=None):
    return parse_record(obj, 0, 3, DEFAULTS, steering)


def test_defaults_fill_in_and_extra_fields_carry_through():
    r = parse({"prompt": "hi", "topic": "x", "meta": {"a": 1}})
    assert (r.id, r.max_new_tokens, r.temperature, r.top_p, r.top_k) == ("3", 32, 0.5, 1.0, 0)
    assert r.extra == {"topic": "x", "meta": {"a": 1}}
    assert r.seed == derive_seed(9, "3") and r.seed != derive_seed(10, "3")


def test_record_fields_override_defaults():
    r = parse({"prompt": "hi", "id": "a", "max_new_tokens": 5, "temperature": 0, "top_p": 0.9, "top_k": 4,
               "seed": 123, "stop": "\n", "ignore_eos": True})
    assert (r.id, r.max_new_tokens, r.temperature, r.top_p, r.top_k, r.seed, r.stop, r.ignore_eos) == (
        "a", 5, 0.0, 0.9, 4, 123, ["\n"], True)


@pytest.mark.parametrize("obj, fragment", [
    ({}, "exactly one of 'prompt'"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one of 'prompt'"),
    ({"prompt": 5}, "field 'prompt'"),
    ({"prompt": "a", "id": 7}, "field 'id'"),
    ({"prompt": "a", "id": ""}, "field 'id' is empty"),
    ({"prompt": "a", "max_new_tokens": "10"}, "field 'max_new_tokens'"),
    ({"prompt": "a", "max_new_tokens": 0}, "field 'max_new_tokens' is 0"),
    ({"prompt": "a", "max_new_tokens": 1 << 40}, "field 'max_new_tokens' is"),
    ({"prompt": "a", "temperature": 10 ** 400}, "field 'temperature'"),
    ({"prompt": "a", "max_new_tokens": True}, "field 'max_new_tokens'"),
    ({"prompt": "a", "temperature": -1}, "field 'temperature' is -1"),
    ({"prompt": "a", "top_p": 0}, "field 'top_p' is 0"),
    ({"prompt": "a", "top_k": -2}, "field 'top_k' is -2"),
    ({"prompt": "a", "top_k": 1 << 63}, "field 'top_k' is"),
    ({"prompt": "a", "seed": 1 << 64}, "field 'seed'"),
    ({"prompt": "a", "seed": -1}, "field 'seed'"),
    ({"prompt": "a", "stop": [""]}, "field 'stop'"),
    ({"messages": []}, "field 'messages'"),
    ({"messages": [{"role": "user"}]}, "field 'messages'"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "url": "cat.png"}, {"type": "text", "text": "?"}]}]},
     "messages[0] holds image content; the engine runs text only"),
    ({"prompt": "a", "steering": "v.pt"}, "not a named spec"),
    ({"prompt": "a", "steering": 3}, "must be an object"),
    ({"prompt": "a", "steering": []}, "empty list"),
    ({"prompt": "a", "steering": {"vector": "v.pt", "layers": []}}, ".layers must be a layer index"),
    ({"prompt": "a", "steering": {"vector": "v.pt", "layer": None}}, "or left out to steer the layers the vector"),
    ({"prompt": "a", "steering": {"vector": "v.pt", "layers": [1], "positions": "middle"}}, ".positions"),
    ({"prompt": "a", "steering": {"vector": "v.pt", "layers": 1, "coef": "big"}}, ".coef"),
    ({"prompt": "a", "steering": {"vector": "v.pt", "layers": 1, "coef": 1e39}}, "beyond float32's range"),
    ({"prompt": "a", "steering": {"vector": "v.pt", "layers": 1, "coef": -(10 ** 400)}}, ".coef must be a finite"),
    ({"prompt": "a", "steering": {"vector": "v.pt", "layers": 1, "scale": 2}}, "unknown key"),
])
def test_bad_fields_are_named(obj, fragment):
    with pytest.raises(RecordError, match=None) as info:
        parse(obj)
    assert fragment in str(info.value)


def test_decode_line_errors_name_the_line():
    with pytest.raises(RecordError, match="line 4 is not valid JSON"):
        decode_line(b"{nope", 4)
    with pytest.raises(RecordError, match="line 5 is not valid UTF-8"):
        decode_line(b'{"prompt": "\xff"}', 5)
    with pytest.raises(RecordError, match="line 6 is a JSON list"):
        decode_line(b"[1, 2]", 6)
    with pytest.raises(RecordError, match="line 7 is not valid JSON: it nests arrays or objects too deeply"):
        decode_line(b'{"prompt": ' + b"[" * 50000, 7)  # Python's parser recurses: RecursionError, not a JSON error
    with pytest.raises(RecordError, match="line 8 is not valid JSON: it holds a number too long to read"):
        decode_line(b'{"prompt": "a", "seed": ' + b"1" * 5000 + b"}", 8)  # ValueError, not a JSON error


def test_steering_normalised_and_null_disables_job_steering():
    spec = parse_steering({"vector": "v.npy", "layer": 3, "coef": 2})
    assert spec.to_record() == {"vector": "v.npy", "layers": [3], "coef": 2.0, "positions": "all"}
    job = parse_steering({"vector": "j.npy", "layers": [1], "coef": 1.0, "positions": "all"})
    assert parse({"prompt": "a"}, steering=job).steering == job
    assert parse({"prompt": "a", "steering": None}, steering=job).steering is None


def test_named_specs_resolve_and_unknown_names_are_errors(tmp_path):
    from engine.pipeline.request import load_named_specs

    path = tmp_path / "specs.toml"
    path.write_text('["honesty+4@L6"]\nvector = "h.gguf"\nlayers = [6]\ncoef = 4\n\n'
                    '[mix]\nterms = [{vector = "a.npy", layers = 2}, {vector = "b.npy", layers = [3], coef = -1, '
                    'positions = "generated"}]\n')
    named = load_named_specs(str(path))
    r = parse_record({"prompt": "a", "steering": "honesty+4@L6"}, 0, 1, DEFAULTS, None, named)
    assert r.steering.to_record() == {"vector": "h.gguf", "layers": [6], "coef": 4.0, "positions": "all"}
    assert r.steering_name == "honesty+4@L6" and r.extra == {}
    assert len(parse_record({"prompt": "a", "steering": "mix"}, 0, 1, DEFAULTS, None, named).steering.terms) == 2
    with pytest.raises(RecordError, match="'nope', which is not a named spec .known: honesty"):
        parse_record({"prompt": "a", "steering": "nope"}, 0, 1, DEFAULTS, None, named)
    with pytest.raises(RecordError, match="pass --steering-specs"):
        parse_record({"prompt": "a", "steering": "mix"}, 0, 1, DEFAULTS, None)


@pytest.mark.parametrize("text, fragment", [
    ("[a\nvector=1", "cannot read it"),
    ('[a]\nvector = "v.npy"\nlayers = []\n', "[a].layers"),
    ('a = 3\n', "[a] must be a table"),
    ('[b]\nvector = "v.npy"\nlayers = [1]\npositions = "end"\n', "[b].positions"),
])
def test_bad_named_specs_files_name_the_entry(tmp_path, text, fragment):
    from engine.config import ConfigError, EngineConfig

    path = tmp_path / "specs.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        EngineConfig(steering_specs=str(path))
    assert fragment in str(info.value)


def test_steering_ranges_and_norm_flags_normalised():
    spec = parse_steering([
        {"vector": "a.npy", "layers": 2, "positions": {"prompt": [-1, None]}, "normalize": True},
        {"vector": "b.npy", "layers": [4], "positions": {"generated": [[0, 5], [10]], "prompt": [0, 3]},
         "norm_match": True, "normalize": False},
    ])
    assert spec.to_record() == [
        {"vector": "a.npy", "layers": [2], "coef": 1.0, "positions": {"prompt": [[-1, None]]}, "normalize": True},
        {"vector": "b.npy", "layers": [4], "coef": 1.0,
         "positions": {"prompt": [[0, 3]], "generated": [[0, 5], [10, None]]}, "norm_match": True},
    ]


@pytest.mark.parametrize("positions, fragment", [
    ({"prompt": [5, 2]},
     "positions.prompt is [5, 2]; start must be below end (the range is [start, end)), e.g. [2, 5]"),
    ({"generated": [3, 3]}, "positions.generated is [3, 3]; start must be below end"),
    ({"prompt": [-1, -1]}, "e.g. [-1, null]"),
    ({"prompt": [0.5, 2]}, "positions.prompt is [0.5, 2]; give [start, end) as integers"),
    ({"prompt": [True, 2]}, "positions.prompt is [true, 2]; give [start, end) as integers"),
    ({"prompt": [0, 1, 2]}, "positions.prompt is [0, 1, 2]; give [start, end)"),
    ({"prompt": []}, "positions.prompt is []; give [start, end)"),
    ({"prompt": [[0, 2], [4, "end"]]}, "positions.prompt[1] is [4, \"end\"]; give [start, end)"),
    ({"prompt": 3}, "positions.prompt is 3; give [start, end)"),
    ({"generated": [-2, None]}, "positions.generated is [-2, null]; generated positions count from the first"),
    ({"prompt": [-3, 0]}, "positions.prompt is [-3, 0]; a range with a negative start needs a negative or null end, "
                          "e.g. [-3, null] for the last 3 token(s)"),
    ({"middle": [0, 1]},
     "positions is {\"middle\": [0, 1]}; use one of prompt, generated, all, or [start, end) ranges"),
    ({}, "positions is {}; use one of prompt"),
    ([0, 5], "positions is [0, 5]; use one of prompt, generated, all, or [start, end) ranges like {\"prompt\""),
])
def test_bad_steering_ranges_are_named(positions, fragment):
    with pytest.raises(RecordError) as info:
        parse({"prompt": "a", "steering": {"vector": "v.pt", "layers": 1, "positions": positions}})
    assert fragment in str(info.value)


@pytest.mark.parametrize("flag", ["normalize", "norm_match"])
def test_norm_flags_must_be_booleans(flag):
    with pytest.raises(RecordError, match=f"field 'steering'\\[1\\].{flag} is \"yes\"; use true or false"):
        parse_steering([{"vector": "v.pt", "layers": 1}, {"vector": "v.pt", "layers": 1, flag: "yes"}])


def test_named_specs_take_ranges_and_norm_flags(tmp_path):
    from engine.pipeline.request import load_named_specs

    path = tmp_path / "specs.toml"
    path.write_text('[last]\nvector = "a.npy"\nlayers = [3]\npositions = {prompt = [-1]}\nnorm_match = true\n\n'
                    '[mix]\nterms = [{vector = "a.npy", layers = 2, positions = {generated = [[0, 5], [9]]}}, '
                    '{vector = "b.npy", layers = 2, normalize = true}]\n')
    named = load_named_specs(str(path))
    assert named["last"].to_record() == {"vector": "a.npy", "layers": [3], "coef": 1.0,
                                         "positions": {"prompt": [[-1, None]]}, "norm_match": True}
    mix = named["mix"].terms
    assert mix[0].positions == Ranges(generated=((0, 5), (9, None))) and mix[1].normalize and not mix[0].normalize
    path.write_text('[bad]\nvector = "a.npy"\nlayers = [3]\npositions = {generated = [-1]}\n')
    with pytest.raises(ValueError, match=r"\[bad\].positions.generated is \[-1\]; generated positions count"):
        load_named_specs(str(path))


def test_an_adapter_name_resolves_to_its_index_and_a_name_not_loaded_is_an_error():
    adapters = {"poet": 1, "lawyer": 2}
    r = parse_record({"prompt": "hi", "adapter": "lawyer"}, 0, 3, DEFAULTS, None, adapters=adapters)
    assert (r.adapter, r.adapter_index, r.to_wire().core.adapter) == ("lawyer", 2, 2)
    assert "adapter" not in r.extra
    for obj in ({"prompt": "hi"}, {"prompt": "hi", "adapter": None}):
        r = parse_record(obj, 0, 3, DEFAULTS, None, adapters=adapters)
        assert (r.adapter, r.to_wire().core.adapter) == (None, 0)
    with pytest.raises(RecordError, match=r"field 'adapter' names 'poem', which is not a loaded adapter \(loaded: "
                                          r"lawyer, poet\)"):
        parse_record({"prompt": "hi", "adapter": "poem"}, 0, 3, DEFAULTS, None, adapters=adapters)
    with pytest.raises(RecordError, match=r"\(loaded: none: start the engine with --adapter NAME=DIR\)"):
        parse({"prompt": "hi", "adapter": "poet"})
    with pytest.raises(RecordError, match=r"field 'adapter' is \[\"poet\"\]; give the name of a loaded adapter"):
        parse_record({"prompt": "hi", "adapter": ["poet"]}, 0, 3, DEFAULTS, None, adapters=adapters)
