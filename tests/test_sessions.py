"""The storage layer and the state machine, against each backend (SQLite file, PostgreSQL database).

Tests that look at SQLite's own machinery (pragmas, group commit, WAL, file locks) run on
SQLite only; tests/test_postgres.py has PostgreSQL's own (several processes on one database).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.broker import Broker
from gateway.errors import StorageError
from gateway.outcome import Outcome
from gateway.records import CLAIM_LEASE, Session, TokenClaim
from gateway.sessions import Sessions, new_session_id, public_ref
from gateway.storage.base import Store
from gateway.storage.rows import migration_files
from gateway.storage.sqlite import SqliteStore, apply_migrations
from tests.pg import sql_rows


@pytest.fixture
def sessions(store: Store) -> Sessions:
    """The state machine on each backend."""
    return Sessions(store, Broker(16))


@pytest.fixture
async def lite(db_path: Path) -> AsyncIterator[Sessions]:
    """The state machine on SQLite only, for tests of SQLite's own machinery."""
    db = SqliteStore(str(db_path))
    await db.open()
    try:
        yield Sessions(db, Broker(16))
    finally:
        await db.close()


def test_migrations_apply_once_and_record_themselves(db_path: Path) -> None:
    names = [name for _, name, _ in migration_files()]
    assert names and names[0] == "0001_sessions.sql"
    assert apply_migrations(str(db_path)) == names
    assert apply_migrations(str(db_path)) == []  # safe to run twice
    conn = sqlite3.connect(db_path)
    recorded = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY version")]
    assert recorded == names
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_writer_uses_full_sync_and_wal(lite: Sessions) -> None:
    def pragmas(conn: sqlite3.Connection) -> tuple[int, str]:
        return conn.execute("PRAGMA synchronous").fetchone()[0], conn.execute("PRAGMA journal_mode").fetchone()[0]

    assert isinstance(lite.store, SqliteStore)
    assert await lite.store.db.write(pragmas) == (2, "wal")  # 2 = FULL


async def test_a_failing_write_does_not_undo_its_neighbours(lite: Sessions) -> None:
    def boom(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO sessions (id, provider, created_at, updated_at, expires_at) VALUES ('x', 'bad', 0,0,0)"
        )

    assert isinstance(lite.store, SqliteStore)
    ok = [lite.create(session_id=new_session_id(), provider="truecaller", ttl=60) for _ in range(5)]
    results = await asyncio.gather(lite.store.db.write(boom), *ok, return_exceptions=True)
    assert isinstance(results[0], Exception)
    rows = await lite.store.db.fetchall("SELECT id FROM sessions")
    assert len(rows) == 5


async def test_exactly_one_of_many_racing_writers_wins(sessions: Sessions) -> None:
    sid = new_session_id()
    await sessions.create(session_id=sid, provider="truecaller", ttl=60)
    sub = sessions.broker.subscribe(sid)
    outcomes = [
        Outcome("verified", phone="+15551234567"),
        Outcome("rejected", "user_rejected"),
        Outcome("failed", "provider_error"),
        Outcome("expired", "timeout"),
    ] * 25
    wins = await asyncio.gather(*(sessions.finish(sid, o) for o in outcomes))
    assert sum(wins) == 1
    winner = outcomes[wins.index(True)]
    session = await sessions.get(sid)
    assert session is not None and session.status == winner.status and session.reason == winner.reason
    events = await sql_rows(sessions.store, "SELECT kind FROM session_events WHERE session_id = ?", sid)
    assert [e["kind"] for e in events] == ["outcome"]
    published = sub.drain()
    assert [e.kind for e in published] == ["outcome"]
    # a terminal session never changes again, and takes no more progress
    assert not await sessions.finish(sid, Outcome("failed", "provider_error"))
    assert (await sessions.progress(sid, "flow_invoked")).event_id is None
    after = await sessions.get(sid)
    assert after is not None and after.outcome == session.outcome


