"""engine-sweep: a grid of steering configurations over prompt sets and models, as one resumable command.

A sweep file (TOML or JSON) names models, prompt files, vectors, the grid, samples and generation settings.
Every (model, grid point, prompt, sample) becomes one request with an id `<model>/<point>/<prompt set>/<prompt
id>/s<sample>` and a seed derived from (seed, id), so a re-run reproduces it. All grid points of a model run in one
engine run (the engine mixes steering per request); models run one after another.

The output directory holds: `sweep.toml` (the file as given), `plan.json` (the resolved plan and its hash),
`results.jsonl` / `results.errors.jsonl` / `results.activations/` (written by JsonlWriter, as engine-run writes them),
`status.json` (rewritten every few seconds), `sweep.log`, and at the end the report (engine.apps.sweep.report).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import queue
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from engine.apps.run import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_REJECTED
from engine.config import (
    DTYPES,
    TRUNCATE_MODES,
    CaptureDefaults,
    ConfigError,
    EngineConfig,
    SamplingDefaults,
    device_settings,
)
from engine.storage.id_index import IdIndex
from engine.models import ModelNotFound
from engine.engine import Engine, EngineError
from engine.pipeline.reader import read_requests
from engine.procs import stop_signals
from engine.pipeline.request import RecordError, decode_line, derive_seed, parse_steering
from engine.storage.files import check_free_space, move_aside, write_atomic, write_problem
from engine.pipeline.writer import DiskLow, JsonlWriter, scan_done_ids

log = logging.getLogger("engine.apps.sweep.runner")

PLAN_VERSION = 1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]+$")
NAME_RULE = "letters, digits and _ . + - only"
STATUS_SECONDS = 2.0
RESULTS, ERRORS, PLAN, STATUS, LOG = "results.jsonl", "results.errors.jsonl", "plan.json", "status.json", "sweep.log"
# Prompt-record fields the sweep sets itself; a prompt file may not carry them.
SWEEP_FIELDS = ("steering", "capture", "sweep")
# EngineConfig fields a sweep file may set under [engine], with their types.
ENGINE_KEYS = {"dtype": str, "device": str, "max_num_seqs": int, "max_model_len": int, "max_prefill_tokens": int,
               "gpu_memory_fraction": float, "enforce_eager": bool, "tokenizer_workers": int, "decoder_workers": int,
               "truncate": str, "return_tokens": bool, "devices": list}
# Of those, the ones that change what a record is (part of the config hash); the rest only change speed.
ENGINE_MEANING = ("dtype", "max_model_len", "truncate")
ENGINE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
GENERATION_KEYS = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int, "stop": list,
                   "ignore_eos": bool}
CAPTURE_KEYS = {"layers": list, "positions": str, "dtype": str, "is_before_steering": bool}
GRID_KEYS = ("vectors", "layers", "coefs", "positions", "normalize", "norm_match", "baseline")
TOP_KEYS = ("output", "seed", "samples", "paired_seeds", "min_free_gb", "models", "prompts", "vectors", "grid",
            "generation", "capture", "engine", "metrics")
METRIC_KINDS = ("regex", "keywords", "function", "projection", "logprob")
# The report's columns before the metrics' (a metric may not take one of these names).
SUMMARY_COLUMNS = ("model", "point", "vector", "layers", "coef", "positions", "normalize", "norm_match", "num_records",
                   "num_errors", "mean_completion_tokens", "median_completion_tokens")


MAX_SAMPLES = 1_000_000  # samples per prompt and grid point; a plan holds every request id


class SweepError(ValueError):
    """The sweep file or its output directory cannot be used; the message names the field or file and the fix."""


# ---------------------------------------------------------------- the sweep file
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
class Grid:
    """The axes; every combination is a grid point. `layers` items are layer sets (one layer is [L])."""

    vectors: list[str]
    layers: list[list[int]]
    coefs: list[float]
    positions: list = field(default_factory=lambda: ["all"])
    normalize: list[bool] = field(default_factory=lambda: [False])
    norm_match: list[bool] = field(default_factory=lambda: [False])
    baseline: bool = False


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
        return EngineConfig(model=model.model, tokenizer=model.tokenizer, sampling=self.sampling(),
                            capture=self.capture, **settings)

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
            table = json.loads(path.read_text(encoding="utf-8"))
        else:
            with path.open("rb") as f:
                table = tomllib.load(f)
    except (OSError, ValueError) as exc:  # JSON / TOML / UTF-8 errors, and JSON integers too long to read
        raise SweepError(f"cannot read it ({exc})") from None
    if not isinstance(table, dict):
        raise SweepError("the file must hold a table (a JSON object)")
    return table


def _build(table: dict, path: Path, output: str | None) -> SweepConfig:
    _known(table, TOP_KEYS, "the top level")
    base = path.parent
    grid_table = _need(table, "grid", dict, "grid")
    vectors = _vectors(table.get("vectors", {}), base)
    capture = _section(table.get("capture", {}), CAPTURE_KEYS, "capture")
    if "layers" in capture:
        capture["layers"] = [_int(x, f"capture.layers[{i}]", minimum=0) for i, x in enumerate(capture["layers"])]
    try:
        capture_defaults = CaptureDefaults(**capture)
    except ConfigError as exc:
        raise SweepError(f"capture: {exc}") from None
    config = SweepConfig(
        source=str(path),
        output=str(base / output_name(table, path)) if output is None else output,
        models=_models(_need(table, "models", list, "models"), base),
        prompts=_prompts(_need(table, "prompts", list, "prompts"), base),
        vectors=vectors,
        grid=_grid(grid_table),
        samples=_int(table.get("samples", 1), "samples", minimum=1, maximum=MAX_SAMPLES),
        seed=_int(table.get("seed", 0), "seed", minimum=0),
        paired_seeds=_bool(table.get("paired_seeds", False), "paired_seeds"),
        min_free_gb=_number(table.get("min_free_gb", 1.0), "min_free_gb", minimum=0.0),
        generation=_generation(table.get("generation", {})),
        capture=capture_defaults,
        engine=_engine(table.get("engine", {})),
        metrics=[_metric(m, f"metrics[{i}]") for i, m in enumerate(_list(table.get("metrics", []), "metrics"))],
    )
    try:
        config.sampling()
    except ConfigError as exc:
        raise SweepError(str(exc)) from None  # it names the seed
    _check_points(config)
    return config


def _check_points(config: SweepConfig) -> None:
    """Every grid point's steering through parse_steering, the parser records use, so the sweep file cannot hold
    a term that its records would be refused for; SweepError names the point."""
    for point in grid_points(config.grid):
        try:
            parse_steering(point.steering(config.vectors), f"grid point {point.key}")
        except RecordError as exc:
            raise SweepError(str(exc)) from None


def output_name(table: dict, path: Path) -> str:
    value = table.get("output", path.stem)
    if not isinstance(value, str) or not value:
        raise SweepError(f"output is {_shown(value)}; give a directory (relative to the sweep file), e.g. "
                         "\"sweep-out\"")
    return value


# ---- field readers: each error names the field's path
def _shown(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:56] + " ..."


def _known(table: dict, keys, where: str) -> None:
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise SweepError(f"unknown key(s) {unknown} in {where}; known: {', '.join(keys)}")


def _need(table: dict, key: str, kind: type, where: str):
    if key not in table:
        raise SweepError(f"{where} is missing")
    value = table[key]
    if not isinstance(value, kind):
        raise SweepError(f"{where} must be a {'table' if kind is dict else kind.__name__}, got {_shown(value)}")
    return value


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise SweepError(f"{where} must be a list, got {_shown(value)}")
    return value


def _int(value, where: str, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SweepError(f"{where} must be an integer, got {_shown(value)}")
    if minimum is not None and value < minimum:
        raise SweepError(f"{where} is {value}; it must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise SweepError(f"{where} is {_shown(value)}; it must be at most {maximum:,}")
    return value


def _number(value, where: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SweepError(f"{where} must be a number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # a JSON integer beyond float64
        raise SweepError(f"{where} is an integer of {len(str(abs(value)))} digits, beyond the range of a number; "
                         f"give a finite number") from None
    if not math.isfinite(number):
        raise SweepError(f"{where} is {_shown(value)}; give a finite number")
    if minimum is not None and number < minimum:
        raise SweepError(f"{where} is {number}; it must be at least {minimum}")
    return number


def _bool(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise SweepError(f"{where} must be true or false, got {_shown(value)}")
    return value


def _str(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SweepError(f"{where} must be a non-empty string, got {_shown(value)}")
    return value


def _name(value, where: str) -> str:
    if not NAME_PATTERN.match(_str(value, where)):
        raise SweepError(f"{where} is {value!r}; names go into request ids: use {NAME_RULE}")
    return value


def _typed(value, kind: type, where: str):
    readers = {int: _int, float: _number, bool: _bool, str: _str, list: _list}
    return readers[kind](value, where)


def _section(table, keys: dict, where: str) -> dict:
    if not isinstance(table, dict):
        raise SweepError(f"{where} must be a table, got {_shown(table)}")
    _known(table, keys, f"[{where}]")
    return {key: _typed(value, keys[key], f"{where}.{key}") for key, value in table.items()}


def _entries(items: list, name: str, key: str, keys: tuple, example: str, hint: str):
    """(where, table) for each entry of a list whose entries are a `key` string or a table of `keys`."""
    if not items:
        raise SweepError(f"{name} is empty; {hint}")
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if isinstance(item, str):
            item = {key: item}
        if not isinstance(item, dict):
            raise SweepError(f"{where} must be a {example}, got {_shown(item)}")
        _known(item, keys, where)
        yield where, item


def _models(items: list, base: Path) -> list[ModelEntry]:
    models = []
    for where, item in _entries(items, "models", "model", ("model", "label", "tokenizer"),
                                "model string or a table {model = ..., label = ...}",
                                "name at least one model, e.g. models = [\"embedded\"]"):
        model = _str(item.get("model"), f"{where}.model")
        tokenizer = item.get("tokenizer")
        models.append(ModelEntry(
            label=_name(item.get("label", default_label(model)), f"{where}.label"),
            model=_model_path(model, base),
            tokenizer=None if tokenizer is None else str(base / _str(tokenizer, f"{where}.tokenizer")),
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
    for where, item in _entries(items, "prompts", "path", ("path", "name"), "path or a table {path = ..., name = ...}",
                                "name at least one JSONL prompt file"):
        path = base / _str(item.get("path"), f"{where}.path")
        if not path.is_file():
            raise SweepError(f"{where}: {path}: no such file")
        sets.append(PromptSet(_name(item.get("name", path.stem), f"{where}.name"), str(path)))
    return sets


def _vectors(table, base: Path) -> dict[str, str]:
    if not isinstance(table, dict):
        raise SweepError(f"vectors must be a table of name = \"file\", got {_shown(table)}")
    vectors = {}
    for name, value in table.items():
        where = f"vectors.{name}"
        _name(name, f"vectors: the name {name!r}")
        path = base / _str(value, where)
        if not path.is_file():
            raise SweepError(f"{where}: {path}: no such file")
        vectors[name] = str(path)
    return vectors


def _grid(table: dict) -> Grid:
    _known(table, GRID_KEYS, "[grid]")
    axes = {}
    for key in GRID_KEYS[:-1]:
        if key not in table:
            continue
        values = _list(table[key], f"grid.{key}")
        if not values:
            raise SweepError(f"grid.{key} is empty; give at least one value or leave the key out")
        axes[key] = values
    vectors = [_str(v, f"grid.vectors[{i}]") for i, v in enumerate(axes.get("vectors", []))]
    baseline = _bool(table.get("baseline", False), "grid.baseline")
    if not vectors and not baseline:
        raise SweepError("grid.vectors is missing; name vectors from [vectors], or set grid.baseline = true for an "
                         "unsteered run")
    if vectors:
        for key in ("layers", "coefs"):
            if key not in axes:
                example = "[6]" if key == "layers" else "[0, 4, 8]"
                raise SweepError(f"grid.{key} is missing; give a list, e.g. {key} = {example}")
    grid = Grid(vectors=vectors,
                layers=[_layer_set(v, f"grid.layers[{i}]") for i, v in enumerate(axes.get("layers", []))],
                coefs=[_coef(v, f"grid.coefs[{i}]") for i, v in enumerate(axes.get("coefs", []))], baseline=baseline)
    if "positions" in axes:
        grid.positions = [_positions(v, f"grid.positions[{i}]") for i, v in enumerate(axes["positions"])]
    for key in ("normalize", "norm_match"):
        if key in axes:
            setattr(grid, key, [_bool(v, f"grid.{key}[{i}]") for i, v in enumerate(axes[key])])
    return grid


def _layer_set(value, where: str) -> list[int]:
    layers = value if isinstance(value, list) else [value]
    if not layers:
        raise SweepError(f"{where} is an empty list; give a layer index or a list of them (steered together)")
    return sorted({_int(layer, where if not isinstance(value, list) else f"{where}[{j}]", minimum=0)
                   for j, layer in enumerate(layers)})


def _coef(value, where: str) -> float:
    """A grid coefficient, through parse_steering (the parser records use): what a record is refused for, the sweep
    file is too, with the grid field named."""
    coef = _number(value, where)
    try:
        parse_steering({"vector": "-", "layers": [0], "coef": coef}, where)
    except RecordError as exc:
        detail, head = str(exc).replace(f"{where}.coef", where), f"{where} is {_shown(value)}"
        raise SweepError(detail if detail.startswith(head) else f"{head}: {detail}") from None
    return coef


def _positions(value, where: str):
    try:
        return parse_steering({"vector": "-", "layers": [0], "positions": value}, where)["positions"]
    except RecordError as exc:
        raise SweepError(str(exc).replace(f"{where}.positions", where)) from None


def _generation(table) -> SamplingDefaults:
    values = _section(table, GENERATION_KEYS, "generation")
    if "stop" in values:
        values["stop"] = [_str(s, f"generation.stop[{i}]") for i, s in enumerate(values["stop"])]
    try:
        return SamplingDefaults(**values)
    except ConfigError as exc:
        raise SweepError(f"generation: {exc}") from None


def _engine(table, devices_name: str = "engine.devices") -> dict:
    values = _section(table, ENGINE_KEYS, "engine")
    if "devices" in values:
        values["devices"] = [_str(d, f"{devices_name}[{i}]") for i, d in enumerate(values["devices"])]
        for i, device in enumerate(values["devices"]):
            try:
                EngineConfig(**device_settings(device))
            except ConfigError as exc:
                raise SweepError(f"{devices_name}[{i}] is {device!r} ({exc}); use cpu, cuda or cuda:N, or GPUs that "
                                 f"run one model together: \"0,1\" or \"all\"") from None
    if values.get("dtype", "auto") not in DTYPES:
        raise SweepError(f"engine.dtype is {values['dtype']!r}; use one of {', '.join(DTYPES)}")
    if values.get("truncate", "none") not in TRUNCATE_MODES:
        raise SweepError(f"engine.truncate is {values['truncate']!r}; use one of {', '.join(TRUNCATE_MODES)}")
    try:
        EngineConfig(**{k: v for k, v in values.items() if k != "devices"})
    except ConfigError as exc:
        raise SweepError(f"engine: {exc}") from None
    return values


def _metric(item, where: str) -> Metric:
    if not isinstance(item, dict):
        raise SweepError(f"{where} must be a table like {{name = \"joyful\", keywords = [\"joy\", \"happy\"]}}")
    _known(item, ("name", "ignore_case", "layer", *METRIC_KINDS), where)
    kinds = [k for k in METRIC_KINDS if k in item]
    if len(kinds) != 1:
        raise SweepError(f"{where} needs exactly one of {', '.join(METRIC_KINDS)}, got {kinds or 'none'}")
    kind = kinds[0]
    value = item[kind]
    if kind == "logprob":
        if value is not True:
            raise SweepError(f"{where}.logprob is {_shown(value)}; write logprob = true (the completion's mean token "
                             f"log-probability under the record's model without steering)")
        value = "unsteered"
    elif kind == "keywords":
        value = [_str(k, f"{where}.keywords[{i}]") for i, k in enumerate(_list(value, f"{where}.keywords"))]
        if not value:
            raise SweepError(f"{where}.keywords is empty; give one or more words")
    else:
        value = _str(value, f"{where}.{kind}")
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            raise SweepError(f"{where}.regex {value!r} is not a valid regular expression ({exc})") from None
    if kind == "function" and not re.match(r"^[\w.]+:\w+$", value):
        raise SweepError(f"{where}.function is {value!r}; give module:function, e.g. \"my_metrics:politeness\"")
    layer = item.get("layer")
    return Metric(name=_name(item.get("name", kind), f"{where}.name"), kind=kind, value=value,
                  ignore_case=_bool(item.get("ignore_case", True), f"{where}.ignore_case"),
                  layer=None if layer is None else _int(layer, f"{where}.layer", minimum=0))


# ---------------------------------------------------------------- the plan
@dataclass(slots=True)
class GridPoint:
    """One steering configuration of the grid (or the unsteered baseline, key `none`)."""

    key: str
    vector: str | None
    layers: list[int]
    coef: float | None
    positions: str | dict = "all"
    normalize: bool = False
    norm_match: bool = False

    def axes(self) -> dict:
        return {"vector": self.vector, "layers": self.layers, "coef": self.coef, "positions": self.positions,
                "normalize": self.normalize, "norm_match": self.norm_match}

    def steering(self, vectors: dict[str, str]) -> dict | None:
        if self.vector is None:
            return None
        spec = {"vector": vectors[self.vector], "layers": self.layers, "coef": self.coef, "positions": self.positions}
        return (spec | ({"normalize": True} if self.normalize else {})
                | ({"norm_match": True} if self.norm_match else {}))


BASELINE = "none"


def point_key(vector: str, layers: list[int], coef: float, positions, normalize: bool, norm_match: bool) -> str:
    """A readable, unique name of a grid point, e.g. `joy@L6*4.0` or `joy@L4,6*-2.0+generated+normalize`; axes at
    their defaults add nothing, so adding a one-value axis to the grid keeps every id."""
    key = f"{vector}@L{','.join(map(str, layers))}*{coef!r}"
    if positions != "all":
        key += "+" + (positions if isinstance(positions, str) else "pos" + json.dumps(positions, separators=(",", ":")))
    return key + ("+normalize" if normalize else "") + ("+norm_match" if norm_match else "")


def grid_points(grid: Grid) -> list[GridPoint]:
    """The grid's points in file order (the baseline first); SweepError if two come out the same."""
    import itertools

    points = [GridPoint(BASELINE, None, [], None)] if grid.baseline else []
    for combo in itertools.product(grid.vectors, grid.layers, grid.coefs, grid.positions, grid.normalize,
                                   grid.norm_match):
        points.append(GridPoint(point_key(*combo), *combo))
    seen = set()
    for point in points:
        if point.key in seen:
            raise SweepError(f"grid: the point {point.key} comes out twice; remove the repeated value from its axis")
        seen.add(point.key)
    return points


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_prompts(prompt_set: PromptSet) -> list[tuple[str, dict]]:
    """(prompt id, record without id and seed) per line; SweepError names the file, line and field."""
    prompts, ids = [], set()
    with open(prompt_set.path, "rb") as f:
        for line, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            where = f"prompts {prompt_set.path} line {line}"
            try:
                record = decode_line(raw, line)
            except RecordError as exc:
                raise SweepError(f"{where}: {exc}") from None
            if ("prompt" in record) == ("messages" in record):
                raise SweepError(f"{where}: a record needs exactly one of 'prompt' or 'messages'")
            taken = [k for k in SWEEP_FIELDS if k in record]
            if taken:
                raise SweepError(f"{where}: field(s) {taken} are set by the sweep (from [grid] / [capture]); remove "
                                 "them")
            prompt_id = record.pop("id", str(line))
            if not isinstance(prompt_id, str) or not prompt_id:
                raise SweepError(f"{where}: field 'id' is {_shown(prompt_id)}; give a non-empty string or leave it out")
            if prompt_id in ids:
                raise SweepError(f"{where}: id {prompt_id!r} repeats an earlier line; ids must be unique in a file")
            ids.add(prompt_id)
            record.pop("seed", None)  # the sweep derives every request's seed
            prompts.append((prompt_id, record))
    return prompts


