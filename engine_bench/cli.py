"""engine-bench: the same prompts through the naive loop, the batched HF loop and the engine, side by side.

Each system runs in its own spawned process (the baselines share one: naive, then each HF batch size), so
CPU time, GPU memory and start-up belong to that system alone. The parent samples the card through NVML and
turns each system's timed window into metrics; the JSON, Markdown table and PNG chart are written per workload.
With --e2e (engine_bench/e2e.py) each system runs instead as the whole command a user would type, cold and warm.
"""
# The command line: flags -> BenchConfig -> the steady-state runner (runner.py) or the whole-command mode (e2e.py).

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from engine.config import CAPTURE_POSITIONS, DTYPES, ConfigError
from engine.models import ModelNotFound
from engine_bench.config import RESULTS_FILE, SYSTEMS, BenchConfig, BenchError, bench_engine, csv_list
from engine_bench.e2e import run_e2e
from engine_bench.interventions import INTERVENTIONS
from engine_bench.runner import run_bench
from engine_bench.serve import run_serve
from engine_bench.workloads import WORKLOADS, WorkloadError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers like 64,128,256") from None


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:gemma-2b", help="random:<preset> | local HF dir | file.gguf | embedded")
    p.add_argument("--tokenizer", help="tokenizer.json (or its dir) to use instead of the model's")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--devices", default="", metavar="all|0,1,...",
                   help="run the engine with one core per device (all, 0,1, cuda:0,cuda:1 or cpu,cpu); the naive "
                        "and HF loops run on the first")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--workload", type=csv_list, help=f"comma list of {', '.join(WORKLOADS)} (default short)")
    p.add_argument("--input", help="JSONL of {\"prompt\": ..., \"max_new_tokens\"?: N} instead of a workload")
    p.add_argument("--systems", type=csv_list, default=list(SYSTEMS), help="comma list of naive, hf, engine")
    p.add_argument("--num-prompts", type=int, default=256, help="prompts per workload (an --input file: at most)")
    p.add_argument("--naive-prompts", type=int, default=8,
                   help="the naive loop runs the first N prompts; the rest is extrapolated")
    p.add_argument("--batch-sizes", type=_ints, default=[64, 128, 256], help="batch sizes of the HF loop")
    p.add_argument("--max-num-seqs", type=int, help="the engine's sequences decoded together (default 256; with --e2e, "
                   "engine-run's own default unless given)")
    p.add_argument("--max-model-len", type=int, help="the engine's prompt + new tokens limit (default: the "
                   "workload's longest)")
    p.add_argument("--gpu-memory-fraction", type=float,
                   help="the engine's share of the card's memory (its KV cache is sized to fit; default 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=150, help="for --input records without their own")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (and completions are compared)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="workload and sampling seed")
    p.add_argument("--sample-hz", type=float, default=20.0, help="NVML sampling rate (>= 10)")
    p.add_argument("--out", default="bench-out", help="directory for the JSON, Markdown and PNG of each run")
    p.add_argument("--append-results", nargs="?", const=RESULTS_FILE, metavar="FILE",
                   help=f"append each run's table to FILE (default {RESULTS_FILE})")
    p.add_argument("--save-outputs", action="store_true", help="also write every system's completions as JSONL")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--steering-specs", type=_ints, default=[],
                   help="also run the engine with N distinct steering vectors (prompt i gets vector i %% N), one row "
                        "per N in a comma list like 1,256, to measure the overhead; with --e2e, engine-run steered "
                        "(cache warm) after its unsteered runs")
    p.add_argument("--steering-layers", type=_ints, default=[4, 8, 12], help="layers those vectors steer")
    p.add_argument("--capture-layers", type=_ints, default=[],
                   help="also run the engine capturing activations at these layers, to measure the overhead")
    p.add_argument("--capture-positions", default="last_prompt", help=f"what that run captures: "
                   f"{', '.join(CAPTURE_POSITIONS)}")
    p.add_argument("--interventions", type=csv_list, default=[], metavar="OPS",
                   help="also run the engine with every record under each of these ops, one row each, in the same "
                        "run: " + "; ".join(f"{name}: {what}" for name, what in INTERVENTIONS.items())
                   .replace("%", "%%"))  # argparse formats help with %
    p.add_argument("--also-model", action="append", default=[], metavar="MODEL",
                   help="also run the engine on MODEL in the same run, with the same tokenizer and prompts "
                        "(repeatable): e.g. random:gemma2-2b-uncapped, random:gemma2-2b's weights with soft-capping "
                        "off, for what capping costs")
    p.add_argument("--trace", metavar="DIR", help="write the engine cores' loop timelines (core<N>.jsonl: admission, "
                   "launch and wait per step, GC pauses) and each engine run's window (runs.jsonl) to DIR")
    p.add_argument("--e2e", action="store_true",
                   help="time whole commands instead: engine-run, and the batched HF loop as a user's script at each "
                        "batch size, each a fresh process from start to exit, on empty caches (cold) and again (warm); "
                        "with --steering-specs, engine-run steered too (warm), against its plain warm run")
    p.add_argument("--keep-alive", action="store_true",
                   help="with --e2e, engine-run --keep-alive too: once starting its resident engine (caches warm), "
                        "then again with that engine loaded (its rows: cache warm, then loaded)")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="adapter rows: a second engine with a random rank-R LoRA on every linear layer loaded, the "
                        "prompts with none of them on it, then every other one on it (engine_bench/lora.py)")
    p.add_argument("--serve", action="store_true",
                   help="engine-serve under load instead: --serve-clients streaming clients send the workload's "
                        "prompts for --serve-seconds after --serve-warmup, beside engine-run on the same prompts at "
                        "the same concurrency and at its default (engine_bench/serve.py)")
    p.add_argument("--serve-clients", type=int, default=64, help="--serve: concurrent streaming clients (default 64)")
    p.add_argument("--serve-seconds", type=float, default=60.0, help="--serve: the measured window (default 60)")
    p.add_argument("--serve-warmup", type=float, default=10.0, help="--serve: load before the window (default 10)")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    if args.input is not None and args.workload is not None:
        raise ConfigError("give --workload or --input, not both")
    # Engine settings left out keep BenchConfig's defaults here and engine-run's own under --e2e.
    given = {name: getattr(args, name) for name in ("max_num_seqs", "gpu_memory_fraction")
             if getattr(args, name) is not None}
    engine = bench_engine(model=args.model, tokenizer=args.tokenizer, device=args.device, devices=args.devices,
                          dtype=args.dtype, max_model_len=args.max_model_len, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                          trace=args.trace, **given)
    return BenchConfig(
        engine=engine, device=args.device,
        workloads=args.workload or ([] if args.input else ["short"]), input=args.input, systems=args.systems,
        num_prompts=args.num_prompts, naive_prompts=args.naive_prompts, batch_sizes=args.batch_sizes,
        sample_hz=args.sample_hz, out=args.out, append_results=args.append_results,
        is_saving_outputs=args.save_outputs, is_quiet=args.quiet, steering_specs=args.steering_specs,
        steering_layers=args.steering_layers, capture_layers=args.capture_layers,
        capture_positions=args.capture_positions, interventions=args.interventions, also_models=args.also_model,
        is_e2e=args.e2e, is_keep_alive=args.keep_alive, engine_flags_given=list(given), is_serve=args.serve,
        lora_rank=args.lora_rank, serve_clients=args.serve_clients, serve_seconds=args.serve_seconds,
        serve_warmup_s=args.serve_warmup,
    )


def bench_main(argv: list[str] | None = None) -> int:
    args = bench_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        config = config_from_args(args)
        command = shlex.join(["engine-bench", *(sys.argv[1:] if argv is None else argv)])
        if config.is_serve:
            reports = run_serve(config, command)
        elif config.is_e2e:
            reports = run_e2e(config, command)
        else:
            reports = run_bench(config)
    except (BenchError, ConfigError, ModelNotFound, WorkloadError) as exc:
        print(f"engine-bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("engine-bench: interrupted", file=sys.stderr)
        return 130
    return 1 if any(r["errors"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(bench_main())
