"""verify.js's calm reconnects in a real headless Chromium: one stream per session per tab,
and a page that wakes up (back from the back/forward cache, the network back) after the
gateway restarted catches up with a single stream or poll.

A shop page on its own origin loads verify.js from a gateway that each test can restart on
the same port and database (a real uvicorn, as SIGTERM would stop it). The back/forward
cache is the browser's own (Playwright turns it off by default; these tests turn it back on)
and the "away" page is on another site, so leaving really stores the page and going back
restores it with `pageshow.persisted`. Every wait is for an event, a request or a page
state, bounded by STEP.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, BrowserContext, Page, async_playwright
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from gateway.config import Settings
from tests.test_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    COUNT_STREAMS,
    RETRY_MS,
    STEP,
    VIEWPORT,
    Traffic,
    require_chromium,
)
from tests.utils import Running, _serve, listening_socket, make_settings, serve_app

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]

# The shop: verify.js from the gateway named by ?gw=, and a record of what the page saw.
SHOP_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Shop</title></head>
<body><p>Shop</p>
<script>
window.seen = {pageshow: [], outcomes: [], errors: []};
window.addEventListener('pageshow', (e) => window.seen.pageshow.push(e.persisted));
window.callbacks = (tag) => ({
  onOutcome: (o) => window.seen.outcomes.push((tag || '') + o.status),
  onError: (e) => window.seen.errors.push(e.code),
});
</script>
<script src="{gw}/static/verify.js"></script>
</body></html>"""

# What engines that end a stream for good when a page enters the back/forward cache do
# (Chromium itself reconnects it on restore): the stream is closed, no error event.
CLOSE_STREAMS_ON_PAGEHIDE = """
window.addEventListener('pagehide', (e) => { if (e.persisted) for (const es of window.__streams) es.close(); });
"""


@dataclass
class World:
    browser: Browser
    shop: str  # the shop's origin (allowed by the gateway's CORS)
    away: str  # a page on another site: leaving for it puts the shop in the back/forward cache


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world() -> AsyncIterator[World]:
    require_chromium()

    async def shop(request: Request) -> HTMLResponse:
        return HTMLResponse(SHOP_PAGE.replace("{gw}", html.escape(request.query_params["gw"])))

    async def away(request: Request) -> HTMLResponse:
        return HTMLResponse("<!doctype html><title>Away</title><p>Elsewhere</p>")

    async with (
        serve_app(Starlette(routes=[Route("/", shop)])) as shop_url,
        serve_app(Starlette(routes=[Route("/", away)])) as away_url,
        async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, ignore_default_args=["--disable-back-forward-cache"]
        )
        try:
            # localhost vs 127.0.0.1: another site, so the browser swaps browsing instance
            # and may keep the shop in its back/forward cache.
            yield World(browser, shop_url, away_url.replace("127.0.0.1", "localhost"))
        finally:
            await browser.close()


@pytest_asyncio.fixture(loop_scope="module")
async def context(world: World) -> AsyncIterator[tuple[BrowserContext, Traffic]]:
    ctx = await world.browser.new_context(viewport=VIEWPORT)
    ctx.set_default_timeout(STEP)
    traffic = Traffic()
    ctx.on("request", lambda r: traffic.requests.append((r.method, r.url)))
    ctx.on("requestfailed", lambda r: traffic.failed.append((r.method, r.url)))
    try:
        yield ctx, traffic
    finally:
        await ctx.close()


class Gateways:
    """A gateway that can be stopped and started again on the same port and database."""

    def __init__(self, tmp_path: Path, shop: str) -> None:
        self.settings: Settings = make_settings(
            tmp_path / "gateway.db",
            {
                "stream": {"retry": RETRY_MS},
                "server": {"cors_allow_origins": [shop], "shutdown_spread": 0.2, "shutdown_timeout": 2.0},
                "providers": {"veriphone": {"enabled": False}},
            },
        )
        self.port = 0

    @contextlib.asynccontextmanager
    async def run(self) -> AsyncIterator[Running]:
        if self.port:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(128)
        else:
            sock = listening_socket()
            self.port = sock.getsockname()[1]
        async with _serve(self.settings, sock) as running:
            yield running


@pytest.fixture
def gateways(tmp_path: Path, world: World) -> Gateways:
    return Gateways(tmp_path, world.shop)


async def shop_with_pending_session(
    ctx: BrowserContext, world: World, gw: Running, init: str = ""
) -> tuple[Page, dict[str, Any]]:
    """The shop holding a pending Truecaller session for resume() (as after a same-tab redirect)."""
    async with gw.client() as client:
        s = (await client.post("/v1/sessions", json={"provider": "truecaller"})).json()
    page = await ctx.new_page()
    await page.add_init_script(COUNT_STREAMS + init)
    await page.goto(f"{world.shop}/?gw={gw.url}")
    await page.wait_for_function("window.GatewayVerify !== undefined")
    saved = {"id": s["id"], "stream_url": s["stream_url"], "status_url": s["status_url"], "base": gw.url}
    await page.evaluate("s => sessionStorage.setItem('gatewayVerify.pending', JSON.stringify(s))", saved)
    return page, s


async def reject(gw: Running, session: dict[str, Any]) -> None:
    """The user declines in the Truecaller app: the session's outcome, decided on the server."""
    nonce = session["truecaller"]["request_nonce"]
    async with gw.client() as client:
        answer = await client.post("/v1/callbacks/truecaller", json={"requestId": nonce, "status": "user_rejected"})
    assert answer.status_code == 200, answer.text


