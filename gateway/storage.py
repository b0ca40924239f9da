"""One SQLite file: migrations, point reads on the loop, scans through aiosqlite, group-commit writes.

Writes are plain functions of a `sqlite3.Connection`. Every function queued while a commit is
in flight runs in the next single `BEGIN IMMEDIATE … COMMIT` (each in its own savepoint, so
one failing write does not undo its neighbours). A caller's future resolves only after the
commit, with `synchronous=FULL`, so an answer or event sent after `await write(...)` is
durable. A queued write commits even when the awaiting request is cancelled (client
disconnect): a write is never cut half-way.

The statements run on the event loop's thread and only the COMMIT (the fsync) on a thread of
its own; see `_Writer` for why.
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
_BEGIN = object()
_MAX_BATCH = 512
_LOOKUP_MMAP = 64 * 1024 * 1024


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


class _Writer:
    """Group commit: the statements run on the event loop, only the durable COMMIT on a thread.

    Every write queued while a commit is in flight joins the next batch, which runs in one
    `BEGIN IMMEDIATE … COMMIT` (each write in its own savepoint, so one failing write does not
    undo its neighbours). Running the statements on the loop's thread matters: a Python
    thread must take the GIL back after every sqlite call, and while the loop is busy each
    hand-over waits up to the switch interval (5 ms), so a writer thread that ran a batch of
    statements crawled exactly when the gateway was loaded (docs/BENCHMARKS.md). The commit
    thread takes the GIL twice per batch, whatever its size.
    """

    def __init__(self, path: str, busy_timeout_ms: int, on_write_seconds: Callable[[float], None] | None) -> None:
        self._conn = _connect(path, busy_timeout_ms)
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")  # see _Checkpointer
        # Taking the write lock on the loop never waits: if another process holds it, the
        # wait (up to busy_timeout) happens on the commit thread instead.
        self._busy_ms = int(busy_timeout_ms)
        self._conn.execute("PRAGMA busy_timeout = 0")
        self._loop = asyncio.get_running_loop()
        self._queue: list[tuple[WriteFn[Any], asyncio.Future[Any], float]] = []
        self._batch: list[tuple[WriteFn[Any], asyncio.Future[Any], float]] = []
        self._busy = False  # a batch is between BEGIN and the end of its COMMIT
        self._idle = asyncio.Event()
        self._idle.set()
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="gateway-db-commit", daemon=True)
        self._thread.start()
        self.commits = 0
        self._on_write_seconds = on_write_seconds

    def submit(self, fn: WriteFn[T]) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = self._loop.create_future()
        self._queue.append((fn, fut, time.perf_counter()))
        if not self._busy:
            # At the end of this loop iteration: writes queued in the same pass share the commit.
            self._busy = True
            self._idle.clear()
            self._loop.call_soon(self._begin)
        return fut

    async def close(self) -> None:
        await self._idle.wait()
        self._jobs.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._conn.close()

    # -- on the event loop ------------------------------------------------------------------
    def _begin(self) -> None:
        self._batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            self._jobs.put(_BEGIN)  # locked by another process: wait for it off the loop
            return
        except sqlite3.Error as exc:
            self._fail(exc)
            return
        self._run_batch()

    def _run_batch(self) -> None:
        conn = self._conn
        results: list[tuple[bool, Any]] = []
        try:
            for fn, _, _ in self._batch:
                conn.execute("SAVEPOINT w")
                try:
                    value = fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO w")
                    conn.execute("RELEASE w")
                    results.append((False, exc))
                else:
                    conn.execute("RELEASE w")
                    results.append((True, value))
        except sqlite3.Error as exc:
            self._rollback()
            self._fail(exc)
            return
        self._jobs.put(results)

    def _committed(self, results: list[tuple[bool, Any]], committed: float) -> None:
        batch, self._batch = self._batch, []
        self.commits += 1
        # Observed before the callers resume, so a caller that resumes sees its write counted.
        observe = self._on_write_seconds
        if observe is not None:
            try:
                for _, _, queued in batch:
                    observe(committed - queued)
            except Exception:  # a broken hook must not leave the callers waiting forever
                log.exception("on_write_seconds hook failed")
        for (_, fut, _), (ok, value) in zip(batch, results, strict=True):
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        self._next()

    def _fail(self, exc: BaseException) -> None:
        batch, self._batch = self._batch, []
        error = StorageError(f"database write failed: {exc}")
        for _, fut, _ in batch:
            if not fut.done():
                fut.set_exception(error)
        self._next()

    def _next(self) -> None:
        if self._queue:
            self._begin()
        else:
            self._busy = False
            self._idle.set()

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback failed")

    # -- on the commit thread -----------------------------------------------------------------
    def _run(self) -> None:
        conn, loop = self._conn, self._loop
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            try:
                if job is _BEGIN:
                    conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                    try:
                        conn.execute("BEGIN IMMEDIATE")
                    finally:
                        conn.execute("PRAGMA busy_timeout = 0")
                    loop.call_soon_threadsafe(self._run_batch)
                    continue
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                loop.call_soon_threadsafe(self._fail, exc)
                continue
            loop.call_soon_threadsafe(self._committed, job, time.perf_counter())


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
        self._checkpointer = _Checkpointer(self.path, self._busy)
        self._checkpointer.start()
        reader = await aiosqlite.connect(self.path, isolation_level=None)
        reader.row_factory = sqlite3.Row
        await reader.execute(f"PRAGMA busy_timeout = {int(self._busy)}")
        self._reader = reader
        self._lookups = _connect(self.path, min(self._busy, 1000))
        # Every commit elsewhere empties this connection's page cache, so each lookup reads its
        # pages again: through a memory map that costs half the time of pread (12 vs 24 µs,
        # docs/BENCHMARKS.md). Mapped pages are the kernel's page cache, shown in RSS as file
        # pages, and at most this much of the file is mapped.
        self._lookups.execute(f"PRAGMA mmap_size = {_LOOKUP_MMAP}")

    async def close(self) -> None:
        if self._writer is not None:
            await self._writer.close()
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
        return await asyncio.shield(self._writer.submit(fn))

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
