"""Steering and capture specs as records, sweeps and flags give them: parsing, checking and normalising a term,
its positions, a capture request, and a file of named specs. A leaf: it imports nothing of the engine, so the config,
the record parser and the apps all check specs with the same rules.

A parsed spec is typed and frozen (SteeringTerm, SteeringSpec, CaptureSpec): hashable, so a spec is its own cache
key. `to_record()` gives the form records, manifests and plan hashes state (and the form the spec crosses a process
boundary in); `from_record` rebuilds the typed spec from that form, trusting it (it was checked when parsed)."""

from __future__ import annotations

import json
import math
import stat
from dataclasses import dataclass, replace
from pathlib import Path

STEER_POSITIONS = ("prompt", "generated", "all")
CAPTURE_POSITIONS = ("last_prompt", "mean_prompt", "all_prompt", "generated")
MAX_COEF = float(3.4028234663852886e38)  # float32's largest: a coefficient beyond it cannot be applied
RANGE_KINDS = ("prompt", "generated")
RANGE_EXAMPLE = '{"prompt": [-1, null]} (the last prompt token) or {"generated": [0, 20]}'
NORM_FLAGS = ("normalize", "norm_match")
OPS = ("add", "ablate", "clamp", "sae")  # a term's op; add (the default) is stated back without it
ALL_LAYERS = "all"


class RecordError(ValueError):
    """A record cannot run; the message says which field and why."""


Span = tuple[int, int | None]  # [start, end): end None runs to the end


@dataclass(frozen=True, slots=True)
class Ranges:
    """A term's positions as [start, end) spans: prompt bounds read as Python slices of the prompt tokens (-1 is
    the last one), generated bounds count from the first generated token (0). An empty tuple: none of that kind
    (a parsed term has at least one span in all)."""

    prompt: tuple[Span, ...] = ()
    generated: tuple[Span, ...] = ()

    def to_record(self) -> dict:
        """{"prompt": [[start, end], ...], "generated": [...]}, each key only when it has spans."""
        return {kind: [list(span) for span in getattr(self, kind)] for kind in RANGE_KINDS if getattr(self, kind)}

    @classmethod
    def from_record(cls, value: dict) -> Ranges:
        return cls(**{kind: tuple((start, end) for start, end in value[kind]) for kind in RANGE_KINDS if kind in value})


FILE_LAYERS: tuple[int, ...] = ()  # a term's layers left out: the layers its vector file names


@dataclass(frozen=True, slots=True)
class Gate:
    """A term's `when`: the term applies only at tokens whose residual after `layer` (before that layer's own
    interventions) projects onto `vector` above `threshold` (is_above) or below it, in the same forward."""

    vector: str
    layer: int
    threshold: float
    is_above: bool = True

    def to_record(self) -> dict:
        return {"vector": self.vector, "layer": self.layer, "above" if self.is_above else "below": self.threshold}

    @classmethod
    def from_record(cls, value: dict) -> Gate:
        is_above = "above" in value
        return cls(value["vector"], int(value["layer"]), float(value["above" if is_above else "below"]), is_above)


