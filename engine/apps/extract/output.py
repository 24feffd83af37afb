"""Writing the vectors and their report: the output path checked before the engine starts, a fallback file in the
temp folder when the vectors cannot be written after the capture, the Markdown report and its plot."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from engine.apps.run import EXIT_FATAL, EXIT_OK, EXIT_REJECTED
from engine.storage.files import commit_file, write_problem
from engine.vectors import save_vectors
from engine.apps.extract.spec import ExtractError, LayerReport, OUTPUT_SUFFIXES, Refusal, WRITE_ERRORS


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
        say(f"wrote {len(vectors)} layer vectors to {output}, but not their report ({_why(exc)}); the vectors are "
             f"complete: fix that and run again for the report")
        return EXIT_FATAL
    say(f"{len(vectors)} layer vectors -> {output}; {_best(reports)}; report {', '.join(str(p) for p in paths)}"
         + (f"; {refused_message(refusals, len(vectors))}" if refusals else ""))
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
        say(f"cannot write {output} ({_why(cause)}), nor a fallback {fallback or 'in ' + tempfile.gettempdir()} "
             f"({_why(exc)}); the vectors are lost: free some space or fix the folder and run again")
        return EXIT_FATAL
    try:
        write_report(fallback, settings, reports, refusals)
        beside = " (their report beside it)"
    except WRITE_ERRORS:
        beside = ""
    say(f"cannot write {output} ({_why(cause)}); the {len(vectors)} layer vectors are saved instead in {fallback}"
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


def refused_message(refusals: list[Refusal], num_written: int) -> str:
    """The refused layers in one sentence: each with its reason, then the fix (once per kind of fix)."""
    layers = ", ".join(str(r.layer) for r in refusals)
    reasons = "; ".join(f"layer {r.layer}: {r.reason}" for r in refusals)
    fixes = "; ".join(dict.fromkeys(r.fix for r in refusals))
    done = f"the other {num_written} layer(s) are written" if num_written else "nothing is written"
    return f"no vector at layer(s) {layers}, {done} ({reasons}). To fix: {fixes}"


def say(message: str) -> None:
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