async def test_a_cancelled_caller_does_not_cut_a_finish_in_half(sessions: Sessions) -> None:
    sid = new_session_id()
    await sessions.create(session_id=sid, provider="veriphone", ttl=60)
    sub = sessions.broker.subscribe(sid)
    task = asyncio.ensure_future(sessions.finish(sid, Outcome("rejected", "user_cancelled")))
    await asyncio.sleep(0)
    task.cancel()
    assert await asyncio.wait_for(sub.wait(5), 5) == "event"  # published anyway
    session = await sessions.get(sid)
    assert session is not None and session.status == "rejected"


async def test_expiry_finishes_overdue_sessions_only(sessions: Sessions) -> None:
    now = [1000.0]
    sessions.clock = lambda: now[0]
    old, fresh = new_session_id(), new_session_id()
    await sessions.create(session_id=old, provider="truecaller", ttl=5)
    await sessions.create(session_id=fresh, provider="truecaller", ttl=50)
    now[0] += 10
    assert await sessions.expire_due() == 1
    expired = await sessions.get(old)
    assert expired is not None and (expired.status, expired.reason) == ("expired", "timeout")
    pending = await sessions.get(fresh)
    assert pending is not None and pending.status == "pending"
    assert await sessions.next_deadline() == pending.expires_at


def test_ids_are_long_random_and_public_ref_hides_them() -> None:
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) >= 32 for i in ids)
    sid = next(iter(ids))
    assert sid not in public_ref(sid) and len(public_ref(sid)) == 16


