"""`python -m engine_bench`: engine-bench."""

import sys

from engine_bench.cli import bench_main

if __name__ == "__main__":  # the benchmark spawns processes, which may re-import this module
    sys.exit(bench_main())
