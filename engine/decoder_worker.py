"""DecoderWorker: finished token ids -> text, cut at stop strings, with the finish reason."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from engine.activation_messages import trim_generated
from engine.procs import (
    Lifeline,
    MsgQueue,
    check_light_imports,
    is_checking_imports,
    messages,
)
from engine.storage.files import fsync_path
from engine.tokenizer import RustTokenizer
from engine.tokenizer_worker import files_digest, load_tokenizer

log = logging.getLogger("engine")

# What RustTokenizer reads of a tokenizer directory besides tokenizer.json (copied into the decoding copy).
BESIDE_TOKENIZER = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "config.json",
                    "chat_template.jinja", "additional_chat_templates")


def cut_at_stop(tok, token_ids: list[int], text: str, stops: list[str]) -> tuple[str, int] | None:
    """If a stop string occurs, the text before it and how many tokens it took to reach it; else None."""
    hits = [(text.find(s), s) for s in stops if s in text]
    if not hits:
        return None
    at, stop = min(hits)
    # The fewest tokens whose text contains the stop string (containment only grows with more tokens).
    lo, hi = 1, len(token_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if stop in tok.decode(token_ids[:mid], skip_special_tokens=True):
            hi = mid
        else:
            lo = mid + 1
    return text[:at], lo


class StopScanner:
    """Lets the core end a sequence soon after a stop string appears, instead of at max_new_tokens.

    Every `every` tokens it decodes a short tail; a hit there is confirmed on the whole completion, so a
    window that decodes differently from the full text cannot end a sequence early. The decoders still make
    the exact cut, so results are the same as without it, only sooner.
    """

    def __init__(self, tokenizer_dir: str, every: int = 8):
        self.tokenizer_dir, self.every = tokenizer_dir, every

    @functools.cached_property
    def tok(self):
        """Loaded on the first sequence that has stop strings: a run without any never loads it (~1 s a start)."""
        return load_tokenizer(self.tokenizer_dir)

    def hit(self, output_ids: list[int], stops: list[str]) -> bool:
        if len(output_ids) % self.every:
            return False
        tail = output_ids[-(self.every + max(len(s) for s in stops)):]
        if not any(s in self.tok.decode(tail, skip_special_tokens=True) for s in stops):
            return False
        text = self.tok.decode(output_ids, skip_special_tokens=True)
        return any(s in text for s in stops)


def decode_texts(tok, id_lists: list[list[int]]) -> list[str]:
    """`tok.batch_decode(id_lists, skip_special_tokens=True)`, through the Rust tokenizer's own batch decode when
    nothing is cleaned up after it (the same texts; half the time on one core and parallel across cores: when 512
    sequences end in one step, their texts are what the run waits for last)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or tok.clean_up_tokenization_spaces:
        return tok.batch_decode(id_lists, skip_special_tokens=True)
    return backend.decode_batch(id_lists, skip_special_tokens=True)


def finalize(tok, items: list[dict], return_tokens: bool) -> list[dict]:
    """Decode a batch of finished sequences into result fields."""
    id_lists = [np.frombuffer(item["tokens"], dtype=np.int32).tolist() for item in items]
    texts = decode_texts(tok, id_lists)
    results = []
    for item, ids, text in zip(items, id_lists, texts):
        reason = item["finish_reason"]
        cut = cut_at_stop(tok, ids, text, item["stop"]) if item["stop"] else None
        if cut is not None:
            text, count = cut
            ids, reason = ids[:count], "stop"
        result = {"t": "result", "index": item["index"], "completion": text, "finish_reason": reason,
                  "num_prompt_tokens": item["num_prompt_tokens"], "num_completion_tokens": len(ids)}
        if return_tokens:
            result["completion_token_ids"] = ids
        if "activations" in item:
            result["activations"] = trim_generated(item["activations"], len(ids))
        results.append(result)
    return results


def decoding_tokenizer(tokenizer_dir: str, cache_dir: str):
    """The tokenizer of `tokenizer_dir` for decoding alone: the same tokenizer without its BPE merges, which only
    encoding reads (decoding maps ids through the vocabulary, the added tokens and the decoder), kept under the
    cache dir by a digest of the files. Gemma's 33 MB tokenizer.json then loads in ~0.4 s instead of ~1.1 s, time
    a start-up on few cores spends beside the engine core's. Any other tokenizer, or a copy that does not load,
    is load_tokenizer's."""
    source = Path(tokenizer_dir)
    folder = Path(cache_dir, "decoding-tokenizers", files_digest(tokenizer_dir, ("tokenizer.json", *BESIDE_TOKENIZER)))
    try:
        if not (folder / "tokenizer.json").is_file() and not _write_decoding_copy(source, folder):
            return load_tokenizer(tokenizer_dir)
        return RustTokenizer(folder)
    except Exception as exc:  # noqa: BLE001 - any failure (tokenizers raises plain Exception) loads the whole one
        log.info("decoding with the whole tokenizer of %s (%s: %s)", tokenizer_dir, type(exc).__name__, exc)
        return load_tokenizer(tokenizer_dir)


def _write_decoding_copy(source: Path, folder: Path) -> bool:
    """Write `folder`: tokenizer.json without merges and copies of the files beside it. False where there is
    nothing to leave out (not BPE, no merges)."""
    data = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not model.get("merges") or any((source / n).is_dir() for n in BESIDE_TOKENIZER):
        return False
    model["merges"] = []
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        (tmp / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        for name in BESIDE_TOKENIZER:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        fsync_path(tmp / "tokenizer.json")
        os.replace(tmp, folder)  # another run that wrote the same copy first wins: this one's is deleted
    except OSError:
        if not (folder / "tokenizer.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def decoder_main(tokenizer_dir: str, cache_dir: str, return_tokens: bool, inbox: MsgQueue, events: MsgQueue,
                 lifeline: Lifeline) -> None:
    """Decodes one engine core's finished sequences, and passes its other messages (ready, stats, errors) on: the
    core writes to no queue but its own, so a core killed mid-write leaves no shared queue locked or torn. The
    tokenizer is loaded at the first message (the core's ready, for one decoder), so it is not loaded while the
    core starts up, on the same cores."""
    is_checking = is_checking_imports()
    tok = None
    for msg in messages(inbox, lifeline):
        if "seqs" not in msg:
            events.put(msg)
        if tok is None:
            tok = decoding_tokenizer(tokenizer_dir, cache_dir)
            if is_checking:
                check_light_imports("decoder worker")
        if "seqs" not in msg:
            continue
        results = finalize(tok, msg["seqs"], return_tokens)
        if is_checking:  # before the results go out, so the run fails rather than finishing without noticing
            check_light_imports("decoder worker")
        for result in results:
            events.put(result)
