"""Typed specs (engine.specs): frozen and hashable, stated back in records exactly as they were, and rebuilt from
that record form where they cross a process."""

from __future__ import annotations

import dataclasses
import json

import msgpack
import pytest

from engine.config import CaptureDefaults, SamplingDefaults, SteeringDefaults
from engine.messages import Feed, decode, encode
from engine.pipeline.request import parse_record
from engine.specs import (CaptureSpec, Ranges, SteeringSpec, SteeringTerm, load_named_specs, parse_capture,
                          parse_steering)

ONE = {"vector": "v.npy", "layer": 3, "coef": 2}
LIST = [{"vector": "a.npy", "layers": [4, 2, 4], "positions": {"generated": [[0, 5], [10]], "prompt": [-1]},
         "normalize": True},
        {"vector": "b.npy", "layers": 1, "coef": -0.5, "positions": "generated", "norm_match": True,
         "normalize": False}]


def test_to_record_states_the_spec_as_records_always_have():
    assert parse_steering(ONE).to_record() == {"vector": "v.npy", "layers": [3], "coef": 2.0, "positions": "all"}
    assert parse_steering(LIST).to_record() == [
        {"vector": "a.npy", "layers": [2, 4], "coef": 1.0,
         "positions": {"prompt": [[-1, None]], "generated": [[0, 5], [10, None]]}, "normalize": True},
        {"vector": "b.npy", "layers": [1], "coef": -0.5, "positions": "generated", "norm_match": True},
    ]
    assert parse_steering([ONE]).to_record() == [{"vector": "v.npy", "layers": [3], "coef": 2.0, "positions": "all"}]
    assert parse_capture({"layers": [8, 4, 8]}, None).to_record() == {"layers": [4, 8], "positions": "last_prompt"}


def test_to_record_keeps_the_key_order_and_types_of_the_written_records():
    # the bytes of an output record, a manifest or a sweep's plan hash depend on them
    text = json.dumps(parse_steering(LIST[0]).to_record())
    assert text == ('{"vector": "a.npy", "layers": [2, 4], "coef": 1.0, "positions": {"prompt": [[-1, null]], '
                    '"generated": [[0, 5], [10, null]]}, "normalize": true}')
    both = parse_steering({"vector": "v", "layers": 0, "norm_match": True, "normalize": True}).to_record()
    assert list(both) == ["vector", "layers", "coef", "positions", "normalize", "norm_match"]
    assert type(both["coef"]) is float and type(both["layers"]) is list


def test_parsed_specs_are_typed():
    assert parse_steering(ONE) == SteeringSpec((SteeringTerm("v.npy", (3,), 2.0, "all"),), False)
    first = parse_steering(LIST).terms[0]
    assert first.positions == Ranges(prompt=((-1, None),), generated=((0, 5), (10, None)))
    assert first.layers == (2, 4) and first.normalize and not first.norm_match
    assert parse_capture({"positions": "generated"}, CaptureSpec((1, 2), "mean_prompt")) == CaptureSpec((1, 2),
                                                                                                          "generated")
    assert parse_capture(False, CaptureSpec((1,), "last_prompt")) is None and parse_steering(None) is None


@pytest.mark.parametrize("value", [ONE, [ONE], LIST, LIST[0], LIST[1],
                                   {"vector": "v", "layers": [0], "positions": {"prompt": [[0, 2], [-3, -1]]}}])
def test_steering_round_trips_through_its_record_form_and_msgpack(value):
    spec = parse_steering(value)
    assert SteeringSpec.from_record(spec.to_record()) == spec
    wire = msgpack.unpackb(msgpack.packb(spec.to_record(), use_bin_type=True), raw=False)
    assert SteeringSpec.from_record(wire) == spec and SteeringSpec.from_record(wire).to_record() == spec.to_record()


@pytest.mark.parametrize("value", [{"layers": [3]}, {"layers": [0, 2], "positions": "generated"}])
def test_capture_round_trips_through_its_record_form(value):
    spec = parse_capture(value, None)
    wire = msgpack.unpackb(msgpack.packb(spec.to_record(), use_bin_type=True), raw=False)
    assert CaptureSpec.from_record(spec.to_record()) == spec == CaptureSpec.from_record(wire)


