"""The one typed configuration of a run, validated once; each field also says whether it is a command-line flag and
with which facts (engine.apps.flags builds the flags and the sweep's [engine] keys from them)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import MISSING, dataclass, field
from pathlib import Path

from engine.storage.files import JsonUnreadable, parse_json
from engine.specs import (ALL_LAYERS, CAPTURE_POSITIONS, STEER_POSITIONS, CaptureSpec, RecordError,  # noqa: F401 - positions:
                          SteeringSpec, load_named_specs, not_a_file, parse_steering)  # re-exported for the flags

DTYPES = ("auto", "float32", "bfloat16", "float16")
TRUNCATE_MODES = ("none", "left", "right")
CAPTURE_DTYPES = ("float32", "bfloat16", "float16")


def default_cache_dir() -> str:
    """Where the engine keeps what persists across runs: ENGINE_CACHE_DIR, else ~/.cache/steer-engine."""
    return os.environ.get("ENGINE_CACHE_DIR") or str(Path.home() / ".cache" / "steer-engine")


class UserError(Exception):
    """An error whose message is whole for the user (the bad value and what to do): a stage that fails with one
    reports its message alone, never a traceback."""


class ConfigError(UserError, ValueError):
    """A setting a user gave is invalid; the message names it and the fix."""


DEVICES_HELP = "give all, GPU indices like 0,1, devices like cuda:0,cuda:1, or cpu,cpu"


def parse_devices(value) -> list[str]:
    """`--devices`: all | 0,1 | cuda:0,cuda:1 | cpu,cpu (or a list of those words) -> one device string per core."""
    words = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    words = [str(w).strip() for w in words]
    if words == ["all"]:
        return _all_gpus()
    devices = []
    for word in words:
        if word.isdigit():
            word = f"cuda:{word}"
        if word == "cuda":
            word = "cuda:0"
        if word != "cpu" and not (word.startswith("cuda:") and word[5:].isdigit()):
            raise ConfigError(f"--devices {value!r}: {word!r} is not a device; {DEVICES_HELP}")
        devices.append(word)
    _check_devices(value, devices)
    return devices


def _check_devices(value, devices: list[str]) -> None:
    gpus = [d for d in devices if d != "cpu"]
    if not devices:
        raise ConfigError(f"--devices {value!r} names no device; {DEVICES_HELP}")
    if gpus and len(gpus) != len(devices):
        raise ConfigError(f"--devices {value!r} mixes cpu and GPUs (dtypes and speeds would differ); give only one "
                          "kind")
    repeated = sorted({d for d in gpus if gpus.count(d) > 1})
    if repeated:
        raise ConfigError(f"--devices {value!r} names {', '.join(repeated)} twice; one engine core per GPU")
    if gpus:
        import torch

        count = torch.cuda.device_count()
        missing = [d for d in gpus if int(d[5:]) >= count]
        if missing:
            raise ConfigError(f"--devices {value!r}: {', '.join(missing)} is not a visible GPU (this machine shows "
                              f"{count}); use indices below {count}, or --devices all")


def _all_gpus() -> list[str]:
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError("--devices all: no CUDA GPU is visible here; run on a GPU machine, check "
                          "CUDA_VISIBLE_DEVICES, or give devices explicitly (e.g. --devices cpu,cpu)")
    return [f"cuda:{i}" for i in range(count)]


def knob(default=MISSING, *, factory=MISSING, flag: str | None = None, help: str | None = None,
         flag_default=MISSING, after: str | None = None, group: str | None = None, is_shared: bool = True,
         **argparse_kwargs):
    """A config field that is also a command-line flag. `flag` defaults to --<name with dashes>; `help`, `flag_default`
    (where the flag's default is not the field's) and `argparse_kwargs` (choices, metavar, type, action) go to
    add_argument as they are; without them the flag's type comes from the field's annotation (int, float; a bool is
    store_true) and its default is the field's. `after`: listed after that field's flag instead of in field order;
    `group`: listed in that group field's argument group; is_shared False: not in add_engine_args, each command adds
    it where it wants it (add_engine_flag)."""
    if help is not None:
        argparse_kwargs["help"] = help
    if flag_default is not MISSING:
        argparse_kwargs["default"] = flag_default
    metadata = {"kind": "flag", "flag": flag, "argparse": argparse_kwargs, "after": after, "group": group,
                "is_shared": is_shared}
    return field(default=default, default_factory=factory, metadata=metadata)


def no_flag(default=MISSING, *, factory=MISSING):
    """A config field with no flag: set by the Python API or by engine-bench, or fixed."""
    return field(default=default, default_factory=factory, metadata={"kind": "setting"})


def flag_group(factory, title: str):
    """A field holding a dataclass of knobs: their flags form the argument group `title`."""
    return field(default_factory=factory, metadata={"kind": "group", "title": title})


def parse_layer_flag(text: str) -> list[int]:
    """--steer-layer / --capture-layers: 6 or 4,6,8."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give layer indices like 6 or 4,6,8") from None


