"""The demo page, verify.js and the sandbox in a real headless Chromium (Playwright, async API).

The gateway runs in sandbox mode in this test's event loop (a real uvicorn on a free port)
and Playwright drives Debian's /usr/bin/chromium from the same loop, so every wait yields to
the server. Nothing sleeps: each step waits for an event or a DOM state, with a timeout.
Without Chromium the tests skip locally and fail in CI (CI=true).

Screenshots of each demo state go to docs/screenshots/ when UPDATE_SCREENSHOTS=1 or the
file is missing, else to the test's tmp dir (so the step still runs).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest
import pytest_asyncio
from playwright.async_api import (
    Browser,
    BrowserContext,
    Dialog,
    Page,
    Response,
    ViewportSize,
    async_playwright,
    expect,
)
from playwright.async_api import Request as PageRequest
from playwright.async_api import TimeoutError as PlaywrightTimeout
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from gateway.config import settings_from_dict
from gateway.sessions import public_ref
from tests.utils import Running, make_settings, run_gateway, run_sandbox_gateway, serve_app

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]

CHROMIUM = os.environ.get("GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
VIEWPORT: ViewportSize = {"width": 480, "height": 600}
STEP = 10_000  # ms: the bound of every single wait; a hang fails fast
RETRY_MS = 200  # the stream's `retry:`, small so a wrongful reconnect would show at once
TRUECALLER_PHONE = "+919876543210"  # what the sandbox dialog offers
VERIPHONE_PHONE = "+14155550100"

# A shop on another origin: loads verify.js from the gateway named by ?gw= and records what
# the client reports. Truecaller's deep link is kept instead of fired (no app on a desktop).
SHOP_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Shop</title></head>
<body><button id="go" type="button">Verify my phone</button>
<script>
window.results = {outcome: null, error: null, progress: [], deeplink: null};
const gw = new URLSearchParams(location.search).get('gw');
const s = document.createElement('script');
s.src = gw + '/static/verify.js';
document.head.append(s);
document.getElementById('go').addEventListener('click', () => {
  GatewayVerify.start({
    gatewayUrl: gw, provider: 'truecaller', skipFocusCheck: true,
    openDeeplink: (link) => { window.results.deeplink = link; },
    onProgress: (stage) => { window.results.progress.push(stage); },
    onOutcome: (o) => { window.results.outcome = o; },
    onError: (e) => { window.results.error = {code: e.code, message: e.message}; },
  });
});
</script></body></html>"""


def shop_app() -> Starlette:
    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(SHOP_PAGE)

    return Starlette(routes=[Route("/", page)])


def require_chromium() -> None:
    if Path(CHROMIUM).exists() or shutil.which(CHROMIUM):
        return
    message = f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/check does it as root)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Env:
    gw: Running
    browser: Browser
    allowed_origin: str
    denied_origin: str
    shots: Path  # where screenshots go that must not overwrite docs/screenshots
    update_screenshots: bool


