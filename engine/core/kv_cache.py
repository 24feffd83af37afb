"""KVCache: one preallocated K and V tensor per layer, `[num_rows, kv_heads, max_len + 1, head_dim]`.

Each running sequence owns a KV row and its own length; there is no padding between sequences.
Column `max_len` is a trash column: decode rows of idle KV rows write there, and nothing ever reads it.
The number of rows is sized from free memory once the model is loaded, so admission cannot over-commit.
"""

from __future__ import annotations

import importlib
import logging
from functools import partial

import numpy as np
import psutil
import torch

from engine.config import UserError

log = logging.getLogger("engine")

CPU_MEMORY_SHARE = 0.25  # of available RAM, on CPU runs (a laptop must stay usable)


class CacheTooSmall(UserError, ValueError):
    """Not even one sequence of max_model_len fits; the message says which setting to lower."""


def kv_shape(model_config) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of a text model config."""
    c = model_config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, getattr(c, "num_key_value_heads", None) or c.num_attention_heads, head_dim


AUTO_PREFILL_TOKENS = 32768  # prefill time -3% against 16,384 tokens, in-process `long` +1.5% (H100, Gemma-2B shapes)
MIN_AUTO_PREFILL_TOKENS = 4096


def plan_rows(model_config, max_num_seqs: int, max_len: int, dtype, device: str, memory_fraction: float,
              max_prefill_tokens: int | None, is_default: bool = False) -> tuple[int, int]:
    """(rows, prefill tokens): how many KV rows of `max_len` tokens fit the memory budget (at most
    max_num_seqs), next to the activations of a prefill of that many prompt tokens. With max_prefill_tokens None
    the prefill budget is AUTO_PREFILL_TOKENS, halved (down to MIN_AUTO_PREFILL_TOKENS) while its activations
    would cost the cache rows: a bigger prefill is a few percent faster, a row more is a whole sequence more.
    `is_default`: max_num_seqs is the engine's default, not the user's, so fewer rows is no warning."""
    layers, kv_heads, head_dim = kv_shape(model_config)
    per_row = 2 * layers * kv_heads * (max_len + 1) * head_dim * torch.finfo(dtype).bits // 8
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(device)
        budget = memory_fraction * total - (total - free)
        reserve = partial(activation_reserve, model_config, max_num_seqs)
        prefill = fit_prefill(budget, per_row, max_num_seqs, reserve, max_prefill_tokens)
        budget -= reserve(prefill)
        where = f"--gpu-memory-fraction {memory_fraction}"
    else:
        prefill = max_prefill_tokens or AUTO_PREFILL_TOKENS  # on CPU the prefill budget is not traded for rows
        budget = CPU_MEMORY_SHARE * psutil.virtual_memory().available
        where = f"{int(CPU_MEMORY_SHARE * 100)}% of available RAM"
    rows = min(max_num_seqs, int(budget // per_row))
    if rows < 1:
        raise CacheTooSmall(
            f"the KV cache for one sequence of {max_len} tokens needs {per_row / 2**30:.2f} GiB, more than {where} "
            f"leaves; lower --max-model-len" + (" or raise --gpu-memory-fraction" if device.startswith("cuda") else "")
        )
    if rows < max_num_seqs:
        (log.info if is_default else log.warning)("KV cache: %d slots of %d tokens fit %s (asked for %d); running at "
                                                  "most %d sequences",
                    rows, max_len, where, max_num_seqs, rows)
    if max_prefill_tokens is None and prefill < AUTO_PREFILL_TOKENS:
        log.info("prefill: %d prompt tokens a call (of %d), so the KV cache keeps %d slots", prefill,
                 AUTO_PREFILL_TOKENS, rows)
    return rows, prefill


def fit_prefill(budget: float, per_row: int, max_num_seqs: int, reserve, requested: int | None) -> int:
    """Prompt tokens per prefill: `requested`; if None, AUTO_PREFILL_TOKENS halved while `reserve(tokens)` (its
    activations' bytes) would leave `budget` room for fewer than max_num_seqs KV rows of `per_row` bytes."""
    if requested is not None:
        return requested
    prefill = AUTO_PREFILL_TOKENS
    while prefill > MIN_AUTO_PREFILL_TOKENS and (budget - reserve(prefill)) // per_row < max_num_seqs:
        prefill //= 2
    return prefill


def activation_reserve(model_config, max_num_seqs: int, max_prefill_tokens: int) -> float:
    """Room for prefill activations (a full packed row of max_prefill_tokens) and logits, not in the cache.

    Per prefill token: the MLP's three [tokens, intermediate] tensors and a few [tokens, hidden] ones, plus one
    [tokens, intermediate] tensor per layer. That last term is measured, not explained yet: on an H100 the card's
    peak use over 20,000 prompts at Gemma-2B shapes grew 33.3 -> 47.9 GiB from 8,192 to 32,768 prefill tokens,
    0.61 MiB a token, where 18 layers x 16,384 x 2 bytes is 0.56 MiB (tests/core/test_kv_cache.py)."""
    c = model_config.get_text_config()
    logits = max_num_seqs * c.vocab_size * 4 * 4  # fp32 logits, noise and sampler temporaries
    prefill = max_prefill_tokens * (c.intermediate_size * (3 + c.num_hidden_layers) + c.hidden_size * 8) * 2
    return logits + prefill + (1 << 30)


def _zeros(shape: tuple, dtype, device) -> torch.Tensor:
    """Zeros; on CPU through calloc, so pages become resident only as sequences fill them, in small pages: numpy
    asks the kernel for transparent huge pages on large arrays, and a KV row's prefill writes a few columns of
    every head and layer, each write then zeroing a whole 2 MiB page (~0.35 s of the first step of the embedded
    model on a 2-core CPU; later steps no faster)."""
    if str(device) != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    np_dtype = np.int16 if dtype.itemsize == 2 else np.float32 if dtype.itemsize == 4 else np.float64
    set_huge_pages = _numpy_huge_pages_switch()
    was_on = set_huge_pages(False) if set_huge_pages is not None else None
    try:
        storage = np.zeros(shape, dtype=np_dtype)
    finally:
        if was_on is not None:
            set_huge_pages(was_on)
    return torch.from_numpy(storage).view(dtype)


def _numpy_huge_pages_switch():
    """numpy's switch for asking huge pages on large allocations (returns the previous setting), or None where this
    numpy has none (then the cache gets whatever pages numpy asks for: the same zeros, only slower to touch)."""
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return getattr(importlib.import_module(module), "_set_madvise_hugepage")
        except (ImportError, AttributeError):
            continue
    return None


class KVCache:
    """Per-layer K/V tensors, one KV row per running sequence."""

    def __init__(self, model_config, num_rows: int, max_len: int, dtype, device):
        layers, kv_heads, head_dim = kv_shape(model_config)
        shape = (num_rows, kv_heads, max_len + 1, head_dim)
        self.k = [_zeros(shape, dtype, device) for _ in range(layers)]
        self.v = [_zeros(shape, dtype, device) for _ in range(layers)]
        self.num_rows, self.max_len, self.kv_heads, self.head_dim = num_rows, max_len, kv_heads, head_dim

    @property
    def trash(self) -> int:
        return self.max_len
