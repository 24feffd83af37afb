"""engine-extract: steering vectors from contrastive prompt pairs, through the engine's activation capture.

Each pair's positive and negative prompt runs once (max_new_tokens=1) with capture at the chosen layers and
position; per layer the vector is either the difference of the class means (mean_diff, as in CAA) or the first
principal component of the paired differences (pca, as repeng's pca_diff: the differences are centered first),
unit length and signed so that positives project higher. A report beside the vector gives, per layer, its norm,
the mean projection of positives and negatives onto its direction, and their separation (on the same pairs).

A layer with nothing to extract is refused by name, never written as a zero or arbitrary vector. Measured against
`scale`, the mean L2 norm of the layer's activations (both sides): the mean difference's norm at most
MIN_RELATIVE_DIFF = 1e-5 x scale is zero (float32 noise between identical prompts is ~1e-7 x scale, a concept's
difference far above 1e-5); for pca, so is a spread of the paired differences around their mean (RMS norm) at most
1e-5 x scale (all pairs differ by one vector: no variance for a component). A pairs file whose every positive is
its negative's text is refused before anything runs (bf16 noise could pass the numeric test). Separation is None
("n/a") with fewer than 2 pairs or a pooled std at most 1e-5 x scale. The output path is checked before the engine
starts; vectors that cannot be written after the capture go to a fallback file in the temp folder, named in the
message. Exit codes as engine-run's: 0 all written, 1 nothing (or only the fallback), 3 some layers refused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError

from engine.apps.run import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_REJECTED
from engine.config import (
    DTYPES,
    CaptureDefaults,
    ConfigError,
    EngineConfig,
    SamplingDefaults,
)
from engine.models import ModelNotFound
from engine.engine import Engine, EngineError
from engine.storage.files import commit_file, write_problem
from engine.vectors import save_vectors

log = logging.getLogger("engine.apps.extract")

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


# ---- the pairs
def read_pairs(path: Path) -> list[dict]:
    """The pairs file: one {"positive": ..., "negative": ...} per line, each a prompt string or a chat list;
    ExtractError names the line, or says so when every pair's positive is the same text as its negative."""
    pairs, same_lines = [], []
    for number, line in _lines_of(path):
        pair = _parse_pair(path, number, line)
        if pair["positive"] == pair["negative"]:
            same_lines.append(number)
        pairs.append(pair)
    if not pairs:
        raise ExtractError(f"--pairs {path}: no pairs in it")
    if len(same_lines) == len(pairs):
        raise ExtractError(f"--pairs {path}: in every pair ({_line_list(same_lines)}) the positive and the negative "
                           f"prompt are the same text, so their difference is zero at every layer and there is no "
                           f"direction to extract; {CONCEPT_FIX}")
    if same_lines:
        log.warning("engine-extract: --pairs %s %s: the positive and the negative prompt are the same text; such a "
                    "pair adds a zero difference (it shrinks mean_diff and skews pca): fix or remove it", path,
                    _line_list(same_lines))
    return pairs


def _lines_of(path: Path) -> list[tuple[int, str]]:
    if path.is_dir():
        raise ExtractError(f"--pairs {path} is a folder; give the JSONL file of pairs")
    if not path.is_file():
        raise ExtractError(f"--pairs {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ExtractError(f"--pairs {path}: cannot read it ({exc}); give a UTF-8 JSONL file you can read") from None
    return [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def _parse_pair(path: Path, number: int, line: str) -> dict:
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
    return pair


def _line_list(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:10])) + (f" and {len(numbers) - 10} more" if len(numbers) > 10 else "")
    return f"line{'s' if len(numbers) > 1 else ''} {shown}"


def _is_prompt(value) -> bool:
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def check_method(method: str, pairs: list[dict]) -> None:
    """Before anything runs: a known method, and for pca at least 2 different pairs (it needs their differences
    to vary)."""
    if method not in METHODS:
        raise ExtractError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    num_distinct = len({json.dumps([p["positive"], p["negative"]], sort_keys=True) for p in pairs})
    if method == "pca" and num_distinct < 2:
        have = "there is 1 pair" if len(pairs) == 1 else f"all {len(pairs)} pairs are the same pair"
        raise ExtractError(f"--method pca needs at least 2 different pairs (it takes the axis along which the pairs' "
                           f"differences vary) and {have}: add different pairs, or use --method mean_diff")


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


# ---- the output
def report_paths(output: Path) -> tuple[Path, Path, Path]:
    """joy.gguf -> joy.report.json, joy.report.md, joy.report.png."""
    return tuple(output.with_name(f"{output.stem}.report.{suffix}") for suffix in ("json", "md", "png"))


