"""The LoRA expand for CUDA (Triton): out += (t * select) B^T in one kernel, where the torch form
(engine.core.lora.LoraTable.lora_add) masks t in one kernel and adds t B^T in another. A decode step's LoRA cost is
its small kernels' count (on an H200, a rank-16 LoRA on every linear of a Gemma-2B-shaped model, batch 256: the 72
maskings of a step took ~0.18 ms of its 1.4 ms of LoRA), so the masking rides in the expand. Same arithmetic as the
torch form: t * select is exact (select is 0 or 1), the products summed in float32, the sum added to out in float32
and rounded once to out's dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _masked_expand_kernel(out_ptr, t_ptr, select_ptr, b_ptr, M, N, W, stride_out, stride_t, stride_select,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    row_in, col_in, r_in = rows < M, cols < N, r < W
    rows64 = rows.to(tl.int64)[:, None]
    tr = row_in[:, None] & r_in[None, :]
    t = tl.load(t_ptr + rows64 * stride_t + r[None, :], mask=tr, other=0.0)
    s = tl.load(select_ptr + rows64 * stride_select + r[None, :], mask=tr, other=0.0)
    b = tl.load(b_ptr + cols.to(tl.int64)[None, :] * W + r[:, None], mask=r_in[:, None] & col_in[None, :], other=0.0)
    if IEEE:
        acc = tl.dot(t * s, b, input_precision="ieee")
    else:
        acc = tl.dot(t * s, b)
    at = out_ptr + rows64 * stride_out + cols[None, :]
    inside = row_in[:, None] & col_in[None, :]
    out = tl.load(at, mask=inside)
    tl.store(at, (out.to(tl.float32) + acc).to(out.dtype), mask=inside)


def masked_expand_cuda(out: torch.Tensor, t: torch.Tensor, select: torch.Tensor, b: torch.Tensor) -> None:
    """out [M, N] += (t [M, W] * select [M, W]) @ b [N, W]^T in place; every operand's last dimension contiguous
    (t may be a column slice of a wider tensor), b whole."""
    rows, width = t.shape
    size = out.shape[1]
    # Tiles timed per launch inside CUDA graphs on an H200 (bf16, rank 16): an output up to 4,096 wide is latency-
    # bound, and small tiles spread it over more SMs (256 rows x 2,048: 2.3 us against 2.7 with 64 x 128); a wider
    # one is bandwidth-bound (256 x 16,384: ~5.0 us, out read and written at ~3.2 TB/s, whatever the tile).
    if size <= 4096:
        block_m, block_n = (16 if rows <= 256 else 32), 64
    else:
        block_m, block_n = (16 if rows <= 16 else 32 if rows <= 64 else 64), 128
    block_r = max(16, triton.next_power_of_2(width))
    grid = (triton.cdiv(rows, block_m), triton.cdiv(size, block_n))
    _masked_expand_kernel[grid](out, t, select, b, rows, size, width, out.stride(0), t.stride(0), select.stride(0),
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, IEEE=out.dtype == torch.float32,
                                num_warps=4)
