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
# The engine settings a report's flat "settings" (BenchConfig.to_dict) names, as the EngineConfig fields
# (SAMPLING_SETTINGS: the SamplingDefaults fields) they are; devices and trace (trace_dir) are the engine's too.
ENGINE_SETTINGS = ("model", "tokenizer", "dtype", "max_num_seqs", "max_model_len", "gpu_memory_fraction", "cache_dir")
SAMPLING_SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")


def bench_engine(device: str = "auto", devices: list[str] | None = None, trace: str | None = None,
                 **settings) -> EngineConfig:
    """The engine engine-bench runs, from flat settings (ENGINE_SETTINGS, SAMPLING_SETTINGS): engine-bench's
    defaults (random:gemma-2b, 256 sequences), every completion at its full length and token ids returned (the
    systems are compared token for token); on `devices` (one core each) if given, else on `device`."""
    unknown = set(settings) - set(ENGINE_SETTINGS) - set(SAMPLING_SETTINGS)
    if unknown:
        raise TypeError(f"bench_engine() got unknown settings: {', '.join(sorted(unknown))}")
    engine = {"model": "random:gemma-2b", "max_num_seqs": 256, "gpu_memory_fraction": 0.9,
              **{k: v for k, v in settings.items() if k in ENGINE_SETTINGS}}
    sampling = {"max_new_tokens": 150, "temperature": 0.0,
                **{k: v for k, v in settings.items() if k in SAMPLING_SETTINGS}}
    devices = parse_devices(devices) if devices else []
    return EngineConfig(**engine, device="auto" if devices else device, devices=devices,
                        sampling=SamplingDefaults(**sampling, ignore_eos=True), return_tokens=True, trace_dir=trace)


class BenchError(RuntimeError):
    """A benchmark could not run or produced wrong output; the message names the system and the cause."""