@dataclass(frozen=True, slots=True)
class SteeringTerm:
    """One normalised term: `vector` (a file path) added at `layers` (sorted, distinct) times `coef`, at
    `positions` ("prompt", "generated", "all" or Ranges); norm_match scales the vector to the residual's norm,
    normalize rescales the steered residual to the norm it had before steering.

    `layers` FILE_LAYERS (empty): the layers the vector file names (`layer.<L>`, a GGUF's `direction.<L>`, the rows
    of a 2-D array), resolved where the file is read (the engine core; a file of one unnamed vector is then that
    record's error). Such a term is stated back by to_record() as it was given, without `layers`: that is the form
    it crosses processes and keys caches in, and from_record(to_record()) is the same term. A result record states
    the layers the core resolved instead (with_layers, from the core's answer): a researcher reading the output
    wants the layers that were steered, and the file may be written again with other layers later."""

    vector: str  # the direction's file; for op sae, the SAE's path
    layers: tuple[int, ...]
    coef: float
    positions: str | Ranges
    normalize: bool = False
    norm_match: bool = False
    op: str = "add"  # one of OPS
    is_all_layers: bool = False  # "layers": "all" (resolved to every layer where the model is known)
    features: tuple[int, ...] = ()  # op sae: the features it sets or shifts
    value: float | None = None  # op clamp: the projection it sets; op sae: the activation it sets (else coef shifts)
    bounds: tuple[float | None, float | None] | None = None  # op clamp "range": [lo, hi], either end open (None)
    when: Gate | None = None

    @property
    def is_file_layers(self) -> bool:
        """Whether the term steers the layers its vector file names (its layers were left out; for an SAE, the
        layer its config names)."""
        return not self.layers and not self.is_all_layers

    @property
    def paths(self) -> tuple[str, ...]:
        """The files the term reads: its vector (or SAE) and its gate's probe."""
        return (self.vector,) if self.when is None else (self.vector, self.when.vector)

    def with_layers(self, layers) -> SteeringTerm:
        """This term at `layers` (sorted, distinct): a term of the file's layers once they are known."""
        return replace(self, layers=tuple(sorted(set(layers))))

    def to_record(self) -> dict:
        """{vector[, layers], coef, positions[, normalize][, norm_match]}: `layers` left out for the file's layers,
        as it was given; the flags appear (as true) only when set."""
        positions = self.positions if isinstance(self.positions, str) else self.positions.to_record()
        record = {} if self.op == "add" else {"op": self.op}
        record[("sae" if self.op == "sae" else "vector")] = self.vector
        if self.op == "sae":
            record["feature"] = list(self.features)
        record.update({"layers": ALL_LAYERS if self.is_all_layers else list(self.layers)})
        if self.is_file_layers:
            del record["layers"]
        if self.value is not None:
            record["value"] = self.value
        elif self.bounds is not None:
            record["range"] = list(self.bounds)
        elif self.op != "clamp":
            record["coef"] = self.coef
        record["positions"] = positions
        record.update({name: True for name in NORM_FLAGS if getattr(self, name)})
        if self.when is not None:
            record["when"] = self.when.to_record()
        return record

    @classmethod
    def from_record(cls, value: dict) -> SteeringTerm:
        positions, op, layers = value["positions"], value.get("op", "add"), value.get("layers", FILE_LAYERS)
        bounds = value.get("range")
        return cls(value["sae" if op == "sae" else "vector"], () if layers == ALL_LAYERS else tuple(layers),
                   float(value.get("coef", 1.0)), positions if isinstance(positions, str) else
                   Ranges.from_record(positions), bool(value.get("normalize", False)),
                   bool(value.get("norm_match", False)), op, layers == ALL_LAYERS, tuple(value.get("feature", ())),
                   value.get("value"), None if bounds is None else tuple(bounds),
                   None if value.get("when") is None else Gate.from_record(value["when"]))


