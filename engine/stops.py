"""Stop strings: the core's scan, which ends a sequence soon after one appears, and the decoders' exact cut. One
rule, one file: both decode with the same tokenizer and agree on where the stop string starts."""

from __future__ import annotations

import functools

from engine.models import load_tokenizer


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
