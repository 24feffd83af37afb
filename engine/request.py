"""Input records: parsing and validating one JSONL line into a Request."""

from __future__ import annotations

import hashlib
import json
import math
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from engine.config import (CAPTURE_POSITIONS, MAX_SEED, STEER_POSITIONS, SamplingDefaults, check_sampling, check_seed,
                           check_stop)

KNOWN_FIELDS = {
    "id", "prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop",
    "ignore_eos", "steering", "capture",
}
FIELD = "field '{}'"  # how messages about a record name its fields
MAX_COEF = float(3.4028234663852886e38)  # float32's largest: a coefficient beyond it cannot be applied
RANGE_KINDS = ("prompt", "generated")
RANGE_EXAMPLE = '{"prompt": [-1, null]} (the last prompt token) or {"generated": [0, 20]}'
NORM_FLAGS = ("normalize", "norm_match")


class RecordError(ValueError):
    """A record cannot run; the message says which field and why."""


@dataclass(slots=True)
class Request:
    """One prompt to generate from, with its resolved settings; travels as a msgpack dict."""

    index: int
    line: int
    id: str
    prompt: str | None
    messages: list | None
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: list[str]
    ignore_eos: bool
    steering: dict | list | None
    extra: dict = field(default_factory=dict)
    steering_name: str | None = None  # the named spec the record asked for, if any
    capture: dict | None = None  # {"layers": [...], "positions": ...} or None: no activations
    digest: str | None = None  # record_digest of the input record, when its output keeps one

    def to_msg(self) -> dict:
        """What the worker processes need of it; pass-through fields and the id stay with the parent."""
        return {name: getattr(self, name) for name in WIRE_FIELDS}

    def check_wire(self) -> None:
        """RecordError naming the field if msgpack cannot carry the request (an integer outside 64 bits, say)."""
        try:
            msgpack.packb(self.to_msg(), use_bin_type=True)
            return
        except (OverflowError, ValueError, TypeError, UnicodeEncodeError):
            pass
        for name in WIRE_FIELDS:
            try:
                msgpack.packb(getattr(self, name), use_bin_type=True)
            except (OverflowError, ValueError, TypeError, UnicodeEncodeError) as exc:
                raise RecordError(f"field '{name}' holds a value the engine cannot carry ({type(exc).__name__}: "
                                  f"{exc}); integers must lie in [-2^63, 2^63), text must be valid Unicode") from None


