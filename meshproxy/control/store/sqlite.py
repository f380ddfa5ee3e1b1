"""The embedded Store: one SQLite file, for a single control-plane replica (the default).

Tables:
    kv       key -> value, created, revision, lease
    changes  the history watches replay: (revision, key, value or NULL for a delete)
    leases   id, ttl, expires (wall-clock seconds)
    meta     the store revision, and the oldest revision history still holds
Every change is one IMMEDIATE transaction that raises the store revision by one, writes the
key and appends its change, so a watcher that replays `changes` sees exactly the writes, in
order. History is trimmed to the last HISTORY changes (a watch from before raises
Compacted; the watcher lists again).

Durability: WAL with synchronous=NORMAL: a committed change survives the process being
killed (what the control plane must withstand); the last commits before a power loss may be
lost, never the file's consistency. The file is created with mode 0600.

Concurrency: one connection, used from trio through worker threads (sqlite3 blocks), one
call at a time under a trio lock. Watches are woken in process by a broadcast event after
each commit, so one file serves one control-plane process; several replicas use etcd.

Leases lapse by the clock of this process: a task checks every LEASE_TICK seconds and
deletes the keys of each lease past its time. Leases that were alive when the process
stopped get a whole TTL again when it starts (etcd renews leases at a leader change the
same way), so a restart of the control plane never expires every registration at once.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio

from meshproxy.control.store.base import (
    HISTORY,
    Compacted,
    Conflict,
    Entry,
    Event,
    LeaseExpired,
)

T = TypeVar("T")

# Lease resolution: a lapsed lease's keys are gone within this (registrations must turn
# unhealthy within TTL + 1 s, so a tenth of a second is ample).
LEASE_TICK = 0.1
# Changes read per query by a watch catching up.
WATCH_BATCH = 1000

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, created INTEGER NOT NULL,
    revision INTEGER NOT NULL, lease INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY, key TEXT NOT NULL, value BLOB);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ttl REAL NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('revision', 0), ('oldest', 1);
"""


