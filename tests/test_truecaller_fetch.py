"""The Truecaller profile fetch: pinned address, retries on 5xx and timeouts, denials, size and deadline bounds."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from gateway.errors import BadRequest
from gateway.providers.truecaller.client import FetchDenied, FetchFailed, FetchOk, FetchResult, fetch_profile
from gateway.providers.truecaller.endpoint_guard import CheckedEndpoint, check_endpoint
from gateway.providers.truecaller.profile_client import (
    ConnectError,
    ProfileClient,
    ProtocolError,
    RawResponse,
    ResponseTooLarge,
    Timeout,
)

pytestmark = pytest.mark.timeout(10)

TOKEN = "a1asX--secret-token"
PROFILE = {"phoneNumbers": [919999999999], "name": {"first": "Asha"}}
ENDPOINT = CheckedEndpoint(
    url="https://profile4-noneu.truecaller.com/v1/default",
    scheme="https",
    host="profile4-noneu.truecaller.com",
    port=443,
    target="/v1/default",
    addresses=("157.240.1.1",),
)


@dataclass(frozen=True)
class Call:
    """One `get` the fetch made: what it asked the profile client for."""

    endpoint: CheckedEndpoint
    address: str
    headers: list[tuple[str, str]]
    timeout: float
    max_bytes: int


Handler = Callable[[Call], RawResponse]


class FakeTime:
    """A monotonic clock that only moves when the fetcher sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Recorder:
    """A profile client that answers from a list of handlers (the last one repeats)."""

    def __init__(self, *responses: Handler) -> None:
        self.responses = list(responses)
        self.requests: list[Call] = []

    async def get(
        self,
        endpoint: CheckedEndpoint,
        address: str,
        headers: list[tuple[str, str]],
        *,
        timeout: float,
        max_bytes: int,
    ) -> RawResponse:
        call = Call(endpoint, address, headers, timeout, max_bytes)
        self.requests.append(call)
        handler = self.responses[min(len(self.requests), len(self.responses)) - 1]
        return handler(call)


def status(code: int, body: object = None, headers: dict[str, str] | None = None) -> Handler:
    content = b"" if body is None else json.dumps(body).encode()
    return lambda call: RawResponse(code, {k.lower(): v for k, v in (headers or {}).items()}, content)


def content(code: int, body: bytes) -> Handler:
    return lambda call: RawResponse(code, {}, body)


def raises(exc: Exception) -> Handler:
    def handler(call: Call) -> RawResponse:
        raise exc

    return handler


async def run(
    recorder: Recorder, *, endpoint: CheckedEndpoint = ENDPOINT, fake_time: FakeTime | None = None, **kwargs: object
) -> FetchResult:
    fake = fake_time or FakeTime()
    options: dict[str, object] = {"timeout": 2.5, "deadline": fake.now + 600.0, **kwargs}
    return await fetch_profile(
        recorder,
        endpoint,
        TOKEN,
        clock=fake.clock,
        sleep=fake.sleep,
        **options,  # type: ignore[arg-type]
    )


async def test_ok_request_is_pinned_to_the_checked_address() -> None:
    recorder = Recorder(status(200, PROFILE))
    result = await run(recorder)
    assert result == FetchOk(PROFILE, attempts=1)
    [call] = recorder.requests
    assert call.endpoint is ENDPOINT and call.address == "157.240.1.1"
    assert call.headers == [
        ("Authorization", f"Bearer {TOKEN}"),
        ("Cache-Control", "no-cache"),
        ("Accept", "application/json"),
    ]
    assert call.max_bytes == 65536


@pytest.mark.parametrize("code", [401, 403])
async def test_unauthorized_is_denied_without_retry(code: int) -> None:
    recorder = Recorder(status(code, {"status": 40101, "message": "Unauthorized"}))
    assert await run(recorder) == FetchDenied(code, attempts=1)
    assert len(recorder.requests) == 1


async def test_5xx_then_ok_after_backoff() -> None:
    fake = FakeTime()
    recorder = Recorder(status(500), status(503), status(200, PROFILE))
    result = await run(recorder, fake_time=fake, backoff=0.2)
    assert result == FetchOk(PROFILE, attempts=3)
    assert fake.sleeps == [0.2, 0.4]


async def test_5xx_forever_fails_after_all_attempts() -> None:
    fake = FakeTime()
    recorder = Recorder(status(500))
    result = await run(recorder, fake_time=fake, attempts=4, backoff=0.2)
    assert result == FetchFailed("server_error", attempts=4, status_code=500)
    assert len(recorder.requests) == 4
    assert fake.sleeps == [0.2, 0.4, 0.8]


async def test_retries_rotate_through_checked_addresses() -> None:
    endpoint = CheckedEndpoint(
        url=ENDPOINT.url,
        scheme="https",
        host=ENDPOINT.host,
        port=443,
        target="/v1/default",
        addresses=("1.1.1.1", "8.8.8.8"),
    )
    recorder = Recorder(status(502), status(200, PROFILE))
    assert isinstance(await run(recorder, endpoint=endpoint), FetchOk)
    assert [c.address for c in recorder.requests] == ["1.1.1.1", "8.8.8.8"]


async def test_timeouts_are_retried_then_fail() -> None:
    fake = FakeTime()
    recorder = Recorder(raises(Timeout("slow")))
    result = await run(recorder, fake_time=fake, attempts=3)
    assert result == FetchFailed("timeout", attempts=3)
    assert len(recorder.requests) == 3 and fake.sleeps == [0.2, 0.4]


