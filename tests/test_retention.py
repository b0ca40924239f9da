"""Retention: personal data of finished sessions is purged after `sessions.retention` seconds."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.broker import Broker
from gateway.outcome import REJECTED, VERIFIED, Outcome, scrub_outcome
from gateway.retention import Retention, purge_interval
from gateway.sessions import Sessions
from gateway.storage.base import Store
from tests.pg import sql_rows
from tests.utils import make_settings, run_gateway

PHONE = "+919876543210"
USER_REF = "user-4711"
PROFILE = {"first_name": "Asha", "last_name": "Verma", "email": "asha@example.org", "country": "IN"}


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db(store: Store) -> Store:
    """The store of each backend (tests/conftest.py)."""
    return store


@pytest.fixture
def sessions(db: Store, clock: Clock) -> Sessions:
    return Sessions(db, Broker(), clock=clock)


async def _finished(sessions: Sessions, session_id: str, outcome: Outcome | None = None) -> None:
    await sessions.create(
        session_id=session_id,
        provider="truecaller",
        ttl=60,
        phone=PHONE,
        user_ref=USER_REF,
        provider_ref=f"nonce-{session_id}",
        provider_data={"deeplink": f"truecallersdk://x?requestNonce=nonce-{session_id}"},
    )
    await sessions.progress(session_id, "flow_invoked")
    await sessions.finish(session_id, outcome or Outcome(VERIFIED, phone=PHONE, profile=dict(PROFILE)))


async def _row(db: Store, session_id: str) -> dict[str, Any]:
    [row] = await sql_rows(db, "SELECT * FROM sessions WHERE id = ?", session_id)
    events = await sql_rows(db, "SELECT kind, data FROM session_events WHERE session_id = ? ORDER BY id", session_id)
    return {**row, "events": [(e["kind"], json.loads(e["data"])) for e in events]}


async def test_personal_data_is_purged_once_retention_has_passed(
    db: Store, sessions: Sessions, clock: Clock
) -> None:
    retention = Retention(db, 100, clock=clock)
    await _finished(sessions, "s" * 22)
    before = await _row(db, "s" * 22)
    completed_at = before["completed_at"]

    clock.now = completed_at + 99
    assert await retention.purge_once() == 0
    assert (await _row(db, "s" * 22))["phone"] == PHONE

    clock.now = completed_at + 100
    assert await retention.purge_once() == 1
    after = await _row(db, "s" * 22)
    assert after["phone"] is None
    assert after["user_ref"] is None
    assert after["provider_data"] is None
    assert after["purged_at"] == clock.now
    # What operations need stays: provider, status, reason, timestamps.
    for key in ("provider", "status", "reason", "created_at", "updated_at", "expires_at", "completed_at"):
        assert after[key] == before[key], key
    outcome = json.loads(after["outcome"])
    assert outcome == {**json.loads(before["outcome"]), "phone": None, "user_ref": None, "profile": None}
    assert outcome["status"] == VERIFIED and outcome["provider"] == "truecaller"
    # The stored outcome event (replayed to reconnecting streams) is scrubbed too; progress is untouched.
    assert after["events"] == [("progress", {"stage": "flow_invoked"}), ("outcome", outcome)]
    for secret in (PHONE, USER_REF, PROFILE["first_name"], PROFILE["email"], "requestNonce"):
        assert secret not in json.dumps(after), secret
    # The session still reads as a normal, terminal session.
    session = await sessions.get("s" * 22)
    assert session is not None and session.terminal and session.outcome == outcome


async def test_pending_and_recent_sessions_are_kept(db: Store, sessions: Sessions, clock: Clock) -> None:
    retention = Retention(db, 100, clock=clock)
    await sessions.create(session_id="p" * 22, provider="truecaller", ttl=10_000, phone=PHONE, user_ref=USER_REF)
    await _finished(sessions, "o" * 22, Outcome(REJECTED, "user_rejected"))
    clock.now += 150
    await _finished(sessions, "r" * 22)  # completed only now
    assert await retention.purge_once() == 1
    assert (await _row(db, "o" * 22))["purged_at"] is not None
    assert (await _row(db, "r" * 22))["phone"] == PHONE
    pending = await _row(db, "p" * 22)
    assert (pending["status"], pending["phone"], pending["purged_at"]) == ("pending", PHONE, None)


async def test_a_pass_works_in_batches_and_purges_each_session_once(
    db: Store, sessions: Sessions, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    retention = Retention(db, 0, clock=clock, batch=2)
    for i in range(5):
        await _finished(sessions, f"batch-session-{i:08d}")
    purge, batches = db.purge_personal_data, []

    async def counted(**kw: Any) -> int:
        batches.append(await purge(**kw))
        return batches[-1]

    monkeypatch.setattr(db, "purge_personal_data", counted)
    assert await retention.purge_once() == 5
    assert batches == [2, 2, 1]  # one transaction each
    first = [(await _row(db, f"batch-session-{i:08d}"))["purged_at"] for i in range(5)]
    clock.now += 1000
    assert await retention.purge_once() == 0
    assert [(await _row(db, f"batch-session-{i:08d}"))["purged_at"] for i in range(5)] == first


def test_scrub_outcome_keeps_everything_but_personal_fields() -> None:
    body = {
        "status": "verified",
        "reason": None,
        "provider": "veriphone",
        "phone": PHONE,
        "user_ref": USER_REF,
        "profile": None,
        "veriphone": {"status": 8192, "method": 20},
        "completed_at": "2026-11-22T10:00:00Z",
    }
    scrubbed = json.loads(scrub_outcome(json.dumps(body)) or "")
    assert scrubbed == {**body, "phone": None, "user_ref": None}
    assert scrub_outcome(None) is None


@pytest.mark.parametrize(("retention", "interval"), [(900, 60), (120, 60), (60, 30), (10, 5), (1, 1), (0, 1)])
def test_interval_is_half_the_retention_capped_at_a_minute(retention: float, interval: float) -> None:
    assert purge_interval(retention) == interval


async def test_run_purges_every_interval_and_survives_a_failing_pass(
    db: Store, sessions: Sessions, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    retention = Retention(db, 20, clock=clock)
    await _finished(sessions, "l" * 22)
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 1:
            clock.now += 20  # the session is now due
        elif len(slept) == 2:
            assert (await _row(db, "l" * 22))["purged_at"] == clock.now
            await db.close()  # the next pass fails: logged, and the loop goes on
        else:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await retention.run(sleep=fake_sleep)
    assert slept == [10, 10, 10]
    assert "retention pass failed" in caplog.text


async def test_the_gateway_runs_retention_in_the_background(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "gw.db", {"sessions": {"retention": 30}})
    async with run_gateway(settings) as running, running.client() as client:
        assert (await client.get("/healthz")).status_code == 200  # answered once startup is done
        gateway = running.gateway
        assert gateway.retention.retention == 30 and gateway.retention.interval == 15
        assert gateway.retention.clock is gateway.sessions.clock
        task = gateway.periodic["retention"]
        assert not task.done()
    assert task.cancelled()
