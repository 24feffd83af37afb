"""Tune the Triton decode attention kernel: time it alone over a grid of (block_n, num_warps, num_stages, target
programs) for batch/length mixes like the workloads', and report the K/V bandwidth each reaches.

    python benchmarks/decode_kernel.py          # on a CUDA machine; prints one line per case and setting
"""

from __future__ import annotations

import itertools

import torch

from engine.attention_kernel import decode_attention

CASES = {  # name: (batch, lowest length, highest length, cache columns)
    "long B512": (512, 600, 1250, 1250),
    "short B512": (512, 20, 350, 350),
    "short B64": (64, 20, 350, 350),
}
HEADS, KV_HEADS, DIM = 8, 1, 256


def timed(fn, repeats: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    torch.manual_seed(0)
    grid = list(itertools.product((32, 64), (4, 8), (2, 3), (528, 1056, 2112)))
    for name, (batch, low, high, columns) in CASES.items():
        k = torch.randn(batch, KV_HEADS, columns + 1, DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(batch, HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16)
        positions = torch.randint(low, high, (batch,), device="cuda")
        read = int(positions.sum()) + batch
        nbytes = 2 * read * KV_HEADS * DIM * 2
        ref = decode_attention(q, k, v, positions, columns, DIM ** -0.5, None)
        results = []
        for block_n, warps, stages, target in grid:
            tuning = dict(block_n=block_n, num_warps=warps, num_stages=stages, target=target)
            out = decode_attention(q, k, v, positions, columns, DIM ** -0.5, None, tuning)
            err = (out.float() - ref.float()).abs().max().item()
            ms = timed(lambda: decode_attention(q, k, v, positions, columns, DIM ** -0.5, None, tuning))
            results.append((ms, tuning, err))
        results.sort(key=lambda r: r[0])
        default = next(r for r in results if r[1] == dict(block_n=32, num_warps=4, num_stages=2, target=528))
        print(f"{name}: default {default[0] * 1000:.0f} us ({nbytes / default[0] / 1e9:.0f} GB/s)", flush=True)
        for ms, tuning, err in results[:6]:
            print(f"   {ms * 1000:.0f} us {nbytes / ms / 1e9:.0f} GB/s {tuning} err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
