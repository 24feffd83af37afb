"""The OpenAI wire format of engine-serve: a request body -> the engine records it asks for, and results -> the
response objects (and streamed chunks) OpenAI clients read; a bad body is an ApiError naming its field.

Fields follow OpenAI's completions and chat completions APIs as researchers' harnesses send them; this engine's own
(`steering`, `capture`, `top_k`, `ignore_eos`) ride in the same body (a client passes them with `extra_body`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from engine.storage.files import JsonUnreadable, parse_json

# OpenAI's defaults where a body leaves a field out.
DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0
MAX_STOPS = 4
MAX_N = 128
MAX_LOGPROBS = 20

ENGINE_FIELDS = ("steering", "capture", "top_k", "ignore_eos", "adapter")
COMMON_FIELDS = ("model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options",
                 "user", "presence_penalty", "frequency_penalty", "logit_bias", *ENGINE_FIELDS)
COMPLETION_FIELDS = (*COMMON_FIELDS, "prompt", "echo", "suffix", "best_of", "logprobs")
CHAT_FIELDS = (*COMMON_FIELDS, "messages", "max_completion_tokens", "logprobs", "top_logprobs")


class ApiError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type, message, and the field it names."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One API request as the engine runs it: a record per choice (prompt x n), and how to answer."""

    kind: str  # "completion" | "chat"
    model: str
    records: list[dict]  # in choice order: prompt 0's n choices, then prompt 1's, ...
    prompts: list[str]  # the prompt text of each record (echo)
    stream: bool
    echo: bool = False
    include_usage: bool = False
    is_scoring: bool = False  # echo with max_tokens 0: one token is generated and dropped, the prompt is the answer
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def json_object(raw: bytes) -> dict:
    """A request body as a JSON object; ApiError 400 otherwise."""
    try:
        body = parse_json(raw)
    except JsonUnreadable as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body is a JSON {type(body).__name__}; send an object")
    return body


def parse_body(raw: bytes, kind: str, model_names: tuple[str, ...], adapters: tuple[str, ...] = ()) -> Job:
    """A request body -> its Job; ApiError (400, or 404 for an unknown model) naming the field that is wrong.
    `model` names the base model (model_names) or a loaded adapter (`adapters`), which then runs, as vLLM serves
    LoRA adapters; the body's own `adapter` may name one too."""
    body = json_object(raw)
    allowed = COMPLETION_FIELDS if kind == "completion" else CHAT_FIELDS
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(400, f"unknown field(s) {unknown}; this server reads {', '.join(allowed)}", unknown[0])
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "field 'model' is required: a string (GET /v1/models lists them)", "model")
    if model not in model_names and model not in adapters:
        raise ApiError(404, f"the model {model!r} does not exist here; this server serves "
                            f"{list(model_names) + list(adapters)}", "model", code="model_not_found")
    if model in adapters and body.get("adapter") not in (None, model):
        raise ApiError(400, f"'model' names adapter {model!r} and 'adapter' names {body['adapter']!r}; name one",
                       "adapter")
    _refuse_unsupported(body, kind)
    settings = _settings(body, kind)
    if model in adapters:
        settings["adapter"] = model
    n = _integer(body, "n", 1, 1, MAX_N)
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}):
        raise ApiError(400, "field 'stream_options' must be an object like {\"include_usage\": true}",
                       "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    if kind == "completion":
        prompts = _prompts(body)
        echo = _boolean(body, "echo", False)
        inputs = [{"prompt": p} for p in prompts]
    else:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "field 'messages' is required: a non-empty list of {\"role\", \"content\"} objects",
                           "messages")
        prompts, echo, inputs = [""], False, [{"messages": [_message(m, i) for i, m in enumerate(messages)]}]
    records, texts = [], []
    for text, given in zip(prompts, inputs):
        for choice in range(n):
            record = {**given, **settings, "max_new_tokens": max(1, settings["max_new_tokens"])}
            if "seed" in settings:  # choice i samples with seed + i, so n choices differ and each is reproducible
                record["seed"] = settings["seed"] + choice
            records.append(record)
            texts.append(text)
    return Job(kind, model, records, texts, stream, echo, include_usage, settings["max_new_tokens"] == 0)


