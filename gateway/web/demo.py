"""The demo page at /demo: gateway/static/demo.html, on only with `server.demo` or --sandbox.

In sandbox mode the page gets `window.GATEWAY_DEMO={sandbox:true}`, which makes it open the
sandbox's fake Truecaller dialog instead of the truecallersdk:// deep link. The page is read
once, when the app is built, and served with a CSP that allows exactly its own inline
script and style (by hash), verify.js, and requests to this origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.config import Settings

DEMO_PATH = "/demo"
SANDBOX_HOOK = "<script>window.GATEWAY_DEMO={sandbox:true}</script>"
# With auth.require in sandbox mode: the page gets each start ticket from /sandbox/ticket.
TICKETS_HOOK = "<script>window.GATEWAY_DEMO_TICKETS=true</script>"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)
_INLINE_STYLE = re.compile(r"<style>(.*?)</style>", re.DOTALL)


def demo_html(*, sandbox: bool, tickets: bool = False) -> str:
    """The demo page, with the sandbox hook injected before its first script when asked."""
    page = (resources.files("gateway") / "static" / "demo.html").read_text(encoding="utf-8")
    if sandbox:
        # At the end of <head>: before verify.js and the page's script, so it is set whenever they read it.
        at = page.index("</head>")
        page = page[:at] + (TICKETS_HOOK + "\n" if tickets else "") + SANDBOX_HOOK + "\n" + page[at:]
    return page


def content_security_policy(page: str) -> str:
    """A CSP allowing this page's own inline scripts and styles by hash, and nothing foreign."""

    def hashes(pattern: re.Pattern[str]) -> str:
        found = (hashlib.sha256(m.group(1).encode()).digest() for m in pattern.finditer(page))
        return " ".join(dict.fromkeys(f"'sha256-{base64.b64encode(h).decode()}'" for h in found))

    return (
        f"default-src 'none'; script-src 'self' {hashes(_INLINE_SCRIPT)}; style-src {hashes(_INLINE_STYLE)}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


async def _not_found(request: Request) -> Response:
    raise HTTPException(404, "Not Found")


def routes(settings: Settings) -> list[BaseRoute]:
    """`/demo` when enabled; the raw file under /static is never served (the demo lives at /demo only)."""
    hidden: list[BaseRoute] = [Route("/static/demo.html", _not_found, methods=["GET"])]
    if not (settings.server.demo or settings.sandbox):
        return hidden
    page = demo_html(sandbox=settings.sandbox, tickets=settings.auth.require)
    headers = {
        "content-security-policy": content_security_policy(page),
        "cache-control": "no-store",
        "referrer-policy": "same-origin",
        "x-content-type-options": "nosniff",
    }

    async def demo(request: Request) -> Response:
        return HTMLResponse(page, headers=headers)

    return [Route(DEMO_PATH, demo, methods=["GET"]), *hidden]
