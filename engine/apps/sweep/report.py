"""The report of a sweep directory: per model and grid point, counts, completion lengths, finish reasons and the
sweep's metrics, as summary.csv, summary.md and PNG plots (a metric against the coefficient, one line per layer
set, one panel per vector and model; the unsteered baseline as a dashed line).

results.jsonl is streamed and lengths are kept as counts per length, so memory does not grow with the number of
records. Works on a sweep that is still running or was stopped (it reports what is on disk).
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engine.storage.files import complete_records
from engine.apps.sweep.fields import SweepError
from engine.apps.sweep.grid import BASELINE
from engine.apps.sweep.outdir import ERRORS, PLAN, RESULTS
from engine.apps.sweep.plan import read_prompts
from engine.apps.sweep.spec import SUMMARY_COLUMNS, PromptSet


@dataclass(slots=True)
class PointStats:
    """What the report keeps per (model, grid point): counts, not records."""

    num_records: int = 0
    num_errors: int = 0
    lengths: Counter = field(default_factory=Counter)  # completion length -> records: an exact median, bounded
    finish: Counter = field(default_factory=Counter)
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, record: dict, scores: dict[str, float | None]) -> None:
        self.num_records += 1
        self.lengths[record["num_completion_tokens"]] += 1
        self.finish[record["finish_reason"]] += 1
        for name, value in scores.items():
            if value is not None:
                self.sums[name] = self.sums.get(name, 0.0) + value
                self.counts[name] = self.counts.get(name, 0) + 1

    def mean_length(self) -> float | None:
        return sum(k * n for k, n in self.lengths.items()) / self.num_records if self.num_records else None

    def median_length(self) -> float | None:
        if not self.num_records:
            return None
        ordered = sorted(self.lengths.items())
        lower, upper = _nth(ordered, (self.num_records - 1) // 2), _nth(ordered, self.num_records // 2)
        return (lower + upper) / 2

    def mean(self, name: str) -> float | None:
        return self.sums[name] / self.counts[name] if self.counts.get(name) else None


def _nth(ordered: list[tuple[int, int]], index: int) -> int:
    seen = 0
    for value, count in ordered:
        seen += count
        if index < seen:
            return value
    raise IndexError(index)


class Scorer:
    """The sweep's metrics as functions of one record -> {column: score or None}."""

    def __init__(self, plan: dict, out: Path):
        self.metrics, self.out = plan["metrics"], out
        self.vectors = plan["vectors"]
        self._functions, self._patterns = {}, {}
        self._vector_cache: dict[tuple[str, int], dict] = {}
        self._shard: tuple[str, object] | None = None
        self.logprobs = LogProbs(plan)
        for metric in self.metrics:
            if metric["kind"] == "regex":
                flags = re.IGNORECASE if metric["ignore_case"] else 0
                self._patterns[metric["name"]] = re.compile(metric["value"], flags)
            elif metric["kind"] == "keywords":
                words = "|".join(re.escape(k) for k in metric["value"])
                self._patterns[metric["name"]] = re.compile(rf"(?<!\w)(?:{words})(?!\w)",
                                                            re.IGNORECASE if metric["ignore_case"] else 0)
            elif metric["kind"] == "function":
                self._functions[metric["name"]] = _import(metric["value"], plan["base_dir"], metric["name"])

    def score(self, record: dict) -> dict[str, float | None]:
        scores: dict[str, float | None] = {}
        for metric in self.metrics:
            name, kind = metric["name"], metric["kind"]
            if kind in ("regex", "keywords"):
                scores[name] = float(bool(self._patterns[name].search(record["completion"])))
            elif kind == "function":
                scores[name] = self._custom(name, metric["value"], record)
            elif kind == "logprob":
                scores[name] = self.logprobs.score(record)
            else:
                scores.update(self._projections(metric, record))
        return scores

    def _custom(self, name: str, spec: str, record: dict) -> float | None:
        try:
            value = self._functions[name](record)
        except Exception as exc:  # a user's function, re-raised: report which record broke it, with the cause
            raise SweepError(f"metric {name} ({spec}) failed on record {record['id']}: {type(exc).__name__}: "
                             f"{exc}") from exc
        if value is None:
            return None
        if isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
            return float(value)
        raise SweepError(f"metric {name} ({spec}) returned {value!r} for record {record['id']}; return a finite "
                         f"number, a bool, or None to leave the record out")

    def _projections(self, metric: dict, record: dict) -> dict[str, float | None]:
        """Mean projection of the record's captured activations (all rows) onto the unit vector, per layer."""
        pointer = record.get("activations")
        if not isinstance(pointer, dict):
            return {}
        layers = [metric["layer"]] if metric["layer"] is not None else pointer["layers"]
        tensors = self._tensors(pointer, layers)
        out = {}
        for layer, tensor in tensors.items():
            column = metric["name"] if metric["layer"] is not None else f"{metric['name']}@L{layer}"
            direction = self._direction(metric["value"], layer, tensor.shape[-1])
            rows = tensor.float().reshape(-1, tensor.shape[-1])
            out[column] = None if direction is None or rows.shape[0] == 0 else rows.mv(direction).mean().item()
        return out

    def _tensors(self, pointer: dict, layers: list[int]) -> dict:
        from safetensors import safe_open

        if self._shard is None or self._shard[0] != pointer["shard"]:  # one shard open at a time: records come in order
            self._shard = (pointer["shard"], safe_open(str(self.out / pointer["shard"]), framework="pt"))
        handle = self._shard[1]
        return {layer: handle.get_tensor(key) for layer, key in zip(pointer["layers"], pointer["keys"])
                if layer in layers}

    def _direction(self, name: str, layer: int, hidden: int):
        from engine.pipeline.request import RecordError
        from engine.vectors import load_vectors

        key = (name, hidden)
        if key not in self._vector_cache:
            try:
                vectors = load_vectors(self.vectors[name], 1 << 20, hidden)
            except RecordError as exc:
                raise SweepError(f"projection onto {name}: {exc}") from None
            self._vector_cache[key] = {k: v / v.norm() for k, v in vectors.items()}
        vectors = self._vector_cache[key]
        return vectors.get(layer, vectors.get(None))


