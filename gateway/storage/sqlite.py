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
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from gateway.auth import Admitted
from gateway.errors import StorageError
from gateway.outcome import Outcome, scrub_outcome
from gateway.records import (
    CLAIM_LEASE,
    TOKEN_MEMORY,
    ClaimResult,
    Idempotency,
    IdempotencyKeyTaken,
    OutboxEntry,
    OutboxItem,
    OutboxResult,
    PendingClaim,
    Session,
    StoredEvent,
    TokenClaim,
    WebhookEvent,
)
from gateway.storage.base import Finished, Progressed, RefProgressed
from gateway.storage.rows import dumps, migration_files, session_from_row

log = logging.getLogger("gateway.storage")

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], T]
_STOP = object()
_BEGIN = object()
_MAX_BATCH = 512
_LOOKUP_MMAP = 64 * 1024 * 1024


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
        # When a checkpoint lets the WAL start over, cut the file back to this size: after a
        # burst of writes it would otherwise keep its peak size (and count against max_size_mb).
        self._conn.execute("PRAGMA journal_size_limit = 16777216")
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

    def used_bytes(self) -> int:
        """Pages in use plus the WAL file: what the file needs, since free pages are reused first."""
        if self.path == ":memory:":
            return 0
        rows = self.lookup(
            "SELECT page_count - freelist_count, page_size FROM pragma_page_count, pragma_freelist_count,"
            " pragma_page_size"
        )
        try:
            wal = os.stat(self.path + "-wal").st_size
        except FileNotFoundError:
            wal = 0
        return int(rows[0][0]) * int(rows[0][1]) + wal

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


