"""The Truecaller flow end to end: a real gateway and a real fake profile host, each on its own uvicorn."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from gateway.providers.truecaller.fake import (
    PROFILE_PATH,
    FakeTruecallerState,
    create_fake_truecaller,
    post_callback,
    post_status,
)
from gateway.providers.truecaller.routes import CALLBACK_PATH
from gateway.providers.truecaller.service import Truecaller
from tests.utils import RawStream, Running, make_settings, parse_sse, run_gateway, serve_app

# One gateway and one fake profile host serve most tests (each uvicorn costs ~0.2 s to stop);
# every test makes its own sessions and the `env` fixture resets the fake's knobs.
pytestmark = [pytest.mark.timeout(10), pytest.mark.asyncio(loop_scope="module")]

PHONE = "+919999999999"
VERIFIED_PROFILE = {"first_name": "Asha", "last_name": "Rao", "email": "asha@example.in", "country": "IN"}


@dataclass
class Env:
    gw: Running
    client: httpx.AsyncClient
    fake: FakeTruecallerState
    endpoint: str  # the fake's profile URL, as Truecaller would send it
    db_path: Path

    @property
    def provider(self) -> Truecaller:
        provider = self.gw.gateway.providers["truecaller"]
        assert isinstance(provider, Truecaller)
        return provider

    async def start(self, phone: str | None = PHONE) -> tuple[str, str]:
        """A new Truecaller session: (session id, request nonce)."""
        body: dict[str, Any] = {"provider": "truecaller"}
        if phone is not None:
            body["phone"] = phone
        r = await self.client.post("/v1/sessions", json=body)
        assert r.status_code == 201, r.text
        return r.json()["id"], r.json()["truecaller"]["request_nonce"]

    async def token_callback(self, nonce: str, token: str, endpoint: str | None = None) -> httpx.Response:
        return await post_callback(self.client, CALLBACK_PATH, nonce, token, endpoint or self.endpoint)

    async def status_callback(self, nonce: str, status: str) -> httpx.Response:
        return await post_status(self.client, CALLBACK_PATH, nonce, status)

    async def stream(self, sid: str, action: Callable[[], Awaitable[None]]) -> list[dict[str, Any]]:
        """Open the SSE stream, run `action` once the snapshot arrived, read to the end: [{event, data}]."""
        async with self.client.stream("GET", f"/v1/sessions/{sid}/events") as st:
            assert st.status_code == 200
            rs = RawStream(st)
            raw = await rs.until(b"event: status")
            await action()
            raw += await rs.rest()
        return [{"event": e["event"], "data": json.loads(e["data"])} for e in parse_sse(raw) if "event" in e]

    async def wait_outcome(self, sid: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/sessions/{sid}", params={"wait": 5})
        outcome = r.json()["outcome"]
        assert outcome is not None, r.json()
        return dict(outcome)

    async def snapshot(self, sid: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/sessions/{sid}")
        assert r.status_code == 200
        return dict(r.json())

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db_path) as conn:
            return list(conn.execute(sql, params).fetchall())

    def stored_callbacks(self) -> int:
        return int(self.query("SELECT COUNT(*) FROM truecaller_callbacks")[0][0])

    async def no_stored_callbacks(self, timeout: float = 2.0) -> None:
        """The row is deleted just after the outcome is published: wait (bounded) for it to go."""
        async with asyncio.timeout(timeout):
            while self.stored_callbacks():
                await asyncio.sleep(0.01)


def tc_overrides(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "providers": {
            "truecaller": {
                "require_https": False,
                "require_public_ip": False,
                "profile_hosts": [f"127.0.0.1:{port}"],
                **extra,
            }
        },
        # One gateway serves every test of the module, all with the same phone number.
        "limits": {"sessions_per_phone_burst": 10_000},
    }


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    db_path = tmp_path_factory.mktemp("truecaller") / "gateway.db"
    app, fake = create_fake_truecaller()
    async with serve_app(app) as fake_url:
        settings = make_settings(db_path, tc_overrides(port_of(fake_url)))
        async with run_gateway(settings) as gw, gw.client() as client:
            e = Env(gw, client, fake, fake_url + PROFILE_PATH, db_path)
            e.provider.fetch_backoff = 0.01  # keep 5xx retries fast
            yield e


@pytest_asyncio.fixture(loop_scope="module")
async def env(shared: Env) -> AsyncIterator[Env]:
    fake = shared.fake
    fake.requests.clear()
    fake.served = fake.fail_times = 0
    fake.delay = 0.0
    fake.hold = None
    try:
        yield shared
    finally:
        if fake.hold is not None:
            fake.hold.set()
        # no test may leave a fetch running into the next one
        await shared.no_stored_callbacks()


def metric(text: str, series: str) -> float:
    """The value of one Prometheus series (name with labels) in a /metrics answer, 0 if absent."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def events_of(env: Env, sid: str, kind: str) -> list[dict[str, Any]]:
    rows = env.query("SELECT data FROM session_events WHERE session_id = ? AND kind = ? ORDER BY id", (sid, kind))
    return [json.loads(r[0]) for r in rows]