def parse_steer_layer_flag(text: str) -> list[int] | str:
    """--steer-layer: 6, 4,6,8, or all (every decoder layer)."""
    if text.strip() == ALL_LAYERS:
        return ALL_LAYERS
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give layer indices like 6 or 4,6,8") from None


def parse_steer_positions_flag(text: str) -> str | dict:
    """prompt | generated | all, or a JSON object of ranges (checked with the rest of the steering flags)."""
    if text in STEER_POSITIONS:
        return text
    try:
        value = parse_json(text)
    except JsonUnreadable:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: use one of {', '.join(STEER_POSITIONS)}, or a JSON object of "
                                         f"ranges like '{{\"prompt\": [-1, null], \"generated\": [0, 20]}}'")
    return value


class AdapterFlag(argparse.Action):
    """--adapter NAME=DIR, repeatable: each adds one adapter to a {name: directory} mapping."""

    def __call__(self, parser, namespace, values, option_string=None):
        name, is_pair, directory = values.partition("=")
        if not (is_pair and name and directory):
            raise argparse.ArgumentError(self, f"{values!r}: give NAME=DIR, e.g. --adapter poet=./adapters/poet")
        adapters = dict(getattr(namespace, self.dest) or {})
        if name in adapters:
            raise argparse.ArgumentError(self, f"{name!r} is given twice ({adapters[name]} and {directory}); give "
                                               f"each adapter its own name")
        adapters[name] = directory
        setattr(namespace, self.dest, adapters)