class LogProbs:
    """The mean log-probability of a record's completion tokens under its model without steering (temperature 1,
    no top-p / top-k): one forward over prompt + completion. Models and prompts are loaded on first use."""

    def __init__(self, plan: dict):
        self.plan = plan
        self._models: dict[str, tuple] = {}  # label -> (model, tokenizer, device)
        self._prompts: dict[tuple[str, str], dict] | None = None

    def score(self, record: dict) -> float | None:
        import torch

        token_ids = record.get("completion_token_ids")
        if not token_ids:  # run before the metric was added (no tokens kept), or an empty completion
            return None
        tag = record["sweep"]
        model, tok, device = self._model(tag["model"])
        from engine.pipeline.tokenizer_worker import encode

        prompt = self._prompt(tag["prompt_set"], tag["prompt_id"])
        [prompt_ids] = encode(tok, [(prompt.get("prompt"), prompt.get("messages"))])
        ids = torch.tensor([list(prompt_ids) + list(token_ids)], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
        picked = torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(prompt_ids):, None])
        return picked.mean().item()

    def _model(self, label: str) -> tuple:
        if label not in self._models:
            from engine.config import EngineConfig
            from engine.models import (
                load_model,
                resolve_device,
                resolve_dtype,
                resolve_model,
            )
            from engine.models import load_tokenizer

            entry = next(m for m in self.plan["models"] if m["label"] == label)
            source = resolve_model(entry["model"], entry.get("tokenizer"), EngineConfig().cache_dir)
            tok = load_tokenizer(source.tokenizer_dir)
            device = resolve_device("auto")
            model = load_model(source, resolve_dtype(self.plan.get("dtype", "auto"), device), device, len(tok))
            self._models[label] = (model, tok, device)
        return self._models[label]

    def _prompt(self, prompt_set: str, prompt_id: str) -> dict:
        if self._prompts is None:
            self._prompts = {(name, pid): record for name, path in self.plan["prompt_files"].items()
                             for pid, record in read_prompts(PromptSet(name, path))}
        return self._prompts[prompt_set, prompt_id]


def _import(spec: str, base_dir: str, name: str):
    module_name, function_name = spec.split(":")
    if base_dir not in sys.path:  # a metrics module beside the sweep file imports without installing it
        sys.path.insert(0, base_dir)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SweepError(f"metric {name}: cannot import {module_name} ({exc}); put {module_name}.py beside the sweep "
                         f"file or install it") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise SweepError(f"metric {name}: {module_name} has no function {function_name}")
    return function


def collect(out: Path, plan: dict) -> dict[tuple[str, str], PointStats]:
    """Stream results.jsonl and results.errors.jsonl into PointStats per (model, point)."""
    stats = {(m["label"], p["key"]): PointStats() for m in plan["models"] for p in plan["points"]}
    scorer = Scorer(plan, out)
    for record in complete_records(out / RESULTS):
        tag = record.get("sweep")
        if isinstance(tag, dict) and (tag.get("model"), tag.get("point")) in stats:
            stats[tag["model"], tag["point"]].add(record, scorer.score(record))
    for record in complete_records(out / ERRORS):
        key = tuple(str(record.get("id", "")).split("/")[:2])
        if key in stats:
            stats[key].num_errors += 1
    return stats


