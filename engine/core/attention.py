"""The engine's attention, registered with transformers' attention interface as "engine".

The model code (projections, norms, rotary, MLP) stays Hugging Face's; only the attention call comes here.
The model runner fills a ForwardContext before each forward: which KV row each token belongs to, where its K/V
goes, and where each prompt lies. Prefill is the new prompts packed end to end in one row (no padding),
attended per prompt with a causal variable-length kernel; decode is one token for each of the first B KV rows,
packed in one row the same way (static shapes, so it can be captured in a CUDA graph). Both run the same layer
code on a [1, tokens, hidden] row, so the compiled layers have one graph for both.
"""

from __future__ import annotations

import bisect
import inspect
import logging
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.core.kv_cache import KVCache
from engine.models import decoder_layers

log = logging.getLogger("engine")

NAME = "engine"
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
CACHE_BUFFERS = ("engine_k_cache", "engine_v_cache")  # bind_cache's buffer names on an attention module
CAPPED_BLOCK = 2048  # queries per block of a soft-capped prefill


@dataclass(slots=True)
class ForwardContext:
    cache: KVCache | None = None
    is_prefill: bool = False
    rows: torch.Tensor | None = None  # prefill: [N] KV row of each packed token; decode: [B] 0..B-1 (KV row b)
    write_pos: torch.Tensor | None = None  # prefill: [N] column of each token; decode: [B] (trash for idle KV rows)
    spans: list = field(default_factory=list)  # prefill: (start, length) of each prompt in the packed row
    cu_lens: torch.Tensor | None = None  # prefill: int32 [P + 1] prompt boundaries (the varlen kernel's cu_seqlens)
    prompt_of: torch.Tensor | None = None  # prefill: [N] index of each packed token's prompt
    masks: dict = field(default_factory=dict)  # decode: window (None = full) -> bool mask for SDPA
    read_len: int = 0  # decode: how many cache columns to attend over (a bucket >= every length)
    positions: torch.Tensor | None = None  # decode: [B] position of each row's token (its length - 1)


CONTEXT = ForwardContext()


def unsupported_reason(model_config) -> str | None:
    """Why the engine's attention cannot run this model exactly, or None."""
    c = model_config.get_text_config()
    if getattr(c, "use_bidirectional_attention", False):
        return f"{c.model_type}: bidirectional attention is not a causal LM"
    return None


def engine_attention(module, query, key, value, attention_mask, scaling=None, sliding_window=None, softcap=None,
                     **kwargs):
    """HF attention-interface entry: query [B, H, T, D], key/value [B, KVH, T, D] -> ([B, T, H, D], None).
    `softcap` (Gemma 2's attn_logit_softcapping): scores become softcap * tanh(scores / softcap) before the softmax.

    Inside a compiled decoder layer it is one opaque op (engine::attention) over the layer's cache tensors, which
    bind_cache made buffers of the attention module: no graph break, so a layer is one graph, not four, and the
    layers share it (a buffer is a graph input, where the layer's index would be a constant guarded per layer)."""
    k_cache = getattr(module, CACHE_BUFFERS[0], None)
    if k_cache is not None and torch.compiler.is_compiling():
        v_cache = getattr(module, CACHE_BUFFERS[1])
        return torch.ops.engine.attention(query, key, value, k_cache, v_cache, sliding_window or 0, scaling,
                                          softcap or 0.0), None
    return _eager_attention(module, query, key, value, scaling, sliding_window, softcap)


@torch.compiler.disable  # a compiled layer whose module has no bound cache calls it eagerly (a graph break)
def _eager_attention(module, query, key, value, scaling, sliding_window, softcap):
    layer = module.layer_idx
    return _attend(query, key, value, CONTEXT.cache.k[layer], CONTEXT.cache.v[layer], sliding_window or None,
                   scaling, softcap or None), None


