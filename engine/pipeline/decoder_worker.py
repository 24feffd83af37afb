"""DecoderWorker: finished token ids -> text, cut at stop strings, with the finish reason."""

from __future__ import annotations

import numpy as np

from engine.messages import Finished, FinishedSeq, Result
from engine.pipeline.activation_messages import trim_generated
from engine.models import decoding_tokenizer
from engine.procs import (
    Lifeline,
    MsgQueue,
    check_light_imports,
    is_checking_imports,
    messages,
)
from engine.stops import cut_at_stop


def decode_texts(tok, id_lists: list[list[int]]) -> list[str]:
    """`tok.batch_decode(id_lists, skip_special_tokens=True)`, through the Rust tokenizer's own batch decode when
    nothing is cleaned up after it (the same texts; half the time on one core and parallel across cores: when 512
    sequences end in one step, their texts are what the run waits for last)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or tok.clean_up_tokenization_spaces:
        return tok.batch_decode(id_lists, skip_special_tokens=True)
    return backend.decode_batch(id_lists, skip_special_tokens=True)


def finalize(tok, items: list[FinishedSeq], return_tokens: bool) -> list[Result]:
    """Decode a batch of finished sequences into results."""
    id_lists = [np.frombuffer(item.tokens, dtype=np.int32).tolist() for item in items]
    texts = decode_texts(tok, id_lists)
    results = []
    for item, ids, text in zip(items, id_lists, texts):
        reason = item.finish_reason
        cut = cut_at_stop(tok, ids, text, item.stop) if item.stop else None
        if cut is not None:
            text, count = cut
            ids, reason = ids[:count], "stop"
        activations = trim_generated(item.activations, len(ids)) if item.activations is not None else None
        logprobs = None if item.logprobs is None else item.logprobs[:len(ids)]
        top = None if item.top_logprobs is None else item.top_logprobs[:len(ids)]
        results.append(Result(item.index, text, reason, item.num_prompt_tokens, len(ids),
                              ids if return_tokens or logprobs is not None else None, activations,
                              item.steering_layers, logprobs, top, item.prompt))
    return results


def run_decoder_worker(tokenizer_dir: str, cache_dir: str, return_tokens: bool, inbox: MsgQueue, events: MsgQueue,
                 lifeline: Lifeline) -> None:
    """Decodes one engine core's finished sequences, and passes its other messages (ready, stats, errors) on: the
    core writes to no queue but its own, so a core killed mid-write leaves no shared queue locked or torn. The
    tokenizer is loaded at the first message (the core's ready, for one decoder), so it is not loaded while the
    core starts up, on the same cores."""
    is_checking = is_checking_imports()
    tok = None
    for msg in messages(inbox, lifeline):
        is_finished = isinstance(msg, Finished)
        if not is_finished:
            events.put(msg)  # before the tokenizer loads: the core's ready is not held up by it
        if tok is None:
            tok = decoding_tokenizer(tokenizer_dir, cache_dir)
            if is_checking:
                check_light_imports("decoder worker")
        if not is_finished:
            continue
        results = finalize(tok, msg.seqs, return_tokens)
        if is_checking:  # before the results go out, so the run fails rather than finishing without noticing
            check_light_imports("decoder worker")
        for result in results:
            events.put(result)
