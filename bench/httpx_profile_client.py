"""`HttpxProfileClient`: the profile fetch on httpx, as a drop-in for the gateway's lean `ProfileClient`.

The benchmark's fair competitor (`python -m bench --profile-client-ab`): the same constructor,
`get` and `aclose`, the same error classes and `RawResponse`, the same pinning and limits,
built on one shared `httpx.AsyncClient` (follow_redirects=False, trust_env=False, keep-alive).

Pinning: the URL keeps the real host, so httpx/httpcore put `endpoint.host` in `Host`, in the
TLS SNI and in the certificate hostname check themselves. The transport keeps one httpcore
connection pool per (scheme, checked IP), each with a network backend whose `connect_tcp`
ignores the host it is given and connects to that IP: nothing resolves a name, and a
connection is only reused for the same IP and the same name (the lean client's pool key).
The body is streamed raw (no decompression; `Accept-Encoding: identity` is sent) and
reading stops as soon as it is over `max_bytes`; cookies are never stored.

Differences on the wire and at the edges, none on the measured path: httpx also sends
`Connection: keep-alive` and its `User-Agent` (the benchmark's fake host counts it), in its
own header order; httpcore accepts a response head up to 100 KiB (the lean client 64 KiB), so
a 64-100 KiB head is read (or timed out) instead of refused at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from contextvars import ContextVar
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpcore
import httpx

from gateway.providers.truecaller.endpoint_guard import CheckedEndpoint
from gateway.providers.truecaller.profile_client import (  # the lean client's request rules too
    _NAME,
    _RESERVED,
    _VALUE,
    _VISIBLE,
    CertificateError,
    ConnectError,
    ProfileClientError,
    ProtocolError,
    RawResponse,
    ResponseTooLarge,
    Timeout,
)

# The lean client's pool limits, so neither side wins on pooling policy.
POOL_PER_KEY = 8  # idle keep-alive connections kept per (scheme, IP, host, port)
IDLE_EXPIRY = 30.0
MAX_POOLS = 64  # (scheme, IP) pools kept; the least recently used one is closed beyond that

_ADDRESS = "bench.pinned_address"  # request extension: the checked IP this request must go to
_DIGITS = re.compile(r"[0-9]+")
# Connections opened by the current task: tells a reused connection from a fresh one (httpcore
# connects in the task that sends the request).
_CONNECTS: ContextVar[int] = ContextVar("bench_httpx_connects", default=0)

# httpcore's exceptions as httpx's public ones (what httpx's own transport does), most specific first.
_HTTPCORE_TO_HTTPX: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


def _as_httpx(exc: Exception) -> Exception:
    for core, mapped in _HTTPCORE_TO_HTTPX:
        if isinstance(exc, core):
            return mapped(str(exc))
    return exc


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects to one fixed IP whatever host httpcore asks for (it asks for the URL's, the real name)."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        _CONNECTS.set(_CONNECTS.get() + 1)
        return await self._inner.connect_tcp(
            self._address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not used")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: httpcore.Response) -> None:
        self._response = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_stream():
                yield chunk
        except Exception as exc:
            raise _as_httpx(exc) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class PinnedTransport(httpx.AsyncBaseTransport):
    """An httpx transport: one httpcore pool per (scheme, pinned IP); the IP comes in a request extension."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context  # created on first https use, like the lean client
        self._pools: OrderedDict[tuple[str, str], httpcore.AsyncConnectionPool] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    def _pool(self, scheme: str, address: str) -> httpcore.AsyncConnectionPool:
        key = (scheme, address)
        pool = self._pools.get(key)
        if pool is not None:
            self._pools.move_to_end(key)
            return pool
        if scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
        pool = httpcore.AsyncConnectionPool(
            ssl_context=self._ssl if scheme == "https" else None,
            max_connections=None,  # the lean client does not cap concurrent connections either
            max_keepalive_connections=POOL_PER_KEY,
            keepalive_expiry=IDLE_EXPIRY,
            http1=True,
            http2=False,
            network_backend=_PinnedBackend(address),
        )
        self._pools[key] = pool
        if len(self._pools) > MAX_POOLS:
            _, evicted = self._pools.popitem(last=False)
            task = asyncio.get_running_loop().create_task(evicted.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        extensions = dict(request.extensions)
        address = extensions.pop(_ADDRESS)
        pool = self._pool(request.url.scheme, address)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,  # type: ignore[arg-type]  # an empty AsyncByteStream for a GET
            extensions=extensions,
        )
        try:
            response = await pool.handle_async_request(core_request)
        except Exception as exc:
            raise _as_httpx(exc) from exc
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        pools = list(self._pools.values())
        self._pools.clear()
        for pool in pools:
            await pool.aclose()


