"""One SQLite file: migrations, reads through aiosqlite, writes through a group-commit writer.

Writes are plain functions of a `sqlite3.Connection`, queued to one writer thread that runs
every queued function in a single `BEGIN IMMEDIATE … COMMIT` (each in its own savepoint, so
one failing write does not undo its neighbours). A caller's future resolves only after the
commit, with `synchronous=FULL`, so an answer or event sent after `await write(...)` is
durable. The thread finishes a transaction even when the awaiting request is cancelled
(client disconnect): a write is never cut half-way.

aiosqlite has no public way to run several statements in one hop to its thread, which is
what lets one commit carry many writes; reads are single statements and use aiosqlite.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from gateway.errors import StorageError

log = logging.getLogger("gateway.storage")

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], T]
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_STOP = object()
_MAX_BATCH = 512


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration shipped with the package, in order."""
    found: list[tuple[int, str, str]] = []
    root = resources.files("gateway") / "migrations"
    for entry in root.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise StorageError("two migrations share a version number")
    return found


def _connect(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA journal_mode = WAL")
    # FULL: a "verified" a user has seen must survive power loss.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    # Purged personal data must not linger in free pages (where it costs no extra I/O).
    conn.execute("PRAGMA secure_delete = FAST")
    return conn


def apply_migrations(path: str, busy_timeout_ms: int = 5000) -> list[str]:
    """Apply pending migrations, each in its own transaction; returns the names applied."""
    conn = _connect(path, busy_timeout_ms)
    applied: list[str] = []
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        for version, name, sql in migration_files():
            conn.execute("BEGIN IMMEDIATE")
            try:
                done = conn.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (version,)).fetchone()
                if done is None:
                    for statement in _split_sql(sql):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, datetime('now'))",
                        (version, name),
                    )
                    applied.append(name)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    except sqlite3.Error as exc:
        raise StorageError(f"migration failed on {path}: {exc}") from exc
    finally:
        conn.close()
    return applied


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit on its own)."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip() and not current.strip().startswith("--"):
        statements.append(current.strip())
    return statements


class _Writer(threading.Thread):
    """The single writer: drains the queue and commits everything queued in one transaction."""

    def __init__(self, path: str, busy_timeout_ms: int, on_write_seconds: Callable[[float], None] | None) -> None:
        super().__init__(name="gateway-db-writer", daemon=True)
        self._conn = _connect(path, busy_timeout_ms)
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")  # see _Checkpointer
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.commits = 0
        self._on_write_seconds = on_write_seconds

    def run(self) -> None:
        try:
            while True:
                job = self.jobs.get()
                if job is _STOP:
                    return
                batch = [job]
                stop = False
                while len(batch) < _MAX_BATCH:
                    try:
                        more = self.jobs.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        stop = True
                        break
                    batch.append(more)
                self._commit(batch)
                if stop:
                    return
        finally:
            self._conn.close()

    def _commit(self, batch: list[tuple[WriteFn[Any], Future[Any], float]]) -> None:
        conn = self._conn
        results: list[tuple[Future[Any], bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, fut, _ in batch:
                conn.execute("SAVEPOINT w")
                try:
                    value = fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO w")
                    conn.execute("RELEASE w")
                    results.append((fut, False, exc))
                else:
                    conn.execute("RELEASE w")
                    results.append((fut, True, value))
            conn.execute("COMMIT")
            committed = time.perf_counter()
            self.commits += 1
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = StorageError(f"database write failed: {exc}")
            for _, fut, _ in batch:
                fut.set_exception(error)
            return
        # Observed before the callers are woken (about a microsecond each, against a
        # millisecond fsync), so a caller that resumes after its write sees it counted.
        observe = self._on_write_seconds
        if observe is not None:
            try:
                for _, _, queued in batch:
                    observe(committed - queued)
            except Exception:  # a broken hook must not leave the callers waiting forever
                log.exception("on_write_seconds hook failed")
        for fut, ok, value in results:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


class _Checkpointer(threading.Thread):
    """Copies the WAL back into the database file, off the writer's path.

    With SQLite's automatic checkpoint the commit that crosses 1,000 WAL pages also copies
    and fsyncs the database file, a multi-millisecond stall for every write in that batch
    (the delivery p99). The writer turns that off and this thread checkpoints every second.
    """

    def __init__(self, path: str, busy_timeout_ms: int, interval: float = 1.0) -> None:
        super().__init__(name="gateway-db-checkpoint", daemon=True)
        self._conn = _connect(path, busy_timeout_ms)
        self._interval = interval
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.wait(self._interval):
                self._checkpoint("PASSIVE")
            self._checkpoint("TRUNCATE")  # the writer has stopped: leave a small WAL behind
        finally:
            self._conn.close()

    def _checkpoint(self, mode: str) -> None:
        try:
            self._conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
        except sqlite3.Error:
            log.warning("WAL checkpoint (%s) failed; will retry", mode.lower(), exc_info=True)


class Database:
    """The gateway's database: `read` for single statements, `write` for transactions."""

    def __init__(self, path: str, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self._busy = busy_timeout_ms
        self._reader: aiosqlite.Connection | None = None
        self._lookups: sqlite3.Connection | None = None
        self._writer: _Writer | None = None
        self._checkpointer: _Checkpointer | None = None
        # Set before open(): told the seconds from queueing each write to its durable commit,
        # called on the writer thread (prometheus_client is thread-safe).
        self.on_write_seconds: Callable[[float], None] | None = None

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(apply_migrations, self.path, self._busy)
        self._writer = _Writer(self.path, self._busy, self.on_write_seconds)
        self._writer.start()
        self._checkpointer = _Checkpointer(self.path, self._busy)
        self._checkpointer.start()
        reader = await aiosqlite.connect(self.path, isolation_level=None)
        reader.row_factory = sqlite3.Row
        await reader.execute(f"PRAGMA busy_timeout = {int(self._busy)}")
        self._reader = reader
        self._lookups = _connect(self.path, min(self._busy, 1000))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.jobs.put(_STOP)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._checkpointer is not None:
            self._checkpointer.stopping.set()
            await asyncio.to_thread(self._checkpointer.join)
            self._checkpointer = None
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        if self._lookups is not None:
            self._lookups.close()
            self._lookups = None

    @property
    def commits(self) -> int:
        return self._writer.commits if self._writer else 0

    async def write(self, fn: WriteFn[T]) -> T:
        """Run `fn` inside the next group commit; returns once it is durable.

        Cancelling the caller does not cancel the write: it commits regardless.
        """
        if self._writer is None:
            raise StorageError("database is closed")
        cfut: Future[T] = Future()
        self._writer.jobs.put((fn, cfut, time.perf_counter()))
        return await asyncio.shield(asyncio.wrap_future(cfut))

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    def lookup(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """A point read by key, on the event loop's own thread.

        Such a read takes about 20 µs, less than the hop to aiosqlite's thread and back, and
        in WAL mode a reader never waits for the writer; opening a stream is one of these,
        and this alone raised the open rate by a quarter (docs/BENCHMARKS.md). Scans and
        anything that may touch many rows go through `fetchall`.
        """
        if self._lookups is None:
            raise StorageError("database is closed")
        try:
            return self._lookups.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"database read failed: {exc}") from exc

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        if self._reader is None:
            raise StorageError("database is closed")
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StorageError(f"database read failed: {exc}") from exc
