"""The two baselines engine-bench compares against: the naive loop and the best batched Hugging Face loop.

Both run the model the engine runs (same loader, same seeded random weights), with the same sampling settings,
and force exactly `max_new_tokens` per prompt as the engine does with `ignore_eos`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.config import SamplingDefaults
from engine.models import ModelSource, load_model
from engine.models import load_hf_tokenizer
from engine_bench.workloads import Prompt

OnResult = Callable[[int], None]  # called with the number of prompts just finished


@dataclass(slots=True)
class LoopOutput:
    """What a baseline produced, in prompt order."""

    token_ids: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    num_generated_tokens: int = 0  # includes tokens a static batch computed past a row's own max_new_tokens


def load_hf(source: ModelSource, dtype: torch.dtype, device: str):
    """(model, tokenizer, attention implementation) for the baselines; flash-attn where installed."""
    tok = load_hf_tokenizer(source.tokenizer_dir)
    model = load_model(source, dtype, device, vocab_size=len(tok))
    set_pad_token(tok, model.config)
    # No EOS id: generate then runs every row to max_new_tokens without touching the logits (min_new_tokens
    # would mask EOS and change greedy picks), which matches the engine's ignore_eos.
    model.generation_config.eos_token_id = None
    attn = "sdpa"
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        model.set_attn_implementation("flash_attention_2")
        attn = "flash_attention_2"
    return model, tok, attn


def set_pad_token(tok, config) -> None:
    """Give the tokenizer a pad token for left padding: its own, else its EOS (the usual recipe), else the model
    config's pad/EOS id (a bare tokenizer.json names no special tokens)."""
    if tok.pad_token_id is not None:
        return
    for pad_id in (tok.eos_token_id, getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(pad_id, list):
            pad_id = pad_id[0] if pad_id else None
        if pad_id is not None:
            tok.pad_token = tok.convert_ids_to_tokens(int(pad_id))
            return
    raise ValueError(f"tokenizer in {tok.name_or_path!r} has no pad or EOS token and the model config names neither: "
                     "pass --tokenizer a directory whose tokenizer_config.json names pad_token or eos_token")


def generate_kwargs(sampling: SamplingDefaults, pad_id: int) -> dict:
    """generate() settings equal to the engine's: greedy at temperature 0, else temperature/top-p/top-k."""
    common = {"use_cache": True, "num_beams": 1, "pad_token_id": pad_id}
    if sampling.temperature == 0:
        return {**common, "do_sample": False}
    # top_k is passed even when 0 because generate's own default is 50.
    return {**common, "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k}


@torch.inference_mode()
def naive_loop(model, tok, prompts: list[Prompt], sampling: SamplingDefaults, on_result: OnResult) -> LoopOutput:
    """For each prompt: tokenize, generate it alone, decode."""
    out = LoopOutput()
    kwargs = generate_kwargs(sampling, tok.pad_token_id)
    for prompt in prompts:
        enc = tok(prompt.text, return_tensors="pt").to(model.device)
        generated = model.generate(**enc, max_new_tokens=prompt.max_new_tokens, **kwargs)
        ids = generated[0, enc["input_ids"].shape[1]:].tolist()
        out.texts.append(tok.decode(ids, skip_special_tokens=True))
        out.token_ids.append(ids)
        out.num_generated_tokens += len(ids)
        on_result(1)
    return out


def trim_left_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in every row (chunk-wide padding -> this batch's longest)."""
    first = int(mask.any(dim=0).int().argmax())
    return ids[:, first:], mask[:, first:]


@torch.inference_mode()
def batched_loop(model, tok, prompts: list[Prompt], batch_size: int, sampling: SamplingDefaults,
                 on_result: OnResult) -> LoopOutput:
    """The seed write-up's recipe: fast tokenizer on chunks of 4 batches moved to the device per chunk, dynamic
    left padding, one generate per batch (to the batch's largest max_new_tokens), batch_decode."""
    out = LoopOutput()
    kwargs = generate_kwargs(sampling, tok.pad_token_id)
    tok.padding_side = "left"
    chunk_size = 4 * batch_size
    for chunk_start in range(0, len(prompts), chunk_size):
        chunk = prompts[chunk_start:chunk_start + chunk_size]
        enc = tok([p.text for p in chunk], padding=True, return_tensors="pt").to(model.device)
        for start in range(0, len(chunk), batch_size):
            batch = chunk[start:start + batch_size]
            ids, mask = trim_left_padding(enc["input_ids"][start:start + batch_size],
                                          enc["attention_mask"][start:start + batch_size])
            max_new = max(p.max_new_tokens for p in batch)
            generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, **kwargs)
            rows = [row[:p.max_new_tokens] for row, p in zip(generated[:, ids.shape[1]:].tolist(), batch)]
            out.texts += tok.batch_decode(rows, skip_special_tokens=True)
            out.token_ids += rows
            out.num_generated_tokens += len(batch) * max_new
            on_result(len(batch))
    return out