def csv_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@dataclass(slots=True)
class BenchConfig:
    """Everything one engine-bench invocation needs; validated once."""

    engine: EngineConfig = field(default_factory=bench_engine)  # the engine under test (bench_engine)
    device: str = "auto"  # where the baselines run: the engine's device, or the first of its devices
    workloads: list[str] = field(default_factory=lambda: ["short"])
    input: str | None = None
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    num_prompts: int = 256
    naive_prompts: int = 8
    batch_sizes: list[int] = field(default_factory=lambda: [64, 128, 256])
    sample_hz: float = 20.0
    out: str = "bench-out"
    append_results: str | None = None
    is_saving_outputs: bool = False
    is_quiet: bool = False
    steering_specs: list[int] = field(default_factory=list)  # one more engine row per count: that many distinct vectors
    steering_layers: list[int] = field(default_factory=lambda: [4, 8, 12])
    capture_layers: list[int] = field(default_factory=list)  # non-empty: one more engine row capturing these layers
    capture_positions: str = "last_prompt"
    interventions: list[str] = field(default_factory=list)  # one more engine row per op (engine_bench.interventions)
    also_models: list[str] = field(default_factory=list)  # one more engine row per model, same run and tokenizer
    engine_label: str = "engine"  # the engine rows' system name (an also_models row names its model)
    is_e2e: bool = False  # whole commands (engine-run and the user's script) instead of the steady-state rows
    is_keep_alive: bool = False  # --e2e: engine-run --keep-alive too, starting its resident engine, then with it loaded
    engine_flags_given: list[str] = field(default_factory=list)  # engine settings the user set: --e2e passes only these
    lora_rank: int = 0  # > 0: a second engine with a random LoRA of this rank, its 0% and 50% rows (engine_bench.lora)
    is_serve: bool = False  # engine-serve under load beside engine-run (engine_bench/serve.py)
    serve_clients: int = 64
    serve_seconds: float = 60.0
    serve_warmup_s: float = 10.0

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or not self.systems:
            raise ConfigError(f"--systems {','.join(self.systems)}: use a comma list of {', '.join(SYSTEMS)}")
        if self.input is None:
            bad = [w for w in self.workloads if w not in WORKLOADS]
            if bad or not self.workloads:
                raise ConfigError(f"--workload {','.join(self.workloads)}: use a comma list of {', '.join(WORKLOADS)}"
                                  " or --input FILE.jsonl")
        for name in ("num_prompts", "naive_prompts"):
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
        from engine_bench.interventions import INTERVENTIONS

        unknown = [name for name in self.interventions if name not in INTERVENTIONS]
        if unknown:
            raise ConfigError(f"--interventions {','.join(self.interventions)}: use a comma list of "
                              f"{', '.join(INTERVENTIONS)}")
        if self.device == "auto":
            self.device = self.engine.devices[0] if self.engine.devices else self.engine.device
        if self.is_e2e:
            self._check_e2e()
        if self.lora_rank < 0 or (self.lora_rank and "engine" not in self.systems):
            raise ConfigError(f"--lora-rank {self.lora_rank}: give a rank >= 1 (0: no adapter rows) with the engine "
                              "among --systems")
        if self.is_serve and (self.is_e2e or self.serve_clients < 1 or self.serve_seconds <= 0
                              or self.serve_warmup_s < 0):
            raise ConfigError("--serve: give --serve-clients >= 1, --serve-seconds > 0 and --serve-warmup >= 0, "
                              "without --e2e")
        if self.sample_hz < 10:
            raise ConfigError(f"--sample-hz {self.sample_hz}: sample at 10 Hz or more, or short idle gaps go unseen")

    def _check_e2e(self) -> None:
        if not {"engine", "hf"} & set(self.systems):
            raise ConfigError(f"--e2e --systems {','.join(self.systems)}: whole commands are engine and hf (the naive "
                              "loop has no command of its own); name one of them")
        if self.capture_layers or self.engine.trace_dir or self.also_models or self.interventions:
            raise ConfigError("--e2e times whole commands, plain or steered; drop --capture-layers, --also-model, "
                              "--interventions and --trace, or run those without --e2e")
        if self.is_keep_alive and "engine" not in self.systems:
            raise ConfigError(f"--e2e --keep-alive runs engine-run with a resident engine, but --systems "
                              f"{','.join(self.systems)} leaves engine-run out; add engine")
        if self.steering_specs and "engine" not in self.systems:
            raise ConfigError(f"--e2e --steering-specs runs engine-run steered, but --systems {','.join(self.systems)} "
                              "leaves engine-run out; add engine (the user's script has no steering)")

    def on_device(self, device: str) -> BenchConfig:
        """The same config with `device` (resolved) for the baselines, and for the engine unless it has devices."""
        engine = self.engine if self.engine.devices else dataclasses.replace(self.engine, device=device)
        return dataclasses.replace(self, device=device, engine=engine)

    @property
    def is_greedy(self) -> bool:
        return self.engine.sampling.temperature == 0

    def to_dict(self) -> dict:
        """The flat settings a report keeps (and a child process gets): BenchConfig's own fields and the
        ENGINE_SETTINGS / SAMPLING_SETTINGS, devices and trace of its engine; from_dict rebuilds the config."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "engine"}
        engine, sampling = self.engine, self.engine.sampling
        return {**{name: getattr(engine, name) for name in ENGINE_SETTINGS}, "devices": list(engine.devices),
                **{name: getattr(sampling, name) for name in SAMPLING_SETTINGS}, "trace": engine.trace_dir,
                **own}

    @classmethod
    def from_dict(cls, settings: dict) -> BenchConfig:
        """A config from flat settings (to_dict's form): the engine's names go to bench_engine, the rest are own."""
        names = set(ENGINE_SETTINGS) | set(SAMPLING_SETTINGS) | {"devices", "trace"}
        engine = bench_engine(devices=settings.get("devices"), trace=settings.get("trace"),
                              device=settings.get("device", "auto"),
                              **{k: v for k, v in settings.items() if k in names - {"devices", "trace"}})
        return cls(engine=engine, **{k: v for k, v in settings.items() if k not in names})


