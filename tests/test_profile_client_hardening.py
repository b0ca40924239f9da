"""ProfileClient tested as a library: TLS with a throw-away CA, reuse after errors, broken servers, fuzzing.

The lean client replaces httpx on the Truecaller profile fetch (docs/BENCHMARKS.md), so it
carries the Bearer token through exactly the failure modes a mature library is tested for.
Every server here is a real socket on loopback; every wait is bounded by WAIT.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import string
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import pytest_asyncio
import trustme
from hypothesis import HealthCheck, given, note, settings
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

# A connection the client leaves to the garbage collector instead of closing it fails the test.
pytestmark = [pytest.mark.timeout(20), pytest.mark.filterwarnings("error::ResourceWarning")]

BODY = b'{"a": 1}'  # what ok() answers


async def waited(event: asyncio.Event) -> None:
    async with asyncio.timeout(WAIT):
        await event.wait()


@pytest_asyncio.fixture
async def client() -> AsyncIterator[ProfileClient]:
    http = ProfileClient()
    try:
        yield http
    finally:
        await http.aclose()


# --- TLS against a real TLS server on loopback with a throw-away CA -----------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_tls(cert: trustme.LeafCert, sni: list[str] | None = None) -> ssl.SSLContext:
    """A server context presenting `cert`; the SNI name of every handshake is appended to `sni`."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    if sni is not None:
        ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    return ctx


def trusting(ca: trustme.CA) -> ProfileClient:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ProfileClient(ssl_context=ctx)


class TlsTap(Server):
    """A plain TCP listener that does TLS itself, so the test sees everything the client sent.

    `raw` is every byte read off the wire, `decrypted` the application data, `handshakes` counts
    completed TLS handshakes and `requests` the request heads (each answered with ok()). It reads
    until the client hangs up, then sets `peer_closed`: nothing the client sent can still be in flight.
    """

    def __init__(self, tls: ssl.SSLContext) -> None:
        super().__init__(always(send(ok())))  # no asyncio TLS: _handle below does it
        self.server_context = tls
        self.raw = bytearray()
        self.decrypted = bytearray()
        self.handshakes = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.connections += 1
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.server_context.wrap_bio(incoming, outgoing, server_side=True)
        handshaken, pending = False, b""
        try:
            while True:
                try:
                    if not handshaken:
                        tls.do_handshake()
                        handshaken = True
                        self.handshakes += 1
                    while data := tls.read(65536):
                        self.decrypted += data
                        pending += data
                        while b"\r\n\r\n" in pending:
                            head, pending = pending.split(b"\r\n\r\n", 1)
                            self.requests.append(head + b"\r\n\r\n")
                            tls.write(ok())
                    tls.unwrap()  # read() gave b"": the client's close_notify; answer it, as a server does
                    writer.write(outgoing.read())
                    break
                except ssl.SSLWantReadError:
                    pass
                writer.write(outgoing.read())
                await writer.drain()
                chunk = await reader.read(65536)
                if not chunk:
                    break
                self.raw += chunk
                incoming.write(chunk)
        except (ssl.SSLError, ConnectionError):
            pass  # the client refused the handshake, or reset
        finally:
            self.peer_closed.set()
            writer.close()


async def tls_get(http: ProfileClient, server: Server, host: str = "profile.test") -> RawResponse:
    endpoint = server.endpoint(scheme="https", host=host)
    return await http.get(endpoint, server.host, HEADERS, timeout=WAIT, max_bytes=65536)


async def test_a_certificate_of_the_trusted_ca_for_the_right_name_is_accepted(ca: trustme.CA) -> None:
    # Also the control for the refusals below: this tap does see the token once the client trusts it.
    http = trusting(ca)
    async with TlsTap(server_tls(ca.issue_cert("profile.test"))) as tap:
        try:
            response = await tls_get(http, tap)
        finally:
            await http.aclose()
        await waited(tap.peer_closed)
    assert (response.status, response.body) == (200, BODY)
    assert tap.handshakes == 1
    assert f"Authorization: Bearer {TOKEN}\r\n".encode() in tap.requests[0]
    assert TOKEN.encode() not in tap.raw  # on the wire it was encrypted


