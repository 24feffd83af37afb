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
def steered(model, spec):
    """Add coef * vector to the output of each term's layers with ordinary forward hooks, one per term.

    In cached generation a forward over more than one position is the prompt; one position is a new token.
    """
    terms = [] if spec is None else spec if isinstance(spec, list) else [spec]
    handles = []
    for term in terms:
        vector = vector_of(term["vector"])

        def hook(module, args, output, term=term, vector=vector):
            hidden = output[0] if isinstance(output, tuple) else output
            is_prompt = hidden.shape[1] > 1
            if term["positions"] == "all" or (term["positions"] == "prompt") == is_prompt:
                hidden = hidden + term["coef"] * vector.to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handles += [decoder_layers(model)[layer].register_forward_hook(hook, prepend=True) for layer in term["layers"]]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, spec=None) -> list[int]:
    """HF generate(do_sample=False) for one prompt, EOS ignored so lengths are exact."""
    x = torch.tensor([prompt_ids])
    model.generation_config.eos_token_id = None  # generate(eos_token_id=None) would refill it from the config
    with steered(model, spec), torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, x.shape[1]:].tolist()
