"""IdIndex: a set of request ids kept on disk, so a run's bookkeeping (ids already done, ids seen in the input) does
not grow in memory with the number of records.

It is a private temporary SQLite database (SQLite deletes its file when the connection closes, or when the process
dies): membership is exact, memory is SQLite's page cache (CACHE_KIB) whatever the count, and one insert or lookup
costs a few microseconds. Each id may carry the activation shard its result record points at and the digest of the
input record it was made from (pipeline.request.record_digest), or any other short text a caller keeps. Ids are
stored as UTF-8 bytes (lone surrogates, which JSON input may hold, included), so any str id is kept exactly.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import Iterable

CACHE_KIB = 8192
BATCH = 10_000


class IdIndex:
    """Request ids (with an optional shard each); safe to share between threads (engines' feeder threads read it)."""

    def __init__(self, ids: Iterable[str] = ()):
        # One transaction for the index's whole life: it is never committed, so nothing is written but what the page
        # cache spills to the temporary file (journal off: a crash leaves nothing to recover).
        self._db = sqlite3.connect("", check_same_thread=False, isolation_level=None)
        for pragma in (f"cache_size = -{CACHE_KIB}", "journal_mode = OFF", "synchronous = OFF", "temp_store = FILE"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute("CREATE TABLE ids (id BLOB PRIMARY KEY, shard BLOB, digest BLOB) WITHOUT ROWID")
        self._db.execute("BEGIN")
        self._lock = threading.Lock()
        self._count = 0
        self.add_many((request_id, None) for request_id in ids)

    def add(self, request_id: str, shard: str | None = None, digest: str | None = None) -> bool:
        """Add an id; False (and nothing changes) if it is already there."""
        with self._lock:
            row = (_key(request_id), _key(shard), _key(digest))
            added = self._db.execute("INSERT OR IGNORE INTO ids VALUES (?, ?, ?)", row).rowcount == 1
            self._count += added
            return added

    def add_many(self, rows: Iterable[tuple]) -> None:
        """Add (id, shard) or (id, shard, digest) rows in batches; an id already there keeps its first row."""
        batch = []
        for request_id, shard, *digest in rows:
            batch.append((_key(request_id), _key(shard), _key(digest[0] if digest else None)))
            if len(batch) >= BATCH:
                self._insert(batch)
                batch = []
        self._insert(batch)

    def _insert(self, batch: list[tuple[bytes, bytes | None, bytes | None]]) -> None:
        if not batch:
            return
        with self._lock:
            before = self._db.total_changes
            self._db.executemany("INSERT OR IGNORE INTO ids VALUES (?, ?, ?)", batch)
            self._count += self._db.total_changes - before

    def __contains__(self, request_id: object) -> bool:
        if not isinstance(request_id, str):
            return False
        with self._lock:
            return self._db.execute("SELECT 1 FROM ids WHERE id = ?", (_key(request_id),)).fetchone() is not None

    def get(self, request_id: str) -> tuple[str | None, str | None] | None:
        """(shard, digest) kept with the id, or None if the id is not here."""
        with self._lock:
            row = self._db.execute("SELECT shard, digest FROM ids WHERE id = ?", (_key(request_id),)).fetchone()
        return None if row is None else (_text(row[0]), _text(row[1]))

    def has_shard(self, request_id: str, shard: str) -> bool:
        """Whether the id is here with exactly this shard."""
        with self._lock:
            row = self._db.execute("SELECT shard FROM ids WHERE id = ?", (_key(request_id),)).fetchone()
        return row is not None and row[0] == _key(shard)

    def count_prefix(self, prefix: str) -> int:
        """How many ids start with `prefix` (a range scan of the index, not a walk over every id)."""
        low = _key(prefix)
        if not low:
            return self._count
        high = low[:-1] + bytes([low[-1] + 1])  # UTF-8 has no 0xff byte: the first key after every `low...`
        with self._lock:
            return self._db.execute("SELECT count(*) FROM ids WHERE id >= ? AND id < ?", (low, high)).fetchone()[0]

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        """Delete the index (its temporary file goes with the connection)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> "IdIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _key(text: str | None) -> bytes | None:
    return None if text is None else text.encode("utf-8", "surrogatepass")


def _text(key: bytes | None) -> str | None:
    return None if key is None else key.decode("utf-8", "surrogatepass")
