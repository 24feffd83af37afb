"""Hugging Face reference runs the engine is compared against: plain generate, and a plain forward hook."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import numpy as np
import torch

from engine.models import decoder_layers


def vector_of(path: str, layer: int | None = None) -> torch.Tensor:
    """The vector a file holds for `layer`, read with each format's own library (not engine.vectors): its
    `layer.<L>` tensor (a GGUF control vector's `direction.<L>`, a 2-D array's row L), else its one vector."""
    if path.endswith(".gguf"):
        import gguf

        [tensor] = [t for t in gguf.GGUFReader(path).tensors if t.name == f"direction.{layer}"]
        return torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    if path.endswith(".npy"):
        array = torch.from_numpy(np.load(path)).float()
        return array[layer] if array.ndim == 2 else array
    if path.endswith(".pt"):
        obj = torch.load(path)
    else:
        from safetensors.torch import load_file

        obj = load_file(path)
    if isinstance(obj, dict):
        obj = obj[f"layer.{layer}"] if f"layer.{layer}" in obj else next(iter(obj.values()))
    return obj.float()


@contextmanager
def steered(model, spec):
    """Add coef * vector (the file's vector for that layer) to the output of each term's layers with ordinary
    forward hooks, one per term and layer.

    In cached generation a forward over more than one position is the prompt; one position is a new token.
    """
    terms = [] if spec is None else spec if isinstance(spec, list) else [spec]
    handles = []
    for term in terms:
        for layer in term["layers"]:
            vector = vector_of(term["vector"], layer)

            def hook(module, args, output, term=term, vector=vector):
                hidden = output[0] if isinstance(output, tuple) else output
                is_prompt = hidden.shape[1] > 1
                if term["positions"] == "all" or (term["positions"] == "prompt") == is_prompt:
                    hidden = hidden + term["coef"] * vector.to(hidden.dtype)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            handles.append(decoder_layers(model)[layer].register_forward_hook(hook, prepend=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def position_mask(positions, prompt_len: int, total_len: int) -> torch.Tensor:
    """Which positions of a whole sequence (prompt, then generated tokens) a term covers; ranges as Python slices."""
    mask = torch.zeros(total_len, dtype=torch.bool)
    kinds = {"prompt": list(range(prompt_len)), "generated": list(range(prompt_len, total_len))}
    if isinstance(positions, str):
        ranges = {kind: [[0, None]] for kind in kinds if positions in (kind, "all")}
    else:
        ranges = positions
    for kind, spans in ranges.items():
        for start, end in spans:
            mask[kinds[kind][start:end]] = True
    return mask


@contextmanager
def steered_sequence(model, spec, prompt_len: int):
    """Steering by plain forward hooks over a whole sequence in one forward (prompt then generated tokens): at each
    layer, h' = h + sum of the covering terms' coef * v (norm_match: coef * |h| * v / |v|), then h' * |h| / |h'|
    where a covering term has normalize."""
    terms = [] if spec is None else spec if isinstance(spec, list) else [spec]
    by_layer: dict[int, list] = {}
    for term in terms:
        for layer in term["layers"]:
            by_layer.setdefault(layer, []).append(term)

    def hook(module, args, output, terms, layer):
        hidden = output[0] if isinstance(output, tuple) else output
        h = hidden[0].float()
        norm = h.norm(dim=-1, keepdim=True)
        out, normalize = h, torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
        for term in terms:
            mask = position_mask(term["positions"], prompt_len, h.shape[0]).to(h.device)
            v = vector_of(term["vector"], layer).to(h.device)
            added = term["coef"] * (norm * v / v.norm() if term.get("norm_match") else v)
            out = torch.where(mask[:, None], out + added, out)
            normalize |= mask & term.get("normalize", False)
        out = torch.where(normalize[:, None], out * norm / out.norm(dim=-1, keepdim=True), out)
        steered = out[None].to(hidden.dtype)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    handles = [decoder_layers(model)[layer].register_forward_hook(partial(hook, terms=layer_terms, layer=layer),
                                                                 prepend=True)
               for layer, layer_terms in by_layer.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def hf_states(model, ids: list[int], spec, num_prompt: int) -> tuple[torch.Tensor, ...]:
    """HF hidden states (on the CPU) of one forward over a whole sequence, steered by plain forward hooks."""
    device = next(model.parameters()).device
    with steered_sequence(model, spec, num_prompt), torch.no_grad():
        states = model(torch.tensor([ids], device=device), output_hidden_states=True).hidden_states
    return tuple(h.cpu() for h in states)


def expected_capture(states, layer: int, positions: str, num_prompt: int, num_new: int) -> torch.Tensor:
    """What capturing `layer` at `positions` records, from hf_states of prompt + completion: hidden_states[L + 1]
    (so not the last layer, whose HF hidden state is after the final norm), reduced as documented."""
    h = states[layer + 1][0]
    return {"last_prompt": h[num_prompt - 1], "mean_prompt": h[:num_prompt].mean(0), "all_prompt": h[:num_prompt],
            "generated": h[num_prompt:num_prompt + num_new - 1]}[positions]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, spec=None) -> list[int]:
    """HF generate(do_sample=False) for one prompt, EOS ignored so lengths are exact."""
    x = torch.tensor([prompt_ids])
    model.generation_config.eos_token_id = None  # generate(eos_token_id=None) would refill it from the config
    with steered(model, spec), torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0)
    return out[0, x.shape[1]:].tolist()
