"""Scripted numbers in --sandbox: a Truecaller session created with one plays itself, no click needed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.sandbox import SCRIPTED
from tests.utils import make_settings, run_sandbox_gateway

pytestmark = pytest.mark.timeout(30)

EXPECTED = {
    "+15005550001": ("verified", None),
    "+15005550002": ("rejected", "user_rejected"),
    "+15005550003": ("rejected", "use_another_number"),
    "+15005550004": ("failed", "phone_mismatch"),
    "+15005550005": ("verified", None),
    "+15005550006": ("failed", "provider_error"),
}
EXPECTED_VERIPHONE = {
    "+15005550011": ("verified", None),
    "+15005550012": ("rejected", "user_cancelled"),
    "+15005550013": ("failed", "destination_mismatch"),
    "+15005550014": ("failed", "expired"),
}


async def outcome_of(
    client: httpx.AsyncClient, phone: str, provider: str = "truecaller"
) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    created = await client.post("/v1/sessions", json={"provider": provider, "phone": phone})
    assert created.status_code == 201, created.text
    async with asyncio.timeout(15):
        while True:  # long polls: each returns when the session ends or `wait` runs out
            answer = (await client.get(created.json()["status_url"], params={"wait": 5})).json()
            if answer["outcome"] is not None:
                return answer["outcome"], time.monotonic() - started


async def test_each_scripted_number_forces_its_outcome(tmp_path: Path) -> None:
    assert set(EXPECTED) | {"+15005550007"} == set(SCRIPTED)
    settings = make_settings(tmp_path / "g.db", {"providers": {"truecaller": {"callback_timeout": 20}}})
    async with run_sandbox_gateway(settings) as running, running.client() as client:
        results = await asyncio.gather(*(outcome_of(client, phone) for phone in EXPECTED))
    for (phone, (status, reason)), (outcome, _) in zip(EXPECTED.items(), results, strict=True):
        assert (outcome["status"], outcome["reason"]) == (status, reason), phone
        if status == "verified":
            assert outcome["phone"] == phone
    slow = results[list(EXPECTED).index("+15005550005")][1]
    assert slow >= 2.0  # the slow profile host really was slow


async def test_the_expired_number_ends_at_the_ttl_and_ordinary_numbers_wait_for_a_person(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "g.db", {"providers": {"truecaller": {"callback_timeout": 1}}})
    async with run_sandbox_gateway(settings) as running, running.client() as client:
        (expired, _), (ordinary, _) = await asyncio.gather(
            outcome_of(client, "+15005550007"), outcome_of(client, "+919812345678")
        )
    assert (expired["status"], expired["reason"]) == ("expired", "timeout")
    assert (ordinary["status"], ordinary["reason"]) == ("expired", "timeout")  # nobody clicked


async def test_each_scripted_veriphone_number_forces_its_outcome(tmp_path: Path) -> None:
    from gateway.sandbox import SCRIPTED_VERIPHONE

    assert set(EXPECTED_VERIPHONE) == set(SCRIPTED_VERIPHONE)
    async with run_sandbox_gateway(make_settings(tmp_path / "g.db")) as running, running.client() as client:
        results = await asyncio.gather(*(outcome_of(client, p, "veriphone") for p in EXPECTED_VERIPHONE))
    for (phone, expected), (outcome, _) in zip(EXPECTED_VERIPHONE.items(), results, strict=True):
        assert (outcome["status"], outcome["reason"]) == expected, phone
