"""Sandbox mode shows the webhook: its own fake site backend receives each outcome and verifies the signature."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from gateway.sandbox import WEBHOOKS_LIST, WEBHOOKS_RECEIVE, apply_sandbox
from gateway.webhooks.signing import completed_event, headers, new_secret, parse_secret
from tests.utils import make_settings, run_sandbox_gateway

pytestmark = pytest.mark.timeout(20)

DIALOG = "/sandbox/truecaller/dialog"
PHONE = "+919812345678"


async def deliveries(client: httpx.AsyncClient, at_least: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(10):
        while True:  # the worker delivers right after the commit; poll what the receiver kept
            listed: list[dict[str, Any]] = (await client.get(WEBHOOKS_LIST)).json()["deliveries"]
            if len(listed) >= at_least:
                return listed
            await asyncio.sleep(0.05)


async def test_a_sandbox_verification_shows_one_verified_webhook(tmp_path: Path) -> None:
    async with run_sandbox_gateway(make_settings(tmp_path / "g.db")) as running, running.client() as client:
        assert (await client.get(WEBHOOKS_LIST)).json() == {"deliveries": []}
        s = (await client.post("/v1/sessions", json={"provider": "truecaller", "phone": PHONE})).json()
        form = {"deeplink": s["truecaller"]["deeplink"], "action": "continue", "phone": PHONE, "first": "Asha"}
        assert (await client.post(DIALOG, data=form)).status_code == 200
        [delivery] = await deliveries(client, 1)
        assert delivery["signature_verified"] is True
        assert (delivery["type"], delivery["status"]) == ("session.completed", "verified")
        assert delivery["id"].startswith("msg_")
        # the receiver keeps no personal data
        assert PHONE not in str(delivery) and "Asha" not in str(delivery)

        # a forged delivery is refused (401) and listed as not verified
        secret = new_secret()
        msg_id, _, body = completed_event(s["id"], {"status": "verified"}, time.time())
        forged = headers([parse_secret(secret)], msg_id, int(time.time()), body.encode())
        assert Webhook(secret).verify(body, forged)  # well formed, just not signed with the gateway's key
        answer = await client.post(WEBHOOKS_RECEIVE, content=body, headers=forged)
        assert answer.status_code == 401
        newest = (await client.get(WEBHOOKS_LIST)).json()["deliveries"][0]
        assert newest["id"] == msg_id and newest["signature_verified"] is False and newest["status"] is None

        page = await client.get("/demo")
        assert 'id="webhooks"' in page.text and WEBHOOKS_LIST in page.text


def test_the_sandbox_keeps_an_operators_own_receiver(tmp_path: Path) -> None:
    own = new_secret()
    settings = make_settings(tmp_path / "g.db")
    operators = dataclasses.replace(settings.webhooks, url="https://hooks.example.com/v", secrets=(own,))
    mine = apply_sandbox(dataclasses.replace(settings, webhooks=operators), ("127.0.0.1", 8099))
    assert mine.webhooks.url == "https://hooks.example.com/v" and mine.webhooks.secrets == (own,)
    default = apply_sandbox(settings, ("127.0.0.1", 8099))
    assert default.webhooks.url == "http://127.0.0.1:8099" + WEBHOOKS_RECEIVE
    assert len(default.webhooks.secrets) == 1 and default.webhooks.secrets[0].startswith("whsec_")
