"""ProfileClient tested as a library: TLS with a throw-away CA, reuse after errors, broken servers, fuzzing.

The lean client replaces httpx on the Truecaller profile fetch (docs/BENCHMARKS.md), so it
carries the Bearer token through exactly the failure modes a mature library is tested for.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.providers.truecaller.profile_client import (
    MAX_HEAD_BYTES,
    CertificateError,
    ProfileClient,
    ProfileClientError,
    ProtocolError,
    RawResponse,
    ResponseTooLarge,
    Timeout,
)
from tests.test_profile_client import HEADERS, TOKEN, WAIT, Reply, Server, always, get, ok, send

pytestmark = pytest.mark.timeout(20)


# --- TLS against a real TLS server on loopback with a throw-away CA -----------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_tls(cert: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx


def trusting(ca: trustme.CA) -> ProfileClient:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ProfileClient(ssl_context=ctx)


async def tls_get(http: ProfileClient, server: Server, host: str = "profile.test") -> RawResponse:
    endpoint = server.endpoint(scheme="https", host=host)
    return await http.get(endpoint, server.host, HEADERS, timeout=WAIT, max_bytes=65536)


async def test_a_certificate_of_the_trusted_ca_for_the_right_name_is_accepted(ca: trustme.CA) -> None:
    http = trusting(ca)
    async with Server(always(send(ok())), tls=server_tls(ca.issue_cert("profile.test"))) as server:
        response = await tls_get(http, server)
        assert response.status == 200 and response.body == b'{"a": 1}'
        assert f"Bearer {TOKEN}".encode() in server.requests[0]
    await http.aclose()


def _expired(ca: trustme.CA) -> trustme.LeafCert:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    return ca.issue_cert("profile.test", not_before=past - datetime.timedelta(days=30), not_after=past)


CASES: dict[str, Callable[[trustme.CA], tuple[trustme.LeafCert, bool]]] = {
    "untrusted CA": lambda ca: (trustme.CA().issue_cert("profile.test"), True),
    "another host name": lambda ca: (ca.issue_cert("other.test"), True),
    "expired": lambda ca: (_expired(ca), True),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_bad_certificate_is_refused_and_the_token_never_leaves(ca: trustme.CA, case: str) -> None:
    cert, _ = CASES[case](ca)
    http = trusting(ca)
    async with Server(always(send(ok())), tls=server_tls(cert)) as server:
        with pytest.raises(CertificateError):
            await tls_get(http, server)
        assert server.requests == []  # the server never read a request, so never the token
    await http.aclose()


async def test_tls_connections_are_reused_per_name_never_across_names(ca: trustme.CA) -> None:
    http = trusting(ca)
    cert = ca.issue_cert("profile.test", "alt.test")
    async with Server(always(send(ok())), tls=server_tls(cert)) as server:
        await tls_get(http, server)
        await tls_get(http, server)
        assert server.connections == 1  # keep-alive for the same address and name
        await tls_get(http, server, host="alt.test")
        assert server.connections == 2  # another SNI name: its own connection
    await http.aclose()


# --- keep-alive after errors ---------------------------------------------------------------


@pytest_asyncio.fixture
async def client() -> AsyncIterator[ProfileClient]:
    http = ProfileClient()
    try:
        yield http
    finally:
        await http.aclose()


def error_answer(status: int) -> bytes:
    return f"HTTP/1.1 {status} Nope\r\nContent-Length: 2\r\n\r\n{{}}".encode()


@pytest.mark.parametrize("status", [401, 404, 500, 503])
async def test_an_error_status_keeps_the_connection(client: ProfileClient, status: int) -> None:
    script = lambda conn, n: send(error_answer(status) if n == 0 else ok())  # noqa: E731
    async with Server(script) as server:
        assert (await get(client, server)).status == status
        assert (await get(client, server)).status == 200
        assert server.connections == 1


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    await reader.read(1)  # never answers; returns when the client drops the connection
    return False


async def oversize(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000)
    await writer.drain()
    return True


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nBad Header\x00\r\n\r\n{}")
    await writer.drain()
    return True


@pytest.mark.parametrize(
    ("first", "error", "timeout"),
    [(silent, Timeout, 0.3), (oversize, ResponseTooLarge, WAIT), (garbage, ProtocolError, WAIT)],
)
async def test_a_broken_exchange_is_never_pooled(
    client: ProfileClient, first: Reply, error: type[Exception], timeout: float
) -> None:
    script = lambda conn, n: first if conn == 0 else send(ok())  # noqa: E731
    async with Server(script) as server:
        with pytest.raises(error):
            await get(client, server, timeout=timeout, max_bytes=4096)
        response = await get(client, server)
        assert response.status == 200
        assert server.connections == 2  # the broken connection was dropped, a fresh one served


# --- a server that closes mid-response -----------------------------------------------------


def close_after(raw: bytes, *, reset: bool = False) -> Reply:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        if reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        return False

    return reply


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 20",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"a\"",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n",  # no last chunk
    ],
    ids=["status line", "headers", "content-length body", "mid chunk", "before the last chunk"],
)
@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
async def test_a_cut_response_is_a_protocol_error_never_a_partial_success(
    client: ProfileClient, raw: bytes, reset: bool
) -> None:
    async with Server(always(close_after(raw, reset=reset))) as server:
        with pytest.raises(ProtocolError):
            await get(client, server)


# --- oversized heads and bodies --------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"X-One: " + b"h" * (MAX_HEAD_BYTES + 10) + b"\r\n",
        b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEAD_BYTES // 8)),
    ],
    ids=["one huge header", "many headers"],
)
async def test_an_oversized_head_is_refused(client: ProfileClient, head: bytes) -> None:
    async with Server(always(send(b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: 2\r\n\r\n{}"))) as server:
        with pytest.raises(ProtocolError):
            await get(client, server)


async def endless_chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    try:
        while True:  # until the client gives up; the test's timeout bounds it
            writer.write(b"400\r\n" + b"y" * 1024 + b"\r\n")
            await writer.drain()
    except ConnectionError:
        return False


async def test_an_endless_body_is_cut_at_the_limit(client: ProfileClient) -> None:
    async with Server(always(endless_chunks)) as server:
        with pytest.raises(ResponseTooLarge):
            await get(client, server, max_bytes=8192)


# --- a fuzz test of the response parser ------------------------------------------------------


def _valid(status: int, headers: list[tuple[str, str]], body: bytes, chunked: bool) -> bytes:
    head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    if chunked:
        framed = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        return head.encode() + b"Transfer-Encoding: chunked\r\n\r\n" + framed
    return head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body


_token = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"), max_size=12)
valid_responses = st.builds(
    _valid,
    st.integers(min_value=100, max_value=999),
    st.lists(st.tuples(_token.filter(bool), _token), max_size=5),
    st.binary(max_size=300),
    st.booleans(),
)


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    raw = draw(valid_responses)
    how = draw(st.sampled_from(["as is", "truncated", "byte flipped", "spliced", "random", "framing"]))
    if how == "truncated" and raw:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif how == "byte flipped" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :]
    elif how == "spliced":
        raw = raw + draw(st.binary(max_size=200))
    elif how == "random":
        raw = draw(st.binary(max_size=400))
    elif how == "framing":
        extra = draw(
            st.sampled_from(
                [
                    b"Content-Length: 5\r\nContent-Length: 7\r\n",
                    b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
                    b"Content-Length: -1\r\n",
                    b"Transfer-Encoding: gzip, chunked\r\n",
                    b"Content-Length: 1e3\r\n",
                ]
            )
        )
        raw = raw.replace(b"\r\n", b"\r\n" + extra, 1)
    return raw


class Fuzzed:
    """One loopback server whose answer is swapped for each example; it closes after answering."""

    def __init__(self) -> None:
        self.answer = b""

    def script(self, connection: int, request: int) -> Reply:
        return close_after(self.answer)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=responses())
def test_the_parser_answers_every_byte_sequence_with_a_response_or_its_own_error(raw: bytes) -> None:
    fuzz = Fuzzed()
    fuzz.answer = raw

    async def one() -> RawResponse | ProfileClientError:
        http = ProfileClient()
        try:
            async with Server(fuzz.script) as server:
                try:
                    return await get(http, server, timeout=1.0, max_bytes=256)
                except ProfileClientError as exc:
                    return exc  # any other exception type fails the property
        finally:
            await http.aclose()

    result = asyncio.run(one())
    if isinstance(result, RawResponse):
        assert 100 <= result.status <= 999
        assert len(result.body) <= 256
        assert all(k == k.lower() for k in result.headers)
    else:
        assert not isinstance(result, Timeout)  # a server that closes never leaves the client hanging
