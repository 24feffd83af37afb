"""The runner's start-up work, so that no step pays for it: the decoder layers through torch.compile, compiled on a
full prefill row (from the persistent compile cache where it can be), and the fused sampler kernel. The functions'
`runner` is the ModelRunner that warms up."""

from __future__ import annotations

import logging

import torch

from engine.core.faults import is_device_error
from engine.core.sampler import SamplingMetadata
from engine.core.scheduler import Sequence
from engine.models import decoder_layers

log = logging.getLogger("engine")


def compile_layers(model) -> None:
    """Run each decoder layer's forward through torch.compile, which fuses its elementwise work (norms, rotary,
    activation, residual adds: ~30 small kernels a layer, 2.2 ms of a 5.5 ms decode step at batch 256 on an
    H200) into a few kernels; prefill too, where they are memory-bound passes over [tokens, 16k] tensors. The
    attention call stays eager (engine_attention is excluded) and forward hooks (steering, capture) stay outside."""
    # Variants: one row (prefill, packed) or several (decode), one token or more, per layer type; the default
    # limit of 8 would silently leave some layers eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # Python floats (the attention scale, norm epsilons) as constants, as the model has them: traced as dynamic
    # inputs, one of them reached the attention op as a float and dynamo traced the first variant twice.
    torch._dynamo.config.specialize_float = True
    for layer in decoder_layers(model):
        layer.forward = torch.compile(layer.forward, dynamic=True)


def warm_sampler(runner) -> None:
    """Compile the fused sampler kernel now, not in the middle of the first sampled step (~1-2 s)."""
    if runner.device.type != "cuda":
        return
    vocab = runner.model.config.get_text_config().vocab_size
    rows = [(1.0, 1.0, 0, 0)]
    runner.sampler(torch.zeros(1, vocab, device=runner.device), SamplingMetadata.build(rows, runner.device),
                   torch.zeros(1, dtype=torch.int64, device=runner.device))


def warm_compiled(runner, max_prefill_tokens: int, compile_cache) -> None:
    """Compile now (from the persistent cache when it has this model), once more afresh if compiling with the
    cache's artefacts fails: a cache that passed its checks but still does not load costs a cold start-up."""
    try:
        _warm_prefill(runner, max_prefill_tokens)
    except Exception as exc:  # noqa: BLE001 - retried once without the cache; a second failure propagates
        if is_device_error(exc):
            raise
        log.warning("compiling the decoder layers failed (%s: %s)", type(exc).__name__, exc)
        compile_cache.discard()
        torch._dynamo.reset()
        _warm_prefill(runner, max_prefill_tokens)


def _warm_prefill(runner, max_prefill_tokens: int) -> None:
    """Compile the layers now, not in a run's first prefill: one full packed row. Prefill and decode both run
    [1, tokens, hidden] rows of at least two tokens (a one-token prefill is padded, decode buckets start at 2),
    so this one graph serves every step. The full row comes first because Inductor tunes a dynamic-shape kernel
    for the sizes it first sees: warmed on a 2-token row, the prefill's GELU x up kernel ran at half speed on
    7k-token rows (H100). Writes K/V only into KV rows no sequence owns yet."""
    per_seq = min(runner.cache.max_len, max_prefill_tokens)
    count = min(runner.cache.num_rows, -(-max_prefill_tokens // per_seq))
    runner.prefill_logits([placeholder(per_seq, row, runner.device) for row in range(count)])


def placeholder(num_tokens: int, row: int, device) -> Sequence:
    """A prompt of token 0s that no request owns: the compile warm-up's rows, and the pad of a one-token prefill."""
    return Sequence(index=-1, prompt_ids=torch.zeros(num_tokens, dtype=torch.int64, device=device), max_new_tokens=1,
                    temperature=0.0, top_p=1.0, top_k=0, seed=0, ignore_eos=True, stop=[], row=row)
