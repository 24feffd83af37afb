"""engine-bench: the benchmark harness beside the engine (workloads, baselines, the steady-state runner, the
whole-command e2e mode, reports). The engine never imports it."""
