"""A lean HTTP/1.1 GET client for the Truecaller profile fetch: one pinned address, bounded, pooled.

httpx/httpcore/anyio cost about half the gateway's GIL time on this path; all it needs is
one GET to an already-checked IP with the real name in `Host` and in TLS (SNI and
certificate verification), a bounded body, no redirects and keep-alive. httptools (llhttp,
already used by uvicorn) does the parsing. Errors never carry request headers: they hold
the Bearer token.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import select
import ssl
import time
from collections import deque
from dataclasses import dataclass

import httptools

from gateway.providers.truecaller.endpoint_guard import CheckedEndpoint

MAX_HEAD_BYTES = 65536  # status line + headers (+ interim 1xx responses) of one response
READ_SIZE = 65536
POOL_PER_KEY = 8
IDLE_EXPIRY = 30.0  # a server that drops idle sockets sooner is caught by the EOF check or the one retry

_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE = re.compile(r"[\x20-\x7e]*")
_VISIBLE = re.compile(r"[\x21-\x7e]+")
# The client owns these: framing and the pool depend on them, and Host must be the checked name.
_RESERVED = frozenset({"host", "accept-encoding", "connection", "content-length", "transfer-encoding"})


class ProfileClientError(Exception):
    """Base of every error `ProfileClient.get` raises; messages never quote request headers."""


class ConnectError(ProfileClientError):
    """The TCP connect or the TLS handshake failed."""


class CertificateError(ConnectError):
    """The server's certificate does not verify for the endpoint's host name."""


class Timeout(ProfileClientError):
    """The whole request (connect, TLS, send, read) exceeded its time limit."""


class ProtocolError(ProfileClientError):
    """The connection broke mid-response or the response is not valid HTTP/1.1."""


class ResponseTooLarge(ProfileClientError):
    """The body (declared or received) is over `max_bytes`; the connection was dropped."""

    def __init__(self, status: int) -> None:
        super().__init__(f"response body over the limit (status {status})")
        self.status = status


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes


_Key = tuple[str, str, int, str]  # scheme, address, port, host: TLS identity is part of the key


class _Stale(Exception):
    """A reused connection died before any response byte: a GET may be retried once."""


class _Abort(Exception):
    """Raised from a parser callback to stop parsing at once (head or body over its limit)."""


class _Conn:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def usable(self) -> bool:
        """False once it is closing, or the peer sent anything while it sat idle (EOF included).

        An unasked byte (a 408 before an idle close, a stray response) would be read as the next
        request's answer; as urllib3 and httpcore do, such a connection is dropped, not reused.
        """
        if self.writer.is_closing() or self.reader.at_eof() or getattr(self.reader, "_buffer", None):
            return False
        # Bytes the event loop has not read from the socket yet.
        sock = self.writer.get_extra_info("socket")
        return sock is None or not _readable(sock.fileno())

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        # Mid-response or on error: no graceful shutdown, the rest of the response is unwanted.
        self.writer.transport.abort()


def _readable(fd: int) -> bool:
    if not hasattr(select, "poll"):  # no poll(): the userland check above has to do
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _Message:
    """httptools callbacks collecting one final (non-1xx) response."""

    __slots__ = (
        "body",
        "complete",
        "extra",
        "head_bytes",
        "head_done",
        "headers",
        "keep_alive",
        "max_bytes",
        "parser",
        "status",
        "too_large",
    )

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_bytes = 0
        self.body = bytearray()
        self.head_done = False
        self.complete = False
        self.extra = False  # bytes after the response: the connection cannot be trusted for reuse
        self.too_large = False
        self.keep_alive = False
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            return
        # Counted here, not per read: one read can hold a whole oversized head.
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD_BYTES:
            raise _Abort
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self.headers.get(key)
        self.headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        self.status = self.parser.get_status_code()
        if self.status < 100:
            raise _Abort  # llhttp takes 000-099, which HTTP has not: not an interim response, whose body it would keep
        if self.status < 200:
            return  # interim response; llhttp completes it and parses the next one
        self.head_done = True
        declared = self.headers.get("content-length")
        # llhttp has already rejected a malformed or conflicting Content-Length.
        if declared is not None and declared.isdigit() and (len(declared) > 15 or int(declared) > self.max_bytes):
            self.too_large = True
            raise _Abort

    def on_body(self, chunk: bytes) -> None:
        if self.complete:
            return
        self.body += chunk
        if len(self.body) > self.max_bytes:
            self.too_large = True
            raise _Abort

    def on_message_complete(self) -> None:
        if self.complete:
            return
        if self.status < 200:
            self.headers = {}  # forget the interim response's headers
            return
        self.complete = True
        # Asked here: llhttp resets its flags (e.g. "Connection: close" seen) once the callback returns.
        connection = self.headers.get("connection", "").lower()
        self.keep_alive = self.parser.should_keep_alive() and "close" not in connection

    def until_close(self) -> bool:
        """True if the body is delimited by the server closing the connection."""
        if "content-length" in self.headers:
            return False
        return not self.headers.get("transfer-encoding", "").lower().rstrip().endswith("chunked")


def _request(endpoint: CheckedEndpoint, headers: list[tuple[str, str]]) -> bytes:
    # The guard already vetted these; re-checking here keeps CR/LF out of the request whatever the caller.
    if not endpoint.target.startswith("/") or not _VISIBLE.fullmatch(endpoint.target):
        raise ValueError("refused request target")
    if not _VISIBLE.fullmatch(endpoint.host_header):
        raise ValueError("refused Host header")
    lines = [f"GET {endpoint.target} HTTP/1.1", f"Host: {endpoint.host_header}"]
    for name, value in headers:
        if not _NAME.fullmatch(name) or name.lower() in _RESERVED or not _VALUE.fullmatch(value):
            raise ValueError(f"refused request header {name[:40]!r}")  # never the value: it may be a secret
        lines.append(f"{name}: {value}")
    # Compressed bodies could inflate far past max_bytes.
    lines.append("Accept-Encoding: identity")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class ProfileClient:
    """GET-only HTTP/1.1 client: connects to exactly the given IP, never resolves, never follows redirects."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context  # created on first https use: loading the CA store takes a while
        self._idle: dict[_Key, deque[_Conn]] = {}
        self._last_sweep = time.monotonic()
        self._closed = False

    async def get(
        self,
        endpoint: CheckedEndpoint,
        address: str,
        headers: list[tuple[str, str]],
        *,
        timeout: float,
        max_bytes: int,
    ) -> RawResponse:
        """GET `endpoint.target` from `address`:`endpoint.port`, `Host` and TLS name `endpoint.host`."""
        if self._closed:
            raise ConnectError("the profile client is closed")
        request = _request(endpoint, headers)
        try:
            # An IP literal only: asyncio would otherwise resolve a name, undoing the endpoint check.
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError("address is not an IP literal") from None
        key = (endpoint.scheme, address, endpoint.port, endpoint.host)
        try:
            async with asyncio.timeout(timeout):
                conn = self._take(key)
                if conn is not None:
                    try:
                        return await self._run(key, conn, request, max_bytes, reused=True)
                    except _Stale:
                        pass  # the server dropped it while idle; one fresh connection
                conn = await self._connect(endpoint, address)
                return await self._run(key, conn, request, max_bytes, reused=False)
        except TimeoutError:
            raise Timeout("profile request timed out") from None

    async def aclose(self) -> None:
        """Close every idle connection; later `get` calls fail."""
        self._closed = True
        conns = [conn for idle in self._idle.values() for conn in idle]
        self._idle.clear()
        for conn in conns:
            conn.close()
        if not conns:
            return
        # Let the transports finish closing before the loop may stop; a stuck TLS shutdown is cut.
        try:
            async with asyncio.timeout(1.0):
                await asyncio.gather(*(conn.writer.wait_closed() for conn in conns), return_exceptions=True)
        except TimeoutError:
            for conn in conns:
                conn.abort()

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _connect(self, endpoint: CheckedEndpoint, address: str) -> _Conn:
        tls = self._tls() if endpoint.scheme == "https" else None
        try:
            reader, writer = await asyncio.open_connection(
                address,
                endpoint.port,
                ssl=tls,
                # The real name, not the IP: SNI and certificate hostname verification use it.
                server_hostname=endpoint.host if tls is not None else None,
                limit=READ_SIZE,
            )
        except ssl.SSLCertVerificationError:
            raise CertificateError("certificate verification failed") from None
        except OSError as exc:  # includes ssl.SSLError
            raise ConnectError(f"connect failed: {type(exc).__name__}") from None
        return _Conn(reader, writer)

    async def _run(self, key: _Key, conn: _Conn, request: bytes, max_bytes: int, *, reused: bool) -> RawResponse:
        try:
            response, reusable = await _exchange(conn, request, max_bytes, reused=reused)
        except BaseException:
            conn.abort()  # also on timeout/cancel: a half-read connection is never pooled
            raise
        if reusable:
            self._put(key, conn)
        else:
            conn.close()
        return response

    def _take(self, key: _Key) -> _Conn | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used first
            if now - conn.idle_since >= IDLE_EXPIRY:
                # The newest is expired, so every older one is too.
                conn.close()
                while idle:
                    idle.pop().close()
                break
            if conn.usable():
                return conn
            conn.close()
        return None

    def _put(self, key: _Key, conn: _Conn) -> None:
        now = time.monotonic()
        idle = self._idle.setdefault(key, deque())
        if self._closed or len(idle) >= POOL_PER_KEY:
            conn.close()
        else:
            conn.idle_since = now
            idle.append(conn)
        if now - self._last_sweep >= IDLE_EXPIRY:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Close expired idle connections of every key, so an unused key does not hold sockets."""
        self._last_sweep = now
        for key in list(self._idle):
            idle = self._idle[key]
            while idle and now - idle[0].idle_since >= IDLE_EXPIRY:
                idle.popleft().close()
            if not idle:
                del self._idle[key]


async def _exchange(conn: _Conn, request: bytes, max_bytes: int, *, reused: bool) -> tuple[RawResponse, bool]:
    """Send the request and read one response: (response, connection reusable)."""
    try:
        conn.writer.write(request)
        await conn.writer.drain()
    except OSError:
        if reused:
            raise _Stale from None
        raise ProtocolError("sending the request failed") from None
    msg = _Message(max_bytes)
    received = 0
    # Body framing (chunk sizes, trailers) is bounded too, not only the body bytes.
    limit = max_bytes + 2 * MAX_HEAD_BYTES
    while not msg.complete:
        try:
            data = await conn.reader.read(READ_SIZE)
        except OSError:
            if reused and received == 0:
                raise _Stale from None
            raise ProtocolError("connection lost mid-response") from None
        if not data:
            if received == 0:
                if reused:
                    raise _Stale
                raise ProtocolError("server closed the connection without a response")
            if msg.head_done and msg.until_close():
                return RawResponse(msg.status, msg.headers, bytes(msg.body)), False
            raise ProtocolError("server closed the connection mid-response")
        received += len(data)
        try:
            msg.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if msg.too_large:
                raise ResponseTooLarge(msg.status) from None
            if not msg.complete:
                raise ProtocolError("malformed response") from None
            msg.extra = True  # garbage after a complete response
        if not msg.complete:
            if not msg.head_done and received > MAX_HEAD_BYTES:
                raise ProtocolError("response head too large")
            if received > limit:
                raise ResponseTooLarge(msg.status)
    reusable = msg.keep_alive and not msg.extra
    return RawResponse(msg.status, msg.headers, bytes(msg.body)), reusable
