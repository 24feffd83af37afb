"""The parts on disk: which are complete, how many records they hold, and their merge into the job's output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from engine.apps.cluster.parts import COMPLETE, RESULTS, Part, part_folder, read_json
from engine.pipeline.writer import errors_path, manifest_path, scan_done_ids
from engine.storage.files import complete_lines, write_atomic


def is_complete(out: Path, part: Part, complete_key: dict) -> bool:
    """Whether the part ran to its end for this job: its complete.json says `complete_key`."""
    marker = out / part_folder(part.index, part.label) / COMPLETE
    return marker.exists() and read_json(marker) == complete_key


def count_done(out: Path, parts: list[Part]) -> int:
    """The lines the parts' results.jsonl files hold: what earlier runs of the job wrote."""
    total = 0
    for part in parts:
        path = out / part_folder(part.index, part.label) / RESULTS
        if path.exists():
            with path.open("rb") as f:
                total += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return total


def merge(out: Path, parts: list[Part], job: dict) -> tuple[int, int]:
    """results.jsonl: the merged records kept, plus every part's records not yet in it (activation pointers
    made relative to the output directory); results.errors.jsonl: every part's errors. Both written atomically.
    Returns (records, errors) in the merged files."""
    results, merged_ids = out / RESULTS, scan_done_ids(out / RESULTS)
    write_atomic(results, _merged_lines(out, parts, results, merged_ids))
    num_records = len(merged_ids)  # the kept records' ids, and each part record's as it was added
    errors = b"".join(b"".join(complete_lines(errors_path(out / part_folder(p.index, p.label) / RESULTS)))
                      for p in parts)
    write_atomic(errors_path(results), errors)
    if job["kind"] == "batch":  # so engine-run can resume the merged file too
        write_atomic(manifest_path(results), (json.dumps(job["manifest"], indent=2) + "\n").encode())
    return num_records, errors.count(b"\n")


def _merged_lines(out: Path, parts: list[Part], results: Path, merged_ids) -> Iterator[bytes]:
    """The merged file's lines: the kept file's as they are, then each part's records not in it yet (added to
    `merged_ids` as they go), their activation shards named from the output directory."""
    yield from complete_lines(results)
    for part in parts:
        folder = part_folder(part.index, part.label)
        for raw in complete_lines(out / folder / RESULTS):
            record = json.loads(raw)
            if record["id"] in merged_ids:
                continue
            merged_ids.add(record["id"])
            if isinstance(record.get("activations"), dict):
                pointer = record["activations"]
                record["activations"] = {**pointer, "shard": f"{folder}/{pointer['shard']}"}
                raw = (json.dumps(record, ensure_ascii=False) + "\n").encode()
            yield raw
