"""Shared test helpers (tests/conftest.py holds the fixtures): requests and configs for the tiny random model,
JSONL files, and the prompts most tests run."""

from __future__ import annotations

import json
from pathlib import Path

from engine.config import EngineConfig, SamplingDefaults
from engine.messages import CoreRequest
from engine.specs import parse_capture, parse_steering

ROOT = Path(__file__).resolve().parents[2]  # the repository
TINY = "random:tiny"


def core_request(index: int, steering=None, capture=None, **settings) -> CoreRequest:
    """A request as the engine core receives it: greedy, ignore_eos, 6 new tokens and seed = index unless given;
    steering and capture in their record form (parsed as the reader parses records) or typed."""
    defaults = {"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": index, "ignore_eos": True,
                "stop": []}
    if isinstance(steering, (dict, list)):
        steering = parse_steering(steering)
    if isinstance(capture, dict):
        capture = parse_capture(capture, None)
    return CoreRequest(index=index, **{**defaults, **settings}, steering=steering, capture=capture)


def tiny_config(**overrides) -> EngineConfig:
    sampling = overrides.pop("sampling", SamplingDefaults(max_new_tokens=8, ignore_eos=True))
    base = dict(model=TINY, device="cpu", max_num_seqs=4, return_tokens=True, sampling=sampling)
    base.update(overrides)
    return EngineConfig(**base)


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a dragon who",
    "Hi",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "The quick brown fox jumps over",
    "In 1969, astronauts",
    "def fibonacci(n):",
]