async def test_the_wal_is_checkpointed_off_the_writer(db_path: Path) -> None:
    db = SqliteStore(str(db_path))
    await db.open()
    try:
        sessions = Sessions(db, Broker(16))
        for _ in range(50):
            await asyncio.gather(
                *(sessions.create(session_id=new_session_id(), provider="truecaller", ttl=60) for _ in range(40))
            )
        assert await db.db.write(lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0
    finally:
        await db.close()
    # closing checkpoints everything: the WAL is empty and every row is in the main file
    wal = db_path.with_name(db_path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 2000


async def test_a_write_lock_held_by_another_process_is_waited_for_off_the_loop(db_path: Path) -> None:
    db = SqliteStore(str(db_path), busy_timeout_ms=10_000)
    await db.open()
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        sessions = Sessions(db, Broker(16))
        other.execute("BEGIN IMMEDIATE")  # e.g. an operator's sqlite3 shell in a write
        sid = new_session_id()
        create = asyncio.create_task(sessions.create(session_id=sid, provider="truecaller", ttl=60))
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(0.05)
        # The loop kept running: the write waits on the commit thread, not in the loop.
        assert asyncio.get_running_loop().time() - started < 2.0
        assert not create.done()
        other.execute("COMMIT")
        await asyncio.wait_for(create, 10)
        assert await sessions.get(sid) is not None
        # and the next write takes the lock on the loop again
        await sessions.create(session_id=new_session_id(), provider="truecaller", ttl=60)
    finally:
        other.close()
        await db.close()


async def test_a_write_that_cannot_get_the_lock_fails_cleanly_and_the_next_one_works(db_path: Path) -> None:
    db = SqliteStore(str(db_path), busy_timeout_ms=50)
    await db.open()
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        sessions = Sessions(db, Broker(16))
        other.execute("BEGIN IMMEDIATE")
        results = await asyncio.gather(
            *(sessions.create(session_id=new_session_id(), provider="truecaller", ttl=60) for _ in range(3)),
            return_exceptions=True,
        )
        assert all(isinstance(r, StorageError) for r in results)
        other.execute("COMMIT")
        sid = new_session_id()
        await sessions.create(session_id=sid, provider="truecaller", ttl=60)
        rows = await db.db.fetchall("SELECT id FROM sessions")
        assert [r["id"] for r in rows] == [sid]  # nothing of the failed batch was stored
    finally:
        other.close()
        await db.close()


# -- the Store contract, method by method, on each backend --------------------------------

NOW = 1_000_000.0


def _session(sid: str, *, expires_in: float = 600) -> Session:
    return Session(sid, "truecaller", "pending", None, f"ref-{sid}", "+15551234567", "u-1", {"a": 1}, None, NOW, NOW,
                   NOW + expires_in, None)  # fmt: skip


def _claim(sid: str, token: str, at: float = NOW) -> TokenClaim:
    return TokenClaim(sid, "https://p.example/v1", token, f"hash-{token}", at, at + 600)


async def test_events_read_back_by_position_and_by_id(store: Store) -> None:
    assert await store.create(_session("ev"))
    first = await store.progress("ev", {"stage": "flow_invoked"}, now=NOW + 1, expires_at=NOW + 900)
    again = await store.progress("ev", {"stage": "profile_fetching"}, now=NOW + 2)
    assert first.first and first.provider == "truecaller" and not again.first
    assert first.event_id is not None and again.event_id is not None and first.event_id < again.event_id
    done = await store.finish("ev", Outcome("verified", phone="+15551234567"), now=NOW + 3)
    assert done is not None and done.body["status"] == "verified" and done.body["user_ref"] == "u-1"
    session, events = await store.get_with_events("ev", 0)
    assert session is not None and session.status == "verified" and session.expires_at == NOW + 900
    assert session.outcome == done.body and session.completed_at == NOW + 3 and session.updated_at == NOW + 3
    assert [(e.id, e.kind) for e in events] == [
        (first.event_id, "progress"),
        (again.event_id, "progress"),
        (done.event_id, "outcome"),
    ]
    assert (await store.get_with_events("ev", again.event_id))[1] == events[2:]
    assert await store.get_with_events("nope", 0) == (None, [])
    assert await store.event("ev", again.event_id) == events[1]
    assert await store.event("other", again.event_id) is None
    assert await store.outcome_event("ev") == events[2]
    assert await store.get_by_ref("truecaller", "ref-ev") == session
    assert await store.get_by_ref("veriphone", "ref-ev") is None


async def test_provider_data_is_merged_while_pending_only(store: Store) -> None:
    await store.create(_session("pd"))
    assert await store.update_provider_data("pd", {"b": "ü"}, now=NOW + 1, expires_at=None)
    got = await store.get("pd")
    assert got is not None and got.provider_data == {"a": 1, "b": "ü"} and got.expires_at == NOW + 600
    await store.finish("pd", Outcome("expired", "timeout"), now=NOW + 2)
    assert not await store.update_provider_data("pd", {"c": 3}, now=NOW + 3, expires_at=NOW + 9)
    assert (await store.progress("pd", {"stage": "late"}, now=NOW + 4)).event_id is None


async def test_a_status_callback_does_not_beat_a_stored_token(store: Store) -> None:
    await store.create(_session("tc"))
    stored = await store.progress("tc", {"stage": "profile_fetching"}, now=NOW, claim=_claim("tc", "t1"))
    assert stored.claim == "stored" and stored.event_id is not None
    assert await store.has_claim("tc")
    assert await store.finish("tc", Outcome("rejected", "user_rejected"), now=NOW, unless_claimed=True) is None
    won = await store.finish("tc", Outcome("verified", phone="+15551234567"), now=NOW, release_claim=True)
    assert won is not None and not await store.has_claim("tc")
    assert (await store.progress("tc", {"stage": "x"}, now=NOW, claim=_claim("tc", "t2"))).claim == "gone"


async def test_stored_tokens_are_taken_over_once_their_lease_passed(store: Store) -> None:
    for sid in ("a", "b", "gone"):
        await store.create(_session(sid))
        await store.progress(sid, {"stage": "profile_fetching"}, now=NOW, claim=_claim(sid, sid))
    await store.finish("gone", Outcome("failed", "provider_error"), now=NOW)
    assert await store.pending_claims(NOW + CLAIM_LEASE - 1) == []  # its fetch is still running
    taken = await store.pending_claims(NOW + CLAIM_LEASE)
    assert sorted((c.session_id, c.phone, c.access_token) for c in taken) == [
        ("a", "+15551234567", "a"),
        ("b", "+15551234567", "b"),
    ]
    assert await store.pending_claims(NOW + CLAIM_LEASE) == []  # taken, for another lease
    assert not await store.has_claim("gone")
    assert len(await store.pending_claims(NOW + 2 * CLAIM_LEASE, lease=5)) == 2
    assert len(await store.pending_claims(NOW + 2 * CLAIM_LEASE + 5)) == 2


async def test_idempotency_keys_and_tickets_are_stored_with_their_session(store: Store) -> None:
    from gateway.auth import Admitted
    from gateway.records import Idempotency

    key = Idempotency("k-hash", "b-hash", {"id": "i1", "ü": True}, NOW + 60)
    assert await store.create(_session("i1"), key, Admitted("t-hash", NOW + 30))
    assert not await store.create(_session("i2"), None, Admitted("t-hash", NOW + 30))  # one ticket, one session
    assert await store.get("i2") is None
    assert await store.ticket_used("t-hash") and not await store.ticket_used("other")
    assert await store.idempotent("k-hash", NOW) == key
    assert await store.idempotent("k-hash", NOW + 60) is None  # expired
    assert await store.prune_idempotency(NOW + 59) == 0
    assert await store.prune_idempotency(NOW + 60) == 1
    assert await store.prune_tickets(NOW + 30) == 1 and not await store.ticket_used("t-hash")
    assert await store.count_pending() == 1 and await store.database_bytes() > 0


async def test_expiry_reads_and_old_sessions_are_deleted(store: Store) -> None:
    await store.create(_session("soon", expires_in=10))
    await store.create(_session("late", expires_in=20))
    await store.create(_session("old"))
    assert await store.next_deadline() == NOW + 10
    assert await store.due_for_expiry(NOW + 15, 10) == ["soon"]
    assert await store.due_for_expiry(NOW + 25, 1) == ["soon"]
    await store.finish("old", Outcome("expired", "timeout"), now=NOW)
    assert await store.delete_finished(cutoff=NOW, limit=10) == 0  # not purged yet
    assert await store.purge_personal_data(cutoff=NOW, now=NOW + 1, limit=10) == 1
    assert await store.delete_finished(cutoff=NOW - 1, limit=10) == 0
    assert await store.delete_finished(cutoff=NOW, limit=10) == 1
    assert await store.get("old") is None and await store.outcome_event("old") is None


async def test_the_outbox_lists_retries_and_prunes(store: Store) -> None:
    from gateway.records import OutboxResult
    from gateway.webhooks.signing import completed_event

    for sid in ("w1", "w2"):
        await store.create(_session(sid))
        assert await store.finish(sid, Outcome("verified", phone="+1555"), now=NOW, webhook=completed_event)
    assert await store.outbox_next_due() == NOW and await store.outbox_oldest_pending() == NOW
    due = await store.outbox_due(NOW, 10)
    assert sorted(i.session_id for i in due) == ["w1", "w2"] and all(i.attempts == 0 for i in due)
    assert b'"session_id":' in due[0].payload.encode()
    failed, delivered = due
    await store.outbox_record(
        [
            OutboxResult(failed.id, "failed", 1, NOW + 1, NOW + 1, 410, "refused"),
            OutboxResult(delivered.id, "delivered", 1, NOW + 1, NOW + 1, 200, None),
        ]
    )
    await store.outbox_record([OutboxResult(delivered.id, "pending", 2, NOW + 9, None, 500, "status")])  # ignored
    [entry] = await store.outbox_list(failed_only=True, limit=10)
    assert (entry.id, entry.status, entry.last_status, entry.last_error) == (failed.id, "failed", 410, "refused")
    assert {e.status for e in await store.outbox_list(failed_only=False, limit=10)} == {"failed", "delivered"}
    assert await store.outbox_next_due() is None
    assert await store.outbox_retry("unknown", now=NOW + 2) == 0
    assert await store.outbox_retry(None, now=NOW + 2) == 1
    assert [i.id for i in await store.outbox_due(NOW + 2, 10)] == [failed.id]
    assert await store.outbox_prune(cutoff=NOW + 1, limit=10) == 1  # the delivered one
    assert [e.id for e in await store.outbox_list(failed_only=False, limit=10)] == [failed.id]