def test_equal_specs_hash_equal_and_key_a_dict():
    same = [parse_steering(ONE), parse_steering({"vector": "v.npy", "layers": [3, 3], "coef": 2.0}),
            SteeringSpec.from_record({"vector": "v.npy", "layers": [3], "coef": 2.0, "positions": "all"})]
    assert len({hash(s) for s in same}) == 1 and len(set(same)) == 1
    cache = {same[0]: "plan"}
    assert cache[same[2]] == "plan" and parse_steering([ONE]) not in cache  # a list is stated back as a list
    assert parse_steering([ONE]).terms == same[0].terms  # but steers the same
    assert parse_steering({**ONE, "coef": 3}) not in cache and parse_steering({**ONE, "normalize": True}) not in cache
    ranged = {"vector": "v", "layers": 1, "positions": {"prompt": [0, 2]}}
    assert hash(parse_steering(ranged)) == hash(parse_steering({**ranged, "positions": {"prompt": [[0, 2]]}}))
    assert {CaptureSpec((1,), "generated"): 1}[parse_capture({"layers": 1, "positions": "generated"}, None)] == 1


def test_specs_are_frozen():
    spec, capture = parse_steering(LIST), CaptureSpec((1,), "last_prompt")
    for obj, name, value in ((spec, "is_list", False), (spec.terms[0], "coef", 9.0),
                             (spec.terms[0].positions, "prompt", ()), (capture, "layers", (2,))):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, value)


def test_a_steering_spec_of_one_object_holds_one_term():
    term = SteeringTerm("v.npy", (1,), 1.0, "all")
    with pytest.raises(ValueError, match="one term, or one or more with is_list=True; got 2 term"):
        SteeringSpec((term, term), False)
    with pytest.raises(ValueError, match="got 0 term"):
        SteeringSpec((), True)


def test_named_specs_are_typed(tmp_path):
    path = tmp_path / "specs.toml"
    path.write_text('[one]\nvector = "a.npy"\nlayers = [3]\n\n[mix]\nterms = [{vector = "a.npy", layers = 2}]\n')
    named = load_named_specs(str(path))
    assert named == {"one": SteeringSpec((SteeringTerm("a.npy", (3,), 1.0, "all"),), False),
                     "mix": SteeringSpec((SteeringTerm("a.npy", (2,), 1.0, "all"),), True)}


def test_run_defaults_become_typed_record_defaults(tmp_path):
    vector = tmp_path / "v.npy"
    vector.write_bytes(b"")
    steering = SteeringDefaults(vector=str(vector), layers=[6, 4], coef=2, positions={"generated": [0, 20]})
    assert steering.positions == {"generated": [[0, 20]]}  # the record form: what manifests state
    assert steering.spec() == SteeringSpec((SteeringTerm(str(vector), (4, 6), 2.0, Ranges(generated=((0, 20),))),),
                                           False)
    assert SteeringDefaults().spec() is None and CaptureDefaults().spec() is None
    ablate = SteeringDefaults(vector=str(vector), layers="all", op="ablate").spec().terms[0]  # --steer-op ablate
    assert (ablate.op, ablate.is_all_layers, ablate.coef) == ("ablate", True, 1.0)
    capture = CaptureDefaults(layers=[2, 1, 2], positions="generated").spec()
    assert capture == CaptureSpec((1, 2), "generated")
    request = parse_record({"prompt": "a"}, 0, 1, SamplingDefaults(), steering.spec(), None, capture)
    assert (request.steering, request.capture) == (steering.spec(), capture)


def test_requests_send_their_specs_in_record_form_and_the_core_gets_them_typed():
    spec = parse_steering(LIST)
    request = parse_record({"prompt": "a", "steering": LIST, "capture": {"layers": [1]}}, 0, 1, SamplingDefaults(),
                           None)
    core = request.to_wire().core
    steering, capture = core.wire()[8:10]  # after the eight sampling fields
    assert steering == spec.to_record() and capture == {"layers": [1], "positions": "last_prompt"}
    request.check_wire()  # msgpack carries it
    [received] = decode(encode(Feed([request.to_wire()]))).requests
    assert received.core == core and received.core.steering == spec
    unsteered = parse_record({"prompt": "a"}, 0, 1, SamplingDefaults(), None).to_wire().core
    assert unsteered.wire()[8:10] == [None, None]


