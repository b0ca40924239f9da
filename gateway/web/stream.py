"""`GET /v1/sessions/{id}/events`: one session's status, progress and outcome as SSE.

Thousands of these wait at once, so an idle stream is kept small:
- `doors.GatewayApp` sends the route here before Starlette's error, CORS and router layers,
  whose suspended frames would otherwise be held by every waiting stream;
- the request's own coroutine only awaits `receive()` (which returns on disconnect); events
  and heartbeats are written by short-lived tasks started from broker and timer callbacks,
  so an idle stream owns no extra task, just a subscriber and one timer handle;
- nothing polls the database: after the first read, every event comes from the broker.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from gateway import sse
from gateway.admission import BUSY_RETRY_AFTER
from gateway.broker import Event, Subscriber
from gateway.errors import StorageError
from gateway.limits import Slots
from gateway.web.client import scope_client_ip
from gateway.web.context import Gateway

PATH_TEMPLATE = "/v1/sessions/{session_id}/events"
_PATH = re.compile(r"^/v1/sessions/([A-Za-z0-9_-]{16,64})/events$")
_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]
_EVENT_ID = re.compile(r"[0-9]{1,18}")
_NOT_FOUND = b'{"error":{"code":"session_not_found","message":"no session with this id"}}'
_UNAVAILABLE = b'{"error":{"code":"database_unavailable","message":"the database could not be read; retry"}}'
_TOO_MANY = b'{"error":{"code":"rate_limited","message":"too many open streams from this address"}}'
_BUSY = b'{"error":{"code":"server_busy","message":"the gateway has too many open streams; retry shortly"}}'
_RETRY_AFTER = (b"retry-after", str(BUSY_RETRY_AFTER).encode())
log = logging.getLogger("gateway.stream")


class EventStreamEndpoint:
    """The ASGI endpoint of the route; also reachable through the router (e.g. without the fast path)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.allowed_origins = frozenset(o.encode() for o in gateway.settings.server.cors_allow_origins)
        self.limits = limits = gateway.admission.limits
        self.slots: Slots | None = limits.streams if limits.enabled else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = _PATH.fullmatch(scope["path"])
        session_id = match.group(1) if match else None
        cors = self._cors_headers(scope)
        if session_id is None:
            await _json(send, 404, _NOT_FOUND, cors)
            return
        slots = self.slots
        if slots is None:
            await serve(self.gateway, session_id, scope, receive, send, cors)
            return
        trusted = self.gateway.trusted_proxies
        if trusted:
            key = self.limits.ip_key(scope_client_ip(scope, trusted))
        else:  # the peer as uvicorn reports it: `ip_key` parses (and caches) it
            client = scope.get("client")
            key = self.limits.ip_key(client[0] if client else None)
        refused = slots.acquire(key)
        if refused is not None:
            # Before anything is read or subscribed: a refused stream costs one small answer.
            per_key = refused == Slots.PER_KEY
            self.gateway.metrics.limited("streams_per_ip" if per_key else "streams_total")
            await _json(send, 429 if per_key else 503, _TOO_MANY if per_key else _BUSY, [_RETRY_AFTER, *cors])
            return
        try:
            await serve(self.gateway, session_id, scope, receive, send, cors)
        finally:
            slots.release(key)  # every way out: the end, a disconnect, an error, a shutdown

    def _cors_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """What Starlette's CORSMiddleware adds to a simple request: only for configured origins."""
        for name, value in scope["headers"]:
            if name == b"origin":
                if value in self.allowed_origins:
                    return [(b"access-control-allow-origin", value), (b"vary", b"Origin")]
                break
        return [(b"vary", b"Origin")] if self.allowed_origins else []


