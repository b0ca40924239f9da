"""The storage layer and the state machine, against a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.broker import Broker
from gateway.errors import StorageError
from gateway.outcome import Outcome
from gateway.sessions import Sessions, new_session_id, public_ref
from gateway.storage.sqlite import SqliteStore, apply_migrations, migration_files


@pytest.fixture
async def sessions(db_path: Path) -> AsyncIterator[Sessions]:
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


async def test_writer_uses_full_sync_and_wal(sessions: Sessions) -> None:
    def pragmas(conn: sqlite3.Connection) -> tuple[int, str]:
        return conn.execute("PRAGMA synchronous").fetchone()[0], conn.execute("PRAGMA journal_mode").fetchone()[0]

    assert await sessions.store.db.write(pragmas) == (2, "wal")  # 2 = FULL


async def test_a_failing_write_does_not_undo_its_neighbours(sessions: Sessions) -> None:
    def boom(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO sessions (id, provider, created_at, updated_at, expires_at) VALUES ('x', 'bad', 0,0,0)"
        )

    ok = [sessions.create(session_id=new_session_id(), provider="truecaller", ttl=60) for _ in range(5)]
    results = await asyncio.gather(sessions.store.db.write(boom), *ok, return_exceptions=True)
    assert isinstance(results[0], Exception)
    rows = await sessions.store.db.fetchall("SELECT id FROM sessions")
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
    events = await sessions.store.db.fetchall("SELECT kind FROM session_events WHERE session_id = ?", (sid,))
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