def device_settings(text: str) -> dict:
    """A device word for one engine: a single device (auto, cpu, cuda, cuda:N) as `device`, else (all, 0,1, ...)
    as `devices` (one engine core per device)."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and "," not in text):
        return {"device": text}
    return {"devices": text}


MAX_SEED = (1 << 63) - 1  # seeds, top_k and positions travel as int64
MAX_TOKENS = 1 << 31  # max_new_tokens above this cannot fit any model's context anyway


@dataclass(slots=True)
class SamplingDefaults:
    """Generation settings a record may override field by field."""

    max_new_tokens: int = knob(128)
    temperature: float = knob(0.0, help="0 = greedy")
    top_p: float = knob(1.0)
    top_k: int = knob(0)
    seed: int = knob(0, help="base seed; a record without 'seed' gets one derived from it and its id")
    stop: list[str] = knob(factory=list, action="append", help="stop string (repeatable)")
    ignore_eos: bool = knob(False, help="always generate max_new_tokens")

    def __post_init__(self) -> None:
        check_sampling(self.max_new_tokens, self.temperature, self.top_p, self.top_k, ConfigError)
        check_seed(self.seed, ConfigError)
        check_stop(self.stop, ConfigError)


def check_sampling(max_new_tokens, temperature, top_p, top_k, error, name: str = "{}") -> None:
    """The one set of range checks for run-level defaults (flags, sweep files) and per-record values; raises `error`,
    naming each field through `name` ("field '{}'" for records). NaN fails every comparison, so each check is
    written to fail for it."""
    if not 1 <= max_new_tokens <= MAX_TOKENS:
        raise error(f"{name.format('max_new_tokens')} is {max_new_tokens}; it must be an integer in [1, {MAX_TOKENS}]")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise error(f"{name.format('temperature')} is {temperature}; it must be a finite number >= 0 (0 means greedy)")
    if not 0 < top_p <= 1:
        raise error(f"{name.format('top_p')} is {top_p}; it must be in (0, 1]")
    if not 0 <= top_k <= MAX_SEED:
        raise error(f"{name.format('top_k')} is {top_k}; it must be an integer >= 0 (0 means no top-k filter), at most "
                    f"{MAX_SEED}")


def check_seed(seed, error, name: str = "{}") -> None:
    if not 0 <= seed <= MAX_SEED:
        raise error(f"{name.format('seed')} is {seed}; it must be an integer in [0, {MAX_SEED}]")


def check_stop(stop, error, name: str = "{}") -> None:
    """Stop strings: a list of non-empty strings (an empty one would end every completion at its first token)."""
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise error(f"{name.format('stop')} is {stop!r}; give non-empty strings (an empty string would end every "
                    f"completion at its first token)")


@dataclass(slots=True)
class SteeringDefaults:
    """The job-wide steering (`--steer ...`); a record's `steering` object replaces it."""

    vector: str | None = knob(None, flag="--steer", metavar="FILE",
                              help="vector file: .safetensors, .pt, .npy or a .gguf control vector")
    # empty: the layers the vector file names (layer.<L>, a control vector's direction.<L>, rows of a 2-D array)
    layers: list[int] | str = knob(factory=list, flag="--steer-layer", type=parse_steer_layer_flag,
                                   metavar="L[,L2..]|all",
                                   help="decoder layer(s) whose output is steered, or all (default: the layers the "
                                        "file names)")
    coef: float = knob(1.0, flag="--steer-coef", help="add: the multiple of the vector added; ablate: the fraction "
                                                      "of its direction removed")
    op: str = knob("add", flag="--steer-op", choices=("add", "ablate"),
                   help="add the vector, or ablate its direction at every residual write of those layers (clamps, "
                        "SAE features and gates: a record's steering, docs/steering.md)")
    # or ranges, as a record's term takes them: {"generated": [0, 20]}
    positions: str | dict = knob("all", flag="--steer-positions", type=parse_steer_positions_flag,
                                 metavar="prompt|generated|all|JSON",
                                 help=f"{'|'.join(STEER_POSITIONS)}, or ranges as in a record, e.g. "
                                      f"'{{\"generated\": [0, 20]}}'")

    def __post_init__(self) -> None:
        if self.vector is None:
            return
        problem = not_a_file(self.vector)
        if problem:
            raise ConfigError(f"--steer {self.vector}: {problem}")
        try:  # the record parser's checks, so a flag cannot pass what a record would be refused
            self.positions = self.spec().to_record()["positions"]
        except RecordError as exc:
            raise ConfigError(str(exc).replace("--steer.coef", "--steer-coef")
                              .replace("--steer.positions", "--steer-positions")
                              .replace("--steer.layers", "--steer-layer")) from None
        if not self.layers:
            self._check_file_layers()

    def _check_file_layers(self) -> None:
        """Without --steer-layer the file must name its layers; what can be known without the model is checked now
        (its header: safetensors, GGUF, .npy), the layers against the model in the engine core, as a record's."""
        from engine.vectors import named_layers  # numpy and the format's reader, no torch (but for a .pt)

        try:
            layers = named_layers(self.vector)
        except RecordError as exc:
            raise ConfigError(f"--steer {self.vector}: {str(exc).removeprefix(f'steering vector {self.vector}: ')}") \
                from None
        if layers is None:
            raise ConfigError(f"--steer {self.vector}: one vector with no layer named; give the layers to steer with "
                              f"--steer-layer (e.g. --steer-layer 6 or 4,6,8)")

    def as_record(self) -> dict | None:
        """The job-wide steering as a record's term; without `layers` when --steer-layer is not given (the file's)."""
        if self.vector is None:
            return None
        layers = self.layers if self.layers == ALL_LAYERS else list(self.layers)
        record = {"vector": self.vector, "layers": layers, "coef": self.coef, "positions": self.positions}
        if not self.layers:
            del record["layers"]
        return record if self.op == "add" else {"op": self.op, **record}

    def spec(self) -> SteeringSpec | None:
        """The job-wide steering as a record's default: one term, or None for unsteered."""
        return parse_steering(self.as_record(), "--steer")


