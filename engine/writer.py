"""JsonlWriter: the single owner of results.jsonl, errors.jsonl, the run manifest and the activation shards.

Records are written as whole lines, flushed and fsynced in batches; a line cut short by a crash is
removed on resume, so the output is always a file of complete JSON records. Result lines that point at
activations wait until their shard is on disk (engine.activations.ActivationStore).
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from engine.activations import FLUSH_SECONDS, MAX_SHARD_BYTES, ActivationStore, activations_dir, tensors_of
from engine.pipeline import Outcome

MANIFEST_VERSION = 1


class ManifestMismatch(ValueError):
    """The output was made with other settings; the message lists them and the way out."""


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + ".manifest.json")


def errors_path(output: Path) -> Path:
    return output.with_name("errors.jsonl")


def scan_done_ids(output: Path) -> set[str]:
    """Ids of complete records in an existing output; a trailing partial line is cut off."""
    if not output.exists():
        return set()
    done, good_end = set(), 0
    with output.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                break
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                done.add(record["id"])
            good_end += len(raw)
    if good_end < output.stat().st_size:
        with output.open("r+b") as f:
            f.truncate(good_end)
    return done


def check_manifest(output: Path, manifest: dict, force: bool) -> None:
    """Refuse to mix settings in one output; with force, set the old files aside and start afresh."""
    path = manifest_path(output)
    if not path.exists() or not output.exists():
        return
    old = json.loads(path.read_text())
    changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
    if not changed:
        return
    if not force:
        details = "; ".join(f"{k}: was {json.dumps(old.get(k))}, now {json.dumps(manifest.get(k))}" for k in changed)
        raise ManifestMismatch(
            f"{output} was made with other settings ({details}). Use a new --output, or pass --force to move "
            f"the old results aside (renamed *.replaced-<time>) and start again."
        )
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for old_file in (output, path, activations_dir(output)):
        if old_file.exists():
            old_file.rename(old_file.with_name(f"{old_file.name}.replaced-{stamp}"))


class JsonlWriter:
    """Appends result records, writes error records, keeps input order when asked."""

    def __init__(self, output: Path, manifest: dict, ordered: bool, sync_every: int = 256, sync_seconds: float = 2.0,
                 max_shard_bytes: int = MAX_SHARD_BYTES, flush_seconds: float = FLUSH_SECONDS):
        output.parent.mkdir(parents=True, exist_ok=True)
        manifest_path(output).write_text(json.dumps(manifest, indent=2) + "\n")
        self.results = output.open("a", encoding="utf-8")
        self.errors = errors_path(output).open("w", encoding="utf-8")
        self.ordered = ordered
        self.sync_every, self.sync_seconds = sync_every, sync_seconds
        self._held: dict[int, Outcome] = {}
        self._next = 0
        self._unsynced = 0
        self._last_sync = time.monotonic()
        self.num_results = self.num_errors = self.num_tokens = 0
        self.activations = ActivationStore(output, max_shard_bytes, flush_seconds)
        self._held_lines: list[str] = []  # result lines behind a buffered activation shard, in order

    def write(self, outcome: Outcome) -> None:
        if not self.ordered:
            self._emit(outcome)
            return
        self._held[outcome.position] = outcome
        while self._next in self._held:
            self._emit(self._held.pop(self._next))
            self._next += 1

    def _emit(self, outcome: Outcome) -> None:
        record = outcome.record
        if outcome.activations is not None:
            pointer = self.activations.add(record["id"], outcome.activations, tensors_of(outcome.activations))
            record = {**record, "activations": pointer}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if outcome.is_error:
            self.errors.write(line)
            self.num_errors += 1
        else:
            if outcome.activations is not None or self._held_lines:
                self._held_lines.append(line)
            else:
                self.results.write(line)
            self.num_results += 1
            self.num_tokens += outcome.record["num_completion_tokens"]
        if self.activations.is_due:
            self._flush_activations()
        self._unsynced += 1
        if self._unsynced >= self.sync_every or time.monotonic() - self._last_sync > self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        for f in (self.results, self.errors):
            f.flush()
            os.fsync(f.fileno())
        self._unsynced, self._last_sync = 0, time.monotonic()

    def _flush_activations(self) -> None:
        """The shard first (durably), then the result lines that point at it."""
        self.activations.flush()
        self.results.write("".join(self._held_lines))
        self._held_lines = []

    def close(self) -> None:
        """Flush what is held; held records waiting for an earlier one stay unwritten (resume redoes them)."""
        self._flush_activations()
        self.sync()
        self.results.close()
        self.errors.close()
