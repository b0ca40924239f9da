"""Sandbox mode shows the webhook: its own fake site backend receives each outcome and verifies the signature.

A refused delivery (a forged or stale signature) is answered 401 and still listed, marked not
verified, with nothing read from its body.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from gateway.records import OutboxEntry
from gateway.sandbox import MAX_WEBHOOK_BYTES, WEBHOOKS_LIST, WEBHOOKS_RECEIVE, apply_sandbox
from gateway.sessions import public_ref
from gateway.storage.base import Store
from gateway.webhooks.signing import TOLERANCE, completed_event, headers, new_secret, parse_secret
from tests.utils import make_settings, run_sandbox_gateway

pytestmark = pytest.mark.timeout(20)

DIALOG = "/sandbox/truecaller/dialog"
PHONE = "+919812345678"


async def delivered(store: Store) -> OutboxEntry:
    """The one outbox row, once the worker has recorded its delivery (bounded, polled)."""
    async with asyncio.timeout(10):
        while True:
            rows = await store.outbox_list(failed_only=False, limit=10)
            assert len(rows) == 1, rows
            if rows[0].status != "pending":
                return rows[0]
            await asyncio.sleep(0.05)


async def listed(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    answer = await client.get(WEBHOOKS_LIST)
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    deliveries: list[dict[str, Any]] = answer.json()["deliveries"]
    return deliveries


async def test_a_sandbox_verification_shows_one_verified_webhook(tmp_path: Path) -> None:
    async with run_sandbox_gateway(make_settings(tmp_path / "g.db")) as running, running.client() as client:
        assert running.settings.webhooks.url == running.url + WEBHOOKS_RECEIVE
        assert await listed(client) == []
        s = (await client.post("/v1/sessions", json={"provider": "truecaller", "phone": PHONE})).json()
        form = {"deeplink": s["truecaller"]["deeplink"], "action": "continue", "phone": PHONE, "first": "Asha"}
        assert (await client.post(DIALOG, data=form)).status_code == 200

        # The row is delivered (the receiver answered 204) once: exactly one delivery is listed.
        row = await delivered(running.gateway.store)
        assert (row.status, row.attempts, row.last_status) == ("delivered", 1, 204)
        [delivery] = await listed(client)
        assert delivery["id"] == row.id and delivery["id"].startswith("msg_")
        assert delivery["signature_verified"] is True
        assert (delivery["type"], delivery["status"], delivery["reason"]) == ("session.completed", "verified", None)
        assert delivery["session"] == public_ref(s["id"])
        assert delivery["received_at"].endswith("Z")
        # The receiver keeps no personal data.
        assert PHONE not in str(delivery) and "Asha" not in str(delivery) and s["id"] not in str(delivery)

        page = await client.get("/demo")
        assert 'id="webhooks"' in page.text and WEBHOOKS_LIST in page.text


async def test_a_forged_or_stale_webhook_is_refused_and_listed_unverified(tmp_path: Path) -> None:
    async with run_sandbox_gateway(make_settings(tmp_path / "g.db")) as running, running.client() as client:
        now = time.time()
        msg_id, _, body = completed_event("a-session", {"status": "verified", "phone": PHONE}, now)

        # Well formed and signed, just not with the gateway's secret.
        other = new_secret()
        forged = headers([parse_secret(other)], msg_id, int(now), body.encode())
        assert Webhook(other).verify(body, forged)
        assert (await client.post(WEBHOOKS_RECEIVE, content=body, headers=forged)).status_code == 401
        # Signed with the gateway's own secret, but too old: the timestamp is checked too.
        keys = [parse_secret(secret) for secret in running.settings.webhooks.secrets]
        stale = headers(keys, msg_id, int(now) - TOLERANCE - 60, body.encode())
        assert (await client.post(WEBHOOKS_RECEIVE, content=body, headers=stale)).status_code == 401
        # No signature at all.
        assert (await client.post(WEBHOOKS_RECEIVE, content=body)).status_code == 401
        # Too large to be an event: refused before any check, not listed.
        big = b"x" * (MAX_WEBHOOK_BYTES + 1)
        assert (await client.post(WEBHOOKS_RECEIVE, content=big, headers=forged)).status_code == 413

        refused = await listed(client)
        assert [d["id"] for d in refused] == ["", msg_id, msg_id]  # newest first
        for d in refused:
            assert d["signature_verified"] is False
            assert (d["type"], d["status"], d["reason"], d["session"]) == (None, None, None, None)
        assert PHONE not in str(refused)

        # The same event, fresh and signed with the configured secret, is taken.
        fresh = headers(keys, msg_id, int(time.time()), body.encode())
        assert (await client.post(WEBHOOKS_RECEIVE, content=body, headers=fresh)).status_code == 204
        newest = (await listed(client))[0]
        assert newest["signature_verified"] is True and newest["session"] == public_ref("a-session")


def test_the_sandbox_keeps_an_operators_own_receiver(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    own = new_secret()
    settings = make_settings(tmp_path / "g.db")
    operators = dataclasses.replace(settings.webhooks, url="https://hooks.example.com/v", secrets=(own,))
    with caplog.at_level(logging.INFO, logger="gateway.sandbox"):
        mine = apply_sandbox(dataclasses.replace(settings, webhooks=operators), ("127.0.0.1", 8099))
    assert mine.webhooks.url == "https://hooks.example.com/v" and mine.webhooks.secrets == (own,)
    assert "own fake receiver" not in caplog.text and own not in caplog.text
    caplog.clear()

    # No url configured: the sandbox receives its own webhooks, signed with a fresh secret it never logs.
    with caplog.at_level(logging.INFO, logger="gateway.sandbox"):
        default = apply_sandbox(settings, ("127.0.0.1", 8099))
    assert default.webhooks.url == "http://127.0.0.1:8099" + WEBHOOKS_RECEIVE
    [secret] = default.webhooks.secrets
    assert secret.startswith("whsec_") and len(parse_secret(secret)) == 32
    assert "own fake receiver" in caplog.text
    assert secret not in caplog.text and secret.removeprefix("whsec_") not in caplog.text
    # A secret the operator set in the environment is kept, with the sandbox's receiver.
    with_secret = dataclasses.replace(settings, webhooks=dataclasses.replace(settings.webhooks, secrets=(own,)))
    kept = apply_sandbox(with_secret, ("127.0.0.1", 8099))
    assert kept.webhooks.secrets == (own,) and kept.webhooks.url.endswith(WEBHOOKS_RECEIVE)
