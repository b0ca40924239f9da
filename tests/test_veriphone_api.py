"""The Veriph.One API client against httpx.MockTransport: request shapes, odd answers, failures mapped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import httpx
import pytest

from gateway.errors import BadRequest, ProviderFailure
from gateway.providers.veriphone.client import MAX_BODY_BYTES, CreatedSession, VeriphoneApi

API_KEY = "key-123-do-not-echo"
API_SECRET = "secret-456"
BASE = "https://veriph.test"
CREATE_URL = f"{BASE}/sdk-api/phone-verification/create-session/v1.0.0"
RESULT_URL = f"{BASE}/sdk-api/phone-verification/verification-result/v1.0.0"
SESSION_OK = {"uuid": "0b6a3c1e-1111-4222-8333-944455556666", "createdAt": "…", "redirectionUrl": "https://v.test/x"}
RESULT_BODY: dict[str, Any] = {"firstSuccessfulAttempt": None, "attempts": []}

Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def make_api(handler: Handler, timeout: float = 5.0) -> VeriphoneApi:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return VeriphoneApi(client, api_base=BASE + "/", api_key=API_KEY, api_secret=API_SECRET, timeout=timeout)


def answer(status: int, body: object = None, *, content: bytes | None = None) -> Handler:
    async def handler(request: httpx.Request) -> httpx.Response:
        if content is not None:
            return httpx.Response(status, content=content)
        return httpx.Response(status, json=body)

    return handler


async def create(api: VeriphoneApi, phone: str | None = "+15551234567") -> CreatedSession:
    return await api.create_session(
        prefilled_phone=phone, user_id="u-1", user_agent="Mozilla/5.0", ip_address="203.0.113.9", locale="en"
    )


async def failure(call: Awaitable[object]) -> ProviderFailure:
    with pytest.raises(ProviderFailure) as info:
        await call
    assert API_KEY not in info.value.message
    assert API_SECRET not in info.value.message
    return info.value


async def test_create_session_sends_documented_request() -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=SESSION_OK)

    created = await create(make_api(handler))

    assert created == CreatedSession(uuid=SESSION_OK["uuid"], redirect_url="https://v.test/x")
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == CREATE_URL
    assert request.headers["x-api-key"] == API_KEY
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers
    assert json.loads(request.content) == {
        "prefilledPhoneNumber": {"countryCode": "1", "cellphoneNumber": "5551234567", "userCanEdit": False},
        "metadata": {"userId": "u-1", "userAgent": "Mozilla/5.0", "ipAddress": "203.0.113.9"},
        "configuration": {"locale": "en", "enforceInput": False},
    }


async def test_create_session_without_phone_has_no_prefilled_key() -> None:
    bodies: list[dict[str, Any]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(201, json=SESSION_OK)

    await create(make_api(handler), phone=None)
    assert set(bodies[0]) == {"metadata", "configuration"}


async def test_create_session_italian_number_keeps_leading_zero() -> None:
    bodies: list[dict[str, Any]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=SESSION_OK)

    await create(make_api(handler), phone="+390612345678")
    assert bodies[0]["prefilledPhoneNumber"]["countryCode"] == "39"
    assert bodies[0]["prefilledPhoneNumber"]["cellphoneNumber"] == "0612345678"


async def test_create_session_invalid_phone_is_bad_request_without_a_call() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    with pytest.raises(BadRequest):
        await create(make_api(handler), phone="+999123")


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (400, {"code": 20001, "message": "invalid phone number"}, "20001"),
        (400, {"errorCode": "20000"}, "20000"),
        (400, {"error": {"code": 14226}}, "14226"),
        (403, {"message": f"key {API_KEY} disabled"}, None),
        (403, None, None),
    ],
)
async def test_create_session_4xx_is_rejected(status: int, body: object, code: str | None) -> None:
    if code in ("20000", "20001"):  # the provider refuses the number: the caller's input
        with pytest.raises(BadRequest) as refused:
            await create(make_api(answer(status, body)))
        assert refused.value.code == "invalid_phone" and code in refused.value.message
        return
    err = await failure(create(make_api(answer(status, body))))
    assert err.code == "provider_rejected"
    assert str(status) in err.message
    if code is not None:
        assert code in err.message


@pytest.mark.parametrize(
    "handler",
    [
        answer(500, {"code": 1}),
        answer(503, content=b"<html>down</html>"),
        answer(302, content=b""),
        answer(200, content=b"<html>not json</html>"),
        answer(200, ["not", "an", "object"]),
        answer(200, {"redirectionUrl": "https://v.test/x"}),
        answer(200, {"uuid": 42, "redirectionUrl": "https://v.test/x"}),
        answer(200, {"uuid": "a b", "redirectionUrl": "https://v.test/x"}),
        answer(200, {"uuid": "abc"}),
        answer(200, {"uuid": "abc", "redirectionUrl": "javascript:alert(1)"}),
        answer(200, {"uuid": "abc", "redirectionUrl": "/relative"}),
    ],
    ids=[
        "500",
        "503-html",
        "redirect-not-followed",
        "non-json",
        "not-an-object",
        "missing-uuid",
        "uuid-not-string",
        "uuid-with-space",
        "missing-url",
        "javascript-url",
        "relative-url",
    ],
)
async def test_create_session_unusable_answer_is_unavailable(handler: Handler) -> None:
    err = await failure(create(make_api(handler)))
    assert err.code == "provider_unavailable"


@pytest.mark.parametrize(
    "exc", [httpx.ReadTimeout, httpx.ConnectTimeout, httpx.ConnectError, httpx.RemoteProtocolError]
)
async def test_transport_errors_are_unavailable(exc: type[httpx.TransportError]) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        raise exc("boom", request=request)

    err = await failure(create(make_api(handler)))
    assert err.code == "provider_unavailable"
    err = await failure(make_api(handler).get_result("abc"))
    assert err.code == "provider_unavailable"


async def test_huge_declared_body_is_unavailable() -> None:
    huge = b'{"uuid": "' + b"a" * (MAX_BODY_BYTES * 4) + b'"}'
    err = await failure(create(make_api(answer(200, content=huge))))
    assert err.code == "provider_unavailable"


async def test_huge_streamed_body_stops_reading_at_the_cap() -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while sent < MAX_BODY_BYTES * 100:
            sent += 8192
            yield b"x" * 8192

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    err = await failure(make_api(handler).get_result("abc"))
    assert err.code == "provider_unavailable"
    assert sent <= MAX_BODY_BYTES + 2 * 8192


async def test_huge_4xx_body_is_still_rejected() -> None:
    err = await failure(create(make_api(answer(400, content=b"x" * (MAX_BODY_BYTES + 1)))))
    assert err.code == "provider_rejected"


async def test_deeply_nested_json_is_unavailable() -> None:
    err = await failure(make_api(answer(200, content=b"[" * 60000)).get_result("abc"))
    assert err.code == "provider_unavailable"


@pytest.mark.parametrize("status", [200, 201])
async def test_get_result_sends_documented_request(status: int) -> None:
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=RESULT_BODY)

    assert await make_api(handler).get_result("a&b=c d") == RESULT_BODY
    (request,) = seen
    assert request.method == "GET"
    assert request.url.copy_with(query=None) == httpx.URL(RESULT_URL)
    assert request.url.params.multi_items() == [("sessionUuid", "a&b=c d")]
    assert request.headers["x-api-key"] == API_KEY
    assert request.headers["authorization"] == f"Basic {API_SECRET}"
    assert request.content == b""


@pytest.mark.parametrize(
    ("handler", "code"),
    [
        (answer(400, {"code": 30001}), "provider_rejected"),
        (answer(403, {"message": "forbidden"}), "provider_rejected"),
        (answer(404, None), "provider_rejected"),
        (answer(500, RESULT_BODY), "provider_unavailable"),
        (answer(502, content=b"bad gateway"), "provider_unavailable"),
        (answer(200, content=b"{not json"), "provider_unavailable"),
        (answer(200, content=b""), "provider_unavailable"),
    ],
    ids=["400", "403", "404", "500", "502", "bad-json", "empty"],
)
async def test_get_result_failures(handler: Handler, code: str) -> None:
    err = await failure(make_api(handler).get_result("abc"))
    assert err.code == code


async def test_get_result_returns_any_json_undecoded() -> None:
    assert await make_api(answer(200, ["odd"])).get_result("abc") == ["odd"]


async def test_total_deadline_covers_a_provider_that_never_answers() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    err = await failure(make_api(handler, timeout=0.05).get_result("abc"))
    assert err.code == "provider_unavailable"