def _attend(query, key, value, k_cache, v_cache, window, scaling, softcap=None):
    ctx = CONTEXT
    if ctx.is_prefill:
        return _prefill(query, key, value, k_cache, v_cache, ctx, window, scaling, softcap)
    return _decode(query, key, value, k_cache, v_cache, ctx, window, scaling, softcap)


@torch.library.custom_op("engine::attention", mutates_args=())
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, window: int, scaling: float | None, softcap: float) -> torch.Tensor:
    """The engine's attention as compiled layers see it. It writes the step's K/V into the caches, which no other
    op of a layer's graph reads, so declaring no mutation cannot reorder anything that matters (and keeps
    functionalization from copying the caches). softcap 0: none."""
    return _attend(query, key, value, k_cache, v_cache, window or None, scaling, softcap or None).contiguous()


@_attention_op.register_fake
def _(query, key, value, k_cache, v_cache, window, scaling, softcap):
    batch, heads, tokens, dim = query.shape
    return query.new_empty(batch, tokens, heads, dim)


def bind_cache(model, cache: KVCache) -> None:
    """Give each decoder layer's attention module its cache tensors as (non-persistent) buffers, for the compiled
    path of engine_attention; a model whose layers have no `self_attn` with a `layer_idx` keeps the eager call."""
    for layer in decoder_layers(model):
        attn = getattr(layer, "self_attn", None)
        if not isinstance(attn, torch.nn.Module) or not isinstance(getattr(attn, "layer_idx", None), int):
            continue
        attn.register_buffer(CACHE_BUFFERS[0], cache.k[attn.layer_idx], persistent=False)
        attn.register_buffer(CACHE_BUFFERS[1], cache.v[attn.layer_idx], persistent=False)


def _prefill(query, key, value, k_cache, v_cache, ctx: ForwardContext, window, scaling, softcap=None):
    """query [1, H, N, D], key/value [1, KVH, N, D]: the prompts packed end to end -> [1, N, H, D]."""
    keys, values = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [N, KVH, D]
    _write_kv(k_cache, v_cache, ctx.rows, ctx.write_pos, keys, values)
    if softcap is not None:  # no fused kernel here soft-caps: the scores are computed, capped and softmaxed
        return _capped_packed(query, key, value, ctx, window, scaling, softcap).transpose(1, 2)
    varlen = VarlenKernel.get(query, window)
    if varlen is not None:
        longest = max(length for _, length in ctx.spans)
        return varlen(query[0].transpose(0, 1), keys, values, ctx.cu_lens, longest, window, scaling)[None]
    # One causal SDPA per prompt: no padding, and flash or efficient kernels apply (no mask) where available.
    with sdpa_kernel(_prefill_backends()):
        out = torch.cat([_causal(query[:, :, a:a + n], key[:, :, a:a + n], value[:, :, a:a + n], window, scaling)
                         for a, n in ctx.spans], dim=2)
    return out.transpose(1, 2)


def _causal(query, key, value, window, scaling):
    """Causal attention of one prompt [1, H, n, D] over its own keys (within `window` if set)."""
    key, value = _expand_kv(key, value, query.shape[1] // key.shape[1], dim=1)
    n = query.shape[2]
    if window is None or n <= window:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
    idx = torch.arange(n, device=query.device)
    mask = (idx[None, :] <= idx[:, None]) & (idx[:, None] - idx[None, :] < window)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)


