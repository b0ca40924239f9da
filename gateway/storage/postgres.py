"""PostgreSQL through an asyncpg pool: the `Store` for several gateway processes on one database.

What SQLite's single writer gives for free is spelled out here, because other processes write
too. Every write that decides a session first locks the session's row (`FOR UPDATE`, pending
only), so racing outcomes settle on one and a session's events get increasing ids in commit
order. Work several processes poll for (stored tokens to fetch, webhooks to send, rows to
purge) is taken with `FOR UPDATE SKIP LOCKED` and, where it outlives the transaction, leased.
Every transaction that inserts an event also sends `pg_notify('gateway_events', '<session
id>:<event id>:<origin>')`, delivered on commit, to every process's `watch` connection; a
process skips the notifications of its own origin (it published those events itself).

Every error of the driver, of the server and of the network becomes `StorageError`. A write
runs to its end even if its caller is cancelled (a client disconnect): a write is never cut
half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from gateway.auth import Admitted
from gateway.errors import StorageError
from gateway.outcome import Outcome, scrub_outcome
from gateway.records import (
    CLAIM_LEASE,
    OUTBOX_LEASE,
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
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
Tx: TypeAlias = Callable[[Conn], Awaitable[T]]

CHANNEL = "gateway_events"
# pg_advisory_lock key of `apply_migrations` ("gw-migr"): one process migrates at a time.
MIGRATION_LOCK = 0x67772D6D696772
PING_TIMEOUT = 2.0
COMMAND_TIMEOUT = 30.0  # a statement that hangs longer (a dead peer) fails instead of waiting forever
# The watch connection: reconnect after 0.1 s, doubling up to 2 s; probe it this often, since a
# peer gone without a FIN (a network cut) is noticed by nothing else.
RECONNECT_FIRST, RECONNECT_MAX = 0.1, 2.0
PROBE_INTERVAL, PROBE_TIMEOUT = 5.0, 2.0
BATCH = 1000  # rows per transaction when pruning expired keys
_RETRIES = 3  # a deadlock victim's transaction is run again this many times in all
# What the driver, the server and the network raise: all of it is StorageError to the caller.
_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)

_INSERT_SESSION = (
    "INSERT INTO sessions (id, provider, status, provider_ref, phone, user_ref, provider_data,"
    " created_at, updated_at, expires_at) VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7, $8, $9)"
)
_LOCK_PENDING = "SELECT provider, user_ref FROM sessions WHERE id = $1 AND status = 'pending' FOR UPDATE"
# The lock, a token's claim, the progress event and its notification in one call (see
# migrations/postgresql/0002_progress_function.sql); $6 true: commit without waiting for the disk.
_PROGRESS = (
    "SELECT o_event_id, o_seen, o_session, o_provider, o_phone, o_user_ref, o_claim"
    " FROM gateway_progress($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
)
_FINISH = (
    "WITH up AS (UPDATE sessions SET status = $2, reason = $3, outcome = $4, completed_at = $5, updated_at = $5"
    " WHERE id = $1),"
    " ev AS (INSERT INTO session_events (session_id, kind, data, created_at)"
    " VALUES ($1, 'outcome', $4, $5) RETURNING id)"
    " SELECT ev.id, pg_notify('gateway_events', $1::text || ':' || ev.id || ':' || $6::text) FROM ev"
)
_FINISH_WITH_WEBHOOK = (
    "WITH up AS (UPDATE sessions SET status = $2, reason = $3, outcome = $4, completed_at = $5, updated_at = $5"
    " WHERE id = $1),"
    " ev AS (INSERT INTO session_events (session_id, kind, data, created_at)"
    " VALUES ($1, 'outcome', $4, $5) RETURNING id),"
    " wh AS (INSERT INTO webhook_outbox (id, session_id, type, payload, enqueued_at, next_attempt_at)"
    " VALUES ($6, $1, $7, $8, $5, $5))"
    " SELECT ev.id, pg_notify('gateway_events', $1::text || ':' || ev.id || ':' || $9::text) FROM ev"
)
# The outcome in one statement (one round trip, no BEGIN/COMMIT), for a session whose provider
# and user_ref this process has read (they never change while it is pending). `lk` takes the
# row lock first, as every other write does, so the token release cannot lock in the other
# order; the UPDATE re-checks `pending` on the row as committed by whoever held the lock.
_FINISH_ONE = (
    "WITH lk AS (SELECT id FROM sessions WHERE id = $1 FOR UPDATE),"
    " rel AS (DELETE FROM truecaller_callbacks WHERE $7::boolean AND session_id = (SELECT id FROM lk)),"
    " up AS (UPDATE sessions SET status = $2, reason = $3, outcome = $4, completed_at = $5, updated_at = $5"
    " WHERE id = (SELECT id FROM lk) AND status = 'pending' RETURNING id),"
    " ev AS (INSERT INTO session_events (session_id, kind, data, created_at)"
    " SELECT $1, 'outcome', $4, $5 FROM up RETURNING id)"
    " SELECT ev.id, pg_notify('gateway_events', $1::text || ':' || ev.id || ':' || $6::text) FROM ev"
)
_FINISH_ONE_WITH_WEBHOOK = _FINISH_ONE.replace(
    " SELECT ev.id,",
    ", wh AS (INSERT INTO webhook_outbox (id, session_id, type, payload, enqueued_at, next_attempt_at)"
    " SELECT $8, $1, $9, $10, $5, $5 FROM up) SELECT ev.id,",
)
_KNOWN = 4096  # sessions whose provider and user_ref this process remembers
_SELECT_SESSION = (
    "SELECT id, provider, status, reason, provider_ref, phone, user_ref, provider_data, outcome,"
    " created_at, updated_at, expires_at, completed_at FROM sessions"
)


def _progressed(row: asyncpg.Record) -> Progressed:
    """A `gateway_progress` row as `Progressed`."""
    claimed: ClaimResult | None = row["o_claim"]
    if row["o_event_id"] is None:
        return Progressed(None, claimed)
    return Progressed(row["o_event_id"], claimed, first=not row["o_seen"], provider=row["o_provider"])


async def _migrate(conn: Conn) -> list[str]:
    # A session lock, held across the per-migration transactions: processes starting together
    # wait here, and the later ones find everything applied.
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        applied: list[str] = []
        for version, name, sql in migration_files("postgresql"):
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)  # no arguments: the simple protocol runs the whole script
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            applied.append(name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)


async def apply_migrations(dsn: str) -> list[str]:
    """Apply pending migrations, each in its own transaction, one process at a time; the names applied."""
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except _ERRORS as exc:
        raise StorageError(f"cannot connect to the database: {exc}") from exc
    try:
        return await _migrate(conn)
    except _ERRORS as exc:
        raise StorageError(f"migration failed: {exc}") from exc
    finally:
        with contextlib.suppress(*_ERRORS):
            await conn.close(timeout=5)


async def _warm(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Each new pool connection: prepare the claim's statement and compile `gateway_progress`.

    The first call on a connection costs about 2 ms more (PL/pgSQL compiles the function per
    connection): paid here, not by a user's callback. The provider '' names no session (the
    schema allows two), so the call finds none and writes nothing.
    """
    await conn.fetchrow(_PROGRESS, None, "{}", 0.0, None, "", False, "", "", "", 0.0, 0.0, 0.0, None, "", "")


