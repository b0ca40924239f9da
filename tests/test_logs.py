"""Logs: JSON lines, an access record per request, and never a phone, name, token or session id."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from gateway.config import LoggingConfig
from gateway.logs import JsonFormatter, TextFormatter, configure_logging
from gateway.outcome import VERIFIED, Outcome
from gateway.providers.truecaller.fake import PROFILE_PATH, create_fake_truecaller, post_callback, post_status
from gateway.providers.veriphone.fake import create_fake_veriphone, fake_state
from gateway.web.accesslog import UNMATCHED, AccessLog
from tests.utils import RawStream, make_settings, run_gateway, serve_app

pytestmark = pytest.mark.timeout(20)

TC_PHONE = "+919812345670"
VP_PHONE = "+15551234567"
OTHER_PHONE = "+447700900123"
USER_REF = "user-ref-secret-77"
PROFILE = {"first_name": "Zebulon", "last_name": "Quixotic", "email": "zq.secret@example.org", "country": "IN"}
CALLBACK = "/v1/callbacks/truecaller"


# --- the access-log middleware on a tiny app ---------------------------------------------------


async def _item(request: Request) -> Response:
    return PlainTextResponse("ok")


async def _boom(request: Request) -> Response:
    raise RuntimeError("boom")


def _tiny_app() -> Starlette:
    files = Starlette(routes=[Route("/{name}", _item)])
    return Starlette(
        routes=[Route("/items/{item_id}", _item), Route("/boom", _boom), Mount("/files", app=files)],
        middleware=[Middleware(AccessLog)],
    )


class Access:
    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    def records(self) -> list[logging.LogRecord]:
        return [r for r in self.caplog.records if r.name == "gateway.access"]


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> Access:
    caplog.set_level(logging.DEBUG, logger="gateway.access")
    return Access(caplog)


async def _get(path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=_tiny_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tiny") as client:
        return await client.get(path, headers=headers)


async def test_access_record_has_route_template_status_duration_and_request_id(access: Access) -> None:
    response = await _get("/items/secret-item-id?token=secret-query")
    (record,) = access.records()
    fields: dict[str, Any] = record.__dict__
    assert (fields["method"], fields["route"], fields["status"]) == ("GET", "/items/{item_id}", 200)
    assert fields["duration_ms"] >= 0
    assert response.headers["x-request-id"] == fields["request_id"]
    assert len(fields["request_id"]) == 16
    assert "secret" not in record.getMessage()


@pytest.mark.parametrize(
    ("path", "status", "route"),
    [("/nowhere/secret-id", 404, UNMATCHED), ("/files/secret-name", 200, "/files/{name}"), ("/boom", 500, "/boom")],
)
async def test_unmatched_mounted_and_failing_routes(access: Access, path: str, status: int, route: str) -> None:
    assert (await _get(path)).status_code == status
    (record,) = access.records()
    assert (record.__dict__["route"], record.__dict__["status"]) == (route, status)


@pytest.mark.parametrize(
    ("incoming", "echoed"),
    [("trace-7f3a.19:2", True), ("x" * 64, True), ("x" * 65, False), ("has space", False), ('a"b', False)],
)
async def test_incoming_request_id_is_echoed_only_when_sane(incoming: str, echoed: bool) -> None:
    response = await _get("/items/1", headers={"x-request-id": incoming})
    assert (response.headers["x-request-id"] == incoming) is echoed
    assert len(response.headers.get_list("x-request-id")) == 1


def test_formatters_drop_uvicorn_colour_duplicates() -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Started %s", ("x",), None)
    record.color_message = "\x1b[36mStarted\x1b[0m"
    record.session = "abc123"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "Started x" and entry["session"] == "abc123" and "color_message" not in entry
    assert "\x1b" not in TextFormatter().format(record)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("fmt", "stream", "expected"),
    [
        ("auto", Terminal(), TextFormatter),
        ("auto", io.StringIO(), JsonFormatter),
        ("json", Terminal(), JsonFormatter),
        ("text", io.StringIO(), TextFormatter),
    ],
)
def test_auto_format_is_text_on_a_terminal_and_json_otherwise(
    captured: io.StringIO, fmt: str, stream: io.StringIO, expected: type[logging.Formatter]
) -> None:
    configure_logging(LoggingConfig(format=fmt), stream=stream)
    (handler,) = logging.getLogger().handlers
    try:
        assert type(handler.formatter) is expected
    finally:
        logging.getLogger().removeHandler(handler)


# --- a whole flow against a real gateway, every log line captured ------------------------------


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Everything logged in this process, as the gateway writes it in production (JSON, debug level)."""
    root = logging.getLogger()
    level = root.level
    touched = ["uvicorn", "uvicorn.error", "uvicorn.asgi", "uvicorn.access", "httpx", "httpcore", "aiosqlite"]
    saved = {
        name: (lg.level, lg.propagate, lg.disabled, list(lg.handlers), list(lg.filters))
        for name in touched
        for lg in [logging.getLogger(name)]
    }
    flags = (logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    buffer = io.StringIO()
    configure_logging(LoggingConfig(level="debug", format="json"), stream=buffer)
    (handler,) = root.handlers
    try:
        yield buffer
    finally:
        root.removeHandler(handler)  # pytest's own handlers come and go per phase
        root.setLevel(level)
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = flags
        for name, (lvl, propagate, disabled, handlers, filters) in saved.items():
            lg = logging.getLogger(name)
            lg.setLevel(lvl)
            lg.propagate, lg.disabled, lg.handlers[:], lg.filters[:] = propagate, disabled, handlers, filters


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, Any]]:
    tc_app, tc = create_fake_truecaller()
    vp_app = create_fake_veriphone("k", "s", public_url="https://fake-veriph.test")
    async with serve_app(tc_app) as tc_url, serve_app(vp_app) as vp_url:
        yield {"tc": tc, "tc_url": tc_url, "vp": fake_state(vp_app), "vp_url": vp_url}


