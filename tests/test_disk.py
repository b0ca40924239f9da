"""The database stays bounded: a size cap refuses new sessions, and retention deletes old ones."""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
from pathlib import Path

import pytest

from gateway.broker import Broker
from gateway.outcome import EXPIRED, Outcome
from gateway.retention import Retention
from gateway.sessions import Sessions, new_session_id
from gateway.storage.sqlite import SqliteStore
from tests.utils import make_settings, run_gateway

pytestmark = pytest.mark.timeout(90)


def count(db: Path, table: str = "sessions") -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


async def test_a_full_database_refuses_new_sessions_and_stores_nothing(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    async with run_gateway(make_settings(db, {"database": {"max_size_mb": 1}})) as gw, gw.client() as c:
        assert gw.gateway.starter.disk is not None
        gw.gateway.starter.disk.interval = 0  # read the size on every request (else at most once a second)
        assert (await c.post("/v1/sessions", json={"provider": "truecaller"})).status_code == 201
        # Something else fills the file past the cap (2 MiB in another table).
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE padding (b BLOB)")
            conn.execute("INSERT INTO padding VALUES (randomblob(2 * 1024 * 1024))")
        r = await c.post("/v1/sessions", json={"provider": "truecaller"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "storage_full"
        assert r.headers["retry-after"] == "60"
        stored = count(db)
        for _ in range(5):
            assert (await c.post("/v1/sessions", json={"provider": "veriphone"})).status_code == 503
        assert count(db) == stored
        metrics = (await c.get("/metrics")).text
        gauge = next(line for line in metrics.splitlines() if line.startswith("gateway_database_bytes "))
        assert float(gauge.split()[1]) > 2 * 1024 * 1024
        # Space freed (retention would do this): sessions are taken again, without a restart.
        with sqlite3.connect(db) as conn:
            conn.execute("DROP TABLE padding")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # the 2 MiB of WAL too
        assert (await c.post("/v1/sessions", json={"provider": "truecaller"})).status_code == 201


FLOOD = 5_000  # sessions per flood; 4 floods: 20,000 abandoned sessions
TTL = 120.0
RETENTION = 60.0
KEEP = 300.0


async def test_retention_keeps_the_database_bounded_under_floods_of_abandoned_sessions(tmp_path: Path) -> None:
    """Floods of sessions nobody finishes: expiry, purge and deletion leave the file the same size."""
    path = tmp_path / "flood.db"
    now = [1_800_000_000.0]
    store = SqliteStore(str(path))
    await store.open()
    sessions = Sessions(store, Broker(16), clock=lambda: now[0])
    retention = Retention(store, RETENTION, clock=lambda: now[0], keep=KEEP, batch=1000)
    sizes: list[int] = []
    try:
        for _ in range(4):
            for start in range(0, FLOOD, 2500):  # one group commit per ~512 creates
                await asyncio.gather(
                    *(
                        sessions.create(
                            session_id=new_session_id(),
                            provider="truecaller",
                            ttl=TTL,
                            phone="+15551234567",
                            user_ref=f"user-{start + i}",
                            provider_ref=secrets.token_urlsafe(16),
                            provider_data={"deeplink": "truecallersdk://truesdk/web_verify?" + "x" * 300},
                        )
                        for i in range(2500)
                    )
                )
            now[0] += TTL + 1
            while due := await store.due_for_expiry(now[0], 2000):
                await asyncio.gather(*(sessions.finish(s, Outcome(EXPIRED, "timeout")) for s in due))
            now[0] += KEEP + 1
            await retention.purge_once()
            assert count(path) == 0 and count(path, "session_events") == 0
            with sqlite3.connect(path) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            sizes.append(os.path.getsize(path))
    finally:
        await store.close()
    # The first flood sets the size; later floods reuse its free pages instead of growing the file.
    assert max(sizes[1:]) <= sizes[0] * 1.02, sizes
    print(f"file size after each flood of {FLOOD} sessions: {sizes}")
