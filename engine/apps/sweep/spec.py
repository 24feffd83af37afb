"""The sweep file (TOML or JSON): its dataclasses and load_sweep, which names the bad field on any error.

A sweep file names models, prompt files, vectors, the grid, samples and generation settings.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.storage.files import parse_json
from engine.apps.sweep.engine_table import (ENGINE_DEFAULTS, ENGINE_KEYS, ENGINE_MEANING,  # noqa: F401 - re-exported
                                            SET_ELSEWHERE, engine_settings)
from engine.config import CaptureDefaults, ConfigError, EngineConfig, SamplingDefaults, device_settings
from engine.pipeline.request import RecordError, parse_steering
from engine.apps.sweep.fields import (SweepError, bool_field, check_keys, entries, int_field, list_field, name_field,
                                      need, number_field, preview, section, str_field)
from engine.apps.sweep.grid import BASE_ADAPTER, SWEPT_OPS, Grid, grid_points
from engine.adapters import AdapterError, read_adapter

GENERATION_KEYS = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int, "stop": list,
                   "ignore_eos": bool}
CAPTURE_KEYS = {"layers": list, "positions": str, "dtype": str, "is_before_steering": bool}
GRID_KEYS = ("vectors", "layers", "coefs", "positions", "normalize", "norm_match", "ops", "ablate_coefs",
             "clamp_values", "saes", "features", "feature_values", "feature_coefs", "adapters", "baseline")
TOP_KEYS = ("output", "seed", "samples", "paired_seeds", "min_free_gb", "models", "prompts", "vectors", "saes",
            "adapters", "grid", "generation", "capture", "engine", "metrics")
METRIC_KINDS = ("regex", "keywords", "function", "projection", "logprob")
# The report's columns before the metrics' (a metric may not take one of these names).
SUMMARY_COLUMNS = ("model", "point", "adapter", "op", "vector", "sae", "feature", "layers", "coef", "value",
                   "positions", "normalize", "norm_match", "num_records", "num_errors", "mean_completion_tokens",
                   "median_completion_tokens")


MAX_SAMPLES = 1_000_000  # samples per prompt and grid point; a plan holds every request id


@dataclass(slots=True, frozen=True)
class ModelEntry:
    """One model of the sweep: what engine-run's --model takes, and the label its records carry."""

    label: str
    model: str
    tokenizer: str | None = None


@dataclass(slots=True, frozen=True)
class PromptSet:
    """A JSONL prompt file; its name (the file stem unless given) goes into request ids."""

    name: str
    path: str


