"""EngineHub: one long-lived Engine shared by every client of engine-serve.

HTTP handlers (asyncio) submit Jobs; the hub turns each record into a Request (every record check the batch jobs
make), queues them all on the engine at once, and one poll thread routes what comes back (streamed tokens,
finished results, record errors) to the job's asyncio queue. The engine core batches the requests of every
client together. Streamed tokens become text here, incrementally (IncrementalText).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import threading
from dataclasses import dataclass

from engine.apps.serve.protocol import ApiError, Job, dropped_completion
from engine.engine import Engine, EngineError, Streamed
from engine.messages import Outcome
from engine.models import load_tokenizer, num_decoder_layers
from engine.pipeline.decoder_worker import decode_texts
from engine.pipeline.reader import adapter_indices, checked_request
from engine.pipeline.writer import JsonlWriter
from engine.specs import RecordError, load_named_specs

log = logging.getLogger("engine")
POLL_S = 0.05
_FIELD = re.compile(r"field '([\w.\[\]]+)'")


# What an engine error is about, by how it starts, where it names no field: the request field it is about.
_TOPICS = (("steering", "steering"), ("SAE", "steering"), ("capture", "capture"), ("the prompt", "prompt"),
           ("max_tokens", "max_tokens"),
           ("this model's tokenizer has no chat template", "messages"), ("messages", "messages"))


def refusal(message: str) -> ApiError:
    """An engine record error as the server's 400: in the API's words (its max_tokens is the engine's
    max_new_tokens; --truncate is the server's start-up flag), naming the field it is about."""
    message = message.replace("max_new_tokens", "max_tokens").replace(
        "or pass --truncate left|right", "or start engine-serve with --truncate left|right")
    return ApiError(400, message, field_of(message))


def field_of(message: str) -> str | None:
    """The request field an engine error is about ("field 'steering' ..." -> steering), for the error's `param`."""
    found = _FIELD.search(message)
    if found:
        return found.group(1).split(".")[0].split("[")[0]
    return next((name for start, name in _TOPICS if message.startswith(start)), None)


class IncrementalText:
    """Token ids -> text as they arrive: each new piece decoded with a few tokens before it (so a word-initial space
    or a multi-byte character split over tokens comes out right), text held back while it ends in an incomplete
    character, and the last characters held back while they could begin a stop string. Once a stop string is in
    the text, nothing after it is sent: the core scans for stops every few tokens, so tokens past one keep coming
    until it ends the sequence, and the final text is cut at the stop (what was sent is always a prefix of it). A
    request that asked for log-probabilities has them beside its ids (`scores`: per token its log-probability and
    [[id, log-probability], ...] alternatives or None), sent in token order as their text is decoded, up to the
    tokens decoded before a stop string appeared (`take_scored`; the result brings the rest)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.scores: list[tuple | None] = []  # per token of `ids`: (log-probability, alternatives) or None
        self.scored_sent = 0  # tokens of `ids` whose scores were taken
        self.scored_end = 0  # tokens of `ids` decoded into `text` with no stop string in it: scores can go out
        self.stopped_at: int | None = None  # where the first stop string starts in `text`, once one is there
        self.stash: dict[int, tuple] = {}  # chunks that came before an earlier one (several decoder workers)
        self.prefix = self.read = 0  # the decode window: ids[prefix:read] decoded already, ids[read:] not yet
        self.text = ""  # every character decoded so far
        self.sent = 0  # characters of it sent

    def add(self, start: int, ids: list[int]) -> str:
        """Take tokens `ids` at place `start`; the new text that can be sent now ("" if none)."""
        self.put(start, ids)
        return self.take()

    def put(self, start: int, ids: list[int], scores: list[tuple] | None = None) -> None:
        """Take tokens `ids` at place `start` (and their scores) without decoding them yet (`take` decodes what came
        since)."""
        self.stash[start] = (ids, scores or [None] * len(ids))
        while self.stash and min(self.stash) <= len(self.ids):
            at = min(self.stash)
            ids, scores = self.stash.pop(at)
            self.ids.extend(ids[len(self.ids) - at:])
            self.scores.extend(scores[len(self.scores) - at:])

    def take_scored(self) -> tuple[list[int], list[tuple]]:
        """The ids and scores of the scored tokens decoded since the last call with no stop string in their text, in
        order (none after a token without)."""
        start = end = self.scored_sent
        while end < self.scored_end and self.scores[end] is not None:
            end += 1
        self.scored_sent = end
        return self.ids[start:end], self.scores[start:end]

    def take(self) -> str:
        """The text of the tokens put since the last take that can be sent now ("" if none)."""
        if self.stopped_at is not None:
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            searched = max(0, len(self.text) - self.hold)
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            hits = [at for at in (self.text.find(s, searched) for s in self.stops) if at >= 0]
            if hits:
                self.stopped_at = min(hits)
            else:
                self.scored_end = self.read
        end = len(self.text) - self.hold if self.stopped_at is None else self.stopped_at
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def rest(self, final: str) -> str:
        """The text still to send once the request's final text (cut at its stop string) is known."""
        sent = self.text[:self.sent]
        if not final.startswith(sent):
            log.warning("a streamed completion's text differs from its final text after %d characters; the final "
                        "text's remainder is sent", self.sent)
            return final[min(self.sent, len(final)):]
        return final[len(sent):]

    def _decode(self, ids: list[int]) -> str:
        return decode_texts(self.tokenizer, [ids])[0] if ids else ""


@dataclass
class Event:
    """What the hub tells a job's handler: choice `index` got `text` (and, streaming with log-probabilities, the
    `scored` tokens that came with it), finished with `record`, or failed (`error`)."""

    index: int
    text: str = ""
    record: dict | None = None
    error: str | None = None
    scored: Scored | None = None


@dataclass
class Scored:
    """Generated tokens with their log-probabilities, spelled: per token its text, log-probability and top
    alternatives [(text, log-probability), ...] (None: none asked)."""

    texts: list[str]
    logprobs: list[float]
    tops: list[list[tuple[str, float]]] | None

    def __add__(self, other: Scored) -> Scored:
        tops = None if self.tops is None or other.tops is None else self.tops + other.tops
        return Scored(self.texts + other.texts, self.logprobs + other.logprobs, tops)


def spell(tokenizer, ids: list[int], tops: list | None) -> tuple[list[str], list | None]:
    """Token ids and their [[id, log-probability], ...] alternatives as text, each token alone (OpenAI's logprobs
    name tokens by their text), in one batched decode."""
    texts = decode_texts(tokenizer, [[i] for i in ids + [t for step in tops or () for t, _ in step]])
    if tops is None:
        return texts[:len(ids)], None
    alternatives = iter(texts[len(ids):])
    return texts[:len(ids)], [[(next(alternatives), v) for _, v in step] for step in tops]


class Submitted:
    """A job on the engine: its events arrive on `queue` (asyncio), one Event per piece of text or end of choice."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop, requests: list, tokenizer):
        self.job, self.loop = job, loop
        self.requests = requests  # its engine Requests, in choice order
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.texts = [IncrementalText(tokenizer, r.stop) for r in requests] if job.stream else None
        self.is_abandoned = False  # the client went away: events are dropped
        self.left = len(job.records)  # choices not finished yet


def _hand_over(events: list[tuple[Submitted, Event]]) -> None:
    """From the poll thread: the events to their jobs' event loops, one call per loop."""
    by_loop: dict = {}
    for submitted, event in events:
        if not submitted.is_abandoned:
            by_loop.setdefault(submitted.loop, []).append((submitted, event))
    for loop, batch in by_loop.items():
        loop.call_soon_threadsafe(_deliver, batch)


def _deliver(events: list[tuple[Submitted, Event]]) -> None:
    """In the event loop: a poll's events onto their jobs' queues (one wake-up of the loop per poll, not per event)."""
    for submitted, event in events:
        if not submitted.is_abandoned:
            submitted.queue.put_nowait(event)


class EngineHub:
    """The engine, its poll thread and the jobs in flight; `output` (optional): a JsonlWriter every result is logged
    to, with the activations of requests that capture (their responses say where)."""

    def __init__(self, engine: Engine, tokenizer, writer: JsonlWriter | None = None):
        self.engine, self.tokenizer, self.writer = engine, tokenizer, writer
        self.named = load_named_specs(engine.config.steering_specs) if engine.config.steering_specs else {}
        self.steering, self.capture = engine.config.steering.spec(), engine.config.capture.spec()
        self.num_layers = num_decoder_layers(engine.source)
        self.adapters = adapter_indices(engine.config)
        self._encoder = None
        self._keys = itertools.count()
        self.num_served = 0  # requests answered (jobs, not choices)
        self._lines = itertools.count(1)
        self._choices: dict[int, tuple[Submitted, int]] = {}  # position -> (its job, the choice's index)
        self._submit_lock = threading.Lock()
        self.error: str | None = None  # why the engine stopped (a dead core): every job since gets a 503
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="engine-hub", daemon=True)
        self._thread.start()

    @property
    def encoder(self):
        """The model's full tokenizer (the decoding one has no merges), loaded at its first use (/tokenize)."""
        if self._encoder is None:
            self._encoder = load_tokenizer(self.engine.source.tokenizer_dir)
        return self._encoder

    @property
    def num_running(self) -> int:
        return len(self._choices)

    async def submit(self, job: Job) -> Submitted:
        """Check every record (ApiError 400 naming the field, before anything runs), then queue them."""
        if self.error is not None:
            raise ApiError(503, f"the engine stopped ({self.error}); restart engine-serve", kind="server_error")
        if job.echo:  # a token-id prompt is echoed as its text
            job.prompts = [p if isinstance(p, str) else decode_texts(self.tokenizer, [p])[0] for p in job.prompts]
        requests = []
        for i, record in enumerate(job.records):
            if record.get("capture") is not None and self.writer is None:
                raise ApiError(400, "field 'capture' needs an output for the tensors: start engine-serve with "
                                    "--output PATH", "capture")
            try:
                request = checked_request({**record, "id": f"{job.id}-{i}"}, next(self._lines), self.engine.config,
                                          self.steering, self.named, self.capture, self.adapters)
            except RecordError as exc:
                raise refusal(str(exc)) from None
            if request.capture is not None and self.writer is None:
                raise ApiError(400, "this server captures activations by default (--capture-layers) but has no "
                                    "output for them: start it with --output PATH", "capture")
            request.stream = job.stream and not job.is_scoring  # a scoring job's one token is dropped, not sent
            requests.append(request)
        submitted = Submitted(job, asyncio.get_running_loop(), requests, self.tokenizer)
        pairs = []
        for i, request in enumerate(requests):
            key = next(self._keys)
            self._choices[key] = (submitted, i)
            pairs.append((key, request))
        await asyncio.to_thread(self._submit, pairs)
        return submitted

    def _submit(self, pairs: list) -> None:
        with self._submit_lock:  # one feed at a time: a job's requests stay together on the tokenizers' queue
            self.engine.submit(pairs)

    def _poll(self) -> None:
        while not self._closing.is_set():
            try:
                items = self.engine.poll(POLL_S)
            except EngineError as exc:
                self._fail_all(str(exc))
                return
            if items:
                self._route(items)

    def _route(self, items: list) -> None:
        """One poll's outcomes and streamed tokens -> events, handed to each loop at once. Tokens that came in
        several messages are decoded together; a choice that finished in the same poll sends its text in its final
        event (IncrementalText.rest), so its text never follows its end."""
        events: list[tuple[Submitted, Event]] = []
        streamed: dict[int, tuple[Submitted, int]] = {}
        for item in items:
            entry = self._choices.get(item.position)
            if entry is None:
                continue
            submitted, index = entry
            if isinstance(item, Streamed):
                if submitted.texts is not None:
                    scores = None if item.logprobs is None else list(zip(item.logprobs, item.top or [None] * len(
                        item.ids)))
                    submitted.texts[index].put(item.start, item.ids, scores)
                    streamed[item.position] = entry
                continue
            del self._choices[item.position]
            streamed.pop(item.position, None)
            events.append((submitted, self._finish(submitted, index, item)))
            submitted.left -= 1
            self.num_served += submitted.left == 0
        for submitted, index in streamed.values():
            text = submitted.texts[index].take()
            scored = self._scored(submitted.texts[index])
            if text or scored is not None:
                events.append((submitted, Event(index, text=text, scored=scored)))
        _hand_over(events)

    def _scored(self, text: IncrementalText) -> Scored | None:
        """The scored tokens a streaming choice got since it last sent some, spelled (None: none)."""
        ids, scores = text.take_scored()
        if not ids:
            return None
        tops = None if scores[0][1] is None else [top for _, top in scores]
        texts, top_texts = spell(self.tokenizer, ids, tops)
        return Scored(texts, [lp for lp, _ in scores], top_texts)

    def _finish(self, submitted: Submitted, index: int, outcome: Outcome) -> Event:
        record = outcome.record
        if outcome.is_error:
            return Event(index, error=record["error"])
        if self.writer is not None:
            try:
                record = self.writer.write_now(outcome)
            except OSError as exc:
                return Event(index, error=f"could not write the result to {self.writer.output}: {exc}")
            if "activations" in record:
                pointer = record.pop("activations")
                record = {**record, "capture": {"output": str(self.writer.output), "id": record["id"], **pointer}}
        if "completion_logprobs" in record:
            record = self._spelled(record)
        if submitted.job.is_scoring:
            record = dropped_completion(record)
        if not submitted.texts:
            return Event(index, record=record)
        text = submitted.texts[index].rest(record["completion"])
        scored = None
        if "completion_logprobs" in record:  # the scores Progress did not bring, from the result itself
            sent = submitted.texts[index].scored_sent
            tops = record.get("top_texts")
            if sent < len(record["completion_logprobs"]):
                scored = Scored(record["token_texts"][sent:], record["completion_logprobs"][sent:],
                                None if tops is None else tops[sent:])
        return Event(index, text=text, record=record, scored=scored)

    def _spelled(self, record: dict) -> dict:
        """A result with log-probabilities, its tokens and their alternatives spelled out as text (OpenAI's
        logprobs name tokens by their text): the completion's (`token_texts`, `top_texts`) and, when it scored
        its prompt, the prompt's (`prompt_texts`, `prompt_top_texts`)."""
        out = {**record}
        for ids_name, tops_name, texts_name, top_texts_name in (
                ("completion_token_ids", "completion_top_logprobs", "token_texts", "top_texts"),
                ("prompt_token_ids", "prompt_top_logprobs", "prompt_texts", "prompt_top_texts")):
            if ids_name in record:
                out[texts_name], top_texts = spell(self.tokenizer, record[ids_name], record.get(tops_name))
                if top_texts is not None:
                    out[top_texts_name] = top_texts
        return out

    def _fail_all(self, error: str) -> None:
        self.error = error
        log.error("engine-serve: %s", error)
        choices, self._choices = self._choices, {}
        _hand_over([(submitted, Event(index, error=f"the engine stopped: {error}"))
                    for submitted, index in choices.values()])

    def abandon(self, submitted: Submitted) -> None:
        """The client went away (or the job failed): drop its events and end its unfinished requests in the
        engine, so their rows go to others."""
        if submitted.is_abandoned:
            return
        submitted.is_abandoned = True
        self.engine.cancel(submitted.requests)

    def close(self) -> None:
        self._closing.set()
        self._thread.join(timeout=5)