@pytest.mark.parametrize("error", [ConnectError("refused"), ProtocolError("cut mid-body")])
async def test_transport_error_then_ok(error: Exception) -> None:
    recorder = Recorder(raises(error), status(200, PROFILE))
    assert await run(recorder) == FetchOk(PROFILE, attempts=2)


async def test_per_attempt_timeout_is_capped_by_deadline() -> None:
    fake = FakeTime()
    recorder = Recorder(status(200, PROFILE))
    await run(recorder, fake_time=fake, timeout=2.5, deadline=fake.now + 1.0)
    assert recorder.requests[0].timeout == 1.0


async def test_no_backoff_past_the_deadline() -> None:
    fake = FakeTime()
    recorder = Recorder(status(500))
    result = await run(recorder, fake_time=fake, deadline=fake.now + 0.5, backoff=0.2)
    # 0.2 fits before the deadline, 0.4 more would not.
    assert result == FetchFailed("server_error", attempts=2, status_code=500)
    assert fake.sleeps == [0.2]


async def test_deadline_already_past_sends_nothing() -> None:
    fake = FakeTime()
    recorder = Recorder(status(200, PROFILE))
    result = await run(recorder, fake_time=fake, deadline=fake.now - 1)
    assert result == FetchFailed("deadline", attempts=0)
    assert recorder.requests == []


async def test_huge_body_fails() -> None:
    assert await run(Recorder(raises(ResponseTooLarge(200)))) == FetchFailed("too_large", attempts=1, status_code=200)


async def test_huge_error_body_is_judged_by_its_status_first() -> None:
    fake = FakeTime()
    recorder = Recorder(raises(ResponseTooLarge(503)), status(200, PROFILE))
    assert await run(recorder, fake_time=fake) == FetchOk(PROFILE, attempts=2)  # a 5xx: retried
    assert await run(Recorder(raises(ResponseTooLarge(401)))) == FetchDenied(401, attempts=1)


async def test_bad_json_fails() -> None:
    assert await run(Recorder(content(200, b"<html>not json</html>"))) == FetchFailed(
        "bad_json", attempts=1, status_code=200
    )


async def test_deeply_nested_json_fails_cleanly() -> None:
    assert await run(Recorder(content(200, b"[" * 60_000))) == FetchFailed("bad_json", attempts=1, status_code=200)


async def test_redirect_is_not_followed() -> None:
    recorder = Recorder(status(302, headers={"Location": "http://127.0.0.1/"}))
    result = await run(recorder)
    assert result == FetchFailed("redirect", attempts=1, status_code=302)
    assert [c.address for c in recorder.requests] == ["157.240.1.1"]


@pytest.mark.parametrize("code", [400, 404, 429, 204])
async def test_other_statuses_fail_without_retry(code: int) -> None:
    recorder = Recorder(status(code))
    result = await run(recorder)
    assert isinstance(result, FetchFailed) and result.attempts == 1
    assert len(recorder.requests) == 1


@pytest.mark.parametrize("token", ["", "a b", "a\r\nX-Evil: 1", "t\u00e9", "x" * 5000])
async def test_unusable_token_is_never_sent(token: str) -> None:
    recorder = Recorder(status(200, PROFILE))
    result = await fetch_profile(recorder, ENDPOINT, token, timeout=1, deadline=float("inf"))
    assert result == FetchFailed("bad_token", attempts=0)
    assert recorder.requests == []


async def test_token_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    await run(Recorder(raises(ConnectError(f"boom {TOKEN}")), status(500)), attempts=3)
    assert "attempt 1" in caplog.text
    assert TOKEN not in caplog.text


# --- a real socket: the guard must stop the request before any byte leaves -------------


class TinyServer:
    """An HTTP/1.1 server on 127.0.0.1 that records every request and answers with PROFILE."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            body = json.dumps(PROFILE).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> TinyServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def resolve_to_loopback(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]


async def test_real_socket_private_resolution_is_refused_before_any_request() -> None:
    async with TinyServer() as server:
        http = ProfileClient()
        url = f"http://profile.test:{server.port}/v1/default"
        with pytest.raises(BadRequest):
            endpoint = await check_endpoint(
                url,
                allowed_hosts=[f"profile.test:{server.port}"],
                require_https=False,
                require_public_ip=True,
                resolve=resolve_to_loopback,
            )
            await fetch_profile(http, endpoint, TOKEN, timeout=1, deadline=float("inf"))
        await http.aclose()
        # Nothing is pending on the loop that could still reach the server: it saw nothing.
        assert server.requests == []


async def test_real_socket_fetch_goes_to_the_checked_address() -> None:
    async with TinyServer() as server:
        http = ProfileClient()
        endpoint = await check_endpoint(
            f"http://profile.test:{server.port}/v1/default?x=1",
            allowed_hosts=[f"profile.test:{server.port}"],
            require_https=False,
            require_public_ip=False,
            resolve=resolve_to_loopback,
        )
        async with asyncio.timeout(5):
            result = await fetch_profile(http, endpoint, TOKEN, timeout=2, deadline=time.monotonic() + 5)
        await http.aclose()
    assert result == FetchOk(PROFILE, attempts=1)
    [head] = server.requests
    lines = head.decode().split("\r\n")
    assert lines[0] == "GET /v1/default?x=1 HTTP/1.1"
    assert f"Host: profile.test:{server.port}" in lines
    assert f"Authorization: Bearer {TOKEN}" in lines
    assert "Cache-Control: no-cache" in lines
