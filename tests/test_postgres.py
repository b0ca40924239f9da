"""PostgreSQL only: what several gateway processes on one database need (each PgStore here is a process)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import StorageError
from gateway.outcome import Outcome
from gateway.records import CLAIM_LEASE, OUTBOX_LEASE, Session, TokenClaim
from gateway.storage import postgres
from gateway.storage.postgres import PgStore, apply_migrations
from gateway.storage.rows import migration_files
from gateway.storage.sqlite import SqliteStore
from gateway.webhooks.signing import completed_event
from tests.pg import Cluster, sql_rows

pytestmark = pytest.mark.timeout(30)

NOW = 1_000_000.0
PHONE = "+15551234567"


def session(sid: str, *, now: float = NOW, phone: str | None = PHONE) -> Session:
    return Session(sid, "truecaller", "pending", None, None, phone, "user-1", {"deeplink": "x"}, None, now, now,
                   now + 600, None)  # fmt: skip


def claim(sid: str, token: str, at: float = NOW) -> TokenClaim:
    return TokenClaim(sid, "https://p.example/v1", token, hashlib.sha256(token.encode()).hexdigest(), at, at + 600)


@contextlib.asynccontextmanager
async def stores(dsn: str, count: int, **kw: Any) -> AsyncIterator[list[PgStore]]:
    """`count` opened stores on one database, as `count` gateway processes would have."""
    opened = [PgStore(dsn, min_size=1, max_size=5, **kw) for _ in range(count)]
    try:
        await asyncio.gather(*(s.open() for s in opened))
        yield opened
    finally:
        await asyncio.gather(*(s.close() for s in opened))


async def wait_for(event: asyncio.Event, timeout: float = 5) -> None:
    await asyncio.wait_for(event.wait(), timeout)


async def test_migrations_run_by_three_processes_at_once_are_applied_once(pg_cluster: Cluster) -> None:
    dsn = await pg_cluster.create_database(template="template0")
    try:
        async with stores(dsn, 3) as opened:
            rows = await sql_rows(opened[0], "SELECT version, name FROM schema_migrations ORDER BY version")
            assert [(r["version"], r["name"]) for r in rows] == [(v, n) for v, n, _ in migration_files("postgresql")]
            assert await apply_migrations(dsn) == []  # `gateway migrate` on a current database
    finally:
        await pg_cluster.drop_database(dsn)


async def test_warming_new_pool_connections_writes_nothing(pg_dsn: str) -> None:
    """Each new pool connection calls the claim function once (its cold first call costs
    milliseconds) for a session that cannot exist: nothing is stored by it."""
    async with stores(pg_dsn, 1) as (store,):
        assert store.pool is not None
        async with store.pool.acquire(), store.pool.acquire(), store.pool.acquire():
            assert store.pool.get_size() == 3  # two more connections, each warmed as it opened
        for table in ("truecaller_tokens_used", "truecaller_callbacks", "session_events", "sessions"):
            assert (await sql_rows(store, f"SELECT COUNT(*) AS n FROM {table}"))[0]["n"] == 0


async def test_of_many_finishes_from_three_processes_exactly_one_is_stored(pg_dsn: str) -> None:
    async with stores(pg_dsn, 3) as opened:
        await opened[0].create(session("race"))
        outcomes = [
            Outcome("verified", phone=PHONE),
            Outcome("rejected", "user_rejected"),
            Outcome("expired", "timeout"),
        ]
        calls = [opened[i % 3].finish("race", outcomes[i % 3], now=NOW + i, webhook=completed_event) for i in range(30)]
        results = await asyncio.gather(*calls)
        won = [r for r in results if r is not None]
        assert len(won) == 1
        stored = await opened[1].get("race")
        assert stored is not None and stored.outcome == won[0].body
        events = await sql_rows(opened[2], "SELECT id, kind FROM session_events WHERE session_id = ?", "race")
        assert [(e["id"], e["kind"]) for e in events] == [(won[0].event_id, "outcome")]
        assert len(await sql_rows(opened[0], "SELECT id FROM webhook_outbox")) == 1  # never one without the other


async def test_fifty_racing_token_callbacks_for_one_session_store_one(pg_dsn: str) -> None:
    async with stores(pg_dsn, 3) as opened:
        await opened[0].create(session("s-1"))
        calls = [
            opened[i % 3].progress("s-1", {"stage": "profile_fetching"}, now=NOW, claim=claim("s-1", f"tok-{i % 2}"))
            for i in range(50)
        ]
        results = [p.claim for p in await asyncio.gather(*calls)]
        assert results.count("stored") == 1
        assert set(results) - {"stored"} <= {"repeat"}
        events = await sql_rows(opened[1], "SELECT kind FROM session_events")
        assert [e["kind"] for e in events] == ["progress"]  # the event only with the stored claim
        [row] = await sql_rows(opened[2], "SELECT received_at, lease_until FROM truecaller_callbacks")
        assert row["lease_until"] == row["received_at"] + CLAIM_LEASE


async def test_a_token_is_bound_to_one_session_across_processes(pg_dsn: str) -> None:
    async with stores(pg_dsn, 3) as opened:
        sids = [f"s-{i}" for i in range(12)]
        for sid in sids:
            await opened[0].create(session(sid))
        calls = [
            opened[i % 3].progress(sid, {"stage": "profile_fetching"}, now=NOW, claim=claim(sid, "one-token"))
            for i, sid in enumerate(sids)
        ]
        results = [p.claim for p in await asyncio.gather(*calls)]
        assert sorted(results) == ["reused"] * 11 + ["stored"]
        owner = await opened[1].token_owner(hashlib.sha256(b"one-token").hexdigest())
        assert owner == sids[results.index("stored")]
        assert [await s.has_claim(owner) for s in opened] == [True] * 3


async def test_claims_whose_lease_passed_go_to_exactly_one_process(pg_dsn: str) -> None:
    async with stores(pg_dsn, 2) as (a, b):
        sids = [f"c-{i}" for i in range(20)]
        for sid in sids:
            await a.create(session(sid))
            assert (await a.progress(sid, {"stage": "profile_fetching"}, now=NOW, claim=claim(sid, sid))).claim
        await a.create(session("done"))
        await a.progress("done", {"stage": "profile_fetching"}, now=NOW, claim=claim("done", "done"))
        await a.finish("done", Outcome("failed", "provider_error"), now=NOW)  # its token is dropped

        assert await a.pending_claims(NOW + CLAIM_LEASE - 1) == []  # the process that stored them is alive
        later = NOW + CLAIM_LEASE
        taken_a, taken_b = await asyncio.gather(a.pending_claims(later), b.pending_claims(later))
        ids_a, ids_b = {c.session_id for c in taken_a}, {c.session_id for c in taken_b}
        assert not ids_a & ids_b and ids_a | ids_b == set(sids)
        assert {c.phone for c in taken_a + taken_b} == {PHONE} and all(c.access_token for c in taken_a)
        assert not await a.has_claim("done")
        # taken for CLAIM_LEASE: nobody gets them again until that passed too
        assert await b.pending_claims(later + CLAIM_LEASE - 1) == []
        assert len(await b.pending_claims(later + CLAIM_LEASE)) == 20


async def test_due_webhooks_are_leased_to_one_process(pg_dsn: str) -> None:
    async with stores(pg_dsn, 2) as (a, b):
        for i in range(30):
            await a.create(session(f"w-{i}"))
            await a.finish(f"w-{i}", Outcome("verified", phone=PHONE), now=NOW + i, webhook=completed_event)
        now = NOW + 100
        due_a, due_b = await asyncio.gather(a.outbox_due(now, 20), b.outbox_due(now, 20))
        ids_a, ids_b = [i.id for i in due_a], [i.id for i in due_b]
        assert not set(ids_a) & set(ids_b) and len(ids_a) + len(ids_b) == 30
        enqueued = {i.id: i.enqueued_at for i in due_a + due_b}
        assert [enqueued[i] for i in ids_a] == sorted(enqueued[i] for i in ids_a)  # oldest first
        assert await a.outbox_due(now + OUTBOX_LEASE - 1, 50) == []  # leased, in flight somewhere
        assert await a.outbox_next_due() == now + OUTBOX_LEASE
        assert len(await b.outbox_due(now + OUTBOX_LEASE, 50)) == 30  # a dead process's lease ends


async def test_retention_by_two_processes_scrubs_each_session_once(pg_dsn: str) -> None:
    async with stores(pg_dsn, 2) as (a, b):
        for i in range(40):
            await a.create(session(f"r-{i}"))
            await a.finish(f"r-{i}", Outcome("verified", phone=PHONE), now=NOW)

        async def purge_all(store: PgStore, now: float) -> int:
            total = 0
            while done := await store.purge_personal_data(cutoff=NOW, now=now, limit=7):
                total += done
            return total

        assert sum(await asyncio.gather(purge_all(a, NOW + 1), purge_all(b, NOW + 2))) == 40
        rows = await sql_rows(a, "SELECT phone, purged_at, outcome FROM sessions")
        assert {r["phone"] for r in rows} == {None} and all(r["purged_at"] in (NOW + 1, NOW + 2) for r in rows)
        assert all(json.loads(r["outcome"])["phone"] is None for r in rows)


async def test_every_process_hears_each_event_once_in_commit_order(pg_dsn: str) -> None:
    heard: list[tuple[str, int]] = []
    all_heard = asyncio.Event()

    def on_event(session_id: str, event_id: int) -> None:
        heard.append((session_id, event_id))
        if len(heard) == 31:
            all_heard.set()

    listener = PgStore(pg_dsn, min_size=1, max_size=2)
    listener.watch(on_event, lambda: None)
    assert listener.listener_ok() is False  # watched, not yet listening
    await listener.open()
    try:
        assert listener.listener_ok() is True
        async with stores(pg_dsn, 3) as writers:
            await writers[0].create(session("feed"))
            calls: list[Awaitable[Any]] = [
                writers[i % 3].progress("feed", {"stage": f"step-{i}"}, now=NOW + i) for i in range(30)
            ]
            written = [p.event_id for p in await asyncio.gather(*calls)]
            finished = await writers[1].finish("feed", Outcome("rejected", "user_rejected"), now=NOW + 40)
            assert finished is not None
            await wait_for(all_heard)
        ids = [event_id for sid, event_id in heard]
        assert {sid for sid, _ in heard} == {"feed"}
        assert sorted(ids) == sorted([*written, finished.event_id])
        # One session's events are committed one after the other (its row is locked first),
        # so their ids rise in the order they are heard, and a stream replays them in that order.
        assert ids == sorted(ids) and ids[-1] == finished.event_id
        event = await listener.event("feed", finished.event_id)
        assert event is not None and event.kind == "outcome" and event.data == finished.body
        assert await listener.event("other-session", finished.event_id) is None
    finally:
        await listener.close()
    assert listener.listener_ok() is False


async def test_a_restarted_server_gives_storage_errors_then_the_feed_comes_back(own_pg_cluster: Cluster) -> None:
    cluster = own_pg_cluster
    dsn = await cluster.create_database(template="template0")  # PgStore.open migrates it
    heard: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    reset = asyncio.Event()
    store = PgStore(dsn, min_size=1, max_size=3)
    store.watch(lambda sid, eid: heard.put_nowait((sid, eid)), reset.set)
    await store.open()
    try:
        await store.create(session("before"))
        # Its own events are published by the process itself: its feed leaves them out.
        own = await store.progress("before", {"stage": "own"}, now=NOW)
        async with stores(dsn, 1) as (other,):
            other_event = (await other.progress("before", {"stage": "a"}, now=NOW)).event_id
        assert own.event_id is not None and await heard.get() == ("before", other_event)

        await asyncio.to_thread(cluster.stop, "fast")
        calls: list[Callable[[], Awaitable[Any]]] = [
            store.ping,
            lambda: store.get("before"),
            lambda: store.progress("before", {"stage": "b"}, now=NOW),
            lambda: store.finish("before", Outcome("expired", "timeout"), now=NOW),
            lambda: store.pending_claims(NOW),
            lambda: store.outbox_due(NOW, 10),
        ]
        for call in calls:
            with pytest.raises(StorageError):
                await call()
        async with asyncio.timeout(5):  # the feed noticed too (what /readyz reports)
            while store.listener_ok():
                await asyncio.sleep(0.01)
        assert not reset.is_set()

        await asyncio.to_thread(cluster.start)
        await wait_for(reset, 10)  # listening again: events may have been missed, streams catch up
        assert store.listener_ok() is True
        async with stores(dsn, 1) as (other,):
            progressed = await other.progress("before", {"stage": "c"}, now=NOW)
        assert progressed.event_id is not None
        assert await asyncio.wait_for(heard.get(), 5) == ("before", progressed.event_id)
        await store.ping()
    finally:
        await store.close()


async def test_ping_fails_when_no_connection_answers_in_time(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres, "PING_TIMEOUT", 0.2)
    async with stores(pg_dsn, 1) as (store,):
        assert store.pool is not None
        held = [await store.pool.acquire() for _ in range(5)]  # every connection busy elsewhere
        try:
            with pytest.raises(StorageError, match="did not answer"):
                await store.ping()
        finally:
            for conn in held:
                await store.pool.release(conn)
        await store.ping()


async def test_a_write_whose_caller_is_cancelled_still_commits(pg_dsn: str) -> None:
    async with stores(pg_dsn, 1) as (store,):
        await store.create(session("cancel"))
        task = asyncio.ensure_future(store.finish("cancel", Outcome("rejected", "user_cancelled"), now=NOW))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    async with stores(pg_dsn, 1) as (store,):  # close() waited for it
        stored = await store.get("cancel")
        assert stored is not None and stored.status == "rejected"


async def test_json_is_stored_byte_for_byte_as_sqlite_stores_it(pg_dsn: str, tmp_path: Path) -> None:
    lite = SqliteStore(str(tmp_path / "same.db"))
    await lite.open()
    try:
        async with stores(pg_dsn, 1) as (pg,):
            texts = []
            for store in (lite, pg):
                sid = "same"
                data = {"url": "https://x/ä?q=1"}
                await store.create(Session(sid, "veriphone", "pending", None, "ref-é", PHONE, "ü", data, None, NOW, NOW,
                                           NOW + 60, None))  # fmt: skip
                await store.update_provider_data(sid, {"b": "ß", "n": 1.5}, now=NOW, expires_at=None)
                await store.progress(sid, {"stage": "ök"}, now=NOW)
                await store.finish(sid, Outcome("verified", phone=PHONE, profile={"name": "Zoë"}), now=NOW,
                                   webhook=completed_event)  # fmt: skip
                session_row = await sql_rows(store, "SELECT provider_data, outcome FROM sessions")
                events = await sql_rows(store, "SELECT kind, data FROM session_events ORDER BY id")
                payload = await sql_rows(store, "SELECT type, payload FROM webhook_outbox")
                texts.append((session_row, events, [r["type"] for r in payload]))
            assert texts[0] == texts[1]
    finally:
        await lite.close()


async def test_a_connection_goes_back_to_the_pool_clean_without_the_reset_query(pg_dsn: str) -> None:
    """The pool skips asyncpg's reset query (one round trip per query saved); what it was for still holds.

    A transaction that failed half-way is rolled back before the connection is reused, and the
    next user of that one connection sees neither its writes nor an aborted transaction.
    """
    store = PgStore(pg_dsn, min_size=1, max_size=1)
    await store.open()
    try:
        assert store.pool is not None and store.pool._reset is postgres._no_reset  # type: ignore[attr-defined]
        await store.create(session("kept"))

        async def half(conn: Any) -> None:
            await conn.execute("UPDATE sessions SET status = 'verified' WHERE id = 'kept'")
            await conn.execute("SELECT 1/0")

        with pytest.raises(StorageError):
            await store._write(half)
        stored = await store.get("kept")  # on that one connection: no "current transaction is aborted"
        assert stored is not None and stored.status == "pending"
    finally:
        await store.close()