def _expired(ca: trustme.CA) -> trustme.LeafCert:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    return ca.issue_cert("profile.test", not_before=past - datetime.timedelta(days=30), not_after=past)


# case: (the server's certificate, does the client trust `ca`, OpenSSL's reason for the refusal)
REFUSED: dict[str, tuple[Callable[[trustme.CA], trustme.LeafCert], bool, str]] = {
    "CA not trusted, system store only": (
        lambda ca: ca.issue_cert("profile.test"),
        False,
        "unable to get local issuer",
    ),
    "issued by another CA": (lambda ca: trustme.CA().issue_cert("profile.test"), True, "unable to get local issuer"),
    "issued for another host name": (lambda ca: ca.issue_cert("other.test"), True, "Hostname mismatch"),
    "expired": (_expired, True, "certificate has expired"),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_a_bad_certificate_is_refused_before_the_token_leaves(ca: trustme.CA, case: str) -> None:
    issue, trusted, reason = REFUSED[case]
    http = trusting(ca) if trusted else ProfileClient()  # ProfileClient(): the system CAs, as in production
    async with TlsTap(server_tls(issue(ca))) as tap:
        try:
            with pytest.raises(CertificateError) as caught:
                await tls_get(http, tap)
        finally:
            await http.aclose()
        await waited(tap.peer_closed)  # the tap read all the client sent, up to its hang-up
    # Refused for this case's own reason, not for another one every case shares.
    assert reason in getattr(caught.value.__context__, "verify_message", "")
    assert tap.connections == 1 and tap.raw  # the client did connect and start a handshake
    assert tap.handshakes == 0 and tap.decrypted == b"" and tap.requests == []
    assert TOKEN.encode() not in tap.raw and TOKEN not in str(caught.value)


async def test_tls_connections_are_reused_per_name_never_across_names(ca: trustme.CA) -> None:
    # One certificate valid for both names, so only the pool keeps the names apart.
    http = trusting(ca)
    sni: list[str] = []
    try:
        async with Server(always(send(ok())), tls=server_tls(ca.issue_cert("profile.test", "alt.test"), sni)) as server:
            for host in ["profile.test", "profile.test", "alt.test", "alt.test", "profile.test"]:
                assert (await tls_get(http, server, host=host)).body == BODY
    finally:
        await http.aclose()
    assert sni == ["profile.test", "alt.test"]  # one handshake per name, each with its own SNI
    assert server.connections == 2 and len(server.requests) == 5
    hosts = [head.split(b"\r\n")[1] for head in server.requests]
    assert hosts == [b"Host: profile.test:%d" % server.port] * 2 + [b"Host: alt.test:%d" % server.port] * 2 + [
        b"Host: profile.test:%d" % server.port
    ]


# --- keep-alive reuse after errors ------------------------------------------------------------


def answer(status: int, body: bytes = b"{}") -> bytes:
    return b"HTTP/1.1 %d Nope\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
async def test_an_error_status_keeps_the_connection(client: ProfileClient, status: int) -> None:
    script = lambda conn, n: send(answer(status, b"nope") if n == 0 else ok())  # noqa: E731
    async with Server(script) as server:
        first = await get(client, server)
        second = await get(client, server)
    assert (first.status, first.body) == (status, b"nope")
    assert (second.status, second.body) == (200, BODY)
    assert server.connections == 1 and len(server.requests) == 2


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    return True  # never answers, keeps the connection


async def oversize_declared(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(answer(200, b"x" * 10_000))  # the whole body follows: a pooled connection would read it next
    await writer.drain()
    return True


async def oversize_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"400\r\n" + b"y" * 1024 + b"\r\n") * 8)
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    return True


async def malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nBad Header\x00\r\n\r\n{}")
    await writer.drain()
    return True


@pytest.mark.parametrize(
    ("first", "error", "timeout"),
    [
        (silent, Timeout, 0.3),
        (oversize_declared, ResponseTooLarge, WAIT),
        (oversize_chunked, ResponseTooLarge, WAIT),
        (malformed, ProtocolError, WAIT),
    ],
    ids=["timeout", "too large, declared", "too large, chunked", "protocol error"],
)
async def test_a_broken_exchange_is_never_pooled(
    client: ProfileClient, first: Reply, error: type[Exception], timeout: float
) -> None:
    # The server would keep serving the broken connection: only the client can drop it.
    script = lambda conn, n: first if (conn, n) == (0, 0) else send(ok())  # noqa: E731
    async with Server(script) as server:
        with pytest.raises(error):
            await get(client, server, timeout=timeout, max_bytes=4096)
        await waited(server.peer_closed)  # dropped at once, not parked in the pool nor leaked
        response = await get(client, server)
    assert (response.status, response.body) == (200, BODY)
    assert server.connections == 2 and len(server.requests) == 2