async def _no_reset(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """The pool's `reset`, run as a connection goes back to it: nothing to send.

    Before calling it asyncpg rolls back a transaction left open and drops the connection's
    listeners. Its default reset would then send `SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL;`: one more round trip, and four statements for the server, after
    every read and every write, ten per verification. A pool connection here never holds what
    that clears: no SET, no advisory lock (migrations take theirs on a connection of their
    own), no LISTEN (the event feed has its own connection), no open cursor.
    """


def _count(status: str) -> int:
    """Rows touched, from a command tag such as "UPDATE 3" or "INSERT 0 1"."""
    return int(status.rsplit(" ", 1)[-1])


class PgStore:
    """`Store` on PostgreSQL: an asyncpg pool for queries, one more connection for the event feed."""

    shared = True  # any number of gateway processes may use one database

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        on_write_seconds: Callable[[float], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.pool: asyncpg.Pool[asyncpg.Record] | None = None
        # Told the seconds from each write's start to its commit.
        self.on_write_seconds = on_write_seconds
        self._writes: set[asyncio.Task[Any]] = set()
        self._token_sweep = 0.0  # when old token hashes are next deleted (at most once a second)
        self._on_event: Callable[[str, int], None] | None = None
        self._on_reset: Callable[[], None] | None = None
        self._listener: asyncpg.Connection[asyncpg.Record] | None = None
        self._listening = False
        self._watching: asyncio.Task[None] | None = None
        self._closing = False
        # Tags this process's notifications: it publishes its own events itself, right after
        # the commit, so its feed skips them (no read, no duplicate).
        self._origin = secrets.token_hex(6)
        # provider and user_ref of sessions read lately: what an outcome's body needs
        self._known: OrderedDict[str, tuple[str, str | None]] = OrderedDict()

    async def open(self) -> None:
        self._closing = False
        # On a connection of its own: a migration (or the wait for another process's) may
        # take longer than the pool's COMMAND_TIMEOUT.
        await apply_migrations(self.dsn)
        try:
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                command_timeout=COMMAND_TIMEOUT,
                reset=_no_reset,
                init=_warm,
            )
        except _ERRORS as exc:
            raise StorageError(f"cannot connect to the database: {exc}") from exc
        try:
            if self._on_event is not None:
                # Listening before open() returns: no event committed after it goes unheard.
                self._listener = await self._listen()
                self._watching = asyncio.create_task(self._keep_watching(), name="gateway-db-watch")
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, _ERRORS):
                raise StorageError(f"cannot open the database: {exc}") from exc
            raise
        self.pool = pool

    async def close(self) -> None:
        self._closing = True
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
            self._watching = None
        if self._listener is not None:
            self._listener.terminate()
            self._listener = None
            self._listening = False
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        pool, self.pool = self.pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except _ERRORS:  # the server is gone, or a connection would not close in time
                pool.terminate()
            except asyncio.CancelledError:
                pool.terminate()
                raise

    # -- the event feed ------------------------------------------------------------------
    def watch(self, on_event: Callable[[str, int], None], on_reset: Callable[[], None]) -> None:
        self._on_event, self._on_reset = on_event, on_reset

    def listener_ok(self) -> bool | None:
        return None if self._on_event is None else self._listening

    async def _listen(self) -> asyncpg.Connection[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn, timeout=5)
        try:
            await conn.add_listener(CHANNEL, self._notified)
        except BaseException:
            conn.terminate()
            raise
        self._listening = True
        return conn

    def _notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        session_id, _, rest = str(payload).partition(":")
        event_id, _, origin = rest.partition(":")
        if origin == self._origin:
            return  # this process's own event: already published at its commit
        if not session_id or not event_id.isdigit() or self._on_event is None:
            log.warning("ignored a malformed %s notification", CHANNEL)
            return
        try:
            self._on_event(session_id, int(event_id))
        except Exception:
            log.exception("the event feed's on_event failed")

    async def _keep_watching(self) -> None:
        """Wait for the feed's connection to fail, then reconnect with backoff and tell `on_reset`."""
        while True:
            conn = self._listener
            assert conn is not None
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
            if conn.is_closed():
                lost.set()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), PROBE_INTERVAL)
                    break
                try:
                    await conn.fetchval("SELECT 1", timeout=PROBE_TIMEOUT)
                except _ERRORS:
                    break
            self._listening = False
            conn.terminate()
            if self._closing:
                return
            log.warning("lost the database's event feed; reconnecting")
            delay = RECONNECT_FIRST
            while True:
                await asyncio.sleep(delay)
                try:
                    self._listener = await self._listen()
                    break
                except _ERRORS:
                    delay = min(delay * 2, RECONNECT_MAX)
            log.info("the database's event feed is back; streams catch up from the database")
            if self._on_reset is not None:
                try:
                    self._on_reset()
                except Exception:
                    log.exception("the event feed's on_reset failed")

    # -- plumbing ------------------------------------------------------------------------
    def _pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self.pool is None:
            raise StorageError("database is closed")
        return self.pool

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            return await self._pool().fetch(sql, *args)
        except _ERRORS as exc:
            raise StorageError(f"database read failed: {exc}") from exc

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        try:
            return await self._pool().fetchrow(sql, *args)
        except _ERRORS as exc:
            raise StorageError(f"database read failed: {exc}") from exc

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        try:
            return await self._pool().fetchval(sql, *args)
        except _ERRORS as exc:
            raise StorageError(f"database read failed: {exc}") from exc

    async def _write(self, fn: Tx[T], *, transaction: bool = True) -> T:
        """Run `fn` in a transaction (or, for one statement, without); returns once committed.

        Cancelling the caller does not cancel the write: it commits regardless.
        """
        pool = self._pool()
        task = asyncio.ensure_future(self._run(pool, fn, transaction))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return await asyncio.shield(task)

    async def _run(self, pool: asyncpg.Pool[asyncpg.Record], fn: Tx[T], transaction: bool) -> T:
        started = time.perf_counter()
        for attempt in range(1, _RETRIES + 1):
            try:
                async with pool.acquire() as conn:
                    if transaction:
                        async with conn.transaction():
                            value = await fn(conn)
                    else:
                        value = await fn(conn)
                break
            except asyncpg.TransactionRollbackError as exc:  # a deadlock's victim: nothing was written
                if attempt == _RETRIES:
                    raise StorageError(f"database write failed: {exc}") from exc
            except _ERRORS as exc:
                raise StorageError(f"database write failed: {exc}") from exc
        if self.on_write_seconds is not None:
            try:
                self.on_write_seconds(time.perf_counter() - started)
            except Exception:
                log.exception("on_write_seconds hook failed")
        return value

    async def ping(self) -> None:
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                await self._pool().fetchval("SELECT 1")
        except TimeoutError as exc:
            raise StorageError(f"the database did not answer within {PING_TIMEOUT:g} s") from exc
        except _ERRORS as exc:
            raise StorageError(f"database read failed: {exc}") from exc

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

        async def insert(conn: Conn) -> bool:
            if ticket is not None:
                # First, in the same transaction: of two starts with one ticket exactly one stores.
                used = await conn.execute(
                    "INSERT INTO start_tickets_used (ticket_hash, expires_at) VALUES ($1, $2)"
                    " ON CONFLICT (ticket_hash) DO NOTHING",
                    ticket.hash,
                    ticket.expires_at,
                )
                if _count(used) != 1:
                    return False
            await conn.execute(_INSERT_SESSION, *row)
            if idempotency is not None:
                # A key whose session's ttl has passed may be used again: its old row goes first.
                await conn.execute(
                    "DELETE FROM idempotency_keys WHERE key_hash = $1 AND expires_at <= $2",
                    idempotency.key_hash,
                    session.created_at,
                )
                taken = await conn.execute(
                    "INSERT INTO idempotency_keys (key_hash, body_hash, session_id, answer, expires_at)"
                    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key_hash) DO NOTHING",
                    idempotency.key_hash,
                    idempotency.body_hash,
                    session.id,
                    dumps(idempotency.answer),
                    idempotency.expires_at,
                )
                if _count(taken) != 1:
                    raise IdempotencyKeyTaken  # rolls the transaction back: the session too
            return True

        created = await self._write(insert, transaction=idempotency is not None or ticket is not None)
        if created:
            self._remember(session)
        return created

    async def ticket_used(self, ticket_hash: str) -> bool:
        return await self._fetchrow("SELECT 1 FROM start_tickets_used WHERE ticket_hash = $1", ticket_hash) is not None

    async def prune_tickets(self, now: float) -> int:
        return await self._delete_in_batches(
            "DELETE FROM start_tickets_used WHERE ticket_hash IN (SELECT ticket_hash FROM start_tickets_used"
            " WHERE expires_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            now,
        )

    async def database_bytes(self) -> int:
        return int(await self._fetchval("SELECT pg_database_size(current_database())"))

    async def idempotent(self, key_hash: str, now: float) -> Idempotency | None:
        row = await self._fetchrow(
            "SELECT body_hash, answer, expires_at FROM idempotency_keys WHERE key_hash = $1 AND expires_at > $2",
            key_hash,
            now,
        )
        return Idempotency(key_hash, row[0], json.loads(row[1]), row[2]) if row else None

    async def prune_idempotency(self, now: float) -> int:
        return await self._delete_in_batches(
            "DELETE FROM idempotency_keys WHERE key_hash IN (SELECT key_hash FROM idempotency_keys"
            " WHERE expires_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            now,
        )

    async def _delete_in_batches(self, sql: str, now: float) -> int:
        """`sql` ($1 now, $2 batch) again until a batch comes back short: short transactions, no long lock."""
        total = 0
        while True:

            async def delete(conn: Conn) -> int:
                return _count(await conn.execute(sql, now, BATCH))

            done = await self._write(delete, transaction=False)
            total += done
            if done < BATCH:
                return total

    def _remember(self, session: Session) -> Session:
        if session.status == "pending":
            self._remember_pending(session.id, session.provider, session.user_ref)
        return session

    def _remember_pending(self, session_id: str, provider: str, user_ref: str | None) -> None:
        known = self._known
        known[session_id] = (provider, user_ref)
        known.move_to_end(session_id)
        if len(known) > _KNOWN:
            known.popitem(last=False)

    async def get(self, session_id: str) -> Session | None:
        row = await self._fetchrow(_SELECT_SESSION + " WHERE id = $1", session_id)
        return self._remember(session_from_row(row)) if row else None

    async def get_by_ref(self, provider: str, provider_ref: str) -> Session | None:
        row = await self._fetchrow(
            _SELECT_SESSION + " WHERE provider_ref = $1 AND provider = $2",
            provider_ref,
            provider,
        )
        return self._remember(session_from_row(row)) if row else None

    async def get_with_events(self, session_id: str, after_id: int) -> tuple[Session | None, list[StoredEvent]]:
        rows = await self._fetch(
            "SELECT s.id, s.provider, s.status, s.reason, s.provider_ref, s.phone, s.user_ref, s.provider_data,"
            " s.outcome, s.created_at, s.updated_at, s.expires_at, s.completed_at,"
            " e.id AS ev_id, e.kind AS ev_kind, e.data AS ev_data FROM sessions s"
            " LEFT JOIN session_events e ON e.session_id = s.id AND e.id > $1 WHERE s.id = $2 ORDER BY e.id",
            after_id,
            session_id,
        )
        if not rows:
            return None, []
        events = [
            StoredEvent(r["ev_id"], r["ev_kind"], json.loads(r["ev_data"])) for r in rows if r["ev_id"] is not None
        ]
        return self._remember(session_from_row(rows[0])), events

    async def outcome_event(self, session_id: str) -> StoredEvent | None:
        row = await self._fetchrow(
            "SELECT id, kind, data FROM session_events WHERE session_id = $1 AND kind = 'outcome'", session_id
        )
        return StoredEvent(row["id"], row["kind"], json.loads(row["data"])) if row else None

    async def event(self, session_id: str, event_id: int) -> StoredEvent | None:
        row = await self._fetchrow(
            "SELECT id, kind, data FROM session_events WHERE id = $1 AND session_id = $2", event_id, session_id
        )
        return StoredEvent(row["id"], row["kind"], json.loads(row["data"])) if row else None

    async def update_provider_data(
        self, session_id: str, changes: dict[str, Any], *, now: float, expires_at: float | None
    ) -> bool:
        async def update(conn: Conn) -> bool:
            row = await conn.fetchrow(
                "SELECT provider_data FROM sessions WHERE id = $1 AND status = 'pending' FOR UPDATE", session_id
            )
            if row is None:
                return False
            merged = {**(json.loads(row[0]) if row[0] else {}), **changes}
            await conn.execute(
                "UPDATE sessions SET provider_data = $1, updated_at = $2, expires_at = COALESCE($3, expires_at)"
                " WHERE id = $4",
                json.dumps(merged, separators=(",", ":")),
                now,
                expires_at,
                session_id,
            )
            return True

        return await self._write(update)

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
        encoded = dumps(data)

        async def insert(conn: Conn) -> Progressed:
            return await self._progress(conn, session_id, encoded, now, expires_at, claim, durable)

        return await self._write(insert, transaction=False)  # one statement: its own transaction

    async def flush(self) -> None:
        # A transaction with an id commits a record, and a synchronous commit returns only once
        # the WAL is on disk up to it: every earlier commit of this server included.
        await self._fetchval("SELECT txid_current()")

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
        known = self._known.pop(session_id, None)
        if known is not None and not unless_claimed:
            # (unless_claimed needs its own statement after the lock: a subquery of this one
            # would not see a token committed while it waited for the row.)
            return await self._finish_one(session_id, outcome, now, release_claim, webhook, known)

        async def update(conn: Conn) -> Finished | None:
            return await self._finish(conn, session_id, outcome, now, release_claim, webhook, unless_claimed)

        return await self._write(update)

    async def _finish_one(
        self,
        session_id: str,
        outcome: Outcome,
        now: float,
        release_claim: bool,
        webhook: WebhookEvent | None,
        known: tuple[str, str | None],
    ) -> Finished | None:
        body = outcome.to_json(provider=known[0], user_ref=known[1], completed_at=now)
        args: tuple[Any, ...] = (
            session_id, outcome.status, outcome.reason, dumps(body), now, self._origin, release_claim
        )  # fmt: skip
        if webhook is None:
            sql = _FINISH_ONE
        else:
            sql, args = _FINISH_ONE_WITH_WEBHOOK, (*args, *webhook(session_id, body, now))

        async def update(conn: Conn) -> Finished | None:
            event_id = await conn.fetchval(sql, *args)
            return None if event_id is None else Finished(int(event_id), body)

        return await self._write(update, transaction=False)

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
        encoded = dumps(data)

        async def both(conn: Conn) -> tuple[Progressed, Finished | None]:
            progressed = await self._progress(conn, session_id, encoded, now, None, claim)
            if progressed.event_id is None:
                return progressed, None
            return progressed, await self._finish(conn, session_id, outcome, now, release_claim, webhook, False)

        return await self._write(both)

    async def _progress(
        self,
        conn: Conn,
        session_id: str,
        encoded: str,
        now: float,
        expires_at: float | None,
        claim: TokenClaim | None,
        durable: bool = True,
    ) -> Progressed:
        """The lock, the claim (if any) and the event: one call of `gateway_progress` (migration 0002)."""
        row = await conn.fetchrow(_PROGRESS, *self._progress_args(session_id, encoded, now, expires_at, claim, durable))
        assert row is not None
        return _progressed(row)

    def _progress_args(
        self,
        session_id: str | None,
        encoded: str,
        now: float,
        expires_at: float | None,
        claim: TokenClaim | None,
        durable: bool,
        ref: tuple[str, str] | None = None,
    ) -> tuple[Any, ...]:
        """`gateway_progress`'s arguments; the session by id, or (`session_id` None) by `ref`."""
        if claim is None:
            token: tuple[Any, ...] = (None,) * 7
        else:
            token = (
                claim.token_hash,
                claim.endpoint,
                claim.access_token,
                claim.received_at,
                claim.token_expires_at,
                claim.lease,
                self._forget_before(claim.received_at),
            )
        return (session_id, encoded, now, expires_at, self._origin, not durable, *token, *(ref or (None, None)))

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
        args = self._progress_args(None, dumps(data), now, expires_at, claim, durable, (provider, provider_ref))

        async def call(conn: Conn) -> asyncpg.Record | None:
            return await conn.fetchrow(_PROGRESS, *args)

        row = await self._write(call, transaction=False)  # one statement: its own transaction
        assert row is not None
        sid = row["o_session"]
        if sid is not None:  # found pending, with its provider
            self._remember_pending(sid, row["o_provider"], row["o_user_ref"])
        return RefProgressed(sid, row["o_phone"], row["o_user_ref"], _progressed(row))

    async def _finish(
        self,
        conn: Conn,
        session_id: str,
        outcome: Outcome,
        now: float,
        release_claim: bool,
        webhook: WebhookEvent | None,
        unless_claimed: bool,
    ) -> Finished | None:
        row = await conn.fetchrow(_LOCK_PENDING, session_id)
        if release_claim:  # the fetch is over, whatever its outcome and whoever wins
            await conn.execute("DELETE FROM truecaller_callbacks WHERE session_id = $1", session_id)
        if row is None:
            return None
        if unless_claimed and await conn.fetchrow(
            "SELECT 1 FROM truecaller_callbacks WHERE session_id = $1", session_id
        ):
            return None  # a stored token's fetch decides this session
        body = outcome.to_json(provider=row["provider"], user_ref=row["user_ref"], completed_at=now)
        encoded = dumps(body)
        args: tuple[Any, ...] = (session_id, outcome.status, outcome.reason, encoded, now)
        if webhook is None:
            event_id = await conn.fetchval(_FINISH, *args, self._origin)
        else:
            msg_id, kind, payload = webhook(session_id, body, now)
            event_id = await conn.fetchval(_FINISH_WITH_WEBHOOK, *args, msg_id, kind, payload, self._origin)
        return Finished(int(event_id), body)

    async def conversion(self, since: float) -> list[tuple[str, str, str | None, int, int]]:
        rows = await self._fetch(
            "SELECT s.provider, s.status, s.reason, COUNT(*),"
            " COUNT(*) FILTER (WHERE EXISTS (SELECT 1 FROM session_events e"
            " WHERE e.session_id = s.id AND e.kind = 'progress'))"
            " FROM sessions s WHERE s.created_at >= $1 GROUP BY s.provider, s.status, s.reason"
            # SQLite's order: bytewise, a NULL reason first
            ' ORDER BY s.provider COLLATE "C", s.status COLLATE "C", s.reason COLLATE "C" NULLS FIRST',
            since,
        )
        return [(r[0], r[1], r[2], int(r[3]), int(r[4])) for r in rows]

    async def due_for_expiry(self, now: float, limit: int) -> list[str]:
        rows = await self._fetch(
            "SELECT id FROM sessions WHERE status = 'pending' AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
            now,
            limit,
        )
        return [row["id"] for row in rows]

    async def next_deadline(self) -> float | None:
        value = await self._fetchval("SELECT MIN(expires_at) FROM sessions WHERE status = 'pending'")
        return None if value is None else float(value)

    async def count_pending(self) -> int:
        return int(await self._fetchval("SELECT COUNT(*) FROM sessions WHERE status = 'pending'"))

    async def purge_personal_data(self, *, cutoff: float, now: float, limit: int) -> int:
        async def purge(conn: Conn) -> int:
            # SKIP LOCKED: another process purging at the same moment takes other rows.
            rows = await conn.fetch(
                "SELECT id, outcome FROM sessions WHERE completed_at IS NOT NULL AND completed_at <= $1"
                " AND purged_at IS NULL ORDER BY completed_at LIMIT $2 FOR UPDATE SKIP LOCKED",
                cutoff,
                limit,
            )
            if not rows:
                return 0
            await conn.executemany(
                "UPDATE sessions SET phone = NULL, user_ref = NULL, provider_data = NULL, outcome = $1,"
                " purged_at = $2 WHERE id = $3",
                [(scrub_outcome(r["outcome"]), now, r["id"]) for r in rows],
            )
            events = await conn.fetch(
                "SELECT id, data FROM session_events WHERE session_id = ANY($1::text[]) AND kind = 'outcome'",
                [r["id"] for r in rows],
            )
            if events:
                await conn.executemany(
                    "UPDATE session_events SET data = $1 WHERE id = $2",
                    [(scrub_outcome(e["data"]), e["id"]) for e in events],
                )
            return len(rows)

        return await self._write(purge)

    async def delete_finished(self, *, cutoff: float, limit: int) -> int:
        async def delete(conn: Conn) -> int:
            # Events, idempotency keys and finished webhooks go with their session (ON DELETE CASCADE).
            return _count(
                await conn.execute(
                    "DELETE FROM sessions WHERE id IN (SELECT s.id FROM sessions s"
                    " WHERE s.purged_at IS NOT NULL AND s.completed_at <= $1 AND NOT EXISTS"
                    " (SELECT 1 FROM webhook_outbox w WHERE w.session_id = s.id AND w.status = 'pending')"
                    " ORDER BY s.completed_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
                    cutoff,
                    limit,
                )
            )

        return await self._write(delete, transaction=False)

    # -- Truecaller token claims ---------------------------------------------------------
    async def token_owner(self, token_hash: str) -> str | None:
        value = await self._fetchval("SELECT session_id FROM truecaller_tokens_used WHERE token_hash = $1", token_hash)
        return None if value is None else str(value)

    async def has_claim(self, session_id: str) -> bool:
        return await self._fetchrow("SELECT 1 FROM truecaller_callbacks WHERE session_id = $1", session_id) is not None

    async def pending_claims(self, now: float, lease: float = CLAIM_LEASE) -> list[PendingClaim]:
        async def take(conn: Conn) -> list[asyncpg.Record]:
            await conn.execute(
                "DELETE FROM truecaller_callbacks c USING sessions s"
                " WHERE s.id = c.session_id AND s.status <> 'pending'"
            )
            # SKIP LOCKED, and the lease re-checked on a row another process just took: each
            # claim goes to exactly one of the processes asking at once.
            return await conn.fetch(
                "UPDATE truecaller_callbacks c SET lease_until = $2 FROM sessions s"
                " WHERE s.id = c.session_id AND c.session_id IN (SELECT t.session_id FROM truecaller_callbacks t"
                " JOIN sessions p ON p.id = t.session_id WHERE t.lease_until <= $1 AND p.status = 'pending'"
                " FOR UPDATE OF t SKIP LOCKED)"
                " RETURNING c.session_id, c.endpoint, c.access_token, c.token_expires_at, s.phone",
                now,
                now + lease,
            )

        rows = await self._write(take)
        return [
            PendingClaim(r["session_id"], r["phone"], r["endpoint"], r["access_token"], r["token_expires_at"])
            for r in rows
        ]

    def _forget_before(self, received: float) -> float | None:
        """Old token hashes are forgotten at most once a second: the cutoff when it is time, else None."""
        if self._token_sweep - 1.0 <= received < self._token_sweep:
            return None
        self._token_sweep = received + 1.0
        return received - TOKEN_MEMORY

    # -- the webhook outbox --------------------------------------------------------------
    async def outbox_due(self, now: float, limit: int) -> list[OutboxItem]:
        async def take(conn: Conn) -> list[asyncpg.Record]:
            # Leased, not just read: no other process sends these until the lease ends or the
            # attempt's result (`outbox_record`) sets the real next attempt.
            return await conn.fetch(
                "WITH due AS (SELECT id, next_attempt_at FROM webhook_outbox"
                " WHERE status = 'pending' AND next_attempt_at <= $1 ORDER BY next_attempt_at LIMIT $2"
                " FOR UPDATE SKIP LOCKED),"
                " taken AS (UPDATE webhook_outbox o SET next_attempt_at = $3 FROM due WHERE o.id = due.id"
                " RETURNING o.id, o.session_id, o.type, o.payload, o.attempts, o.enqueued_at, due.next_attempt_at)"
                " SELECT id, session_id, type, payload, attempts, enqueued_at FROM taken ORDER BY next_attempt_at",
                now,
                limit,
                now + OUTBOX_LEASE,
            )

        rows = await self._write(take, transaction=False)
        return [OutboxItem(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    async def outbox_next_due(self) -> float | None:
        value = await self._fetchval("SELECT MIN(next_attempt_at) FROM webhook_outbox WHERE status = 'pending'")
        return None if value is None else float(value)

    async def outbox_oldest_pending(self) -> float | None:
        value = await self._fetchval("SELECT MIN(enqueued_at) FROM webhook_outbox WHERE status = 'pending'")
        return None if value is None else float(value)

    async def outbox_record(self, results: list[OutboxResult]) -> None:
        values = [
            (r.status, r.attempts, r.next_attempt_at, r.finished_at, r.last_status, r.last_error, r.id) for r in results
        ]

        async def record(conn: Conn) -> None:
            await conn.executemany(
                "UPDATE webhook_outbox SET status = $1, attempts = $2, next_attempt_at = $3, finished_at = $4,"
                " last_status = $5, last_error = $6 WHERE id = $7 AND status = 'pending'",
                values,
            )

        if values:
            await self._write(record)

    async def outbox_list(self, *, failed_only: bool, limit: int) -> list[OutboxEntry]:
        rows = await self._fetch(
            "SELECT id, type, status, attempts, enqueued_at, next_attempt_at, finished_at, last_status, last_error"
            " FROM webhook_outbox WHERE status = 'failed' OR NOT $1::boolean ORDER BY enqueued_at DESC LIMIT $2",
            failed_only,
            limit,
        )
        return [OutboxEntry(*tuple(r)) for r in rows]

    async def outbox_retry(self, webhook_id: str | None, *, now: float) -> int:
        sql = (
            "UPDATE webhook_outbox SET status = 'pending', attempts = 0, enqueued_at = $1, next_attempt_at = $1,"
            " finished_at = NULL WHERE status = 'failed'"
        )

        async def retry(conn: Conn) -> int:
            if webhook_id is None:
                return _count(await conn.execute(sql, now))
            return _count(await conn.execute(sql + " AND id = $2", now, webhook_id))

        return await self._write(retry, transaction=False)

    async def outbox_prune(self, *, cutoff: float, limit: int) -> int:
        async def prune(conn: Conn) -> int:
            return _count(
                await conn.execute(
                    "DELETE FROM webhook_outbox WHERE id IN (SELECT id FROM webhook_outbox"
                    " WHERE status != 'pending' AND finished_at <= $1 ORDER BY finished_at LIMIT $2"
                    " FOR UPDATE SKIP LOCKED)",
                    cutoff,
                    limit,
                )
            )

        return await self._write(prune, transaction=False)
