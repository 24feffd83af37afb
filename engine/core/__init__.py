"""The engine-core process: the only code that touches CUDA. engine_core holds EngineCore (the step loop, usable in
one process), with startup (the device, the model, the compile cache) and admission (requests into sequences); proc
holds run_core (its process); scheduler and kv_cache batch sequences over KV rows; model_runner, decode_graphs,
attention and kernels/ run the forwards, warmup compiles them at start-up, faults finds and words what breaks them;
sampler samples; steering and activations act inside the layers."""