@pytest.mark.parametrize("odd_types", [True, False])
async def test_token_callback_streams_progress_then_verified(
    env: Env, odd_types: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fetches = 'gateway_provider_fetch_seconds_count{operation="profile",provider="truecaller"}'
    callbacks = 'gateway_callback_seconds_count{provider="truecaller"}'
    before = (await env.client.get("/metrics")).text
    sid, nonce = await env.start()
    token = env.fake.issue_token(PHONE, "Asha", "Rao", "asha@example.in", "IN", odd_types=odd_types)
    answers: list[httpx.Response] = []

    async def tap_continue() -> None:
        answers.append(await env.token_callback(nonce, token))

    events = await env.stream(sid, tap_continue)
    assert answers[0].status_code == 200 and answers[0].json() == {"status": "accepted"}
    assert [e["event"] for e in events] == ["status", "progress", "outcome"]
    assert events[1]["data"] == {"stage": "profile_fetching"}
    outcome = events[2]["data"]
    assert outcome["status"] == "verified" and outcome["reason"] is None
    assert outcome["phone"] == PHONE and outcome["provider"] == "truecaller"
    assert outcome["profile"] == VERIFIED_PROFILE
    seen = env.fake.requests
    assert len(seen) == 1
    assert seen[0].headers["authorization"] == f"Bearer {token}"
    assert seen[0].headers["cache-control"] == "no-cache"
    await env.no_stored_callbacks()
    # the gateway's own records (the test client's httpx debug lines carry the session URL)
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records if r.name.startswith("gateway"))
    assert "truecaller profile fetched" in logged
    for secret in (token, PHONE, PHONE[1:], nonce, sid, "Asha", "asha@example.in"):
        assert secret not in logged
    after = (await env.client.get("/metrics")).text
    assert metric(after, fetches) == metric(before, fetches) + 1
    assert metric(after, callbacks) == metric(before, callbacks) + 1


async def test_missing_optional_fields_and_no_phone_asked(env: Env) -> None:
    sid, nonce = await env.start(phone=None)
    token = env.fake.issue_token("+14155550100", first="Sam", last=None, email=None, country=None)
    assert (await env.token_callback(nonce, token)).status_code == 200
    outcome = await env.wait_outcome(sid)
    assert outcome["status"] == "verified" and outcome["phone"] == "+14155550100"
    assert outcome["profile"] == {"first_name": "Sam", "last_name": None, "email": None, "country": None}


