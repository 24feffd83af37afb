"""Hugging Face reference runs the engine is compared against: plain generate, and a plain forward hook."""

from __future__ import annotations

import json
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
        spans = spans if all(isinstance(span, list) for span in spans) else [spans]  # one range, or a list of them
        for span in spans:
            mask[kinds[kind][slice(*span) if len(span) == 2 else slice(span[0], None)]] = True
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


@contextmanager
def intervened_sequence(model, spec, prompt_len: int, saes: dict | None = None):
    """Every op by plain forward hooks over a whole sequence in one forward, written from the documented rules, not
    from the engine's code. At each layer: the gates read there (h . probe against the threshold, before this
    layer's interventions), then clamp, SAE-value and gated terms one after another in term order, then the
    ungated additions (add terms, SAE coef terms) summed, with norm_match / normalize as steered_sequence does them.
    Ablate terms act earlier, at each write into the residual stream of their layers (the embeddings for layer 0).
    `saes`: SAE path -> {"W_enc", "W_dec", "b_enc", "b_dec", "threshold", "layer", "sub_b_dec"} as the test wrote it."""
    terms = [] if spec is None else spec if isinstance(spec, list) else [spec]
    saes = saes or {}
    num_layers = len(decoder_layers(model))
    gates: dict[str, torch.Tensor] = {}

    def layers_of(term) -> list[int]:
        if term.get("layers") == "all":
            return list(range(num_layers))
        if term.get("op") == "sae" and "layers" not in term:
            return [saes[term["sae"]]["layer"]]
        return list(term["layers"])

    def gate_of(term, h_len):
        when = term.get("when")
        return torch.ones(h_len, dtype=torch.bool) if when is None else gates[json.dumps(when, sort_keys=True)]

    def hook(module, args, output, layer):
        hidden = output[0] if isinstance(output, tuple) else output
        h = hidden[0].float().cpu()  # the reference's arithmetic on the CPU, whatever the model's device
        n = h.shape[0]
        for term in terms:
            when = term.get("when")
            if when is not None and when["layer"] == layer:
                projection = h @ vector_of(when["vector"], layer).float()
                gates[json.dumps(when, sort_keys=True)] = (projection > when["above"] if "above" in when
                                                            else projection < when["below"])
        x = h
        additions = []
        for term in terms:
            if layer not in layers_of(term) or term.get("op") == "ablate":  # ablation: at the writes (write_hook)
                continue
            on = position_mask(term.get("positions", "all"), prompt_len, n) & gate_of(term, n)
            op = term.get("op", "add")
            if op == "clamp":
                u = vector_of(term["vector"], layer).float()
                u = u / u.norm()
                projection = x @ u
                lo, hi = (term["value"], term["value"]) if "value" in term else term["range"]
                target = projection.clamp(min=lo, max=hi)
                x = x + torch.where(on, target - projection, 0.0)[:, None] * u
            elif op == "sae" and "value" in term:
                sae = saes[term["sae"]]
                features = term["feature"] if isinstance(term["feature"], list) else [term["feature"]]
                for i in features:
                    inputs = x - torch.from_numpy(sae["b_dec"]) if sae["sub_b_dec"] else x
                    pre = inputs @ torch.from_numpy(sae["W_enc"][:, i]) + float(sae["b_enc"][i])
                    theta = float(sae["threshold"][i]) if sae.get("threshold") is not None else 0.0
                    f = torch.where(pre > theta, pre, 0.0)
                    x = x + torch.where(on, term["value"] - f, 0.0)[:, None] * torch.from_numpy(sae["W_dec"][i])
            else:
                if op == "sae":
                    features = term["feature"] if isinstance(term["feature"], list) else [term["feature"]]
                    v = torch.from_numpy(saes[term["sae"]]["W_dec"][features].sum(0))
                else:
                    v = vector_of(term["vector"], layer).float()
                if "when" in term:
                    x = x + torch.where(on[:, None], term.get("coef", 1.0) * v, 0.0)
                else:
                    additions.append((on, term, v))
        norm = h.norm(dim=-1, keepdim=True)  # norm_match and normalize: the residual before this layer's steering
        out, normalize = x, torch.zeros(n, dtype=torch.bool)
        for on, term, v in additions:
            added = term.get("coef", 1.0) * (norm * v / v.norm() if term.get("norm_match") else v)
            out = torch.where(on[:, None], out + added, out)
            normalize |= on & term.get("normalize", False)
        out = torch.where(normalize[:, None], out * norm / out.norm(dim=-1, keepdim=True), out)
        steered = out[None].to(device=hidden.device, dtype=hidden.dtype)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    def write_hook(module, args, output, layer):
        """Ablation at one write into the residual stream: w -= coef * (w . u) u per covering ablate term."""
        write = output[0] if isinstance(output, tuple) else output
        w = write[0].float().cpu()
        for term in terms:
            if term.get("op") != "ablate" or layer not in layers_of(term):
                continue
            u = vector_of(term["vector"], layer).float()
            u = u / u.norm()
            on = position_mask(term.get("positions", "all"), prompt_len, w.shape[0]) & gate_of(term, w.shape[0])
            w = w - torch.where(on, term.get("coef", 1.0) * (w @ u), 0.0)[:, None] * u
        out = w[None].to(device=write.device, dtype=write.dtype)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handles = [layer_module.register_forward_hook(partial(hook, layer=layer), prepend=True)
               for layer, layer_module in enumerate(decoder_layers(model))]
    if any(term.get("op") == "ablate" for term in terms):
        handles.append(model.get_input_embeddings().register_forward_hook(partial(write_hook, layer=0)))
        for layer, layer_module in enumerate(decoder_layers(model)):
            # the writes: attention and MLP outputs, or their post-norms where the family has them (Gemma 2 and 3)
            post_norms = model.config.get_text_config().model_type in ("gemma2", "gemma3_text", "olmo2")
            writes = (layer_module.post_attention_layernorm, layer_module.post_feedforward_layernorm) if post_norms \
                else (layer_module.self_attn, layer_module.mlp)
            handles += [w.register_forward_hook(partial(write_hook, layer=layer)) for w in writes]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
