"""What goes wrong in the core's forwards, found and worded: a final norm that collapsed (CollapseCheck), a
sequence that sampled NON_FINITE (non_finite_error), and errors that may leave the device unusable
(is_device_error)."""

from __future__ import annotations

import logging

import torch

from engine.core.scheduler import Sequence

log = logging.getLogger("engine")


def is_device_error(exc: BaseException) -> bool:
    """Whether an exception may have left the device unusable: CUDA out of memory, a CUDA/accelerator error, or a
    RuntimeError whose text says so (older torch raises CUDA errors as plain RuntimeErrors). Host MemoryError is
    not one: a vector file whose header claims terabytes fails its own allocation and nothing else."""
    if isinstance(exc, _DEVICE_ERRORS):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _DEVICE_ERROR_TEXTS)


_DEVICE_ERRORS = tuple(kind for kind in (torch.cuda.OutOfMemoryError, getattr(torch, "AcceleratorError", None),
                                         getattr(torch.cuda, "CudaError", None),
                                         getattr(torch.cuda, "DeferredCudaCallError", None)) if kind is not None)
_DEVICE_ERROR_TEXTS = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error",
                       "device-side assert", "HIP error", "NCCL error")


def final_norm(model) -> torch.nn.Module | None:
    """The norm applied to the last hidden state before the LM head (`model.model.norm`: Llama, Gemma, Qwen, Mistral,
    Phi3, OLMo2; `model.model.language_model.norm` in a multimodal wrapper), or None if the model has none there."""
    inner = getattr(model, "model", None)
    for owner in (inner, getattr(inner, "language_model", None)):
        norm = getattr(owner, "norm", None)
        if isinstance(norm, torch.nn.Module):
            return norm
    return None


class CollapseCheck:
    """Whether each kept position's final norm worked: a bool per row in a static device buffer (`is_norm_ok`, which
    the sampler reads), written by a forward pre-hook on the final norm while the runner watches a forward.

    An RMSNorm scales by rsqrt(mean(h.float() ** 2) + eps). A residual stream that is finite but huge (a steering
    coef of 1e38, say) overflows that mean to inf, rsqrt makes the scale 0, and the norm outputs exactly 0: every
    logit is 0, finite, so the logits check passes and every token would be token 0. The hook computes that same
    mean (a NaN or inf already in h fails it too) at the positions whose logits are kept only: a prefill's prompts'
    last tokens (gathered first, so the cost is prompts x hidden), a decode's rows. It writes the buffer in place and
    never syncs the host, so it is captured inside the decode CUDA graphs with the rest of the forward; every watched
    forward overwrites the rows the sampler then reads, so warm-up and capture forwards leave nothing that matters."""

    def __init__(self, model, max_rows: int, device):
        norm = final_norm(model)
        self.is_norm_ok = None if norm is None else torch.ones(max_rows, dtype=torch.bool, device=device)
        self._kept: torch.Tensor | None = None  # prefill: the kept positions of the packed row; None: every row's
        self._is_watching = False  # only the runner's forwards are checked (and their shapes known)
        if norm is None:
            log.info("%s has no final norm at model.model.norm: collapsed forwards (a residual stream too large for "
                     "its norms' float range, which makes every logit 0) are not detected", type(model).__name__)
        else:
            norm.register_forward_pre_hook(self._check, with_kwargs=True)

    def watch(self, kept: torch.Tensor | None) -> None:
        """Check the next forward, at `kept` positions of a packed prefill row, or (None) at every decode row."""
        self._kept, self._is_watching = kept, True

    def stop(self) -> None:
        self._kept, self._is_watching = None, False

    def _check(self, module, args, kwargs) -> None:
        """Write is_norm_ok for the watched forward's kept positions (a pre-hook: changes nothing it is given)."""
        if not self._is_watching:
            return
        hidden = args[0] if args else next(iter(kwargs.values()))  # HF passes it positionally; a kwarg works too
        kept = hidden[0].index_select(0, self._kept) if self._kept is not None else hidden[0]
        self.is_norm_ok[:kept.shape[0]].copy_(kept.float().pow(2).mean(-1).isfinite())


def non_finite_error(seq: Sequence, dtype: torch.dtype) -> str:
    """The error of a sequence that sampled NON_FINITE: what happened, where, and what to change.

    The sentinel does not say which of the two failures it was (logits NaN or inf, or a final norm whose mean of
    squares overflowed, which zeroes every logit), so the message names both: one cause, the residual stream's size."""
    name = str(dtype).removeprefix("torch.")
    # output_ids holds the good tokens; the failed one is the next, counted from 1 as a reader counts tokens
    where = (f"the model's forward became non-finite at generated token {len(seq.output_ids) + 1}: the residual "
             f"stream grew too large for {name}'s range (the logits became NaN or inf, or the norms' mean of "
             f"squares overflowed and they collapsed to 0)")
    if seq.steering is not None:
        return (f"{where}; the steering pushed it there: use a smaller coef (or norm_match, which scales the vector "
                f"to the residual's norm)")
    fix = ("check the model's weights for NaN or inf" if dtype == torch.float32
           else "run it in float32 (--dtype float32)")
    return f"{where}; with no steering, the model itself overflowed on this prompt: {fix}"
