"""engine-bench's adapter rows (--lora-rank R): a random rank-R LoRA on every linear layer of the decoder written
as PEFT writes one (adapter_config.json + adapter_model.safetensors, PEFT's key names), without building the model;
a second engine loads it, and the same prompts run with no record on it, then with every other record on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.models import ModelSource, text_config

NAME = "bench"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in, out) features of each targeted linear of a Llama/Gemma-style decoder layer, from its text config."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def write_random_lora(source: ModelSource, rank: int, folder: Path, seed: int = 0) -> Path:
    """A PEFT LoRA directory of rank `rank` (alpha 2 * rank) on every TARGETS linear of every decoder layer."""
    from safetensors.numpy import save_file

    config = text_config(source)
    shapes = linear_shapes(config)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name, (fan_in, fan_out) in shapes.items():
            part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((fan_out, rank)) * 0.01).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(TARGETS), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "base_model_name_or_path": source.spec}, indent=1))
    return folder


def lora_rows(base: str, rank: int, records: list[dict]) -> list[tuple[str, list[dict]]]:
    """The adapter engine's rows: the records as they are (the adapter loaded, none on it), then every other one
    on the adapter."""
    mixed = [{**r, "adapter": NAME} if i % 2 == 0 else r for i, r in enumerate(records)]
    return [(f"{base}+lora{rank}:0%", records), (f"{base}+lora{rank}:50%", mixed)]