@dataclass(slots=True)
class Metric:
    """A per-record score the report averages per grid point: a regex or keyword hit (0/1), a custom
    `module:function(record) -> number`, the projection of captured activations onto a named vector, or the mean
    log-probability of the completion's tokens under the record's model without steering."""

    name: str
    kind: str
    value: str | list[str]  # the regex, the keywords, "module:function", the vector name, or "unsteered" (logprob)
    ignore_case: bool = True
    layer: int | None = None  # projection: which captured layer (default: each captured layer the vector has)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class SweepConfig:
    """A parsed sweep file, paths made absolute; built by `load_sweep`, which names the bad field on any error."""

    source: str
    output: str
    models: list[ModelEntry]
    prompts: list[PromptSet]
    vectors: dict[str, str]
    grid: Grid
    saes: dict[str, str] = field(default_factory=dict)  # name -> an SAE's file or folder
    adapters: dict[str, str] = field(default_factory=dict)  # name -> a PEFT LoRA directory (every model loads it)
    samples: int = 1
    seed: int = 0
    paired_seeds: bool = False
    min_free_gb: float = 1.0
    generation: SamplingDefaults = field(default_factory=SamplingDefaults)
    capture: CaptureDefaults = field(default_factory=CaptureDefaults)
    engine: dict = field(default_factory=dict)
    metrics: list[Metric] = field(default_factory=list)

    def __post_init__(self) -> None:
        labels = [m.label for m in self.models]
        for i, label in enumerate(labels):
            if labels.index(label) != i:
                raise SweepError(f"models[{i}].label {label!r} repeats models[{labels.index(label)}]; give each model "
                                 f"its own label")
        names = [p.name for p in self.prompts]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise SweepError(f"prompts[{i}]: set name {name!r} repeats prompts[{names.index(name)}]; give "
                                 f"{{path = ..., name = \"other\"}}")
        for i, name in enumerate(self.grid.vectors):
            if name not in self.vectors:
                known = ", ".join(self.vectors) or "none"
                raise SweepError(f"grid.vectors[{i}] {name!r} is not in [vectors] (known: {known})")
        for i, name in enumerate(self.grid.saes):
            if name not in self.saes:
                raise SweepError(f"grid.saes[{i}] {name!r} is not in [saes] (known: {', '.join(self.saes) or 'none'})")
        for i, name in enumerate(self.grid.adapters):
            if name != BASE_ADAPTER and name not in self.adapters:
                known = ", ".join(self.adapters) or "none"
                raise SweepError(f"grid.adapters[{i}] {name!r} is not in [adapters] (known: {known}; "
                                 f"\"{BASE_ADAPTER}\" is the model without one)")
        for i, metric in enumerate(self.metrics):
            if metric.kind == "projection" and metric.value not in self.vectors:
                raise SweepError(f"metrics[{i}].projection {metric.value!r} is not in [vectors]")
            if metric.kind == "projection" and not self.capture.layers:
                raise SweepError(f"metrics[{i}] projects captured activations; set [capture] layers = [...]")
        if len({m.name for m in self.metrics}) != len(self.metrics):
            raise SweepError("metrics: two metrics share a name; give each its own name")
        for i, metric in enumerate(self.metrics):
            if metric.name in SUMMARY_COLUMNS or metric.name.startswith("finish_"):
                raise SweepError(f"metrics[{i}].name {metric.name!r} is a column of the report; choose another name")

    def engine_config(self, model: ModelEntry, device: str) -> EngineConfig:
        """`device` is a lane of devices(): one device, or several ("0,1", "all") that run the model together."""
        settings = {k: v for k, v in self.engine.items() if k not in ("devices", "device")} | device_settings(device)
        if any(m.kind == "logprob" for m in self.metrics):  # the report scores the completion's own tokens
            settings["return_tokens"] = True
        adapters = {name: self.adapters[name] for name in self.grid.adapters if name != BASE_ADAPTER}
        return EngineConfig(model=model.model, tokenizer=model.tokenizer, sampling=self.sampling(),
                            capture=self.capture, adapters=adapters, **settings)

    def devices(self) -> list[str]:
        """Where models run, one model per entry at a time: `engine.devices` if given (an entry like "0,1" or "all"
        runs one model on those GPUs together); with several visible GPUs and device auto or cuda, one GPU per model
        when there are several models, else every GPU for the one model; else the one device."""
        if "devices" in self.engine:
            return list(self.engine["devices"])
        device = self.engine.get("device", "auto")
        if device in ("auto", "cuda"):
            import torch

            if torch.cuda.device_count() > 1:
                return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if len(self.models) > 1 else ["all"]
        return [device]

    def sampling(self) -> SamplingDefaults:
        return dataclasses.replace(self.generation, seed=self.seed)


def load_sweep(path: str | Path, output: str | None = None) -> SweepConfig:
    """Read and validate a sweep file (.toml or .json); SweepError names the file and the bad field."""
    path = Path(path)
    try:
        table = _read_table(path)
        return _build(table, path.resolve(), output)
    except SweepError as exc:
        raise SweepError(f"{path}: {exc}") from None


def _read_table(path: Path) -> dict:
    import tomllib

    if not path.is_file():
        raise SweepError("no such file")
    try:
        if path.suffix == ".json":
            table = parse_json(path.read_bytes(), constants=True)  # a NaN is named by its field's check
        else:
            with path.open("rb") as f:
                table = tomllib.load(f)
    except (OSError, ValueError) as exc:  # TOML errors and JsonUnreadable are ValueErrors
        raise SweepError(f"cannot read it ({exc})") from None
    if not isinstance(table, dict):
        raise SweepError("the file must hold a table (a JSON object)")
    return table