@dataclass(frozen=True, slots=True)
class SteeringSpec:
    """A request's steering: its terms (they add), and whether the user gave them as a list, so the spec is stated
    back as it was given (an object for one term given as an object, else a list)."""

    terms: tuple[SteeringTerm, ...]
    is_list: bool

    def __post_init__(self) -> None:
        if not self.terms or (not self.is_list and len(self.terms) != 1):
            raise ValueError(f"a SteeringSpec holds one term, or one or more with is_list=True; got "
                             f"{len(self.terms)} term(s) with is_list={self.is_list}")

    @property
    def is_file_layers(self) -> bool:
        """Whether a term of it steers the layers its vector file names."""
        return any(term.is_file_layers for term in self.terms)

    def with_layers(self, term_layers) -> SteeringSpec:
        """The spec with each term at its entry of `term_layers` (one layer list per term, as the engine core
        resolved them): how a result record states a spec whose terms left their layers to the file."""
        if len(term_layers) != len(self.terms):
            raise ValueError(f"with_layers: {len(term_layers)} layer lists for {len(self.terms)} term(s)")
        return SteeringSpec(tuple(term.with_layers(layers) for term, layers in zip(self.terms, term_layers)),
                            self.is_list)

    def to_record(self) -> dict | list[dict]:
        """A term's dict (one term given as an object) or a list of them."""
        records = [term.to_record() for term in self.terms]
        return records if self.is_list else records[0]

    @classmethod
    def from_record(cls, value: dict | list) -> SteeringSpec:
        """The spec of to_record()'s form (as it crosses a process), trusted: it was checked when parsed."""
        if isinstance(value, list):
            return cls(tuple(SteeringTerm.from_record(term) for term in value), True)
        return cls((SteeringTerm.from_record(value),), False)


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    """What a request captures: hidden states after `layers` (sorted, distinct, >= 0; may be empty with an SAE) at
    `positions` (one of CAPTURE_POSITIONS), and with `sae` the `top_k` largest feature activations of that SAE at the
    same positions, with their indices, at `sae_layer` (None: the layer the SAE's files name)."""

    layers: tuple[int, ...]
    positions: str
    sae: str | None = None
    top_k: int = 0
    sae_layer: int | None = None

    def to_record(self) -> dict:
        record = {"layers": list(self.layers), "positions": self.positions}
        if self.sae is not None:
            record.update({"sae": self.sae, "top_k": self.top_k})
            if self.sae_layer is not None:
                record["layer"] = self.sae_layer
        return record

    @classmethod
    def from_record(cls, value: dict) -> CaptureSpec:
        """The spec of to_record()'s form, trusted: it was checked when parsed."""
        return cls(tuple(value["layers"]), value["positions"], value.get("sae"), value.get("top_k", 0),
                   value.get("layer"))


def not_a_file(path: str | Path) -> str | None:
    """Why `path` cannot be read as a regular file, in words a user can act on; None if it can."""
    path = Path(path)
    if str(path) == "-":
        return "'-' (standard input) cannot be read twice; save it to a file first (e.g. cat > prompts.jsonl)"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return f"cannot look at it ({exc.strerror})"
    if stat.S_ISDIR(mode):
        return "is a directory; give a file inside it"
    if not stat.S_ISREG(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        return f"is {kind}, which cannot be read twice; save its contents to a regular file first"
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    return None


def parse_steering(value, where: str = "field 'steering'") -> SteeringSpec | None:
    """A steering spec as a record gives it -> a SteeringSpec of normalised terms (a list of terms, or one term
    object); None means unsteered. RecordError names the bad field.

    A term is {vector, layer(s) (default: the layers the file names), coef (default 1), positions (default
    "all")[, normalize][, norm_match]}.
    positions: "prompt", "generated", "all", or ranges {"prompt": R, "generated": R} (either key or both), R being
    one [start, end) or a list of them; end null (or left out) runs to the end (see Ranges).
    """
    if value is None:
        return None
    if isinstance(value, list):
        if not value:
            raise RecordError(f"{where} is an empty list; give one or more terms, or null for no steering")
        return SteeringSpec(tuple(_parse_term(term, f"{where}[{i}]") for i, term in enumerate(value)), True)
    return SteeringSpec((_parse_term(value, where),), False)


TERM_KEYS = {  # per op, the keys a term may have besides op, positions and when
    "add": {"vector", "layer", "layers", "coef", *NORM_FLAGS},
    "ablate": {"vector", "layer", "layers", "coef"},
    "clamp": {"vector", "layer", "layers", "value", "range"},
    "sae": {"sae", "feature", "layer", "layers", "value", "coef"},
}
TERM_EXAMPLE = {
    "add": '{"vector": "v.safetensors", "layers": [6], "coef": 4}',
    "ablate": '{"op": "ablate", "vector": "refusal.npy", "layers": "all"} ("coef": the fraction removed, default 1)',
    "clamp": '{"op": "clamp", "vector": "v.npy", "layers": [6], "value": 0} (or "range": [lo, hi])',
    "sae": '{"op": "sae", "sae": "layer_6/params.npz", "feature": 123, "value": 8} (or "coef": 4)',
}


def _parse_term(value, where: str) -> SteeringTerm:
    if not isinstance(value, dict):
        raise RecordError(f"{where} must be an object like {TERM_EXAMPLE['add']}, a list of such terms, or null")
    op = value.get("op", "add")
    if op not in OPS:
        raise RecordError(f"{where}.op is {shown(op)}; use one of {', '.join(OPS)} (add when left out)")
    unknown = set(value) - TERM_KEYS[op] - {"op", "positions", "when"}
    if unknown:
        raise RecordError(f"{where} has unknown key(s) {sorted(unknown)} for op {op}; it takes "
                          f"{', '.join(sorted(TERM_KEYS[op] - {'layer'}))}, positions, when: e.g. {TERM_EXAMPLE[op]}")
    path_key = "sae" if op == "sae" else "vector"
    vector = value.get(path_key)
    if not isinstance(vector, str) or not vector:
        raise RecordError(f"{where}.{path_key} must be a path to " + (
            "an SAE (params.npz, a folder of params.safetensors + config.json, a SAELens folder, or a .pt)"
            if op == "sae" else "a .safetensors, .pt, .npy or .gguf (control vector) file"))
    layers, is_all = _parse_layers(value, where, op)
    coef = _number(value, "coef", where, 1.0)
    positions = parse_positions(value.get("positions", "all"), f"{where}.positions")
    flags = {}
    for name in NORM_FLAGS:
        flags[name] = value.get(name, False)
        if not isinstance(flags[name], bool):
            raise RecordError(f"{where}.{name} is {shown(flags[name])}; use true or false")
    features, target, bounds = (), None, None
    if op == "clamp":
        target, bounds = _clamp_target(value, where)
    elif op == "sae":
        features = _features(value.get("feature"), where)
        if ("value" in value) == ("coef" in value):
            raise RecordError(f"{where}: give value (set the feature's activation to it) or coef (add coef times its "
                              f"decoder row), one of them")
        target = _number(value, "value", where, None)
    when = _parse_gate(value["when"], f"{where}.when", layers, op) if value.get("when") is not None else None
    return SteeringTerm(vector, layers, coef, positions, **flags, op=op, is_all_layers=is_all, features=features,
                        value=target, bounds=bounds, when=when)


def _parse_layers(value: dict, where: str, op: str) -> tuple[tuple[int, ...], bool]:
    """A term's layers (sorted, distinct; empty: the file's) and whether they are "all"."""
    layers = value.get("layers", value.get("layer", list(FILE_LAYERS)))
    if layers == ALL_LAYERS:
        return FILE_LAYERS, True
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, list) or (not layers and ("layers" in value or "layer" in value)) \
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise RecordError(f"{where}.layers must be a layer index, a non-empty list of them, \"all\""
                          + (", or left out for the layer the SAE's config names" if op == "sae" else
                             ", or left out to steer the layers the vector file names") + f"; got {shown(layers)}")
    return tuple(sorted(set(layers))), False


