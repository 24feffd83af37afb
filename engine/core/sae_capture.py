"""SAE capture on the device: an SAE's encoder next to the model, turning captured residuals into their top-k feature
activations and indices in the step that captured them (engine.core.activations arms it per request)."""

from __future__ import annotations

import torch

from engine.saes import Sae


class SaeEncoder:
    """An SAE's encoder on the device (float32): f = act((x - b_dec?) @ W_enc + b_enc), as engine.saes.Sae.encode."""

    def __init__(self, sae: Sae, device: torch.device):
        def put(array):
            return None if array is None else torch.from_numpy(array).to(device=device, dtype=torch.float32)

        self.sae = sae  # kept: the encoders are cached by the Sae object's identity
        self.w_enc, self.b_enc = put(sae.w_enc), put(sae.b_enc)
        self.b_dec = put(sae.b_dec) if sae.is_b_dec_subtracted else None
        self.threshold = put(sae.threshold)
        self.activation, self.k = sae.activation, sae.k

    def top(self, x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [n, top_k] float32, largest first; indices [n, top_k] int32) of residuals x [n, H]. For a TopK SAE
        the features outside its k are 0, as in its own encoding."""
        x = x.float()
        if self.b_dec is not None:
            x = x - self.b_dec
        pre = torch.addmm(self.b_enc, x, self.w_enc)
        if self.activation == "jumprelu":
            f = torch.where(pre > self.threshold, pre, 0.0)
        elif self.activation == "topk":
            kept, where = pre.topk(self.k, dim=-1)
            f = torch.zeros_like(pre).scatter_(-1, where, kept.clamp_min(0.0))
        else:
            f = pre.clamp_min(0.0)
        values, indices = f.topk(top_k, dim=-1)
        return values, indices.to(torch.int32)
