"""The intervention ops for CUDA (Triton): one program per token runs its whole op row (gates, projection slots; or
its ablations) in one launch, where the torch form (engine.core.interventions) takes ~10 kernels per gate, slot and
ablation at every layer of a decode step (on an H200, batch 512, Gemma-2B-shaped: a clamp at 3 layers halved the
decode speed). Unused slots, gates and ablations (row 0, zero vectors) are skipped, not computed as zeros; a token
without ops is copied (apply_ops) or left alone (ablate). Same arithmetic as the torch form, in float32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _apply_ops_kernel(x_ptr, out_ptr, rows_ptr, ints_ptr, floats_ptr, table_ptr, gates_ptr, hidden, stride_gate,
                      NUM_INTS: tl.constexpr, NUM_FLOATS: tl.constexpr, MAX_SLOTS: tl.constexpr,
                      MAX_GATES: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < hidden
    x_in = tl.load(x_ptr + t * hidden + cols, mask=inside)
    row = tl.load(rows_ptr + t)
    if row == 0:
        tl.store(out_ptr + t * hidden + cols, x_in, mask=inside)
    else:
        x = x_in.to(tl.float32)
        ints = ints_ptr + row * NUM_INTS
        floats = floats_ptr + row * NUM_FLOATS
        gates = gates_ptr + t * stride_gate
        for g in tl.static_range(MAX_GATES):
            sign = tl.load(floats + 4 * MAX_SLOTS + 2 * g + 1)
            if sign != 0:
                threshold = tl.load(floats + 4 * MAX_SLOTS + 2 * g)
                probe = tl.load(ints + 3 * MAX_SLOTS + g)
                v = tl.load(table_ptr + probe * hidden + cols, mask=inside, other=0.0)
                projection = tl.sum(x * v, 0)
                tl.store(gates + g + 1, ((projection - threshold) * sign > 0).to(tl.float32))
        for s in tl.static_range(MAX_SLOTS):
            b = tl.load(ints + 3 * s + 1)
            if b != 0:
                a = tl.load(ints + 3 * s)
                p = tl.load(floats + 4 * s)  # bias
                if a != 0:
                    va = tl.load(table_ptr + a * hidden + cols, mask=inside, other=0.0)
                    p += tl.sum(x * va, 0)
                theta = tl.load(floats + 4 * s + 1)
                lo = tl.load(floats + 4 * s + 2)
                hi = tl.load(floats + 4 * s + 3)
                f = tl.where(p > theta, p, 0.0)
                on = tl.load(gates + tl.load(ints + 3 * s + 2))
                vb = tl.load(table_ptr + b * hidden + cols, mask=inside, other=0.0)
                x += on * (tl.minimum(tl.maximum(f, lo), hi) - f) * vb
        tl.store(out_ptr + t * hidden + cols, x.to(x_in.dtype), mask=inside)


@triton.jit
def _ablate_kernel(w_ptr, rows_ptr, ints_ptr, floats_ptr, table_ptr, gates_ptr, hidden, stride_w, stride_gate,
                   NUM_INTS: tl.constexpr, NUM_FLOATS: tl.constexpr, ABLATE_INTS: tl.constexpr,
                   ABLATE_FLOATS: tl.constexpr, MAX_ABLATIONS: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + t)
    if row != 0:
        cols = tl.arange(0, BLOCK)
        inside = cols < hidden
        w_in = tl.load(w_ptr + t * stride_w + cols, mask=inside)
        x = w_in.to(tl.float32)
        ints = ints_ptr + row * NUM_INTS + ABLATE_INTS
        floats = floats_ptr + row * NUM_FLOATS + ABLATE_FLOATS
        for k in tl.static_range(MAX_ABLATIONS):
            direction = tl.load(ints + 2 * k)
            if direction != 0:
                on = tl.load(gates_ptr + t * stride_gate + tl.load(ints + 2 * k + 1))
                coef = tl.load(floats + k)
                d = tl.load(table_ptr + direction * hidden + cols, mask=inside, other=0.0)
                x -= on * coef * tl.sum(x * d, 0) * d
        tl.store(w_ptr + t * stride_w + cols, x.to(w_in.dtype), mask=inside)


def _launch_shape(hidden: int) -> tuple[int, int]:
    block = triton.next_power_of_2(hidden)
    return block, 4 if block <= 2048 else 8 if block <= 8192 else 16


def apply_ops_cuda(hidden: torch.Tensor, op_rows: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor,
                   table: torch.Tensor, gate_state: torch.Tensor, max_slots: int, max_gates: int) -> torch.Tensor:
    """engine.core.interventions.apply_ops in one kernel: hidden [1, T, H] -> a new [1, T, H]."""
    x = hidden.contiguous()
    size = x.shape[-1]
    out = torch.empty_like(x)
    rows = op_rows.reshape(-1)
    gates = gate_state.reshape(-1, gate_state.shape[-1])
    block, warps = _launch_shape(size)
    _apply_ops_kernel[(rows.numel(),)](x, out, rows, ints, floats, table, gates, size, gates.stride(0),
                                       NUM_INTS=ints.shape[1], NUM_FLOATS=floats.shape[1], MAX_SLOTS=max_slots,
                                       MAX_GATES=max_gates, BLOCK=block, num_warps=warps)
    return out


def ablate_cuda(write: torch.Tensor, op_rows: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor,
                table: torch.Tensor, gate_state: torch.Tensor, layout: tuple[int, int, int]) -> None:
    """engine.core.interventions.ablate in one kernel, in place on the write [1, T, H] (its last dimension
    contiguous, as a module's output is; checked by the caller)."""
    ablate_ints, ablate_floats, max_ablations = layout
    size = write.shape[-1]
    rows = op_rows.reshape(-1)
    gates = gate_state.reshape(-1, gate_state.shape[-1])
    block, warps = _launch_shape(size)
    _ablate_kernel[(rows.numel(),)](write, rows, ints, floats, table, gates, size, write.stride(-2), gates.stride(0),
                                    NUM_INTS=ints.shape[1], NUM_FLOATS=floats.shape[1], ABLATE_INTS=ablate_ints,
                                    ABLATE_FLOATS=ablate_floats, MAX_ABLATIONS=max_ablations, BLOCK=block,
                                    num_warps=warps)