def _build(table: dict, path: Path, output: str | None) -> SweepConfig:
    check_keys(table, TOP_KEYS, "the top level")
    base = path.parent
    grid_table = need(table, "grid", dict, "grid")
    vectors = _vectors(table.get("vectors", {}), base)
    capture = section(table.get("capture", {}), CAPTURE_KEYS, "capture")
    if "layers" in capture:
        capture["layers"] = [int_field(x, f"capture.layers[{i}]", minimum=0) for i, x in enumerate(capture["layers"])]
    try:
        capture_defaults = CaptureDefaults(**capture)
    except ConfigError as exc:
        raise SweepError(f"capture: {exc}") from None
    config = SweepConfig(
        source=str(path),
        output=str(base / output_name(table, path)) if output is None else output,
        models=_models(need(table, "models", list, "models"), base),
        prompts=_prompts(need(table, "prompts", list, "prompts"), base),
        vectors=vectors,
        grid=_grid(grid_table),
        saes=_saes(table.get("saes", {}), base),
        adapters=_adapters(table.get("adapters", {}), base),
        samples=int_field(table.get("samples", 1), "samples", minimum=1, maximum=MAX_SAMPLES),
        seed=int_field(table.get("seed", 0), "seed", minimum=0),
        paired_seeds=bool_field(table.get("paired_seeds", False), "paired_seeds"),
        min_free_gb=number_field(table.get("min_free_gb", 1.0), "min_free_gb", minimum=0.0),
        generation=_generation(table.get("generation", {})),
        capture=capture_defaults,
        engine=engine_settings(table.get("engine", {})),
        metrics=[_metric(m, f"metrics[{i}]") for i, m in enumerate(list_field(table.get("metrics", []), "metrics"))],
    )
    try:
        config.sampling()
    except ConfigError as exc:
        raise SweepError(str(exc)) from None  # it names the seed
    if not config.grid.layers:
        config.grid.file_layers = _file_layers(config)
    _check_points(config)
    return config


def _file_layers(config: SweepConfig) -> dict[str, list[int]]:
    """grid.layers left out: the layers each grid vector's file names, read from its header (checked against each
    model when it runs, as a record's); SweepError for a file of one vector with no layer named, or unreadable."""
    from engine.vectors import named_layers

    layers = {}
    for i, name in enumerate(config.grid.vectors):
        path = config.vectors[name]
        try:
            named = named_layers(path)
        except RecordError as exc:
            raise SweepError(f"grid.vectors[{i}] {name!r}: {exc}") from None
        if named is None:
            raise SweepError(f"grid.layers is missing, and vector {name!r} ({path}) is one vector with no layer "
                             f"named; give the layers to steer, e.g. layers = [6]")
        layers[name] = list(named)
    return layers


def _check_points(config: SweepConfig) -> None:
    """Every grid point's steering through parse_steering, the parser records use, so the sweep file cannot hold
    a term that its records would be refused for; SweepError names the point."""
    for point in grid_points(config.grid):
        try:
            parse_steering(point.steering(config.vectors, config.saes), f"grid point {point.key}")
        except RecordError as exc:
            raise SweepError(str(exc)) from None


def output_name(table: dict, path: Path) -> str:
    value = table.get("output", path.stem)
    if not isinstance(value, str) or not value:
        raise SweepError(f"output is {preview(value)}; give a directory (relative to the sweep file), e.g. "
                         "\"sweep-out\"")
    return value


def _models(items: list, base: Path) -> list[ModelEntry]:
    models = []
    for where, item in entries(items, "models", "model", ("model", "label", "tokenizer"),
                               "model string or a table {model = ..., label = ...}",
                               "name at least one model, e.g. models = [\"embedded\"]"):
        model = str_field(item.get("model"), f"{where}.model")
        tokenizer = item.get("tokenizer")
        models.append(ModelEntry(
            label=name_field(item.get("label", default_label(model)), f"{where}.label"),
            model=_model_path(model, base),
            tokenizer=None if tokenizer is None else str(base / str_field(tokenizer, f"{where}.tokenizer")),
        ))
    return models


def default_label(model: str) -> str:
    """embedded -> embedded, random:tiny -> random-tiny, a directory or file -> its name without suffix."""
    if model == "embedded" or model.startswith("random:"):
        return model.replace(":", "-")
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(model).stem or "model")


def _model_path(model: str, base: Path) -> str:
    """Local paths relative to the sweep file; `embedded` and `random:` presets as they are."""
    if model == "embedded" or model.startswith("random:") or Path(model).is_absolute():
        return model
    return str(base / model)