def _number(value: dict, name: str, where: str, default):
    """value[name] as a finite float within float32's range (default when left out)."""
    number = value.get(name, default)
    if number is default:
        return number
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not is_finite(number):
        raise RecordError(f"{where}.{name} must be a finite number, got {shown(number)}")
    if abs(number) > MAX_COEF:
        raise RecordError(f"{where}.{name} is {float(number):g}, beyond float32's range (|{name}| <= 3.4e38) in which "
                          f"steering is applied; use a smaller {name}")
    return float(number)


def _clamp_target(value: dict, where: str) -> tuple[float | None, tuple | None]:
    """A clamp's value, or its range [lo, hi] (either end null: open)."""
    if ("value" in value) == ("range" in value):
        raise RecordError(f"{where}: a clamp takes value (set the projection to it) or range [lo, hi] (clip it), "
                          f"one of them")
    if "value" in value:
        return _number(value, "value", where, None), None
    bounds = value["range"]
    if not isinstance(bounds, list) or len(bounds) != 2 or bounds == [None, None]:
        raise RecordError(f"{where}.range is {shown(bounds)}; give [lo, hi], either end null for open, e.g. [null, 2]")
    lo, hi = (None if b is None else _number({"range": b}, "range", where, None) for b in bounds)
    if lo is not None and hi is not None and lo > hi:
        raise RecordError(f"{where}.range is {shown(bounds)}; lo must not be above hi, e.g. {shown([hi, lo])}")
    return None, (lo, hi)


