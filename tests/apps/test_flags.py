"""One definition of every engine knob: engine-run's engine flags come from EngineConfig's fields (one flag per flag
field, nothing missing), parse back into those fields, and the sweep's [engine] table takes the same fields."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from engine.apps.flags import add_engine_args, config_from_args, dest, engine_keys, flag_fields, flag_name, kind
from engine.apps.run import run_parser
from engine.apps.sweep.fields import SweepError
from engine.apps.sweep.spec import SET_ELSEWHERE, engine_settings
from engine.config import CaptureDefaults, EngineConfig, SamplingDefaults, SteeringDefaults

GROUPS = {"sampling": SamplingDefaults, "steering": SteeringDefaults, "capture": CaptureDefaults}


def every_flag_field() -> list[tuple[str | None, dataclasses.Field]]:
    """(group field or None, field) for every flag field of EngineConfig and of its groups."""
    return [(None, f) for f in flag_fields(EngineConfig)] + [
        (group, f) for group, cls in GROUPS.items() for f in flag_fields(cls)]


def test_every_config_field_says_whether_it_is_a_flag():
    for cls in (EngineConfig, *GROUPS.values()):
        for f in dataclasses.fields(cls):
            assert kind(f) in ("flag", "setting", "group"), (cls.__name__, f.name)
    groups = [f.name for f in dataclasses.fields(EngineConfig) if kind(f) == "group"]
    assert groups == list(GROUPS)
    settings = [f.name for f in dataclasses.fields(EngineConfig) if kind(f) == "setting"]
    assert settings == ["ring_slots", "slot_tokens", "cache_dir", "trace_dir"]


def test_engine_run_help_lists_every_flag_field_once():
    parser = run_parser()
    help_text = parser.format_help()
    options = [s for action in parser._actions for s in action.option_strings]
    for _, f in every_flag_field():
        assert options.count(flag_name(f)) == 1, flag_name(f)
        assert f" {flag_name(f)}" in help_text
    engine_only = argparse.ArgumentParser(add_help=False)
    add_engine_args(engine_only)
    generated = [s for action in engine_only._actions for s in action.option_strings]
    shared = [flag_name(f) for _, f in every_flag_field() if f.metadata["is_shared"]]
    assert sorted(generated) == sorted(shared)  # nothing else, nothing twice
    assert {"--steer", "--steer-layer", "--capture-before-steering", "--steering-specs", "--return-tokens"} <= set(
        options)
    for f in dataclasses.fields(EngineConfig):
        if kind(f) == "setting":
            assert f"--{f.name.replace('_', '-')}" not in options


@pytest.fixture
def steering_files(tmp_path):
    vector = tmp_path / "v.npy"
    np.save(vector, np.ones(64, dtype=np.float32))
    specs = tmp_path / "specs.toml"
    specs.write_text(f'[joy]\nvector = "{vector}"\nlayers = [1]\n')
    adapter = tmp_path / "adapter"  # what EngineConfig reads of an adapter (its weights: in the engine core)
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}')
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    return str(vector), str(specs), str(adapter)


def non_default_flags(vector: str, specs: str, adapter: str) -> dict[str, tuple[list[str], object]]:
    """Per field (group.name or name): the argv that sets it to a value other than its default, and that value."""
    return {
        "model": (["--model", "random:tiny"], "random:tiny"), "tokenizer": (["--tokenizer", "tok.json"], "tok.json"),
        "adapters": (["--adapter", f"a={adapter}", "--adapter", f"b={adapter}"], {"a": adapter, "b": adapter}),
        "dtype": (["--dtype", "float16"], "float16"), "device": (["--device", "cpu"], "cpu"),
        "max_num_seqs": (["--max-num-seqs", "7"], 7), "max_model_len": (["--max-model-len", "300"], 300),
        "max_prefill_tokens": (["--max-prefill-tokens", "512"], 512),
        "gpu_memory_fraction": (["--gpu-memory-fraction", "0.5"], 0.5),
        "enforce_eager": (["--enforce-eager"], True), "compile": (["--compile", "off"], "off"),
        "tokenizer_workers": (["--tokenizer-workers", "2"], 2), "decoder_workers": (["--decoder-workers", "3"], 3),
        "truncate": (["--truncate", "left"], "left"), "steering_specs": (["--steering-specs", specs], specs),
        "return_tokens": (["--return-tokens"], True),
        "devices": (["--devices", "cpu,cpu"], ["cpu", "cpu"]),  # with device auto: a run of its own
        "sampling.max_new_tokens": (["--max-new-tokens", "9"], 9),
        "sampling.temperature": (["--temperature", "0.5"], 0.5), "sampling.top_p": (["--top-p", "0.75"], 0.75),
        "sampling.top_k": (["--top-k", "5"], 5), "sampling.seed": (["--seed", "11"], 11),
        "sampling.stop": (["--stop", "a", "--stop", "bc"], ["a", "bc"]),
        "sampling.ignore_eos": (["--ignore-eos"], True),
        "steering.vector": (["--steer", vector], vector), "steering.layers": (["--steer-layer", "2,3"], [2, 3]),
        "steering.coef": (["--steer-coef", "2.5"], 2.5), "steering.op": (["--steer-op", "ablate"], "ablate"),
        "steering.positions": (["--steer-positions", "prompt"], "prompt"),
        "capture.layers": (["--capture-layers", "1,2"], [1, 2]),
        "capture.positions": (["--capture-positions", "generated"], "generated"),
        "capture.dtype": (["--capture-dtype", "bfloat16"], "bfloat16"),
        "capture.is_before_steering": (["--capture-before-steering"], True),
    }


def _get(config: EngineConfig, key: str):
    group, _, name = key.rpartition(".")
    return getattr(getattr(config, group) if group else config, name)


def test_flags_with_non_default_values_round_trip_into_the_config(steering_files):
    table = non_default_flags(*steering_files)
    assert set(table) == {f"{group}.{f.name}" if group else f.name for group, f in every_flag_field()}
    default = EngineConfig()
    for key, (_, value) in table.items():
        assert _get(default, key) != value, key
    alone = ("devices",)  # --devices and --device exclude each other
    argv = [arg for key, (args, _) in table.items() if key not in alone for arg in args]
    config = config_from_args(run_parser().parse_args(["--input", "in.jsonl", *argv]))
    for key, (_, value) in table.items():
        assert _get(config, key) == (_get(default, key) if key in alone else value), key
    assert config.ring_slots == default.ring_slots and config.trace_dir is None  # settings with no flag: defaults
    config = config_from_args(run_parser().parse_args(["--input", "in.jsonl", *table["devices"][0]]))
    assert config.devices == ["cpu", "cpu"] and config.device == "auto"


def test_a_parser_without_a_commands_own_flag_keeps_its_default():
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--max-num-seqs", "3"])
    assert not hasattr(args, "return_tokens")
    config = config_from_args(args)
    assert config.max_num_seqs == 3 and config.return_tokens is False
    assert dest(dataclasses.fields(SteeringDefaults)[1]) == "steer_layer"


# A valid value other than the default for each [engine] key (devices is checked on its own).
ENGINE_VALUES = {"dtype": "float32", "device": "cpu", "max_num_seqs": 4, "max_model_len": 256, "max_prefill_tokens": 64,
                 "gpu_memory_fraction": 0.5, "enforce_eager": True, "compile": "off", "tokenizer_workers": 2,
                 "decoder_workers": 2, "truncate": "left", "return_tokens": True, "devices": ["cpu", "cuda:0"]}


def test_the_sweep_engine_table_takes_every_engine_field():
    keys = engine_keys(exclude=SET_ELSEWHERE)
    assert list(keys) == [f.name for f in flag_fields(EngineConfig) if f.name not in SET_ELSEWHERE]
    assert set(ENGINE_VALUES) == set(keys)
    assert engine_settings(ENGINE_VALUES) == ENGINE_VALUES
    for key, value in ENGINE_VALUES.items():
        assert engine_settings({key: value}) == {key: value}


@pytest.mark.parametrize("key", ["max_num_seq", "model", "tokenizer", "steering_specs", "ring_slots", "sampling"])
def test_the_sweep_engine_table_refuses_other_keys_naming_them(key):
    with pytest.raises(SweepError) as info:
        engine_settings({key: 1, "device": "cpu"})
    message = str(info.value)
    assert message.startswith(f"unknown key(s) ['{key}'] in [engine]; known: dtype, device, max_num_seqs,"), message
    assert "compile" in message and "devices" in message
