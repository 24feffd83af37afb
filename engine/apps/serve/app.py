"""The ASGI app of engine-serve (Starlette): OpenAI's completions, chat completions and models routes, a health
check, and the playground page; every refusal in OpenAI's error shape, naming the field."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.apps.serve.hub import EngineHub, Event, Submitted, refusal
from engine.apps.serve.protocol import (ApiError, Job, chunk, json_object, parse_body, response, stream_logprobs,
                                        usage_chunk)
from engine.vectors import VECTOR_SUFFIXES

PLAYGROUND = Path(__file__).with_name("playground.html")


@dataclass
class ServeSettings:
    model_name: str  # the name clients pass as `model`
    api_key: str | None = None  # when set, /v1 routes need `Authorization: Bearer <key>`
    max_request_bytes: int = 1 << 20
    vectors_dir: str | None = None  # the playground's vector picker lists the vector files under it


def create_app(hub: EngineHub, settings: ServeSettings) -> Starlette:
    started = int(time.time())
    names = (settings.model_name,)
    adapters = tuple(hub.adapters)  # each loaded adapter is a model too, as vLLM serves LoRA adapters

    async def completions(request: Request) -> Response:
        return await _generate(request, "completion")

    async def chat(request: Request) -> Response:
        return await _generate(request, "chat")

    async def _generate(request: Request, kind: str) -> Response:
        _authorize(request, settings.api_key)
        job = parse_body(await _body(request, settings.max_request_bytes), kind, names, adapters)
        submitted = await hub.submit(job)
        if not job.stream:
            return JSONResponse(response(job, await _results(hub, submitted, request)))
        try:
            first = await submitted.queue.get()  # a record the engine refuses fails before any text: still a 4xx
        except BaseException:
            hub.abandon(submitted)  # the client went away before the first token
            raise
        if first.error is not None:
            hub.abandon(submitted)
            raise _engine_refusal(first.error)
        return StreamingResponse(_stream(hub, job, submitted, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def models(request: Request) -> Response:
        _authorize(request, settings.api_key)
        base = [{"id": name, "object": "model", "created": started, "owned_by": "steer-engine", "root": name,
                 "parent": None} for name in names]
        loras = [{"id": name, "object": "model", "created": started, "owned_by": "steer-engine",
                  "root": hub.engine.config.adapters[name], "parent": settings.model_name} for name in adapters]
        return JSONResponse({"object": "list", "data": base + loras})

    async def health(request: Request) -> Response:
        engine = hub.engine
        body = {"status": "ok" if hub.error is None else "stopped", "model": settings.model_name,
                "device": engine.device, "dtype": engine.dtype, "running": hub.num_running}
        if hub.error is not None:
            body["error"] = hub.error
        return JSONResponse(body, status_code=200 if hub.error is None else 503)

    async def playground(request: Request) -> Response:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    async def vectors(request: Request) -> Response:
        _authorize(request, settings.api_key)
        found = []
        if settings.vectors_dir:
            root = Path(settings.vectors_dir)
            found = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.name.endswith(VECTOR_SUFFIXES))
        return JSONResponse({"model": settings.model_name, "num_layers": hub.num_layers, "vectors": found,
                             "adapters": list(adapters), "needs_key": settings.api_key is not None})

    async def tokenize(request: Request) -> Response:
        """vLLM's /tokenize: {"prompt", "add_special_tokens"?} -> {"tokens", "count", "max_model_len"} (what
        lm-evaluation-harness' remote tokenizer reads, so a harness tokenizes as the server does)."""
        _authorize(request, settings.api_key)
        body = json_object(await _body(request, settings.max_request_bytes))
        text, special = body.get("prompt"), body.get("add_special_tokens", True)
        if not isinstance(text, str) or not isinstance(special, bool):
            raise ApiError(400, "give {\"prompt\": text, \"add_special_tokens\": true|false}", "prompt")
        ids = await asyncio.to_thread(lambda: hub.encoder.encode(text, add_special_tokens=special))
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": hub.engine.max_model_len})

    async def detokenize(request: Request) -> Response:
        _authorize(request, settings.api_key)
        ids = json_object(await _body(request, settings.max_request_bytes)).get("tokens")
        if not (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
            raise ApiError(400, "give {\"tokens\": [token ids]}", "tokens")
        bad = [i for i in ids if not 0 <= i < len(hub.encoder)]
        if bad:
            raise ApiError(400, f"token ids outside the vocabulary [0, {len(hub.encoder)}): {bad[:5]}", "tokens")
        return JSONResponse({"prompt": hub.encoder.decode(ids)})

    async def tokenizer_info(request: Request) -> Response:
        _authorize(request, settings.api_key)
        tok = hub.encoder
        named = getattr(tok, "special_tokens_map", {})
        return JSONResponse({"bos_token": named.get("bos_token"), "eos_token": named.get("eos_token"),
                             "pad_token": named.get("pad_token"), "chat_template": tok.chat_template,
                             "model_max_length": hub.engine.max_model_len, "vocab_size": len(tok)})

    async def on_api_error(request: Request, exc: ApiError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(ApiError(exc.status_code, message, kind=kind).body(), status_code=exc.status_code)

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/", playground, methods=["GET"]),
        Route("/playground/vectors", vectors, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={ApiError: on_api_error, HTTPException: on_http_error})


def _authorize(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if not given:
        raise ApiError(401, "this server needs an API key: send 'Authorization: Bearer <key>' (the openai client's "
                            "api_key)", code="invalid_api_key")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "the API key is wrong: send the key engine-serve was started with (--api-key or "
                            "$ENGINE_API_KEY)", code="invalid_api_key")


async def _body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is over `limit` bytes, whatever Content-Length says."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    data = bytearray()
    try:
        async for piece in request.stream():
            data += piece
            if len(data) > limit:
                raise _too_large(len(data), limit)
    except ClientDisconnect:
        raise ApiError(400, "the client went away before the request body arrived") from None
    return bytes(data)


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body has {size} bytes or more; this server takes at most {limit} "
                         f"(engine-serve --max-request-bytes)", code="request_too_large")


def _engine_refusal(error: str) -> ApiError:
    """A record the engine refused (a vector file it cannot read, a prompt over the context): 400 naming the field."""
    if error.startswith("the engine stopped"):
        return ApiError(503, error, kind="server_error")
    return refusal(error)


async def _results(hub: EngineHub, submitted: Submitted, request: Request) -> list[dict]:
    """Every choice's record, in choice order; the first refused record is the request's error. A client that goes
    away meanwhile ends its requests in the engine."""
    records: list[dict | None] = [None] * len(submitted.job.records)
    left = len(records)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        while left:
            got = asyncio.ensure_future(submitted.queue.get())
            await asyncio.wait((got, gone), return_when=asyncio.FIRST_COMPLETED)
            if not got.done():
                got.cancel()
                raise ApiError(499, "the client went away")
            event = got.result()
            if event.error is not None:
                raise _engine_refusal(event.error)
            if event.record is not None:
                records[event.index] = event.record
                left -= 1
    finally:
        gone.cancel()
        if left:
            hub.abandon(submitted)
    return records


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (its body has been read by then, so only the disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stream(hub: EngineHub, job: Job, submitted: Submitted, first: Event):
    """Server-sent events: each choice's text as it comes, its finish reason, usage if asked, then [DONE]. Events
    that queued up while the client's connection was busy go out merged, in one write. An error after text went
    out is sent as an error event (the status line is gone by then)."""
    records: list[dict | None] = [None] * len(job.records)
    offsets = [0] * len(records)  # per choice: characters of token text its streamed logprobs covered
    left, events = len(records), _merged([first, *_queued(submitted)])
    try:
        if job.kind == "chat":
            yield "".join(_sse(chunk(job, i, None, first=True)) for i in range(len(records)))
        elif job.echo:  # the prompt first, as OpenAI echoes it
            yield "".join(_sse(chunk(job, i, job.prompts[i])) for i in range(len(records)))
        while True:
            out = []
            for event in events:
                if event.error is not None:
                    out.append(_sse(_engine_refusal(event.error).body()))
                    left = -1
                    break
                scored, logprobs = event.scored, None
                if scored is not None:
                    logprobs = stream_logprobs(job, scored.texts, scored.logprobs, scored.tops, offsets[event.index])
                    offsets[event.index] += sum(len(t) for t in scored.texts)
                if event.text or logprobs is not None:
                    out.append(_sse(chunk(job, event.index, event.text, logprobs=logprobs)))
                if event.record is not None:
                    records[event.index] = event.record
                    left -= 1
                    extra = {k: event.record[k] for k in ("steering", "capture", "adapter")
                         if event.record.get(k) is not None}
                    out.append(_sse(chunk(job, event.index, None, event.record["finish_reason"], extra=extra)))
            if left == 0 and job.include_usage:
                out.append(_sse(usage_chunk(job, records)))
            if left <= 0:
                yield "".join(out) + "data: [DONE]\n\n"
                left = 0
                break
            yield "".join(out)
            events = _merged([await submitted.queue.get(), *_queued(submitted)])
    finally:
        if left > 0:
            hub.abandon(submitted)


def _queued(submitted: Submitted) -> list[Event]:
    out = []
    while not submitted.queue.empty():
        out.append(submitted.queue.get_nowait())
    return out


def _merged(events: list[Event]) -> list[Event]:
    """Consecutive events of one choice as one: their texts joined, the last one's end (record or error) kept."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if last is not None and last.index == event.index and last.record is None and last.error is None:
            scored = last.scored if event.scored is None else event.scored if last.scored is None else \
                last.scored + event.scored
            out[-1] = Event(event.index, last.text + event.text, event.record, event.error, scored)
        else:
            out.append(event)
    return out


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