async def test_a_whole_flow_logs_no_personal_data(
    captured: io.StringIO, fakes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tc_port = int(fakes["tc_url"].rsplit(":", 1)[1])
    settings = make_settings(
        tmp_path / "gw.db",
        {
            "logging": {"level": "debug"},
            "providers": {
                "truecaller": {
                    "require_https": False,
                    "require_public_ip": False,
                    "profile_hosts": [f"127.0.0.1:{tc_port}"],
                },
                "veriphone": {
                    "api_base": fakes["vp_url"],
                    "api_key": "k",
                    "api_secret": "s",
                    "success_url": "https://app.example/ok",
                    "failure_url": "https://app.example/fail",
                },
            },
        },
    )
    secrets: list[str] = [TC_PHONE[1:], TC_PHONE[3:], VP_PHONE[1:], VP_PHONE[2:], OTHER_PHONE[1:], USER_REF]
    secrets += [PROFILE["first_name"], PROFILE["last_name"], PROFILE["email"]]
    async with run_gateway(settings) as gw, gw.client() as client:

        async def create(provider: str, phone: str) -> dict[str, Any]:
            r = await client.post("/v1/sessions", json={"provider": provider, "phone": phone, "user_ref": USER_REF})
            assert r.status_code == 201, r.text
            body: dict[str, Any] = r.json()
            secrets.append(body["id"])
            secrets.extend(str(v) for v in body[provider].values())
            return body

        # Truecaller, the real way: stream, flow_invoked, token callback, profile fetch, outcome.
        tc1 = await create("truecaller", TC_PHONE)
        nonce = tc1["truecaller"]["request_nonce"]
        token = fakes["tc"].issue_token(TC_PHONE, PROFILE["first_name"], PROFILE["last_name"], PROFILE["email"], "IN")
        secrets.append(token)
        async with client.stream("GET", tc1["stream_url"], headers={"x-request-id": "flow-stream-1"}) as st:
            assert st.headers["x-request-id"] == "flow-stream-1"
            rs = RawStream(st)
            await rs.until(b"event: status")
            assert (await post_status(client, CALLBACK, nonce, "flow_invoked")).status_code == 200
            r = await post_callback(client, CALLBACK, nonce, token, fakes["tc_url"] + PROFILE_PATH)
            assert r.status_code == 200, r.text
            raw = await rs.rest()
        assert b"event: outcome" in raw and PROFILE["email"].encode() in raw  # the data did flow

        # Truecaller, finished in-process with a phone and a profile.
        tc2 = await create("truecaller", OTHER_PHONE)
        async with client.stream("GET", tc2["stream_url"]) as st:
            rs = RawStream(st)
            await rs.until(b"event: status")
            await gw.gateway.sessions.finish(tc2["id"], Outcome(VERIFIED, phone=OTHER_PHONE, profile=dict(PROFILE)))
            assert b"event: outcome" in await rs.rest()
        # A repeated callback for the finished session, and one for an unknown nonce.
        assert (
            await post_status(client, CALLBACK, tc2["truecaller"]["request_nonce"], "user_rejected")
        ).status_code == 404
        assert (await post_status(client, CALLBACK, "unknown-nonce-4f1c9a7e", "user_rejected")).status_code == 404
        secrets.append("unknown-nonce-4f1c9a7e")
        bad = {"requestId": nonce, "accessToken": "leaky-token-8c2e", "endpoint": "https://evil.example/x"}
        assert (await client.post(CALLBACK, json=bad)).status_code in (400, 404)
        secrets += ["leaky-token-8c2e", "evil.example"]

        # Veriph.One: create, the user completes, the result endpoint redirects; then a reuse.
        vp = await create("veriphone", VP_PHONE)
        session_uuid = vp["veriphone"]["session_uuid"]
        fakes["vp"].complete(session_uuid)
        r = await client.get("/v1/callbacks/veriphone", params={"sessionUuid": session_uuid})
        assert r.status_code == 307 and r.headers["location"].startswith("https://app.example/ok")
        r = await client.post("/v1/callbacks/veriphone", json={"sessionUuid": session_uuid})
        assert r.status_code < 500
        assert (await client.get(vp["status_url"])).json()["outcome"]["phone"] == VP_PHONE

        # 404s and bad requests that carry ids and phone numbers.
        unknown = "Unknown0Session0Id0Abc123"
        secrets.append(unknown)
        assert (await client.get(f"/v1/sessions/{unknown}")).status_code == 404
        assert (await client.get(f"/v1/sessions/{unknown}/events")).status_code == 404
        assert (await client.get(f"/v1/sessions/{unknown}/nothing-here")).status_code == 404
        assert (await client.get(f"/v1/sessions/{tc1['id']}?wait=oops")).status_code == 400
        for body in (
            {"provider": "nope", "phone": OTHER_PHONE},
            {"provider": "truecaller", "phone": OTHER_PHONE.replace("+", "00")},
            {"provider": "truecaller", "phone": OTHER_PHONE, "email": PROFILE["email"]},
            {"provider": "truecaller", "user_ref": USER_REF * 10},
        ):
            assert (await client.post("/v1/sessions", json=body)).status_code == 400
        raw_body = f'{{"provider": "truecaller", "phone": "{OTHER_PHONE}"'.encode()  # truncated JSON
        r = await client.post("/v1/sessions", content=raw_body, headers={"content-type": "application/json"})
        assert r.status_code == 400

        # A WebSocket upgrade (uvicorn would log its path) and an unhandled error (500).
        upgrade = {
            "upgrade": "websocket",
            "connection": "Upgrade",
            "sec-websocket-version": "13",
            "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        assert (await client.get(tc1["stream_url"], headers=upgrade)).status_code == 200

        async def broken_get(session_id: str) -> None:
            raise RuntimeError("storage exploded")

        monkeypatch.setattr(gw.gateway.sessions, "get", broken_get)
        assert (await client.get(tc2["status_url"])).status_code == 500
        monkeypatch.undo()

    text = captured.getvalue()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    leaked = sorted({s for s in secrets if s in text})
    assert not leaked, f"found in the logs: {leaked}"

    access = [entry for entry in lines if entry["logger"] == "gateway.access"]
    routes = {(e["method"], e["route"], e["status"]) for e in access}
    assert ("GET", "/v1/sessions/{session_id}/events", 200) in routes
    assert ("POST", "/v1/sessions", 201) in routes
    assert ("GET", "/v1/sessions/{session_id}", 404) in routes
    assert ("GET", UNMATCHED, 404) in routes
    assert ("POST", CALLBACK, 200) in routes
    assert ("GET", "/v1/sessions/{session_id}", 500) in routes
    assert all(isinstance(e["duration_ms"], float) and len(e["request_id"]) >= 1 for e in access)
    assert any(e["request_id"] == "flow-stream-1" for e in access)
    assert any(e["msg"] == "unhandled error on /v1/sessions/{session_id}" for e in lines)
    assert any(e["logger"] == "gateway.truecaller" for e in lines)  # the provider's own lines are in
