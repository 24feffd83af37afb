"""Packed prefill attention: each prompt attends causally to itself only (within a sliding window if set), and its
K/V land in its KV row; compared with attention written out by hand (softmax over masked scores, float64)."""

from __future__ import annotations

import types

import pytest
import torch

from engine.core.attention import CONTEXT, engine_attention

LENGTHS = [5, 12, 1, 9]


def reference(q, k, v, window, scale, softcap=None):
    """One prompt: q [H, n, D], k/v [KVH, n, D] -> [n, H, D], by hand in float64 (scores soft-capped as Gemma 2's
    are, softcap * tanh(scores / softcap), if softcap is given)."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0).double(), v.repeat_interleave(groups, 0).double()
    scores = q.double() @ k.transpose(1, 2) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(q.shape[1])
    allowed = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


def run_packed(device: str, dtype, heads: int, kv_heads: int, window, softcap=None):
    torch.manual_seed(0)
    dim, total, rows, max_len = 32, sum(LENGTHS), 6, 16
    query = torch.randn(1, heads, total, dim, device=device, dtype=dtype)
    key = torch.randn(1, kv_heads, total, dim, device=device, dtype=dtype)
    value = torch.randn(1, kv_heads, total, dim, device=device, dtype=dtype)
    cache = types.SimpleNamespace(k=[torch.zeros(rows, kv_heads, max_len + 1, dim, device=device, dtype=dtype)],
                                  v=[torch.zeros(rows, kv_heads, max_len + 1, dim, device=device, dtype=dtype)])
    starts = [0]
    for n in LENGTHS:
        starts.append(starts[-1] + n)
    seq_rows = [4, 0, 5, 2]
    CONTEXT.cache, CONTEXT.is_prefill = cache, True
    CONTEXT.rows = torch.tensor([s for s, n in zip(seq_rows, LENGTHS) for _ in range(n)], device=device)
    CONTEXT.write_pos = torch.cat([torch.arange(n) for n in LENGTHS]).to(device)
    CONTEXT.spans = list(zip(starts[:-1], LENGTHS))
    CONTEXT.cu_lens = torch.tensor(starts, dtype=torch.int32, device=device)
    CONTEXT.prompt_of = torch.tensor([i for i, n in enumerate(LENGTHS) for _ in range(n)], device=device)
    module = types.SimpleNamespace(layer_idx=0)
    out, _ = engine_attention(module, query, key, value, None, scaling=dim ** -0.5, sliding_window=window,
                              softcap=softcap)
    return query, key, value, cache, out, starts, seq_rows


def check(device, dtype, heads, kv_heads, window, tol, softcap=None):
    query, key, value, cache, out, starts, seq_rows = run_packed(device, dtype, heads, kv_heads, window, softcap)
    assert out.shape == (1, sum(LENGTHS), heads, query.shape[-1])
    for a, b, row in zip(starts, starts[1:], seq_rows):
        want = reference(query[0, :, a:b].cpu(), key[0, :, a:b].cpu(), value[0, :, a:b].cpu(), window,
                         query.shape[-1] ** -0.5, softcap)
        err = (out[0, a:b].cpu().double() - want).abs().max().item()
        assert err < tol, (a, b, err)
        assert torch.equal(cache.k[0][row, :, :b - a].cpu(), key[0, :, a:b].cpu())
        assert torch.equal(cache.v[0][row, :, :b - a].cpu(), value[0, :, a:b].cpu())


@pytest.mark.parametrize("heads,kv_heads,window", [(4, 1, None), (4, 1, 4), (4, 2, None), (2, 2, 3)])
def test_packed_prefill_attends_within_each_prompt(heads, kv_heads, window):
    check("cpu", torch.float32, heads, kv_heads, window, 1e-5)


@pytest.mark.parametrize("heads,kv_heads,window,block", [(4, 2, None, 1024), (4, 1, 4, 1024), (4, 2, 3, 4)])
def test_soft_capped_prefill_caps_every_score_in_blocks_of_queries(heads, kv_heads, window, block, monkeypatch):
    """Gemma 2's attention-logit soft-capping (cap 1.5: the random scores reach it), by query blocks of `block`."""
    monkeypatch.setattr("engine.core.attention.CAPPED_BLOCK", block)
    check("cpu", torch.float32, heads, kv_heads, window, 1e-5, softcap=1.5)
    _, _, _, _, uncapped, _, _ = run_packed("cpu", torch.float32, heads, kv_heads, window)
    _, _, _, _, capped, _, _ = run_packed("cpu", torch.float32, heads, kv_heads, window, 1.5)
    assert (capped - uncapped).abs().max() > 0.05, "the cap changes nothing here: the test would not see it"


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,window,softcap", [(8, 1, None, None), (8, 1, 4, None), (8, 2, None, None),
                                                           (4, 4, 3, None), (8, 2, None, 1.5), (8, 4, 3, 1.5)])
def test_packed_prefill_on_the_gpu_matches_the_reference(heads, kv_heads, window, softcap):
    from engine.core.attention import VarlenKernel

    query = torch.zeros(1, heads, 1, 32, device="cuda", dtype=torch.bfloat16)
    print("varlen kernel:", VarlenKernel.get(query, window) is not None and softcap is None)
    check("cuda", torch.bfloat16, heads, kv_heads, window, 2e-2, softcap)
