"""JsonlWriter: the single owner of results.jsonl, errors.jsonl, the run manifest and the activation shards.

Records are written as whole lines, flushed and fsynced in batches; a line cut short by a crash is
removed on resume, so the output is always a file of complete JSON records. Result lines that point at
activations wait until their shard is on disk (engine.activations.ActivationStore), and a shard is only written
while the disk keeps `min_free_gb` free besides it (DiskLow otherwise: its records run again on resume).
The ids already done are kept in an IdIndex (on disk), so resuming a run of millions of records stays small.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from engine.activations import (FLUSH_SECONDS, MAX_SHARD_BYTES, ActivationStore, DiskLow, activations_dir,
                                require_free, tensors_of)
from engine.id_index import IdIndex
from engine.pipeline import Outcome

MANIFEST_VERSION = 1


class ManifestMismatch(ValueError):
    """The output was made with other settings; the message lists them and the way out."""


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + ".manifest.json")


def errors_path(output: Path) -> Path:
    return output.with_name("errors.jsonl")


def scan_done_ids(output: Path) -> IdIndex:
    """Ids of complete records in an existing output, each with the activation shard it points at; a trailing
    partial line is cut off."""
    done = IdIndex()
    if not output.exists():
        return done
    good_end = 0

    def complete_records():
        nonlocal good_end
        with output.open("rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    return
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError:
                    return
                good_end += len(raw)
                if isinstance(record, dict) and isinstance(record.get("id"), str):
                    pointer = record.get("activations")
                    yield record["id"], pointer.get("shard") if isinstance(pointer, dict) else None

    done.add_many(complete_records())
    if good_end < output.stat().st_size:
        with output.open("r+b") as f:
            f.truncate(good_end)
    return done


def check_free_space(folder: Path, min_free_gb: float, option: str) -> None:
    """DiskLow, naming the option that sets the limit, if `folder`'s file system has less than min_free_gb free."""
    require_free(folder, min_free_gb * 1e9, f", below {option} = {min_free_gb:g}")


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
                 max_shard_bytes: int = MAX_SHARD_BYTES, flush_seconds: float = FLUSH_SECONDS, min_free_gb: float = 0.0,
                 done: IdIndex | None = None):
        """`done`: scan_done_ids(output) if the caller has it (saves reading the output again to resume the
        activation index); `min_free_gb`: the free space to keep besides each activation shard."""
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
        scanned = done is None and activations_dir(output).is_dir()  # a resume whose caller did not scan the output
        if scanned:
            done = scan_done_ids(output)
        try:
            self.activations = ActivationStore(output, max_shard_bytes, flush_seconds, int(min_free_gb * 1e9), done)
        finally:
            if scanned:
                done.close()
        self._held_lines: list[str] = []  # result lines behind a buffered activation shard, in order
        self._held_tokens = 0  # their completion tokens

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
                self._held_tokens += outcome.record["num_completion_tokens"]
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
        """The shard first (durably), then the result lines that point at it. DiskLow: the shard and its lines are
        dropped (nothing of them on disk; those requests run again on resume) and the error is raised."""
        try:
            self.activations.flush()
        except DiskLow:
            self.num_results -= len(self._held_lines)
            self.num_tokens -= self._held_tokens
            self._held_lines, self._held_tokens = [], 0
            self.activations.discard()
            raise
        self.results.write("".join(self._held_lines))
        self._held_lines, self._held_tokens = [], 0

    def close(self) -> None:
        """Flush what is held; held records waiting for an earlier one stay unwritten (resume redoes them). The files
        are closed even when the last shard finds the disk low (DiskLow is raised after)."""
        try:
            self._flush_activations()
        finally:
            self.sync()
            self.results.close()
            self.errors.close()
