"""Sampler: per-row greedy / temperature / top-k / top-p on the device, reproducible per request.

Sampling is Gumbel-max: next token = argmax(logits / T + g), with g[v] hashed from (seed, step, v) by
integer arithmetic. The noise of a row depends only on its own request, so a request's tokens do not
depend on its batch-mates, the hash gives the same numbers on CPU and GPU, and (unlike inverse-CDF
sampling) a last-bit difference in the logits almost never changes the pick.

A row whose logits are not finite (NaN, +inf, or all -inf: an overflowed residual stream), or whose forward
collapsed (a flag from the runner: the final norm's mean of squares overflowed, so every logit is 0, finite but
meaningless), samples NON_FINITE instead of a token, whatever its temperature; the host ends that request with an
error when it reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.core.transfer import to_device

_M32 = 0xFFFFFFFF
NON_FINITE = -1  # the token a failed row samples (see above); never a vocabulary id, never fed to a forward

try:  # the fused CUDA kernel; without Triton the PyTorch path computes the same noise
    from engine.core.kernels import sampler as _fused
except ImportError:
    _fused = None


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finalizer on int64 tensors holding 32-bit values (products wrap; low bits stay exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def row_key(seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """A 32-bit key per row from int64 (seed, step)."""
    h = _fmix32((seed & _M32) ^ 0x9E3779B9)
    h = _fmix32(h ^ ((seed >> 32) & _M32))
    return _fmix32(h ^ (step & _M32))


def gumbel(seed: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel noise [B, V] keyed by (seed, step, token id); 24-bit uniforms in (0, 1), exact in float32."""
    tokens = torch.arange(vocab_size, dtype=torch.int64, device=seed.device)
    h = _fmix32(tokens[None, :] ^ row_key(seed, step)[:, None])
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(u))


@dataclass(slots=True)
class SamplingMetadata:
    """The device batch of sampling settings (per-request settings are the record's): a tensor per setting, a row per
    sequence, built once per batch composition."""

    temperature: torch.Tensor  # float32 [B]; 0 rows are greedy
    top_p: torch.Tensor  # float32 [B]
    top_k: torch.Tensor  # int64 [B]; 0 = off
    seed: torch.Tensor  # int64 [B]
    is_all_greedy: bool
    max_top_k: int  # 0 unless every sampled row has a top_k and none uses top_p
    needs_sort: bool  # some sampled row uses top_p (or top_k beside top_p)

    @staticmethod
    def flags(rows: list[tuple[float, float, int, int]]) -> tuple[bool, int, bool]:
        """(is_all_greedy, max_top_k, needs_sort) for rows of (temperature, top_p, top_k, seed)."""
        sampled = [r for r in rows if r[0] > 0]
        uses_p = any(r[1] < 1.0 for r in sampled)
        all_k = bool(sampled) and all(r[2] > 0 for r in sampled) and not uses_p
        max_top_k = max(r[2] for r in sampled) if all_k else 0
        return not sampled, max_top_k, uses_p or (any(r[2] > 0 for r in sampled) and not all_k)

    @classmethod
    def build(cls, rows: list[tuple[float, float, int, int]], device) -> SamplingMetadata:
        columns = [to_device([r[i] for r in rows], dtype, device)
                   for i, dtype in enumerate((torch.float32, torch.float32, torch.int64, torch.int64))]
        return cls(*columns, *cls.flags(rows))


class Sampler:
    """Turns last-position logits into next tokens, one row per request.

    `is_norm_ok`: the runner's static flags (bool [max rows] on the device, see faults.CollapseCheck), which
    each forward writes for its rows; logits [B, V] read rows [:B]. None: not checked (a model without a final norm,
    or logits that come from no forward)."""

    def __init__(self, is_norm_ok: torch.Tensor | None = None):
        self.is_norm_ok = is_norm_ok

    def __call__(self, logits: torch.Tensor, params: SamplingMetadata, step: torch.Tensor) -> torch.Tensor:
        """Next tokens [B] for logits [B, V]; NON_FINITE for rows whose logits hold a NaN or +inf or are all -inf,
        and for rows whose final norm collapsed.

        Logits may be in any float dtype: widening bf16/fp16 to float32 is exact and keeps the order, so the
        greedy argmax reads them as they are, and sampling divides by the temperature in float32."""
        greedy = logits.argmax(dim=-1)
        is_ok = _is_finite_rows(logits, greedy)
        if self.is_norm_ok is not None:
            is_ok = is_ok & self.is_norm_ok[:logits.shape[0]]
        if params.is_all_greedy:
            return torch.where(is_ok, greedy, NON_FINITE)
        is_fused = _fused is not None and logits.is_cuda
        if is_fused and not (params.needs_sort or params.max_top_k):
            # one pass: the kernel widens, divides by the temperature and adds the noise per element
            scaled, temperature = logits, params.temperature
        else:
            scaled = logits.float() / params.temperature.clamp_min(1e-5)[:, None]
            if params.needs_sort:
                scaled = self._top_k_top_p(scaled, params)
            elif params.max_top_k:
                scaled = self._top_k(scaled, params)
            temperature = torch.ones_like(params.temperature)  # already divided
        if is_fused:
            sampled = _fused.gumbel_argmax(scaled.contiguous(), temperature, row_key(params.seed, step))
        else:
            sampled = (scaled + gumbel(params.seed, step, scaled.shape[-1])).argmax(dim=-1)
        return torch.where(is_ok, torch.where(params.temperature > 0, sampled, greedy), NON_FINITE)

    @staticmethod
    def _top_k(scaled: torch.Tensor, params: SamplingMetadata) -> torch.Tensor:
        """Keep each row's top_k tokens (ties at the edge stay); no full sort."""
        top = scaled.topk(min(params.max_top_k, scaled.shape[-1]), dim=-1).values
        k = params.top_k.clamp(1, top.shape[-1])[:, None] - 1
        edge = torch.where(params.top_k[:, None] > 0, top.gather(-1, k), float("-inf"))
        return scaled.masked_fill(scaled < edge, float("-inf"))

    @staticmethod
    def _top_k_top_p(scaled: torch.Tensor, params: SamplingMetadata) -> torch.Tensor:
        """Mask tokens outside each row's top-k, then its top-p nucleus, as HF's warpers do."""
        values, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(values.shape[-1], device=values.device)[None, :]
        k = torch.where(params.top_k > 0, params.top_k, values.shape[-1])[:, None]
        values = values.masked_fill(ranks >= k, float("-inf"))
        probs = torch.softmax(values, dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p[:, None]
        drop |= ranks >= k
        drop[:, 0] = False  # the most likely token always stays
        return scaled.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


def _is_finite_rows(logits: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    """bool [B]: whether each row's largest logit is finite (no NaN, no +inf, not all -inf), read from B values.

    argmax ranks NaN above every number (ATen's argmax and max share one comparator, GreaterOrNan in
    SharedReduceOps.h, on CPU and CUDA, in every float dtype; tests/core/test_core_faults.py checks it on CPU), so a row
    holding a NaN has a NaN at its argmax, a row holding +inf has +inf there, and a row of -inf only has -inf there:
    the value at the argmax the sampler takes anyway tells all three apart from a usable row (one with some -inf,
    as top-k masking makes, is usable). No second pass over [B, V] and no host sync; it runs after the decode
    graph's replay, outside the graph."""
    return logits.gather(-1, greedy[:, None])[:, 0].isfinite()
