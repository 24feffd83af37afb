"""What the engine core's start-up loads and opens: the device and dtype, the model (the compiler's modules imported
while its weights are copied to the device) and its end-of-sequence ids, and the persistent compile cache."""

from __future__ import annotations

import importlib
import logging
import threading

import torch

from engine.config import EngineConfig
from engine.core.compile_cache import CompileCache, cache_key
from engine.core.trace import Phases
from engine.models import ModelSource, load_model, resolve_device, resolve_dtype, tokenizer_facts

log = logging.getLogger("engine")

# Imported in a thread while the weights are copied to the device (copies that leave the GIL free): the compiler's
# modules, ~1 s of a core's start-up on one GPU host, then cost nothing in front of the compile.
COMPILER_MODULES = ("torch._inductor.async_compile", "torch._inductor.codecache", "torch._inductor.compile_fx")
# What the compile would otherwise start on the core's path, started from the same thread: Inductor's compile
# workers (each imports torch) and the hash of torch's sources that keys its caches (~45 MB read, 1.3 s cold).
COMPILER_WARMUPS = ("maybe_warm_pool", "torch_key")


def load_core_model(config: EngineConfig, source: ModelSource, phases: Phases) -> tuple:
    """(device, dtype, model, eos_ids): the model loaded in the configured dtype onto the configured device (made the
    current one), and the end-of-sequence ids of the model and of its tokenizer."""
    device = resolve_device(config.device)
    if torch.device(device).index is not None:  # Triton kernels and CUDA graphs use the current device
        torch.cuda.set_device(device)
    dtype = resolve_dtype(config.dtype, device)
    tok = tokenizer_facts(source.tokenizer_dir, config.cache_dir)
    phases.done("tokenizer")
    preimport = _preimport(COMPILER_MODULES) if is_compiling(config, device) else None
    model = load_model(source, dtype, device, vocab_size=tok["vocab_size"])
    if preimport is not None:
        preimport.join()
    phases.done("load")
    eos_ids = _as_set(model.generation_config.eos_token_id) | _as_set(tok["eos_token_id"])
    return device, dtype, model, eos_ids


def open_compile_cache(config: EngineConfig, model_config, dtype: torch.dtype, device: str) -> CompileCache | None:
    """The persistent compile cache, opened, when the decoder layers are compiled (EngineConfig.compile), else
    None. It replaces any TORCHINDUCTOR_CACHE_DIR in this process: torch itself sets that variable once Inductor
    has looked for its cache, so a value found here need not be the user's."""
    if not is_compiling(config, device):
        return None
    cache = CompileCache(config.cache_dir, cache_key(model_config, dtype, device))
    cache.open()
    return cache


def is_compiling(config: EngineConfig, device: str) -> bool:
    """Whether the decoder layers are compiled on `device` (EngineConfig.compile)."""
    mode = config.compile
    return mode == "on" or (mode == "auto" and not config.enforce_eager and device != "cpu")


def _preimport(modules: tuple[str, ...]) -> threading.Thread:
    """Import `modules` in a started thread and run their COMPILER_WARMUPS; one that fails is imported or run again,
    and fails, where used."""
    def run() -> None:
        for name in modules:
            try:
                module = importlib.import_module(name)
            except ImportError as exc:
                log.debug("importing %s ahead failed: %s", name, exc)
                continue
            for warmup in COMPILER_WARMUPS:
                try:
                    getattr(module, warmup, lambda: None)()
                except Exception as exc:  # noqa: BLE001 - the compile runs it again where it is needed, and reports
                    log.debug("%s.%s ahead failed: %s", name, warmup, exc)

    thread = threading.Thread(target=run, name="preimport", daemon=True)
    thread.start()
    return thread


def _as_set(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, (list, tuple)) else {int(value)}