async def test_flow_invoked_is_progress_then_user_rejected(env: Env) -> None:
    sid, nonce = await env.start()
    answers: list[httpx.Response] = []

    async def user_sees_dialog_then_declines() -> None:
        answers.append(await env.status_callback(nonce, "flow_invoked"))
        assert (await env.snapshot(sid))["status"] == "pending"
        answers.append(await env.status_callback(nonce, "user_rejected"))

    events = await env.stream(sid, user_sees_dialog_then_declines)
    assert [a.json() for a in answers] == [{"status": "accepted"}] * 2
    assert [e["event"] for e in events] == ["status", "progress", "outcome"]
    assert events[1]["data"] == {"stage": "flow_invoked"}
    assert events[2]["data"]["status"] == "rejected" and events[2]["data"]["reason"] == "user_rejected"
    assert events[2]["data"]["phone"] is None and events[2]["data"]["profile"] is None


async def test_use_another_number_rejects(env: Env) -> None:
    sid, nonce = await env.start()
    assert (await env.status_callback(nonce, "use_another_number")).status_code == 200
    outcome = await env.wait_outcome(sid)
    assert (outcome["status"], outcome["reason"]) == ("rejected", "use_another_number")
    # the session is finished now: any later callback for this nonce is unknown
    late = await env.token_callback(nonce, env.fake.issue_token(PHONE))
    assert late.status_code == 404 and late.json()["error"]["code"] == "session_not_found"
    assert env.fake.request_count == 0 and env.stored_callbacks() == 0


async def test_unhandled_status_is_accepted_and_changes_nothing(env: Env) -> None:
    sid, nonce = await env.start()
    r = await env.status_callback(nonce, "some_future_status")
    assert r.status_code == 200 and r.json() == {"status": "ignored"}
    assert (await env.snapshot(sid))["status"] == "pending"
    assert events_of(env, sid, "progress") == [] and events_of(env, sid, "outcome") == []


async def test_one_token_cannot_verify_a_second_session(env: Env) -> None:
    first_sid, first_nonce = await env.start(phone=None)
    token = env.fake.issue_token("+14155550100")
    assert (await env.token_callback(first_nonce, token)).status_code == 200
    assert (await env.wait_outcome(first_sid))["status"] == "verified"
    # the same token replayed against another pending session (login CSRF) is refused
    second_sid, second_nonce = await env.start(phone=None)
    replay = await env.token_callback(second_nonce, token)
    assert replay.status_code == 400 and replay.json()["error"]["code"] == "token_already_used"
    assert (await env.snapshot(second_sid))["status"] == "pending"
    assert env.fake.request_count == 1


async def test_unauthorized_token_is_access_denied(env: Env) -> None:
    denied = 'gateway_provider_errors_total{kind="access_denied",provider="truecaller"}'
    before = (await env.client.get("/metrics")).text
    sid, nonce = await env.start()
    token = env.fake.issue_token(PHONE)
    env.fake.revoke(token)
    assert (await env.token_callback(nonce, token)).status_code == 200
    outcome = await env.wait_outcome(sid)
    assert (outcome["status"], outcome["reason"]) == ("failed", "access_denied")
    assert outcome["phone"] is None and outcome["profile"] is None
    assert env.fake.request_count == 1  # 401 is not retried
    after = (await env.client.get("/metrics")).text
    assert metric(after, denied) == metric(before, denied) + 1


async def test_server_errors_are_retried_until_the_profile_comes(env: Env) -> None:
    sid, nonce = await env.start()
    env.fake.fail_times = 2
    assert (await env.token_callback(nonce, env.fake.issue_token(PHONE, country="IN"))).status_code == 200
    outcome = await env.wait_outcome(sid)
    assert outcome["status"] == "verified" and outcome["phone"] == PHONE
    assert env.fake.request_count == 3 and env.fake.served == 1


async def test_server_errors_forever_end_in_provider_error(env: Env) -> None:
    sid, nonce = await env.start()
    env.fake.fail_times = 1000
    assert (await env.token_callback(nonce, env.fake.issue_token(PHONE))).status_code == 200
    outcome = await env.wait_outcome(sid)
    assert (outcome["status"], outcome["reason"]) == ("failed", "provider_error")
    assert env.fake.request_count == env.provider.fetch_attempts
    await env.no_stored_callbacks()