def _prompts(items: list, base: Path) -> list[PromptSet]:
    sets = []
    for where, item in entries(items, "prompts", "path", ("path", "name"), "path or a table {path = ..., name = ...}",
                               "name at least one JSONL prompt file"):
        path = base / str_field(item.get("path"), f"{where}.path")
        if not path.is_file():
            raise SweepError(f"{where}: {path}: no such file")
        sets.append(PromptSet(name_field(item.get("name", path.stem), f"{where}.name"), str(path)))
    return sets


def _vectors(table, base: Path) -> dict[str, str]:
    if not isinstance(table, dict):
        raise SweepError(f"vectors must be a table of name = \"file\", got {preview(table)}")
    vectors = {}
    for name, value in table.items():
        where = f"vectors.{name}"
        name_field(name, f"vectors: the name {name!r}")
        path = base / str_field(value, where)
        if not path.is_file():
            raise SweepError(f"{where}: {path}: no such file")
        vectors[name] = str(path)
    return vectors


def _saes(table, base: Path) -> dict[str, str]:
    """[saes]: name = an SAE's file or folder (read, and checked against each model, where it runs)."""
    if not isinstance(table, dict):
        raise SweepError(f"saes must be a table of name = \"path\" (an SAE's params.npz, or its folder), got "
                         f"{preview(table)}")
    saes = {}
    for name, value in table.items():
        name_field(name, f"saes: the name {name!r}")
        path = base / str_field(value, f"saes.{name}")
        if not path.exists():
            raise SweepError(f"saes.{name}: {path}: no such file or folder")
        saes[name] = str(path)
    return saes


def _adapters(table, base: Path) -> dict[str, str]:
    """[adapters]: name = a PEFT LoRA directory, its settings checked now (its fit to each model where it runs)."""
    if not isinstance(table, dict):
        raise SweepError(f"adapters must be a table of name = \"directory\" (PEFT LoRA adapters), got {preview(table)}")
    adapters = {}
    for name, value in table.items():
        directory = str(base / str_field(value, f"adapters.{name}"))
        try:
            read_adapter(name, directory)
        except AdapterError as exc:
            raise SweepError(f"adapters.{name}: {exc}") from None
        adapters[name] = directory
    return adapters


def _grid(table: dict) -> Grid:
    check_keys(table, GRID_KEYS, "[grid]")
    axes = {}
    for key in GRID_KEYS[:-1]:
        if key not in table:
            continue
        values = list_field(table[key], f"grid.{key}")
        if not values:
            raise SweepError(f"grid.{key} is empty; give at least one value or leave the key out")
        axes[key] = values
    vectors = [str_field(v, f"grid.vectors[{i}]") for i, v in enumerate(axes.get("vectors", []))]
    saes = [str_field(v, f"grid.saes[{i}]") for i, v in enumerate(axes.get("saes", []))]
    baseline = bool_field(table.get("baseline", False), "grid.baseline")
    if not vectors and not saes and not baseline:
        raise SweepError("grid.vectors is missing; name vectors from [vectors] (or SAEs from [saes] in grid.saes), or "
                         "set grid.baseline = true for an unsteered run")
    ops = [str_field(v, f"grid.ops[{i}]") for i, v in enumerate(axes.get("ops", ["add"]))]
    for i, op in enumerate(ops):
        if op not in SWEPT_OPS:
            raise SweepError(f"grid.ops[{i}] is {op!r}; use {', '.join(SWEPT_OPS)} (SAE features: grid.saes, "
                             "grid.features and grid.feature_values or grid.feature_coefs)")
    if vectors and "add" in ops and "coefs" not in axes:
        raise SweepError("grid.coefs is missing; give a list, e.g. coefs = [0, 4, 8]")
    if vectors and "clamp" in ops and "clamp_values" not in axes:
        raise SweepError("grid.ops has clamp but grid.clamp_values is missing; give the projections to set, e.g. "
                         "clamp_values = [0, 2]")
    if saes and ("features" not in axes or not {"feature_values", "feature_coefs"} & set(axes)):
        raise SweepError("grid.saes needs grid.features (feature indices) and grid.feature_values (activations to "
                         "set) or grid.feature_coefs (multiples of their decoder rows to add)")
    grid = Grid(vectors=vectors,
                layers=[_layer_set(v, f"grid.layers[{i}]") for i, v in enumerate(axes.get("layers", []))],
                coefs=[_coef(v, f"grid.coefs[{i}]") for i, v in enumerate(axes.get("coefs", []))], baseline=baseline,
                ops=list(dict.fromkeys(ops)), saes=saes)
    for key in ("ablate_coefs", "clamp_values", "feature_values", "feature_coefs"):
        if key in axes:
            setattr(grid, key, [_coef(v, f"grid.{key}[{i}]") for i, v in enumerate(axes[key])])
    if "features" in axes:
        grid.features = [int_field(v, f"grid.features[{i}]", minimum=0) for i, v in enumerate(axes["features"])]
    if "positions" in axes:
        grid.positions = [_positions(v, f"grid.positions[{i}]") for i, v in enumerate(axes["positions"])]
    for key in ("normalize", "norm_match"):
        if key in axes:
            setattr(grid, key, [bool_field(v, f"grid.{key}[{i}]") for i, v in enumerate(axes[key])])
    if "adapters" in axes:
        grid.adapters = [str_field(v, f"grid.adapters[{i}]") for i, v in enumerate(axes["adapters"])]
    return grid


