"""The engine's attention, registered with transformers' attention interface as "engine".

The model code (projections, norms, rotary, MLP) stays Hugging Face's; only the attention call comes here.
The model runner fills a ForwardContext before each forward: which slots the rows are, where each token's
K/V goes, and the masks. Prefill is a left-padded batch of new prompts; decode is one token for each of the
first B slots (static shapes, so it can be captured in a CUDA graph).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.kv_cache import KVCache

log = logging.getLogger("engine")

NAME = "engine"
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(slots=True)
class ForwardContext:
    cache: KVCache | None = None
    is_prefill: bool = False
    slots: torch.Tensor | None = None  # prefill: [P, 1] slot of each row
    write_pos: torch.Tensor | None = None  # prefill: [P, T]; decode: [B] (trash column for pads / idle slots)
    masks: dict = field(default_factory=dict)  # window (None = full) -> bool mask for SDPA
    read_len: int = 0  # decode: how many cache columns to attend over (a bucket >= every length)
    positions: torch.Tensor | None = None  # decode: [B] position of each row's token (its length - 1)


CONTEXT = ForwardContext()


def unsupported_reason(model_config) -> str | None:
    """Why the engine's attention cannot run this model exactly, or None."""
    c = model_config.get_text_config()
    if getattr(c, "attn_logit_softcapping", None):
        return (f"{c.model_type}: attention logit soft-capping ({c.attn_logit_softcapping}) is not supported by the "
                f"engine's attention yet")
    if getattr(c, "use_bidirectional_attention", False):
        return f"{c.model_type}: bidirectional attention is not a causal LM"
    return None


@torch.compiler.disable  # compiled decoder layers call it eagerly: slot writes and kernels are ours
def engine_attention(module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kwargs):
    """HF attention-interface entry: query [B, H, T, D], key/value [B, KVH, T, D] -> ([B, T, H, D], None)."""
    ctx = CONTEXT
    layer = module.layer_idx
    k_cache, v_cache = ctx.cache.k[layer], ctx.cache.v[layer]
    window = sliding_window or None
    if ctx.is_prefill:
        return _prefill(query, key, value, k_cache, v_cache, ctx, window, scaling), None
    return _decode(query, key, value, k_cache, v_cache, ctx, window, scaling), None


def _prefill(query, key, value, k_cache, v_cache, ctx: ForwardContext, window, scaling):
    k_cache[ctx.slots, :, ctx.write_pos] = key.permute(0, 2, 1, 3)
    v_cache[ctx.slots, :, ctx.write_pos] = value.permute(0, 2, 1, 3)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    # No cuDNN here: it builds an execution plan for every new (rows, width) prefill shape.
    with sdpa_kernel(_prefill_backends()):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=ctx.masks[window], scale=scaling)
    return out.transpose(1, 2)


def _prefill_backends() -> list:
    """PREFILL_BACKENDS that are enabled now (an outer `sdpa_kernel` restriction, as in tests, still holds)."""
    enabled = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
               SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
               SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled()}
    return [b for b in PREFILL_BACKENDS if enabled[b]] or PREFILL_BACKENDS


class DecodeKernel:
    """The Triton decode kernel where it applies (CUDA, 16-bit, power-of-two head size), else SDPA with a mask.

    `is_enabled` lets tests compare it with SDPA on the same model.
    """

    is_enabled = True
    _module = None
    _logged = False

    @classmethod
    def get(cls, query: torch.Tensor):
        if not cls.is_enabled or not query.is_cuda:
            return None
        if cls._module is None:
            try:
                from engine import attention_kernel
            except ImportError as exc:  # no triton: SDPA gives the same attention, only slower
                cls._module = False
                log.info("decode attention: Triton unavailable (%s); using SDPA with a mask", exc)
            else:
                cls._module = attention_kernel
        if not cls._module or not cls._module.supports(query):
            if not cls._logged:
                cls._logged = True
                log.info("decode attention: SDPA with a mask (%s, head size %d)", query.dtype, query.shape[-1])
            return None
        return cls._module


def _decode(query, key, value, k_cache, v_cache, ctx: ForwardContext, window, scaling):
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    rows = torch.arange(batch, device=query.device)
    k_cache[rows, :, ctx.write_pos] = key[:, :, 0]
    v_cache[rows, :, ctx.write_pos] = value[:, :, 0]
    kernel = DecodeKernel.get(query)
    if kernel is not None:
        scale = dim ** -0.5 if scaling is None else scaling
        return kernel.decode_attention(query, k_cache, v_cache, ctx.positions, ctx.read_len, scale, window)
    keys = k_cache[:batch, :, :ctx.read_len]
    values = v_cache[:batch, :, :ctx.read_len]
    # The query heads of one KV head become that head's "query positions": no K/V expansion for GQA/MQA.
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.masks[window], scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2)


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, engine_attention)


def prefill_masks(lengths: torch.Tensor, width: int, windows: set) -> dict:
    """Left-padded causal masks [P, 1, T, T] per window; pad rows see only themselves (no NaN rows)."""
    idx = torch.arange(width, device=lengths.device)
    start = (width - lengths)[:, None, None]  # first real column of each row
    q, k = idx[None, :, None], idx[None, None, :]
    base = (k <= q) & (k >= start)
    diagonal = (k == q)
    masks = {}
    for window in windows:
        mask = base if window is None else base & (q - k < window)
        masks[window] = (mask | diagonal)[:, None]
    return masks


def decode_masks(positions: torch.Tensor, read_len: int, windows: set) -> dict:
    """Masks [B, 1, 1, read_len] per window: each row sees columns 0..position (within its window)."""
    idx = torch.arange(read_len, device=positions.device)[None, :]
    base = idx <= positions[:, None]
    masks = {}
    for window in windows:
        mask = base if window is None else base & (positions[:, None] - idx < window)
        masks[window] = mask[:, None, None, :]
    return masks
