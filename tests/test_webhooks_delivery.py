"""Webhooks end to end: a real gateway, a real receiver on loopback, the outbox in a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.cli import main
from gateway.config import settings_from_dict
from gateway.outcome import Outcome
from gateway.sessions import new_session_id
from gateway.webhooks.signing import new_secret
from tests.test_shutdown import gateway_process
from tests.utils import Running, _serve, listening_socket, serve_app

pytestmark = pytest.mark.timeout(30)

SECRET = new_secret()
PHONE = "+15551234567"


@dataclass
class Receiver:
    """A webhook receiver: answers from `statuses` (then 200), after `delay`; `hold` makes it hang."""

    statuses: list[int | tuple[int, dict[str, str]]] = field(default_factory=list)
    delay: float = 0.0
    hold: asyncio.Event | None = None
    received: list[tuple[dict[str, str], bytes, float]] = field(default_factory=list)
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def endpoint(self, request: Request) -> Response:
        body = await request.body()
        async with self.arrived:
            self.received.append((dict(request.headers), body, time.monotonic()))
            self.arrived.notify_all()
        if self.hold is not None:
            await self.hold.wait()
        if self.delay:
            await asyncio.sleep(self.delay)  # a slow receiver, on purpose
        answer = self.statuses.pop(0) if self.statuses else 200
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        return Response(status_code=status, headers=headers)

    async def until(self, count: int, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: len(self.received) >= count)

    def ids(self) -> list[str]:
        return [h["webhook-id"] for h, _, _ in self.received]


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[str]:
    app = Starlette(routes=[Route("/hook", receiver.endpoint, methods=["POST"])])
    async with serve_app(app) as url:
        yield url + "/hook"


@contextlib.asynccontextmanager
async def gateway(db: Path, hook_url: str, **webhooks: Any) -> AsyncIterator[Running]:
    raw = {
        "database": {"path": str(db)},
        "logging": {"format": "json"},
        "webhooks": {"url": hook_url, "backoff": 0.05, **webhooks},
    }
    settings = settings_from_dict(raw, env={"GATEWAY_WEBHOOK_SECRET": SECRET})
    async with _serve(settings, listening_socket()) as running:
        async with running.client() as client:
            assert (await client.get("/readyz")).status_code == 200  # answered once startup is done
        yield running


async def finished(running: Running, outcome: Outcome | None = None) -> str:
    sid = new_session_id()
    sessions = running.gateway.sessions
    await sessions.create(session_id=sid, provider="truecaller", ttl=60, phone=PHONE, user_ref="u-1")
    assert await sessions.finish(sid, outcome or Outcome("verified", phone=PHONE))
    return sid


def rows(db: Path) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM webhook_outbox ORDER BY enqueued_at")]


async def until(check: Callable[[], bool], timeout: float = 10) -> None:
    """Wait for a state the gateway writes to its database (polled, bounded)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


async def test_every_event_is_signed_and_verifies_as_a_receiver_would(tmp_path: Path) -> None:
    receiver = Receiver()
    async with receiving(receiver) as url, gateway(tmp_path / "g.db", url) as running:
        sids = [await finished(running), await finished(running, Outcome("rejected", "user_rejected"))]
        await receiver.until(2)
    for (headers, body, _), sid in zip(
        sorted(receiver.received, key=lambda r: json.loads(r[1])["data"]["session_id"] != sids[0]), sids, strict=True
    ):
        event = Webhook(SECRET).verify(body, headers)
        assert event["type"] == "session.completed"
        assert event["data"]["session_id"] == sid and event["data"]["user_ref"] == "u-1"
    assert {json.loads(b)["data"]["status"] for _, b, _ in receiver.received} == {"verified", "rejected"}
    assert all(r["status"] == "delivered" and r["attempts"] == 1 for r in rows(tmp_path / "g.db"))


