"""Idempotency-Key on POST /v1/sessions: a retried start returns the same session, with no second provider call."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import httpx
import pytest

from tests.test_veriphone_flow import PHONE, UA, Env, environment

pytestmark = pytest.mark.timeout(20)

BODY = {"provider": "veriphone", "phone": PHONE, "user_ref": "user-1"}


async def post(env: Env, key: str | None, body: dict[str, object] = BODY) -> httpx.Response:
    headers = {"user-agent": UA}
    if key is not None:
        headers["idempotency-key"] = key
    return await env.client.post("/v1/sessions", json=body, headers=headers)


def keys_stored(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        count: int = conn.execute("SELECT COUNT(*) FROM idempotency_keys").fetchone()[0]
    return count


async def test_same_key_and_body_return_the_same_session_without_a_second_provider_call(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        first = await post(env, "order-4711-attempt")
        again = await post(env, "order-4711-attempt")
        assert first.status_code == again.status_code == 201
        assert again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
        assert len(env.fake.create_calls) == 1 and env.rows() == 1
        # the key is stored as a hash, never as given
        with contextlib.closing(sqlite3.connect(env.db_path)) as conn:
            stored = conn.execute("SELECT key_hash FROM idempotency_keys").fetchall()
        assert len(stored) == 1 and "order-4711" not in stored[0][0]
        # without a key, every request is a new session
        assert (await post(env, None)).json()["id"] != first.json()["id"]
        assert len(env.fake.create_calls) == 2


async def test_same_key_with_another_body_is_a_conflict_and_stores_nothing(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        assert (await post(env, "k-1")).status_code == 201
        other = await post(env, "k-1", {**BODY, "user_ref": "user-2"})
        assert other.status_code == 409
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        assert len(env.fake.create_calls) == 1 and env.rows() == 1 and keys_stored(env.db_path) == 1


@pytest.mark.parametrize("key", ["", "a b", "x" * 256, "caf\u00e9"])
async def test_a_malformed_key_is_a_400_and_stores_nothing(tmp_path: Path, key: str) -> None:
    async with environment(tmp_path) as env:
        answer = await env.client.post(
            "/v1/sessions", json=BODY, headers={"idempotency-key": key.encode()}
        )
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "invalid_idempotency_key"
        assert env.fake.create_calls == [] and env.rows() == 0 and keys_stored(env.db_path) == 0


async def test_concurrent_requests_with_one_key_make_one_provider_call(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        env.fake.hold = asyncio.Event()  # the provider answers only once every request is in
        requests = [asyncio.ensure_future(post(env, "burst")) for _ in range(20)]
        while len(env.fake.create_calls) < 1:
            await asyncio.sleep(0.01)  # polling a condition, bounded by the test timeout
        env.fake.hold.set()
        answers = await asyncio.gather(*requests)
        assert {a.status_code for a in answers} == {201}
        assert len({a.json()["id"] for a in answers}) == 1
        assert len(env.fake.create_calls) == 1 and env.rows() == 1


async def test_a_failed_start_keeps_no_key_and_a_retry_calls_the_provider_again(tmp_path: Path) -> None:
    async with environment(tmp_path) as env:
        env.fake.fail_create = 503
        failed = await post(env, "retry-me")
        assert failed.status_code == 502 and keys_stored(env.db_path) == 0
        env.fake.fail_create = None
        ok = await post(env, "retry-me")
        assert ok.status_code == 201 and len(env.fake.create_calls) == 2 and env.rows() == 1


async def test_the_key_lives_as_long_as_the_session_may_be_pending(tmp_path: Path) -> None:
    async with environment(tmp_path, {"sessions": {"ttl": 1}}) as env:
        first = (await post(env, "short")).json()
        async with asyncio.timeout(10):
            while True:  # once the session's ttl has passed, the key starts a new session
                again = (await post(env, "short")).json()
                if again["id"] != first["id"]:
                    break
                await asyncio.sleep(0.1)
        assert len(env.fake.create_calls) == 2
