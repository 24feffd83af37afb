"""The engine-core process: the only code that touches CUDA. engine_core holds EngineCore (the step loop, usable in
one process), proc holds run_core (its process); scheduler and kv_cache batch sequences over KV rows; model_runner,
attention and kernels/ run the forwards; sampler samples; steering and activations act inside the layers."""