async def test_other_number_than_asked_is_phone_mismatch(env: Env) -> None:
    sid, nonce = await env.start(phone=PHONE)
    assert (await env.token_callback(nonce, env.fake.issue_token("+918888888888"))).status_code == 200
    outcome = await env.wait_outcome(sid)
    assert (outcome["status"], outcome["reason"]) == ("failed", "phone_mismatch")
    assert outcome["profile"] is None


async def test_unknown_nonce_is_404_and_nothing_is_stored(env: Env) -> None:
    sid, _ = await env.start()
    token = env.fake.issue_token(PHONE)
    for answer in (
        await env.token_callback("unknown-nonce-123", token),
        await env.status_callback("unknown-nonce-123", "user_rejected"),
        await env.token_callback(sid, token),  # the session id is not a nonce
    ):
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "session_not_found"
    assert env.fake.request_count == 0 and env.stored_callbacks() == 0
    assert (await env.snapshot(sid))["status"] == "pending"


MALFORMED: list[tuple[object, str]] = [
    ({"accessToken": "t", "endpoint": "x"}, "missing_request_id"),
    ({"requestId": 5, "status": "user_rejected"}, "invalid_request_id"),
    ({"requestId": "abcdefgh"}, "invalid_callback"),
    ({"requestId": "abcdefgh", "status": "user_rejected", "accessToken": "t"}, "invalid_callback"),
    ({"requestId": "abcdefgh", "status": 7}, "invalid_status"),
    ({"requestId": "abcdefgh", "accessToken": "t"}, "missing_endpoint"),
    ({"requestId": "abcdefgh", "accessToken": 1, "endpoint": "x"}, "invalid_access_token"),
    # an unknown field is dropped, not refused: the real fault is still reported
    ({"requestId": "abcdefgh", "accessToken": "t", "endpoint": "x", "extra": 1}, "invalid_endpoint"),
    ([1, 2], "invalid_body"),
]