def _features(value, where: str) -> tuple[int, ...]:
    """An SAE term's feature index or list of them (distinct, in order given)."""
    features = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(features, list) or not features or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in features):
        raise RecordError(f"{where}.feature must be a feature index >= 0 or a non-empty list of them, got "
                          f"{shown(value)}")
    return tuple(dict.fromkeys(features))


def _parse_gate(value, where: str, layers: tuple[int, ...], op: str = "add") -> Gate:
    """A term's `when`: {"vector": PROBE, "layer": L, "above": t} (or "below"); L at or before the term's layers
    (before them for ablate, which acts inside its layers)."""
    example = '{"vector": "probe.npy", "layer": 4, "above": 0.5}'
    if not isinstance(value, dict) or set(value) - {"vector", "layer", "above", "below"}:
        raise RecordError(f"{where} is {shown(value)}; give {example} (or \"below\": t)")
    vector, layer = value.get("vector"), value.get("layer")
    if not isinstance(vector, str) or not vector:
        raise RecordError(f"{where}.vector must be the path of the probe vector, as in {example}")
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise RecordError(f"{where}.layer must be a layer index >= 0, got {shown(layer)}")
    if ("above" in value) == ("below" in value):
        raise RecordError(f"{where}: give above or below (the threshold on the projection), one of them")
    is_above = "above" in value
    threshold = _number(value, "above" if is_above else "below", where, None)
    if layers:
        gate_order_check(layer, layers[0], op, where)
    return Gate(vector, layer, threshold, is_above)


def gate_order_check(gate_layer: int, first: int, op: str, where: str) -> None:
    """RecordError unless a gate read at gate_layer's output comes before the gated term acts at layer `first`: at
    or before it, and strictly before for ablate (which acts at the layer's writes, inside it)."""
    if gate_layer > first or (op == "ablate" and gate_layer == first):
        raise RecordError(f"{where}.layer is {gate_layer}, " + (
            f"after the term's first layer {first}: a gate is read in the same forward, so its layer must be at or "
            "before the layers it gates" if gate_layer > first else
            f"the ablated layer {first} itself: ablation acts at the layer's writes, before its output is read; "
            "gate it by an earlier layer"))


def shown(value) -> str:
    return json.dumps(value, default=str)[:60]


def is_finite(number) -> bool:
    """math.isfinite that holds for integers too large for a float (they are finite, and refused elsewhere)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def parse_positions(value, where: str) -> str | Ranges:
    """A steering term's `positions`: prompt | generated | all, or {"prompt"/"generated": ranges} as Ranges."""
    if isinstance(value, str) and value in STEER_POSITIONS:
        return value
    if not isinstance(value, dict) or not value or set(value) - set(RANGE_KINDS):
        raise RecordError(f"{where} is {shown(value)}; use one of {', '.join(STEER_POSITIONS)}, or [start, end) "
                          f"ranges like {RANGE_EXAMPLE}")
    return Ranges(**{kind: _parse_ranges(value[kind], f"{where}.{kind}", kind) for kind in RANGE_KINDS
                     if kind in value})


def _parse_ranges(value, where: str, kind: str) -> tuple[Span, ...]:
    """One range or a list of them -> a tuple of (start, end) pairs."""
    if isinstance(value, list) and value and all(isinstance(r, list) for r in value):
        return tuple(_parse_range(r, f"{where}[{i}]", kind) for i, r in enumerate(value))
    return (_parse_range(value, where, kind),)


def _parse_range(value, where: str, kind: str) -> Span:
    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not (isinstance(value, list) and len(value) in (1, 2) and is_int(value[0])
            and (len(value) == 1 or value[1] is None or is_int(value[1]))):
        raise RecordError(f"{where} is {shown(value)}; give [start, end) as integers, end null (or left out) for "
                          f"\"to the end\", e.g. [0, 5], [2, null], or a list of ranges [[0, 5], [10, 12]]")
    start, end = value[0], value[1] if len(value) == 2 else None
    if kind == "generated" and (start < 0 or (end is not None and end < 0)):
        raise RecordError(f"{where} is {shown(value)}; generated positions count from the first generated token (0) "
                          f"and cannot be negative (only prompt positions count from the end)")
    if end is not None and start < 0 <= end:
        raise RecordError(f"{where} is {shown(value)}; a range with a negative start needs a negative or null end, "
                          f"e.g. [{start}, null] for the last {-start} token(s)")
    if end is not None and (start < 0) == (end < 0) and start >= end:
        fix = [end, start] if start > end else [start, start + 1 if start != -1 else None]
        raise RecordError(f"{where} is {shown(value)}; start must be below end (the range is [start, end)), "
                          f"e.g. {shown(fix)}")
    return start, end