async def test_500_twice_then_200_delivers_three_times_with_one_id_then_never_again(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    receiver = Receiver(statuses=[500, 503])
    async with receiving(receiver) as url, gateway(db, url) as running:
        await finished(running)
        await receiver.until(3)
        await until(lambda: rows(db)[0]["status"] == "delivered")
        assert running.gateway.webhooks is not None
        assert await running.gateway.webhooks.pass_once() == 0  # nothing due any more
        async with running.client() as client:
            metrics = (await client.get("/metrics")).text
        assert 'gateway_webhook_deliveries_total{result="retried"} 2.0' in metrics
        assert 'gateway_webhook_deliveries_total{result="delivered"} 1.0' in metrics
        assert "gateway_webhook_attempts_total 3.0" in metrics
        assert "gateway_webhook_oldest_pending_seconds" in metrics
    assert len(set(receiver.ids())) == 1 and len(receiver.received) == 3
    [row] = rows(db)
    assert row["attempts"] == 3 and row["last_status"] == 200 and row["payload"] is not None


async def test_a_4xx_is_not_retried(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    receiver = Receiver(statuses=[400])
    async with receiving(receiver) as url, gateway(db, url) as running:
        await finished(running)
        await until(lambda: rows(db)[0]["status"] == "failed")
        assert running.gateway.webhooks is not None
        assert await running.gateway.webhooks.pass_once() == 0
    assert len(receiver.received) == 1
    assert (rows(db)[0]["attempts"], rows(db)[0]["last_status"], rows(db)[0]["last_error"]) == (1, 400, "refused")


async def test_429_waits_for_retry_after(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    receiver = Receiver(statuses=[(429, {"retry-after": "1"})])
    async with receiving(receiver) as url, gateway(db, url) as running:
        await finished(running)
        await receiver.until(2)
    first, second = receiver.received[0][2], receiver.received[1][2]
    assert second - first >= 0.9  # the receiver asked for a second; the backoff alone is 0.05 s


async def test_a_receiver_that_hangs_is_cut_at_the_timeout_and_retried(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    receiver = Receiver(hold=asyncio.Event())
    async with receiving(receiver) as url, gateway(db, url, timeout=0.5) as running:
        await finished(running)
        await receiver.until(2)  # the first attempt never got an answer
        cut = receiver.received[1][2] - receiver.received[0][2]
        async with running.client() as client:  # a failing receiver is not the gateway's health
            assert (await client.get("/readyz")).status_code == 200
        receiver.hold.set()
        await until(lambda: rows(db)[0]["status"] == "delivered")
    assert 0.5 <= cut < 3
    assert rows(db)[0]["attempts"] >= 2


async def test_a_burst_of_1000_outcomes_with_a_slow_receiver_is_all_delivered_once(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    receiver = Receiver(delay=0.005)
    async with receiving(receiver) as url, gateway(db, url, concurrency=8) as running:
        sessions = running.gateway.sessions
        sids = [new_session_id() for _ in range(1000)]
        await asyncio.gather(*(sessions.create(session_id=s, provider="veriphone", ttl=60) for s in sids))
        started = time.monotonic()
        wins = await asyncio.gather(*(sessions.finish(s, Outcome("failed", "not_completed")) for s in sids))
        finishing = time.monotonic() - started
        received_while_finishing = len(receiver.received)
        await receiver.until(1000, timeout=25)
        await until(lambda: all(r["status"] == "delivered" for r in rows(db)), timeout=10)
    assert all(wins)
    assert len(receiver.ids()) == len(set(receiver.ids())) == 1000
    delivered = {json.loads(b)["data"]["session_id"] for _, b, _ in receiver.received}
    assert delivered == set(sids)
    # The outcomes did not wait for the receiver: committing them all took less time than
    # delivering them, and most deliveries happened after the last outcome was stored.
    assert received_while_finishing < 500, (finishing, received_while_finishing)


async def test_rejected_requests_and_lost_races_enqueue_nothing(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    receiver = Receiver()
    async with receiving(receiver) as url, gateway(db, url) as running, running.client() as client:
        bad = [
            await client.post(
                "/v1/callbacks/truecaller", content=b"{not json", headers={"content-type": "application/json"}
            ),
            await client.post("/v1/callbacks/truecaller", json={"requestId": "nope", "status": "user_rejected"}),
            await client.post("/v1/sessions", json={"provider": "truecaller", "phone": "12"}),
        ]
        assert [r.status_code for r in bad] == [400, 404, 400]
        assert rows(db) == []
        sid = new_session_id()
        sessions = running.gateway.sessions
        await sessions.create(session_id=sid, provider="truecaller", ttl=60)
        outcomes = [Outcome("rejected", "user_rejected"), Outcome("expired", "timeout")] * 10
        wins = await asyncio.gather(*(sessions.finish(sid, o) for o in outcomes))
        assert sum(wins) == 1
        await receiver.until(1)
    assert len(rows(db)) == 1 and len(receiver.received) == 1


async def test_the_operator_lists_failed_webhooks_and_sends_them_again(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    config = tmp_path / "c.toml"
    config.write_text(f'[database]\npath = "{db}"\n')
    receiver = Receiver(statuses=[410])
    async with receiving(receiver) as url, gateway(db, url) as running:
        await finished(running)
        await until(lambda: rows(db)[0]["status"] == "failed")
        [row] = rows(db)
        listed = await asyncio.to_thread(run_cli, ["webhooks", "list", "--failed", "--config", str(config)])
        assert row["id"] in listed and "failed" in listed and PHONE not in listed and "u-1" not in listed
        assert "0 webhook" in await asyncio.to_thread(
            run_cli, ["webhooks", "retry", "msg_unknown", "--config", str(config)]
        )
        out = await asyncio.to_thread(run_cli, ["webhooks", "retry", row["id"], "--config", str(config)])
        assert out.startswith("1 webhook")
        assert running.gateway.webhooks is not None
        running.gateway.webhooks.wake()  # else its next look at the outbox finds it within seconds
        await until(lambda: rows(db)[0]["status"] == "delivered")
    assert len(set(receiver.ids())) == 1 and len(receiver.received) == 2


def run_cli(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(argv)
    return out.getvalue()


async def test_kill_9_between_the_outcome_and_its_delivery_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    first = Receiver(hold=asyncio.Event())
    second = Receiver()
    env = {"GATEWAY_WEBHOOK_SECRET": SECRET}

    def config(url: str) -> dict[str, Any]:
        return {
            "database": {"path": str(db)},
            "logging": {"format": "json"},
            "providers": {"veriphone": {"enabled": False}},
            "webhooks": {"url": url, "backoff": 0.05},
        }

    async with receiving(first) as url1:
        async with gateway_process(tmp_path, config(url1), env) as (proc, base):
            async with httpx.AsyncClient(base_url=base, timeout=5) as client:
                created = await client.post("/v1/sessions", json={"provider": "truecaller"})
                nonce = created.json()["truecaller"]["request_nonce"]
                answer = await client.post(
                    "/v1/callbacks/truecaller", json={"requestId": nonce, "status": "user_rejected"}
                )
                assert answer.status_code == 200
            await first.until(1)  # the delivery is in flight, unanswered
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        first.hold.set()
    [row] = rows(db)
    assert row["status"] == "pending"  # the outcome and its webhook were committed together
    async with receiving(second) as url2, gateway_process(tmp_path, config(url2), env):
        await second.until(1)
        await until(lambda: rows(db)[0]["status"] == "delivered")
    assert second.ids() == [row["id"]] == first.ids()
    event = Webhook(SECRET).verify(second.received[0][1], second.received[0][0])
    assert event["data"]["status"] == "rejected" and event["data"]["reason"] == "user_rejected"


async def test_retention_deletes_finished_webhooks_and_keeps_pending_ones(tmp_path: Path) -> None:
    from gateway.broker import Broker
    from gateway.records import OutboxResult
    from gateway.retention import Retention
    from gateway.sessions import Sessions
    from gateway.storage.sqlite import SqliteStore
    from gateway.webhooks.signing import completed_event

    now = [1_000_000.0]
    store = SqliteStore(str(tmp_path / "r.db"))
    await store.open()
    try:
        sessions = Sessions(store, Broker(16), clock=lambda: now[0])
        sessions.webhook_event = completed_event
        done, waiting = new_session_id(), new_session_id()
        for sid in (done, waiting):
            await sessions.create(session_id=sid, provider="truecaller", ttl=60, phone=PHONE)
            await sessions.finish(sid, Outcome("verified", phone=PHONE))
        [first, _] = await store.outbox_due(now[0], 10)
        await store.outbox_record([OutboxResult(first.id, "delivered", 1, now[0], now[0], 200, None)])
        retention = Retention(store, 100, clock=lambda: now[0])
        now[0] += 50
        await retention.purge_once()
        assert len(rows(tmp_path / "r.db")) == 2  # not yet
        now[0] += 100
        await retention.purge_once()
        assert [r["status"] for r in rows(tmp_path / "r.db")] == ["pending"]
    finally:
        await store.close()
