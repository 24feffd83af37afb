"""JsonlWriter: the single owner of an output's results, its errors file, its manifest and its activation shards.

Records are written as whole lines, flushed and fsynced in batches; a line cut short by a crash is
removed on resume, so the output is always a file of complete JSON records. Result lines that point at
activations wait until their shard is on disk (engine.storage.activations.ActivationStore), and a shard is only
written while the disk keeps `min_free_gb` free besides it (DiskLow otherwise: its records run again on resume).
The ids already done are kept in an IdIndex (on disk), so resuming a run of millions of records stays small.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from engine.storage.activations import FLUSH_SECONDS, MAX_SHARD_BYTES, ActivationStore, activations_dir, tensors_of
from engine.storage.id_index import IdIndex
from engine.messages import Outcome
from engine.storage.files import (DiskLow, OutputWriteError, check_free_space, require_free,  # noqa: F401 - re-exported
                                  write_atomic)
from engine.storage.output import (ErrorLog, ManifestMismatch, check_manifest, errors_path, manifest_path,  # noqa: F401
                                   scan_done_ids)

MANIFEST_VERSION = 1


def _json_line(record: dict) -> str:
    """One JSON line, its text as is; where some string is not Unicode text (a lone surrogate, which an error record
    may quote) the line is written \\u-escaped instead, which reads back the same."""
    line = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record) + "\n"
    return line


@contextmanager
def _naming(path: Path):
    """OutputWriteError naming `path` for an OSError raised while writing it."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as exc:
        raise OutputWriteError(exc.errno, f"cannot write {path} ({exc.strerror or exc})") from None


class JsonlWriter:
    """Appends result records, writes error records, keeps input order when asked."""

    def __init__(self, output: Path, manifest: dict, ordered: bool, sync_every: int = 256, sync_seconds: float = 2.0,
                 max_shard_bytes: int = MAX_SHARD_BYTES, flush_seconds: float = FLUSH_SECONDS, min_free_gb: float = 0.0,
                 done: IdIndex | None = None):
        """`done`: scan_done_ids(output) if the caller has it (saves reading the output again to resume the
        activation index); `min_free_gb`: the free space to keep besides each activation shard."""
        output.parent.mkdir(parents=True, exist_ok=True)
        self.output = output
        with _naming(manifest_path(output)):
            write_atomic(manifest_path(output), (json.dumps(manifest, indent=2) + "\n").encode())
        with _naming(output):
            self.results = output.open("a", encoding="utf-8")
        with _naming(errors_path(output)):
            self.errors = ErrorLog(errors_path(output))
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

    def _emit(self, outcome: Outcome) -> dict:
        """Write (or hold, behind its activation shard) one outcome's line; the record as written."""
        record = outcome.record
        if outcome.activations is not None:
            pointer = self.activations.add(record["id"], outcome.activations, tensors_of(outcome.activations))
            record = {**record, "activations": pointer}
        line = _json_line(record)
        if outcome.is_error:
            with _naming(self.errors.path):
                self.errors.write(line)
            self.num_errors += 1
        else:
            if outcome.activations is not None or self._held_lines:
                self._held_lines.append(line)
                self._held_tokens += outcome.record["num_completion_tokens"]
            else:
                with _naming(self.output):
                    self.results.write(line)
            self.num_results += 1
            self.num_tokens += outcome.record["num_completion_tokens"]
        if self.activations.is_due:
            self._flush_activations()
        self._unsynced += 1
        if self._unsynced >= self.sync_every or time.monotonic() - self._last_sync > self.sync_seconds:
            self.sync()
        return record

    def write_now(self, outcome: Outcome) -> dict:
        """Write one outcome now, its activation shard durably first (a server answers once its tensors are on disk);
        the record as written, with its activations' pointer. A result without activations is synced with later
        ones (sync_every, sync_seconds), as in a run."""
        record = self._emit(outcome)  # without activations: synced with the next ones (sync_every, sync_seconds)
        if outcome.activations is not None:
            self._flush_activations()  # the shard, then the line that points at it
            self.sync()
        return record

    def sync(self) -> None:
        for path, f in ((self.output, self.results), (self.errors.path, self.errors.file)):
            with _naming(path):
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
        with _naming(self.output):
            self.results.write("".join(self._held_lines))
        self._held_lines, self._held_tokens = [], 0

    def close(self, is_complete: bool = False) -> None:
        """Flush what is held; held records waiting for an earlier one stay unwritten (resume redoes them). The files
        are closed even when the last shard finds the disk low (DiskLow is raised after). `is_complete`: the run read
        its whole input, so the errors file keeps only this run's errors (engine.storage.output.ErrorLog)."""
        try:
            self._flush_activations()
        finally:
            try:
                self.sync()
            finally:
                try:
                    with _naming(self.output):
                        self.results.close()
                finally:
                    with _naming(self.errors.path):
                        self.errors.close(is_complete)
