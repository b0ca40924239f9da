"""Webhooks end to end: a real gateway, a real receiver on loopback, the outbox in a real SQLite file
(and the outbox's retention on each backend)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.cli import main
from gateway.config import settings_from_dict
from gateway.logs import JsonFormatter
from gateway.outcome import Outcome
from gateway.sessions import new_session_id
from gateway.storage.base import Store
from gateway.webhooks import delivery
from gateway.webhooks.signing import new_secret
from tests.pg import sql_rows
from tests.test_shutdown import gateway_process
from tests.utils import Running, _serve, listening_socket, merge, serve_app

pytestmark = pytest.mark.timeout(30)

SECRET = new_secret()
PHONE = "+15551234567"
USER_REF = "user-ref-7f3a9c"


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
async def gateway(
    db: Path, hook_url: str, *, secret: str = SECRET, config: dict[str, Any] | None = None, **webhooks: Any
) -> AsyncIterator[Running]:
    raw = {
        "database": {"path": str(db)},
        "logging": {"format": "json"},
        "webhooks": {"url": hook_url, "backoff": 0.05, **webhooks},
    }
    settings = settings_from_dict(merge(raw, config or {}), env={"GATEWAY_WEBHOOK_SECRET": secret})
    async with _serve(settings, listening_socket()) as running:
        async with running.client() as client:
            assert (await client.get("/readyz")).status_code == 200  # answered once startup is done
        yield running


async def finished(running: Running, outcome: Outcome | None = None) -> str:
    sid = new_session_id()
    sessions = running.gateway.sessions
    await sessions.create(session_id=sid, provider="truecaller", ttl=60, phone=PHONE, user_ref=USER_REF)
    assert await sessions.finish(sid, outcome or Outcome("verified", phone=PHONE))
    return sid


def rows(db: Path) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM webhook_outbox ORDER BY enqueued_at")]


def statuses(db: Path) -> dict[str, str]:
    return {r["id"]: r["status"] for r in rows(db)}


async def until(check: Callable[[], bool], timeout: float = 10) -> None:
    """Wait for a state the gateway writes to its database (polled, bounded)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def personal_data_in_logs(caplog: pytest.LogCaptureFixture, *needles: str) -> list[str]:
    """The gateway's log lines, as its JSON formatter writes them, that contain any needle."""
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records if r.name.startswith(("gateway", "uvicorn"))]
    assert lines, "nothing was logged: the check would prove nothing"
    return [line for line in lines if any(n in line for n in needles)]


