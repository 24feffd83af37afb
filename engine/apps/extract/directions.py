"""Per layer, the direction from the positive and negative activations (mean_diff or pca), refused where there is
nothing to extract, and its report row."""

from __future__ import annotations


import torch

from engine.config import (
    EngineConfig,
)
from engine.apps.extract.pairs import capture_pairs, check_method
from engine.apps.extract.spec import CONCEPT_FIX, DegenerateLayer, ExtractError, LayerReport, MIN_RELATIVE_DIFF, Refusal


# ---- the vectors
def activation_scale(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """The mean L2 norm of a layer's [pairs, H] activations, both sides: what "near zero" is measured against."""
    return torch.cat([positive, negative]).norm(dim=1).mean().item()


def degeneracy(method: str, positive: torch.Tensor, negative: torch.Tensor) -> tuple[str, str] | None:
    """Why a layer's activations hold no direction for `method`, and the fix; None when they hold one. The
    thresholds are MIN_RELATIVE_DIFF x the activations' scale (see the module docstring)."""
    if not (torch.isfinite(positive).all() and torch.isfinite(negative).all()):
        return "its activations hold NaN or inf", "the model's numerics overflowed; try --dtype float32"
    scale = activation_scale(positive, negative)
    diffs = positive - negative
    gap = diffs.mean(0).norm().item()
    if gap <= MIN_RELATIVE_DIFF * scale:
        return (f"the mean difference of positives and negatives is {_relative(gap, scale)} of the activations' norm "
                f"({scale:.3g}; at most {MIN_RELATIVE_DIFF:g} counts as zero)"), CONCEPT_FIX
    if method == "pca":
        spread = (diffs - diffs.mean(0)).square().sum(1).mean().sqrt().item()
        if spread <= MIN_RELATIVE_DIFF * scale:
            reason = (f"every pair differs by the same vector (the differences' spread is {_relative(spread, scale)} "
                      f"of the activations' norm), so there is no variance to take a principal component from")
            return reason, "use --method mean_diff, or add pairs that differ from each other"
    return None


def _relative(value: float, scale: float) -> str:
    return f"{value / scale:.1e}" if scale > 0 else "0 (every activation is zero)"


def direction(method: str, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """One layer's vector from [pairs, H] activations, signed so that positives project higher; DegenerateLayer
    when the activations hold none (a zero mean difference; for pca also differences that do not vary)."""
    if method == "pca" and positive.shape[0] < 2:
        raise ExtractError("--method pca needs at least 2 pairs (it centers their differences); use mean_diff")
    problem = degeneracy(method, positive, negative)
    if problem:
        raise DegenerateLayer(*problem)
    if method == "mean_diff":
        return positive.mean(0) - negative.mean(0)
    diffs = positive - negative
    _, _, vh = torch.linalg.svd(diffs - diffs.mean(0), full_matrices=False)
    vector = vh[0]
    return vector if (positive @ vector).mean() >= (negative @ vector).mean() else -vector


def separation(pos: torch.Tensor, neg: torch.Tensor, scale: float) -> float | None:
    """Cohen's d of the projections; None where it is undefined: fewer than 2 pairs, or a pooled standard deviation
    at most MIN_RELATIVE_DIFF x scale (the ratio would be of float noise)."""
    if pos.shape[0] < 2:
        return None
    pooled = ((pos.var(unbiased=False) + neg.var(unbiased=False)) / 2).sqrt().item()
    if pooled <= MIN_RELATIVE_DIFF * scale:
        return None
    return (pos.mean() - neg.mean()).item() / pooled


def layer_report(layer: int, vector: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> LayerReport:
    """A layer's row of the report: its vector's norm and how the pairs project onto its direction."""
    unit = vector / vector.norm().clamp_min(1e-12)
    pos, neg = positive @ unit, negative @ unit
    return LayerReport(layer=layer, norm=vector.norm().item(), mean_positive=pos.mean().item(),
                       mean_negative=neg.mean().item(),
                       separation=separation(pos, neg, activation_scale(positive, negative)),
                       pair_accuracy=(pos > neg).float().mean().item())


def extract(config: EngineConfig, pairs: list[dict], method: str
            ) -> tuple[dict[int, torch.Tensor], list[LayerReport], list[Refusal]]:
    """Per-layer vectors, their report, and the layers refused (no direction there), for pairs already read."""
    check_method(method, pairs)
    positives, negatives = capture_pairs(config, pairs)
    vectors, refusals = {}, []
    for layer in sorted(positives):
        try:
            vectors[layer] = direction(method, positives[layer], negatives[layer])
        except DegenerateLayer as exc:
            refusals.append(Refusal(layer, exc.reason, exc.fix))
    reports = [layer_report(layer, vectors[layer], positives[layer], negatives[layer]) for layer in vectors]
    return vectors, reports, refusals


