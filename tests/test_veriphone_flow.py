"""Veriph.One end to end: a real gateway and the fake provider, each on its own uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from gateway.outcome import EXPIRED, Outcome
from gateway.providers.veriphone.fake import FakeVeriphoneState, create_fake_veriphone, fake_state
from gateway.sessions import public_ref
from tests.utils import RawStream, Running, make_settings, merge, parse_sse, run_gateway, serve_app

API_KEY = "test-key"
API_SECRET = "test-secret"
FAKE_PUBLIC = "https://fake-veriph.test"
OK = "https://app.example/ok"
FAIL = "https://app.example/fail"
PHONE = "+15551234567"
UA = "TestBrowser/1.0 (like Gecko)"
RESULT = "/v1/callbacks/veriphone"

# Every test runs on the module's loop, the one the shared gateway and fake are served on.
pytestmark = [pytest.mark.timeout(20), pytest.mark.asyncio(loop_scope="module")]


@dataclass
class Env:
    gw: Running
    fake: FakeVeriphoneState
    db_path: Path
    client: httpx.AsyncClient

    async def create(self, phone: str | None = PHONE, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"provider": "veriphone", **extra}
        if phone is not None:
            body["phone"] = phone
        response = await self.client.post("/v1/sessions", json=body, headers={"user-agent": UA})
        assert response.status_code == 201, response.text
        answer: dict[str, Any] = response.json()
        return answer

    async def result(self, session_uuid: str, **params: str) -> httpx.Response:
        response = await self.client.get(RESULT, params={"sessionUuid": session_uuid, **params})
        assert response.status_code == 307, response.text
        return response

    async def status(self, session_id: str) -> str:
        response = await self.client.get(f"/v1/sessions/{session_id}")
        value: str = response.json()["status"]
        return value

    def rows(self) -> int:
        with contextlib.closing(sqlite3.connect(self.db_path)) as conn:
            count: int = conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
        return count


@contextlib.asynccontextmanager
async def environment(tmp_path: Path, overrides: dict[str, Any] | None = None) -> AsyncIterator[Env]:
    app = create_fake_veriphone(API_KEY, API_SECRET, public_url=FAKE_PUBLIC)
    async with serve_app(app) as fake_url:
        config = {
            "providers": {
                "veriphone": {
                    "api_base": fake_url,
                    "api_key": API_KEY,
                    "api_secret": API_SECRET,
                    "success_url": OK,
                    "failure_url": FAIL,
                }
            },
            # One gateway serves every test of the module, all with the same phone number.
            "limits": {"sessions_per_phone_burst": 10_000},
        }
        db_path = tmp_path / "gateway.db"
        settings = make_settings(db_path, merge(config, overrides or {}))
        async with run_gateway(settings) as gw, gw.client() as client:
            yield Env(gw, fake_state(app), db_path, client)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    # One gateway and one fake for every test with the default config: stopping a uvicorn
    # takes a few tenths of a second, which would dominate this module's run time.
    async with environment(tmp_path_factory.mktemp("veriphone")) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def env(shared_env: Env) -> Env:
    shared_env.fake.reset()
    return shared_env


def outcome_events(raw: bytes) -> list[dict[str, str]]:
    return [e for e in parse_sse(raw) if e.get("event") in ("progress", "outcome")]


# --- start ---------------------------------------------------------------------------------


async def test_create_session_calls_provider_with_documented_request(env: Env) -> None:
    answer = await env.create(user_ref=None)

    (call,) = env.fake.create_calls
    assert call.method == "POST"
    assert call.path == "/sdk-api/phone-verification/create-session/v1.0.0"
    assert call.headers["x-api-key"] == API_KEY
    assert call.headers["content-type"] == "application/json"
    assert "authorization" not in call.headers
    assert call.body == {
        "prefilledPhoneNumber": {"countryCode": "1", "cellphoneNumber": "5551234567", "userCanEdit": False},
        "metadata": {"userId": public_ref(answer["id"]), "userAgent": UA, "ipAddress": "127.0.0.1"},
        "configuration": {"locale": "en", "enforceInput": False},
    }
    (session_uuid,) = env.fake.sessions
    assert answer["veriphone"] == {"session_uuid": session_uuid, "redirect_url": f"{FAKE_PUBLIC}/verify/{session_uuid}"}
    assert "truecaller" not in answer
    assert answer["status"] == "pending"
    assert session_uuid not in answer["id"] and answer["id"] not in session_uuid


async def test_user_ref_is_the_provider_user_id_and_long_user_agents_are_cut(env: Env) -> None:
    response = await env.client.post(
        "/v1/sessions",
        json={"provider": "veriphone", "user_ref": "user-42"},
        headers={"user-agent": "x" * 2000},
    )
    assert response.status_code == 201
    (call,) = env.fake.create_calls
    assert isinstance(call.body, dict)
    assert "prefilledPhoneNumber" not in call.body
    assert call.body["metadata"]["userId"] == "user-42"
    assert call.body["metadata"]["userAgent"] == "x" * 512


async def test_create_session_rejected_by_provider_stores_nothing(env: Env) -> None:
    env.fake.fail_create, env.fake.fail_create_code = 400, 14226
    rows = env.rows()
    response = await env.client.post("/v1/sessions", json={"provider": "veriphone", "phone": PHONE})
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "provider_rejected"
    assert "14226" in error["message"]
    assert API_KEY not in response.text
    assert env.rows() == rows


async def test_a_number_the_provider_refuses_is_invalid_phone(env: Env) -> None:
    env.fake.fail_create, env.fake.fail_create_code = 400, 20001
    rows = env.rows()
    response = await env.client.post("/v1/sessions", json={"provider": "veriphone", "phone": PHONE})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_phone"
    assert env.rows() == rows


async def test_create_session_provider_down_stores_nothing(env: Env) -> None:
    env.fake.fail_create = 503
    rows = env.rows()
    response = await env.client.post("/v1/sessions", json={"provider": "veriphone", "phone": PHONE})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "provider_unavailable"
    assert env.rows() == rows


async def test_create_session_timeout_is_provider_unavailable(tmp_path: Path) -> None:
    async with environment(tmp_path, {"providers": {"veriphone": {"http_timeout": 0.2}}}) as env:
        env.fake.hold = asyncio.Event()
        try:
            response = await env.client.post("/v1/sessions", json={"provider": "veriphone"})
        finally:
            env.fake.hold.set()
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "provider_unavailable"
        assert env.rows() == 0


async def test_missing_credentials_tell_the_operator(tmp_path: Path) -> None:
    async with environment(tmp_path, {"providers": {"veriphone": {"api_key": "", "api_secret": ""}}}) as env:
        response = await env.client.post("/v1/sessions", json={"provider": "veriphone"})
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["code"] == "provider_unavailable"
        assert "GATEWAY_VERIPHONE_API_KEY" in error["message"]
        assert env.fake.create_calls == []
        assert env.rows() == 0


async def test_forwarded_for_is_ignored_without_trusted_proxies(env: Env) -> None:
    await env.client.post("/v1/sessions", json={"provider": "veriphone"}, headers={"x-forwarded-for": "198.51.100.23"})
    (call,) = env.fake.create_calls
    assert isinstance(call.body, dict)
    assert call.body["metadata"]["ipAddress"] == "127.0.0.1"


async def test_forwarded_for_is_honoured_from_a_trusted_proxy(tmp_path: Path) -> None:
    async with environment(tmp_path, {"server": {"trusted_proxies": ["127.0.0.0/8"]}}) as env:
        response = await env.client.post(
            "/v1/sessions",
            json={"provider": "veriphone"},
            headers={"x-forwarded-for": "6.6.6.6, 198.51.100.23, 127.0.0.2"},
        )
        assert response.status_code == 201
        (call,) = env.fake.create_calls
        assert isinstance(call.body, dict)
        assert call.body["metadata"]["ipAddress"] == "198.51.100.23"


async def test_start_link_redirects_to_the_provider(env: Env) -> None:
    rows = env.rows()
    response = await env.client.get(
        "/v1/veriphone/start", params={"phone": PHONE, "user_ref": "u-7"}, headers={"user-agent": UA}
    )
    assert response.status_code == 307
    (session_uuid,) = env.fake.sessions
    assert response.headers["location"] == f"{FAKE_PUBLIC}/verify/{session_uuid}"
    assert response.headers["cache-control"] == "no-store"
    (call,) = env.fake.create_calls
    assert isinstance(call.body, dict)
    assert call.body["metadata"] == {"userId": "u-7", "userAgent": UA, "ipAddress": "127.0.0.1"}
    assert call.body["prefilledPhoneNumber"]["cellphoneNumber"] == "5551234567"
    assert env.rows() == rows + 1


async def test_start_link_accepts_an_unencoded_plus(env: Env) -> None:
    response = await env.client.get("/v1/veriphone/start?phone=+15551234567")
    assert response.status_code == 307
    (session,) = env.fake.sessions.values()
    assert session.prefilled == ("1", "5551234567")


async def test_start_link_errors_redirect_to_failure_url(env: Env) -> None:
    rows = env.rows()
    response = await env.client.get("/v1/veriphone/start", params={"phone": "12"})
    assert response.status_code == 307
    assert response.headers["location"] == f"{FAIL}?status=failed&reason=invalid_phone"

    response = await env.client.get("/v1/veriphone/start?phone=%2B15551234567&phone=%2B15559876543")
    assert response.headers["location"] == f"{FAIL}?status=failed&reason=invalid_phone"
    assert env.fake.create_calls == []

    env.fake.fail_create = 500
    response = await env.client.get("/v1/veriphone/start", params={"phone": PHONE})
    assert response.status_code == 307
    assert response.headers["location"] == f"{FAIL}?status=failed&reason=provider_unavailable"
    assert env.rows() == rows


# --- result endpoint -----------------------------------------------------------------------


async def test_verified_flow_streams_outcome_and_redirects_to_success(env: Env) -> None:
    env.fake.result_http_status = 201  # documented as well as 200
    env.fake.numbers_as_strings = True  # status and method arrive as strings
    answer = await env.create()
    session_id, session_uuid = answer["id"], answer["veriphone"]["session_uuid"]
    env.fake.complete(session_uuid)

    async with env.client.stream("GET", f"/v1/sessions/{session_id}/events") as events:
        stream = RawStream(events)
        await stream.until(b"event: status")
        response = await env.result(session_uuid)
        assert response.headers["location"] == f"{OK}?status=verified"
        assert response.headers["cache-control"] == "no-store"
        raw = await stream.until(b"event: outcome")
        await stream.rest()

    progress, outcome = outcome_events(raw)
    assert progress["event"] == "progress"
    assert json.loads(progress["data"]) == {"stage": "result_fetching"}
    body = json.loads(outcome["data"])
    assert body["status"] == "verified"
    assert body["reason"] is None
    assert body["provider"] == "veriphone"
    assert body["phone"] == PHONE
    assert body["veriphone"]["status"] == 8192
    assert body["veriphone"]["method"] == 20
    assert body["veriphone"]["flags"]["was_successful"] is True

    (call,) = env.fake.result_calls
    assert call.path == "/sdk-api/phone-verification/verification-result/v1.0.0"
    assert call.query == {"sessionUuid": session_uuid}
    assert call.headers["x-api-key"] == API_KEY
    assert call.headers["authorization"] == f"Basic {API_SECRET}"

    # Idempotent: the stored outcome answers, the provider is not asked again.
    again = await env.result(session_uuid)
    assert again.headers["location"] == f"{OK}?status=verified"
    assert env.fake.result_count(session_uuid) == 1
    assert await env.status(session_id) == "verified"


async def test_user_cancelled_redirects_to_failure_with_reason(env: Env) -> None:
    answer = await env.create()
    session_uuid = answer["veriphone"]["session_uuid"]
    env.fake.complete(session_uuid, status=4352)
    response = await env.result(session_uuid)
    assert response.headers["location"] == f"{FAIL}?status=rejected&reason=user_cancelled"


async def test_prefilled_number_mismatch_fails(env: Env) -> None:
    answer = await env.create()
    session_uuid = answer["veriphone"]["session_uuid"]
    env.fake.complete(session_uuid, phone="+15559876543")
    response = await env.result(session_uuid)
    assert response.headers["location"] == f"{FAIL}?status=failed&reason=destination_mismatch"
    outcome = (await env.client.get(f"/v1/sessions/{answer['id']}")).json()["outcome"]
    assert (outcome["status"], outcome["reason"]) == ("failed", "destination_mismatch")


async def test_provider_down_redirects_to_failure_and_keeps_session_pending(env: Env) -> None:
    answer = await env.create()
    session_uuid = answer["veriphone"]["session_uuid"]
    env.fake.complete(session_uuid)
    env.fake.fail_result = 500
    response = await env.result(session_uuid)
    assert response.headers["location"] == f"{FAIL}?status=failed&reason=provider_unavailable"
    assert await env.status(answer["id"]) == "pending"

    env.fake.fail_result = None  # the provider is back: a retry settles the session
    response = await env.result(session_uuid)
    assert response.headers["location"] == f"{OK}?status=verified"
    assert env.fake.result_count(session_uuid) == 2


async def test_unknown_and_malformed_uuids_redirect_to_failure(env: Env) -> None:
    expected = f"{FAIL}?status=failed&reason=session_not_found"
    for query in (
        {"sessionUuid": "0b6a3c1e-1111-4222-8333-944455556666"},
        {"sessionUuid": "../../etc/passwd"},
        {"sessionUuid": "x" * 500},
        {"sessionUuid": ""},
        {},
    ):
        response = await env.client.get(RESULT, params=query)
        assert response.status_code == 307
        assert response.headers["location"] == expected
    response = await env.client.get(f"{RESULT}?sessionUuid=a&sessionUuid=b")
    assert response.headers["location"] == expected
    assert env.fake.result_calls == []


async def test_already_finished_session_redirects_by_stored_outcome(env: Env) -> None:
    answer = await env.create()
    session_uuid = answer["veriphone"]["session_uuid"]
    env.fake.complete(session_uuid)  # would verify, but the session expired first
    assert await env.gw.gateway.sessions.finish(answer["id"], Outcome(EXPIRED, "timeout"))
    response = await env.result(session_uuid)
    assert response.headers["location"] == f"{FAIL}?status=expired&reason=timeout"
    assert env.fake.result_calls == []


async def test_location_never_comes_from_the_request(env: Env) -> None:
    answer = await env.create()
    session_uuid = answer["veriphone"]["session_uuid"]
    env.fake.complete(session_uuid)
    for extra in ({"next": "https://evil.example/"}, {"redirect_uri": "https://evil.example/"}, {"status": "x"}):
        response = await env.result(session_uuid, **extra)
        assert response.headers["location"] == f"{OK}?status=verified"
    response = await env.client.get(RESULT, params={"sessionUuid": session_uuid}, headers={"host": "evil.example"})
    assert response.headers["location"] == f"{OK}?status=verified"
    response = await env.client.get(
        RESULT, params={"sessionUuid": "nope", "next": "https://evil.example/"}, headers={"host": "evil.example"}
    )
    assert response.headers["location"] == f"{FAIL}?status=failed&reason=session_not_found"
    assert env.fake.result_count() == 1


async def test_concurrent_result_requests_share_one_provider_call(env: Env) -> None:
    answer = await env.create()
    session_uuid = answer["veriphone"]["session_uuid"]
    env.fake.complete(session_uuid)
    env.fake.hold = asyncio.Event()
    first = asyncio.create_task(env.result(session_uuid))
    await env.fake.wait_result_calls(1)
    second = asyncio.create_task(env.result(session_uuid))
    mobile = asyncio.create_task(env.client.post(RESULT, json={"sessionUuid": session_uuid}))
    env.fake.hold.set()
    responses = await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert {r.headers["location"] for r in responses} == {f"{OK}?status=verified"}
    assert (await asyncio.wait_for(mobile, 5)).json()["status"] == "verified"
    assert env.fake.result_count(session_uuid) == 1


async def test_outcome_stored_first_by_another_writer_wins(env: Env) -> None:
    answer = await env.create()
    session_uuid = answer["veriphone"]["session_uuid"]
    env.fake.complete(session_uuid)
    env.fake.hold = asyncio.Event()
    pending = asyncio.create_task(env.result(session_uuid))
    await env.fake.wait_result_calls(1)
    # While the provider is answering, expiry ends the session: the later "verified" must not count.
    assert await env.gw.gateway.sessions.finish(answer["id"], Outcome(EXPIRED, "timeout"))
    env.fake.hold.set()
    response = await asyncio.wait_for(pending, 5)
    assert response.headers["location"] == f"{FAIL}?status=expired&reason=timeout"
    assert await env.status(answer["id"]) == "expired"


async def test_without_configured_pages_the_gateway_shows_its_own(tmp_path: Path) -> None:
    overrides = {"providers": {"veriphone": {"success_url": "", "failure_url": ""}}}
    async with environment(tmp_path, overrides) as env:
        answer = await env.create()
        session_uuid = answer["veriphone"]["session_uuid"]
        env.fake.complete(session_uuid)
        response = await env.client.get(RESULT, params={"sessionUuid": session_uuid}, headers={"host": "evil.example"})
        assert response.status_code == 307
        assert response.headers["location"] == "/v1/veriphone/done?status=verified"
        page = await env.client.get(response.headers["location"])
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "is verified" in page.text

        response = await env.client.get(RESULT, params={"sessionUuid": "nope"})
        assert response.headers["location"] == "/v1/veriphone/done?status=failed&reason=session_not_found"
        page = await env.client.get(response.headers["location"])
        assert "could not be verified" in page.text and "session_not_found" in page.text
        page = await env.client.get("/v1/veriphone/done", params={"status": "<script>", "reason": "<b>"})
        assert "<script>" not in page.text and "<b>" not in page.text


# --- mobile variant ------------------------------------------------------------------------


async def test_mobile_post_returns_the_outcome(env: Env) -> None:
    answer = await env.create(user_ref="app-user")
    session_uuid = answer["veriphone"]["session_uuid"]
    env.fake.complete(session_uuid, method=21)
    response = await env.client.post(RESULT, json={"sessionUuid": session_uuid})
    assert response.status_code == 200
    outcome = response.json()
    assert outcome["status"] == "verified"
    assert outcome["user_ref"] == "app-user"
    assert outcome["phone"] == PHONE
    assert outcome["veriphone"]["method"] == 21

    again = await env.client.post(RESULT, json={"sessionUuid": session_uuid})
    assert again.json() == outcome
    assert env.fake.result_count(session_uuid) == 1
    browser = await env.result(session_uuid)
    assert browser.headers["location"] == f"{OK}?status=verified"


async def test_mobile_post_errors(env: Env) -> None:
    response = await env.client.post(RESULT, json={"sessionUuid": "0b6a3c1e-1111-4222-8333-944455556666"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "session_not_found"
    response = await env.client.post(RESULT, json={})
    assert response.status_code == 400
    response = await env.client.post(RESULT, json={"sessionUuid": "x", "next": "y"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unknown_field"

    answer = await env.create()
    session_uuid = answer["veriphone"]["session_uuid"]
    env.fake.complete(session_uuid)
    env.fake.fail_result = 500
    response = await env.client.post(RESULT, json={"sessionUuid": session_uuid})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "provider_unavailable"
    env.fake.fail_result = 403
    response = await env.client.post(RESULT, json={"sessionUuid": session_uuid})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "provider_rejected"
    assert await env.status(answer["id"]) == "pending"

    env.fake.fail_result = None
    response = await env.client.post(RESULT, json={"sessionUuid": session_uuid})
    assert response.status_code == 200
    assert response.json()["status"] == "verified"


async def test_logs_name_no_uuid_phone_session_id_or_secret(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await env.create()
    session_uuid = answer["veriphone"]["session_uuid"]
    env.fake.complete(session_uuid)
    env.fake.fail_result = 500
    await env.result(session_uuid)
    env.fake.fail_result = None
    await env.result(session_uuid)
    env.fake.fail_create = 400
    await env.client.post("/v1/sessions", json={"provider": "veriphone", "phone": PHONE})

    # The gateway's own loggers; httpx and uvicorn access lines are silenced by logs.configure_logging.
    ours = [r for r in caplog.records if r.name == "gateway" or r.name.startswith("gateway.")]
    assert any(r.name == "gateway.veriphone" for r in ours)
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in ours)
    for secret in (session_uuid, answer["id"], PHONE, PHONE[1:], API_KEY, API_SECRET):
        assert secret not in logged