def _capped_packed(query, key, value, ctx: ForwardContext, window, scaling, softcap: float):
    """Attention with soft-capped scores over the packed prompts, query [1, H, N, D], key/value [1, KVH, N, D] ->
    [1, H, N, D], as Gemma 2's eager attention computes it (scores in the model's dtype scaled, capped, masked,
    softmaxed in float32). In blocks of CAPPED_BLOCK queries, each against the keys from the start of its first
    query's prompt (a block's scores never exceed [H, CAPPED_BLOCK, block + that prompt]), masked to each token's
    own prompt, causally, within the window: a few launches per layer however many prompts the row packs."""
    key, value = _expand_kv(key, value, query.shape[1] // key.shape[1], dim=1)
    n = query.shape[2]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    starts = [start for start, _ in ctx.spans]
    idx = torch.arange(n, device=query.device)
    prompt = ctx.prompt_of
    out = []
    for a in range(0, n, CAPPED_BLOCK):
        b = min(a + CAPPED_BLOCK, n)
        k0 = starts[bisect.bisect_right(starts, a) - 1]
        scores = _softcapped(torch.matmul(query[:, :, a:b], key[:, :, k0:b].transpose(2, 3)) * scale, softcap)
        rows, cols = idx[a:b, None], idx[None, k0:b]
        visible = (prompt[a:b, None] == prompt[None, k0:b]) & (cols <= rows)
        if window is not None:
            visible &= rows - cols < window
        scores = scores.masked_fill(~visible, float("-inf"))
        out.append(torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype), value[:, :, k0:b]))
    return torch.cat(out, dim=2)


def _softcapped(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    return torch.tanh(scores / softcap) * softcap


def _prefill_backends() -> list:
    """PREFILL_BACKENDS that are enabled now (an outer `sdpa_kernel` restriction, as in tests, still holds).
    No cuDNN: it builds an execution plan for every new prefill shape."""
    enabled = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
               SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
               SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled()}
    return [b for b in PREFILL_BACKENDS if enabled[b]] or PREFILL_BACKENDS


def _expand_kv(key, value, groups: int, dim: int):
    """K/V heads repeated for grouped-query attention, for kernels that need as many K/V heads as query heads."""
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=dim), value.repeat_interleave(groups, dim=dim)


class VarlenKernel:
    """PyTorch's variable-length flash attention (torch.nn.attention.varlen) for the packed prefill, where this
    torch has it and it applies (CUDA, 16-bit, flash enabled); else one SDPA call per prompt, the same attention."""

    _params: set | None = None
    takes_fewer_kv_heads = True  # until a call says otherwise (then K/V are repeated, the same attention)

    @classmethod
    def get(cls, query: torch.Tensor, window):
        if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or query.shape[-1] > 256:
            return None
        if not torch.backends.cuda.flash_sdp_enabled():  # a test's sdpa_kernel(MATH), or flash turned off
            return None
        params = cls._parameters()
        causal = "window_size" in params or ("is_causal" in params and window is None)
        if not {"varlen_attn", "scale"} <= params or not causal:
            return None
        return partial(_varlen, params=params)

    @classmethod
    def _parameters(cls) -> set:
        if cls._params is None:
            try:
                from torch.nn.attention.varlen import varlen_attn
            except ImportError as exc:
                cls._params = set()
                log.info("prefill attention: no varlen kernel in torch %s (%s); one SDPA call per prompt",
                         torch.__version__, exc)
            else:
                cls._params = {"varlen_attn", *inspect.signature(varlen_attn).parameters}
        return cls._params


def _varlen(query, key, value, cu_lens, longest: int, window, scaling, params: set):
    """query [N, H, D], key/value [N, KVH, D] -> [N, H, D], causal within each prompt."""
    from torch.nn.attention.varlen import varlen_attn

    extra = {}
    if "window_size" in params:  # HF's window W: a token sees itself and the W - 1 tokens before it
        extra["window_size"] = (-1, 0) if window is None else (window - 1, 0)
    else:
        extra["is_causal"] = True
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and "enable_gqa" in params:
        extra["enable_gqa"] = True
        groups = 1  # the kernel shares the K/V heads itself
    elif groups > 1 and VarlenKernel.takes_fewer_kv_heads:
        # The flash kernel maps query heads onto shared K/V heads itself: the same output, bit for bit, as repeated
        # K/V (torch 2.11, H100) in 162 us instead of 238 us for 8k tokens of Gemma-2B's 8:1 heads.
        try:
            return varlen_attn(query, key, value, cu_lens, cu_lens, longest, longest, scale=scaling, **extra)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            VarlenKernel.takes_fewer_kv_heads = False
            log.info("prefill attention: this varlen kernel wants as many K/V heads as query heads (%s); "
                     "repeating K/V", str(exc).splitlines()[0])
    key, value = _expand_kv(key, value, groups, dim=1)
    return varlen_attn(query, key, value, cu_lens, cu_lens, longest, longest, scale=scaling, **extra)