@dataclass
class Traffic:
    """Every request and response of a browser context, in order."""

    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, url)
    responses: list[tuple[str, int]] = field(default_factory=list)  # (url, status)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (method, url): no response at all

    def streams(self) -> list[str]:
        return [url for method, url in self.requests if method == "GET" and url.split("?")[0].endswith("/events")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    require_chromium()
    db = tmp_path_factory.mktemp("browser") / "gateway.db"
    shots = tmp_path_factory.mktemp("shots")
    update = os.environ.get("UPDATE_SCREENSHOTS") == "1"
    async with serve_app(shop_app()) as allowed, serve_app(shop_app()) as denied:
        settings = make_settings(db, {"stream": {"retry": RETRY_MS}, "server": {"cors_allow_origins": [allowed]}})
        async with run_sandbox_gateway(settings) as gw, async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield Env(gw, browser, allowed, denied, shots, update)
            finally:
                await browser.close()


@pytest_asyncio.fixture(loop_scope="module")
async def context(env: Env) -> AsyncIterator[tuple[BrowserContext, Traffic]]:
    """A fresh browser profile (no shared storage between tests) that records its traffic."""
    ctx = await env.browser.new_context(viewport=VIEWPORT)
    ctx.set_default_timeout(STEP)
    traffic = Traffic()
    ctx.on("request", lambda r: traffic.requests.append((r.method, r.url)))
    ctx.on("response", lambda r: traffic.responses.append((r.url, r.status)))
    ctx.on("requestfailed", lambda r: traffic.failed.append((r.method, r.url)))
    try:
        yield ctx, traffic
    finally:
        await ctx.close()


async def screenshot(page: Page, env: Env, name: str) -> None:
    """Save the demo in its current state; docs/screenshots is only written on request or when missing."""
    target = SCREENSHOTS / name
    if env.update_screenshots or not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
    else:
        target = env.shots / name
    await page.screenshot(path=str(target), full_page=True, animations="disabled", caret="hide")


async def open_demo(ctx: BrowserContext, env: Env, errors: list[str] | None = None) -> Page:
    """The demo page, idle, in sandbox mode; uncaught page errors are appended to `errors`."""
    page = await ctx.new_page()
    if errors is not None:
        page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(env.gw.url + "/demo")
    await expect(page.locator("body")).to_have_attribute("data-state", "idle")
    await expect(page.locator("#sandbox-banner")).to_be_visible()
    return page


def created(response: Response) -> bool:
    """The page's `POST /v1/sessions` answer."""
    return response.request.method == "POST" and response.url.split("?")[0].endswith("/v1/sessions")


async def state(page: Page, value: str) -> None:
    await expect(page.locator("body")).to_have_attribute("data-state", value, timeout=STEP)


async def no_request(page: Page, pattern: str, ms: int) -> None:
    """Assert that no request matching `pattern` starts within `ms` (a bounded wait, not a sleep)."""
    with pytest.raises(PlaywrightTimeout):
        await page.wait_for_event("request", lambda r: re.search(pattern, r.url) is not None, timeout=ms)


# --- (a) Truecaller through the demo and the sandbox dialog ---------------------------------


async def test_demo_truecaller_flow_verifies(env: Env, context: tuple[BrowserContext, Traffic]) -> None:
    ctx, traffic = context
    errors: list[str] = []
    page = await open_demo(ctx, env, errors)
    await screenshot(page, env, "demo-idle.png")

    async with page.expect_popup() as popup_info, page.expect_response(created) as created_info:
        await page.click("#btn-truecaller")
    dialog = await popup_info.value
    session_ref = public_ref((await (await created_info.value).json())["id"])
    await expect(dialog.get_by_role("heading", level=1)).to_have_text("Gateway sandbox")
    await expect(dialog.locator("#phone")).to_have_value(TRUECALLER_PHONE)
    await screenshot(dialog, env, "sandbox-truecaller-dialog.png")
    # The dialog sent `flow_invoked`; it reached the page as a progress event over SSE.
    await state(page, "waiting")
    await expect(page.locator("#progress")).to_have_text(re.compile("Truecaller dialog is open"))
    await screenshot(page, env, "demo-waiting.png")

    await dialog.get_by_role("button", name="Continue").click()
    await state(page, "done")
    await expect(page.locator("#outcome-status")).to_have_text("verified")
    await expect(page.locator("#outcome-phone")).to_have_text(TRUECALLER_PHONE)
    await expect(page.locator("#outcome-reason")).to_have_text("—")
    # The sandbox's own site backend got the signed webhook; the page lists it with its check.
    await expect(page.locator("#webhooks")).to_be_visible()
    mine = page.locator(f'#webhooks-list li[data-session="{session_ref}"]')
    await expect(mine).to_have_count(1)
    await expect(mine).to_have_attribute("data-verified", "true")
    await expect(mine).to_contain_text("session.completed: verified")
    await expect(mine.locator(".sig-ok")).to_have_text("\u2713 signature verified")
    async with env.gw.client() as client:
        listed = (await client.get("/sandbox/webhooks")).json()["deliveries"]
    [delivery] = [d for d in listed if d["session"] == session_ref]
    await expect(mine.locator("code")).to_have_text(delivery["id"])
    assert delivery["signature_verified"] is True
    await screenshot(page, env, "demo-verified.png")
    if not dialog.is_closed():  # the demo closes the dialog once the outcome is in
        await dialog.wait_for_event("close")

    # (d) one stream, closed by the client on the outcome: no reconnect within many `retry:`s.
    assert len(traffic.streams()) == 1, traffic.streams()
    await no_request(page, r"/events", 5 * RETRY_MS)
    assert len(traffic.streams()) == 1
    assert errors == []


async def test_demo_truecaller_reject_and_another_number(env: Env, context: tuple[BrowserContext, Traffic]) -> None:
    ctx, _ = context
    page = await open_demo(ctx, env)
    # Another number is Truecaller's way of asking for the alternate flow: the demo offers it.
    for button, reason, after in (
        ("Reject", "user_rejected", "done"),
        ("Use another number", "use_another_number", "fallback"),
    ):
        async with page.expect_popup() as popup_info:
            await page.click("#btn-truecaller")
        dialog = await popup_info.value
        await dialog.get_by_role("button", name=button).click()
        await state(page, after)
        await expect(page.locator("#outcome-status")).to_have_text("rejected")
        await expect(page.locator("#outcome-reason")).to_have_text(reason)
    await expect(page.locator("#fallback")).to_contain_text("Verify another number with Veriph.One")


async def test_demo_invalid_phone_shows_the_error(env: Env, context: tuple[BrowserContext, Traffic]) -> None:
    ctx, _ = context
    page = await open_demo(ctx, env)
    await page.fill("#phone", "12345")
    async with page.expect_popup() as popup_info:
        await page.click("#btn-veriphone")
    popup = await popup_info.value
    await state(page, "error")
    await expect(page.locator("#error")).to_contain_text("invalid_phone")
    await screenshot(page, env, "demo-error.png")
    # The empty window opened during the click (popup blockers allow no later one) is closed again.
    if not popup.is_closed():
        await popup.wait_for_event("close")


async def test_demo_truecaller_timeout_offers_the_fallback(
    env: Env, tmp_path: Path, context: tuple[BrowserContext, Traffic]
) -> None:
    # A gateway of its own: Truecaller sessions there expire after one second.
    settings = make_settings(tmp_path / "short.db", {"providers": {"truecaller": {"callback_timeout": 1}}})
    async with run_sandbox_gateway(settings) as short:
        ctx, _ = context
        page = await ctx.new_page()
        await page.goto(short.url + "/demo")
        async with page.expect_popup() as popup_info:
            await page.click("#btn-truecaller")
        dialog = await popup_info.value
        await state(page, "fallback")
        await expect(page.locator("#outcome-status")).to_have_text("expired")
        await expect(page.locator("#fallback")).to_contain_text("timed out")
        await screenshot(page, env, "demo-fallback.png")
        if not dialog.is_closed():
            await dialog.wait_for_event("close")


async def test_demo_without_sandbox_falls_back_when_no_app_takes_the_deeplink(
    env: Env, tmp_path: Path, context: tuple[BrowserContext, Traffic]
) -> None:
    # Outside the sandbox the demo fires the real truecallersdk:// link; a desktop browser has
    # no app for it and keeps the focus, which verify.js's ~600 ms focus check reads as "no app".
    settings = make_settings(tmp_path / "demo.db", {"server": {"demo": True}})
    async with run_gateway(settings) as plain:
        ctx, traffic = context
        page = await ctx.new_page()
        await page.goto(plain.url + "/demo")
        await expect(page.locator("#sandbox-banner")).to_be_hidden()
        await page.click("#btn-truecaller")
        await state(page, "fallback")
        await expect(page.locator("#fallback")).to_contain_text("Truecaller is not available")
        assert any(url.startswith("truecallersdk://truesdk/web_verify?") for _, url in traffic.requests)
        assert traffic.streams() == []  # no app, so no stream was opened


async def test_demo_sends_a_start_ticket_when_the_gateway_requires_one(
    tmp_path: Path, context: tuple[BrowserContext, Traffic]
) -> None:
    # auth.require: the demo gets a ticket from the sandbox (the site's backend) and verify.js
    # sends it as Authorization: Ticket …; the ticket starts one session, and only one.
    raw = {"database": {"path": str(tmp_path / "auth.db")}, "logging": {"format": "json"}, "auth": {"require": True}}
    settings = settings_from_dict(raw, env={"GATEWAY_TICKET_SECRET": secrets.token_urlsafe(32)})
    async with run_sandbox_gateway(settings) as gw:
        ctx, _ = context
        page = await ctx.new_page()
        await page.goto(gw.url + "/demo")
        async with page.expect_popup() as popup_info, page.expect_request(created_request) as request_info:
            await page.click("#btn-truecaller")
        authorization = (await (await request_info.value).all_headers())["authorization"]
        assert re.fullmatch(r"Ticket v1\.[0-9]+\.[\w-]+\.[\w-]{43}", authorization)
        dialog = await popup_info.value
        await dialog.get_by_role("button", name="Continue").click()
        await state(page, "done")
        await expect(page.locator("#outcome-status")).to_have_text("verified")
        async with gw.client() as client:
            for headers in ({"authorization": authorization}, {}):
                again = await client.post("/v1/sessions", json={"provider": "truecaller"}, headers=headers)
                assert again.status_code == 401


def created_request(request: PageRequest) -> bool:
    return request.method == "POST" and request.url.split("?")[0].endswith("/v1/sessions")


# --- (b) Veriph.One through the demo and the sandbox's hosted page --------------------------


async def test_demo_veriphone_flow_verifies(env: Env, context: tuple[BrowserContext, Traffic]) -> None:
    ctx, traffic = context
    errors: list[str] = []
    page = await open_demo(ctx, env, errors)
    await page.fill("#phone", VERIPHONE_PHONE)
    async with page.expect_popup() as popup_info:
        await page.click("#btn-veriphone")
    popup = await popup_info.value
    await popup.wait_for_url(re.compile(r"/sandbox/veriphone/verify/[0-9a-f-]+$"))
    await expect(popup.locator("#phone")).to_have_value(VERIPHONE_PHONE)
    await popup.select_option("#method", "21")
    await screenshot(popup, env, "sandbox-veriphone-page.png")
    await popup.get_by_role("button", name=re.compile("Verify successfully")).click()
    await state(page, "done")
    await expect(page.locator("#outcome-status")).to_have_text("verified")
    await expect(page.locator("#outcome-phone")).to_have_text(VERIPHONE_PHONE)
    if not popup.is_closed():
        await popup.wait_for_event("close")
    # The outcome came from the browser's visit to the gateway's result endpoint (whose 307 may
    # not be seen: the demo closes the window as soon as the outcome is streamed).
    results = [url for method, url in traffic.requests if "/v1/callbacks/veriphone?sessionUuid=" in url]
    assert len(results) == 1
    assert len(traffic.streams()) == 1
    assert errors == []


async def test_demo_veriphone_destination_mismatch_fails(env: Env, context: tuple[BrowserContext, Traffic]) -> None:
    ctx, _ = context
    page = await open_demo(ctx, env)
    await page.fill("#phone", VERIPHONE_PHONE)
    async with page.expect_popup() as popup_info:
        await page.click("#btn-veriphone")
    popup = await popup_info.value
    await popup.wait_for_url(re.compile(r"/sandbox/veriphone/verify/"))
    await popup.fill("#phone", "+14155550123")  # the user verifies another number than the site's
    await popup.get_by_role("button", name=re.compile("destination mismatch")).click()
    await state(page, "done")
    await expect(page.locator("#outcome-status")).to_have_text("failed")
    await expect(page.locator("#outcome-reason")).to_have_text("destination_mismatch")


async def test_demo_veriphone_same_tab_resumes_after_the_redirect(
    env: Env, context: tuple[BrowserContext, Traffic]
) -> None:
    # A blocked popup: verify.js sends this tab to Veriph.One and resume() picks the session
    # up again on the page the flow returns to (the sandbox's success_url is /demo).
    ctx, _ = context
    page = await open_demo(ctx, env)
    async with page.expect_navigation(url=re.compile(r"/sandbox/veriphone/verify/")):
        # Not awaiting start()'s promise in the page: it settles as the page navigates away.
        await page.evaluate("() => { GatewayVerify.start({provider: 'veriphone', veriphoneWindow: 'same'}); }")
    async with page.expect_navigation(url=re.compile(r"/demo\?status=verified$")):
        await page.get_by_role("button", name=re.compile("Verify successfully")).click()
    await state(page, "done")
    await expect(page.locator("#outcome-status")).to_have_text("verified")
    assert await page.evaluate("sessionStorage.length") == 0


# --- (c) verify.js on another origin -------------------------------------------------------


async def sessions_stored(env: Env) -> int:
    row = await env.gw.gateway.store.db.fetchone("SELECT COUNT(*) FROM sessions")
    assert row is not None
    return int(row[0])


async def test_allowed_origin_gets_the_outcome_over_eventsource(
    env: Env, context: tuple[BrowserContext, Traffic]
) -> None:
    ctx, traffic = context
    shop = await ctx.new_page()
    await shop.goto(f"{env.allowed_origin}/?gw={quote(env.gw.url)}")
    await shop.wait_for_function("window.GatewayVerify !== undefined")
    await shop.click("#go")
    deeplink = await (await shop.wait_for_function("window.results.deeplink")).json_value()
    assert deeplink.startswith("truecallersdk://truesdk/web_verify?")

    # The person taps Continue in "Truecaller" (the sandbox dialog, in another tab).
    dialog = await ctx.new_page()
    await dialog.goto(f"{env.gw.url}/sandbox/truecaller/dialog?deeplink={quote(deeplink, safe='')}")
    await dialog.get_by_role("button", name="Continue").click()

    outcome = await (await shop.wait_for_function("window.results.outcome")).json_value()
    assert outcome["status"] == "verified"
    assert outcome["phone"] == TRUECALLER_PHONE
    assert outcome["profile"]["first_name"] == "Asha"
    results = await shop.evaluate("window.results")
    assert results["error"] is None
    assert "profile_fetching" in results["progress"]
    # Through the stream, not by falling back to long polling.
    assert len(traffic.streams()) == 1
    assert not [url for _, url in traffic.requests if "wait=" in url]


async def test_origin_not_allowed_cannot_create_a_session(env: Env, context: tuple[BrowserContext, Traffic]) -> None:
    ctx, traffic = context
    before = await sessions_stored(env)
    shop = await ctx.new_page()
    await shop.goto(f"{env.denied_origin}/?gw={quote(env.gw.url)}")
    await shop.wait_for_function("window.GatewayVerify !== undefined")
    await shop.click("#go")
    error = await (await shop.wait_for_function("window.results.error")).json_value()
    assert error["code"] == "network_error"
    assert await shop.evaluate("window.results.outcome") is None
    # The CORS preflight was refused, so the POST failed in the browser and stored nothing.
    assert ("POST", env.gw.url + "/v1/sessions") in traffic.failed
    assert await sessions_stored(env) == before


# --- (d) the stream contract as the browser's own EventSource sees it -----------------------


async def test_eventsource_reconnect_after_the_outcome_gets_204(
    env: Env, context: tuple[BrowserContext, Traffic]
) -> None:
    """A client that does not close on the outcome reconnects once with Last-Event-ID: 204 ends it."""
    ctx, traffic = context
    page = await open_demo(ctx, env)
    async with env.gw.client() as http:
        created = (await http.post("/v1/sessions", json={"provider": "truecaller"})).json()
        form = {"deeplink": created["truecaller"]["deeplink"], "action": "reject"}
        answer = await http.post("/sandbox/truecaller/dialog", data=form)
        assert answer.status_code == 200, answer.text
    script = """(url) => new Promise((resolve) => {
        const seen = [];
        const es = new EventSource(url);
        es.addEventListener('outcome', (ev) => seen.push(['outcome', ev.lastEventId]));
        es.onerror = () => { if (es.readyState === EventSource.CLOSED) resolve(seen); };
    })"""
    seen = await page.evaluate(script, created["stream_url"])
    assert [kind for kind, _ in seen] == ["outcome"]
    streams = [(url, status) for url, status in traffic.responses if url.endswith("/events")]
    assert [status for _, status in streams] == [200, 204]
    await no_request(page, r"/events", 5 * RETRY_MS)


# --- the sandbox pages in a browser: nothing in the URL runs ---------------------------------


EVIL_UUID = '"><img src=x onerror=alert(3)>'  # no slash: it must reach the page's route


async def test_sandbox_pages_do_not_run_injected_markup(env: Env, context: tuple[BrowserContext, Traffic]) -> None:
    ctx, _ = context
    page = await ctx.new_page()
    alerts: list[str] = []

    async def on_dialog(dialog: Dialog) -> None:
        alerts.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    evil = '"><img src=x onerror=alert(1)><script>alert(2)</script>'
    async with env.gw.client() as http:
        created = (await http.post("/v1/sessions", json={"provider": "truecaller"})).json()
    nonce = created["truecaller"]["request_nonce"]
    deeplink = f"truecallersdk://truesdk/web_verify?requestNonce={nonce}&partnerName={quote(evil)}"
    response = await page.goto(f"{env.gw.url}/sandbox/truecaller/dialog?deeplink={quote(deeplink, safe='')}")
    assert response is not None
    assert "default-src 'none'" in response.headers["content-security-policy"]
    await expect(page.get_by_role("heading", level=1)).to_have_text(evil)  # shown as text, not markup
    await page.goto(f"{env.gw.url}/sandbox/veriphone/verify/{quote(EVIL_UUID)}")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Unknown session")
    assert alerts == []


# --- calm reconnects: one stream per session per tab, a stream reopened after a wake-up -----

COUNT_STREAMS = """
window.__streams = [];
const Native = window.EventSource;
window.EventSource = function (url, init) { const es = new Native(url, init); window.__streams.push(es); return es; };
window.EventSource.prototype = Native.prototype;
"""


async def resumable(env: Env, ctx: BrowserContext) -> tuple[Page, str, str]:
    """The demo page holding a pending Truecaller session to resume; (page, session id, nonce)."""
    async with env.gw.client() as client:
        s = (await client.post("/v1/sessions", json={"provider": "truecaller"})).json()
    page = await ctx.new_page()
    await page.add_init_script(COUNT_STREAMS)
    await page.goto(f"{env.gw.url}/demo")
    await until(page, "window.GatewayVerify !== undefined")
    saved = {"id": s["id"], "stream_url": s["stream_url"], "status_url": s["status_url"], "base": ""}
    await page.evaluate("s => sessionStorage.setItem('gatewayVerify.pending', JSON.stringify(s))", saved)
    return page, s["id"], s["truecaller"]["request_nonce"]


async def until(page: Page, predicate: str, timeout: float = STEP / 1000) -> None:
    """Poll a predicate in the page (the demo's CSP forbids wait_for_function's eval)."""
    async with asyncio.timeout(timeout):
        while not await page.evaluate(f"() => Boolean({predicate})"):
            await asyncio.sleep(0.05)


async def reject(env: Env, nonce: str) -> None:
    async with env.gw.client() as client:
        answer = await client.post("/v1/callbacks/truecaller", json={"requestId": nonce, "status": "user_rejected"})
        assert answer.status_code == 200


async def test_a_second_resume_of_a_session_opens_no_second_stream(
    env: Env, context: tuple[BrowserContext, Traffic]
) -> None:
    ctx, _ = context
    page, _, nonce = await resumable(env, ctx)
    await page.evaluate(
        """() => {
        window.outcomes = [];
        const a = GatewayVerify.resume({ onOutcome: (o) => window.outcomes.push(o.status) });
        const b = GatewayVerify.resume({ onOutcome: (o) => window.outcomes.push('second') });
        window.same = a === b;
    }"""
    )
    await until(page, "window.__streams.length === 1 && window.__streams[0].readyState === 1")
    await reject(env, nonce)
    await until(page, "window.outcomes.length === 1")
    assert await page.evaluate("[window.same, window.outcomes, window.__streams.length]") == [True, ["rejected"], 1]


async def test_a_stream_closed_while_the_page_slept_reopens_once_and_catches_up(
    env: Env, context: tuple[BrowserContext, Traffic]
) -> None:
    ctx, _ = context
    page, _, nonce = await resumable(env, ctx)
    await page.evaluate(
        "() => { window.outcomes = []; GatewayVerify.resume({ onOutcome: (o) => window.outcomes.push(o.status) }); }"
    )
    await until(page, "window.__streams.length === 1 && window.__streams[0].readyState === 1")
    # What the back/forward cache does: the browser closes the stream; the page is restored later.
    await page.evaluate("() => window.__streams[0].close()")
    await reject(env, nonce)  # the outcome happens while the page sleeps
    await page.evaluate("() => window.dispatchEvent(new PageTransitionEvent('pageshow', { persisted: true }))")
    await page.evaluate("() => window.dispatchEvent(new Event('online'))")  # a second wake-up: no second stream
    await until(page, "window.outcomes.length === 1")
    assert await page.evaluate("[window.outcomes, window.__streams.length]") == [["rejected"], 2]
