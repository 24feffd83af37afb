"""PEFT LoRA adapters on a copy of a model, saved as PEFT saves them: what the adapter tests load into the engine and
compare against."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# The tiny models' linear layers (every decoder layer's attention and MLP projections).
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora(model, directory: Path, seed: int, **settings):
    """PEFT's model with a random LoRA (B non-zero: init_lora_weights=False) on a copy of `model`, saved in
    `directory` as PEFT saves it; `settings` are LoraConfig's."""
    import peft

    torch.manual_seed(seed)
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **settings))
    lora.eval()
    lora.save_pretrained(directory)
    return lora
