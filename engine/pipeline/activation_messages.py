"""The activations message, as it travels from the engine core to a decoder worker: what a worker does to it.

A message is {positions, dtype, is_before_steering, layers: {layer: [shape, raw bytes]}} (ActivationRecorder.pop
builds it). This lives apart from engine/core/activations.py because the decoder workers must not import torch (their
start-up is part of every run): it needs only the byte size of each capture dtype.
"""

from __future__ import annotations

import math

ITEM_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per value of each capture dtype


def trim_generated(message: dict, num_tokens: int) -> dict:
    """Keep `generated` rows for all but the last of the completion tokens a stop string left, as without a cut."""
    if message["positions"] != "generated":
        return message
    keep = max(num_tokens - 1, 0)
    layers = {}
    for layer, (shape, data) in message["layers"].items():
        size = ITEM_SIZES[message["dtype"]] * math.prod(shape[1:])
        layers[layer] = [[min(shape[0], keep), *shape[1:]], data[:keep * size]]
    return {**message, "layers": layers}