CAPTURE_EXAMPLE = '{"layers": [4, 8], "positions": "last_prompt"} (positions optional)'
SAE_CAPTURE_EXAMPLE = '{"sae": "layer_6/params.npz", "top_k": 32, "positions": "generated"}'
DEFAULT_SAE_TOP_K = 32
MAX_SAE_TOP_K = 4096


def parse_capture(value, default: CaptureSpec | None) -> CaptureSpec | None:
    """A record's `capture` field -> a CaptureSpec (missing keys from the run's capture, `default`), or None for
    `false`/`null`."""
    if value is None or value is False:
        return None
    if not isinstance(value, dict) or set(value) - {"layers", "positions", "sae", "top_k", "layer"}:
        raise RecordError(f"field 'capture' is {json.dumps(value)[:80]}; give {CAPTURE_EXAMPLE}, with an SAE "
                          f"{SAE_CAPTURE_EXAMPLE}, or false for none")
    sae = value.get("sae")
    if "sae" in value and (not isinstance(sae, str) or not sae):
        raise RecordError(f"field 'capture.sae' is {shown(sae)}; give the path of an SAE (params.npz, a folder of "
                          "params.safetensors + config.json, a SAELens folder, or a .pt)")
    if sae is None and ("top_k" in value or "layer" in value):
        raise RecordError(f"field 'capture' gives {'top_k' if 'top_k' in value else 'layer'} without an SAE; "
                          f"top_k and layer go with \"sae\": {SAE_CAPTURE_EXAMPLE}")
    layers = [] if sae is not None and "layers" not in value else value.get(  # an SAE capture alone: no layers
        "layers", None if default is None else list(default.layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, list) or not (layers or sae is not None) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
        raise RecordError(f"field 'capture.layers' is {json.dumps(layers)}; give a layer index >= 0 or a non-empty "
                          "list")
    positions = value.get("positions", CAPTURE_POSITIONS[0] if default is None else default.positions)
    if positions not in CAPTURE_POSITIONS:
        raise RecordError(f"field 'capture.positions' is {json.dumps(positions)}; use one of "
                          f"{', '.join(CAPTURE_POSITIONS)}")
    top_k, sae_layer = value.get("top_k", DEFAULT_SAE_TOP_K), value.get("layer")
    if sae is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_SAE_TOP_K:
            raise RecordError(f"field 'capture.top_k' is {shown(top_k)}; give an integer 1..{MAX_SAE_TOP_K}, the "
                              "number of largest feature activations kept per position")
        if sae_layer is not None and (isinstance(sae_layer, bool) or not isinstance(sae_layer, int) or sae_layer < 0):
            raise RecordError(f"field 'capture.layer' is {shown(sae_layer)}; give the layer index >= 0 whose output "
                              "the SAE reads, or leave it out for the layer its files name")
    return CaptureSpec(tuple(sorted(set(layers))), positions, sae, top_k if sae is not None else 0, sae_layer)


def load_named_specs(path: str) -> dict[str, SteeringSpec]:
    """A TOML file of named steering specs: `[name]` tables with vector/layers/coef/positions (layers left out: the
    file's), or with `terms = [{...}, ...]`; records then say `"steering": "name"`. ValueError names the bad
    entry."""
    import tomllib

    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"--steering-specs {path}: cannot read it ({exc})") from None
    named = {}
    for name, body in table.items():
        where = f"--steering-specs {path}: [{name}]"
        if not isinstance(body, dict):
            raise ValueError(f"{where} must be a table of vector, layers, coef, positions (or terms = [...])")
        try:
            named[name] = parse_steering(body["terms"] if set(body) == {"terms"} else body, where)
        except RecordError as exc:
            raise ValueError(str(exc)) from None
    return named
