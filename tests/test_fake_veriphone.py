"""The fake Veriph.One API behaves as documented, so flow tests against it mean something."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway.providers.veriphone.fake import create_fake_veriphone, fake_state

CREATE = "/sdk-api/phone-verification/create-session/v1.0.0"
RESULT = "/sdk-api/phone-verification/verification-result/v1.0.0"
KEY = {"x-api-key": "k"}
AUTH = {"x-api-key": "k", "authorization": "Basic s"}
META = {"userId": "u", "userAgent": "ua", "ipAddress": "203.0.113.1"}


def client() -> tuple[httpx.AsyncClient, Any]:
    app = create_fake_veriphone("k", "s", public_url="https://fake.test/")
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fake"), fake_state(app)


async def test_create_session_answers_uuid_and_redirection_url() -> None:
    http, state = client()
    response = await http.post(CREATE, headers=KEY, json={"metadata": META})
    assert response.status_code == 200
    body = response.json()
    assert body["redirectionUrl"] == f"https://fake.test/verify/{body['uuid']}"
    assert set(body) == {"uuid", "createdAt", "redirectionUrl"}
    assert state.sessions[body["uuid"]].metadata == META


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({"x-api-key": "wrong"}, {"metadata": META}, 400, None),
        ({}, {"metadata": META}, 400, None),
        (KEY, {}, 400, 14226),
        (KEY, {"metadata": {"userId": "u"}}, 400, 14226),
        (
            KEY,
            {"metadata": META, "prefilledPhoneNumber": {"countryCode": "999", "cellphoneNumber": "5551234"}},
            400,
            20000,
        ),
        (KEY, {"metadata": META, "prefilledPhoneNumber": {"countryCode": "1", "cellphoneNumber": "55-5"}}, 400, 20001),
    ],
)
async def test_create_session_validates(headers: dict[str, str], body: object, status: int, code: int | None) -> None:
    http, state = client()
    response = await http.post(CREATE, headers=headers, json=body)
    assert response.status_code == status
    assert response.json().get("code") == code
    assert state.sessions == {}
    assert len(state.create_calls) == 1


async def test_result_requires_key_and_raw_secret() -> None:
    http, state = client()
    uuid = (await http.post(CREATE, headers=KEY, json={"metadata": META})).json()["uuid"]
    for headers in (KEY, {"x-api-key": "k", "authorization": "Basic czpz"}, {"authorization": "Basic s"}):
        response = await http.get(RESULT, params={"sessionUuid": uuid}, headers=headers)
        assert response.status_code == 401
    assert (await http.get(RESULT, params={"sessionUuid": "nope"}, headers=AUTH)).status_code == 404
    assert state.result_count(uuid) == 3
    assert state.result_count() == 4


async def test_result_body_follows_the_attempts() -> None:
    http, state = client()
    prefilled = {"countryCode": "44", "cellphoneNumber": "7700900123", "userCanEdit": False}
    uuid = (await http.post(CREATE, headers=KEY, json={"metadata": META, "prefilledPhoneNumber": prefilled})).json()[
        "uuid"
    ]

    open_body = (await http.get(RESULT, params={"sessionUuid": uuid}, headers=AUTH)).json()
    assert open_body["firstSuccessfulAttempt"] is None
    assert open_body["attempts"] == []
    assert "closedAt" not in open_body
    assert (open_body["prefilledCountryCode"], open_body["prefilledPhoneNumber"]) == ("44", "7700900123")

    state.complete(uuid, status=4352)
    state.complete(uuid, method=11)
    state.result_http_status = 201
    state.numbers_as_strings = True
    response = await http.get(RESULT, params={"sessionUuid": uuid}, headers=AUTH)
    assert response.status_code == 201
    body = response.json()
    cancelled, verified = body["attempts"]
    assert cancelled["status"] == "4352"
    assert body["firstSuccessfulAttempt"] == verified
    assert (verified["countryCodeInput"], verified["phoneNumberInput"]) == ("44", "7700900123")
    assert (verified["status"], verified["method"]) == ("8192", "11")
    assert "closedAt" in body


async def test_failures_and_reset() -> None:
    http, state = client()
    state.fail_create, state.fail_create_code = 403, 7
    response = await http.post(CREATE, headers=KEY, json={"metadata": META})
    assert (response.status_code, response.json()["code"]) == (403, 7)
    state.fail_result = 500
    assert (await http.get(RESULT, params={"sessionUuid": "x"}, headers=AUTH)).status_code == 500
    state.reset()
    assert (state.create_calls, state.result_calls, state.fail_create, state.fail_result) == ([], [], None, None)
    assert (await http.post(CREATE, headers=KEY, json={"metadata": META})).status_code == 200