def then_idle_bytes(extra: bytes, go: asyncio.Event, sent: asyncio.Event, *, close: bool) -> Reply:
    """Answer, then (once the client holds the connection idle) send `extra` unasked."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(ok())
        await writer.drain()
        await waited(go)
        writer.write(extra)
        await writer.drain()  # on loopback the bytes are in the client's socket now
        sent.set()
        return not close

    return reply


STRAY = {
    "408 then close": (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", True),
    "a stray response": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale", False),
    "a stray byte": (b"}", False),
}


@pytest.mark.parametrize("stray", list(STRAY))
@pytest.mark.parametrize("settled", [False, True], ids=["still in the socket", "already read by the loop"])
async def test_bytes_sent_on_an_idle_connection_are_never_read_as_the_next_answer(
    client: ProfileClient, stray: str, settled: bool
) -> None:
    # A server that times an idle connection out may say so (408) before closing; a broken one may
    # send more than it framed. Either way those bytes answer no request: the connection is spent.
    extra, close = STRAY[stray]
    go, sent = asyncio.Event(), asyncio.Event()
    first = then_idle_bytes(extra, go, sent, close=close)
    script = lambda conn, n: first if (conn, n) == (0, 0) else send(ok())  # noqa: E731
    async with Server(script) as server:
        assert (await get(client, server)).body == BODY
        go.set()
        await waited(sent)
        if settled:
            # A whole exchange on another key takes the loop through select() more than once after
            # the bytes arrived, so the idle transport has moved them from its socket to its reader.
            elsewhere = server.endpoint(host="elsewhere.test")
            assert (await client.get(elsewhere, server.host, HEADERS, timeout=WAIT, max_bytes=1024)).body == BODY
        response = await get(client, server)
    assert (response.status, response.body) == (200, BODY)
    assert server.connections == (3 if settled else 2)


@pytest.mark.parametrize("stray", ["a stray response", "a stray byte"])
async def test_a_response_followed_by_more_than_it_framed_is_not_pooled(client: ProfileClient, stray: str) -> None:
    # The extra bytes come in the same segment as the answer: the connection is out of step.
    script = lambda conn, n: send(ok() + STRAY[stray][0]) if (conn, n) == (0, 0) else send(ok())  # noqa: E731
    async with Server(script) as server:  # the server would keep serving the connection
        assert (await get(client, server)).body == BODY
        await waited(server.peer_closed)
        response = await get(client, server)
    assert (response.status, response.body) == (200, BODY)
    assert server.connections == 2


# --- a server that closes mid-response ----------------------------------------------------------


def close_after(raw: bytes, *, reset: bool = False) -> Reply:
    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        if reset:  # SO_LINGER 0: the close sends RST instead of FIN
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        return False

    return reply


CUT = {
    "status line": b"HTTP/1.1 20",
    "headers": b"HTTP/1.1 200 OK\r\nContent-Le",
    "end of the head": b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n",
    "content-length body": b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial',
    "chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1",
    "mid chunk": b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{"a"',
    "before the last chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n",
    "in the trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-T: 1\r\n",
    "after an interim response": b"HTTP/1.1 100 Continue\r\n\r\n",
}


@pytest.mark.parametrize("cut", list(CUT))
@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
async def test_a_cut_response_is_a_protocol_error_never_a_partial_success(
    client: ProfileClient, cut: str, reset: bool
) -> None:
    async with Server(always(close_after(CUT[cut], reset=reset))) as server:
        with pytest.raises(ProtocolError):
            await get(client, server)
    assert server.connections == 1  # a fresh connection that answered is not retried


@pytest.mark.parametrize("cut", list(CUT))
async def test_a_cut_response_on_a_reused_connection_is_not_retried(client: ProfileClient, cut: str) -> None:
    # The dead-connection retry is for a connection that died before any byte of the answer;
    # this one answered part of it, so the request reached the server.
    script = lambda conn, n: send(ok()) if n == 0 else close_after(CUT[cut])  # noqa: E731
    async with Server(script) as server:
        await get(client, server)
        with pytest.raises(ProtocolError):
            await get(client, server)
    assert server.connections == 1 and len(server.requests) == 2


# --- oversized heads and bodies -------------------------------------------------------------------


def head_of(size: int) -> bytes:
    """`X-Pad-<i>: ppp...` lines adding up to about `size` bytes, each under 1 KiB."""
    lines, total, i = [], 0, 0
    while total < size:
        line = b"X-Pad-%d: %s\r\n" % (i, b"p" * min(900, max(1, size - total)))
        lines.append(line)
        total, i = total + len(line), i + 1
    return b"".join(lines)


async def test_a_head_just_under_the_limit_is_accepted(client: ProfileClient) -> None:
    # The control for the refusals below: the limit is MAX_HEAD_BYTES, not something smaller.
    async with Server(always(send(ok(extra=head_of(MAX_HEAD_BYTES - 2048).decode())))) as server:
        response = await get(client, server)
    assert (response.status, response.body) == (200, BODY)
    assert len(response.headers) > 60


OVERSIZED_HEADS = {
    "one huge header": b"HTTP/1.1 200 OK\r\nX-One: " + b"h" * (MAX_HEAD_BYTES + 10) + b"\r\n",
    "many headers": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEAD_BYTES // 8)),
    "many headers of normal size": b"HTTP/1.1 200 OK\r\n" + head_of(MAX_HEAD_BYTES + 1024),
    "a huge reason phrase": b"HTTP/1.1 200 " + b"R" * (3 * MAX_HEAD_BYTES) + b"\r\n",
    "endless interim responses": b"HTTP/1.1 100 Continue\r\n\r\n" * (MAX_HEAD_BYTES // 10) + b"HTTP/1.1 200 OK\r\n",
    "interim responses adding up": b"HTTP/1.1 103 Early Hints\r\n" + head_of(MAX_HEAD_BYTES // 2) + b"\r\n"
    # two of them, each well under the limit, together over it
    + b"HTTP/1.1 103 Early Hints\r\n" + head_of(MAX_HEAD_BYTES // 2 + 1024) + b"\r\nHTTP/1.1 200 OK\r\n",
}  # fmt: skip


@pytest.mark.parametrize("head", list(OVERSIZED_HEADS))
async def test_an_oversized_head_is_refused_and_the_connection_dropped(client: ProfileClient, head: str) -> None:
    raw = OVERSIZED_HEADS[head] + b"Content-Length: 2\r\n\r\n{}"
    async with Server(always(send(raw))) as server:  # the server would keep the connection
        with pytest.raises(ProtocolError):
            await get(client, server)
        await waited(server.peer_closed)
    assert server.connections == 1


def endless(head: bytes, unit: bytes) -> Reply:
    """`head`, then `unit` over and over until the client hangs up."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(head)
        while True:  # ends with a ConnectionError once the client drops it (the Server sets peer_closed)
            writer.write(unit * 16)
            await writer.drain()

    return reply


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
OK_HEAD = b"HTTP/1.1 200 OK\r\n"
ENDLESS_BODIES: dict[str, tuple[Reply, type[ProfileClientError]]] = {
    "chunks that never end": (endless(CHUNKED, b"400\r\n" + b"y" * 1024 + b"\r\n"), ResponseTooLarge),
    "content-length over the limit": (
        endless(OK_HEAD + b"Content-Length: 99999\r\n\r\n", b"z" * 1024),
        ResponseTooLarge,
    ),
    "a body until close that never closes": (endless(OK_HEAD + b"\r\n", b"w" * 1024), ResponseTooLarge),
    "a chunk extension that never ends": (endless(CHUNKED + b"1;ext=", b"e" * 1024), ResponseTooLarge),
    "trailers that never end": (endless(CHUNKED + b"2\r\n{}\r\n0\r\n", b"X-T: t\r\n"), ProtocolError),
}


