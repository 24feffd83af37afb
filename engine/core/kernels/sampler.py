"""Fused Gumbel-max sampling for CUDA (Triton): one pass over each row's logits, no [B, V] temporaries.

Computes exactly what `Sampler` computes in PyTorch (same hash, same uniforms, same division), in one kernel
instead of about a dozen full-size elementwise passes (3.4 ms at batch 256 x 262k vocabulary on an H200).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gumbel_argmax_kernel(logits_ptr, stride, temp_ptr, key_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    temp = tl.maximum(tl.load(temp_ptr + row), 1e-5)
    key = tl.load(key_ptr + row).to(tl.uint32)
    best_val = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int64)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < vocab
        x = tl.load(logits_ptr + row * stride + offs, mask=inside, other=float("-inf"))
        h = offs.to(tl.uint32) ^ key
        h = h ^ (h >> 16)
        h = h * 0x85EBCA6B
        h = h ^ (h >> 13)
        h = h * 0xC2B2AE35
        h = h ^ (h >> 16)
        u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        # div_rn: IEEE division as PyTorch's (Triton's `/` on float32 is div.full, up to 2 ulp off)
        v = tl.math.div_rn(x.to(tl.float32), temp) - tl.log(-tl.log(u))
        v = tl.where(inside, v, float("-inf"))
        block_max = tl.max(v, axis=0)
        block_idx = tl.argmax(v, axis=0).to(tl.int64) + start
        better = block_max > best_val
        best_idx = tl.where(better, block_idx, best_idx)
        best_val = tl.where(better, block_max, best_val)
    tl.store(out_ptr + row, best_idx)


def gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """argmax(logits / temperature + gumbel(key, token)) per row; logits [B, V] with unit stride, float32 or a
    16-bit float (widened to float32 as they are loaded, as `logits.float()` does)."""
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    _gumbel_argmax_kernel[(logits.shape[0],)](logits, logits.stride(0), temperature, key, out, logits.shape[1],
                                              BLOCK=4096, num_warps=8)
    return out
