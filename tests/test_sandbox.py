"""Sandbox mode and the demo page over HTTP: wiring, both fake flows, escaping, and the real CLI."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import pytest_asyncio
from starlette.applications import Starlette
from starlette.routing import Mount

from gateway.errors import ConfigError
from gateway.providers.truecaller.fake import FakeTruecallerState
from gateway.providers.veriphone.fake import FakeVeriphoneState
from gateway.sandbox import (
    DEFAULT_TRUECALLER_PHONE,
    apply_sandbox,
    loopback_base,
    parse_deeplink,
)
from gateway.web.demo import SANDBOX_HOOK
from gateway.workers import bind
from tests.utils import RawStream, Running, make_settings, parse_sse, run_gateway, run_sandbox_gateway, to_toml

pytestmark = pytest.mark.timeout(20)
# Tests on the shared sandbox gateway run in its (module) event loop.
on_sandbox = pytest.mark.asyncio(loop_scope="module")

DIALOG = "/sandbox/truecaller/dialog"
PHONE = "+919812345678"
US_PHONE = "+14155550100"
EVIL = '"><img src=x onerror=alert(1)><script>alert(2)</script>'


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sandbox(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    settings = make_settings(tmp_path_factory.mktemp("sandbox") / "gateway.db")
    async with run_sandbox_gateway(settings) as running:
        yield running


def fake_of(running: Running, prefix: str) -> Any:
    app = running.server.config.app
    assert isinstance(app, Starlette)
    mount = next(r for r in app.routes if isinstance(r, Mount) and r.path == prefix)
    return mount.app.state.fake  # type: ignore[attr-defined]


async def create(client: httpx.AsyncClient, provider: str, phone: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"provider": provider}
    if phone is not None:
        body["phone"] = phone
    r = await client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def outcome(client: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/sessions/{session_id}", params={"wait": 5})
    assert r.json()["outcome"] is not None, r.json()
    return dict(r.json()["outcome"])


# --- off unless asked for --------------------------------------------------------------------

SANDBOX_PATHS = [
    ("GET", "/demo"),
    ("GET", "/static/demo.html"),
    ("GET", f"{DIALOG}?deeplink=x"),
    ("POST", DIALOG),
    ("GET", "/sandbox/truecaller/v1/default"),
    ("GET", "/sandbox/veriphone/verify/0b7a6f2e-2d3b-4c1a-9a51-3f0f4f1d2e3c"),
    ("POST", "/sandbox/veriphone/sdk-api/phone-verification/create-session/v1.0.0"),
    ("GET", "/sandbox/veriphone/sdk-api/phone-verification/verification-result/v1.0.0?sessionUuid=x"),
]


async def test_nothing_of_the_sandbox_or_the_demo_without_the_flag(tmp_path: Path) -> None:
    async with run_gateway(make_settings(tmp_path / "g.db")) as gw, gw.client() as client:
        for method, path in SANDBOX_PATHS:
            r = await client.request(method, path)
            assert r.status_code == 404, (method, path, r.status_code)
        js = await client.get("/static/verify.js")
        assert js.status_code == 200
        assert "GatewayVerify" in js.text


async def test_demo_flag_serves_the_page_without_the_sandbox(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "g.db", {"server": {"demo": True}})
    async with run_gateway(settings) as gw, gw.client() as client:
        r = await client.get("/demo")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        assert SANDBOX_HOOK not in r.text
        assert 'id="btn-truecaller"' in r.text
        for method, path in SANDBOX_PATHS[1:]:
            assert (await client.request(method, path)).status_code == 404, path


@on_sandbox
async def test_sandbox_demo_has_the_hook_and_a_csp_matching_its_scripts(sandbox: Running) -> None:
    async with sandbox.client() as client:
        r = await client.get("/demo")
    assert r.status_code == 200
    assert r.text.count(SANDBOX_HOOK) == 1
    assert SANDBOX_HOOK + "\n</head>" in r.text  # in <head>, never inside a comment
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "'unsafe-inline'" not in csp
    for script in re.findall(r"<script>(.*?)</script>", r.text, re.DOTALL):
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert r.headers["cache-control"] == "no-store"


# --- settings ----------------------------------------------------------------------------------


def test_apply_sandbox_points_providers_at_the_gateway(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(
        tmp_path / "g.db", {"providers": {"veriphone": {"api_key": "real-key", "api_secret": "real-secret"}}}
    )
    with caplog.at_level(logging.WARNING, logger="gateway.sandbox"):
        sandboxed = apply_sandbox(settings, ("0.0.0.0", 8123))
        again = apply_sandbox(settings, ("0.0.0.0", 8123))
    assert sandboxed.sandbox and sandboxed.server.demo
    assert sandboxed.server.port == 8123
    tc, vp = sandboxed.providers.truecaller, sandboxed.providers.veriphone
    assert (tc.require_https, tc.require_public_ip, tc.profile_hosts) == (False, False, ("127.0.0.1:8123",))
    assert tc.partner_key == "sandbox" and tc.partner_name
    assert vp.api_base == "http://127.0.0.1:8123/sandbox/veriphone"
    # Real credentials never go to a fake; the random ones differ per process (per call here).
    assert vp.api_key not in ("", "real-key") and vp.api_secret not in ("", "real-secret")
    assert (vp.api_key, vp.api_secret) != (again.providers.veriphone.api_key, again.providers.veriphone.api_secret)
    assert (vp.success_url, vp.failure_url) == ("/demo", "/demo")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "SANDBOX MODE" in warnings[0] and "http://127.0.0.1:8123/demo" in warnings[0]
    assert all(vp.api_key not in w for w in warnings)


def test_apply_sandbox_needs_the_real_port(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="real port"):
        apply_sandbox(make_settings(tmp_path / "g.db", {"server": {"port": 0}}))


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("0.0.0.0", "http://127.0.0.1:9"),
        ("127.0.0.1", "http://127.0.0.1:9"),
        ("::", "http://[::1]:9"),
        ("::1", "http://[::1]:9"),
        ("192.0.2.7", "http://192.0.2.7:9"),
        ("localhost", "http://localhost:9"),
    ],
)
def test_loopback_base(host: str, expected: str) -> None:
    assert loopback_base(host, 9) == expected


def test_bind_socket_reports_the_real_port() -> None:
    sock = bind("127.0.0.1", 0)
    try:
        host, port = sock.getsockname()[:2]
        assert host == "127.0.0.1" and port > 0
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("link", "nonce"),
    [
        ("truecallersdk://truesdk/web_verify?type=btmsheet&requestNonce=abcdefgh12&partnerName=Shop", "abcdefgh12"),
        (
            "truecallersdk://truesdk/web_verify?requestNonce=RL8YZ41FQMt5Jiak2sc_Ys0OgQA%3D",
            "RL8YZ41FQMt5Jiak2sc_Ys0OgQA=",
        ),
        ("https://truesdk/web_verify?requestNonce=abcdefgh12", None),
        ("truecallersdk://truesdk/other?requestNonce=abcdefgh12", None),
        ("truecallersdk://truesdk/web_verify?requestNonce=short", None),
        ("truecallersdk://truesdk/web_verify?requestNonce=abcdefgh12&requestNonce=abcdefgh13", None),
        ("truecallersdk://truesdk/web_verify?requestNonce=" + "a" * 65, None),
        ("truecallersdk://truesdk/web_verify?requestNonce=abcd%3Cefgh", None),
        ("", None),
    ],
)
def test_parse_deeplink(link: str, nonce: str | None) -> None:
    parsed = parse_deeplink(link)
    assert (parsed.nonce if parsed else None) == nonce


# --- Truecaller: the dialog -------------------------------------------------------------------


@on_sandbox
async def test_truecaller_dialog_continue_verifies_over_real_callbacks(sandbox: Running) -> None:
    fake: FakeTruecallerState = fake_of(sandbox, "/sandbox/truecaller")
    served = fake.served
    async with sandbox.client() as client:
        s = await create(client, "truecaller", PHONE)
        deeplink = s["truecaller"]["deeplink"]
        async with client.stream("GET", s["stream_url"]) as st:
            rs = RawStream(st)
            raw = await rs.until(b"event: status")
            page = await client.get(DIALOG, params={"deeplink": deeplink})
            assert page.status_code == 200
            assert "Gateway sandbox" in page.text
            assert f'value="{PHONE}"' in page.text  # the session's own number, as the app would show
            raw += await rs.until(b"flow_invoked")
            form = {"deeplink": deeplink, "action": "continue", "phone": PHONE, "first": "Asha", "last": "Rao"}
            done = await client.post(DIALOG, data=form)
            assert done.status_code == 200, done.text
            raw += await rs.rest()
        events = [(e["event"], json.loads(e["data"])) for e in parse_sse(raw) if "event" in e]
    stages = [data["stage"] for kind, data in events if kind == "progress"]
    assert stages == ["flow_invoked", "profile_fetching"]
    kind, result = events[-1]
    assert kind == "outcome"
    assert result["status"] == "verified"
    assert result["phone"] == PHONE
    assert result["profile"] == {"first_name": "Asha", "last_name": "Rao", "email": None, "country": "IN"}
    assert fake.served == served + 1  # a real profile fetch from the mounted fake host


@on_sandbox
async def test_truecaller_dialog_defaults_to_a_realistic_number(sandbox: Running) -> None:
    async with sandbox.client() as client:
        s = await create(client, "truecaller")
        page = await client.get(DIALOG, params={"deeplink": s["truecaller"]["deeplink"]})
        assert f'value="{DEFAULT_TRUECALLER_PHONE}"' in page.text
        form = {"deeplink": s["truecaller"]["deeplink"], "action": "continue", "phone": DEFAULT_TRUECALLER_PHONE}
        assert (await client.post(DIALOG, data=form)).status_code == 200
        assert (await outcome(client, s["id"]))["phone"] == DEFAULT_TRUECALLER_PHONE


@on_sandbox
@pytest.mark.parametrize(("action", "reason"), [("reject", "user_rejected"), ("another", "use_another_number")])
async def test_truecaller_dialog_status_buttons(sandbox: Running, action: str, reason: str) -> None:
    async with sandbox.client() as client:
        s = await create(client, "truecaller")
        r = await client.post(DIALOG, data={"deeplink": s["truecaller"]["deeplink"], "action": action})
        assert r.status_code == 200
        result = await outcome(client, s["id"])
        assert (result["status"], result["reason"]) == ("rejected", reason)
        # A second answer for the same request finds it no longer pending.
        again = await client.post(DIALOG, data={"deeplink": s["truecaller"]["deeplink"], "action": action})
        assert again.status_code == 404


@on_sandbox
async def test_truecaller_dialog_refuses_bad_input(sandbox: Running) -> None:
    async with sandbox.client() as client:
        s = await create(client, "truecaller")
        link = s["truecaller"]["deeplink"]
        bad_phone = await client.post(DIALOG, data={"deeplink": link, "action": "continue", "phone": "12345"})
        assert bad_phone.status_code == 422
        assert "valid phone number" in bad_phone.text
        assert (await client.post(DIALOG, data={"deeplink": link, "action": "dance"})).status_code == 400
        assert (await client.get(DIALOG, params={"deeplink": "javascript:alert(1)"})).status_code == 400
        assert (await client.get(DIALOG)).status_code == 400
        not_a_form = await client.post(DIALOG, json={"deeplink": link, "action": "reject"})
        assert not_a_form.status_code == 415
        foreign = await client.post(
            DIALOG, data={"deeplink": link, "action": "reject"}, headers={"origin": "https://evil.example"}
        )
        assert foreign.status_code == 403
        huge = await client.post(DIALOG, data={"deeplink": link, "action": "reject", "x": "y" * 9000})
        assert huge.status_code == 413
        snapshot = (await client.get(f"/v1/sessions/{s['id']}")).json()
        assert snapshot["status"] == "pending"  # none of these reached the gateway's callback
        unknown = link.replace(s["truecaller"]["request_nonce"], "unknownnonce1234")
        page = await client.get(DIALOG, params={"deeplink": unknown})
        assert page.status_code == 404
        assert "expired or was already answered" in page.text


@on_sandbox
async def test_truecaller_dialog_escapes_the_deeplink(sandbox: Running) -> None:
    async with sandbox.client() as client:
        s = await create(client, "truecaller")
        nonce = s["truecaller"]["request_nonce"]
        link = f"truecallersdk://truesdk/web_verify?requestNonce={nonce}&partnerName={quote(EVIL)}"
        page = await client.get(DIALOG, params={"deeplink": link})
    assert page.status_code == 200
    assert "<script>alert" not in page.text and "<img" not in page.text
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "same-origin"


# --- Veriph.One: the hosted page ---------------------------------------------------------------


@on_sandbox
async def test_veriphone_page_success_redirects_through_the_result_endpoint(sandbox: Running) -> None:
    fake: FakeVeriphoneState = fake_of(sandbox, "/sandbox/veriphone")
    async with sandbox.client() as client:
        s = await create(client, "veriphone", US_PHONE)
        redirect = s["veriphone"]["redirect_url"]
        uuid = s["veriphone"]["session_uuid"]
        assert redirect == f"{sandbox.url}/sandbox/veriphone/verify/{uuid}"
        page = await client.get(redirect)
        assert page.status_code == 200
        assert f'value="{US_PHONE}"' in page.text
        done = await client.post(redirect, data={"status": "8192", "method": "10", "phone": US_PHONE})
        assert done.status_code == 303
        assert done.headers["location"] == f"/v1/callbacks/veriphone?sessionUuid={uuid}"
        result_page = await client.get(done.headers["location"])
        assert result_page.status_code == 307
        assert result_page.headers["location"] == "/demo?status=verified"
        result = await outcome(client, s["id"])
    assert result["status"] == "verified"
    assert result["phone"] == US_PHONE
    assert result["veriphone"]["method"] == 10
    # The gateway pulled the result with the sandbox's key and met the documented oddities.
    assert fake.result_count(uuid) == 1
    assert fake.numbers_as_strings and fake.result_http_status == 201


@on_sandbox
@pytest.mark.parametrize(
    ("status", "reason"),
    [(4352, "user_cancelled"), (4097, "destination_mismatch"), (4104, "expired"), (0, "not_completed")],
)
async def test_veriphone_page_failures(sandbox: Running, status: int, reason: str) -> None:
    async with sandbox.client() as client:
        s = await create(client, "veriphone")
        redirect = s["veriphone"]["redirect_url"]
        done = await client.post(redirect, data={"status": str(status), "method": "20", "phone": US_PHONE})
        result_page = await client.get(done.headers["location"])
        assert result_page.status_code == 307
        assert result_page.headers["location"].startswith("/demo?status=")
        result = await outcome(client, s["id"])
    assert result["status"] != "verified"
    assert result["reason"] == reason


@on_sandbox
async def test_veriphone_page_refuses_bad_input(sandbox: Running) -> None:
    async with sandbox.client() as client:
        s = await create(client, "veriphone")
        redirect = s["veriphone"]["redirect_url"]
        assert (await client.post(redirect, data={"status": "1", "method": "20", "phone": US_PHONE})).status_code == 400
        assert (await client.post(redirect, data={"status": "8192", "method": "99"})).status_code == 400
        assert (await client.post(redirect, data={"status": "8192", "method": "20", "phone": "x"})).status_code == 422
        evil = await client.get(f"/sandbox/veriphone/verify/{quote(EVIL.replace('/', ''))}")
        assert evil.status_code == 404
        assert "<img" not in evil.text
        assert (await client.get("/sandbox/veriphone/verify/0b7a6f2e-2d3b-4c1a")).status_code == 404
        assert (await client.get(f"/v1/sessions/{s['id']}")).json()["status"] == "pending"


# --- the real command ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def sandbox_process(tmp_path: Path, *args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`python -m gateway serve --sandbox …`; yields the demo URL it announces in its log."""
    config = tmp_path / "config.toml"
    config.write_text(to_toml({"database": {"path": "gateway.db"}, "logging": {"format": "json"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--sandbox", "--config", str(config), *args,
        cwd=tmp_path, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(15):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, "the gateway exited before announcing the sandbox"
                found = re.search(r"Try it: (http://\S+/demo)", line)
                if found:
                    assert json.loads(line)["level"] == "warning"
                    break
            while "Application startup complete" not in line:
                line = (await proc.stdout.readline()).decode()
                assert line, "the gateway exited during startup"
        yield proc, found.group(1)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_sandbox_on_port_zero_and_all_interfaces(tmp_path: Path) -> None:
    async with sandbox_process(tmp_path, "--host", "0.0.0.0", "--port", "0") as (proc, demo_url):
        base = demo_url.removesuffix("/demo")
        assert re.fullmatch(r"http://127\.0\.0\.1:[1-9][0-9]*", base), base
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            assert SANDBOX_HOOK in (await client.get("/demo")).text
            s = await create(client, "truecaller")
            link = s["truecaller"]["deeplink"]
            assert (await client.get(DIALOG, params={"deeplink": link})).status_code == 200
            form = {"deeplink": link, "action": "continue", "phone": DEFAULT_TRUECALLER_PHONE}
            assert (await client.post(DIALOG, data=form)).status_code == 200
            assert (await outcome(client, s["id"]))["status"] == "verified"
            v = await create(client, "veriphone")
            done = await client.post(v["veriphone"]["redirect_url"], data={"status": "8192", "method": "20"})
            assert done.status_code == 422  # no phone typed: the page asks again
            form = {"status": "8192", "method": "20", "phone": US_PHONE}
            done = await client.post(v["veriphone"]["redirect_url"], data=form)
            assert (await client.get(done.headers["location"])).headers["location"] == "/demo?status=verified"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert proc.stdout is not None
        rest = (await proc.stdout.read()).decode()
    secrets_seen = [s["truecaller"]["request_nonce"], s["id"], v["veriphone"]["session_uuid"], US_PHONE[1:]]
    assert not [x for x in secrets_seen if x in rest]
