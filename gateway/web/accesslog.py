"""Access log: one record per HTTP request, written when its response has ended.

A pure ASGI middleware rather than `BaseHTTPMiddleware`, which runs the app in a task group
and breaks streaming. It wraps every request, long SSE streams included, so the work per
request is one small closure, one header appended and one log record; a stream is logged
once, when it ends, with its whole duration.

Only the route *template* is logged (`/v1/sessions/{session_id}/events`), never the raw
path or query: the path carries the session id, the capability to read an outcome, and
provider callbacks carry nonces and uuids in theirs.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time

from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("gateway.access")

REQUEST_ID_HEADER = b"x-request-id"
UNMATCHED = "<unmatched>"
# An incoming id is echoed only if it is short and plain (no spaces, quotes or newlines to forge log lines).
_SANE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
# Probes and scrapes arrive every few seconds; successful ones are logged at debug only.
_QUIET = frozenset({"/healthz", "/readyz", "/metrics"})


def route_template(scope: Scope) -> str:
    """The matched route's path template (mount prefixes included), or `<unmatched>`."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return UNMATCHED
    # A Mount grows root_path by its prefix; app_root_path keeps the value from before it.
    root: str = scope.get("root_path", "")
    base: str = scope.get("app_root_path", root)
    prefix = root[len(base) :]
    if isinstance(route, Mount):
        return f"{prefix}/{{path}}"
    return prefix + path


def _incoming_id(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            return value if _SANE_ID.fullmatch(value) else None
    return None


_PREFIX = os.urandom(4).hex()
_SERIAL = itertools.count()


def new_request_id() -> bytes:
    """16 hex characters, unique within the process and across restarts; no syscall per request."""
    return f"{_PREFIX}{next(_SERIAL) & 0xFFFFFFFF:08x}".encode()


class AccessLog:
    """Logs request id, method, route template, status and duration; echoes X-Request-ID."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = _incoming_id(scope) or new_request_id()
        header = (REQUEST_ID_HEADER, request_id)
        status = 0  # 0: no response was started (the client left, or the server cancelled it)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # A new list: responses may share a module-level header list.
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if status == 0:
                status = 500  # what the outer error middleware is about to answer
            raise
        finally:
            route = route_template(scope)
            level = logging.DEBUG if route in _QUIET and 0 < status < 400 else logging.INFO
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "%s %s %d",
                    scope["method"],
                    route,
                    status,
                    extra={
                        "request_id": request_id.decode(),
                        "method": scope["method"],
                        "route": route,
                        "status": status,
                        "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                    },
                )
