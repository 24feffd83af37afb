"""Tune the Triton decode attention kernel: time it alone over a grid of (block_n, num_warps, num_stages, target
programs) for batch/length mixes like the workloads', and report the K/V bandwidth each reaches and the settings
that do best over all the mixes.

    python benchmarks/decode_kernel.py          # on a CUDA machine; prints one line per case and setting
"""

from __future__ import annotations

import itertools

import torch

from engine.core.kernels.attention import decode_attention

CASES = {  # name: (batch, lowest length, highest length, cache columns)
    "long B512": (512, 600, 1250, 1250),
    "long B256": (256, 600, 1250, 1250),
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
    grid = [dict(block_n=b, num_warps=w, num_stages=s, target=t)
            for b, w, s, t in itertools.product((32, 64), (4, 8), (2, 3, 4), (264, 528, 1056, 2112))]
    relative = {i: [] for i in range(len(grid))}  # each setting's time over the case's best, per case
    for name, (batch, low, high, columns) in CASES.items():
        k = torch.randn(batch, KV_HEADS, columns + 1, DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(batch, HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16)
        positions = torch.randint(low, high, (batch,), device="cuda")
        read = int(positions.sum()) + batch
        nbytes = 2 * read * KV_HEADS * DIM * 2
        ref = decode_attention(q, k, v, positions, columns, DIM ** -0.5, None)
        results = []
        for i, tuning in enumerate(grid):
            out = decode_attention(q, k, v, positions, columns, DIM ** -0.5, None, tuning)
            err = (out.float() - ref.float()).abs().max().item()
            ms = timed(lambda: decode_attention(q, k, v, positions, columns, DIM ** -0.5, None, tuning))
            results.append((ms, i, err))
        best = min(r[0] for r in results)
        for ms, i, _ in results:
            relative[i].append(ms / best)
        default = timed(lambda: decode_attention(q, k, v, positions, columns, DIM ** -0.5, None))
        print(f"{name}: default {default * 1000:.0f} us ({nbytes / default / 1e6:.0f} GB/s of K/V)", flush=True)
        for ms, i, err in sorted(results, key=lambda r: r[0])[:4]:
            print(f"   {ms * 1000:.0f} us {nbytes / ms / 1e6:.0f} GB/s {grid[i]} err {err:.1e}", flush=True)
    print("over all cases (mean time over each case's best):")
    for i in sorted(relative, key=lambda i: sum(relative[i]))[:6]:
        print(f"   {sum(relative[i]) / len(CASES):.3f} {grid[i]} worst {max(relative[i]):.3f}", flush=True)


if __name__ == "__main__":
    main()
