"""The plan: a sweep file expanded into requests, and the hash of the settings that make its records.

Every (model, grid point, prompt, sample) becomes one request with an id `<model>/<point>/<prompt set>/<prompt
id>/s<sample>` and a seed derived from (seed, id), so a re-run reproduces it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from engine.adapters import adapters_digest
from engine.pipeline.request import RecordError, decode_line, derive_seed
from engine.apps.sweep.fields import SweepError, preview
from engine.apps.sweep.grid import GridPoint, grid_points
from engine.apps.sweep.spec import ENGINE_DEFAULTS, ENGINE_MEANING, ModelEntry, PromptSet, SweepConfig

PLAN_VERSION = 1
# Prompt-record fields the sweep sets itself; a prompt file may not carry them.
SWEEP_FIELDS = ("steering", "capture", "sweep", "adapter")


def _digest(path: str) -> str:
    """A file's content hash; a folder's (an SAE's) over its files' names and contents."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for file in files:
        h.update(str(file.relative_to(path)).encode() if file != Path(path) else b"")
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_prompts(prompt_set: PromptSet) -> list[tuple[str, dict]]:
    """(prompt id, record without id and seed) per line; SweepError names the file, line and field."""
    prompts, ids = [], set()
    with open(prompt_set.path, "rb") as f:
        for line, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            where = f"prompts {prompt_set.path} line {line}"
            try:
                record = decode_line(raw, line)
            except RecordError as exc:
                raise SweepError(f"{where}: {exc}") from None
            if ("prompt" in record) == ("messages" in record):
                raise SweepError(f"{where}: a record needs exactly one of 'prompt' or 'messages'")
            taken = [k for k in SWEEP_FIELDS if k in record]
            if taken:
                raise SweepError(f"{where}: field(s) {taken} are set by the sweep (from [grid] / [capture]); remove "
                                 "them")
            prompt_id = record.pop("id", str(line))
            if not isinstance(prompt_id, str) or not prompt_id:
                raise SweepError(f"{where}: field 'id' is {preview(prompt_id)}; give a non-empty string or leave it "
                                 "out")
            if prompt_id in ids:
                raise SweepError(f"{where}: id {prompt_id!r} repeats an earlier line; ids must be unique in a file")
            ids.add(prompt_id)
            record.pop("seed", None)  # the sweep derives every request's seed
            prompts.append((prompt_id, record))
    return prompts


class Plan:
    """A sweep expanded: grid points, prompts, and the settings its hash covers. Requests are made lazily, in the
    order sample > prompt > grid point, so a sweep stopped early has every point about equally far along."""

    def __init__(self, config: SweepConfig):
        self.config = config
        try:
            self.points = grid_points(config.grid)
            self.prompts = {s.name: read_prompts(s) for s in config.prompts}
        except SweepError as exc:
            raise SweepError(f"{config.source}: {exc}") from None
        self.num_prompts = sum(len(p) for p in self.prompts.values())
        self.num_per_model = len(self.points) * self.num_prompts * config.samples
        self.settings = self._settings(config)
        self.config_hash = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]

    def _settings(self, c: SweepConfig) -> dict:
        """What makes the records what they are (not speed settings, output place or metrics), in a form that does
        not depend on the order of the file."""
        used = {p.vector for p in self.points if p.vector is not None}
        used_saes = {p.sae for p in self.points if p.sae is not None}
        used_adapters = {p.adapter for p in self.points if p.adapter is not None}
        return {
            "version": PLAN_VERSION,
            "models": {m.label: {"model": m.model, "tokenizer": m.tokenizer} for m in c.models},
            "prompts": {s.name: {"sha256": _digest(s.path), "num_prompts": len(self.prompts[s.name])}
                        for s in c.prompts},
            "vectors": {name: _digest(path) for name, path in c.vectors.items() if name in used},
            **({"saes": {name: _digest(path) for name, path in c.saes.items() if name in used_saes}}
               if used_saes else {}),
            **({"adapters": adapters_digest({name: c.adapters[name] for name in used_adapters})}
               if used_adapters else {}),
            "points": sorted(p.key for p in self.points),
            "samples": c.samples, "seed": c.seed, "paired_seeds": c.paired_seeds,
            "generation": dataclasses.asdict(c.generation) | {"seed": c.seed},
            "capture": dataclasses.asdict(c.capture),
            "engine": {key: c.engine.get(key, ENGINE_DEFAULTS[key]) for key in ENGINE_MEANING},
        }

    def request_id(self, label: str, point: GridPoint, prompt_set: str, prompt_id: str, sample: int) -> str:
        return f"{label}/{point.key}/{prompt_set}/{prompt_id}/s{sample}"

    def seed(self, request_id: str, prompt_set: str, prompt_id: str, sample: int) -> int:
        """From (seed, id); with paired_seeds, from (seed, prompt, sample) only, so every grid point and model
        draws the same sampling noise for a given prompt and sample."""
        key = f"{prompt_set}/{prompt_id}/s{sample}" if self.config.paired_seeds else request_id
        return derive_seed(self.config.seed, key)

    def requests(self, model: ModelEntry) -> Iterator[tuple[int, dict]]:
        """(number, input record) of every request of one model, as engine.pipeline.reader.read_requests takes them."""
        vectors, number = self.config.vectors, 0
        specs = {p.key: p.steering(vectors, self.config.saes) for p in self.points}
        for sample in range(self.config.samples):
            for set_name, prompts in self.prompts.items():
                for prompt_id, record in prompts:
                    for point in self.points:
                        number += 1
                        request_id = self.request_id(model.label, point, set_name, prompt_id, sample)
                        tag = {"model": model.label, "point": point.key, **point.axes(), "prompt_set": set_name,
                               "prompt_id": prompt_id, "sample": sample}
                        yield number, {**record, "id": request_id,
                                       "seed": self.seed(request_id, set_name, prompt_id, sample),
                                       "steering": specs[point.key], "sweep": tag,
                                       **({"adapter": point.adapter} if point.adapter is not None else {})}

    def to_json(self) -> dict:
        c = self.config
        return {
            "version": PLAN_VERSION, "config_hash": self.config_hash, "sweep_file": c.source,
            "base_dir": str(Path(c.source).parent), "written": utc_now(), "settings": self.settings,
            "metrics": [m.to_dict() for m in c.metrics], "vectors": c.vectors, "saes": c.saes, "adapters": c.adapters,
            "prompt_files": {s.name: s.path for s in c.prompts}, "dtype": c.engine.get("dtype", "auto"),
            "models": [{"label": m.label, "model": m.model, "tokenizer": m.tokenizer,
                        "num_requests": self.num_per_model}
                       for m in c.models],
            "points": [{"key": p.key, **p.axes()} for p in self.points],
            "num_requests": self.num_per_model * len(c.models),
        }


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