def summary_rows(plan: dict, stats: dict) -> tuple[list[str], list[dict]]:
    """(columns, one row per model and grid point in plan order)."""
    reasons = sorted({r for s in stats.values() for r in s.finish})
    metric_columns = sorted({name for s in stats.values() for name in s.counts}, key=_metric_order(plan))
    columns = [*SUMMARY_COLUMNS, *(f"finish_{r}" for r in reasons), *metric_columns]
    rows = []
    for model in plan["models"]:
        for point in plan["points"]:
            s = stats[model["label"], point["key"]]
            row = {"model": model["label"], "point": point["key"], "adapter": point.get("adapter") or "",
                   "op": point.get("op", "add") if point["vector"]
                   or point.get("sae") else "", "vector": point["vector"] or "", "sae": point.get("sae") or "",
                   "feature": point.get("feature"), "layers": ",".join(map(str, point["layers"])),
                   "coef": point["coef"], "value": point.get("value"),
                   "positions": point["positions"] if isinstance(point["positions"], str)
                   else json.dumps(point["positions"], separators=(",", ":")),
                   "normalize": point["normalize"], "norm_match": point["norm_match"], "num_records": s.num_records,
                   "num_errors": s.num_errors, "mean_completion_tokens": s.mean_length(),
                   "median_completion_tokens": s.median_length()}
            row.update({f"finish_{r}": s.finish.get(r, 0) for r in reasons})
            row.update({name: s.mean(name) for name in metric_columns})
            rows.append(row)
    return columns, rows


def _metric_order(plan: dict):
    names = [m["name"] for m in plan["metrics"]]
    return lambda column: (names.index(column.split("@L")[0]) if column.split("@L")[0] in names else len(names), column)


def write_report(out: Path) -> list[Path]:
    """summary.csv, summary.md and plots/*.png of a sweep directory; the paths written."""
    plan_file = out / PLAN
    if not plan_file.is_file():
        raise SweepError(f"{out}: no {PLAN}; give the output directory of an engine-sweep run")
    plan = json.loads(plan_file.read_text())
    columns, rows = summary_rows(plan, collect(out, plan))
    csv_path = out / "summary.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    metrics = ["mean_completion_tokens", *columns[columns.index("median_completion_tokens") + 1:]]
    metrics = [m for m in metrics if not m.startswith("finish_")]
    plots = [plot_metric(out, plan, rows, metric) for metric in metrics]
    md_path = out / "summary.md"
    md_path.write_text(markdown(plan, columns, rows, [p for p in plots if p is not None]), encoding="utf-8")
    return [csv_path, md_path, *(p for p in plots if p is not None)]


def plot_metric(out: Path, plan: dict, rows: list[dict], metric: str) -> Path | None:
    """One PNG: the metric against coef, a panel per (model, vector), a line per layer set and variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steered = [r for r in rows if (r["vector"] or r["sae"]) and r[metric] is not None]
    if not steered:
        return None
    models = [m["label"] for m in plan["models"]]
    vectors = list(dict.fromkeys(_panel(r) for r in steered))
    fig, axes = plt.subplots(len(models), len(vectors), figsize=(4.5 * len(vectors), 3.2 * len(models)),
                             squeeze=False, sharey=True)
    for i, model in enumerate(models):
        baseline = next((r[metric] for r in rows if r["model"] == model and r["point"] == BASELINE), None)
        for j, vector in enumerate(vectors):
            ax = axes[i][j]
            lines: dict[str, list[tuple[float, float]]] = {}
            for r in steered:
                if r["model"] == model and _panel(r) == vector:
                    lines.setdefault(_line_label(r), []).append((_x(r), r[metric]))
            for label, points in lines.items():
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=label)
            if baseline is not None:
                ax.axhline(baseline, color="grey", linestyle="--", label="unsteered")
            ax.set_title(f"{model} / {vector}", fontsize=9)
            ax.set_xlabel("coef (add, ablate, SAE coef) / value (clamp, SAE value)")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(metric)
            if lines:
                ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "plots" / f"{re.sub(r'[^A-Za-z0-9_.+@-]', '_', metric)}.png"
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panel(row: dict) -> str:
    """A plot panel per vector (its add, ablate and clamp lines together) and per SAE."""
    return row["vector"] or f"SAE {row['sae']}"


def _x(row: dict) -> float:
    """A point's x: the value it sets (clamp, SAE value), else its coef."""
    return row["value"] if row.get("value") is not None else row["coef"]


def _line_label(row: dict) -> str:
    if row.get("op") == "sae":
        label = f"#{row['feature']} " + ("value" if row["value"] is not None else "coef")
        label += f" {row['positions']}" if row["positions"] != "all" else ""
        return label + (f" {row['adapter']}" if row.get("adapter") else "")
    label = ("" if row.get("op", "add") == "add" else f"{row['op']} ") + f"L{row['layers']}"
    if row["positions"] != "all":
        label += f" {row['positions']}"
    label += (" normalize" if row["normalize"] else "") + (" norm_match" if row["norm_match"] else "")
    return label + (f" {row['adapter']}" if row.get("adapter") else "")


def markdown(plan: dict, columns: list[str], rows: list[dict], plots: list[Path]) -> str:
    done = sum(r["num_records"] for r in rows)
    hidden = ("op", "vector", "sae", "feature", "layers", "coef", "value", "positions", "normalize", "norm_match",
              *(() if any(r.get("adapter") for r in rows) else ("adapter",)))  # the point names them all
    shown = [c for c in columns if c not in hidden]
    lines = [f"# Sweep report: {Path(plan['sweep_file']).name}", "",
             (f"Config {plan['config_hash']}; {done} of {plan['num_requests']} records done; "
              f"{len(plan['models'])} model(s) x {len(plan['points'])} grid point(s)."), "",
             "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in shown) + " |" for r in rows]
    lines += [""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
