"""engine-extract's terms: methods, positions and limits, its errors, the per-layer report and refusal rows."""

from __future__ import annotations

import dataclasses

from safetensors import SafetensorError



METHODS = ("mean_diff", "pca")
POSITIONS = ("last_prompt", "mean_prompt")
SIDES = ("positive", "negative")
OUTPUT_SUFFIXES = (".safetensors", ".pt", ".gguf")  # the vector formats that hold several layers
MIN_RELATIVE_DIFF = 1e-5  # below this fraction of the activations' norm, a difference counts as zero
# torch.save reports a failed write as RuntimeError and safetensors as SafetensorError, not OSError.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
CONCEPT_FIX = "the positive and negative prompts must differ in the concept; check the pairs file"


class ExtractError(ValueError):
    """Bad pairs, layers, method or output; the message names the value and the fix."""


class DegenerateLayer(ExtractError):
    """One layer's activations hold no direction to extract: `reason` says how small, `fix` what to do."""

    def __init__(self, reason: str, fix: str):
        super().__init__(f"{reason}: {fix}")
        self.reason, self.fix = reason, fix


@dataclasses.dataclass(slots=True)
class LayerReport:
    layer: int
    norm: float
    mean_positive: float  # mean projection of the positives onto the unit direction
    mean_negative: float
    separation: float | None  # (mean_positive - mean_negative) / pooled std (Cohen's d); None where undefined
    pair_accuracy: float  # share of pairs whose positive projects higher than its negative


@dataclasses.dataclass(slots=True)
class Refusal:
    """A layer that got no vector: why, and what to do."""

    layer: int
    reason: str
    fix: str


def parse_layers(text: str) -> list[int]:
    """`4-12` (inclusive), `4,8,12` or a mix (`2,4-6`) -> sorted layer indices."""
    layers: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        lo, dash, hi = part.partition("-")
        if not (lo.isdigit() and (not dash or hi.isdigit())):
            raise ExtractError(f"--layers {text!r}: {part!r} is not a layer or a range; write e.g. 4-12 or 4,8,12")
        start, end = int(lo), int(hi) if dash else int(lo)
        if start > end:
            raise ExtractError(f"--layers {text!r}: the range {part} runs backwards; write {end}-{start}")
        layers.update(range(start, end + 1))
    return sorted(layers)