def _layer_set(value, where: str) -> list[int]:
    layers = value if isinstance(value, list) else [value]
    if not layers:
        raise SweepError(f"{where} is an empty list; give a layer index or a list of them (steered together)")
    return sorted({int_field(layer, where if not isinstance(value, list) else f"{where}[{j}]", minimum=0)
                   for j, layer in enumerate(layers)})


def _coef(value, where: str) -> float:
    """A grid coefficient, through parse_steering (the parser records use): what a record is refused for, the sweep
    file is too, with the grid field named."""
    coef = number_field(value, where)
    try:
        parse_steering({"vector": "-", "layers": [0], "coef": coef}, where)
    except RecordError as exc:
        detail, head = str(exc).replace(f"{where}.coef", where), f"{where} is {preview(value)}"
        raise SweepError(detail if detail.startswith(head) else f"{head}: {detail}") from None
    return coef


def _positions(value, where: str):
    try:
        return parse_steering({"vector": "-", "layers": [0], "positions": value}, where).to_record()["positions"]
    except RecordError as exc:
        raise SweepError(str(exc).replace(f"{where}.positions", where)) from None


def _generation(table) -> SamplingDefaults:
    values = section(table, GENERATION_KEYS, "generation")
    if "stop" in values:
        values["stop"] = [str_field(s, f"generation.stop[{i}]") for i, s in enumerate(values["stop"])]
    try:
        return SamplingDefaults(**values)
    except ConfigError as exc:
        raise SweepError(f"generation: {exc}") from None


def _metric(item, where: str) -> Metric:
    if not isinstance(item, dict):
        raise SweepError(f"{where} must be a table like {{name = \"joyful\", keywords = [\"joy\", \"happy\"]}}")
    check_keys(item, ("name", "ignore_case", "layer", *METRIC_KINDS), where)
    kinds = [k for k in METRIC_KINDS if k in item]
    if len(kinds) != 1:
        raise SweepError(f"{where} needs exactly one of {', '.join(METRIC_KINDS)}, got {kinds or 'none'}")
    kind = kinds[0]
    value = item[kind]
    if kind == "logprob":
        if value is not True:
            raise SweepError(f"{where}.logprob is {preview(value)}; write logprob = true (the completion's mean token "
                             f"log-probability under the record's model without steering)")
        value = "unsteered"
    elif kind == "keywords":
        value = [str_field(k, f"{where}.keywords[{i}]") for i, k in enumerate(list_field(value, f"{where}.keywords"))]
        if not value:
            raise SweepError(f"{where}.keywords is empty; give one or more words")
    else:
        value = str_field(value, f"{where}.{kind}")
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            raise SweepError(f"{where}.regex {value!r} is not a valid regular expression ({exc})") from None
    if kind == "function" and not re.match(r"^[\w.]+:\w+$", value):
        raise SweepError(f"{where}.function is {value!r}; give module:function, e.g. \"my_metrics:politeness\"")
    layer = item.get("layer")
    return Metric(name=name_field(item.get("name", kind), f"{where}.name"), kind=kind, value=value,
                  ignore_case=bool_field(item.get("ignore_case", True), f"{where}.ignore_case"),
                  layer=None if layer is None else int_field(layer, f"{where}.layer", minimum=0))