class Plan:
    """A sweep expanded: grid points, prompts, and the settings its hash covers. Requests are made lazily, in the
    order sample > prompt > grid point, so a sweep stopped early has every point about equally far along."""

    def __init__(self, config: SweepConfig):
        self.config = config
        try:
            self.points = grid_points(config.grid)
            self.prompts = {s.name: read_prompts(s) for s in config.prompts}
        except SweepError as exc:
            raise SweepError(f"{config.source}: {exc}") from None
        self.num_prompts = sum(len(p) for p in self.prompts.values())
        self.num_per_model = len(self.points) * self.num_prompts * config.samples
        self.settings = self._settings(config)
        self.config_hash = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]

    def _settings(self, c: SweepConfig) -> dict:
        """What makes the records what they are (not speed settings, output place or metrics), in a form that does
        not depend on the order of the file."""
        used = {p.vector for p in self.points if p.vector is not None}
        return {
            "version": PLAN_VERSION,
            "models": {m.label: {"model": m.model, "tokenizer": m.tokenizer} for m in c.models},
            "prompts": {s.name: {"sha256": _digest(s.path), "num_prompts": len(self.prompts[s.name])}
                        for s in c.prompts},
            "vectors": {name: _digest(path) for name, path in c.vectors.items() if name in used},
            "points": sorted(p.key for p in self.points),
            "samples": c.samples, "seed": c.seed, "paired_seeds": c.paired_seeds,
            "generation": dataclasses.asdict(c.generation) | {"seed": c.seed},
            "capture": dataclasses.asdict(c.capture),
            "engine": {key: c.engine.get(key, ENGINE_DEFAULTS[key]) for key in ENGINE_MEANING},
        }

    def request_id(self, label: str, point: GridPoint, prompt_set: str, prompt_id: str, sample: int) -> str:
        return f"{label}/{point.key}/{prompt_set}/{prompt_id}/s{sample}"

    def seed(self, request_id: str, prompt_set: str, prompt_id: str, sample: int) -> int:
        """From (seed, id); with paired_seeds, from (seed, prompt, sample) only, so every grid point and model
        draws the same sampling noise for a given prompt and sample."""
        key = f"{prompt_set}/{prompt_id}/s{sample}" if self.config.paired_seeds else request_id
        return derive_seed(self.config.seed, key)

    def requests(self, model: ModelEntry) -> Iterator[tuple[int, dict]]:
        """(number, input record) of every request of one model, as engine.pipeline.reader.read_requests takes them."""
        vectors, number = self.config.vectors, 0
        specs = {p.key: p.steering(vectors) for p in self.points}
        for sample in range(self.config.samples):
            for set_name, prompts in self.prompts.items():
                for prompt_id, record in prompts:
                    for point in self.points:
                        number += 1
                        request_id = self.request_id(model.label, point, set_name, prompt_id, sample)
                        tag = {"model": model.label, "point": point.key, **point.axes(), "prompt_set": set_name,
                               "prompt_id": prompt_id, "sample": sample}
                        yield number, {**record, "id": request_id,
                                       "seed": self.seed(request_id, set_name, prompt_id, sample),
                                       "steering": specs[point.key], "sweep": tag}

    def to_json(self) -> dict:
        c = self.config
        return {
            "version": PLAN_VERSION, "config_hash": self.config_hash, "sweep_file": c.source,
            "base_dir": str(Path(c.source).parent), "written": _now(), "settings": self.settings,
            "metrics": [m.to_dict() for m in c.metrics], "vectors": c.vectors,
            "prompt_files": {s.name: s.path for s in c.prompts}, "dtype": c.engine.get("dtype", "auto"),
            "models": [{"label": m.label, "model": m.model, "tokenizer": m.tokenizer,
                        "num_requests": self.num_per_model}
                       for m in c.models],
            "points": [{"key": p.key, **p.axes()} for p in self.points],
            "num_requests": self.num_per_model * len(c.models),
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- the output directory
def settings_diff(old, new, path: str = "") -> list[str]:
    """What changed between two plans' settings, one `path: was X, now Y` per leaf."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new), key=str)
                for line in settings_diff(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))]
    if old == new:
        return []
    if isinstance(old, list) and isinstance(new, list):
        added, removed = [x for x in new if x not in old], [x for x in old if x not in new]
        parts = ([f"added {', '.join(map(str, added))}"] if added else []) + (
            [f"removed {', '.join(map(str, removed))}"] if removed else [])
        return [f"{path}: {'; '.join(parts) or 'reordered'}"]
    return [f"{path}: was {_shown(old)}, now {_shown(new)}"]


def extension_problems(old: dict, new: dict) -> list[str]:
    """Why `new` is not `old` plus more requests (empty: --extend may run it, redoing nothing)."""
    grown = ("models", "prompts", "vectors", "points", "samples")
    problems = [line for key in sorted(set(old) | set(new)) if key not in grown
                for line in settings_diff(old.get(key), new.get(key), key)]
    for section in ("models", "prompts", "vectors"):
        for name, value in old[section].items():
            if new[section].get(name) != value:
                problems.append(f"{section}.{name}: {'removed' if name not in new[section] else 'changed'}")
    removed = [key for key in old["points"] if key not in new["points"]]
    if removed:
        problems.append(f"points: removed {', '.join(removed)}")
    if new["samples"] < old["samples"]:
        problems.append(f"samples: was {old['samples']}, now {new['samples']}")
    return problems


def prepare_directory(out: Path, plan: Plan, force: bool, extend: bool) -> str:
    """Check `out` against the plan, then write the sweep file's copy and plan.json. Returns what happens:
    `new`, `resume`, `extend` or `replaced`; SweepError when the sweep changed and neither flag allows it, or when
    `out` cannot be a sweep directory (a file, or in a folder that takes no files)."""
    check_output_dir(out)
    how = _compare(out, plan, force, extend)
    try:
        if how == "replaced":
            [aside] = move_aside([out])
            log.warning("moved the old sweep aside to %s", aside)
        out.mkdir(parents=True, exist_ok=True)
        source = Path(plan.config.source)
        write_atomic(out / f"sweep{source.suffix}", source.read_bytes())
        write_atomic(out / PLAN, (json.dumps(plan.to_json(), indent=2) + "\n").encode())
    except OSError as exc:
        raise SweepError(f"cannot set up the output directory {out} ({_why(exc)}); nothing has run: fix that, or "
                         f"choose another output, and run again") from None
    return how


def check_output_dir(out: Path) -> None:
    """Before anything starts: `out` is a directory or can be made one, in a folder that takes files (probed with a
    temporary file); SweepError names the path and the fix."""
    try:
        if out.exists() and not out.is_dir():
            raise SweepError(f"output {out} is a file; a sweep writes a directory; choose another output (the sweep "
                             f"file's `output`, or --output)")
    except OSError as exc:  # e.g. a name too long for the file system
        raise SweepError(f"output {out}: cannot use it ({_why(exc)}); choose another output") from None
    problem = write_problem(out)
    if problem:
        raise SweepError(f"output {out}: {problem}; choose a directory you can write to") from None


def _why(exc: OSError) -> str:
    return f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else f"{type(exc).__name__}: {exc}"


def _compare(out: Path, plan: Plan, force: bool, extend: bool) -> str:
    plan_file = out / PLAN
    if not plan_file.exists():
        if (out / RESULTS).exists():
            raise SweepError(f"{out} holds {RESULTS} but no {PLAN}: it is not a sweep directory. Use another output.")
        return "new"
    try:
        old = json.loads(plan_file.read_text())["settings"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SweepError(f"{plan_file} cannot be read ({exc}); pass --force to set the directory aside") from None
    if old == plan.settings:
        return "resume"
    if force:
        return "replaced"
    changes = settings_diff(old, plan.settings)
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    if extend:
        problems = extension_problems(old, plan.settings)
        if not problems:
            return "extend"
        raise SweepError(f"--extend adds grid points, prompt sets, vectors, models or samples, but this sweep also "
                         f"changes what was run: {'; '.join(problems[:8])}. Use a new output directory, or pass "
                         f"--force to set the old results aside and start again.")
    raise SweepError(f"the sweep file changed since {out} was started ({shown}). Run the file it was started with "
                     f"to resume, pass --extend to run only the added requests (when nothing already run changes), "
                     f"--force to set the old results aside and start again, or use a new output directory.")


# ---------------------------------------------------------------- running
class StatusBoard:
    """status.json, rewritten atomically every few seconds from a thread: per model done/total, errors, tok/s,
    ETA, the last error. `check` runs on every tick too (the free-space check)."""

    def __init__(self, path: Path, plan: Plan, done: IdIndex, check=None, interval: float = STATUS_SECONDS):
        self.path, self.plan, self.check, self.interval = path, plan, check, interval
        self.lock = threading.Lock()
        self.state, self.started, self.last_error = "starting", _now(), None
        self.models = {}
        for m in plan.config.models:
            num_done = done.count_prefix(m.label + "/")
            self.models[m.label] = {"model": m.model, "state": "done" if num_done >= plan.num_per_model else "waiting",
                                    "done": num_done, "total": plan.num_per_model, "errors": 0, "tokens": 0}
        self.num_records = self.num_tokens = 0  # this invocation's
        self.gen_seconds, self._gen_since, self._num_running = 0.0, None, 0  # time with any model generating
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sweep-status", daemon=True)

    def start(self) -> None:
        self.write()
        self._thread.start()

    def _loop(self) -> None:
        while not self._halt.wait(self.interval):
            if self.check is not None:
                self.check()
            self.write()

    def set_model(self, label: str, state: str, device: str | None = None) -> None:
        """A model's state: loading, running, done or stopped; tok/s counts the time any model is `running`."""
        with self.lock:
            entry, now = self.models[label], time.monotonic()
            was_running = self._num_running > 0
            self._num_running += (state == "running") - (entry["state"] == "running")
            entry["state"] = state
            if device is not None:
                entry["device"] = device
            self.state = "running"
            if was_running and not self._num_running:
                self.gen_seconds += now - self._gen_since
                self._gen_since = None
            elif self._num_running and not was_running:
                self._gen_since = now

    def record(self, label: str, outcome) -> None:
        with self.lock:
            entry = self.models[label]
            if outcome.is_error:
                entry["errors"] += 1
                self.last_error = f"{outcome.record.get('id')}: {outcome.record['error']}"
                return
            tokens = outcome.record["num_completion_tokens"]
            entry["done"] += 1
            entry["tokens"] += tokens
            self.num_records += 1
            self.num_tokens += tokens

    def finish(self, state: str, error: str | None = None) -> None:
        with self.lock:
            self.state = state
            if error:
                self.last_error = error
        self._halt.set()
        self._thread.join(timeout=5)
        self.write()

    def snapshot(self) -> dict:
        with self.lock:
            seconds = self.gen_seconds + (time.monotonic() - self._gen_since if self._gen_since else 0.0)
            done = sum(m["done"] for m in self.models.values())
            total = sum(m["total"] for m in self.models.values())
            rate = self.num_records / seconds if seconds > 0 else 0.0
            return {
                "state": self.state, "config_hash": self.plan.config_hash, "pid": os.getpid(), "started": self.started,
                "updated": _now(), "done": done, "total": total,
                "errors": sum(m["errors"] for m in self.models.values()),
                "tok_per_s": round(self.num_tokens / seconds, 1) if seconds > 0 else None,
                "records_per_s": round(rate, 3) if rate else None,
                "eta_s": round((total - done) / rate) if rate else None,
                "last_error": self.last_error, "models": {k: dict(v) for k, v in self.models.items()},
            }

    def write(self) -> None:
        write_atomic(self.path, (json.dumps(self.snapshot(), indent=2) + "\n").encode())


class Stopper:
    """SIGINT / SIGTERM, a low disk or a failed model stop the sweep: running engines stop admitting and drain,
    finished records are flushed, no further model starts (an engine still starting stops once it is up)."""

    def __init__(self):
        self.reason: str | None = None
        self.engines: set[Engine] = set()
        self.lock = threading.RLock()  # re-entrant: a signal may arrive while the main thread is inside stop()

    def on_signal(self, signum, frame) -> None:
        self.stop(signal.Signals(signum).name)

    def stop(self, reason: str) -> None:
        with self.lock:
            if self.reason is None:
                self.reason = reason
            engines = list(self.engines)
        for engine in engines:
            engine.interrupt()

    def attach(self, engine: Engine) -> None:
        with self.lock:
            self.engines.add(engine)
        if self.reason is not None:
            engine.interrupt()

    def detach(self, engine: Engine) -> None:
        with self.lock:
            self.engines.discard(engine)


class SweepRunner:
    """Runs a plan into an output directory: one Engine per model, one model per device at a time (side by side
    when there are several devices), every record through one JsonlWriter owned by the calling thread."""

    def __init__(self, plan: Plan, out: Path):
        self.plan, self.out = plan, out
        self.results = out / RESULTS
        self.done = scan_done_ids(self.results)
        self.stopper = Stopper()
        self.status = StatusBoard(out / STATUS, plan, self.done, check=self._check_disk)
        self.outcomes: queue.Queue = queue.Queue(maxsize=4096)  # (model label, Outcome) from the lanes to the writer
        self.failures: list[BaseException] = []

    def _check_disk(self) -> None:
        try:
            check_free_space(self.out, self.plan.config.min_free_gb, "min_free_gb")
        except DiskLow as exc:
            self.stopper.stop(str(exc))

    def run(self) -> tuple[str, JsonlWriter]:
        """Run every model that has requests left; returns (how it ended: done | interrupted | disk, the writer)."""
        self._check_disk()
        if self.stopper.reason:
            raise SweepError(f"{self.stopper.reason}: free some space (or lower min_free_gb) and run again")
        writer = JsonlWriter(self.results, {"version": 1, "sweep_config_hash": self.plan.config_hash}, ordered=False,
                             min_free_gb=self.plan.config.min_free_gb, done=self.done)
        todo = deque(m for m in self.plan.config.models if self.status.models[m.label]["state"] != "done")
        lanes = [threading.Thread(target=self._lane, args=(device, todo), name=f"sweep-{device}", daemon=True)
                 for device in self.plan.config.devices()[:len(todo)]]
        self.status.start()
        with stop_signals(self.stopper.on_signal):
            try:
                for lane in lanes:
                    lane.start()
                self._write_outcomes(lanes, writer)
            except DiskLow as exc:  # the next activation shard does not fit: stop as on a low disk
                self._disk_low(exc)
            except BaseException as exc:  # noqa: BLE001 - stops the lanes, then re-raised below once they drained
                self.stopper.stop(f"failed: {type(exc).__name__}")
                self.failures.append(exc)
            finally:
                for lane in lanes:
                    lane.join()
                try:
                    writer.close()
                except DiskLow as exc:  # the last shard does not fit: its records run again on resume
                    self._disk_low(exc)
                finally:
                    self.done.close()
        if self.failures:
            exc = self.failures[0]
            self.status.finish("failed", f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc))
            raise exc
        reason = self.stopper.reason
        ended = "done" if reason is None else "disk" if reason.startswith("disk") else "interrupted"
        self.status.finish({"done": "done", "disk": "stopped", "interrupted": "interrupted"}[ended], reason)
        return ended, writer

    def _disk_low(self, exc: DiskLow) -> None:
        if self.stopper.reason is not None and not self.stopper.reason.startswith("disk"):
            log.error("%s; those records run again on resume", exc)  # the sweep was stopping for another reason
        self.stopper.stop(str(exc))

    def _write_outcomes(self, lanes: list[threading.Thread], writer: JsonlWriter) -> None:
        while any(lane.is_alive() for lane in lanes) or not self.outcomes.empty():
            try:
                label, outcome = self.outcomes.get(timeout=0.2)
            except queue.Empty:
                continue
            writer.write(outcome)
            self.status.record(label, outcome)
            if outcome.is_error:
                log.warning("%s", self.status.last_error)

    def _lane(self, device: str, todo: deque) -> None:
        """One device's thread: runs models from `todo` one after another until none is left or the sweep stops."""
        try:
            while self.stopper.reason is None:
                try:
                    model = todo.popleft()
                except IndexError:
                    return
                self._run_model(model, device)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which stops the sweep and re-raises
            self.failures.append(exc)
            self.stopper.stop(f"failed: {exc}")

    def _run_model(self, model: ModelEntry, device: str) -> None:
        config = self.plan.config.engine_config(model, device)
        entry = self.status.models[model.label]
        log.info("%s: %d of %d requests left; starting %s on %s", model.label, entry["total"] - entry["done"],
                 entry["total"], model.model, device)
        self.status.set_model(model.label, "loading", device)
        with Engine(config) as engine:
            self.stopper.attach(engine)
            self.status.set_model(model.label, "running")
            try:
                for outcome in engine.run(read_requests(self.plan.requests(model), config, self.done)):
                    self._hand_over(model.label, outcome)
            finally:
                self.stopper.detach(engine)
            stopped = engine.is_interrupted
        self.status.set_model(model.label, "stopped" if stopped else "done")
        log.info("%s: %s (%d done, %d errors)", model.label, "stopped" if stopped else "finished", entry["done"],
                 entry["errors"])

    def _hand_over(self, label: str, outcome) -> None:
        """To the writer's thread; once the sweep stops, an outcome that finds the queue full is dropped (its
        request runs again on resume), so a lane never waits on a writer that has gone."""
        while True:
            try:
                self.outcomes.put((label, outcome), timeout=0.5)
                return
            except queue.Full:
                if self.stopper.reason is not None:
                    return


