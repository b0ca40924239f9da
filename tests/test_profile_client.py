"""ProfileClient against real loopback servers: framing, limits, keep-alive, TLS name checks."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from gateway.providers.truecaller.client import FetchFailed, FetchOk, fetch_profile
from gateway.providers.truecaller.endpoint_guard import CheckedEndpoint
from gateway.providers.truecaller.profile_client import (
    CertificateError,
    ConnectError,
    ProfileClient,
    ProtocolError,
    RawResponse,
    ResponseTooLarge,
    Timeout,
)

pytestmark = pytest.mark.timeout(10)

TOKEN = "a1asX--secret-token"
HEADERS = [("Authorization", f"Bearer {TOKEN}"), ("Cache-Control", "no-cache")]
PROFILE = {"phoneNumbers": [919999999999], "name": {"first": "Asha"}}
WAIT = 2.0  # upper bound on any single wait in these tests

# A reply writes to the connection and says whether the server keeps serving it.
Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


def ok(body: bytes = b'{"a": 1}', extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def send(raw: bytes, *, keep: bool = True) -> Reply:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        return keep

    return reply


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Close the connection after reading the request, without a byte of response."""
    return False


class Server:
    """A raw HTTP/1.1 server on loopback; `script(connection, request_on_it)` picks each reply."""

    def __init__(
        self, script: Callable[[int, int], Reply], *, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
    ):
        self.script = script
        self.host = host
        self.tls = tls
        self.port = 0
        self.connections = 0
        self.requests: list[bytes] = []
        self.peer_closed = asyncio.Event()  # a handler saw the client close or reset its connection
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        index, count = self.connections, 0
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                count += 1
                if not await self.script(index, count - 1)(reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            self.peer_closed.set()
        finally:
            if reader.at_eof():
                self.peer_closed.set()
            writer.close()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._handle, self.host, 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=WAIT)
        await self._server.wait_closed()

    def endpoint(
        self, *, scheme: str = "http", host: str = "profile.test", target: str = "/v1/default"
    ) -> CheckedEndpoint:
        return CheckedEndpoint(
            url=f"{scheme}://{host}:{self.port}{target}",
            scheme=scheme,
            host=host,
            port=self.port,
            target=target,
            addresses=(self.host,),
        )


def always(reply: Reply) -> Callable[[int, int], Reply]:
    return lambda connection, request: reply


@pytest_asyncio.fixture
async def client() -> AsyncIterator[ProfileClient]:
    http = ProfileClient()
    try:
        yield http
    finally:
        await http.aclose()


async def get(http: ProfileClient, server: Server, *, timeout: float = WAIT, max_bytes: int = 65536) -> RawResponse:
    return await http.get(server.endpoint(), server.host, HEADERS, timeout=timeout, max_bytes=max_bytes)


# --- framing -------------------------------------------------------------------------------


async def test_content_length_body(client: ProfileClient) -> None:
    async with Server(always(send(ok(extra="X-Thing: 1\r\nX-Thing: 2\r\n")))) as server:
        response = await get(client, server)
    assert response.status == 200
    assert response.body == b'{"a": 1}'
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-thing"] == "1, 2"


async def test_chunked_body_and_reuse(client: ProfileClient) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw = head + b'4;ext=1\r\n{"a"\r\n4\r\n: 1}\r\n0\r\nX-Trailer: t\r\n\r\n'
    async with Server(always(send(raw))) as server:
        first = await get(client, server)
        second = await get(client, server)
    assert first.body == second.body == b'{"a": 1}'
    assert server.connections == 1


async def test_read_until_close_body(client: ProfileClient) -> None:
    async with Server(always(send(b"HTTP/1.1 200 OK\r\n\r\nhello, world", keep=False))) as server:
        first = await get(client, server)
        second = await get(client, server)
    assert first.body == second.body == b"hello, world"
    assert server.connections == 2  # a close-delimited body can never leave the connection reusable