@pytest.mark.parametrize("case", list(ENDLESS_BODIES))
async def test_an_endless_body_is_cut_at_the_limit_and_the_connection_dropped(client: ProfileClient, case: str) -> None:
    reply, error = ENDLESS_BODIES[case]
    async with Server(always(reply)) as server:
        with pytest.raises(error):
            await get(client, server, max_bytes=8192)
        await waited(server.peer_closed)
    assert server.connections == 1


# --- statuses llhttp accepts but HTTP does not have -----------------------------------------------


async def test_a_status_below_100_is_refused_not_taken_for_an_interim_response(client: ProfileClient) -> None:
    # llhttp parses "099" and "000" as ordinary responses with a body. Taken for a 1xx, its body
    # was kept and prepended to the next response's: here a 200 whose body would read "EVIL,{}".
    raw = b"HTTP/1.1 099 X\r\nContent-Length: 5\r\n\r\nEVIL,HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    async with Server(always(send(raw, keep=False))) as server:
        with pytest.raises(ProtocolError):
            await get(client, server)


# --- a fuzz test of the response parser -------------------------------------------------------

MAX_BYTES = 256
TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
_FRAMING = ("content-length", "transfer-encoding", "connection", "upgrade", "x-trailer-")
names = st.text(TCHAR, min_size=1, max_size=10).filter(lambda n: not n.lower().startswith(_FRAMING))
values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=12).map(
    str.strip
)
fields = st.lists(st.tuples(names, values), max_size=5)


