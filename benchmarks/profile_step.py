"""Where a decode step's time goes: the engine core in-process on one GPU, with parts of the fast path switched off.

Not a replacement for engine-bench (no baselines, no pipeline): it times the core's step loop on a fixed set of
prompts, then replays single CUDA-graph decode steps per (batch, columns) bucket, and optionally prints the
step's kernels. The A/B table of the decode work in benchmarks/RESULTS.md comes from it:

    python benchmarks/profile_step.py --model random:gemma-2b --tokenizer tokenizer.json                # all on
    python benchmarks/profile_step.py ... --no-compile --no-decode-kernel                              # before
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from engine.core import attention, model_runner
from engine.config import EngineConfig
from engine.core.engine_core import EngineCore
from engine.models import resolve_model
from engine.models import load_hf_tokenizer

WORDS = "the a river mountain light question answer model token steering vector layer night city".split()


def request(index: int, max_new_tokens: int, temperature: float) -> dict:
    return dict(index=index, max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0,
                seed=index, ignore_eos=True, stop=[], steering=None)


def timed_pass(core: EngineCore, prompts: list[list[int]], new_tokens: int, temperature: float, first: int) -> str:
    torch.cuda.synchronize()
    started, steps = time.perf_counter(), 0
    for i, ids in enumerate(prompts):
        core.add(request(first + i, new_tokens, temperature), torch.tensor(ids, device=core.device))
    while core.has_work:
        core.step()
        steps += 1
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return f"{len(prompts) * new_tokens / seconds:,.0f} tok/s ({steps} steps, {seconds:.2f} s)"


def phase_times(core: EngineCore, prompts: list[list[int]], new_tokens: int) -> str:
    """One greedy pass with the GPU synchronised around every prefill and decode call (so slower than a real
    pass): where the time goes, and the prefill's achieved TFLOP/s at 2 x (non-embedding parameters) per token."""
    runner, spent = core.runner, {"prefill": [0.0, 0, 0], "decode": [0.0, 0, 0]}

    def timed(kind, call):
        def wrapper(arg):
            torch.cuda.synchronize()
            started = time.perf_counter()
            out = call(arg)
            torch.cuda.synchronize()
            entry = spent[kind]
            entry[0] += time.perf_counter() - started
            entry[1] += 1
            entry[2] += sum(s.num_prompt_tokens for s in arg) if kind == "prefill" else arg.num_rows
            return out
        return wrapper

    runner.prefill, runner.decode = timed("prefill", runner.prefill), timed("decode", runner.decode)
    started = time.perf_counter()
    for i, ids in enumerate(prompts):
        core.add(request(50_000 + i, new_tokens, 0.0), torch.tensor(ids, device=core.device))
    while core.has_work:
        core.step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    del runner.prefill, runner.decode
    params = sum(p.numel() for n, p in core.runner.model.named_parameters() if "embed" not in n)
    (p_s, p_n, p_tok), (d_s, d_n, d_rows) = spent["prefill"], spent["decode"]
    return (f"wall {wall:.2f} s | prefill {p_s:.2f} s in {p_n} calls, {p_tok:,} tokens, "
            f"{2 * params * p_tok / p_s / 1e12:.0f} TFLOP/s | decode {d_s:.2f} s in {d_n} steps "
            f"({d_s / max(d_n, 1) * 1000:.2f} ms/step, mean {d_rows / max(d_n, 1):.0f} rows) | "
            f"host and rest {wall - p_s - d_s:.2f} s")


def step_times(core: EngineCore, prompts: list[list[int]], buckets: list[tuple[int, int]]) -> list[str]:
    """Fill the KV rows with running sequences, then replay each bucket's graph alone."""
    for i, ids in enumerate(prompts[:core.cache.num_rows]):
        core.add(request(10_000 + i, 64, 0.0), torch.tensor(ids, device=core.device))
    while core.scheduler.waiting:
        core.step()
    out = []
    for rows, columns in buckets:
        graph = core.runner.graphs.by_key.get((rows, columns, None, False, False))  # unsteered, no capture, no LoRA
        if graph is None:
            continue
        graph.replay_logits()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(20):
            graph.replay_logits()
        torch.cuda.synchronize()
        out.append(f"B{rows}/cols{columns} {(time.perf_counter() - started) / 20 * 1000:.2f} ms")
    while core.has_work:  # finish them, so later profiles see only their own steps
        core.step()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:gemma-2b")
    p.add_argument("--tokenizer")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--prompt-words", default="20,200", help="min,max words per prompt")
    p.add_argument("--new-tokens", type=int, default=150)
    p.add_argument("--max-prefill-tokens", type=int, default=EngineConfig().max_prefill_tokens)
    p.add_argument("--no-compile", action="store_true", help="decoder layers run eagerly inside the graphs")
    p.add_argument("--no-decode-kernel", action="store_true",
                   help="decode attention through SDPA with a mask, K/V writes through index_put")
    p.add_argument("--profile", action="store_true", help="print the kernels of five decode steps over full slots")
    p.add_argument("--phases", action="store_true", help="also time prefill and decode apart (synchronised pass)")
    p.add_argument("--profile-prefill", action="store_true", help="print the kernels of the prefills of a pass")
    args = p.parse_args()
    if args.no_compile:
        model_runner.compile_layers = lambda model: None
    attention.TritonKernels.is_enabled = not args.no_decode_kernel
    config = EngineConfig(model=args.model, tokenizer=args.tokenizer, max_num_seqs=args.max_num_seqs,
                          max_model_len=args.max_model_len, max_prefill_tokens=args.max_prefill_tokens)
    source = resolve_model(config.model, config.tokenizer, config.cache_dir)
    started = time.perf_counter()
    core = EngineCore(config, source)
    startup = time.perf_counter() - started
    tok = load_hf_tokenizer(source.tokenizer_dir)
    rng = random.Random(0)
    low, high = map(int, args.prompt_words.split(","))
    prompts = [tok(" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))).input_ids
               for _ in range(args.num_prompts)]
    passes = [timed_pass(core, prompts, args.new_tokens, t, 1000 * (k + 1)) for k, t in enumerate((0.0, 0.0, 0.8))]
    steps = step_times(core, prompts, [(64, 256), (64, 512), (256, 256), (256, 512)])
    print(f"{torch.cuda.get_device_name()} | startup {startup:.0f} s | greedy {passes[0]} | greedy again {passes[1]} | "
          f"t=0.8 {passes[2]} | " + " ".join(steps), flush=True)
    if args.phases:
        print(phase_times(core, prompts, args.new_tokens), flush=True)
    if args.profile_prefill:
        from torch.profiler import ProfilerActivity, profile

        for i, ids in enumerate(prompts[:64]):
            core.add(request(90_000 + i, 1, 0.0), torch.tensor(ids, device=core.device))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            while core.has_work:
                core.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    if args.profile:  # five real decode steps with every KV row running the workload's prompts
        from torch.profiler import ProfilerActivity, profile

        for i, ids in enumerate(prompts[:core.cache.num_rows]):
            core.add(request(70_000 + i, 64, 0.0), torch.tensor(ids, device=core.device))
        while core.scheduler.waiting:
            core.step()
        for _ in range(3):
            core.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                core.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70))

if __name__ == "__main__":
    main()
