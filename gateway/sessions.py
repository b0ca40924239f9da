"""Sessions and their state machine: pending → verified | rejected | failed | expired.

Every transition goes through `Sessions.finish`, one conditional UPDATE (`WHERE status =
'pending'`), so however many writers race, exactly one outcome is stored and published.
Events are published only after their transaction committed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway import sse
from gateway.broker import Broker, Event
from gateway.outcome import EXPIRED, PENDING, Outcome, rfc3339
from gateway.storage import Database

log = logging.getLogger("gateway.sessions")

PROVIDERS = ("truecaller", "veriphone")


def new_session_id() -> str:
    """192 bits from the OS CSPRNG, URL-safe."""
    return secrets.token_urlsafe(24)


def public_ref(session_id: str) -> str:
    """A stable, non-reversible tag for a session: safe for logs and for provider metadata."""
    return hashlib.sha256(b"gateway-session\x00" + session_id.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    provider: str
    status: str
    reason: str | None
    provider_ref: str | None
    phone: str | None
    user_ref: str | None
    provider_data: dict[str, Any]
    outcome: dict[str, Any] | None
    created_at: float
    updated_at: float
    expires_at: float
    completed_at: float | None

    @property
    def terminal(self) -> bool:
        return self.status != PENDING

    def snapshot(self) -> dict[str, Any]:
        """The public JSON of `GET /v1/sessions/{id}` and of the `status` event."""
        return {
            "id": self.id,
            "provider": self.provider,
            "status": self.status,
            "expires_at": rfc3339(self.expires_at),
            "updated_at": rfc3339(self.updated_at),
            "outcome": self.outcome,
        }

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Session:
        return cls(
            id=row["id"],
            provider=row["provider"],
            status=row["status"],
            reason=row["reason"],
            provider_ref=row["provider_ref"],
            phone=row["phone"],
            user_ref=row["user_ref"],
            provider_data=json.loads(row["provider_data"]) if row["provider_data"] else {},
            outcome=json.loads(row["outcome"]) if row["outcome"] else None,
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            expires_at=row["expires_at"],
            completed_at=row["completed_at"],
        )


def _event(row_id: int, kind: str, data: dict[str, Any]) -> Event:
    return Event(id=row_id, kind=kind, frame=sse.event(kind, data, id=str(row_id)), data=data)


class Sessions:
    """The only code that writes sessions and their events."""

    def __init__(self, db: Database, broker: Broker, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.broker = broker
        self.clock = clock
        # Set when a session with an earlier deadline than the expiry task knows appears.
        self.expiry_wakeup = asyncio.Event()
        self._next_expiry_pass = 0.0
        # Told (provider, status, reason) of every stored outcome, e.g. for metrics.
        self.on_outcome: Callable[[str, str, str | None], None] | None = None

    async def create(
        self,
        *,
        session_id: str,
        provider: str,
        ttl: float,
        phone: str | None = None,
        user_ref: str | None = None,
        provider_ref: str | None = None,
        provider_data: dict[str, Any] | None = None,
    ) -> Session:
        now = self.clock()
        session = Session(
            id=session_id,
            provider=provider,
            status=PENDING,
            reason=None,
            provider_ref=provider_ref,
            phone=phone,
            user_ref=user_ref,
            provider_data=provider_data or {},
            outcome=None,
            created_at=now,
            updated_at=now,
            expires_at=now + ttl,
            completed_at=None,
        )
        data = json.dumps(session.provider_data, separators=(",", ":"))

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO sessions (id, provider, status, provider_ref, phone, user_ref, provider_data,"
                " created_at, updated_at, expires_at) VALUES (?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?)",
                (session_id, provider, provider_ref, phone, user_ref, data, now, now, session.expires_at),
            )

        await self.db.write(insert)
        if session.expires_at < self._next_expiry_pass:
            self.expiry_wakeup.set()
        return session

    async def get(self, session_id: str) -> Session | None:
        rows = self.db.lookup("SELECT * FROM sessions WHERE id = ?", (session_id,))
        return Session.from_row(rows[0]) if rows else None

    async def get_by_ref(self, provider: str, provider_ref: str) -> Session | None:
        rows = self.db.lookup(
            "SELECT * FROM sessions WHERE provider_ref = ? AND provider = ?", (provider_ref, provider)
        )
        return Session.from_row(rows[0]) if rows else None

    async def get_with_events(self, session_id: str, after_id: int) -> tuple[Session | None, list[Event]]:
        """The session and its events after `after_id`, in one query (a stream opens with this)."""
        # A session has a handful of events at most: a bounded point read.
        rows = self.db.lookup(
            "SELECT s.*, e.id AS ev_id, e.kind AS ev_kind, e.data AS ev_data FROM sessions s"
            " LEFT JOIN session_events e ON e.session_id = s.id AND e.id > ? WHERE s.id = ? ORDER BY e.id",
            (after_id, session_id),
        )
        if not rows:
            return None, []
        events = [_event(r["ev_id"], r["ev_kind"], json.loads(r["ev_data"])) for r in rows if r["ev_id"] is not None]
        return Session.from_row(rows[0]), events

    async def outcome_event(self, session_id: str) -> Event | None:
        row = await self.db.fetchone(
            "SELECT id, kind, data FROM session_events WHERE session_id = ? AND kind = 'outcome'", (session_id,)
        )
        return _event(row["id"], row["kind"], json.loads(row["data"])) if row else None

    async def update_provider_data(
        self, session_id: str, changes: dict[str, Any], *, expires_at: float | None = None
    ) -> bool:
        """Merge `changes` into a pending session's provider data (and move its deadline)."""

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
                (json.dumps(merged, separators=(",", ":")), self.clock(), expires_at, session_id),
            )
            return True

        return await self.db.write(update)

    async def progress(
        self,
        session_id: str,
        stage: str,
        *,
        before: Callable[[sqlite3.Connection], bool] | None = None,
        expires_at: float | None = None,
    ) -> bool:
        """Record and publish a progress stage; ignored (False) once the session is terminal.

        `before` runs first in the same transaction; returning False skips the event (one
        durable commit instead of two on a hot path). `expires_at` moves the deadline with it.
        """
        return await asyncio.shield(self._progress(session_id, stage, before, expires_at))

    async def _progress(
        self,
        session_id: str,
        stage: str,
        before: Callable[[sqlite3.Connection], bool] | None,
        expires_at: float | None,
    ) -> bool:
        insert, data = self._progress_write(session_id, stage, before, expires_at)
        row_id = await self.db.write(insert)
        if row_id is None:
            return False
        self.broker.publish(session_id, _event(row_id, "progress", data))
        return True

    def _progress_write(
        self,
        session_id: str,
        stage: str,
        before: Callable[[sqlite3.Connection], bool] | None,
        expires_at: float | None,
    ) -> tuple[Callable[[sqlite3.Connection], int | None], dict[str, Any]]:
        data = {"stage": stage}
        encoded = json.dumps(data, separators=(",", ":"))
        now = self.clock()

        def insert(conn: sqlite3.Connection) -> int | None:
            if before is not None and not before(conn):
                return None
            cur = conn.execute(
                "INSERT INTO session_events (session_id, kind, data, created_at)"
                " SELECT id, 'progress', ?, ? FROM sessions WHERE id = ? AND status = 'pending'",
                (encoded, now, session_id),
            )
            if cur.rowcount != 1:
                return None
            conn.execute(
                "UPDATE sessions SET updated_at = ?, expires_at = COALESCE(?, expires_at) WHERE id = ?",
                (now, expires_at, session_id),
            )
            return cur.lastrowid

        return insert, data

    async def finish(
        self, session_id: str, outcome: Outcome, *, also: Callable[[sqlite3.Connection], None] | None = None
    ) -> bool:
        """Move a pending session to its terminal outcome; False if another writer got there first.

        Runs to completion (write and publish) even if the caller is cancelled.
        """
        return await asyncio.shield(self._finish(session_id, outcome, also))

    async def _finish(
        self, session_id: str, outcome: Outcome, also: Callable[[sqlite3.Connection], None] | None
    ) -> bool:
        result = await self.db.write(self._finish_write(session_id, outcome, also))
        return self._finished(session_id, outcome, result)

    async def progress_and_finish(
        self,
        session_id: str,
        stage: str,
        outcome: Outcome,
        *,
        before: Callable[[sqlite3.Connection], bool] | None = None,
        also: Callable[[sqlite3.Connection], None] | None = None,
    ) -> bool:
        """`progress` and then `finish` in one durable commit; nothing (False) if `before` says no.

        The events are the same two as with two commits, published in the same order, so a
        stream cannot tell; it saves one fsync when the outcome is known soon enough.
        """
        return await asyncio.shield(self._progress_and_finish(session_id, stage, outcome, before, also))

    async def _progress_and_finish(
        self,
        session_id: str,
        stage: str,
        outcome: Outcome,
        before: Callable[[sqlite3.Connection], bool] | None,
        also: Callable[[sqlite3.Connection], None] | None,
    ) -> bool:
        insert, data = self._progress_write(session_id, stage, before, None)
        update = self._finish_write(session_id, outcome, also)

        def both(conn: sqlite3.Connection) -> tuple[int, tuple[int, dict[str, Any]] | None] | None:
            row_id = insert(conn)
            return None if row_id is None else (row_id, update(conn))

        result = await self.db.write(both)
        if result is None:
            return False
        self.broker.publish(session_id, _event(result[0], "progress", data))
        return self._finished(session_id, outcome, result[1])

    def _finish_write(
        self, session_id: str, outcome: Outcome, also: Callable[[sqlite3.Connection], None] | None
    ) -> Callable[[sqlite3.Connection], tuple[int, dict[str, Any]] | None]:
        now = self.clock()

        def update(conn: sqlite3.Connection) -> tuple[int, dict[str, Any]] | None:
            if also is not None:
                also(conn)  # e.g. clean-up that must commit with the outcome, winner or not
            row = conn.execute(
                "SELECT provider, user_ref FROM sessions WHERE id = ? AND status = 'pending'", (session_id,)
            ).fetchone()
            if row is None:
                return None
            body = outcome.to_json(provider=row["provider"], user_ref=row["user_ref"], completed_at=now)
            encoded = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
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
            return ins.lastrowid, body

        return update

    def _finished(self, session_id: str, outcome: Outcome, result: tuple[int, dict[str, Any]] | None) -> bool:
        """After the commit: publish the outcome the write stored, if it stored one."""
        if result is None:
            return False
        row_id, body = result
        self.broker.publish(session_id, _event(row_id, "outcome", body))
        if self.on_outcome is not None:
            self.on_outcome(body["provider"], outcome.status, outcome.reason)
        log.info(
            "session finished",
            extra={"session": public_ref(session_id), "status": outcome.status, "reason": outcome.reason},
        )
        return True

    async def expire_due(self) -> int:
        """Expire every pending session whose deadline has passed; returns how many."""
        rows = await self.db.fetchall(
            "SELECT id FROM sessions WHERE status = 'pending' AND expires_at <= ? ORDER BY expires_at LIMIT 1000",
            (self.clock(),),
        )
        done = 0
        for row in rows:
            if await self.finish(row["id"], Outcome(EXPIRED, "timeout")):
                done += 1
        return done

    async def next_deadline(self) -> float | None:
        row = await self.db.fetchone("SELECT MIN(expires_at) AS t FROM sessions WHERE status = 'pending'")
        return None if row is None or row["t"] is None else float(row["t"])

    async def run_expiry(self, max_sleep: float = 1.0) -> None:
        """Background task: turn overdue pending sessions into `expired` / `timeout`."""
        while True:
            try:
                await self.expire_due()
                deadline = await self.next_deadline()
            except Exception:
                log.exception("expiry pass failed")
                deadline = None
            delay = max_sleep if deadline is None else min(max_sleep, max(deadline - self.clock(), 0.0))
            self.expiry_wakeup.clear()
            self._next_expiry_pass = self.clock() + delay
            if delay > 0:
                try:
                    await asyncio.wait_for(self.expiry_wakeup.wait(), delay)
                except TimeoutError:
                    pass