def _settings(body: dict, kind: str) -> dict:
    """The engine record fields a body sets (sampling, stops, steering, capture), checked for type here; the engine's
    own record checks (ranges, vector files, capture layers) answer for the rest."""
    out: dict = {}
    name = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    scoring = kind == "completion" and body.get("echo") is True  # max_tokens 0: the prompt scored, nothing kept
    out["max_new_tokens"] = _integer(body, name, DEFAULT_MAX_TOKENS, 0 if scoring else 1, None)
    out["temperature"] = _number(body, "temperature", DEFAULT_TEMPERATURE)
    if "top_p" in body and body["top_p"] is not None:
        out["top_p"] = _number(body, "top_p", 1.0)
    if body.get("seed") is not None:
        out["seed"] = _integer(body, "seed", 0, 0, None)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)) or len(stops) > MAX_STOPS:
            raise ApiError(400, f"field 'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them",
                           "stop")
        out["stop"] = stops
    for name in ENGINE_FIELDS:
        if body.get(name) is not None:
            out[name] = body[name]
    logprobs = _logprobs(body, kind)
    if logprobs is not None:
        if body.get("echo") is True:
            if body.get("stream"):
                raise ApiError(400, "the prompt's log-probabilities (echo with logprobs) are not streamed: the "
                                    "prompt is scored with the whole answer; ask without 'stream'", "logprobs")
            out["prompt_logprobs"] = logprobs
        out["logprobs"] = logprobs
    return out