async def test_every_event_is_signed_with_each_rotation_secret_and_verifies_as_a_receiver_would(
    tmp_path: Path,
) -> None:
    old, new = new_secret(), new_secret()
    receiver = Receiver()
    async with receiving(receiver) as url, gateway(tmp_path / "g.db", url, secret=f"{old} {new}") as running:
        sessions = running.gateway.sessions
        expected = {await finished(running): "verified"}
        # An outcome stored ten minutes ago (the receiver was down, say): the signature carries
        # the time of the attempt, else every receiver would refuse the late delivery as stale.
        sid = new_session_id()
        await sessions.create(session_id=sid, provider="truecaller", ttl=60, phone=PHONE, user_ref=USER_REF)
        sessions.clock = lambda: time.time() - 600
        assert await sessions.finish(sid, Outcome("rejected", "user_rejected"))
        sessions.clock = time.time
        expected[sid] = "rejected"
        await receiver.until(2)
    assert len(receiver.received) == 2
    for headers, body, _ in receiver.received:
        assert len(headers["webhook-signature"].split()) == 2
        for secret in (old, new):  # a receiver that knows only one of them, before or after the rotation
            event = Webhook(secret).verify(body, headers)
            assert event["type"] == "session.completed"
            data = event["data"]
            assert data["status"] == expected[data["session_id"]] and data["user_ref"] == USER_REF
            with pytest.raises(WebhookVerificationError):
                Webhook(secret).verify(body.replace(USER_REF.encode(), b"user-ref-other"), headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(SECRET).verify(body, headers)  # a secret that is not one of the gateway's
    assert {json.loads(b)["data"]["session_id"] for _, b, _ in receiver.received} == set(expected)
    assert all(r["status"] == "delivered" and r["attempts"] == 1 for r in rows(tmp_path / "g.db"))


async def test_500_twice_then_200_delivers_three_times_with_one_id_then_never_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    db = tmp_path / "g.db"
    receiver = Receiver(statuses=[500, 503])
    async with receiving(receiver) as url, gateway(db, url) as running:
        sid = await finished(running)
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
    assert personal_data_in_logs(caplog, PHONE, USER_REF, sid) == []


async def test_a_4xx_is_not_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    db = tmp_path / "g.db"
    receiver = Receiver(statuses=[400])
    async with receiving(receiver) as url, gateway(db, url) as running:
        sid = await finished(running)
        await until(lambda: rows(db)[0]["status"] == "failed")
        assert running.gateway.webhooks is not None
        assert await running.gateway.webhooks.pass_once() == 0
    assert len(receiver.received) == 1
    assert (rows(db)[0]["attempts"], rows(db)[0]["last_status"], rows(db)[0]["last_error"]) == (1, 400, "refused")
    assert personal_data_in_logs(caplog, PHONE, USER_REF, sid) == []


async def test_429_waits_for_retry_after(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    receiver = Receiver(statuses=[(429, {"retry-after": "1"})])
    async with receiving(receiver) as url, gateway(db, url) as running:
        await finished(running)
        await receiver.until(2)
    first, second = receiver.received[0][2], receiver.received[1][2]
    assert second - first >= 0.9  # the receiver asked for a second; the backoff alone is 0.05 s
    assert receiver.ids()[0] == receiver.ids()[1]


async def test_an_unreadable_retry_after_still_counts_the_attempt_and_backs_off(tmp_path: Path) -> None:
    # "²" passes str.isdigit() but not float(): the parse used to raise, the attempt was never
    # recorded, and the row, still due, was sent again at once, with no backoff and no limit.
    db = tmp_path / "g.db"
    receiver = Receiver(statuses=[(503, {"retry-after": "\u00b2"})] * 3)
    async with receiving(receiver) as url, gateway(db, url, max_attempts=2) as running:
        await finished(running)
        await until(lambda: rows(db)[0]["status"] != "pending", timeout=5)
        assert running.gateway.webhooks is not None
        assert await running.gateway.webhooks.pass_once() == 0
    [row] = rows(db)
    assert (row["status"], row["attempts"], row["last_status"]) == ("failed", 2, 503)
    assert len(receiver.received) == 2


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


async def test_a_row_that_ends_while_a_pass_waits_for_a_slot_is_not_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One slot. X is in flight when a pass reads [Y, Z, X] (Y and Z were stored with an earlier
    # time: the wall clock stepped back, say). The pass starts Y when X's request ends and
    # waits for Z while X's result is written; X is then neither pending-in-flight nor due.
    db = tmp_path / "g.db"
    receiver = Receiver(hold=asyncio.Event(), delay=0.15)
    async with receiving(receiver) as url, gateway(db, url, concurrency=1) as running:
        sender, sessions = running.gateway.webhooks, running.gateway.sessions
        assert sender is not None
        x = await finished(running)
        await receiver.until(1)
        [x_id] = receiver.ids()
        read_all_three = asyncio.Event()
        due = sender.store.outbox_due

        async def watched_due(now: float, limit: int) -> list[Any]:
            items = await due(now, limit)
            if len(items) == 3:
                read_all_three.set()
            return items

        monkeypatch.setattr(sender.store, "outbox_due", watched_due)
        monkeypatch.setattr(sessions, "on_webhook", None)  # one pass for both, woken below
        monkeypatch.setattr(sessions, "clock", lambda: time.time() - 60)
        later = [await finished(running), await finished(running)]
        monkeypatch.setattr(sessions, "clock", time.time)
        sender.wake()
        async with asyncio.timeout(5):
            await read_all_three.wait()  # the pass holds [Y, Z, X] and waits for X's slot
        receiver.hold.set()
        await until(lambda: set(statuses(db).values()) == {"delivered"})
        assert await sender.pass_once() == 0
    assert sorted(receiver.ids()) == sorted([x_id, *(r["id"] for r in rows(db) if r["session_id"] in later)])
    assert x in {r["session_id"] for r in rows(db)} and receiver.ids()[0] == x_id


async def test_rejected_requests_repeats_and_lost_races_enqueue_nothing(tmp_path: Path) -> None:
    db = tmp_path / "g.db"
    receiver = Receiver()
    disabled = {"providers": {"veriphone": {"enabled": False}}}
    async with (
        receiving(receiver) as url,
        gateway(db, url, config=disabled) as running,
        running.client() as client,
    ):
        bad = [
            await client.post(
                "/v1/callbacks/truecaller", content=b"{not json", headers={"content-type": "application/json"}
            ),
            await client.post("/v1/callbacks/truecaller", json={"requestId": "nope", "status": "user_rejected"}),
            await client.post("/v1/sessions", json={"provider": "truecaller", "phone": "12"}),
            await client.post("/v1/sessions", json={"provider": "veriphone"}),
        ]
        assert [r.status_code for r in bad] == [400, 404, 400, 409]
        assert bad[3].json()["error"]["code"] == "provider_disabled", bad[3].text
        assert rows(db) == []
        # A real callback enqueues one event; the same callback again (a provider retry) none.
        created = await client.post("/v1/sessions", json={"provider": "truecaller"})
        nonce = created.json()["truecaller"]["request_nonce"]
        callback = {"requestId": nonce, "status": "user_rejected"}
        assert (await client.post("/v1/callbacks/truecaller", json=callback)).status_code == 200
        assert len(rows(db)) == 1
        assert (await client.post("/v1/callbacks/truecaller", json=callback)).status_code < 500
        assert len(rows(db)) == 1
        # Twenty writers race to finish one session: one wins, one event.
        sid = new_session_id()
        sessions = running.gateway.sessions
        await sessions.create(session_id=sid, provider="truecaller", ttl=60)
        outcomes = [Outcome("rejected", "user_rejected"), Outcome("expired", "timeout")] * 10
        wins = await asyncio.gather(*(sessions.finish(sid, o) for o in outcomes))
        assert sum(wins) == 1
        await receiver.until(2)
        assert running.gateway.webhooks is not None
        await until(lambda: all(r["status"] == "delivered" for r in rows(db)))
        assert await running.gateway.webhooks.pass_once() == 0
    assert [r["session_id"] for r in rows(db)] == [created.json()["id"], sid]
    assert len(receiver.received) == 2 and len(set(receiver.ids())) == 2


async def test_the_operator_lists_failed_webhooks_and_sends_them_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CLI is another process in real life: the gateway must notice its change by itself,
    # on its idle look at the outbox (5 s in production, shortened here).
    monkeypatch.setattr(delivery, "IDLE_POLL", 0.1)
    db = tmp_path / "g.db"
    config = tmp_path / "c.toml"
    config.write_text(f'[database]\npath = "{db}"\n')
    cfg = ["--config", str(config)]
    receiver = Receiver(statuses=[410, 410])
    async with receiving(receiver) as url, gateway(db, url) as running:
        sids = [await finished(running), await finished(running)]
        await until(lambda: [r["status"] for r in rows(db)] == ["failed", "failed"])
        first, second = (r["id"] for r in rows(db))

        code, listed = await cli(["webhooks", "list", "--failed", *cfg])
        assert code == 0 and first in listed and second in listed and listed.count("\tfailed\t") == 2
        for private in (PHONE, USER_REF, *sids, "{"):  # no payload, nothing that leads to a person
            assert private not in listed

        assert await cli(["webhooks", "retry", "msg_unknown", *cfg]) == (1, "0 webhook(s) will be sent again\n")
        assert await cli(["webhooks", "retry", first, *cfg]) == (0, "1 webhook(s) will be sent again\n")
        await until(lambda: statuses(db) == {first: "delivered", second: "failed"})
        assert await cli(["webhooks", "retry", "--all-failed", *cfg]) == (0, "1 webhook(s) will be sent again\n")
        await until(lambda: statuses(db) == {first: "delivered", second: "delivered"})
        assert await cli(["webhooks", "retry", "--all-failed", *cfg]) == (0, "0 webhook(s) will be sent again\n")
        code, listed = await cli(["webhooks", "list", "--failed", *cfg])
        assert code == 0 and first not in listed and second not in listed
        code, listed = await cli(["webhooks", "list", *cfg])
        assert listed.count("\tdelivered\t1\t") == 2  # fresh attempts after a retry
    assert sorted(receiver.ids()) == sorted([first, first, second, second])


async def cli(argv: list[str]) -> tuple[int, str]:
    """`gateway ...` through `gateway.cli.main`, off the loop (it runs its own)."""

    def run() -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(argv)
        return code, out.getvalue()

    return await asyncio.to_thread(run)


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


async def test_shutdown_lets_a_delivery_in_flight_end_and_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "g.db"
    receiver = Receiver(hold=asyncio.Event())
    draining = asyncio.Event()
    async with receiving(receiver) as url:
        async with gateway(db, url, timeout=10) as running:
            sender = running.gateway.webhooks
            assert sender is not None
            drain = sender.drain

            async def watched_drain(timeout: float) -> None:
                draining.set()
                await drain(timeout)

            monkeypatch.setattr(sender, "drain", watched_drain)
            await finished(running)
            await receiver.until(1)

            async def answer_once_draining() -> None:
                async with asyncio.timeout(10):
                    await draining.wait()
                receiver.hold.set()  # the receiver answers while the gateway shuts down

            answering = asyncio.create_task(answer_once_draining())
        await answering  # the gateway has stopped and closed its database
    [row] = rows(db)
    assert (row["status"], row["attempts"], row["last_status"]) == ("delivered", 1, 200)


async def test_shutdown_does_not_wait_for_a_hanging_receiver_and_the_event_survives_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "g.db"
    hanging, answering = Receiver(hold=asyncio.Event()), Receiver()
    quick_stop = {"server": {"shutdown_timeout": 0.5, "shutdown_spread": 0}}
    async with receiving(hanging) as url:
        async with gateway(db, url, timeout=20, config=quick_stop) as running:
            await finished(running)
            await hanging.until(1)
            stopping = time.monotonic()
        stopped = time.monotonic() - stopping
        hanging.hold.set()
    assert stopped < 3, stopped  # shutdown_timeout bounds it, not webhooks.timeout
    [row] = rows(db)
    assert (row["status"], row["attempts"]) == ("pending", 0)  # cut, not counted, not failed
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    async with receiving(answering) as url, gateway(db, url):
        await answering.until(1)
        await until(lambda: rows(db)[0]["status"] == "delivered")
    assert answering.ids() == [row["id"]] == hanging.ids()


async def test_retention_deletes_finished_webhooks_and_keeps_pending_ones(store: Store) -> None:
    from gateway.broker import Broker
    from gateway.records import OutboxResult
    from gateway.retention import Retention
    from gateway.sessions import Sessions
    from gateway.webhooks.signing import completed_event

    now = [1_000_000.0]
    start = now[0]
    sessions = Sessions(store, Broker(16), clock=lambda: now[0])
    sessions.webhook_event = completed_event
    for _ in range(3):
        sid = new_session_id()
        await sessions.create(session_id=sid, provider="truecaller", ttl=60, phone=PHONE)
        await sessions.finish(sid, Outcome("verified", phone=PHONE))
    delivered, failed, pending = (item.id for item in await store.outbox_due(now[0], 10))
    await store.outbox_record([OutboxResult(delivered, "delivered", 1, start, start, 200, None)])
    await store.outbox_record([OutboxResult(failed, "failed", 3, start + 30, start + 30, 500, "status")])
    await store.outbox_record([OutboxResult(pending, "pending", 5, start + 10**6, None, 503, "status")])
    retention = Retention(store, 100, clock=lambda: now[0])  # sessions.retention = 100 s

    async def left() -> set[str]:
        return {r["id"] for r in await sql_rows(store, "SELECT id FROM webhook_outbox")}

    now[0] = start + 99
    await retention.purge_once()
    assert await left() == {delivered, failed, pending}  # not yet: retention counts from the end
    now[0] = start + 101
    await retention.purge_once()
    assert await left() == {failed, pending}
    now[0] = start + 131
    await retention.purge_once()
    assert await left() == {pending}
    now[0] = start + 10**7  # a pending event is never dropped, however old
    await retention.purge_once()
    assert await left() == {pending}
