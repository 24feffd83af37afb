"""The KV cache's memory plan: the prefill budget gives way before the cache's KV rows do."""

from functools import partial
from pathlib import Path

import pytest
import torch
from transformers import GemmaConfig

from engine.core import kv_cache
from engine.core.kv_cache import AUTO_PREFILL_TOKENS, MIN_AUTO_PREFILL_TOKENS, activation_reserve, fit_prefill

GIB = 1 << 30
GEMMA_2B = GemmaConfig(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                       num_key_value_heads=1, head_dim=256, vocab_size=256000)
PER_ROW = 2 * 18 * 1 * (1250 + 1) * 256 * 2  # bf16 K and V of one 1,250-token sequence: 23 MB


def fit(budget: float, seqs: int = 512, requested: int | None = None) -> int:
    return fit_prefill(budget, PER_ROW, seqs, partial(activation_reserve, GEMMA_2B, seqs), requested)


def rows_left(budget: float, prefill: int, seqs: int = 512) -> int:
    return int((budget - activation_reserve(GEMMA_2B, seqs, prefill)) // PER_ROW)


def test_a_roomy_card_gets_the_full_prefill_budget():
    assert fit(60 * GIB) == AUTO_PREFILL_TOKENS


def test_a_tight_card_halves_the_prefill_budget_until_every_kv_row_fits():
    need = 512 * PER_ROW
    budget = need + activation_reserve(GEMMA_2B, 512, 8192) + 1  # room for 8,192 prefill tokens, not 16,384
    assert rows_left(budget, AUTO_PREFILL_TOKENS) < 512
    assert fit(budget) == 8192
    assert rows_left(budget, 8192) >= 512


def test_the_prefill_budget_stops_shrinking_at_its_floor():
    assert fit(2 * GIB) == MIN_AUTO_PREFILL_TOKENS


def test_a_prefill_budget_the_user_set_is_kept():
    assert fit(2 * GIB, requested=20000) == 20000


def test_the_reserve_covers_the_prefill_memory_measured_on_a_gpu():
    # H100, 20,000 prompts of up to 2,048 tokens, 512 KV rows: peak 33.31 GiB at 8,192 prefill tokens, 47.95 at 32,768
    grown = activation_reserve(GEMMA_2B, 512, 32768) - activation_reserve(GEMMA_2B, 512, 8192)
    assert grown >= (47.95 - 33.31) * GIB


def test_half_an_80gb_card_keeps_all_512_kv_rows_of_2110_tokens_with_a_smaller_prefill():
    per_row = 2 * 18 * 1 * (2110 + 1) * 256 * 2
    budget = 0.5 * 79.65 * GIB - 5.5 * GIB  # the memory workload's setting, after the weights
    prefill = fit_prefill(budget, per_row, 512, partial(activation_reserve, GEMMA_2B, 512), None)
    assert prefill < AUTO_PREFILL_TOKENS
    assert budget - activation_reserve(GEMMA_2B, 512, prefill) >= 512 * per_row


def _huge_kib(address: int) -> int:
    """AnonHugePages (KiB) of this process's mapping that holds `address`."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        span = line.split()[0]
        if "-" in span and all(c in "0123456789abcdef-" for c in span):
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                for detail in lines[i + 1:]:
                    if detail.startswith("AnonHugePages:"):
                        return int(detail.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_a_cpu_cache_is_touched_in_small_pages_not_huge_ones():
    """numpy asks for huge pages on large arrays; a KV row's first writes would then zero 2 MiB each."""
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[madvise]" not in mode.read_text():
        pytest.skip("transparent huge pages are not in madvise mode here: numpy's advice changes nothing")
    import numpy as np

    def huge_kib_after_writes(array: torch.Tensor) -> int:
        array[:, 0] = 1.0  # one write per MiB, as a prefill writes a few columns per head
        return _huge_kib(array.data_ptr() + array.numel() * 2)

    if huge_kib_after_writes(torch.from_numpy(np.zeros((64, 1 << 18), dtype=np.float32))) == 0:
        pytest.skip("this numpy or kernel gives a plain np.zeros no huge pages either")
    assert huge_kib_after_writes(kv_cache._zeros((64, 1 << 18), torch.float32, "cpu")) == 0
