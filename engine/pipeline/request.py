"""Input records: parsing and validating one JSONL line into a Request."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import msgpack

from engine.messages import CoreRequest, Feed, Result, TokenizeRequest, encode
from engine.storage.files import JsonUnreadable, parse_json
from engine.config import MAX_SEED, SamplingDefaults, check_sampling, check_seed, check_stop
from engine.specs import (CaptureSpec, RecordError, SteeringSpec, is_finite, load_named_specs,  # noqa: F401 - re-exported
                          not_a_file, parse_capture, parse_steering, shown)

KNOWN_FIELDS = {
    "id", "prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop",
    "ignore_eos", "steering", "capture", "logprobs", "prompt_logprobs", "adapter",
}
FIELD = "field '{}'"  # how messages about a record name its fields
MAX_LOGPROBS = 20  # alternatives per token a record may ask for (OpenAI's limit)


@dataclass(slots=True)
class Request:
    """One prompt to generate from, with its resolved settings; what travels is its to_wire()."""

    index: int
    line: int
    id: str
    prompt: str | list[int] | None  # text, or token ids
    messages: list | None
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: list[str]
    ignore_eos: bool
    steering: SteeringSpec | None
    extra: dict = field(default_factory=dict)
    steering_name: str | None = None  # the named spec the record asked for, if any
    capture: CaptureSpec | None = None  # None: no activations
    digest: str | None = None  # record_digest of the input record, when its output keeps one
    stream: bool = False  # the core sends its tokens as they are sampled (engine-serve's streaming responses)
    logprobs: int = -1  # the record's `logprobs` (k alternatives per token); -1: none asked
    prompt_logprobs: int = -1  # the record's `prompt_logprobs`, likewise for its prompt's tokens
    adapter: str | None = None  # the LoRA adapter it runs with (None: the base model)
    adapter_index: int = 0  # that adapter's index in the engine core (engine.adapters.adapter_names order + 1)

    def to_wire(self) -> TokenizeRequest:
        """What the worker processes need of it; pass-through fields and the id stay with the parent."""
        core = CoreRequest(self.index, self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed,
                           self.ignore_eos, self.stop, self.steering, self.capture, self.stream, self.logprobs,
                           self.prompt_logprobs, self.adapter_index)
        return TokenizeRequest(self.prompt, self.messages, core)

    def result_record(self, result: Result) -> dict:
        """The output record for this request's result: its id, completion and counts, the settings that made it,
        then the input's pass-through fields. Its `steering` names the layers each term steered, those of its
        vector file where the record left them out (as the engine core read them: SteeringTerm says why)."""
        steering = self.steering
        if steering is not None and result.steering_layers is not None:
            steering = steering.with_layers(result.steering_layers)
        record = {"id": self.id, "completion": result.completion, "finish_reason": result.finish_reason,
                  "num_prompt_tokens": result.num_prompt_tokens,
                  "num_completion_tokens": result.num_completion_tokens, "seed": self.seed,
                  "steering": None if steering is None else steering.to_record()}
        if self.steering_name is not None:
            record["steering_name"] = self.steering_name
        if self.adapter is not None:
            record["adapter"] = self.adapter
        if result.completion_token_ids is not None:
            record["completion_token_ids"] = result.completion_token_ids
        if result.logprobs is not None:
            record["completion_logprobs"] = result.logprobs
            if result.top_logprobs is not None:
                record["completion_top_logprobs"] = result.top_logprobs
        if result.prompt is not None:
            record["prompt_token_ids"] = result.prompt["ids"]
            record["prompt_logprobs"] = result.prompt["logprobs"]
            if "top_logprobs" in result.prompt:
                record["prompt_top_logprobs"] = result.prompt["top_logprobs"]
        if self.digest is not None:
            record["input_digest"] = self.digest
        record.update(self.extra)
        return record

    def check_wire(self) -> None:
        """RecordError naming the field if msgpack cannot carry the request (an integer outside 64 bits, say)."""
        try:
            encode(Feed([self.to_wire()]))
            return
        except (OverflowError, ValueError, TypeError, UnicodeEncodeError):
            pass
        for name in WIRE_FIELDS:
            value = getattr(self, name)
            try:
                msgpack.packb(value.to_record() if name in ("steering", "capture") and value else value,
                              use_bin_type=True)
            except (OverflowError, ValueError, TypeError, UnicodeEncodeError) as exc:
                raise RecordError(f"field '{name}' holds a value the engine cannot carry ({type(exc).__name__}: "
                                  f"{exc}); integers must lie in [-2^63, 2^63), text must be valid Unicode") from None


# The request fields the tokenizer workers and the engine core read (Request.to_wire).
WIRE_FIELDS = ("index", "prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop",
               "ignore_eos", "steering", "capture", "logprobs", "prompt_logprobs", "adapter_index")
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
        obj = parse_json(text)
    except JsonUnreadable as exc:
        raise RecordError(f"line {line} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RecordError(f"line {line} is a JSON {type(obj).__name__}, expected an object with a 'prompt' or "
                          "'messages'")
    return obj


def check_text(raw: bytes, obj: dict) -> None:
    """RecordError naming the first string of a decoded line that is not Unicode text (a lone surrogate)."""
    if _SURROGATE_ESCAPE.search(raw):  # only a \uD800-\uDFFF escape can make such a string: the common case is free
        _check_text(obj, "")


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


def _typed(obj: dict, name: str, kinds: tuple, label: str):
    value = obj[name]
    if isinstance(value, bool) and bool not in kinds:
        raise RecordError(f"field '{name}' is {value!r}; it must be {label}")
    if not isinstance(value, kinds):
        raise RecordError(f"field '{name}' is {json.dumps(value)[:60]}; it must be {label}")
    if isinstance(value, (int, float)) and float in kinds and not is_finite(value):
        raise RecordError(f"field '{name}' is {shown(value)}; it must be a finite number")
    return value


def _get(obj: dict, name: str, default, kinds: tuple, label: str):
    return _typed(obj, name, kinds, label) if name in obj else default


def _prompt(obj: dict) -> str | list[int]:
    """A record's prompt: text, or a non-empty list of token ids (run as they are: no BOS is added)."""
    prompt = obj["prompt"]
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        return prompt
    return _typed(obj, "prompt", (str,), "a string or a non-empty list of token ids")