async def test_interim_response_is_skipped(client: ProfileClient) -> None:
    async with Server(always(send(b"HTTP/1.1 100 Continue\r\nX-A: 1\r\n\r\n" + ok(b"ok")))) as server:
        response = await get(client, server)
    assert (response.status, response.body) == (200, b"ok")
    assert "x-a" not in response.headers


async def test_no_content_has_empty_body_and_reuses(client: ProfileClient) -> None:
    async with Server(always(send(b"HTTP/1.1 204 No Content\r\n\r\n"))) as server:
        assert (await get(client, server)).body == b""
        assert (await get(client, server)).status == 204
    assert server.connections == 1


async def test_truncated_body_is_a_protocol_error(client: ProfileClient) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"
    async with Server(always(send(raw, keep=False))) as server:
        with pytest.raises(ProtocolError):
            await get(client, server)


async def test_garbage_is_a_protocol_error(client: ProfileClient) -> None:
    async with Server(always(send(b"SSH-2.0-OpenSSH\r\n\r\n", keep=False))) as server:
        with pytest.raises(ProtocolError):
            await get(client, server)


async def test_huge_head_is_a_protocol_error(client: ProfileClient) -> None:
    raw = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * 100_000 + b"\r\n\r\n"
    async with Server(always(send(raw))) as server:
        with pytest.raises(ProtocolError):
            await get(client, server)


# --- limits ------------------------------------------------------------------------------


async def big_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """A chunked body far over any limit, then wait for the client to drop the connection."""
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(100):
        writer.write(b"1000\r\n" + b"x" * 4096 + b"\r\n")
        await writer.drain()
    await reader.read(1)  # b"" or a reset once the client aborted
    return False


async def test_oversize_body_is_aborted(client: ProfileClient) -> None:
    async with Server(always(big_body)) as server:
        with pytest.raises(ResponseTooLarge) as caught:
            await get(client, server, max_bytes=4096)
        assert caught.value.status == 200
        async with asyncio.timeout(WAIT):
            await server.peer_closed.wait()
        # The server finished its handler: it saw the connection closed, not a polite read of 400 KB.
        assert server.connections == 1


async def test_oversize_declared_length_is_refused_before_the_body(client: ProfileClient) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n"
    async with Server(always(send(raw))) as server:
        with pytest.raises((ResponseTooLarge, ProtocolError)):
            await get(client, server, max_bytes=4096)
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"
    async with Server(always(send(raw))) as server:
        with pytest.raises(ResponseTooLarge):
            await get(client, server, max_bytes=4096)


async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Half a response, then nothing until the client goes away."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    await reader.read(1)
    return False


async def test_slow_server_times_out(client: ProfileClient) -> None:
    async with Server(always(slow)) as server:
        started = time.monotonic()
        with pytest.raises(Timeout):
            await get(client, server, timeout=0.2)
        assert time.monotonic() - started < 1.0
        async with asyncio.timeout(WAIT):
            await server.peer_closed.wait()


async def test_redirect_is_returned_not_followed(client: ProfileClient) -> None:
    async with Server(always(send(ok(b"{}")))) as elsewhere:
        location = f"http://127.0.0.1:{elsewhere.port}/"
        raw = f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode()
        async with Server(always(send(raw))) as server:
            response = await get(client, server)
        assert response.status == 302 and response.headers["location"] == location
        assert elsewhere.connections == 0


# --- keep-alive --------------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(client: ProfileClient) -> None:
    async with Server(always(send(ok()))) as server:
        for _ in range(3):
            assert (await get(client, server)).status == 200
    assert server.connections == 1 and len(server.requests) == 3


async def test_connection_close_is_honoured(client: ProfileClient) -> None:
    # The server says close but would keep serving: the client must not reuse the connection.
    async with Server(always(send(ok(extra="Connection: close\r\n")))) as server:
        await get(client, server)
        await get(client, server)
        async with asyncio.timeout(WAIT):
            await server.peer_closed.wait()  # the client closed its side
    assert server.connections == 2


async def test_http_1_0_is_not_reused(client: ProfileClient) -> None:
    raw = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with Server(always(send(raw))) as server:
        await get(client, server)
        await get(client, server)
    assert server.connections == 2