def _logprobs(body: dict, kind: str) -> int | None:
    """How many alternatives per token a body asks for (0: the chosen tokens' alone), None for no logprobs:
    completions' `logprobs: k`, chat's `logprobs: true` with `top_logprobs: k`."""
    if kind == "completion":
        return None if body.get("logprobs") is None else _integer(body, "logprobs", 0, 0, MAX_LOGPROBS)
    if not _boolean(body, "logprobs", False):
        if body.get("top_logprobs") is not None:
            raise ApiError(400, "field 'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return None
    return _integer(body, "top_logprobs", 0, 0, MAX_LOGPROBS)


def _refuse_unsupported(body: dict, kind: str) -> None:
    """Fields this server reads only at their neutral value: anything else is refused by name, not ignored."""
    neutral = {"presence_penalty": 0, "frequency_penalty": 0, "suffix": None}
    for name, value in neutral.items():
        if body.get(name, value) not in (value, None):
            raise ApiError(400, f"field '{name}' = {json.dumps(body[name])} is not supported by this server yet; "
                                f"leave it out", name)
    if body.get("logit_bias"):
        raise ApiError(400, "field 'logit_bias' is not supported by this server; leave it out", "logit_bias")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise ApiError(400, "field 'best_of' must equal 'n' (every choice is returned); leave it out", "best_of")


def _prompts(body: dict) -> list[str | list[int]]:
    """OpenAI's four prompt forms: a string, a list of strings, a list of token ids, a list of such lists (token
    ids run as they are: no BOS is added)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return prompt
        if _is_ids(prompt):
            return [prompt]
        if all(isinstance(p, list) and p and _is_ids(p) for p in prompt):
            return prompt
    raise ApiError(400, "field 'prompt' is required: a string, a list of strings, a list of token ids or a list of "
                        "such lists", "prompt")


def _is_ids(values: list) -> bool:
    return all(isinstance(i, int) and not isinstance(i, bool) for i in values)


def _message(m, i: int) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ApiError(400, f"messages[{i}] must be an object with a string 'role' and 'content'", "messages")
    content = m.get("content")
    if isinstance(content, list):  # OpenAI's content parts: text parts joined, anything else refused
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"messages[{i}].content holds non-text parts; this server runs text only",
                           "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string", "messages")
    return {"role": m["role"], "content": content}


def _integer(body: dict, name: str, default: int, low: int, high: int | None) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ApiError(400, f"field '{name}' is {json.dumps(value)[:40]}; it must be an integer {bounds}", name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"field '{name}' is {json.dumps(value)[:40]}; it must be a number", name)
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"field '{name}' is {json.dumps(value)[:40]}; it must be true or false", name)
    return value


# -- responses

def usage(results: list[dict]) -> dict:
    """OpenAI's usage of a job's results (each prompt's tokens counted once per choice, as OpenAI counts them)."""
    prompt = sum(r["num_prompt_tokens"] for r in results)
    completion = sum(r["num_completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def choice(job: Job, i: int, result: dict) -> dict:
    """Choice i of a finished job (non-streaming), with the engine's own fields: the steering it ran with and where
    its captured tensors are."""
    text = result["completion"]
    if job.kind == "completion":
        out = {"index": i, "text": job.prompts[i] + text if job.echo else text,
               "logprobs": completion_logprobs(result, job.echo), "finish_reason": result["finish_reason"]}
    else:
        out = {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": chat_logprobs(result),
               "finish_reason": result["finish_reason"]}
    return {**out, **engine_fields(result)}


def dropped_completion(result: dict) -> dict:
    """A scoring request's result without the one token it generated (max_tokens 0 with echo)."""
    out = {**result, "completion": "", "num_completion_tokens": 0, "finish_reason": "length"}
    for name in ("completion_logprobs", "token_texts", "top_texts", "completion_token_ids"):
        if name in out:
            out[name] = []
    return out


def completion_logprobs(result: dict, echo: bool = False) -> dict | None:
    """OpenAI completions' logprobs object: tokens, token_logprobs, top_logprobs (token -> log-probability, the
    most likely first) and text_offset, from a result record whose tokens the server has spelled (`token_texts`);
    with echo the prompt's tokens first, the first of them without a log-probability (nothing predicts it)."""
    if "completion_logprobs" not in result:
        return None
    texts, logprobs, tops = result["token_texts"], result["completion_logprobs"], result.get("top_texts")
    if echo:
        texts = result["prompt_texts"] + texts
        logprobs = [None, *result["prompt_logprobs"], *logprobs]
        if tops is not None:
            tops = [None, *result["prompt_top_texts"], *tops]
    return completion_logprobs_of(texts, logprobs, tops)


def completion_logprobs_of(texts: list[str], logprobs: list, tops: list | None, offset: int = 0) -> dict:
    """The completions logprobs object of these tokens (each's text, log-probability and [(text, log-probability),
    ...] alternatives), the first at character `offset` of the choice's text."""
    offsets = []
    for piece in texts:
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": texts, "token_logprobs": logprobs,
            "top_logprobs": None if tops is None else [None if step is None else dict(step) for step in tops],
            "text_offset": offsets}


def chat_logprobs(result: dict) -> dict | None:
    """OpenAI chat's logprobs object: per token its text, log-probability, UTF-8 bytes and top alternatives."""
    if "completion_logprobs" not in result:
        return None
    return chat_logprobs_of(result["token_texts"], result["completion_logprobs"], result.get("top_texts"))


def chat_logprobs_of(texts: list[str], logprobs: list[float], tops: list | None) -> dict:
    tops = tops or [[] for _ in texts]
    return {"content": [{"token": text, "logprob": lp, "bytes": list(text.encode()),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}
                        for text, lp, top in zip(texts, logprobs, tops)]}


def engine_fields(result: dict) -> dict:
    out = {}
    if result.get("steering") is not None:
        out["steering"] = result["steering"]
    if result.get("capture") is not None:
        out["capture"] = result["capture"]
    if result.get("adapter") is not None:
        out["adapter"] = result["adapter"]
    return out


def response(job: Job, results: list[dict]) -> dict:
    obj = "text_completion" if job.kind == "completion" else "chat.completion"
    prefix = "cmpl" if job.kind == "completion" else "chatcmpl"
    if job.is_scoring:  # the token generated to get there is not part of the answer
        results = [dropped_completion(r) for r in results]
    return {"id": f"{prefix}-{job.id}", "object": obj, "created": job.created, "model": job.model,
            "choices": [choice(job, i, r) for i, r in enumerate(results)], "usage": usage(results)}


def chunk(job: Job, i: int, text: str | None, finish_reason: str | None = None, first: bool = False,
          extra: dict | None = None, logprobs: dict | None = None) -> dict:
    """One streamed chunk of choice i: its new text (None: no text, as in a chat's role-only first chunk) and the
    logprobs object of the tokens that came with it (stream_logprobs)."""
    if job.kind == "completion":
        piece = {"index": i, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        obj, prefix = "text_completion", "cmpl"
    else:
        delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
        piece = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        obj, prefix = "chat.completion.chunk", "chatcmpl"
    return {"id": f"{prefix}-{job.id}", "object": obj, "created": job.created, "model": job.model,
            "choices": [{**piece, **(extra or {})}]}


def stream_logprobs(job: Job, texts: list[str], logprobs: list[float], tops: list | None, offset: int) -> dict:
    """A streamed chunk's logprobs object for the tokens it brings, in the job's kind's shape (completions: with
    text offsets from `offset`, the characters of token text the choice streamed before)."""
    if job.kind == "completion":
        return completion_logprobs_of(texts, logprobs, tops, offset)
    return chat_logprobs_of(texts, logprobs, tops)


def usage_chunk(job: Job, results: list[dict]) -> dict:
    obj, prefix = ("text_completion", "cmpl") if job.kind == "completion" else ("chat.completion.chunk", "chatcmpl")
    return {"id": f"{prefix}-{job.id}", "object": obj, "created": job.created, "model": job.model, "choices": [],
            "usage": usage(results)}
