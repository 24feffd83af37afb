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

from engine import attention, model_runner
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.models import resolve_model
from engine.tokenizer_worker import load_tokenizer

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


def step_times(core: EngineCore, prompts: list[list[int]], buckets: list[tuple[int, int]]) -> list[str]:
    """Fill the slots with running sequences, then replay each bucket's graph alone."""
    for i, ids in enumerate(prompts[:core.cache.num_slots]):
        core.add(request(10_000 + i, 64, 0.0), torch.tensor(ids, device=core.device))
    while core.scheduler.waiting:
        core.step()
    out = []
    for rows, columns in buckets:
        graph = core.runner._graphs.get((rows, columns))
        if graph is None:
            continue
        graph.replay_logits()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(20):
            graph.replay_logits()
        torch.cuda.synchronize()
        out.append(f"B{rows}/cols{columns} {(time.perf_counter() - started) / 20 * 1000:.2f} ms")
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
    p.add_argument("--no-compile", action="store_true", help="decoder layers run eagerly inside the graphs")
    p.add_argument("--no-decode-kernel", action="store_true", help="decode attention through SDPA with a mask")
    p.add_argument("--profile", action="store_true", help="print the kernels of one B256 decode step")
    args = p.parse_args()
    if args.no_compile:
        model_runner.compile_layers = lambda model: None
    attention.DecodeKernel.is_enabled = not args.no_decode_kernel
    config = EngineConfig(model=args.model, tokenizer=args.tokenizer, max_num_seqs=args.max_num_seqs,
                          max_model_len=args.max_model_len)
    source = resolve_model(config.model, config.tokenizer, config.cache_dir)
    started = time.perf_counter()
    core = EngineCore(config, source)
    startup = time.perf_counter() - started
    tok = load_tokenizer(source.tokenizer_dir)
    rng = random.Random(0)
    low, high = map(int, args.prompt_words.split(","))
    prompts = [tok(" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))).input_ids
               for _ in range(args.num_prompts)]
    passes = [timed_pass(core, prompts, args.new_tokens, t, 1000 * (k + 1)) for k, t in enumerate((0.0, 0.0, 0.8))]
    steps = step_times(core, prompts, [(64, 256), (64, 512), (256, 256), (256, 512)])
    print(f"{torch.cuda.get_device_name()} | startup {startup:.0f} s | greedy {passes[0]} | greedy again {passes[1]} | "
          f"t=0.8 {passes[2]} | " + " ".join(steps), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        graph = core.runner._graphs[(256, 512)]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.replay_logits()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