@dataclass(slots=True)
class CaptureDefaults:
    """The job-wide activation capture (`--capture-layers ...`); a record's `capture` field overrides layers and
    positions. dtype and is_before_steering hold for the whole run."""

    layers: list[int] = knob(factory=list, flag="--capture-layers", type=parse_layer_flag, metavar="L[,L2..]",
                             help="decoder layer(s) whose output (the residual stream after the layer) is recorded")
    positions: str = knob("last_prompt", flag="--capture-positions", choices=CAPTURE_POSITIONS)
    dtype: str = knob("float32", flag="--capture-dtype", choices=CAPTURE_DTYPES)
    is_before_steering: bool = knob(False, flag="--capture-before-steering",
                                    help="record the layer's output before that layer's steering is added (default: "
                                         "after)")

    def __post_init__(self) -> None:
        if self.positions not in CAPTURE_POSITIONS:
            raise ConfigError(f"--capture-positions {self.positions!r}: use one of {', '.join(CAPTURE_POSITIONS)}")
        if self.dtype not in CAPTURE_DTYPES:
            raise ConfigError(f"--capture-dtype {self.dtype!r}: use one of {', '.join(CAPTURE_DTYPES)}")
        bad = [layer for layer in self.layers if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0]
        if bad:
            raise ConfigError(f"--capture-layers {bad}: give decoder layer indices >= 0, e.g. 4,8,12")

    def spec(self) -> CaptureSpec | None:
        """The job-wide capture as a record's default; None when no layers are captured."""
        if not self.layers:
            return None
        return CaptureSpec(tuple(sorted(set(self.layers))), self.positions)


COMPILE_MODES = ("auto", "on", "off")
# max_num_seqs when not given: on a GPU the decode step is memory-bound well past 256 rows (gemma-2b on an H200:
# 11.2k output tok/s at 64, 17.1k at 512 on 1,000 long prompts), so as many as memory allows up to 512; on a CPU
# a step's cost grows with its rows, and small batches keep the first results early.
DEFAULT_NUM_SEQS = {"gpu": 512, "cpu": 64}

# The counts a run may set, with what they may be: far beyond the upper ends no machine has the memory, and a
# typo there would fail deep in a process instead of here.
COUNT_RANGES = {"max_num_seqs": (1, 1 << 16), "tokenizer_workers": (1, 256), "decoder_workers": (1, 256),
                "ring_slots": (1, 4096), "max_prefill_tokens": (16, 1 << 24), "max_model_len": (2, 1 << 24),
                "slot_tokens": (1024, 1 << 26)}