def check_output(output: Path) -> None:
    """Before anything runs: `output` ends in a vector format, is not a folder (nor are its report's paths), and its
    folder exists or can be made and takes files (probed with a temporary file); ExtractError names path and fix."""
    try:
        if output.is_dir():
            raise ExtractError(f"--output {output} is a folder; give a file path for the vectors, e.g. "
                               f"{output / 'vectors.safetensors'}")
        if output.suffix.lower() not in OUTPUT_SUFFIXES:
            raise ExtractError(f"--output {output}: write vectors as .safetensors, .pt or .gguf")
        for path in report_paths(output):
            if path.is_dir():
                raise ExtractError(f"--output {output}: its report {path} would replace the folder of that name; "
                                   f"move that folder or choose another output")
    except OSError as exc:  # e.g. a name too long for the file system
        raise ExtractError(f"--output {output}: cannot use it ({exc.strerror or exc}); choose another path") from None
    problem = write_problem(output.parent)
    if problem:
        raise ExtractError(f"--output {output}: {problem}; choose an output in a folder you can write to") from None


def write_vectors(output: Path, vectors: dict[int, torch.Tensor], model_hint: str) -> None:
    """The vector file, written to a temporary file beside `output` and renamed over it: never half-written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.{os.getpid()}.tmp{output.suffix}")
    try:
        save_vectors(str(tmp), vectors, model_hint=model_hint)
        commit_file(tmp, output)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def fallback_path(output: Path) -> Path:
    """A new file in the system temp folder named after `output`, e.g. /tmp/joy.k3x9q1.gguf."""
    handle, name = tempfile.mkstemp(prefix=f"{output.stem}.", suffix=output.suffix)
    os.close(handle)
    return Path(name)


def save(output: Path, vectors: dict[int, torch.Tensor], settings: dict, reports: list[LayerReport],
         refusals: list[Refusal]) -> int:
    """Write the vectors and the report and say where, as one stderr line; the exit code. When `output` cannot be
    written the vectors go to a fallback file (named in the message) and the code is still 1."""
    try:
        write_vectors(output, vectors, settings["model"])
    except WRITE_ERRORS as exc:
        return _save_fallback(output, vectors, settings, reports, refusals, exc)
    try:
        paths = write_report(output, settings, reports, refusals)
    except WRITE_ERRORS as exc:
        _say(f"wrote {len(vectors)} layer vectors to {output}, but not their report ({_why(exc)}); the vectors are "
             f"complete: fix that and run again for the report")
        return EXIT_FATAL
    _say(f"{len(vectors)} layer vectors -> {output}; {_best(reports)}; report {', '.join(str(p) for p in paths)}"
         + (f"; {_refused(refusals, len(vectors))}" if refusals else ""))
    return EXIT_REJECTED if refusals else EXIT_OK


def _save_fallback(output: Path, vectors, settings: dict, reports, refusals, cause: BaseException) -> int:
    fallback = None
    try:
        fallback = fallback_path(output)
        write_vectors(fallback, vectors, settings["model"])
    except WRITE_ERRORS as exc:
        if fallback is not None:
            with contextlib.suppress(OSError):
                fallback.unlink()
        _say(f"cannot write {output} ({_why(cause)}), nor a fallback {fallback or 'in ' + tempfile.gettempdir()} "
             f"({_why(exc)}); the vectors are lost: free some space or fix the folder and run again")
        return EXIT_FATAL
    try:
        write_report(fallback, settings, reports, refusals)
        beside = " (their report beside it)"
    except WRITE_ERRORS:
        beside = ""
    _say(f"cannot write {output} ({_why(cause)}); the {len(vectors)} layer vectors are saved instead in {fallback}"
         f"{beside}: move them where you want them, or fix that and run again")
    return EXIT_FATAL


def _why(exc: BaseException) -> str:
    return f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.strerror and exc.filename else str(exc)


def _best(reports: list[LayerReport]) -> str:
    defined = [r for r in reports if r.separation is not None]
    if not defined:
        return "separation n/a (it needs 2 or more pairs that vary)"
    best = max(defined, key=lambda r: r.separation)
    return f"best separation {best.separation:.2f} at layer {best.layer}"


def _refused(refusals: list[Refusal], num_written: int) -> str:
    """The refused layers in one sentence: each with its reason, then the fix (once per kind of fix)."""
    layers = ", ".join(str(r.layer) for r in refusals)
    reasons = "; ".join(f"layer {r.layer}: {r.reason}" for r in refusals)
    fixes = "; ".join(dict.fromkeys(r.fix for r in refusals))
    done = f"the other {num_written} layer(s) are written" if num_written else "nothing is written"
    return f"no vector at layer(s) {layers}, {done} ({reasons}). To fix: {fixes}"


def _say(message: str) -> None:
    print(f"engine-extract: {message}", file=sys.stderr)


# ---- the report
def write_report(output: Path, settings: dict, reports: list[LayerReport], refusals: list[Refusal] = ()
                 ) -> tuple[Path, Path, Path]:
    """joy.report.json / .md / .png beside `output`; refused layers are listed, with why."""
    json_path, md_path, png_path = report_paths(output)
    rows = [dataclasses.asdict(r) for r in reports]
    refused = [dataclasses.asdict(r) for r in refusals]
    json_path.write_text(json.dumps({"settings": settings, "layers": rows, "refused": refused}, indent=2) + "\n")
    md_path.write_text(markdown(settings, reports, refusals))
    write_plot(png_path, settings, reports)
    return json_path, md_path, png_path


def markdown(settings: dict, reports: list[LayerReport], refusals: list[Refusal] = ()) -> str:
    """The report as a markdown table; an undefined separation reads n/a."""
    lines = [f"# Steering vectors: {settings['output']}", "",
             (f"{settings['num_pairs']} pairs from `{settings['pairs']}`, method `{settings['method']}`, positions "
              f"`{settings['positions']}`, model `{settings['model']}`."), "",
             "| layer | norm | mean proj. positive | mean proj. negative | separation (d) | pair accuracy |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.layer} | {r.norm:.4g} | {r.mean_positive:.4g} | {r.mean_negative:.4g} | "
              f"{'n/a' if r.separation is None else format(r.separation, '.3g')} | {r.pair_accuracy:.0%} |"
              for r in reports]
    lines += ["", ("Projections are onto the unit direction of each layer's vector, on the same pairs it was "
                   "extracted from (in-sample). Separation: difference of the mean projections over their pooled "
                   "standard deviation; n/a with fewer than 2 pairs or no spread."), ""]
    if refusals:
        lines += ["## Refused layers (no vector written)", ""] + [f"- layer {r.layer}: {r.reason}: {r.fix}"
                                                                    for r in refusals]
        lines += [""]
    return "\n".join(lines)


def write_plot(path: Path, settings: dict, reports: list[LayerReport]) -> None:
    """Separation (where defined) and vector norm per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defined = [r for r in reports if r.separation is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([r.layer for r in defined], [r.separation for r in defined], marker="o", color="#3b6ea8")
    if not defined:
        left.text(0.5, 0.5, "n/a (fewer than 2 pairs or no spread)", ha="center", va="center",
                  transform=left.transAxes)
    left.set_ylabel("separation (Cohen's d)")
    right.plot([r.layer for r in reports], [r.norm for r in reports], marker="o", color="#5a9e5a")
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
    p.add_argument("--output", required=True, help=f"vector file: {', '.join(OUTPUT_SUFFIXES)}")
    p.add_argument("--positions", default="last_prompt", choices=POSITIONS)
    p.add_argument("--model", default="embedded", help="embedded | local HF dir | file.gguf | random:<preset>")
    p.add_argument("--tokenizer", help="tokenizer.json (or its dir) to use instead of the model's")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-num-seqs", type=int,
                   help="sequences decoded together (default: 512 on a GPU as memory allows, 64 on a CPU)")
    return p


