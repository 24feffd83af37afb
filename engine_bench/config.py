"""engine-bench's settings: BenchConfig (validated once), the systems, BenchError."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import CAPTURE_POSITIONS, ConfigError, EngineConfig, SamplingDefaults, parse_devices
from engine_bench.workloads import WORKLOADS

SYSTEMS = ("naive", "hf", "engine")
NUM_WARMUP_PROMPTS = 2
MAX_WARMUP_TOKENS = 8
RESULTS_FILE = "benchmarks/RESULTS.md"
# BenchConfig's engine settings, each named as the EngineConfig field it sets (SAMPLING_SETTINGS: as SamplingDefaults'
# fields), handed on by name. They stay flat fields, with engine-bench's own defaults, because a report's "settings"
# is BenchConfig.to_dict(); device, devices and trace follow rules of their own (engine_config).
ENGINE_SETTINGS = ("model", "tokenizer", "dtype", "max_num_seqs", "max_model_len", "gpu_memory_fraction", "cache_dir")
SAMPLING_SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")


class BenchError(RuntimeError):
    """A benchmark could not run or produced wrong output; the message names the system and the cause."""


def csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@dataclass(slots=True)
class BenchConfig:
    """Everything one engine-bench invocation needs; validated once."""

    model: str = "random:gemma-2b"
    tokenizer: str | None = None
    device: str = "auto"  # with devices: where the baselines run (default the first of them)
    devices: list[str] = field(default_factory=list)  # several: the engine runs one core per device
    dtype: str = "auto"
    workloads: list[str] = field(default_factory=lambda: ["short"])
    input: str | None = None
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    num_prompts: int = 256
    naive_prompts: int = 8
    batch_sizes: list[int] = field(default_factory=lambda: [64, 128, 256])
    max_num_seqs: int = 256
    max_model_len: int | None = None  # the engine's; None: each workload's longest prompt + new tokens
    gpu_memory_fraction: float = 0.9  # the engine's share of the card (KV cache sized to fit it)
    max_new_tokens: int = 150  # for --input records without their own
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    sample_hz: float = 20.0
    out: str = "bench-out"
    append_results: str | None = None
    is_saving_outputs: bool = False
    is_quiet: bool = False
    cache_dir: str = ""
    steering_specs: list[int] = field(default_factory=list)  # one more engine row per count: that many distinct vectors
    steering_layers: list[int] = field(default_factory=lambda: [4, 8, 12])
    capture_layers: list[int] = field(default_factory=list)  # non-empty: one more engine row capturing these layers
    capture_positions: str = "last_prompt"
    trace: str | None = None  # a folder: the engine cores' loop timelines (engine.core.trace) and each run's window
    is_e2e: bool = False  # whole commands (engine-run and the user's script) instead of the steady-state rows
    engine_flags_given: list[str] = field(default_factory=list)  # engine settings the user set: --e2e passes only these

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or not self.systems:
            raise ConfigError(f"--systems {','.join(self.systems)}: use a comma list of {', '.join(SYSTEMS)}")
        if self.input is None:
            bad = [w for w in self.workloads if w not in WORKLOADS]
            if bad or not self.workloads:
                raise ConfigError(f"--workload {','.join(self.workloads)}: use a comma list of {', '.join(WORKLOADS)}"
                                  " or --input FILE.jsonl")
        for name in ("num_prompts", "naive_prompts", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"--batch-sizes {self.batch_sizes}: give batch sizes >= 1, like 64,128,256")
        if self.append_results is not None and not Path(self.append_results).is_file():
            raise ConfigError(f"--append-results {self.append_results}: no such file; run from the repository root "
                              f"or give the path of {RESULTS_FILE}")
        if isinstance(self.steering_specs, int):
            self.steering_specs = [self.steering_specs] if self.steering_specs else []
        if min(self.steering_specs, default=1) < 1 or not self.steering_layers or min(self.steering_layers) < 0:
            raise ConfigError(f"--steering-specs {self.steering_specs} / --steering-layers {self.steering_layers}: "
                              "give "
                              f"counts >= 1 (like 1,256) and layer indices >= 0")
        if min(self.capture_layers, default=0) < 0 or self.capture_positions not in CAPTURE_POSITIONS:
            raise ConfigError(f"--capture-layers {self.capture_layers} / --capture-positions {self.capture_positions}: "
                              f"give layer indices >= 0 and one of {', '.join(CAPTURE_POSITIONS)}")
        self.devices = parse_devices(self.devices) if self.devices else []
        if self.devices and self.device == "auto":
            self.device = self.devices[0]
        if self.is_e2e:
            self._check_e2e()
        if self.sample_hz < 10:
            raise ConfigError(f"--sample-hz {self.sample_hz}: sample at 10 Hz or more, or short idle gaps go unseen")
        self.cache_dir = self.engine_config().cache_dir  # EngineConfig checks device, dtype, sampling; fills cache_dir

    def _check_e2e(self) -> None:
        if not {"engine", "hf"} & set(self.systems):
            raise ConfigError(f"--e2e --systems {','.join(self.systems)}: whole commands are engine and hf (the naive "
                              "loop has no command of its own); name one of them")
        if self.capture_layers or self.trace:
            raise ConfigError("--e2e times whole commands, plain or steered; drop --capture-layers and --trace, or run "
                              "those without --e2e")
        if self.steering_specs and "engine" not in self.systems:
            raise ConfigError(f"--e2e --steering-specs runs engine-run steered, but --systems {','.join(self.systems)} "
                              "leaves engine-run out; add engine (the user's script has no steering)")

    def sampling(self) -> SamplingDefaults:
        """The SAMPLING_SETTINGS, every completion at its full length (the systems are compared token for token)."""
        return SamplingDefaults(**{name: getattr(self, name) for name in SAMPLING_SETTINGS}, ignore_eos=True)

    def engine_config(self) -> EngineConfig:
        """The engine the bench runs: the ENGINE_SETTINGS and sampling(), on `devices` (one core each) if given, else
        on `device`, returning token ids (to compare them), tracing into `trace` if given."""
        return EngineConfig(**{name: getattr(self, name) for name in ENGINE_SETTINGS},
                            device="auto" if self.devices else self.device, devices=self.devices,
                            sampling=self.sampling(), return_tokens=True, trace_dir=self.trace)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


