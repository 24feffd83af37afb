"""Decode attention over the KV cache's rows for CUDA (Triton), split over the columns ("flash decoding").

Each program takes one (row, KV head, split): the G query heads that share the KV head attend together over the
split's columns, up to the row's own length (no padding to the bucket, no mask tensor), with an online softmax.
A second kernel merges the splits. Reads only the K/V a row really has, where SDPA over a power-of-two bucket with
a mask reads the whole bucket (1.36 ms of a 5.5 ms decode step at batch 256 on an H200).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tuned with benchmarks/decode_kernel.py (H100): best over the long/short x B512/B256 mixes, and best on `long`.
BLOCK_N = 64  # columns per inner iteration
NUM_WARPS, NUM_STAGES = 8, 3
TARGET_PROGRAMS = 264  # two programs per SM on a 132-SM card: at 512 rows one split a row, and no merge
DEFAULT_TUNING = {"block_n": BLOCK_N, "num_warps": NUM_WARPS, "num_stages": NUM_STAGES, "target": TARGET_PROGRAMS}
NO_WINDOW = 1 << 30


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, ml_ptr, out_ptr,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_ob, stride_oh,
                         scale, window, split_len, num_splits, group, softcap,
                         BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DIRECT: tl.constexpr,
                         SOFTCAP: tl.constexpr):
    row, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_kv = tl.num_programs(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    is_head = g < group
    q = tl.load(q_ptr + row * stride_qb + (kv_head * group + g)[:, None] * stride_qh + d[None, :],
                mask=is_head[:, None], other=0.0)
    length = tl.load(pos_ptr + row) + 1
    first = tl.maximum(length - window, 0)
    start = tl.maximum(split * split_len, first)
    end = tl.minimum((split + 1) * split_len, length)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
    base = row * stride_kb + kv_head * stride_kh
    for col in range(start, end, BLOCK_N):
        cols = col + n
        inside = cols < end
        offs = base + cols[:, None] * stride_kn + d[None, :]
        k = tl.load(k_ptr + offs, mask=inside[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        if SOFTCAP:  # Gemma 2: softcap * tanh(scores / softcap), tanh(x) = 2 / (1 + exp(-2x)) - 1
            scores = softcap * (2.0 / (1.0 + tl.exp(-2.0 * scores / softcap)) - 1.0)
        scores = tl.where(inside[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs, mask=inside[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    if DIRECT:  # one split: this program has the whole row, so it writes the output and no merge runs
        heads = kv_head * group + g
        tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=is_head[:, None])
    else:
        part = ((row * num_kv + kv_head) * num_splits + split) * BLOCK_G + g
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=is_head[:, None])
        tl.store(ml_ptr + part * 2, m)
        tl.store(ml_ptr + part * 2 + 1, l)


@triton.jit
def _merge_splits_kernel(acc_ptr, ml_ptr, out_ptr, stride_ob, stride_oh, num_splits, group,
                         BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr):
    row, kv_head = tl.program_id(0), tl.program_id(1)
    num_kv = tl.num_programs(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
    for split in range(num_splits):
        part = ((row * num_kv + kv_head) * num_splits + split) * BLOCK_G + g
        m_s = tl.load(ml_ptr + part * 2)
        l_s = tl.load(ml_ptr + part * 2 + 1)
        m_new = tl.maximum(m, m_s)
        # An empty split has m_s = -inf: its weight is exp(-inf) = 0 (guard -inf - -inf when all are empty so far).
        a = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        b = tl.where(m_new == float("-inf"), 0.0, tl.exp(m_s - m_new))
        acc_s = tl.load(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=(g < group)[:, None], other=0.0)
        acc = acc * a[:, None] + acc_s * b[:, None]
        l = l * a + l_s * b
        m = m_new
    result = acc / l[:, None]
    heads = kv_head * group + g
    tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
             result.to(out_ptr.dtype.element_ty), mask=(g < group)[:, None])


def num_splits(batch: int, kv_heads: int, read_len: int, target: int = TARGET_PROGRAMS, block_n: int = BLOCK_N) -> int:
    """Column splits per (row, KV head): enough programs to fill the card, at least block_n columns each."""
    wanted = triton.cdiv(target, batch * kv_heads)
    return max(1, min(wanted, read_len // block_n))


def supports(query: torch.Tensor) -> bool:
    """Whether this kernel runs these queries: 16-bit CUDA tensors and a power-of-two head size."""
    dim = query.shape[-1]
    return query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and dim >= 16 and dim & (dim - 1) == 0


def decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     read_len: int, scale: float, window: int | None, tuning: dict | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    """query [B, H, 1, D]; caches [S, KVH, max_len + 1, D]; row b attends columns [0, positions[b]] (within the
    window) -> [B, 1, H, D]. Static shapes for a given (B, read_len), so it is captured in CUDA graphs. `softcap`:
    scores are soft-capped (softcap * tanh(scores / softcap)) before the softmax.
    `tuning` (block_n, num_warps, num_stages, target) overrides the defaults, for benchmarks/decode_kernel.py."""
    t = {**DEFAULT_TUNING, **(tuning or {})}
    batch, heads, _, dim = query.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    block_g = max(16, triton.next_power_of_2(group))
    splits = num_splits(batch, kv_heads, read_len, t["target"], t["block_n"])
    split_len = triton.cdiv(triton.cdiv(read_len, splits), t["block_n"]) * t["block_n"]
    direct = splits == 1
    parts = 1 if direct else batch * kv_heads * splits * block_g  # one split writes no partial results
    acc = torch.empty(parts, dim, dtype=torch.float32, device=query.device)
    ml = torch.empty(parts, 2, dtype=torch.float32, device=query.device)
    out = torch.empty(batch, 1, heads, dim, dtype=query.dtype, device=query.device)
    q = query[:, :, 0]
    if q.stride(-1) != 1:
        q = q.contiguous()
    _decode_split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, positions, acc, ml, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(2),
        scale, window or NO_WINDOW, split_len, splits, group, float(softcap or 1.0),
        BLOCK_G=block_g, BLOCK_N=t["block_n"], HEAD_DIM=dim, DIRECT=direct, SOFTCAP=bool(softcap),
        num_warps=t["num_warps"], num_stages=t["num_stages"])
    if not direct:
        _merge_splits_kernel[(batch, kv_heads)](acc, ml, out, out.stride(0), out.stride(2), splits, group,
                                                BLOCK_G=block_g, HEAD_DIM=dim, num_warps=4)
    return out


@triton.jit
def _write_kv_kernel(k_cache_ptr, v_cache_ptr, key_ptr, value_ptr, row_ptr, col_ptr,
                     stride_cr, stride_ch, stride_cn, stride_kt, stride_kh, stride_vt, stride_vh, kv_heads,
                     BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    row, col = tl.load(row_ptr + token), tl.load(col_ptr + token)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    mask = (h < kv_heads)[:, None]
    dst = row * stride_cr + col * stride_cn + h[:, None] * stride_ch + d[None, :]
    key = tl.load(key_ptr + token * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    value = tl.load(value_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, key, mask=mask)
    tl.store(v_cache_ptr + dst, value, mask=mask)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
             key: torch.Tensor, value: torch.Tensor) -> None:
    """k_cache[rows[t], :, cols[t]] = key[t] (and V), for key/value [N, KVH, D]: one launch for both caches where
    two index_put calls took 4.3 us each for 512 decode rows (H100), mostly launch and indexing overhead."""
    tokens, kv_heads, dim = key.shape
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    _write_kv_kernel[(tokens,)](k_cache, v_cache, key, value, rows, cols,
                                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                key.stride(0), key.stride(1), value.stride(0), value.stride(1), kv_heads,
                                BLOCK_H=triton.next_power_of_2(kv_heads), HEAD_DIM=dim, num_warps=1)
