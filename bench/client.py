"""A minimal HTTP/1.1 client on raw asyncio protocols: cheap enough to hold thousands of streams.

One `Conn` is one keep-alive TCP connection that runs one exchange at a time: either a plain
request/response (`await conn.request(...)`) or one Server-Sent Events stream
(`conn.start_stream(path)`, then `await conn.wait_event("outcome")`). After a stream ends
(the server's last chunk) the connection is idle again and can be reused.

Event arrival times are `time.monotonic()` taken in `data_received`, i.e. the moment the
event loop handed the bytes to the protocol. CLOCK_MONOTONIC is system-wide on Linux, so
these timestamps are comparable across processes on one machine.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, cast

# States of the response parser.
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _UNTIL_CLOSE = range(7)


class HttpError(Exception):
    """A response with an unexpected status."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


class StreamEnded(Exception):
    """The stream ended (or the connection closed) before the awaited event."""


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Conn(asyncio.Protocol):
    """One HTTP/1.1 connection. `keep_data=False` keeps only event names and times (holders)."""

    def __init__(self, host_header: str, *, keep_data: bool = True) -> None:
        self.host_header = host_header.encode()
        self.keep_data = keep_data
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.close_reason = ""
        self.bytes_in = 0
        self.requests = 0
        self._buf = bytearray()
        self._state = _IDLE
        self._need = 0
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._response: asyncio.Future[Response] | None = None
        # Stream state (reset by start_stream)
        self.streaming = False
        self.stream_status = 0
        self.heartbeats = 0
        self.event_times: dict[str, float] = {}  # first arrival of each event name
        self.event_data: dict[str, bytes] = {}
        self.event_counts: dict[str, int] = {}
        self.stream_ended = False
        self._sse = bytearray()
        self._waiters: dict[str, asyncio.Future[float]] = {}
        self._end_waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.close_reason = self.close_reason or (repr(exc) if exc else "eof")
        if self._state == _UNTIL_CLOSE:
            self._finish()
        error = ConnectionError(f"connection closed: {self.close_reason}")
        if self._response is not None and not self._response.done():
            self._response.set_exception(error)
        self._fail_waiters(StreamEnded(f"connection closed: {self.close_reason}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.bytes_in += len(data)
        buf = self._buf
        buf += data
        while True:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self._parse_head(bytes(buf[:end]))
                del buf[: end + 4]
            elif state == _LENGTH:
                if len(buf) < self._need:
                    return
                self._body += buf[: self._need]
                del buf[: self._need]
                self._finish()
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[: end + 2]
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._need = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if len(buf) < self._need + 2:
                    return
                chunk = bytes(buf[: self._need])
                del buf[: self._need + 2]
                self._state = _CHUNK_SIZE
                if self.streaming:
                    self._feed_sse(chunk, now)
                else:
                    self._body += chunk
            elif state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._finish()
            elif state == _UNTIL_CLOSE:
                if self.streaming:
                    self._feed_sse(bytes(buf), now)
                else:
                    self._body += buf
                buf.clear()
                return
            else:  # _IDLE: unexpected bytes (ignored)
                buf.clear()
                return

    # -- parsing --------------------------------------------------------------------------
    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        self._status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        self._headers = headers
        self._body = bytearray()
        if self.streaming:
            self.stream_status = self._status
            if self._status != 200:
                self.streaming = False  # an error answer: collect it as a body
        if self._status in (204, 304) or 100 <= self._status < 200:
            self._finish()
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            self._state = _CHUNK_SIZE
        elif "content-length" in headers:
            self._need = int(headers["content-length"])
            self._state = _LENGTH
            if self._need == 0:
                self._finish()
        else:
            self._state = _UNTIL_CLOSE

    def _finish(self) -> None:
        self._state = _IDLE
        if self.stream_status:
            # The end of a stream (or its error answer).
            was_stream = self.stream_status == 200
            self.streaming = False
            self.stream_ended = True
            if not was_stream:
                self._fail_waiters(HttpError(self.stream_status, bytes(self._body)))
            else:
                self._fail_waiters(StreamEnded("the stream ended"))
            if self._end_waiter is not None and not self._end_waiter.done():
                self._end_waiter.set_result(None)
            return
        response = Response(self._status, self._headers, bytes(self._body))
        if self._response is not None and not self._response.done():
            self._response.set_result(response)

    def _feed_sse(self, data: bytes, now: float) -> None:
        sse = self._sse
        sse += data
        while True:
            end = sse.find(b"\n\n")
            if end < 0:
                return
            block = bytes(sse[:end])
            del sse[: end + 2]
            self._on_block(block, now)

    def _on_block(self, block: bytes, now: float) -> None:
        name = b""
        data: list[bytes] = []
        only_comments = True
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                continue
            only_comments = False
            field, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if field == b"event":
                name = value
            elif field == b"retry" and value.isdigit():
                self.retry_ms = int(value)
            elif field == b"data":
                data.append(value)
        if only_comments:
            self.heartbeats += 1
            return
        kind = (name or b"message").decode()
        self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
        if kind not in self.event_times:
            self.event_times[kind] = now
            if self.keep_data:
                self.event_data[kind] = b"\n".join(data)
        waiter = self._waiters.pop(kind, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(now)

    def _fail_waiters(self, exc: Exception) -> None:
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_exception(exc)
        if self._end_waiter is not None and not self._end_waiter.done() and self.closed:
            self._end_waiter.set_result(None)

    # -- API --------------------------------------------------------------------------------
    def _check_idle(self) -> None:
        if self.closed or self.transport is None:
            raise ConnectionError(f"connection closed: {self.close_reason}")
        if self._state != _IDLE or self.streaming:
            raise RuntimeError("connection busy")

    def _write_request(self, method: str, path: str, body: bytes | None, headers: tuple[tuple[str, str], ...]) -> None:
        if self.closed or self.transport is None:
            raise ConnectionError(f"connection closed: {self.close_reason}")
        head = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + self.host_header]
        for name, value in headers:
            head.append(f"{name}: {value}".encode())
        if body is not None:
            head.append(b"Content-Type: application/json")
            head.append(b"Content-Length: " + str(len(body)).encode())
        raw = b"\r\n".join(head) + b"\r\n\r\n" + (body or b"")
        self._state = _HEAD
        self.requests += 1
        self.transport.write(raw)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        timeout: float = 30.0,
    ) -> Response:
        self._check_idle()
        self.stream_status = 0
        self._response = asyncio.get_running_loop().create_future()
        self._write_request(method, path, body, headers)
        try:
            async with asyncio.timeout(timeout):
                return await self._response
        finally:
            self._response = None

    async def post_json(self, path: str, payload: object, timeout: float = 30.0) -> Response:
        return await self.request("POST", path, json.dumps(payload, separators=(",", ":")).encode(), timeout=timeout)

    def start_stream(self, path: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Send `GET path` for an event stream; events are then recorded as they arrive."""
        self._check_idle()
        self.stream_status = -1  # marks the exchange as a stream until the head says otherwise
        self.streaming = True
        self.stream_ended = False
        self.heartbeats = 0
        self.retry_ms: int | None = None
        self.event_times = {}
        self.event_data = {}
        self.event_counts = {}
        self._sse = bytearray()
        self._end_waiter = None
        self._write_request("GET", path, None, (("Accept", "text/event-stream"), *headers))

    async def wait_event(self, kind: str, timeout: float = 30.0) -> float:
        """The arrival time (monotonic) of the stream's first `kind` event, waiting if needed."""
        seen = self.event_times.get(kind)
        if seen is not None:
            return seen
        if self.stream_ended or self.closed:
            if self.stream_status > 0 and self.stream_status != 200:
                raise HttpError(self.stream_status, bytes(self._body))
            raise StreamEnded(f"stream ended before {kind!r}")
        waiter = self._waiters.get(kind)
        if waiter is None:
            waiter = self._waiters[kind] = asyncio.get_running_loop().create_future()
        async with asyncio.timeout(timeout):
            return await asyncio.shield(waiter)

    async def wait_stream_end(self, timeout: float = 30.0) -> None:
        if self.stream_ended or self.closed:
            return
        if self._end_waiter is None:
            self._end_waiter = asyncio.get_running_loop().create_future()
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._end_waiter)

    @property
    def idle(self) -> bool:
        return not self.closed and self._state == _IDLE and not self.streaming

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.close_reason = "closed by client"
            self.transport.close()


async def connect(host: str, port: int, *, keep_data: bool = True, timeout: float = 30.0) -> Conn:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, conn = await loop.create_connection(lambda: Conn(f"{host}:{port}", keep_data=keep_data), host, port)
    return conn
