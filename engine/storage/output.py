"""The rules that keep one output trustworthy across crashes, resumes and edits: its lock, its manifest, the input
fingerprint under each result, its own errors file, and the scan that finds what is done.

An output `results.jsonl` owns `results.jsonl.manifest.json` (the settings it was made with), `results.errors.jsonl`
(its rejected records), `results.jsonl.lock` (while a run writes it) and `results.activations/`. Each result carries
`input_digest`, the digest of the input record it was made from, so a resume notices an edited or shifted input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from engine.storage.activations import activations_dir
from engine.storage.id_index import IdIndex
from engine.pipeline.request import RecordError, decode_line, record_digest, record_id
from engine.storage.files import (
    FileLock,
    Locked,
    aside_path,
    complete_lines,
    move_aside,
    time_stamp,
    write_atomic,
    write_problem,
)

log = logging.getLogger("engine")

MAX_SHOWN = 5  # changed or damaged lines named in a message


class OutputError(ValueError):
    """The output cannot be used as asked; the message names the file and the way out."""


class ManifestMismatch(OutputError):
    """The output was made with other settings; the message lists them and the way out."""


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + ".manifest.json")


def errors_path(output: Path) -> Path:
    """`<output stem>.errors.jsonl` beside it: each output has its own errors file."""
    stem = output.name[:-len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(stem + ".errors.jsonl")


def lock_path(output: Path) -> Path:
    return output.with_name(output.name + ".lock")


def check_output_path(output: Path, source: Path | None = None, option: str = "--output") -> None:
    """OutputError, before anything expensive starts, if results could not be written to `output`."""
    where = f"{option} {output}"
    if output.is_dir():
        raise OutputError(f"{where} is a directory; give a file name such as {output / 'results.jsonl'}")
    if output.name.endswith((".errors.jsonl", ".manifest.json", ".lock")):
        raise OutputError(f"{where} is named like the errors, manifest or lock file of another output; choose "
                          f"another name")
    if source is not None and (output.resolve() == source.resolve() or _same_file(output, source)):
        raise OutputError(f"{where} is the input file; results would overwrite the prompts. Choose another --output")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{where}: cannot create its folder {output.parent} ({exc.strerror})") from None
    problem = write_problem(output.parent)
    if problem:
        raise OutputError(f"{where}: {problem}; choose another --output")
    if output.exists() and not output.is_file():
        raise OutputError(f"{where} exists and is not a regular file (a device or a FIFO, say); give a file name")
    if output.exists() and not os.access(output, os.W_OK):
        raise OutputError(f"{where} exists and is not writable; choose another --output or fix its permissions")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def lock_output(output: Path) -> FileLock:
    """Hold the output's lock for the whole run: a second run on it is refused, naming the first."""
    try:
        return FileLock(lock_path(output), str(output)).acquire()
    except Locked as exc:
        raise OutputError(str(exc)) from None
    except OSError as exc:
        raise OutputError(f"{output}: cannot create its lock file {lock_path(output)} ({exc.strerror}); is the "
                          f"folder writable?") from None


def check_manifest(output: Path, manifest: dict, force: bool) -> None:
    """Refuse to mix settings in one output, or to append to a file this engine did not write; with force, set the
    old files aside and start afresh."""
    path = manifest_path(output)
    has_results = output.exists() and output.stat().st_size > 0
    if not has_results:
        return
    if not path.exists():
        if force:
            return _set_aside(output, "it has no manifest")
        raise OutputError(f"{output} exists but has no manifest ({path.name}), so it was not written by engine-run "
                          f"(or its manifest was deleted) and cannot be resumed. Choose another --output, or pass "
                          f"--force to move it aside (renamed *.replaced-<time>) and start again")
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputError(f"{path}: cannot read it ({exc}); pass --force to move the old results aside") from None
    changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
    if not changed:
        return
    if not force:
        details = "; ".join(f"{k}: was {json.dumps(old.get(k))}, now {json.dumps(manifest.get(k))}" for k in changed)
        raise ManifestMismatch(
            f"{output} was made with other settings ({details}). Use a new --output, or pass --force to move "
            f"the old results aside (renamed *.replaced-<time>) and start again."
        )
    _set_aside(output, "its settings changed")


def _set_aside(output: Path, why: str) -> None:
    moved = move_aside([output, manifest_path(output), errors_path(output), activations_dir(output)])
    log.warning("%s: %s; moved the old files aside (%s)", output, why, ", ".join(p.name for p in moved))


