"""The pairs file: read and checked line by line, then run through the engine with capture at the chosen layers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from engine.storage.files import JsonUnreadable, parse_json
from engine.config import (
    EngineConfig,
)
from engine.engine import Engine
from engine.apps.extract.spec import CONCEPT_FIX, ExtractError, METHODS, SIDES

log = logging.getLogger("engine.apps.extract")


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
        pair = parse_json(line)
    except JsonUnreadable as exc:
        raise ExtractError(f"--pairs {path} line {number}: not valid JSON: {exc}") from None
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