async def test_dead_pooled_connection_is_retried_once(client: ProfileClient) -> None:
    # The pooled connection dies just as the next request is sent (the idle-close race).
    def script(connection: int, request: int) -> Reply:
        return hang_up if (connection, request) == (0, 1) else send(ok())

    async with Server(script) as server:
        await get(client, server)
        assert (await get(client, server)).status == 200
    assert server.connections == 2 and len(server.requests) == 3


async def test_dead_retry_is_not_retried_again(client: ProfileClient) -> None:
    def script(connection: int, request: int) -> Reply:
        return send(ok()) if (connection, request) == (0, 0) else hang_up

    async with Server(script) as server:
        await get(client, server)
        with pytest.raises(ProtocolError):
            await get(client, server)
    assert server.connections == 2


async def test_fresh_connection_closed_without_answer_is_not_retried(client: ProfileClient) -> None:
    async with Server(always(hang_up)) as server:
        with pytest.raises(ProtocolError):
            await get(client, server)
    assert server.connections == 1


async def test_closed_client_refuses() -> None:
    http = ProfileClient()
    async with Server(always(send(ok()))) as server:
        await get(http, server)
        await http.aclose()
        async with asyncio.timeout(WAIT):
            await server.peer_closed.wait()  # the pooled connection was closed
        with pytest.raises(ConnectError):
            await get(http, server)


# --- the request ------------------------------------------------------------------------


async def test_headers_are_sent_exactly(client: ProfileClient) -> None:
    async with Server(always(send(ok()))) as server:
        endpoint = server.endpoint(target="/v1/default?x=1")
        await client.get(endpoint, "127.0.0.1", HEADERS, timeout=WAIT, max_bytes=1024)
    [head] = server.requests
    assert head.decode().split("\r\n") == [
        "GET /v1/default?x=1 HTTP/1.1",
        f"Host: profile.test:{server.port}",
        f"Authorization: Bearer {TOKEN}",
        "Cache-Control: no-cache",
        "Accept-Encoding: identity",
        "",
        "",
    ]


@pytest.mark.parametrize(
    "headers",
    [[("Authorization", "Bearer a\r\nX-Evil: 1")], [("Host", "evil.test")], [("Bad Name", "x")], [("X", "\u00e9")]],
)
async def test_unsafe_headers_are_refused_before_connecting(
    client: ProfileClient, headers: list[tuple[str, str]]
) -> None:
    async with Server(always(send(ok()))) as server:
        with pytest.raises(ValueError) as caught:
            await client.get(server.endpoint(), "127.0.0.1", headers, timeout=WAIT, max_bytes=1024)
        assert "evil" not in str(caught.value) and "Bearer" not in str(caught.value)
    assert server.connections == 0


async def test_address_must_be_an_ip_literal(client: ProfileClient) -> None:
    async with Server(always(send(ok()))) as server:
        with pytest.raises(ValueError):
            await client.get(server.endpoint(), "localhost", HEADERS, timeout=WAIT, max_bytes=1024)
    assert server.connections == 0


async def test_ipv6_address(client: ProfileClient) -> None:
    try:
        server = Server(always(send(ok())), host="::1")
        await server.__aenter__()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        endpoint = server.endpoint()
        response = await client.get(endpoint, "::1", HEADERS, timeout=WAIT, max_bytes=1024)
    finally:
        await server.__aexit__()
    assert response.status == 200


async def test_refused_connect_is_a_connect_error(client: ProfileClient) -> None:
    with socket.socket() as sock:  # a port nobody listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        endpoint = CheckedEndpoint(f"http://p.test:{port}/", "http", "p.test", port, "/", ("127.0.0.1",))
        with pytest.raises(ConnectError):
            await client.get(endpoint, "127.0.0.1", HEADERS, timeout=WAIT, max_bytes=1024)


# --- through fetch_profile ---------------------------------------------------------------