def _messages(obj: dict) -> list:
    messages = obj["messages"]
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    if not ok:
        for i, m in enumerate(messages if isinstance(messages, list) else []):
            parts = m.get("content") if isinstance(m, dict) else None
            if isinstance(parts, list) and any(isinstance(x, dict) and x.get("type") != "text" for x in parts):
                kinds = sorted({str(x.get("type")) for x in parts if isinstance(x, dict) and x.get("type") != "text"})
                raise RecordError(f"messages[{i}] holds {', '.join(kinds)} content; the engine runs text only (a "
                                  f"multimodal checkpoint runs its language model): give each content as a string")
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


def _record_steering(obj: dict, default: SteeringSpec | None, named: dict[str, SteeringSpec]
                     ) -> tuple[SteeringSpec | None, str | None]:
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


def _record_adapter(obj: dict, adapters: dict[str, int]) -> tuple[str | None, int]:
    """(the adapter a record names, its index): (None, 0), the base model, where it names none or null."""
    name = obj.get("adapter")
    if name is None:
        return None, 0
    if not isinstance(name, str):
        raise RecordError(f"field 'adapter' is {json.dumps(name)[:60]}; give the name of a loaded adapter, or null "
                          f"for the base model")
    if name not in adapters:
        known = ", ".join(sorted(adapters)) if adapters else "none: start the engine with --adapter NAME=DIR"
        raise RecordError(f"field 'adapter' names {name[:60]!r}, which is not a loaded adapter (loaded: {known})")
    return name, adapters[name]


def parse_record(obj: dict, index: int, line: int, defaults: SamplingDefaults, steering: SteeringSpec | None,
                 named: dict[str, SteeringSpec] | None = None, capture: CaptureSpec | None = None,
                 adapters: dict[str, int] | None = None) -> Request:
    """A decoded JSON object -> Request with defaults filled in (`steering`, `capture`: the run's, for records that
    do not say; `named`: the --steering-specs; `adapters`: the loaded adapters' indices by name); RecordError on any
    bad field."""
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise RecordError("a record needs exactly one of 'prompt' (string) or 'messages' (chat list)")
    prompt = _prompt(obj) if has_prompt else None
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
    adapter, adapter_index = _record_adapter(obj, adapters or {})
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
        logprobs=_logprobs(obj, "logprobs", "generated"),
        prompt_logprobs=_logprobs(obj, "prompt_logprobs", "prompt"),
        adapter=adapter,
        adapter_index=adapter_index,
    )


def _logprobs(obj: dict, name: str, whose: str) -> int:
    """A record's `logprobs` / `prompt_logprobs`: absent, null or false: none; true: each token's; k: and the top
    k alternatives."""
    value = obj.get(name)
    if value is None or value is False:
        return -1
    if value is True:
        return 0
    if not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise RecordError(f"field '{name}' is {json.dumps(value)[:40]}; give true (each {whose} token's "
                          f"log-probability) or an integer in [0, {MAX_LOGPROBS}] (and that many alternatives)")
    return value
