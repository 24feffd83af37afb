"""engine-extract: steering vectors from contrastive prompt pairs, through the engine's activation capture.

Each pair's positive and negative prompt runs once (max_new_tokens=1) with capture at the chosen layers and
position; per layer the vector is either the difference of the class means (mean_diff, as in CAA) or the first
principal component of the paired differences (pca, as repeng's pca_diff: the differences are centered first),
unit length and signed so that positives project higher. A report beside the vector gives, per layer, its norm,
the mean projection of positives and negatives onto its direction, and their separation (on the same pairs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from engine.config import DTYPES, CaptureDefaults, ConfigError, EngineConfig, SamplingDefaults
from engine.models import ModelNotFound
from engine.pipeline import Engine, EngineError
from engine.steering import VECTOR_SUFFIXES, save_vectors

METHODS = ("mean_diff", "pca")
POSITIONS = ("last_prompt", "mean_prompt")
SIDES = ("positive", "negative")


class ExtractError(ValueError):
    """Bad pairs, layers or method; the message names the value and the fix."""


@dataclasses.dataclass(slots=True)
class LayerReport:
    layer: int
    norm: float
    mean_positive: float  # mean projection of the positives onto the unit direction
    mean_negative: float
    separation: float  # (mean_positive - mean_negative) / pooled standard deviation (Cohen's d)
    pair_accuracy: float  # share of pairs whose positive projects higher than its negative


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


def read_pairs(path: Path) -> list[dict]:
    """The pairs file: one {"positive": ..., "negative": ...} per line, each a prompt string or a chat list."""
    if not path.is_file():
        raise ExtractError(f"--pairs {path}: no such file")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ExtractError(f"--pairs {path} line {number}: not JSON ({exc.msg} at column {exc.colno})") from None
        missing = [side for side in SIDES if not isinstance(pair, dict) or side not in pair]
        if missing:
            raise ExtractError(f"--pairs {path} line {number}: missing {' and '.join(repr(m) for m in missing)}; each "
                               f"line needs \"positive\" and \"negative\" (a prompt string or a list of chat messages)")
        for side in SIDES:
            if not _is_prompt(pair[side]):
                raise ExtractError(f"--pairs {path} line {number}: {side!r} is {json.dumps(pair[side])[:60]}; give a "
                                   f"non-empty prompt string or a list of {{\"role\", \"content\"}} messages")
        pairs.append(pair)
    if not pairs:
        raise ExtractError(f"--pairs {path}: no pairs in it")
    return pairs


def _is_prompt(value) -> bool:
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def pair_records(pairs: list[dict]) -> list[dict]:
    """Engine records: pair i's positive is `<i>+`, its negative `<i>-`."""
    records = []
    for i, pair in enumerate(pairs):
        for side, sign in zip(SIDES, "+-"):
            text = pair[side]
            records.append({"id": f"{i}{sign}", ("prompt" if isinstance(text, str) else "messages"): text})
    return records


def capture_pairs(config: EngineConfig, pairs: list[dict]) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Run every prompt once through the engine; ({layer: [pairs, H]} of positives, the same of negatives)."""
    with Engine(config) as engine:
        results = {r["id"]: r for r in engine.generate_all(pair_records(pairs))}
    failed = [r for r in results.values() if "error" in r]
    if failed:
        pair, side = int(failed[0]["id"][:-1]) + 1, SIDES["+-".index(failed[0]["id"][-1])]
        raise ExtractError(f"pair {pair} ({side}) cannot run: {failed[0]['error']}")
    layers = config.capture.layers
    return tuple({layer: torch.stack([results[f"{i}{sign}"]["activations"][layer].float() for i in range(len(pairs))])
                  for layer in layers} for sign in "+-")


def direction(method: str, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """One layer's vector from [pairs, H] activations, signed so that positives project higher."""
    if method == "mean_diff":
        return positive.mean(0) - negative.mean(0)
    diffs = positive - negative
    if diffs.shape[0] < 2:
        raise ExtractError("--method pca needs at least 2 pairs (it centers their differences); use mean_diff")
    _, _, vh = torch.linalg.svd(diffs - diffs.mean(0), full_matrices=False)
    vector = vh[0]
    return vector if (positive @ vector).mean() >= (negative @ vector).mean() else -vector


