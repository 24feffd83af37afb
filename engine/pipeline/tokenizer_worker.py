"""TokenizerWorker: batches of requests -> token ids in ring slots, plus one small message per slot."""

from __future__ import annotations

import logging

import numpy as np

from engine.messages import Feed, RecordFailed, SlotFilled, TokenizeRequest
from engine.models import load_tokenizer
from engine.procs import (
    Lifeline,
    MsgQueue,
    check_light_imports,
    is_checking_imports,
    messages,
)
from engine.pipeline.request import RecordError
from engine.pipeline.ring import ShmRing

log = logging.getLogger("engine")

def encode(tok, inputs: list[tuple[str | list | None, list | None]]) -> list[list[int] | RecordError]:
    """Token ids per (prompt, messages) pair: text prompts via one batch encode, messages via the chat template,
    token-id prompts as they are (checked against the vocabulary); an input the tokenizer cannot encode gets a
    RecordError, and the others are encoded all the same."""
    texts = [prompt for prompt, _ in inputs if isinstance(prompt, str)]
    encoded = iter(_encode_texts(tok, texts))
    return [next(encoded) if isinstance(prompt, str) else _encode_chat(tok, chat) if prompt is None
            else _checked_ids(prompt, len(tok)) for prompt, chat in inputs]


def _checked_ids(ids: list[int], vocab_size: int) -> list[int] | RecordError:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        return RecordError(f"field 'prompt' holds token ids outside this tokenizer's vocabulary [0, {vocab_size}): "
                           f"{bad[:5]}")
    return ids


def _encode_texts(tok, texts: list[str]) -> list[list[int] | RecordError]:
    """One batch encode; if the tokenizer refuses the batch, each text alone, so only the bad one fails."""
    if not texts:
        return []
    try:
        return tok(texts, add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - the tokenizer's own error for some text: found below, text by text
        pass
    out: list[list[int] | RecordError] = []
    for text in texts:
        try:
            out.append(tok(text, add_special_tokens=True)["input_ids"])
        except Exception as exc:  # noqa: BLE001 - whatever the tokenizer raises about this text is this record's error
            out.append(RecordError(f"the tokenizer cannot encode this prompt ({type(exc).__name__}: {exc})"))
    return out


def _encode_chat(tok, messages: list[dict]) -> list[int] | RecordError:
    if not tok.chat_template:
        return RecordError(
            "this model's tokenizer has no chat template (it is a base model): send 'prompt' text instead of "
            "'messages', or pass --tokenizer with a tokenizer that has one"
        )
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]
    except Exception as exc:  # noqa: BLE001 - a template's own checks (roles must alternate, say) judge this record
        return RecordError(f"the chat template cannot render these messages ({type(exc).__name__}: {exc})")


def fit_length(ids: list[int], max_new_tokens: int, max_model_len: int, truncate: str, bos_id: int | None) -> list[int]:
    """Check prompt + max_new_tokens against max_model_len; truncate if asked (a leading BOS is kept)."""
    room = max_model_len - max_new_tokens
    if room < 1:
        raise RecordError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt within "
                          f"max_model_len={max_model_len}")
    if not ids:
        raise RecordError("the prompt encodes to zero tokens; give a non-empty prompt")
    if len(ids) <= room:
        return ids
    if truncate == "none":
        raise RecordError(
            f"the prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds max_model_len="
            f"{max_model_len}: shorten it, lower max_new_tokens, or pass --truncate left|right"
        )
    if truncate == "right":
        return ids[:room]
    keep_bos = bos_id is not None and ids[0] == bos_id
    return ids[:1] + ids[len(ids) - room + 1:] if keep_bos else ids[len(ids) - room:]


def run_tokenizer_worker(tokenizer_dir: str, max_model_len: int, truncate: str, ring: ShmRing, inbox: MsgQueue,
                   core_q: MsgQueue, events: MsgQueue, lifeline: Lifeline) -> None:
    is_checking = is_checking_imports()
    tok = load_tokenizer(tokenizer_dir)
    if is_checking:
        check_light_imports("tokenizer worker")
    for msg in messages(inbox, lifeline):
        if not isinstance(msg, Feed):
            raise TypeError(f"a tokenizer worker got a {type(msg).__name__} message; it takes Feed only")
        requests = msg.requests
        encoded = encode(tok, [(r.prompt, r.messages) for r in requests])
        if is_checking:  # before anything is sent, so the run fails rather than finishing without noticing
            check_light_imports("tokenizer worker")
        entries = []
        for request, ids in zip(requests, encoded):
            try:
                if isinstance(ids, RecordError):
                    raise ids
                ids = fit_length(ids, request.core.max_new_tokens, max_model_len, truncate, tok.bos_token_id)
            except RecordError as exc:
                events.put(RecordFailed(request.core.index, str(exc)))
                continue
            entries.append((request, np.asarray(ids, dtype=np.int32)))
        _send(entries, ring, core_q, lifeline)


def _send(entries: list[tuple[TokenizeRequest, np.ndarray]], ring: ShmRing, core_q: MsgQueue,
          lifeline: Lifeline) -> None:
    """Pack encoded requests into as few slots as fit; one message per filled slot."""
    while entries:
        count = 1
        while count < len(entries) and ring.fits([len(ids) for _, ids in entries[:count + 1]]):
            count += 1
        batch, entries = entries[:count], entries[count:]
        slot = None
        while slot is None:
            if not lifeline.ok():
                return
            slot = ring.acquire(timeout=0.5)
        ticket = ring.write(slot, [(r.core.index, ids) for r, ids in batch])
        core_q.put(SlotFilled(slot, ticket, [r.core for r, _ in batch]))