async def test_fetch_profile_with_profile_client(client: ProfileClient) -> None:
    def script(connection: int, request: int) -> Reply:
        return (
            send(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
            if request == 0
            else send(ok(json.dumps(PROFILE).encode()))
        )

    async with Server(script) as server:
        result = await fetch_profile(
            client, server.endpoint(), TOKEN, timeout=WAIT, deadline=time.monotonic() + 5, backoff=0.01
        )
    assert result == FetchOk(PROFILE, attempts=2)
    assert server.connections == 1  # the retry reused the connection
    lines = server.requests[0].decode().split("\r\n")
    assert lines[:6] == [
        "GET /v1/default HTTP/1.1",
        f"Host: profile.test:{server.port}",
        f"Authorization: Bearer {TOKEN}",
        "Cache-Control: no-cache",
        "Accept: application/json",
        "Accept-Encoding: identity",
    ]


async def test_fetch_profile_maps_client_errors(client: ProfileClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    async with Server(always(big_body)) as server:
        result = await fetch_profile(
            client, server.endpoint(), TOKEN, timeout=WAIT, deadline=time.monotonic() + 5, max_bytes=4096
        )
    assert result == FetchFailed("too_large", attempts=1, status_code=200)
    async with Server(always(slow)) as server:
        result = await fetch_profile(
            client, server.endpoint(), TOKEN, timeout=0.1, deadline=time.monotonic() + 5, attempts=2, backoff=0.01
        )
    assert result == FetchFailed("timeout", attempts=2)
    async with Server(always(hang_up)) as server:
        result = await fetch_profile(
            client, server.endpoint(), TOKEN, timeout=WAIT, deadline=time.monotonic() + 5, attempts=2, backoff=0.01
        )
    assert result == FetchFailed("transport", attempts=2)
    raw = b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1/\r\nContent-Length: 0\r\n\r\n"
    async with Server(always(send(raw))) as server:
        result = await fetch_profile(client, server.endpoint(), TOKEN, timeout=WAIT, deadline=time.monotonic() + 5)
    assert result == FetchFailed("redirect", attempts=1, status_code=302)
    assert TOKEN not in caplog.text


# --- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for profile.test: (cert, key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl CLI is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=profile.test",
            "-addext", "subjectAltName=DNS:profile.test",
        ],
        check=True,
        capture_output=True,
        timeout=WAIT * 5,
    )  # fmt: skip
    return cert, key


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


async def test_tls_verifies_the_real_name(certificate: tuple[Path, Path]) -> None:
    http = ProfileClient(ssl.create_default_context(cafile=str(certificate[0])))
    try:
        async with Server(always(send(ok())), tls=server_tls(certificate)) as server:
            endpoint = server.endpoint(scheme="https")
            first = await http.get(endpoint, "127.0.0.1", HEADERS, timeout=WAIT, max_bytes=1024)
            second = await http.get(endpoint, "127.0.0.1", HEADERS, timeout=WAIT, max_bytes=1024)
    finally:
        await http.aclose()
    assert first.body == second.body == b'{"a": 1}'
    assert server.connections == 1
    assert f"Host: profile.test:{server.port}" in server.requests[0].decode().split("\r\n")


@pytest.mark.parametrize("trusted", [True, False])
async def test_tls_wrong_name_or_untrusted_never_sends_the_token(certificate: tuple[Path, Path], trusted: bool) -> None:
    # trusted: the certificate is trusted but names profile.test, not the endpoint's host;
    # untrusted: the default context (system CAs) must refuse a self-signed certificate.
    http = ProfileClient(ssl.create_default_context(cafile=str(certificate[0])) if trusted else None)
    try:
        async with Server(always(send(ok())), tls=server_tls(certificate)) as server:
            endpoint = server.endpoint(scheme="https", host="other.test" if trusted else "profile.test")
            with pytest.raises(CertificateError) as caught:
                await http.get(endpoint, "127.0.0.1", HEADERS, timeout=WAIT, max_bytes=1024)
    finally:
        await http.aclose()
    assert TOKEN not in str(caught.value)
    assert server.requests == []
