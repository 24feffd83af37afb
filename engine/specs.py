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

    vector: str
    layers: tuple[int, ...]
    coef: float
    positions: str | Ranges
    normalize: bool = False
    norm_match: bool = False

    @property
    def is_file_layers(self) -> bool:
        """Whether the term steers the layers its vector file names (its layers were left out)."""
        return not self.layers

    def with_layers(self, layers) -> SteeringTerm:
        """This term at `layers` (sorted, distinct): a term of the file's layers once they are known."""
        return replace(self, layers=tuple(sorted(set(layers))))

    def to_record(self) -> dict:
        """{vector[, layers], coef, positions[, normalize][, norm_match]}: `layers` left out for the file's layers,
        as it was given; the flags appear (as true) only when set."""
        positions = self.positions if isinstance(self.positions, str) else self.positions.to_record()
        record = {"vector": self.vector, "layers": list(self.layers), "coef": self.coef, "positions": positions}
        if self.is_file_layers:
            del record["layers"]
        record.update({name: True for name in NORM_FLAGS if getattr(self, name)})
        return record

    @classmethod
    def from_record(cls, value: dict) -> SteeringTerm:
        positions = value["positions"]
        return cls(value["vector"], tuple(value.get("layers", FILE_LAYERS)), float(value["coef"]),
                   positions if isinstance(positions, str) else Ranges.from_record(positions),
                   bool(value.get("normalize", False)), bool(value.get("norm_match", False)))


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
    """What a request captures: hidden states after `layers` (sorted, distinct, >= 0) at `positions` (one of
    CAPTURE_POSITIONS)."""

    layers: tuple[int, ...]
    positions: str

    def to_record(self) -> dict:
        return {"layers": list(self.layers), "positions": self.positions}

    @classmethod
    def from_record(cls, value: dict) -> CaptureSpec:
        """The spec of to_record()'s form, trusted: it was checked when parsed."""
        return cls(tuple(value["layers"]), value["positions"])


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


def _parse_term(value, where: str) -> SteeringTerm:
    if not isinstance(value, dict):
        raise RecordError(f"{where} must be an object like "
                          "{\"vector\": \"v.safetensors\", \"layers\": [6], \"coef\": 4}, "
                          f"a list of such terms, or null")
    unknown = set(value) - {"vector", "layer", "layers", "coef", "positions", *NORM_FLAGS}
    if unknown:
        raise RecordError(f"{where} has unknown key(s) {sorted(unknown)}; use vector, layers, coef, positions, "
                          f"normalize, norm_match")
    vector = value.get("vector")
    if not isinstance(vector, str) or not vector:
        raise RecordError(f"{where}.vector must be a path to a .safetensors, .pt, .npy or .gguf (control vector) file")
    layers = value.get("layers", value.get("layer", list(FILE_LAYERS)))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, list) or (not layers and ("layers" in value or "layer" in value)) \
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise RecordError(f"{where}.layers must be a layer index or a non-empty list of them, or left out to steer "
                          f"the layers the vector file names; got {shown(layers)}")
    coef = value.get("coef", 1.0)
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not is_finite(coef):
        raise RecordError(f"{where}.coef must be a finite number, got {shown(coef)}")
    if abs(coef) > MAX_COEF:
        raise RecordError(f"{where}.coef is {float(coef):g}, beyond float32's range (|coef| <= 3.4e38) in which "
                          f"steering is applied; use a smaller coefficient")
    positions = parse_positions(value.get("positions", "all"), f"{where}.positions")
    flags = {}
    for name in NORM_FLAGS:
        flags[name] = value.get(name, False)
        if not isinstance(flags[name], bool):
            raise RecordError(f"{where}.{name} is {shown(flags[name])}; use true or false")
    return SteeringTerm(vector, tuple(sorted(set(layers))), float(coef), positions, **flags)


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


def parse_capture(value, default: CaptureSpec | None) -> CaptureSpec | None:
    """A record's `capture` field -> a CaptureSpec (missing keys from the run's capture, `default`), or None for
    `false`/`null`."""
    if value is None or value is False:
        return None
    if not isinstance(value, dict) or set(value) - {"layers", "positions"}:
        raise RecordError(f"field 'capture' is {json.dumps(value)[:80]}; give {{\"layers\": [4, 8], \"positions\": "
                          f"\"last_prompt\"}} (positions optional), or false for none")
    layers = value.get("layers", None if default is None else list(default.layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, list) or not layers or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
        raise RecordError(f"field 'capture.layers' is {json.dumps(layers)}; give a layer index >= 0 or a non-empty "
                          "list")
    positions = value.get("positions", CAPTURE_POSITIONS[0] if default is None else default.positions)
    if positions not in CAPTURE_POSITIONS:
        raise RecordError(f"field 'capture.positions' is {json.dumps(positions)}; use one of "
                          f"{', '.join(CAPTURE_POSITIONS)}")
    return CaptureSpec(tuple(sorted(set(layers))), positions)


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