def test_a_term_without_layers_takes_its_files_and_crosses_the_wire_as_given():
    spec = parse_steering({"vector": "v.gguf", "coef": 4})
    [term] = spec.terms
    assert term == SteeringTerm("v.gguf", (), 4.0, "all") and term.is_file_layers and spec.is_file_layers
    assert spec.to_record() == {"vector": "v.gguf", "coef": 4.0, "positions": "all"}  # no layers: as it was given
    wire = msgpack.unpackb(msgpack.packb(spec.to_record(), use_bin_type=True), raw=False)
    assert SteeringSpec.from_record(wire) == spec
    given = parse_steering({"vector": "v.gguf", "coef": 4, "layers": [3, 1]})
    assert not given.is_file_layers and len({spec, given}) == 2  # hashable, and not the same spec as given layers
    assert spec.with_layers([[3, 1]]) == given  # what the result record states, once the core read the file
    mixed = parse_steering([{"vector": "a.npy", "layers": 2}, {"vector": "b.safetensors", "coef": -1}])
    assert [t.layers for t in mixed.terms] == [(2,), ()] and mixed.is_file_layers
    assert mixed.with_layers([[2], [0, 5]]).to_record()[1]["layers"] == [0, 5]


def test_a_named_spec_and_the_run_default_may_leave_their_layers_to_the_file(tmp_path):
    from engine.vectors import save_vectors
    import torch

    path = tmp_path / "specs.toml"
    path.write_text('[file]\nvector = "v.gguf"\ncoef = 4\n\n[mix]\nterms = [{vector = "a.npy", layers = 2}, '
                    '{vector = "v.gguf"}]\n')
    named = load_named_specs(str(path))
    assert named["file"] == SteeringSpec((SteeringTerm("v.gguf", (), 4.0, "all"),), False)
    assert [t.layers for t in named["mix"].terms] == [(2,), ()]
    vector = str(tmp_path / "v.gguf")
    save_vectors(vector, {1: torch.ones(4), 3: torch.ones(4)})
    steering = SteeringDefaults(vector=vector, coef=2)  # --steer v.gguf without --steer-layer
    assert steering.as_record() == {"vector": vector, "coef": 2, "positions": "all"}
    assert steering.spec() == SteeringSpec((SteeringTerm(vector, (), 2.0, "all"),), False)


def test_a_result_states_the_layers_the_core_steered_for_a_term_that_left_them_out():
    from engine.messages import Result

    request = parse_record({"prompt": "a", "steering": [{"vector": "v.gguf", "coef": 4}, {"vector": "w.npy",
                                                                                           "layers": [0]}]},
                           0, 1, SamplingDefaults(), None)
    record = request.result_record(Result(0, "x", "length", 2, 1, steering_layers=[[1, 3], [0]]))
    assert record["steering"] == [{"vector": "v.gguf", "layers": [1, 3], "coef": 4.0, "positions": "all"},
                                  {"vector": "w.npy", "layers": [0], "coef": 1.0, "positions": "all"}]
    assert request.steering.terms[0].layers == ()  # the request itself keeps the spec as given


def test_steer_without_steer_layer_is_checked_before_start_up_from_the_file_alone(tmp_path):
    import numpy as np

    from engine.config import ConfigError

    one = tmp_path / "one.npy"
    np.save(one, np.ones(64, np.float32))
    with pytest.raises(ConfigError) as info:
        SteeringDefaults(vector=str(one))
    assert str(info.value) == (f"--steer {one}: one vector with no layer named; give the layers to steer with "
                               f"--steer-layer (e.g. --steer-layer 6 or 4,6,8)")
    assert SteeringDefaults(vector=str(one), layers=[2]).spec().terms[0].layers == (2,)  # layers given: as before
    broken = tmp_path / "v.safetensors"
    broken.write_bytes(b"\xff" * 16)
    with pytest.raises(ConfigError, match=rf"^--steer {broken}: cannot read it as a .safetensors file"):
        SteeringDefaults(vector=str(broken))