def scan_done_ids(output: Path) -> IdIndex:
    """Ids of complete records in an existing output, each with its activation shard and input digest.

    Only a partial last line (a write cut short by a crash) is cut off. A complete line that is not a record (damaged
    in the middle, say) is reported, moved to `<output>.damaged-<time>` and taken out of the output; the records after
    it are kept, and the damaged record runs again."""
    done = IdIndex()
    if not output.exists():
        return done
    good_end, damaged = 0, []

    def records() -> Iterator[tuple]:
        nonlocal good_end
        with output.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    return  # the partial last line
                good_end += len(raw)
                record = _record(raw)
                if record is None:
                    damaged.append((number, raw))
                    continue
                pointer = record.get("activations")
                digest = record.get("input_digest")
                yield (record["id"], pointer.get("shard") if isinstance(pointer, dict) else None,
                       digest if isinstance(digest, str) else None)

    done.add_many(records())
    if good_end < output.stat().st_size:
        with output.open("r+b") as f:
            f.truncate(good_end)
    if damaged:
        _keep_aside(output, damaged, len(done))
    return done


def _record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("id"), str) else None


def _keep_aside(output: Path, damaged: list[tuple[int, bytes]], num_records: int) -> None:
    """Move damaged lines out of the output (into their own file, byte for byte), keeping every other line."""
    aside = output.with_name(f"{output.name}.damaged-{time_stamp()}")
    aside.write_bytes(b"".join(raw for _, raw in damaged))
    bad = {number for number, _ in damaged}
    write_atomic(output, (raw for number, raw in enumerate(_lines(output), 1) if number not in bad))
    shown = ", ".join(str(n) for n, _ in damaged[:MAX_SHOWN]) + (", ..." if len(damaged) > MAX_SHOWN else "")
    log.warning("%s: %d line(s) (line %s) are not complete JSON records; moved them to %s and kept the %d valid "
                "records; their records run again", output, len(damaged), shown, aside.name, num_records)


def check_input(lines: Iterable[tuple[int, bytes]], done: IdIndex) -> list[tuple[int, str]]:
    """(line, id) of each input record whose id is done in the output but whose content differs from the record
    that result was made from. Results written before outputs kept digests cannot be checked (logged once)."""
    changed, unknown = [], 0
    seen = IdIndex()  # a later line repeating an id is a duplicate (the run reports it), not a change
    for line, raw in lines:
        try:
            obj = decode_line(raw, line)
        except RecordError:
            continue  # a line that cannot run: the run reports it
        request_id = record_id(obj, line)
        kept = done.get(request_id)
        if kept is None or not seen.add(request_id):
            continue
        if kept[1] is None:
            unknown += 1
        elif kept[1] != record_digest(obj):
            changed.append((line, request_id))
    seen.close()
    if unknown:
        log.warning("%d done records have no input_digest (written by an older engine-run): an edit to their input "
                    "lines cannot be detected", unknown)
    return changed


def changed_message(output: Path, changed: list[tuple[int, str]]) -> str:
    shown = ", ".join(f"line {line} (id {rid!r})" for line, rid in changed[:MAX_SHOWN])
    more = f" and {len(changed) - MAX_SHOWN} more" if len(changed) > MAX_SHOWN else ""
    return (f"{len(changed)} input record(s) differ from the records their results in {output} were made from: "
            f"{shown}{more}. Records without an 'id' take their line number, so inserting or removing a line shifts "
            f"every id after it. Restore the input, give records explicit ids, or pass --force to run the changed "
            f"records again (their old results are moved aside)")


def drop_records(output: Path, ids: set[str]) -> Path:
    """Rewrite the output without the records of `ids`; the old file is kept as `*.replaced-<time>`."""
    aside = aside_path(output)
    shutil.copyfile(output, aside)
    write_atomic(output, (raw for raw in _lines(output) if (_record(raw) or {}).get("id") not in ids))
    return aside


class ErrorLog:
    """An output's errors file, kept across runs: a resume appends, an error line already there is not written again,
    and a run that reached the end of its input rewrites it to hold just that run's errors (every error is
    re-derived by a run that reads the whole input, since rejected records are never done)."""

    def __init__(self, path: Path):
        self.path = path
        self._before, self._now = IdIndex(), IdIndex()
        self.num_before = 0
        if path.exists():
            self._before.add_many((_line_key(raw), None) for raw in complete_lines(path, cut=True))
            self.num_before = len(self._before)
        self.file = path.open("a", encoding="utf-8")

    def write(self, line: str) -> None:
        key = _line_key(line.encode("utf-8", "surrogatepass"))
        if self._now.add(key) and key not in self._before:
            self.file.write(line)

    @property
    def closed(self) -> bool:
        return self.file.closed

    def close(self, is_complete: bool) -> None:
        """Close; when the run reached its input's end, drop the lines this run did not write again."""
        self.file.close()
        try:
            if is_complete and self.num_before and self._has_stale():
                self._compact()
        finally:
            self._before.close()
            self._now.close()

    def _has_stale(self) -> bool:
        return any(_line_key(raw) not in self._now for raw in complete_lines(self.path))

    def _compact(self) -> None:
        with IdIndex() as seen:
            write_atomic(self.path, (raw for raw in complete_lines(self.path)
                                     if (key := _line_key(raw)) in self._now and seen.add(key)))


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        yield from f


def _line_key(raw: bytes) -> str:
    return hashlib.blake2b(raw.rstrip(b"\n"), digest_size=16).hexdigest()