@dataclass(slots=True)
class EngineConfig:
    """Everything the engine's processes need; built once by the CLI or the Python API."""

    model: str = knob("embedded", help="embedded | local HF dir | file.gguf | random:<preset>")
    tokenizer: str | None = knob(None, help="tokenizer.json (or its dir) to use instead of the model's")
    dtype: str = knob("auto", choices=DTYPES)
    device: str = knob("auto", help="auto | cpu | cuda | cuda:N")
    # sequences decoded together; None: DEFAULT_NUM_SEQS for the device, as memory allows
    max_num_seqs: int | None = knob(None, help="sequences decoded together (default: 512 on a GPU, as memory allows; "
                                               "64 on a CPU)")
    max_model_len: int | None = knob(None, help="prompt + new tokens limit (default: the model's, at most 4096)")
    # prompt tokens per prefill; None: as memory allows (kv_cache.plan_rows)
    max_prefill_tokens: int | None = knob(None, help="prompt tokens in one prefill (packed, no padding; default: "
                                                     "32768, less where the KV cache would otherwise get fewer than "
                                                     "--max-num-seqs slots)")
    gpu_memory_fraction: float = knob(0.9, after="max_model_len", help="share of the GPU the engine may fill")
    enforce_eager: bool = knob(False, help="no CUDA graphs and no torch.compile (debugging)")
    # torch.compile the decoder layers: auto (on a GPU, unless enforce_eager), on, off
    compile: str = knob("auto", choices=COMPILE_MODES, help="torch.compile the decoder layers: auto (on a GPU), on, "
                                                            "off; compiled artefacts persist in <cache dir>/compile")
    tokenizer_workers: int = knob(1)
    decoder_workers: int = knob(1)
    ring_slots: int = no_flag(8)
    slot_tokens: int = no_flag(1 << 16)
    truncate: str = knob("none", choices=TRUNCATE_MODES, help="cut prompts that are too long")
    sampling: SamplingDefaults = flag_group(SamplingDefaults, "generation defaults (a record's own fields win)")
    steering: SteeringDefaults = flag_group(SteeringDefaults, "steering (a record's 'steering' object replaces it)")
    # name -> PEFT LoRA directory; a record's "adapter": "name" runs with it (engine.adapters, engine.core.lora)
    adapters: dict[str, str] = knob(factory=dict, flag="--adapter", action=AdapterFlag, metavar="NAME=DIR",
                                    after="tokenizer", help="a PEFT LoRA adapter to load beside the model "
                                                            "(repeatable); records run with it when they say "
                                                            "\"adapter\": \"NAME\"")
    steering_specs: str | None = knob(None, group="steering", metavar="TOML",  # a TOML file of named specs
                                      help="named specs; records then say \"steering\": \"name\"")
    capture: CaptureDefaults = flag_group(CaptureDefaults, "activation capture (a record's 'capture' field overrides "
                                                           "layers and positions)")
    return_tokens: bool = knob(False, is_shared=False, help="add completion_token_ids to each record")
    cache_dir: str = no_flag("")
    # several: one engine core per device (data parallel)
    devices: list[str] = knob(factory=list, after="device", flag_default="", metavar="all|0,1,...",
                              help="one engine core per device, requests shared between them: all (every visible "
                                   "GPU), GPU indices like 0,1, devices like cuda:0,cuda:1, or cpu,cpu")
    # each core's loop timeline goes to <trace_dir>/core<N>.jsonl (engine.core.trace)
    trace_dir: str | None = no_flag(None)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.compile not in COMPILE_MODES:
            raise ConfigError(f"--compile {self.compile!r}: use one of {', '.join(COMPILE_MODES)}")
        if self.truncate not in TRUNCATE_MODES:
            raise ConfigError(f"--truncate {self.truncate!r}: use left or right")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.devices and self.device != "auto":
            raise ConfigError(f"--device {self.device} and --devices {self.devices}: give one of them")
        self.devices = parse_devices(self.devices) if self.devices else []
        for name, (low, high) in COUNT_RANGES.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ConfigError(f"--{name.replace('_', '-')} {value}: use a value in [{low}, {high:,}]")
        if not 0.05 <= self.gpu_memory_fraction <= 0.98:
            raise ConfigError(f"--gpu-memory-fraction {self.gpu_memory_fraction}: use a value in [0.05, 0.98]")
        if self.steering_specs is not None:
            try:
                load_named_specs(self.steering_specs)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.adapters:
            from engine.adapters import AdapterError, check_adapters  # reads JSON only: no torch

            try:
                check_adapters(self.adapters)
            except AdapterError as exc:
                raise ConfigError(str(exc)) from None
        if not self.cache_dir:
            self.cache_dir = default_cache_dir()

    def core_devices(self) -> list[str]:
        """Where the engine cores run: one per entry."""
        return list(self.devices) or [self.device]

    def for_core(self, device: str) -> "EngineConfig":
        """This config as one engine core on `device` sees it."""
        data = self.to_dict()
        data.update(device=device, devices=[])
        return EngineConfig.from_dict(data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EngineConfig":
        data = dict(data)
        data["sampling"] = SamplingDefaults(**data["sampling"])
        data["steering"] = SteeringDefaults(**data["steering"])
        data["capture"] = CaptureDefaults(**data.get("capture", {}))
        return cls(**data)
