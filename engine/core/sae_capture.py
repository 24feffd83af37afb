"""SAE capture on the device: an SAE's encoder next to the model, turning captured residuals into their top-k feature
activations and indices in the step that captured them (engine.core.activations arms it per request)."""

from __future__ import annotations

import torch

from engine.saes import Sae


class SaeEncoder:
    """An SAE's encoder on the device: f = act((x - b_dec?) @ W_enc + b_enc), as engine.saes.Sae.encode. W_enc in
    `dtype` (the model's on a GPU: a bfloat16 model's encode is a bfloat16 matmul, accumulated in float32, 4x less
    than float32's time), the rest float32."""

    def __init__(self, sae: Sae, device: torch.device, dtype: torch.dtype = torch.float32):
        def put(array):
            return None if array is None else torch.from_numpy(array).to(device=device, dtype=torch.float32)

        self.sae = sae  # kept: the encoders are cached by the Sae object's identity
        self.w_enc = torch.from_numpy(sae.w_enc).to(device=device, dtype=dtype)
        self.b_enc = put(sae.b_enc)
        self.b_dec = put(sae.b_dec) if sae.is_b_dec_subtracted else None
        self.threshold = put(sae.threshold)
        self.activation, self.k = sae.activation, sae.k

    def top(self, x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [n, top_k] float32, largest first; indices [n, top_k] int32) of residuals x [n, H]. For a TopK SAE
        the features outside its k are 0, as in its own encoding."""
        if self.b_dec is not None:
            x = x.float() - self.b_dec
        pre = (x.to(self.w_enc.dtype) @ self.w_enc).float() + self.b_enc
        if self.activation == "jumprelu":
            f = torch.where(pre > self.threshold, pre, 0.0)
        elif self.activation == "topk":
            kept, where = pre.topk(self.k, dim=-1)
            f = torch.zeros_like(pre).scatter_(-1, where, kept.clamp_min(0.0))
        else:
            f = pre.clamp_min(0.0)
        values, indices = f.topk(top_k, dim=-1)
        return values, indices.to(torch.int32)
