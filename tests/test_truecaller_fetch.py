"""The Truecaller profile fetch: pinned address, retries on 5xx and timeouts, denials, size and deadline bounds."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from gateway.errors import BadRequest
from gateway.providers.truecaller.client import FetchDenied, FetchFailed, FetchOk, FetchResult, fetch_profile
from gateway.providers.truecaller.endpoint_guard import CheckedEndpoint, check_endpoint

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

Handler = Callable[[httpx.Request], httpx.Response]


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
    def __init__(self, *responses: Handler) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        handler = self.responses[min(len(self.requests), len(self.responses)) - 1]
        return handler(request)


def status(code: int, body: object = None, headers: dict[str, str] | None = None) -> Handler:
    return lambda request: httpx.Response(code, json=body, headers=headers)


async def run(
    recorder: Recorder, *, endpoint: CheckedEndpoint = ENDPOINT, fake_time: FakeTime | None = None, **kwargs: object
) -> FetchResult:
    fake = fake_time or FakeTime()
    async with httpx.AsyncClient(transport=httpx.MockTransport(recorder)) as http:
        options: dict[str, object] = {"timeout": 2.5, "deadline": fake.now + 600.0, **kwargs}
        return await fetch_profile(
            http,
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
    [request] = recorder.requests
    assert request.method == "GET"
    assert request.url.host == "157.240.1.1"
    assert request.url.scheme == "https" and request.url.port is None
    assert request.url.raw_path == b"/v1/default"
    assert request.headers["Host"] == "profile4-noneu.truecaller.com"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Cache-Control"] == "no-cache"
    assert request.headers["Accept"] == "application/json"
    assert request.extensions["sni_hostname"] == "profile4-noneu.truecaller.com"
    assert [k for k in request.headers if k.lower() == "host"] == ["host"]


async def test_ipv6_address_and_non_default_port() -> None:
    endpoint = CheckedEndpoint(
        url="http://profile.test:8080/p?q=1",
        scheme="http",
        host="profile.test",
        port=8080,
        target="/p?q=1",
        addresses=("2a03:2880::1",),
    )
    recorder = Recorder(status(200, PROFILE))
    assert isinstance(await run(recorder, endpoint=endpoint), FetchOk)
    [request] = recorder.requests
    assert str(request.url) == "http://[2a03:2880::1]:8080/p?q=1"
    assert request.headers["Host"] == "profile.test:8080"
    assert "sni_hostname" not in request.extensions


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
    assert [r.url.host for r in recorder.requests] == ["1.1.1.1", "8.8.8.8"]


def raises(exc: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


async def test_timeouts_are_retried_then_fail() -> None:
    fake = FakeTime()
    recorder = Recorder(raises(httpx.ReadTimeout("slow")))
    result = await run(recorder, fake_time=fake, attempts=3)
    assert result == FetchFailed("timeout", attempts=3)
    assert len(recorder.requests) == 3 and fake.sleeps == [0.2, 0.4]


async def test_transport_error_then_ok() -> None:
    recorder = Recorder(raises(httpx.ConnectError("refused")), status(200, PROFILE))
    assert await run(recorder) == FetchOk(PROFILE, attempts=2)


async def test_per_attempt_timeout_is_capped_by_deadline() -> None:
    fake = FakeTime()
    recorder = Recorder(status(200, PROFILE))
    await run(recorder, fake_time=fake, timeout=2.5, deadline=fake.now + 1.0)
    assert recorder.requests[0].extensions["timeout"] == {"connect": 1.0, "read": 1.0, "write": 1.0, "pool": 1.0}


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
    def huge(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"a": "' + b"x" * 100_000 + b'"}')

    assert await run(Recorder(huge)) == FetchFailed("too_large", attempts=1, status_code=200)


async def test_huge_streamed_body_without_length_fails_early() -> None:
    produced: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(1000):
            produced.append(1)
            yield b"x" * 1024

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks())

    assert await run(Recorder(handler), max_bytes=4096) == FetchFailed("too_large", attempts=1, status_code=200)
    assert len(produced) < 10


async def test_bad_json_fails() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"<html>not json</html>")

    assert await run(Recorder(handler)) == FetchFailed("bad_json", attempts=1, status_code=200)


async def test_deeply_nested_json_fails_cleanly() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"[" * 60_000)

    assert await run(Recorder(handler)) == FetchFailed("bad_json", attempts=1, status_code=200)


async def test_redirect_is_not_followed() -> None:
    recorder = Recorder(status(302, headers={"Location": "http://127.0.0.1/"}))
    result = await run(recorder)
    assert result == FetchFailed("redirect", attempts=1, status_code=302)
    assert [r.url.host for r in recorder.requests] == ["157.240.1.1"]


async def test_redirect_not_followed_even_if_client_follows_by_default() -> None:
    recorder = Recorder(status(307, headers={"Location": "http://127.0.0.1/"}))
    async with httpx.AsyncClient(transport=httpx.MockTransport(recorder), follow_redirects=True) as http:
        result = await fetch_profile(http, ENDPOINT, TOKEN, timeout=1, deadline=float("inf"))
    assert isinstance(result, FetchFailed) and result.detail == "redirect"
    assert len(recorder.requests) == 1


async def test_client_auth_does_not_replace_bearer() -> None:
    recorder = Recorder(status(200, PROFILE))
    async with httpx.AsyncClient(transport=httpx.MockTransport(recorder), auth=("u", "p")) as http:
        await fetch_profile(http, ENDPOINT, TOKEN, timeout=1, deadline=float("inf"))
    assert recorder.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("code", [400, 404, 429, 204])
async def test_other_statuses_fail_without_retry(code: int) -> None:
    recorder = Recorder(status(code))
    result = await run(recorder)
    assert isinstance(result, FetchFailed) and result.attempts == 1
    assert len(recorder.requests) == 1


@pytest.mark.parametrize("token", ["", "a b", "a\r\nX-Evil: 1", "t\u00e9", "x" * 5000])
async def test_unusable_token_is_never_sent(token: str) -> None:
    recorder = Recorder(status(200, PROFILE))
    async with httpx.AsyncClient(transport=httpx.MockTransport(recorder)) as http:
        result = await fetch_profile(http, ENDPOINT, token, timeout=1, deadline=float("inf"))
    assert result == FetchFailed("bad_token", attempts=0)
    assert recorder.requests == []


async def test_token_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    await run(Recorder(raises(httpx.ConnectError(f"boom {TOKEN}")), status(500)), attempts=3)
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
    async with TinyServer() as server, httpx.AsyncClient(trust_env=False) as http:
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
        # Nothing is pending on the loop that could still reach the server: it saw nothing.
        assert server.requests == []


async def test_real_socket_fetch_goes_to_the_checked_address() -> None:
    async with TinyServer() as server, httpx.AsyncClient(trust_env=False) as http:
        endpoint = await check_endpoint(
            f"http://profile.test:{server.port}/v1/default?x=1",
            allowed_hosts=[f"profile.test:{server.port}"],
            require_https=False,
            require_public_ip=False,
            resolve=resolve_to_loopback,
        )
        async with asyncio.timeout(5):
            result = await fetch_profile(http, endpoint, TOKEN, timeout=2, deadline=time.monotonic() + 5)
    assert result == FetchOk(PROFILE, attempts=1)
    [head] = server.requests
    lines = head.decode().split("\r\n")
    assert lines[0] == "GET /v1/default?x=1 HTTP/1.1"
    assert f"Host: profile.test:{server.port}" in lines
    assert f"Authorization: Bearer {TOKEN}" in lines
    assert "Cache-Control: no-cache" in lines
