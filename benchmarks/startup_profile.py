"""Where an engine core's start-up goes: builds one EngineCore in this process under cProfile and prints its phases
(engine.core.trace.Phases) and the functions that took the time. Run it twice with one ENGINE_CACHE_DIR for the cold
and the warm start-up (the compile cache fills on the first run):

    ENGINE_CACHE_DIR=/tmp/c python benchmarks/startup_profile.py --model random:gemma-2b --tokenizer tok.json
    python -X importtime benchmarks/startup_profile.py ... 2> imports.txt      # the import tree as well

Not a benchmark row (engine-bench --e2e times whole commands); a profile, for deciding what to cut next.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:gemma-2b")
    p.add_argument("--tokenizer")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, help="as engine-run's (default: the model's), so a warm compile cache "
                   "made by engine-run is the one used")
    p.add_argument("--callees", action="append", default=[], metavar="REGEX",
                   help="also print what the functions matching REGEX spent their time in (repeatable), e.g. "
                        "from_pretrained or warm_compiled")
    p.add_argument("--top", type=int, default=40, help="functions to print, by cumulative and by own time")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--no-profile", action="store_true", help="phases and the compiler's own times only, without "
                   "cProfile's overhead")
    args = p.parse_args()
    profile = cProfile.Profile()
    started = time.perf_counter()
    if not args.no_profile:
        profile.enable()
    from engine.config import EngineConfig
    from engine.core.engine_core import EngineCore
    from engine.core.hf_imports import skip_unused_imports
    from engine.models import resolve_model

    config = EngineConfig(model=args.model, tokenizer=args.tokenizer, device=args.device,
                          max_model_len=args.max_model_len, compile=args.compile)
    skip_unused_imports(config.cache_dir)  # as run_core does
    core = EngineCore(config, resolve_model(config.model, config.tokenizer, config.cache_dir))
    profile.disable()
    print(f"start-up {time.perf_counter() - started:.2f} s in this process; phases {core.phases.seconds}; "
          f"graphs {core.runner.graph_stats}")
    print_compiler_times()
    if args.no_profile:
        core.close()
        return
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(order).print_stats(args.top)
        print(out.getvalue())
    for pattern in args.callees:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_callees(pattern)
        print(out.getvalue())
    core.close()


def print_compiler_times() -> None:
    """torch.compile's own account: seconds per compiler phase (dynamo, AOTAutograd, Inductor, cache loads) and
    its cache counters."""
    import sys

    if "torch._dynamo" not in sys.modules:
        return
    from torch._dynamo.utils import compile_times, counters

    print(compile_times(repr="str", aggregate=True))
    for group in ("inductor", "aot_autograd", "stats"):
        if counters.get(group):
            print(group, dict(counters[group]))


if __name__ == "__main__":
    main()
