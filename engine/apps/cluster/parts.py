"""The parts of a cluster job: the output directory's file names, the part a request belongs to, a part's folder.

The output directory (on storage every node mounts at the same path):
  cluster.json                   the job: kind, num_parts, the settings (batch) or the sweep's config hash
  parts/part-00003/              a batch part: results.jsonl, results.errors.jsonl, results.activations/, the manifest,
                                 complete.json once the part ran to its end (a sweep: parts/<model>/part-00003/)
  results.jsonl, results.errors.jsonl merged when every part is complete: a valid engine-run output (activation
                                 pointers rewritten to the part folders), which engine-run or engine-sweep can resume
  status.json                    progress, rewritten every few seconds
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from engine.storage.files import JsonUnreadable, parse_json

JOB_FILE, STATUS_FILE, RESULTS, COMPLETE = "cluster.json", "status.json", "results.jsonl", "complete.json"
JOB_VERSION = 1
INSTALL_HINT = "pip install 'steer-engine[ray]' (in a checkout: pip install -e '.[ray]')"


class ClusterError(RuntimeError):
    """The job cannot start or go on; the message names the cause and what to do."""


def require_ray():
    """The ray module, or ClusterError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ClusterError(f"engine-ray needs Ray, which is not installed ({exc}); install it on every node: "
                           f"{INSTALL_HINT}") from None
    return ray


def part_of(request_id: str, num_parts: int) -> int:
    """The part a request belongs to: a stable hash of its id, so a repeated id lands in one part (and is reported
    there as engine-run reports it) and an input that grows keeps every id in its part."""
    return zlib.crc32(request_id.encode("utf-8", "surrogateescape")) % num_parts


def line_id(line: int, raw: bytes) -> str:
    """The id a raw input line will have (its `id`, else its line number); a line that will be rejected keeps its
    line number, which is enough to place it."""
    if b'"id"' not in raw:  # most inputs carry no ids: no need to parse
        return str(line)
    try:
        obj = parse_json(raw)
    except JsonUnreadable:  # rejected later, with the reason
        return str(line)
    if isinstance(obj, dict) and isinstance(obj.get("id"), str):
        return obj["id"]
    return str(line)


def part_folder(index: int, label: str | None) -> str:
    """A part's folder, relative to the output directory."""
    name = f"part-{index:05d}"
    return f"parts/{name}" if label is None else f"parts/{label}/{name}"


@dataclass(slots=True)
class Part:
    index: int
    label: str | None  # the sweep's model label; None for a batch job
    num_failures: int = 0
    last_error: str = ""

    @property
    def name(self) -> str:
        return part_folder(self.index, self.label).removeprefix("parts/")



def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ClusterError(f"{path} cannot be read ({exc}); move the output directory aside or use another "
                           f"--output") from None