def _head(status: bytes, headers: list[tuple[str, str]]) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers)


def _joined(headers: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        out[key] = value if key not in out else f"{out[key]}, {value}"
    return out


@dataclass
class Case:
    """A well-formed response stream: interim responses, then one final response."""

    raw: bytes
    status: int  # of the final response
    headers: dict[str, str]  # as RawResponse should hold them
    body: bytes
    framing: str  # length, chunked or close
    valid: bool  # False: an "interim" status below 100, which HTTP does not have


@st.composite
def cases(draw: st.DrawFn) -> Case:
    raw, valid = b"", True
    for _ in range(draw(st.integers(0, 2))):
        code = draw(st.integers(0, 199).filter(lambda c: c != 101))  # 101 would switch protocols
        if code < 100:  # llhttp parses it as a response with a body
            valid = False
            junk = draw(st.binary(min_size=1, max_size=20))
            raw += _head(b"%03d X" % code, [("Content-Length", str(len(junk)))]) + b"\r\n" + junk
        else:
            raw += _head(b"%d Info" % code, draw(fields)) + b"\r\n"
    status = draw(st.integers(200, 999).filter(lambda c: c not in (204, 304)))  # those two never have a body
    headers = draw(fields)
    body = draw(st.binary(max_size=MAX_BYTES + 50))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    reason = draw(st.sampled_from([b" OK", b"", b" Some Reason"]))
    raw += _head(b"%d%s" % (status, reason), headers)
    expected = _joined(headers)
    if framing == "length":
        raw += b"Content-Length: %d\r\n\r\n" % len(body) + body
        expected["content-length"] = str(len(body))
    elif framing == "chunked":
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
        raw += b"Transfer-Encoding: chunked\r\n\r\n"
        for piece in pieces:
            size = b"%x" % len(piece) if draw(st.booleans()) else b"%X" % len(piece)
            raw += size + draw(st.sampled_from([b"", b";ext", b';e="v"'])) + b"\r\n" + piece + b"\r\n"
        raw += b"0\r\n" + b"".join(b"X-Trailer-%d: t\r\n" % i for i in range(draw(st.integers(0, 2)))) + b"\r\n"
        expected["transfer-encoding"] = "chunked"
    else:
        raw += b"\r\n" + body  # delimited by the server's close
    return Case(raw, status, expected, body, framing, valid)


FRAMING_LINES = [
    b"Content-Length: 5\r\nContent-Length: 7\r\n",
    b"Content-Length: 3\r\nContent-Length: 3\r\n",
    b"Content-Length: 3, 3\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: chunked, gzip\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: +3\r\n",
    b"Content-Length: 1e3\r\n",
    b"Content-Length: 99999999999999999999999\r\n",
    b"Content-Length:\r\n",
    b"Connection: close\r\n",
    b"Connection: upgrade\r\nUpgrade: h2c\r\n",
    b" folded: line\r\n",
    b"No-Colon\r\n",
]


MUTATIONS = ["as is", "truncated", "junk after", "byte flipped", "framing", "chunk size", "status", "LF", "random"]


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, Case, str]:
    """(bytes the server sends, the well-formed case they came from, how they were changed)."""
    case = draw(cases())
    raw = case.raw
    how = draw(st.sampled_from(MUTATIONS))
    if how == "truncated":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif how == "junk after":
        raw += draw(
            st.one_of(st.binary(min_size=1, max_size=100), st.just(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
        )
    elif how == "byte flipped":
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255).filter(lambda b: b != raw[i]))]) + raw[i + 1 :]
    elif how == "framing":  # inserted into the final response's head
        at = raw.rindex(b"HTTP/1.1 ")
        at = raw.index(b"\r\n", at) + 2
        raw = raw[:at] + draw(st.sampled_from(FRAMING_LINES)) + raw[at:]
    elif how == "chunk size" and case.framing == "chunked":
        at = raw.index(b"\r\n\r\n", raw.rindex(b"HTTP/1.1 ")) + 4
        end = raw.index(b"\r\n", at)
        raw = raw[:at] + draw(st.sampled_from([b"%x" % draw(st.integers(0, 2**70)), b"-1", b"", b"zz"])) + raw[end:]
    elif how == "status":
        at = raw.rindex(b"HTTP/1.1 ") + 9
        raw = raw[:at] + draw(st.text(string.digits, min_size=0, max_size=5)).encode() + raw[at + 3 :]
    elif how == "LF":
        raw = raw.replace(b"\r\n", b"\n", draw(st.integers(1, 3)))
    elif how == "random":
        raw = draw(st.binary(max_size=400))
    return raw, case, how


