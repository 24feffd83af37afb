"""The KV cache's memory plan: the prefill budget gives way before the cache's KV rows do."""

from functools import partial

from transformers import GemmaConfig

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