def _certificate_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _check_headers(endpoint: CheckedEndpoint, headers: list[tuple[str, str]]) -> None:
    # The lean client's refusals by its own rules, so both clients accept and refuse the same requests.
    if not endpoint.target.startswith("/") or not _VISIBLE.fullmatch(endpoint.target):
        raise ValueError("refused request target")
    if not _VISIBLE.fullmatch(endpoint.host_header):
        raise ValueError("refused Host header")
    for name, value in headers:
        if not _NAME.fullmatch(name) or name.lower() in _RESERVED or not _VALUE.fullmatch(value):
            raise ValueError(f"refused request header {name[:40]!r}")  # never the value: it may be a secret


class HttpxProfileClient:
    """`ProfileClient`'s interface and errors on `httpx.AsyncClient`; it uses none of the lean client's code."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._transport = PinnedTransport(ssl_context)
        self._client = httpx.AsyncClient(
            transport=self._transport,
            follow_redirects=False,
            trust_env=False,
            headers={"Accept-Encoding": "identity"},  # a compressed body could inflate past max_bytes
            # One client serves every user: a cookie of one profile host must never go out again.
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        )
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
        _check_headers(endpoint, headers)
        try:
            ipaddress.ip_address(address)  # an IP literal only: nothing may resolve a name
        except ValueError:
            raise ValueError("address is not an IP literal") from None
        url = httpx.URL(
            scheme=endpoint.scheme, host=endpoint.host, port=endpoint.port, raw_path=endpoint.target.encode("ascii")
        )
        request = self._client.build_request(
            "GET",
            url,
            headers=[("Host", endpoint.host_header), *headers],
            timeout=httpx.Timeout(timeout),
            extensions={_ADDRESS: address},
        )
        try:
            # httpx's timeouts are per socket operation; this bounds the whole request, as the lean client does.
            async with asyncio.timeout(timeout):
                connects = _CONNECTS.get()
                try:
                    response = await self._client.send(request, stream=True, follow_redirects=False, auth=None)
                except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                    if _CONNECTS.get() != connects:
                        raise
                    # A pooled connection died before any response byte (the idle-close race):
                    # once more, as the lean client does; httpcore itself never retries this.
                    response = await self._client.send(request, stream=True, follow_redirects=False, auth=None)
                try:
                    return await _read(response, max_bytes)
                finally:
                    await response.aclose()  # a body not read to the end closes the connection
        except (TimeoutError, httpx.TimeoutException):
            raise Timeout("profile request timed out") from None
        except httpx.ConnectError as exc:
            if _certificate_failure(exc):
                raise CertificateError("certificate verification failed") from None
            raise ConnectError(f"connect failed: {type(exc).__name__}") from None
        except httpx.TransportError as exc:
            raise ProtocolError(f"request failed: {type(exc).__name__}") from None

    async def aclose(self) -> None:
        """Close every pooled connection; later `get` calls fail."""
        self._closed = True
        await self._client.aclose()


async def _read(response: httpx.Response, max_bytes: int) -> RawResponse:
    status = response.status_code
    declared = response.headers.get("content-length", "")
    if _DIGITS.fullmatch(declared) and (len(declared) > 15 or int(declared) > max_bytes):
        raise ResponseTooLarge(status)
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) > max_bytes:
            raise ResponseTooLarge(status)
    return RawResponse(status, dict(response.headers.items()), bytes(body))


__all__ = [
    "CertificateError",
    "ConnectError",
    "HttpxProfileClient",
    "PinnedTransport",
    "ProfileClientError",
    "ProtocolError",
    "ResponseTooLarge",
    "Timeout",
]
