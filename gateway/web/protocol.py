"""The HTTP/1.1 connection: uvicorn's httptools protocol with bounds on a request's head.

uvicorn bounds neither how long a client may take to send its request line and headers nor
how many bytes they may be: a connection that sends nothing, or one header byte a second,
stays open for ever, and httptools buffers a megabyte header whole. Before the app sees
a request, this protocol:
- closes a connection whose head is not complete within `limits.header_timeout` (from the
  connection, or from the end of the previous answer): silently if nothing came, else `408
  header_timeout`;
- answers `431 headers_too_large` and closes once the head passes `limits.max_header_bytes`;
- answers `414 query_too_long` for a query string over `limits.max_query_bytes`.
Each refusal counts in `gateway_limited_total{limit}` through `on_refused`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gateway.config import LimitsConfig

LINGER = 1.0  # seconds a refused connection's remaining bytes are read and dropped before it closes


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()


def _raw_answer(status: int, body: bytes) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection (for when no request exists to answer)."""
    head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    return STATUS_LINE[status] + head + body


class _Refusal:
    """A tiny ASGI app uvicorn runs instead of the gateway for a request refused at its head."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.body = _error_body(code, message)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body)).encode()),
            (b"connection", b"close"),  # its body, if any, is never read
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def guarded_protocol(cfg: LimitsConfig, on_refused: Callable[[str], None]) -> type[asyncio.Protocol]:
    """uvicorn's `http=` protocol class with the head bounds of `cfg`."""
    max_head = cfg.max_header_bytes
    max_query = cfg.max_query_bytes
    head_timeout = cfg.header_timeout
    too_large = _raw_answer(
        431, _error_body("headers_too_large", f"the request line and headers must be at most {max_head} bytes")
    )
    too_slow = _raw_answer(
        408, _error_body("header_timeout", f"the request headers did not arrive within {head_timeout:g} s")
    )
    large_app = _Refusal(431, "headers_too_large", f"the request line and headers must be at most {max_head} bytes")
    query_app = _Refusal(414, "query_too_long", f"the query string must be at most {max_query} bytes")

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True  # the bytes coming now belong to a request's line and headers
            self._head_bytes = 0
            self._head_timer: asyncio.TimerHandle | None = None
            self._discarding = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._discarding:
                return
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            # Still inside a head after this chunk (httptools buffers it): the bound holds the
            # memory one connection can pin to max_header_bytes plus one read.
            if self._in_head and self._head_bytes > max_head and not self.transport.is_closing():
                self._refuse_raw("max_header_bytes", too_large)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._cancel_head_timer()
            refusal = None
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > max_head:
                refusal, limit = large_app, "max_header_bytes"
            elif len(self.url) > max_query and len(self.url.partition(b"?")[2]) > max_query:
                refusal, limit = query_app, "max_query_bytes"
            if refusal is None:
                super().on_headers_complete()
                return
            on_refused(limit)
            app, self.app = self.app, refusal
            try:
                super().on_headers_complete()
            finally:
                self.app = app

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True  # what comes next is the next request's head
            self._head_bytes = 0

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._in_head and not self.transport.is_closing():
                self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if not self._in_head or self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # an answer is being sent (e.g. a stream): the client is not expected to speak
            on_refused("header_timeout")
            if self._head_bytes:
                self.transport.write(too_slow)
            self.transport.close()  # nothing came at all: no answer, as for an idle keep-alive

        def _refuse_raw(self, limit: str, answer: bytes) -> None:
            on_refused(limit)
            self._cancel_head_timer()
            if self.cycle is not None and not self.cycle.response_complete:
                self.transport.close()  # an answer is in flight: no room for another one
                return
            # A lingering close, as nginx does: closing with the rest of the head still unread
            # would reset the connection, and the client could lose the answer. So answer,
            # half-close, and read and drop what still comes, for a second at most.
            self.transport.write(answer)
            self._discarding = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER, self.transport.close)

    return GuardedHttpToolsProtocol