def extract_main(argv: list[str] | None = None) -> int:
    """engine-extract: 0 every layer written, 1 nothing written (or the vector file only to a fallback), 3 some
    layers refused and the others written, 130 interrupted; every message is one stderr line, never a traceback."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    output = Path(args.output)
    try:
        check_output(output)
        layers = parse_layers(args.layers)
        pairs = read_pairs(Path(args.pairs))
        check_method(args.method, pairs)
        config = EngineConfig(model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
                              max_num_seqs=args.max_num_seqs, sampling=SamplingDefaults(max_new_tokens=1),
                              capture=CaptureDefaults(layers=layers, positions=args.positions))
        vectors, reports, refusals = extract(config, pairs, args.method)
    except (ExtractError, ConfigError, ModelNotFound, EngineError) as exc:
        _say(str(exc))
        return EXIT_FATAL
    except KeyboardInterrupt:
        _say("interrupted; nothing written")
        return EXIT_INTERRUPTED
    if not vectors:
        _say(_refused(refusals, 0))
        return EXIT_FATAL
    settings = {"pairs": args.pairs, "num_pairs": len(pairs), "layers": layers, "method": args.method,
                "positions": args.positions, "model": args.model, "output": str(output)}
    return save(output, vectors, settings, reports, refusals)


if __name__ == "__main__":
    sys.exit(extract_main())