class TritonKernels:
    """The Triton kernels (decode attention, K/V cache writes) where they apply (CUDA, 16-bit, power-of-two head
    size); else SDPA with a mask and index_put, the same results. `is_enabled` lets tests compare the two paths."""

    is_enabled = True
    _module = None
    _logged = False

    @classmethod
    def get(cls, query: torch.Tensor):
        if not cls.is_enabled or not query.is_cuda:
            return None
        if cls._module is None:
            try:
                from engine.core.kernels import attention as attention_kernel
            except ImportError as exc:  # no triton: SDPA gives the same attention, only slower
                cls._module = False
                log.info("Triton unavailable (%s): decode attention through SDPA with a mask, K/V writes "
                         "through index_put", exc)
            else:
                cls._module = attention_kernel
        if not cls._module or not cls._module.supports(query):
            if not cls._logged:
                cls._logged = True
                log.info("%s, head size %d: decode attention through SDPA with a mask, K/V writes through index_put",
                         query.dtype, query.shape[-1])
            return None
        return cls._module


def _decode(query, key, value, k_cache, v_cache, ctx: ForwardContext, window, scaling, softcap=None):
    """query [1, H, B, D], key/value [1, KVH, B, D]: one token of each of the first B KV rows, packed in one row as a
    prefill's prompts are (so decode runs the compiled layers' one graph) -> [1, B, H, D]."""
    query = query[0].transpose(0, 1)[:, :, None]  # [B, H, 1, D]
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    _write_kv(k_cache, v_cache, ctx.rows, ctx.write_pos, key[0].transpose(0, 1), value[0].transpose(0, 1))
    kernel = TritonKernels.get(query)
    if kernel is not None:
        scale = dim ** -0.5 if scaling is None else scaling
        out = kernel.decode_attention(query, k_cache, v_cache, ctx.positions, ctx.read_len, scale, window,
                                      softcap=softcap)
        return out.view(1, batch, heads, dim)
    keys = k_cache[:batch, :, :ctx.read_len]
    values = v_cache[:batch, :, :ctx.read_len]
    # The query heads of one KV head become that head's "query positions": no K/V expansion for GQA/MQA.
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    if softcap is not None:
        scale = dim ** -0.5 if scaling is None else scaling
        scores = _softcapped(torch.matmul(q, keys.transpose(2, 3)) * scale, softcap)
        scores = scores.masked_fill(~ctx.masks[window], float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype), values)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.masks[window], scale=scaling)
    return out.reshape(1, batch, heads, dim)


def _write_kv(k_cache, v_cache, rows, cols, keys, values) -> None:
    """Cache rows rows[t], columns cols[t] take keys[t] / values[t] ([N, KVH, D])."""
    kernel = TritonKernels.get(keys)
    if kernel is not None:
        kernel.write_kv(k_cache, v_cache, rows, cols, keys, values)
        return
    k_cache[rows, :, cols] = keys
    v_cache[rows, :, cols] = values


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, engine_attention)


def decode_masks(positions: torch.Tensor, read_len: int, windows: set) -> dict:
    """Masks [B, 1, 1, read_len] per window: each row sees columns 0..position (within its window)."""
    idx = torch.arange(read_len, device=positions.device)[None, :]
    base = idx <= positions[:, None]
    masks = {}
    for window in windows:
        mask = base if window is None else base & (positions[:, None] - idx < window)
        masks[window] = mask[:, None, None, :]
    return masks