# The request fields the tokenizer workers and the engine core read.
WIRE_FIELDS = ("index", "prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop",
               "ignore_eos", "steering", "capture")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def derive_seed(base_seed: int, request_id: str) -> int:
    """A stable per-request seed, so an unseeded record is still reproducible."""
    digest = hashlib.blake2b(f"{base_seed}:{request_id}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def decode_line(raw: bytes, line: int) -> dict:
    """Bytes of one input line -> the JSON object, or RecordError naming the problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(f"line {line} is not valid UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start})") \
            from None
    if line == 1:
        text = text.removeprefix("\ufeff")  # the byte-order mark some editors put at the start of a file
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise RecordError(f"line {line} is not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecordError as exc:
        raise RecordError(f"line {line}: {exc}") from None
    if not isinstance(obj, dict):
        raise RecordError(f"line {line} is a JSON {type(obj).__name__}, expected an object with a 'prompt' or "
                          "'messages'")
    return obj


def check_text(raw: bytes, obj: dict) -> None:
    """RecordError naming the first string of a decoded line that is not Unicode text (a lone surrogate)."""
    if _SURROGATE_ESCAPE.search(raw):  # only a \uD800-\uDFFF escape can make such a string: the common case is free
        _check_text(obj, "")


def _no_constant(name: str):
    raise RecordError(f"{name} is not a JSON number (the JSON standard has no NaN or Infinity); write a number, "
                      f"null or a string")


def _check_text(value, where: str) -> None:
    """RecordError naming the first string (or key) holding a lone surrogate: it is not text and cannot be
    tokenized or written as UTF-8."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        path = f"{where}.{key}" if isinstance(key, str) and where else f"{where}[{key}]" if where else str(key)
        for text in (key, item):
            if isinstance(text, str) and not is_unicode(text):
                bad = next(ch for ch in text if 0xD800 <= ord(ch) <= 0xDFFF)
                raise RecordError(f"field '{path}' holds a lone surrogate (\\u{ord(bad):04x}), which is not "
                                  f"Unicode text; fix the encoding of the input (a surrogate must come in a pair)")
        _check_text(item, path)


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def record_digest(obj) -> str:
    """A record's content as 16 hex digits (keys sorted; ids and pass-through fields included): a resume compares it
    with the digest its result was written with, so an edited input is noticed."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def record_id(obj: dict, line: int) -> str:
    """The id a record runs under: its own `id` if it is a string, else its line number."""
    value = obj.get("id")
    return value if isinstance(value, str) else str(line)


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


def _typed(obj: dict, name: str, kinds: tuple, label: str):
    value = obj[name]
    if isinstance(value, bool) and bool not in kinds:
        raise RecordError(f"field '{name}' is {value!r}; it must be {label}")
    if not isinstance(value, kinds):
        raise RecordError(f"field '{name}' is {json.dumps(value)[:60]}; it must be {label}")
    if isinstance(value, (int, float)) and float in kinds and not _is_finite(value):
        raise RecordError(f"field '{name}' is {_shown(value)}; it must be a finite number")
    return value


def _get(obj: dict, name: str, default, kinds: tuple, label: str):
    return _typed(obj, name, kinds, label) if name in obj else default


def parse_steering(value, where: str = "field 'steering'") -> dict | list | None:
    """A steering spec -> one normalised term {vector, layers, coef, positions[, normalize][, norm_match]}, or a
    list of them (they add); None means unsteered.

    positions: "prompt", "generated", "all", or ranges {"prompt": R, "generated": R} (either key or both), R being
    one [start, end) or a list of them; end null (or left out) runs to the end. Prompt bounds read as Python slices
    of the prompt tokens (-1 is the last one); generated bounds count from the first generated token (0). Ranges come
    back as lists of [start, end] pairs. normalize / norm_match appear (as true) only when set.
    """
    if value is None:
        return None
    if isinstance(value, list):
        if not value:
            raise RecordError(f"{where} is an empty list; give one or more terms, or null for no steering")
        return [_parse_term(term, f"{where}[{i}]") for i, term in enumerate(value)]
    return _parse_term(value, where)


def steering_terms(spec: dict | list | None) -> list[dict]:
    """A parsed spec as a list of terms."""
    return [] if spec is None else spec if isinstance(spec, list) else [spec]


def _parse_term(value, where: str) -> dict:
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
    layers = value.get("layers", value.get("layer"))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, list) or not layers \
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise RecordError(f"{where}.layers must be a layer index or a non-empty list of them, got {json.dumps(layers)}")
    coef = value.get("coef", 1.0)
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not _is_finite(coef):
        raise RecordError(f"{where}.coef must be a finite number, got {_shown(coef)}")
    if abs(coef) > MAX_COEF:
        raise RecordError(f"{where}.coef is {float(coef):g}, beyond float32's range (|coef| <= 3.4e38) in which "
                          f"steering is applied; use a smaller coefficient")
    positions = parse_positions(value.get("positions", "all"), f"{where}.positions")
    term = {"vector": vector, "layers": sorted(set(layers)), "coef": float(coef), "positions": positions}
    for name in NORM_FLAGS:
        flag = value.get(name, False)
        if not isinstance(flag, bool):
            raise RecordError(f"{where}.{name} is {_shown(flag)}; use true or false")
        if flag:
            term[name] = True
    return term


def _shown(value) -> str:
    return json.dumps(value, default=str)[:60]


def _is_finite(number) -> bool:
    """math.isfinite that holds for integers too large for a float (they are finite, and refused elsewhere)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def parse_positions(value, where: str) -> str | dict:
    """A steering term's `positions`: prompt | generated | all, or {"prompt"/"generated": ranges} normalised."""
    if isinstance(value, str) and value in STEER_POSITIONS:
        return value
    if not isinstance(value, dict) or not value or set(value) - set(RANGE_KINDS):
        raise RecordError(f"{where} is {_shown(value)}; use one of {', '.join(STEER_POSITIONS)}, or [start, end) "
                          f"ranges like {RANGE_EXAMPLE}")
    return {kind: _parse_ranges(value[kind], f"{where}.{kind}", kind) for kind in RANGE_KINDS if kind in value}


def _parse_ranges(value, where: str, kind: str) -> list[list]:
    """One range or a list of them -> a list of [start, end] pairs."""
    if isinstance(value, list) and value and all(isinstance(r, list) for r in value):
        return [_parse_range(r, f"{where}[{i}]", kind) for i, r in enumerate(value)]
    return [_parse_range(value, where, kind)]


def _parse_range(value, where: str, kind: str) -> list:
    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not (isinstance(value, list) and len(value) in (1, 2) and is_int(value[0])
            and (len(value) == 1 or value[1] is None or is_int(value[1]))):
        raise RecordError(f"{where} is {_shown(value)}; give [start, end) as integers, end null (or left out) for "
                          f"\"to the end\", e.g. [0, 5], [2, null], or a list of ranges [[0, 5], [10, 12]]")
    start, end = value[0], value[1] if len(value) == 2 else None
    if kind == "generated" and (start < 0 or (end is not None and end < 0)):
        raise RecordError(f"{where} is {_shown(value)}; generated positions count from the first generated token (0) "
                          f"and cannot be negative (only prompt positions count from the end)")
    if end is not None and start < 0 <= end:
        raise RecordError(f"{where} is {_shown(value)}; a range with a negative start needs a negative or null end, "
                          f"e.g. [{start}, null] for the last {-start} token(s)")
    if end is not None and (start < 0) == (end < 0) and start >= end:
        fix = [end, start] if start > end else [start, start + 1 if start != -1 else None]
        raise RecordError(f"{where} is {_shown(value)}; start must be below end (the range is [start, end)), "
                          f"e.g. {_shown(fix)}")
    return [start, end]


def parse_capture(value, default: dict | None) -> dict | None:
    """A record's `capture` field -> {"layers", "positions"} (missing keys from the run's capture), or None for
    `false`/`null`."""
    if value is None or value is False:
        return None
    if not isinstance(value, dict) or set(value) - {"layers", "positions"}:
        raise RecordError(f"field 'capture' is {json.dumps(value)[:80]}; give {{\"layers\": [4, 8], \"positions\": "
                          f"\"last_prompt\"}} (positions optional), or false for none")
    default = default or {}
    layers = value.get("layers", default.get("layers"))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, list) or not layers or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
        raise RecordError(f"field 'capture.layers' is {json.dumps(layers)}; give a layer index >= 0 or a non-empty "
                          "list")
    positions = value.get("positions", default.get("positions", CAPTURE_POSITIONS[0]))
    if positions not in CAPTURE_POSITIONS:
        raise RecordError(f"field 'capture.positions' is {json.dumps(positions)}; use one of "
                          f"{', '.join(CAPTURE_POSITIONS)}")
    return {"layers": sorted(set(layers)), "positions": positions}