def _prefix_end(prefix: str) -> str | None:
    """The first key after every key that starts with prefix (None: no bound)."""
    if not prefix:
        return None
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class SQLiteStore:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time,
                 history: int = HISTORY) -> None:
        self.path = path
        self.clock = clock
        self.history = history
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = trio.Lock()
        self._changed = trio.Event()
        self._rev = self._meta("revision")
        self._db.execute("UPDATE leases SET expires = ? + ttl", (clock(),))

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path, **kwargs: Any) -> AsyncIterator[SQLiteStore]:
        store = cls(path, **kwargs)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store._expire_leases)
                yield store
                nursery.cancel_scope.cancel()
        finally:
            store._db.close()

    # ---------------------------------------------------------------- plumbing

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._lock:
            return await trio.to_thread.run_sync(fn, *args)

    def _meta(self, name: str) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE name = ?",
                                    (name,)).fetchone()[0])

    def _bump(self, key: str, value: bytes | None) -> int:
        """Inside a transaction: the next revision, with its change appended."""
        rev = self._meta("revision") + 1
        self._db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (rev,))
        self._db.execute("INSERT INTO changes VALUES (?, ?, ?)", (rev, key, value))
        if rev % 1000 == 0 and rev > self.history:
            oldest = rev - self.history + 1
            self._db.execute("DELETE FROM changes WHERE revision < ?", (oldest,))
            self._db.execute("UPDATE meta SET value = ? WHERE name = 'oldest'", (oldest,))
        return rev

    def _txn(self, fn: Callable[..., T], *args: Any) -> T:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(*args)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return out

    def _committed(self, rev: int | None) -> None:
        if rev is not None and rev > self._rev:
            self._rev = rev
            self._changed.set()  # wakes every watcher; the next change gets a new event
            self._changed = trio.Event()

    @staticmethod
    def _current(db: sqlite3.Connection, key: str) -> int:
        row = db.execute("SELECT revision FROM kv WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    # ---------------------------------------------------------------- reads

    async def get(self, key: str) -> Entry | None:
        def read() -> Entry | None:
            row = self._db.execute("SELECT key, value, revision, created, lease FROM kv "
                                   "WHERE key = ?", (key,)).fetchone()
            return Entry(row[0], bytes(row[1]), row[2], row[3], row[4]) if row else None
        return await self._run(read)

    async def list(self, prefix: str) -> tuple[list[Entry], int]:
        end = _prefix_end(prefix)

        def read() -> tuple[list[Entry], int]:
            self._db.execute("BEGIN")
            try:
                if end is None:
                    rows = self._db.execute("SELECT key, value, revision, created, lease FROM "
                                            "kv ORDER BY key").fetchall()
                else:
                    rows = self._db.execute("SELECT key, value, revision, created, lease FROM "
                                            "kv WHERE key >= ? AND key < ? ORDER BY key",
                                            (prefix, end)).fetchall()
                rev = self._meta("revision")
            finally:
                self._db.execute("COMMIT")
            return [Entry(r[0], bytes(r[1]), r[2], r[3], r[4]) for r in rows], rev
        return await self._run(read)

    async def revision(self) -> int:
        return self._rev

    # ---------------------------------------------------------------- writes

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  lease: int = 0) -> int:
        def write() -> int:
            db = self._db
            current = self._current(db, key)
            if expect is not None and current != expect:
                raise Conflict(key, expect, current)
            if lease and db.execute("SELECT 1 FROM leases WHERE id = ?",
                                    (lease,)).fetchone() is None:
                raise LeaseExpired(f"lease {lease} is gone")
            rev = self._bump(key, value)
            db.execute("INSERT INTO kv VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE "
                       "SET value = excluded.value, revision = excluded.revision, "
                       "lease = excluded.lease", (key, value, rev, rev, lease))
            return rev
        rev = await self._run(self._txn, write)
        self._committed(rev)
        return rev

    def _delete_now(self, key: str) -> int:
        rev = self._bump(key, None)
        self._db.execute("DELETE FROM kv WHERE key = ?", (key,))
        return rev

    async def delete(self, key: str, *, expect: int | None = None) -> int | None:
        def write() -> int | None:
            current = self._current(self._db, key)
            if expect is not None and current != expect:
                raise Conflict(key, expect, current)
            return self._delete_now(key) if current else None
        rev = await self._run(self._txn, write)
        self._committed(rev)
        return rev

    # ---------------------------------------------------------------- leases

    async def grant(self, ttl: float) -> int:
        def write() -> int:
            cur = self._db.execute("INSERT INTO leases (ttl, expires) VALUES (?, ?)",
                                   (ttl, self.clock() + ttl))
            return int(cur.lastrowid or 0)
        return await self._run(self._txn, write)

    async def keep_alive(self, lease: int) -> None:
        def write() -> None:
            cur = self._db.execute("UPDATE leases SET expires = ? + ttl WHERE id = ?",
                                   (self.clock(), lease))
            if cur.rowcount == 0:
                raise LeaseExpired(f"lease {lease} is gone")
        await self._run(self._txn, write)

    def _end_lease(self, lease: int) -> int | None:
        """Inside a transaction: delete the lease and its keys; the last revision."""
        rev = None
        for (key,) in self._db.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key",
                                       (lease,)).fetchall():
            rev = self._delete_now(key)
        self._db.execute("DELETE FROM leases WHERE id = ?", (lease,))
        return rev

    async def revoke(self, lease: int) -> None:
        rev = await self._run(self._txn, self._end_lease, lease)
        self._committed(rev)

    async def _expire_leases(self) -> None:
        def lapse() -> int | None:
            rev = None
            for (lease,) in self._db.execute("SELECT id FROM leases WHERE expires <= ?",
                                             (self.clock(),)).fetchall():
                rev = self._end_lease(lease) or rev
            return rev
        while True:
            await trio.sleep(LEASE_TICK)
            self._committed(await self._run(self._txn, lapse))

    # ---------------------------------------------------------------- watches

    async def watch(self, prefix: str, after: int) -> AsyncIterator[Event]:
        end = _prefix_end(prefix)

        def read(last: int) -> list[tuple[int, str, bytes | None]]:
            oldest = self._meta("oldest")
            if last + 1 < oldest:
                raise Compacted(last, oldest)
            if end is None:
                return self._db.execute("SELECT revision, key, value FROM changes WHERE "
                                        "revision > ? ORDER BY revision LIMIT ?",
                                        (last, WATCH_BATCH)).fetchall()
            return self._db.execute("SELECT revision, key, value FROM changes WHERE "
                                    "revision > ? AND key >= ? AND key < ? ORDER BY revision "
                                    "LIMIT ?", (last, prefix, end, WATCH_BATCH)).fetchall()

        last = after
        while True:
            woken = self._changed  # taken before reading: a commit after it sets this one
            seen = self._rev
            rows = await self._run(read, last)
            for rev, key, value in rows:
                yield Event("put" if value is not None else "delete", key, rev,
                            bytes(value) if value is not None else None)
                last = rev
            if len(rows) == WATCH_BATCH:
                continue
            last = max(last, seen)  # nothing of ours up to what was committed when we read
            if self._rev <= last:
                await woken.wait()