class SqliteStore:
    """`Store` on one SQLite file: point reads on the loop, scans via aiosqlite, one group-commit writer."""

    shared = False  # one process: `gateway serve --workers` refuses SQLite

    def __init__(
        self, path: str, busy_timeout_ms: int = 5000, on_write_seconds: Callable[[float], None] | None = None
    ) -> None:
        self.db = Database(path, busy_timeout_ms)
        self.db.on_write_seconds = on_write_seconds
        self._token_sweep = 0.0  # when old token hashes are next deleted (at most once a second)

    async def open(self) -> None:
        await self.db.open()

        # One process uses this file: a fetch lease stored before is a dead process's.
        def void_leases(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE truecaller_callbacks SET lease_until = 0 WHERE lease_until != 0")

        await self.db.write(void_leases)

    async def close(self) -> None:
        await self.db.close()

    def watch(self, on_event: Callable[[str, int], None], on_reset: Callable[[], None]) -> None:
        """Nothing to watch: this process's own broker hears every event of this store."""

    def listener_ok(self) -> bool | None:
        return None

    async def ping(self) -> None:
        await self.db.fetchone("SELECT 1")

    # -- sessions ------------------------------------------------------------------------
    async def create(
        self, session: Session, idempotency: Idempotency | None = None, ticket: Admitted | None = None
    ) -> bool:
        row = (
            session.id,
            session.provider,
            session.provider_ref,
            session.phone,
            session.user_ref,
            json.dumps(session.provider_data, separators=(",", ":")),
            session.created_at,
            session.updated_at,
            session.expires_at,
        )

        def insert(conn: sqlite3.Connection) -> bool:
            if ticket is not None:
                # First, in the same transaction: of two starts with one ticket exactly one stores.
                used = conn.execute(
                    "INSERT INTO start_tickets_used (ticket_hash, expires_at) VALUES (?, ?)"
                    " ON CONFLICT (ticket_hash) DO NOTHING",
                    (ticket.hash, ticket.expires_at),
                )
                if used.rowcount != 1:
                    return False
            conn.execute(
                "INSERT INTO sessions (id, provider, status, provider_ref, phone, user_ref, provider_data,"
                " created_at, updated_at, expires_at) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            if idempotency is not None:
                # A key whose session's ttl has passed may be used again: its old row goes first.
                conn.execute(
                    "DELETE FROM idempotency_keys WHERE key_hash = ? AND expires_at <= ?",
                    (idempotency.key_hash, session.created_at),
                )
                taken = conn.execute(
                    "INSERT INTO idempotency_keys (key_hash, body_hash, session_id, answer, expires_at)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (key_hash) DO NOTHING",
                    (
                        idempotency.key_hash,
                        idempotency.body_hash,
                        session.id,
                        dumps(idempotency.answer),
                        idempotency.expires_at,
                    ),
                )
                if taken.rowcount != 1:
                    raise IdempotencyKeyTaken  # undoes this write's savepoint: the session too
            return True

        return await self.db.write(insert)

    async def ticket_used(self, ticket_hash: str) -> bool:
        return bool(self.db.lookup("SELECT 1 FROM start_tickets_used WHERE ticket_hash = ?", (ticket_hash,)))

    async def prune_tickets(self, now: float) -> int:
        due = await self.db.fetchone("SELECT 1 FROM start_tickets_used WHERE expires_at <= ? LIMIT 1", (now,))
        if due is None:
            return 0

        def prune(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM start_tickets_used WHERE expires_at <= ?", (now,)).rowcount

        return await self.db.write(prune)

    async def database_bytes(self) -> int:
        return self.db.used_bytes()

    async def idempotent(self, key_hash: str, now: float) -> Idempotency | None:
        rows = self.db.lookup(
            "SELECT body_hash, answer, expires_at FROM idempotency_keys WHERE key_hash = ? AND expires_at > ?",
            (key_hash, now),
        )
        return Idempotency(key_hash, rows[0][0], json.loads(rows[0][1]), rows[0][2]) if rows else None

    async def prune_idempotency(self, now: float) -> int:
        due = await self.db.fetchone("SELECT 1 FROM idempotency_keys WHERE expires_at <= ? LIMIT 1", (now,))
        if due is None:
            return 0

        def prune(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (now,)).rowcount

        return await self.db.write(prune)

    async def get(self, session_id: str) -> Session | None:
        rows = self.db.lookup("SELECT * FROM sessions WHERE id = ?", (session_id,))
        return session_from_row(rows[0]) if rows else None

    async def get_by_ref(self, provider: str, provider_ref: str) -> Session | None:
        rows = self.db.lookup(
            "SELECT * FROM sessions WHERE provider_ref = ? AND provider = ?", (provider_ref, provider)
        )
        return session_from_row(rows[0]) if rows else None

    async def get_with_events(self, session_id: str, after_id: int) -> tuple[Session | None, list[StoredEvent]]:
        # A session has a handful of events at most: a bounded point read.
        rows = self.db.lookup(
            "SELECT s.*, e.id AS ev_id, e.kind AS ev_kind, e.data AS ev_data FROM sessions s"
            " LEFT JOIN session_events e ON e.session_id = s.id AND e.id > ? WHERE s.id = ? ORDER BY e.id",
            (after_id, session_id),
        )
        if not rows:
            return None, []
        events = [
            StoredEvent(r["ev_id"], r["ev_kind"], json.loads(r["ev_data"])) for r in rows if r["ev_id"] is not None
        ]
        return session_from_row(rows[0]), events

    async def outcome_event(self, session_id: str) -> StoredEvent | None:
        row = await self.db.fetchone(
            "SELECT id, kind, data FROM session_events WHERE session_id = ? AND kind = 'outcome'", (session_id,)
        )
        return StoredEvent(row["id"], row["kind"], json.loads(row["data"])) if row else None

    async def event(self, session_id: str, event_id: int) -> StoredEvent | None:
        rows = self.db.lookup(
            "SELECT id, kind, data FROM session_events WHERE id = ? AND session_id = ?", (event_id, session_id)
        )
        return StoredEvent(rows[0][0], rows[0][1], json.loads(rows[0][2])) if rows else None

    async def update_provider_data(
        self, session_id: str, changes: dict[str, Any], *, now: float, expires_at: float | None
    ) -> bool:
        def update(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT provider_data FROM sessions WHERE id = ? AND status = 'pending'", (session_id,)
            ).fetchone()
            if row is None:
                return False
            merged = {**(json.loads(row[0]) if row[0] else {}), **changes}
            conn.execute(
                "UPDATE sessions SET provider_data = ?, updated_at = ?, expires_at = COALESCE(?, expires_at)"
                " WHERE id = ? AND status = 'pending'",
                (json.dumps(merged, separators=(",", ":")), now, expires_at, session_id),
            )
            return True

        return await self.db.write(update)

    async def progress(
        self,
        session_id: str,
        data: dict[str, Any],
        *,
        now: float,
        expires_at: float | None = None,
        claim: TokenClaim | None = None,
        durable: bool = True,
    ) -> Progressed:
        # Always durable: no process but this one reads the file, so nothing gains by less.
        return await self.db.write(self._progress_write(session_id, data, now, expires_at, claim))

    async def progress_by_ref(
        self,
        provider: str,
        provider_ref: str,
        data: dict[str, Any],
        *,
        now: float,
        claim: TokenClaim,
        expires_at: float | None = None,
        durable: bool = True,
    ) -> RefProgressed:
        def write(conn: sqlite3.Connection) -> RefProgressed:
            row = conn.execute(
                "SELECT id, phone, user_ref FROM sessions"
                " WHERE provider_ref = ? AND provider = ? AND status = 'pending'",
                (provider_ref, provider),
            ).fetchone()
            if row is None:
                return RefProgressed(None, None, None, Progressed(None, "gone"))
            sid = row[0]
            done = self._progress_write(sid, data, now, expires_at, replace(claim, session_id=sid))(conn)
            return RefProgressed(sid, row[1], row[2], done)

        return await self.db.write(write)

    async def flush(self) -> None:
        """Every write here is durable when it returns: nothing to flush."""

    async def finish(
        self,
        session_id: str,
        outcome: Outcome,
        *,
        now: float,
        release_claim: bool = False,
        webhook: WebhookEvent | None = None,
        unless_claimed: bool = False,
    ) -> Finished | None:
        return await self.db.write(self._finish_write(session_id, outcome, now, release_claim, webhook, unless_claimed))

    async def progress_and_finish(
        self,
        session_id: str,
        data: dict[str, Any],
        outcome: Outcome,
        *,
        now: float,
        claim: TokenClaim | None = None,
        release_claim: bool = False,
        webhook: WebhookEvent | None = None,
    ) -> tuple[Progressed, Finished | None]:
        progress = self._progress_write(session_id, data, now, None, claim)
        finish = self._finish_write(session_id, outcome, now, release_claim, webhook)

        def both(conn: sqlite3.Connection) -> tuple[Progressed, Finished | None]:
            progressed = progress(conn)
            return progressed, (None if progressed.event_id is None else finish(conn))

        return await self.db.write(both)

    def _progress_write(
        self, session_id: str, data: dict[str, Any], now: float, expires_at: float | None, claim: TokenClaim | None
    ) -> Callable[[sqlite3.Connection], Progressed]:
        encoded = dumps(data)

        def insert(conn: sqlite3.Connection) -> Progressed:
            claimed: ClaimResult | None = None
            if claim is not None:
                claimed = self._store_claim(conn, claim)
                if claimed != "stored":
                    return Progressed(None, claimed)
            row = conn.execute(
                "SELECT provider, EXISTS (SELECT 1 FROM session_events e WHERE e.session_id = s.id)"
                " FROM sessions s WHERE id = ? AND status = 'pending'",
                (session_id,),
            ).fetchone()
            if row is None:
                return Progressed(None, claimed)
            cur = conn.execute(
                "INSERT INTO session_events (session_id, kind, data, created_at) VALUES (?, 'progress', ?, ?)",
                (session_id, encoded, now),
            )
            conn.execute(
                "UPDATE sessions SET updated_at = ?, expires_at = COALESCE(?, expires_at) WHERE id = ?",
                (now, expires_at, session_id),
            )
            return Progressed(cur.lastrowid, claimed, first=not row[1], provider=row[0])

        return insert

    def _finish_write(
        self,
        session_id: str,
        outcome: Outcome,
        now: float,
        release_claim: bool,
        webhook: WebhookEvent | None,
        unless_claimed: bool = False,
    ) -> Callable[[sqlite3.Connection], Finished | None]:
        sql = "SELECT provider, user_ref FROM sessions WHERE id = ? AND status = 'pending'"
        if unless_claimed:
            sql += " AND NOT EXISTS (SELECT 1 FROM truecaller_callbacks c WHERE c.session_id = sessions.id)"

        def update(conn: sqlite3.Connection) -> Finished | None:
            if release_claim:  # the fetch is over, whatever its outcome and whoever wins
                conn.execute("DELETE FROM truecaller_callbacks WHERE session_id = ?", (session_id,))
            row = conn.execute(sql, (session_id,)).fetchone()
            if row is None:
                return None
            body = outcome.to_json(provider=row["provider"], user_ref=row["user_ref"], completed_at=now)
            encoded = dumps(body)
            cur = conn.execute(
                "UPDATE sessions SET status = ?, reason = ?, outcome = ?, completed_at = ?, updated_at = ?"
                " WHERE id = ? AND status = 'pending'",
                (outcome.status, outcome.reason, encoded, now, now, session_id),
            )
            if cur.rowcount != 1:  # pragma: no cover - the single writer makes this unreachable
                return None
            ins = conn.execute(
                "INSERT INTO session_events (session_id, kind, data, created_at) VALUES (?, 'outcome', ?, ?)",
                (session_id, encoded, now),
            )
            assert ins.lastrowid is not None
            if webhook is not None:
                msg_id, kind, payload = webhook(session_id, body, now)
                conn.execute(
                    "INSERT INTO webhook_outbox (id, session_id, type, payload, enqueued_at, next_attempt_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (msg_id, session_id, kind, payload, now, now),
                )
            return Finished(ins.lastrowid, body)

        return update

    async def conversion(self, since: float) -> list[tuple[str, str, str | None, int, int]]:
        rows = await self.db.fetchall(
            "SELECT s.provider, s.status, s.reason, COUNT(*),"
            " SUM(EXISTS (SELECT 1 FROM session_events e WHERE e.session_id = s.id AND e.kind = 'progress'))"
            " FROM sessions s WHERE s.created_at >= ? GROUP BY s.provider, s.status, s.reason"
            " ORDER BY s.provider, s.status, s.reason",
            (since,),
        )
        return [(r[0], r[1], r[2], int(r[3]), int(r[4] or 0)) for r in rows]

    async def due_for_expiry(self, now: float, limit: int) -> list[str]:
        rows = await self.db.fetchall(
            "SELECT id FROM sessions WHERE status = 'pending' AND expires_at <= ? ORDER BY expires_at LIMIT ?",
            (now, limit),
        )
        return [row["id"] for row in rows]

    async def next_deadline(self) -> float | None:
        row = await self.db.fetchone("SELECT MIN(expires_at) AS t FROM sessions WHERE status = 'pending'")
        return None if row is None or row["t"] is None else float(row["t"])

    async def count_pending(self) -> int:
        # Counted on the partial index of pending sessions, off the loop (aiosqlite's thread).
        row = await self.db.fetchone("SELECT COUNT(*) AS n FROM sessions WHERE status = 'pending'")
        return 0 if row is None else int(row["n"])

    async def purge_personal_data(self, *, cutoff: float, now: float, limit: int) -> int:
        def purge(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT id, outcome FROM sessions WHERE completed_at IS NOT NULL AND completed_at <= ?"
                " AND purged_at IS NULL ORDER BY completed_at LIMIT ?",
                (cutoff, limit),
            ).fetchall()
            for row in rows:
                conn.execute(
                    "UPDATE sessions SET phone = NULL, user_ref = NULL, provider_data = NULL, outcome = ?,"
                    " purged_at = ? WHERE id = ?",
                    (scrub_outcome(row["outcome"]), now, row["id"]),
                )
                events = conn.execute(
                    "SELECT id, data FROM session_events WHERE session_id = ? AND kind = 'outcome'", (row["id"],)
                ).fetchall()
                for event in events:
                    conn.execute(
                        "UPDATE session_events SET data = ? WHERE id = ?", (scrub_outcome(event["data"]), event["id"])
                    )
            return len(rows)

        return await self.db.write(purge)

    async def delete_finished(self, *, cutoff: float, limit: int) -> int:
        due = await self.db.fetchone(
            "SELECT 1 FROM sessions WHERE purged_at IS NOT NULL AND completed_at <= ? LIMIT 1", (cutoff,)
        )
        if due is None:  # the usual case: no write, no fsync
            return 0

        def delete(conn: sqlite3.Connection) -> int:
            # Events, idempotency keys and finished webhooks go with their session (ON DELETE CASCADE).
            return conn.execute(
                "DELETE FROM sessions WHERE id IN (SELECT s.id FROM sessions s"
                " WHERE s.purged_at IS NOT NULL AND s.completed_at <= ? AND NOT EXISTS"
                " (SELECT 1 FROM webhook_outbox w WHERE w.session_id = s.id AND w.status = 'pending')"
                " ORDER BY s.completed_at LIMIT ?)",
                (cutoff, limit),
            ).rowcount

        return await self.db.write(delete)

    # -- Truecaller token claims ---------------------------------------------------------
    async def token_owner(self, token_hash: str) -> str | None:
        rows = self.db.lookup("SELECT session_id FROM truecaller_tokens_used WHERE token_hash = ?", (token_hash,))
        return str(rows[0][0]) if rows else None

    async def has_claim(self, session_id: str) -> bool:
        row = await self.db.fetchone("SELECT 1 FROM truecaller_callbacks WHERE session_id = ?", (session_id,))
        return row is not None

    async def pending_claims(self, now: float, lease: float = CLAIM_LEASE) -> list[PendingClaim]:
        def take(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            conn.execute(
                "DELETE FROM truecaller_callbacks"
                " WHERE session_id NOT IN (SELECT id FROM sessions WHERE status = 'pending')"
            )
            return conn.execute(
                "UPDATE truecaller_callbacks SET lease_until = ? WHERE lease_until <= ?"
                " RETURNING session_id, endpoint, access_token, token_expires_at,"
                " (SELECT phone FROM sessions s WHERE s.id = session_id) AS phone",
                (now + lease, now),
            ).fetchall()

        rows = await self.db.write(take)
        return [
            PendingClaim(r["session_id"], r["phone"], r["endpoint"], r["access_token"], r["token_expires_at"])
            for r in rows
        ]

    def _store_claim(self, conn: sqlite3.Connection, claim: TokenClaim) -> ClaimResult:
        """Store the first token callback of a still-pending session; bind the token to it."""
        if (
            conn.execute("SELECT 1 FROM sessions WHERE id = ? AND status = 'pending'", (claim.session_id,)).fetchone()
            is None
        ):
            return "gone"  # refused: nothing of the token is stored
        received = claim.received_at
        if not self._token_sweep - 1.0 <= received < self._token_sweep:
            self._token_sweep = received + 1.0  # forget old token hashes, at most once a second
            conn.execute("DELETE FROM truecaller_tokens_used WHERE used_at < ?", (received - TOKEN_MEMORY,))
        # Bind the token to this session unless it is bound already; either way the row that
        # holds it comes back. A token proves one consent, for one session.
        bound = conn.execute(
            "INSERT INTO truecaller_tokens_used (token_hash, session_id, used_at) VALUES (?, ?, ?)"
            " ON CONFLICT (token_hash) DO UPDATE SET used_at = used_at RETURNING session_id",
            (claim.token_hash, claim.session_id, received),
        ).fetchone()
        if bound[0] != claim.session_id:
            return "reused"
        # One statement decides: the session must be pending and have no callback yet, so of
        # any number of racing callbacks exactly one is stored and goes on to fetch.
        cur = conn.execute(
            "INSERT INTO truecaller_callbacks"
            " (session_id, endpoint, access_token, received_at, token_expires_at, lease_until)"
            " SELECT id, ?, ?, ?, ?, ? FROM sessions WHERE id = ? AND status = 'pending'"
            " ON CONFLICT (session_id) DO NOTHING",
            (
                claim.endpoint,
                claim.access_token,
                received,
                claim.token_expires_at,
                claim.lease,
                claim.session_id,
            ),
        )
        # The session was pending above, and this single writer's transaction keeps it so.
        return "stored" if cur.rowcount == 1 else "repeat"

    # -- the webhook outbox --------------------------------------------------------------
    async def outbox_due(self, now: float, limit: int) -> list[OutboxItem]:
        # Indexed and bounded: a point read on the loop, no hop to the reader thread (the
        # worker runs beside the hot path and a thread hand-off costs it GIL switches).
        rows = self.db.lookup(
            "SELECT id, session_id, type, payload, attempts, enqueued_at FROM webhook_outbox"
            " WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
            (now, limit),
        )
        return [OutboxItem(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    async def outbox_next_due(self) -> float | None:
        rows = self.db.lookup("SELECT MIN(next_attempt_at) FROM webhook_outbox WHERE status = 'pending'")
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def outbox_oldest_pending(self) -> float | None:
        rows = self.db.lookup("SELECT MIN(enqueued_at) FROM webhook_outbox WHERE status = 'pending'")
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def outbox_record(self, results: list[OutboxResult]) -> None:
        values = [
            (r.status, r.attempts, r.next_attempt_at, r.finished_at, r.last_status, r.last_error, r.id) for r in results
        ]

        def record(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE webhook_outbox SET status = ?, attempts = ?, next_attempt_at = ?, finished_at = ?,"
                " last_status = ?, last_error = ? WHERE id = ? AND status = 'pending'",
                values,
            )

        await self.db.write(record)

    async def outbox_list(self, *, failed_only: bool, limit: int) -> list[OutboxEntry]:
        rows = await self.db.fetchall(
            "SELECT id, type, status, attempts, enqueued_at, next_attempt_at, finished_at, last_status, last_error"
            " FROM webhook_outbox WHERE status = 'failed' OR NOT ? ORDER BY enqueued_at DESC LIMIT ?",
            (failed_only, limit),
        )
        return [OutboxEntry(*tuple(r)) for r in rows]

    async def outbox_retry(self, webhook_id: str | None, *, now: float) -> int:
        def retry(conn: sqlite3.Connection) -> int:
            sql = (
                "UPDATE webhook_outbox SET status = 'pending', attempts = 0, enqueued_at = ?, next_attempt_at = ?,"
                " finished_at = NULL WHERE status = 'failed'"
            )
            if webhook_id is None:
                return conn.execute(sql, (now, now)).rowcount
            return conn.execute(sql + " AND id = ?", (now, now, webhook_id)).rowcount

        return await self.db.write(retry)

    async def outbox_prune(self, *, cutoff: float, limit: int) -> int:
        due = await self.db.fetchone(
            "SELECT 1 FROM webhook_outbox WHERE status != 'pending' AND finished_at <= ? LIMIT 1", (cutoff,)
        )
        if due is None:  # the usual case: no write, no fsync
            return 0

        def prune(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM webhook_outbox WHERE id IN (SELECT id FROM webhook_outbox"
                " WHERE status != 'pending' AND finished_at <= ? ORDER BY finished_at LIMIT ?)",
                (cutoff, limit),
            ).rowcount

        return await self.db.write(prune)