# ---------------------------------------------------------------- the command
def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-sweep", description="Run a grid of steering configurations over prompt "
                                "sets and models, resumably; `engine-sweep report DIR` rewrites the report.")
    p.add_argument("sweep", help="the sweep file (.toml or .json)")
    p.add_argument("--output", help="output directory (default: the file's `output`, or its name beside it)")
    p.add_argument("--force", action="store_true", help="the sweep changed: set the old directory aside, start again")
    p.add_argument("--extend", action="store_true", help="the sweep only grew: run just the added requests")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.add_argument("--devices", action="append", metavar="all|0,1|cuda:0",
                   help="where models run, instead of the file's [engine] devices: each --devices runs one model at a "
                        "time on those GPUs together (--devices all: every GPU; --devices 0 --devices 1: two models "
                        "at a time, one GPU each). Speed only: the results and the sweep's hash do not change")
    return p


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-sweep report", description="summary.csv, summary.md and plots of a "
                                "sweep directory (also of a sweep still running or stopped).")
    p.add_argument("directory")
    return p


def sweep_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return _report_main(report_parser().parse_args(argv[1:]))
    args = sweep_parser().parse_args(argv)
    if args.force and args.extend:
        print("engine-sweep: --force and --extend exclude each other: --extend keeps the results, --force sets them "
              "aside", file=sys.stderr)
        return EXIT_FATAL
    try:
        config = load_sweep(args.sweep, args.output)
        if args.devices:
            config.engine.update(_engine({"devices": args.devices}, "--devices"))
        plan = Plan(config)
        if args.dry_run:
            print(json.dumps(plan.to_json(), indent=2))
            return EXIT_OK
        out = Path(plan.config.output)
        how = prepare_directory(out, plan, args.force, args.extend)
        try:
            _log_to(out / LOG)
        except OSError as exc:
            raise SweepError(f"cannot open {out / LOG} ({_why(exc)}); nothing has run: fix that and run again") \
                from None
        log.info("engine-sweep %s: %s into %s (config %s): %d models x %d points x %d prompts x %d samples", args.sweep,
                 how, out, plan.config_hash, len(plan.config.models), len(plan.points), plan.num_prompts,
                 plan.config.samples)
        return _run(plan, out, args)
    except SweepError as exc:
        print(f"engine-sweep: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except (ConfigError, ModelNotFound, EngineError) as exc:
        log.error("%s", exc)
        return EXIT_FATAL
    except KeyboardInterrupt:  # before the engine's drain handler is installed, or after it is removed
        print("engine-sweep: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        log.error("cannot write the sweep's files (%s: %s); every finished record is on disk: fix that and run the "
                  "same command to resume", type(exc).__name__, exc)
        return EXIT_FATAL


def _run(plan: Plan, out: Path, args) -> int:
    started = time.perf_counter()
    runner = SweepRunner(plan, out)
    ended, writer = runner.run()
    status = runner.status.snapshot()
    log.info("%d records, %d errors, %d tokens this run in %.1f s; %d of %d done%s", writer.num_results,
             writer.num_errors, writer.num_tokens, time.perf_counter() - started, status["done"], status["total"],
             f"; stopped: {runner.stopper.reason}" if ended != "done" else "")
    if ended == "disk":
        log.error("%s: free some space (or lower min_free_gb), then run the same command to resume",
                  runner.stopper.reason)
        return EXIT_FATAL
    if ended == "interrupted":
        return EXIT_INTERRUPTED
    if not args.no_report:
        from engine.apps.sweep.report import write_report

        try:
            paths = write_report(out)
        except SweepError as exc:
            log.error("the sweep finished but its report failed: %s; fix that and run engine-sweep report %s", exc, out)
            return EXIT_FATAL
        log.info("report: %s", ", ".join(str(p) for p in paths))
    return EXIT_REJECTED if writer.num_errors else EXIT_OK


def _report_main(args) -> int:
    from engine.apps.sweep.report import write_report

    try:
        paths = write_report(Path(args.directory))
    except SweepError as exc:
        print(f"engine-sweep report: {exc}", file=sys.stderr)
        return EXIT_FATAL
    print("\n".join(str(p) for p in paths))
    return EXIT_OK


def _log_to(path: Path) -> None:
    """sweep.log gets the engine's and the sweep's messages with times; stderr gets them plain."""
    engine_log = logging.getLogger("engine")
    engine_log.setLevel(logging.INFO)
    for handler in list(engine_log.handlers):
        if getattr(handler, "is_sweep", False):
            engine_log.removeHandler(handler)
            handler.close()
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("engine-sweep: %(message)s"))
    for handler in (file_handler, console):
        handler.is_sweep = True
        engine_log.addHandler(handler)
    engine_log.propagate = False


if __name__ == "__main__":
    # Run the module's own copy, not this __main__ one: the report raises engine.apps.sweep.runner.SweepError, which
    # a handler here (__main__.SweepError, another class) would not catch.
    from engine.apps.sweep.runner import sweep_main as main

    sys.exit(main())