def is_stream_request(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "GET" and _PATH.fullmatch(scope["path"]) is not None


async def serve(
    gw: Gateway, session_id: str, scope: Scope, receive: Receive, send: Send, extra_headers: list[tuple[bytes, bytes]]
) -> None:
    last_event_id = _header(scope, b"last-event-id").strip()
    after = int(last_event_id) if _EVENT_ID.fullmatch(last_event_id) else 0
    # Subscribe first, then read: whatever is published after this point reaches the
    # buffer, and anything also found in the database is dropped by event id.
    sub = gw.broker.subscribe(session_id)
    try:
        session, replay = await gw.sessions.get_with_events(session_id, after)
        if session is None:
            sub.close("done")
            await _json(send, 404, _NOT_FOUND, extra_headers)
            return
        if session.terminal and not any(e.kind == "outcome" for e in replay):
            outcome = await gw.sessions.outcome_event(session_id)
            if outcome is None or str(outcome.id) == last_event_id:
                # The client already holds the outcome: 204 makes EventSource stop reconnecting.
                sub.close("done")
                await send(
                    {
                        "type": "http.response.start",
                        "status": 204,
                        "headers": [(b"cache-control", b"no-store"), *extra_headers],
                    }
                )
                await send({"type": "http.response.body", "body": b""})
                return
            replay = [outcome]
    except StorageError:
        # This route skips Starlette's error middleware, so it answers its own failures.
        sub.close("done")
        log.exception("stream could not read its session")
        await _json(send, 503, _UNAVAILABLE, extra_headers)
        return
    settings = gw.settings.stream
    # `retry:` rides on the status event: a block without data dispatches nothing in browsers.
    retry = settings.retry + (random.randint(0, settings.retry_jitter) if settings.retry_jitter else 0)
    parts = [sse.event("status", session.snapshot(), retry=retry)]
    # Dedupe live events against what was really replayed, not against the header: a forged
    # Last-Event-ID above this session's future ids must not hide its outcome.
    last_sent = 0
    finished = False
    for event in replay:
        parts.append(event.frame)
        last_sent = event.id
        if event.kind == "outcome":
            finished = True
            break
    await send({"type": "http.response.start", "status": 200, "headers": [*_HEADERS, *extra_headers]})
    if finished:
        sub.close("done")
        await send({"type": "http.response.body", "body": b"".join(parts), "more_body": False})
        return
    stream = _LiveStream(send, sub, last_sent, settings.heartbeat, settings.max_duration)
    await send({"type": "http.response.body", "body": b"".join(parts), "more_body": True})
    del parts, replay, session
    gw.metrics.open_streams.inc()
    try:
        await stream.run(receive)
    finally:
        gw.metrics.open_streams.dec()


class _LiveStream:
    """A stream after its first bytes: writes happen in callbacks, the request task waits for the end."""

    __slots__ = ("_deadline", "_done", "_heartbeat", "_pending", "_send", "_sub", "_timer", "_writer", "last_sent")

    def __init__(self, send: Send, sub: Subscriber, last_sent: int, heartbeat: float, max_duration: float) -> None:
        self._send = send
        self._sub = sub
        self.last_sent = last_sent
        self._heartbeat = heartbeat
        self._deadline = time.monotonic() + max_duration
        self._pending: list[Message] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done = False

    async def run(self, receive: Receive) -> None:
        sub = self._sub
        sub.on_wake = self._on_wake
        self._arm()
        try:
            if sub.close_reason is not None or sub.pending:
                self._on_wake()
            # Returns on client disconnect, and once our final body is sent (uvicorn then
            # reports the request as over), so this is the only thing an idle stream awaits.
            while (await receive())["type"] != "http.disconnect":
                pass
        finally:
            self._done = True
            sub.on_wake = None
            sub.close("done")
            if self._timer is not None:
                self._timer.cancel()
            if self._writer is not None and not self._writer.done():
                self._writer.cancel()

    def _arm(self) -> None:
        delay = min(self._heartbeat, self._deadline - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(max(delay, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if time.monotonic() >= self._deadline - 0.001:
            self._write(b"", final=True)  # max_duration: end cleanly, the browser reconnects
            return
        self._write(sse.HEARTBEAT)
        self._arm()

    def _on_wake(self) -> None:
        sub = self._sub
        if sub.close_reason is not None:
            self._write(b"", final=True)  # shutdown or a slow reader: end, the client reconnects
            return
        for event in sub.drain():
            if self._take(event):
                self._write(event.frame, final=event.kind == "outcome")
                if event.kind == "outcome":
                    return

    def _take(self, event: Event) -> bool:
        if event.id <= self.last_sent:
            return False  # already sent from the database replay
        self.last_sent = event.id
        return True

    def _write(self, chunk: bytes, *, final: bool = False) -> None:
        if self._done:
            return
        if final:
            self._done = True
            self._sub.on_wake = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        message: Message = {"type": "http.response.body", "body": chunk, "more_body": not final}
        if self._pending is None:
            self._pending = []
        self._pending.append(message)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        # One writer at a time keeps frames in order even when the socket applies backpressure.
        while self._pending:
            batch, self._pending = self._pending, None
            for message in batch:
                await self._send(message)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return ""


async def _json(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    headers: list[Any] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