async def test_malformed_callbacks_are_400_with_stable_codes(env: Env) -> None:
    sid, nonce = await env.start()
    for body, code in MALFORMED:
        if isinstance(body, dict) and body.get("requestId") == "abcdefgh":
            body = {**body, "requestId": nonce}  # a real pending nonce: the body alone is at fault
        r = await env.client.post(CALLBACK_PATH, json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (400, code), body
    raw = await env.client.post(CALLBACK_PATH, content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"
    form = await env.client.post(CALLBACK_PATH, data={"requestId": nonce, "status": "user_rejected"})
    assert form.status_code == 415
    assert (await env.snapshot(sid))["status"] == "pending" and env.stored_callbacks() == 0


async def test_fields_truecaller_may_add_later_do_not_fail_a_callback(env: Env) -> None:
    sid, nonce = await env.start()
    r = await env.client.post(CALLBACK_PATH, json={"requestId": nonce, "status": "flow_invoked", "timestamp": 1})
    assert r.status_code == 200 and r.json() == {"status": "accepted"}
    assert (await env.snapshot(sid))["status"] == "pending"


async def test_fifty_identical_callbacks_fetch_once_and_finish_once(env: Env) -> None:
    sid, nonce = await env.start()
    before = (await env.snapshot(sid))["expires_at"]
    token = env.fake.issue_token(PHONE)
    env.fake.hold = asyncio.Event()  # the profile host stalls: every answer must come first
    answers = await asyncio.gather(*(env.token_callback(nonce, token) for _ in range(50)))
    assert [a.status_code for a in answers] == [200] * 50
    assert all(a.json() == {"status": "accepted"} for a in answers)
    await env.fake.wait_requests(1)
    snapshot = await env.snapshot(sid)
    assert snapshot["status"] == "pending" and snapshot["expires_at"] > before  # outlives the fetch
    # a late status cannot race the fetch for the outcome
    late = await env.status_callback(nonce, "user_rejected")
    assert late.status_code == 200 and late.json() == {"status": "ignored"}
    env.fake.hold.set()
    outcome = await env.wait_outcome(sid)
    assert outcome["status"] == "verified"
    assert env.fake.request_count == 1
    assert len(events_of(env, sid, "outcome")) == 1
    assert events_of(env, sid, "progress") == [{"stage": "profile_fetching"}]
    await env.no_stored_callbacks()


async def test_first_token_wins_over_a_different_later_one(env: Env) -> None:
    sid, nonce = await env.start()
    first = env.fake.issue_token(PHONE)
    second = env.fake.issue_token("+918888888888")
    env.fake.hold = asyncio.Event()
    assert (await env.token_callback(nonce, first)).status_code == 200
    assert (await env.token_callback(nonce, second)).status_code == 200
    env.fake.hold.set()
    outcome = await env.wait_outcome(sid)
    assert outcome["status"] == "verified" and outcome["phone"] == PHONE
    assert [r.headers["authorization"] for r in env.fake.requests] == [f"Bearer {first}"]


async def test_no_callback_means_expired_timeout(db_path: Path) -> None:
    settings = make_settings(db_path, tc_overrides(9, callback_timeout=0.5))
    async with run_gateway(settings) as gw, gw.client() as client:
        env = Env(gw, client, FakeTruecallerState(), "", db_path)
        sid, _ = await env.start()

        async def nothing() -> None:
            return None

        events = await env.stream(sid, nothing)
    assert [e["event"] for e in events] == ["status", "outcome"]
    assert (events[1]["data"]["status"], events[1]["data"]["reason"]) == ("expired", "timeout")


class LoopbackResolver:
    """Every name resolves to loopback, as a rebinding attacker's DNS would answer."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        return ["127.0.0.1"]


async def assert_all_refused(env: Env, nonce: str, token: str, endpoints: list[object]) -> None:
    for endpoint in endpoints:
        body = {"requestId": nonce, "accessToken": token, "endpoint": endpoint}
        r = await env.client.post(CALLBACK_PATH, json=body)
        assert r.status_code == 400, (endpoint, r.text)
        assert r.json()["error"]["code"] == "invalid_endpoint", endpoint
        assert token not in r.text and (not endpoint or str(endpoint) not in r.text)


async def assert_untouched(env: Env, sid: str) -> None:
    assert (await env.snapshot(sid))["status"] == "pending"
    assert env.stored_callbacks() == 0 and events_of(env, sid, "progress") == []


async def test_hostile_endpoints_are_refused_before_any_request(env: Env) -> None:
    evil_app, evil = create_fake_truecaller()
    async with serve_app(evil_app) as evil_url:
        g, e = port_of(env.endpoint.rsplit("/v1/", 1)[0]), port_of(evil_url)
        sid, nonce = await env.start()
        token = evil.issue_token("+15550000000")  # the evil host would "verify" the attacker's number
        await assert_all_refused(
            env,
            nonce,
            token,
            [
                f"http://127.0.0.1:{e}/v1/default",
                f"http://127.0.0.1:{g}@127.0.0.1:{e}/v1/default",
                f"http://127.0.0.1:{e}/127.0.0.1:{g}/v1/default",
                f"http://127.0.0.1:{e}?127.0.0.1:{g}",
                f"http://localhost:{e}/v1/default",
                f"http://localhost:{g}/v1/default",
                f"http://[::1]:{e}/v1/default",
                f"http://[::1]:{g}/v1/default",
                f"http://[::ffff:127.0.0.1]:{g}/v1/default",
                f"http://2130706433:{g}/v1/default",
                f"http://0x7f.0.0.1:{g}/v1/default",
                f"http://127.1:{g}/v1/default",
                f"http://127.0.0.1:{g}\\@127.0.0.1:{e}/",
                f"http://127.0.0.1:{g}.evil.test/v1/default",
                f"http://127.0.0.1.evil.test:{g}/v1/default",
                f"ftp://127.0.0.1:{g}/v1/default",
                f" http://127.0.0.1:{g}/v1/default",
                "",
                12345,
            ],
        )
        await assert_untouched(env, sid)
        # positive control: the same session still completes through the allowed host
        ok = await env.token_callback(nonce, env.fake.issue_token(PHONE))
        assert ok.status_code == 200
        assert (await env.wait_outcome(sid))["status"] == "verified"
    assert evil.request_count == 0
    assert env.fake.request_count == 1


async def test_production_rules_refuse_lookalikes_and_loopback_names(tmp_path: Path) -> None:
    evil_app, evil = create_fake_truecaller()
    async with serve_app(evil_app) as evil_url:
        e = port_of(evil_url)
        token = evil.issue_token("+15550000000")
        # the defaults: https on 443 only, public addresses only, the real Truecaller hosts
        async with run_gateway(make_settings(tmp_path / "prod.db")) as gw, gw.client() as client:
            env = Env(gw, client, evil, "", tmp_path / "prod.db")
            resolver = LoopbackResolver()
            env.provider.resolve = resolver  # no real DNS, and every name "is" loopback
            sid, nonce = await env.start()
            await assert_all_refused(
                env,
                nonce,
                token,
                [
                    "http://profile4-noneu.truecaller.com/v1/default",
                    "https://profile4-noneu.truecaller.com:8443/v1/default",
                    "https://profile4-noneu.truecaller.com.evil.test/v1/default",
                    "https://evil.test/profile4-noneu.truecaller.com",
                    "https://profile4-noneu.truecaller.com@evil.test/v1/default",
                    "https://evil.test@profile4-noneu.truecaller.com/v1/default",
                    "https://evil.truecaller.com/v1/default",
                    "https://127.0.0.1/v1/default",
                    "https://[::1]/v1/default",
                    # an allowed name, but DNS answers loopback: require_public_ip refuses it
                    "https://profile4-noneu.truecaller.com/v1/default",
                ],
            )
            await assert_untouched(env, sid)
            assert resolver.calls == ["profile4-noneu.truecaller.com"]  # only the allowed name was looked up
        # a real name that really resolves to 127.0.0.1, pointing at the evil server's port
        named = tc_overrides(e, require_public_ip=True, profile_hosts=[f"localhost:{e}"])
        async with run_gateway(make_settings(tmp_path / "named.db", named)) as gw, gw.client() as client:
            env = Env(gw, client, evil, "", tmp_path / "named.db")
            sid, nonce = await env.start()
            await assert_all_refused(env, nonce, token, [f"http://localhost:{e}/v1/default"])
            await assert_untouched(env, sid)
    assert evil.request_count == 0


async def test_restart_resumes_interrupted_fetches(db_path: Path) -> None:
    app, fake = create_fake_truecaller()
    fake.hold = asyncio.Event()
    try:
        async with serve_app(app) as fake_url:
            server = merge_server(tc_overrides(port_of(fake_url)), shutdown_timeout=0.2, shutdown_spread=0)
            settings = make_settings(db_path, server)
            async with run_gateway(settings) as gw, gw.client() as client:
                env = Env(gw, client, fake, fake_url + PROFILE_PATH, db_path)
                resumed, (stale, stale_nonce) = await env.start(), await env.start()
                token = fake.issue_token(PHONE, email="asha@example.in", country="IN")
                assert (await env.token_callback(resumed[1], token)).status_code == 200
                assert (await env.token_callback(stale_nonce, fake.issue_token(PHONE))).status_code == 200
                await fake.wait_requests(2)  # both fetches are in flight, held by the fake
            # the gateway stopped: the fetches were cancelled, the callbacks are still stored
            assert env.stored_callbacks() == 2
            assert env.query("SELECT DISTINCT status FROM sessions") == [("pending",)]
            # as if the gateway had stayed down for more than the token's 10 minutes
            env.query(
                "UPDATE truecaller_callbacks SET token_expires_at = received_at - 1 WHERE session_id = ?", (stale,)
            )
            fake.hold.set()
            async with run_gateway(settings) as gw2, gw2.client() as client2:
                env2 = Env(gw2, client2, fake, env.endpoint, db_path)
                outcome = await env2.wait_outcome(resumed[0])
                stale_outcome = await env2.wait_outcome(stale)
                await env2.no_stored_callbacks()
        assert outcome["status"] == "verified" and outcome["profile"] == VERIFIED_PROFILE
        # the expired token is not sent again: it fails at once instead of waiting for the expiry
        assert (stale_outcome["status"], stale_outcome["reason"]) == ("failed", "provider_error")
        assert fake.request_count == 3
        for sid in (resumed[0], stale):
            assert len(events_of(env2, sid, "outcome")) == 1
            assert events_of(env2, sid, "progress") == [{"stage": "profile_fetching"}]
    finally:
        fake.hold.set()


def merge_server(overrides: dict[str, Any], **server: Any) -> dict[str, Any]:
    return {**overrides, "server": server}


async def test_the_profile_is_fetched_while_the_token_commits_and_the_outcome_waits_for_it(env: Env) -> None:
    sid, nonce = await env.start()
    token = env.fake.issue_token(PHONE)
    before = env.fake.request_count
    lock = sqlite3.connect(env.db_path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the gateway's commit of the token has to wait for this
    try:
        answer = asyncio.ensure_future(env.token_callback(nonce, token))
        async with asyncio.timeout(5):
            while env.fake.request_count == before:
                await asyncio.sleep(0.01)
        # The profile came while the token was not durable: no answer yet, nothing stored.
        await asyncio.sleep(0.05)
        assert not answer.done()
        assert lock.execute("SELECT status FROM sessions WHERE id = ?", (sid,)).fetchone()[0] == "pending"
    finally:
        lock.execute("COMMIT")
        lock.close()
    assert (await answer).status_code == 200
    assert (await env.wait_outcome(sid))["status"] == "verified"
    assert env.fake.request_count == before + 1


async def test_a_quick_profile_commits_with_the_token_in_one_fsync(env: Env) -> None:
    """A quick profile: token, progress and outcome share one commit (one fsync on the delivery path)."""
    sid, nonce = await env.start()
    token = env.fake.issue_token(PHONE)
    commits = env.gw.gateway.store.db.commits
    events = await env.stream(sid, lambda: _accepted(env.token_callback(nonce, token)))
    assert env.gw.gateway.store.db.commits == commits + 1
    assert [e["event"] for e in events] == ["status", "progress", "outcome"]
    assert events[2]["data"]["status"] == "verified"
    assert env.stored_callbacks() == 0  # never stored: the token was forgotten in the same commit
    assert env.query("SELECT COUNT(*) FROM truecaller_tokens_used WHERE session_id = ?", (sid,)) == [(1,)]


async def test_a_slow_profile_lets_the_token_commit_first(env: Env) -> None:
    sid, nonce = await env.start()
    token = env.fake.issue_token(PHONE)
    env.fake.hold = asyncio.Event()  # longer than ONE_COMMIT_WAIT
    answer = await env.token_callback(nonce, token)
    assert answer.status_code == 200 and answer.json() == {"status": "accepted"}
    assert env.fake.request_count == 1  # the fetch started at once and still runs
    assert env.stored_callbacks() == 1
    assert (await env.snapshot(sid))["status"] == "pending"
    env.fake.hold.set()
    assert (await env.wait_outcome(sid))["status"] == "verified"
    assert env.fake.request_count == 1
    assert len(events_of(env, sid, "outcome")) == 1


async def test_a_status_callback_waits_for_a_deciding_token_callback(env: Env) -> None:
    """A rejection that arrives while the token's fetch runs (nothing stored yet) cannot win."""
    sid, nonce, _, answer = await deciding_callback(env, hold=True)
    assert env.stored_callbacks() == 0  # deciding: the fetch runs before anything is stored
    late = await env.status_callback(nonce, "user_rejected")
    assert late.status_code == 200 and late.json() == {"status": "ignored"}
    assert (await answer).status_code == 200
    env.fake.hold.set()
    outcome = await env.wait_outcome(sid)
    assert outcome["status"] == "verified"


async def test_a_status_callback_after_a_one_commit_outcome_is_404(env: Env) -> None:
    sid, nonce, _, answer = await deciding_callback(env, hold=False)
    late = await env.status_callback(nonce, "user_rejected")
    assert late.status_code == 404 and late.json()["error"]["code"] == "session_not_found"
    assert (await answer).status_code == 200
    assert (await env.wait_outcome(sid))["status"] == "verified"
    assert events_of(env, sid, "progress") == [{"stage": "profile_fetching"}]


async def _accepted(pending: Awaitable[httpx.Response]) -> None:
    answer = await pending
    assert answer.status_code == 200 and answer.json() == {"status": "accepted"}


async def test_a_repeat_during_a_one_commit_decision_causes_no_second_fetch(env: Env) -> None:
    sid, nonce, token, first = await deciding_callback(env, hold=False)
    repeat = await env.token_callback(nonce, token)
    # it waited for the first one's decision, which finished the session
    assert repeat.status_code == 404 and repeat.json()["error"]["code"] == "session_not_found"
    assert (await first).status_code == 200
    assert env.fake.request_count == 1
    assert len(events_of(env, sid, "outcome")) == 1


async def test_concurrent_identical_callbacks_fetch_once(env: Env) -> None:
    sid, nonce = await env.start()
    token = env.fake.issue_token(PHONE)
    env.fake.delay = 0.05
    answers = await asyncio.gather(*(env.token_callback(nonce, token) for _ in range(20)))
    codes = sorted((a.status_code, a.json().get("status") or a.json()["error"]["code"]) for a in answers)
    assert (200, "accepted") in codes
    assert set(codes) <= {(200, "accepted"), (404, "session_not_found")}
    assert env.fake.request_count == 1
    assert (await env.wait_outcome(sid))["status"] == "verified"
    assert len(events_of(env, sid, "outcome")) == 1


async def test_a_decision_cut_by_shutdown_is_a_503_and_stores_nothing(env: Env) -> None:
    sid, nonce, token, answer = await deciding_callback(env, hold=True)
    tasks = [t for t in env.gw.gateway.background._tasks if t.get_name().startswith("truecaller-token-")]
    assert len(tasks) == 1
    tasks[0].cancel()  # what the lifespan does to background work at a stop
    reply = await answer
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "shutting_down"
    assert env.stored_callbacks() == 0 and (await env.snapshot(sid))["status"] == "pending"
    assert not env.provider._deciding and sid not in env.provider._fetching
    # Truecaller's retry then goes through
    env.fake.hold.set()
    assert (await env.token_callback(nonce, token)).status_code == 200
    assert (await env.wait_outcome(sid))["status"] == "verified"


async def deciding_callback(env: Env, *, hold: bool) -> tuple[str, str, str, asyncio.Future[httpx.Response]]:
    """A session whose token callback is in flight, its profile fetch already at the fake host.

    `hold`: the fake holds the profile (longer than ONE_COMMIT_WAIT: the token commits alone);
    otherwise it answers after 0.05 s (inside the wait: one commit). (sid, nonce, token, answer)
    """
    sid, nonce = await env.start()
    token = env.fake.issue_token(PHONE)
    if hold:
        env.fake.hold = asyncio.Event()
    else:
        env.fake.delay = 0.05
    answer = asyncio.ensure_future(env.token_callback(nonce, token))
    await env.fake.wait_requests(1)
    return sid, nonce, token, answer