def then_eof(raw: bytes) -> Reply:
    """Send `raw`, then end the server's side (FIN) and wait for the client to close."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        await writer.drain()
        writer.write_eof()
        return True

    return reply


async def no_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    return False


async def _fuzz_one(raw: bytes) -> tuple[RawResponse | ProfileClientError, RawResponse]:
    """The client's answer to `raw`, then its answer to a healthy request on the same key."""
    fuzzed = then_eof(raw)
    # A request that reached connection 0 again (the client reused it after `raw`) gets no answer.
    script = lambda conn, n: (fuzzed if n == 0 else no_answer) if conn == 0 else send(ok())  # noqa: E731
    http = ProfileClient()
    try:
        async with Server(script) as server:
            try:
                result: RawResponse | ProfileClientError = await get(http, server, timeout=WAIT, max_bytes=MAX_BYTES)
            except ProfileClientError as exc:
                result = exc  # any other exception type fails the test
            after = await get(http, server, timeout=WAIT, max_bytes=MAX_BYTES)
    finally:
        await http.aclose()
    return result, after


@settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams())
def test_the_parser_answers_any_bytes_with_a_bounded_response_or_its_own_error(stream: tuple[bytes, Case, str]) -> None:
    raw, case, how = stream
    note(f"{how}: {raw!r}")
    result, after = asyncio.run(_fuzz_one(raw))
    note(f"answer: {result!r}")

    # Whatever came before, the next request on the same key gets its own, healthy answer.
    assert (after.status, after.body) == (200, BODY)
    # The server always ends its side, so the client never waits for the timeout.
    assert not isinstance(result, Timeout)
    if isinstance(result, RawResponse):
        assert 100 <= result.status <= 999
        assert len(result.body) <= MAX_BYTES
        assert all(k == k.lower() for k in result.headers)

    complete = how in ("as is", "junk after") and case.framing != "close"
    if how == "as is" or complete:
        if not case.valid:
            assert isinstance(result, ProtocolError)
        elif len(case.body) > MAX_BYTES:
            assert isinstance(result, ResponseTooLarge) and result.status == case.status
        else:  # exactly the final response, trailers aside
            assert isinstance(result, RawResponse)
            got = {k: v for k, v in result.headers.items() if not k.startswith("x-trailer-")}
            assert (result.status, got, result.body) == (case.status, case.headers, case.body)
    if how == "truncated" and case.framing != "close":
        assert isinstance(result, ProfileClientError)  # never a partial body as a success