def stream_requests(traffic: Traffic, session: dict[str, Any]) -> int:
    return sum(1 for url in traffic.streams() if url.split("?")[0].endswith(session["stream_url"]))


async def until_traffic(condition: Any) -> None:
    """Wait (bounded) for the browser's recorded traffic to meet `condition`."""
    async with asyncio.timeout(STEP / 1000):
        while not condition():
            await asyncio.sleep(0.02)


async def test_start_and_resume_twice_open_one_stream_per_session(
    world: World, gateways: Gateways, context: tuple[BrowserContext, Traffic]
) -> None:
    ctx, traffic = context
    async with gateways.run() as gw:
        page, session = await shop_with_pending_session(ctx, world, gw)
        await page.evaluate(
            """() => {
            const a = GatewayVerify.resume(window.callbacks('a:'));
            const b = GatewayVerify.resume(window.callbacks('b:'));
            window.same = [a === b];
        }"""
        )
        await page.wait_for_function("window.__streams.length === 1 && window.__streams[0].readyState === 1")
        # Once the stream is up, resuming again still opens nothing.
        await page.evaluate("() => window.same.push(GatewayVerify.resume(window.callbacks('c:')) !== null)")
        await reject(gw, session)
        await page.wait_for_function("window.seen.outcomes.length > 0")
        assert await page.evaluate("[window.same, window.seen.outcomes, window.__streams.length]") == [
            [True, True],
            ["a:rejected"],
            1,
        ]
        assert stream_requests(traffic, session) == 1
        assert await page.evaluate("GatewayVerify.resume(window.callbacks('d:'))") is None  # done: nothing to resume


async def test_back_from_the_bfcache_after_a_restart_one_stream_catches_up(
    world: World, gateways: Gateways, context: tuple[BrowserContext, Traffic]
) -> None:
    ctx, traffic = context
    async with gateways.run() as gw:
        page, session = await shop_with_pending_session(ctx, world, gw)
        await page.evaluate("() => GatewayVerify.resume(window.callbacks())")
        await page.wait_for_function("window.__streams.length === 1 && window.__streams[0].readyState === 1")
        await page.goto(world.away)  # the shop goes into the back/forward cache
    # The gateway restarted while the page was away, and the outcome came meanwhile.
    async with gateways.run() as gw:
        await reject(gw, session)
        before = stream_requests(traffic, session)
        await page.go_back(wait_until="commit")  # a restored page fires no load event
        await page.wait_for_function("window.seen.outcomes.length > 0")
        assert await page.evaluate("window.seen") == {"pageshow": [False, True], "outcomes": ["rejected"], "errors": []}
        # Chromium reconnects the stream itself on restore; verify.js opens no second one.
        assert stream_requests(traffic, session) - before == 1
        assert await page.evaluate("window.__streams.map((es) => es.readyState)") == [2]


async def test_a_stream_closed_for_good_in_the_bfcache_reopens_once_and_catches_up(
    world: World, gateways: Gateways, context: tuple[BrowserContext, Traffic]
) -> None:
    ctx, traffic = context
    async with gateways.run() as gw:
        page, session = await shop_with_pending_session(ctx, world, gw, CLOSE_STREAMS_ON_PAGEHIDE)
        await page.evaluate("() => GatewayVerify.resume(window.callbacks())")
        await page.wait_for_function("window.__streams.length === 1 && window.__streams[0].readyState === 1")
        await page.goto(world.away)
    async with gateways.run() as gw:
        await reject(gw, session)
        before = stream_requests(traffic, session)
        await page.go_back(wait_until="commit")
        await page.wait_for_function("window.seen.outcomes.length > 0")
        assert await page.evaluate("window.seen") == {"pageshow": [False, True], "outcomes": ["rejected"], "errors": []}
        # The page's `pageshow` (persisted) made verify.js open one new stream, which caught up.
        assert stream_requests(traffic, session) - before == 1
        assert await page.evaluate("window.__streams.map((es) => es.readyState)") == [2, 2]


async def test_the_network_back_ends_the_backoff_and_the_outcome_arrives(
    world: World, gateways: Gateways, context: tuple[BrowserContext, Traffic]
) -> None:
    ctx, traffic = context
    async with gateways.run() as gw:
        page, session = await shop_with_pending_session(ctx, world, gw)
        # pollInterval 20 s: verify.js's first back-off is 10-20 s, longer than any wait here,
        # so only the `online` wake-up can bring the outcome in time.
        await page.evaluate("() => GatewayVerify.resume({...window.callbacks(), pollInterval: 20000})")
        await page.wait_for_function("window.__streams.length === 1 && window.__streams[0].readyState === 1")
        await ctx.set_offline(True)
    # The restart ends the stream; offline, the browser's reconnects fail until verify.js gives
    # the stream up for long polling, which waits out its back-off.
    async with gateways.run() as gw:
        await page.wait_for_function("window.__streams[0].readyState === 2")
        await reject(gw, session)
        polls_before = len([u for m, u in traffic.requests if u.split("?")[0].endswith(session["status_url"])])
        await ctx.set_offline(False)  # fires `online`
        await page.wait_for_function("window.seen.outcomes.length > 0")
        assert await page.evaluate("window.seen") == {"pageshow": [False], "outcomes": ["rejected"], "errors": []}
        polls = [u for m, u in traffic.requests if u.split("?")[0].endswith(session["status_url"])]
        assert len(polls) - polls_before == 1  # one poll, right after the network came back
        assert await page.evaluate("window.__streams.length") == 1