def _messages(obj: dict) -> list:
    messages = obj["messages"]
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    if not ok:
        raise RecordError("field 'messages' must be a non-empty list of {\"role\": str, \"content\": str} objects")
    return messages


def _stop(obj: dict) -> list[str] | None:
    if "stop" not in obj:
        return None
    stop = obj["stop"]
    if isinstance(stop, str):
        stop = [stop]
    check_stop(stop, RecordError, FIELD)
    return stop


def load_named_specs(path: str) -> dict[str, dict | list]:
    """A TOML file of named steering specs: `[name]` tables with vector/layers/coef/positions, or with
    `terms = [{...}, ...]`; records then say `"steering": "name"`. ValueError names the bad entry."""
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


def _record_steering(obj: dict, default, named: dict) -> tuple[dict | list | None, str | None]:
    """(the spec a record runs with, the name it used if any)."""
    if "steering" not in obj:
        return default, None
    value = obj["steering"]
    if not isinstance(value, str):
        return parse_steering(value), None
    if value not in named:
        known = ", ".join(sorted(named)) if named else "none: pass --steering-specs FILE"
        raise RecordError(f"field 'steering' names {value!r}, which is not a named spec (known: {known})")
    return named[value], value


def parse_record(obj: dict, index: int, line: int, defaults: SamplingDefaults, steering: dict | None,
                 named: dict | None = None, capture: dict | None = None) -> Request:
    """A decoded JSON object -> Request with defaults filled in; RecordError on any bad field."""
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise RecordError("a record needs exactly one of 'prompt' (string) or 'messages' (chat list)")
    prompt = _typed(obj, "prompt", (str,), "a string") if has_prompt else None
    messages = _messages(obj) if has_messages else None
    request_id = _get(obj, "id", str(line), (str,), "a string")
    if not request_id:
        raise RecordError("field 'id' is empty; give a non-empty string or leave it out")
    max_new_tokens = _get(obj, "max_new_tokens", defaults.max_new_tokens, (int,), "an integer >= 1")
    temperature = float(_get(obj, "temperature", defaults.temperature, (int, float), "a number >= 0"))
    top_p = float(_get(obj, "top_p", defaults.top_p, (int, float), "a number in (0, 1]"))
    top_k = _get(obj, "top_k", defaults.top_k, (int,), "an integer >= 0")
    check_sampling(max_new_tokens, temperature, top_p, top_k, RecordError, FIELD)
    seed = _get(obj, "seed", None, (int,), f"an integer in [0, {MAX_SEED}]")
    if seed is not None:
        check_seed(seed, RecordError, FIELD)
    stop = _stop(obj)
    spec, spec_name = _record_steering(obj, steering, named or {})
    return Request(
        index=index,
        line=line,
        id=request_id,
        prompt=prompt,
        messages=messages,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=derive_seed(defaults.seed, request_id) if seed is None else seed,
        stop=list(defaults.stop) if stop is None else stop,
        ignore_eos=_get(obj, "ignore_eos", defaults.ignore_eos, (bool,), "true or false"),
        steering=spec,
        extra={k: v for k, v in obj.items() if k not in KNOWN_FIELDS},
        steering_name=spec_name,
        capture=parse_capture(obj["capture"], capture) if "capture" in obj else capture,
    )