def layer_report(layer: int, vector: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> LayerReport:
    unit = vector / vector.norm().clamp_min(1e-12)
    pos, neg = positive @ unit, negative @ unit
    pooled = ((pos.var(unbiased=False) + neg.var(unbiased=False)) / 2).sqrt().item()
    gap = (pos.mean() - neg.mean()).item()
    return LayerReport(layer=layer, norm=vector.norm().item(), mean_positive=pos.mean().item(),
                       mean_negative=neg.mean().item(), separation=gap / max(pooled, 1e-12),
                       pair_accuracy=(pos > neg).float().mean().item())


def extract(config: EngineConfig, pairs: list[dict], method: str) -> tuple[dict[int, torch.Tensor], list[LayerReport]]:
    """Per-layer vectors and their report, for pairs already read."""
    if method not in METHODS:
        raise ExtractError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    positives, negatives = capture_pairs(config, pairs)
    vectors = {layer: direction(method, positives[layer], negatives[layer]) for layer in positives}
    return vectors, [layer_report(layer, vectors[layer], positives[layer], negatives[layer]) for layer in sorted(vectors)]


# ---- the report
def report_paths(output: Path) -> tuple[Path, Path, Path]:
    """joy.gguf -> joy.report.json, joy.report.md, joy.report.png."""
    return tuple(output.with_name(f"{output.stem}.report.{suffix}") for suffix in ("json", "md", "png"))


def write_report(output: Path, settings: dict, reports: list[LayerReport]) -> tuple[Path, Path, Path]:
    json_path, md_path, png_path = report_paths(output)
    rows = [dataclasses.asdict(r) for r in reports]
    json_path.write_text(json.dumps({"settings": settings, "layers": rows}, indent=2) + "\n")
    md_path.write_text(markdown(settings, reports))
    write_plot(png_path, settings, reports)
    return json_path, md_path, png_path


def markdown(settings: dict, reports: list[LayerReport]) -> str:
    lines = [f"# Steering vectors: {settings['output']}", "",
             f"{settings['num_pairs']} pairs from `{settings['pairs']}`, method `{settings['method']}`, positions "
             f"`{settings['positions']}`, model `{settings['model']}`.", "",
             "| layer | norm | mean proj. positive | mean proj. negative | separation (d) | pair accuracy |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.layer} | {r.norm:.4g} | {r.mean_positive:.4g} | {r.mean_negative:.4g} | {r.separation:.3g} | "
              f"{r.pair_accuracy:.0%} |" for r in reports]
    lines += ["", "Projections are onto the unit direction of each layer's vector, on the same pairs it was "
              "extracted from (in-sample). Separation: difference of the mean projections over their pooled "
              "standard deviation.", ""]
    return "\n".join(lines)


def write_plot(path: Path, settings: dict, reports: list[LayerReport]) -> None:
    """Separation and vector norm per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r.layer for r in reports]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(layers, [r.separation for r in reports], marker="o", color="#3b6ea8")
    left.set_ylabel("separation (Cohen's d)")
    right.plot(layers, [r.norm for r in reports], marker="o", color="#5a9e5a")
    right.set_ylabel("vector norm")
    for axis in (left, right):
        axis.set_xlabel("layer")
        axis.grid(alpha=0.3)
    fig.suptitle(f"{settings['method']} at {settings['positions']}: {settings['num_pairs']} pairs, {settings['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the command
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine-extract", description="Steering vectors from contrastive prompt pairs.")
    p.add_argument("--pairs", required=True, help="JSONL: {\"positive\": ..., \"negative\": ...} per line")
    p.add_argument("--layers", required=True, help="decoder layers: 4-12, 4,8,12 or a mix")
    p.add_argument("--method", default="mean_diff", help=f"{' | '.join(METHODS)} (default mean_diff)")
    p.add_argument("--output", required=True, help=f"vector file: {', '.join(s for s in VECTOR_SUFFIXES if s != '.npy')}")
    p.add_argument("--positions", default="last_prompt", choices=POSITIONS)
    p.add_argument("--model", default="embedded", help="embedded | local HF dir | file.gguf | random:<preset>")
    p.add_argument("--tokenizer", help="tokenizer.json (or its dir) to use instead of the model's")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-num-seqs", type=int, default=64)
    return p


def extract_main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    output = Path(args.output)
    try:
        if output.suffix.lower() not in (".safetensors", ".pt", ".gguf"):
            raise ExtractError(f"--output {output}: write vectors as .safetensors, .pt or .gguf")
        if args.method not in METHODS:
            raise ExtractError(f"--method {args.method!r}: use one of {', '.join(METHODS)}")
        layers = parse_layers(args.layers)
        pairs = read_pairs(Path(args.pairs))
        config = EngineConfig(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
                              max_num_seqs=args.max_num_seqs, sampling=SamplingDefaults(max_new_tokens=1),
                              capture=CaptureDefaults(layers=layers, positions=args.positions))
        vectors, reports = extract(config, pairs, args.method)
    except (ExtractError, ConfigError, ModelNotFound, EngineError) as exc:
        print(f"engine-extract: {exc}", file=sys.stderr)
        return 1
    output.parent.mkdir(parents=True, exist_ok=True)
    save_vectors(str(output), vectors, model_hint=args.model)
    settings = {"pairs": args.pairs, "num_pairs": len(pairs), "layers": layers, "method": args.method,
                "positions": args.positions, "model": args.model, "output": str(output)}
    paths = write_report(output, settings, reports)
    best = max(reports, key=lambda r: r.separation)
    print(f"engine-extract: {len(vectors)} layer vectors -> {output}; best separation {best.separation:.2f} at layer "
          f"{best.layer}; report {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(extract_main())
