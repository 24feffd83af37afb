"""Hugging Face reference runs the engine is compared against: plain generate, and a plain forward hook."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from engine.steering import decoder_layers


def vector_of(path: str) -> torch.Tensor:
    if path.endswith(".npy"):
        return torch.from_numpy(np.load(path)).float()
    if path.endswith(".pt"):
        return torch.load(path).float()
    from safetensors.torch import load_file

    return next(iter(load_file(path).values())).float()


@contextmanager
def steered(model, spec: dict | None):
    """Add coef * vector to the output of each spec layer with an ordinary forward hook.

    In cached generation a forward over more than one position is the prompt; one position is a new token.
    """
    if spec is None:
        yield
        return
    vector = vector_of(spec["vector"])

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        is_prompt = hidden.shape[1] > 1
        if spec["positions"] == "all" or (spec["positions"] == "prompt") == is_prompt:
            hidden = hidden + spec["coef"] * vector.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [decoder_layers(model)[layer].register_forward_hook(hook, prepend=True) for layer in spec["layers"]]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, spec: dict | None = None) -> list[int]:
    """HF generate(do_sample=False) for one prompt, EOS ignored so lengths are exact."""
    x = torch.tensor([prompt_ids])
    model.generation_config.eos_token_id = None  # generate(eos_token_id=None) would refill it from the config
    with steered(model, spec), torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, x.shape[1]:].tolist()
