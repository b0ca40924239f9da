"""A fake Veriph.One server API (create-session, verification-result v1.0.0) as a Starlette app.

Written from the provider's documentation (see PROVIDERS.md), not from the gateway's client,
so the gateway's requests are checked against the documented shape.

    app = create_fake_veriphone("key", "secret", public_url="https://fake-veriph.test")
    fake = fake_state(app)
    ...POST /v1/sessions through the gateway...
    fake.complete(uuid)                        # the user verified (status 8192, OTP SMS)
    fake.complete(uuid, status=4352)           # ... or cancelled
    fake.fail_result = 500                     # the provider is down
    assert fake.result_count(uuid) == 1

Every knob is a plain attribute of `FakeVeriphoneState` (documented there); nothing is
global, so each app has its own state. The sandbox mounts the same app and adds a human page
that calls `complete()`.
"""

from __future__ import annotations

import asyncio
import json
import uuid as uuidlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import phonenumbers
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

CREATE_SESSION_PATH = "/sdk-api/phone-verification/create-session/v1.0.0"
RESULT_PATH = "/sdk-api/phone-verification/verification-result/v1.0.0"
VERIFY_PATH_PREFIX = "/verify/"  # redirectionUrl = public_url + VERIFY_PATH_PREFIX + uuid

CODE_METADATA_MISSING = 14226
CODE_INVALID_COUNTRY_CODE = 20000
CODE_INVALID_PHONE_NUMBER = 20001

STATUS_SUCCESS = 8192
ERROR_BITS = 8191  # bits 0-12: the has-errors bit and every error bit
METHOD_OTP_SMS = 20
DEFAULT_PHONE = "+14155550100"  # who "verifies" when a session had no prefilled number


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Call:
    """One request the fake received, recorded before any validation."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    query: dict[str, str]
    body: object  # parsed JSON, or None when the body was empty or not JSON


@dataclass
class FakeAttempt:
    uuid: str
    country_code: str
    phone_number: str
    method: int
    status: int
    created_at: str


@dataclass
class FakeSession:
    uuid: str
    created_at: str
    metadata: dict[str, Any]
    configuration: dict[str, Any]
    prefilled: tuple[str, str] | None  # (countryCode, cellphoneNumber) as sent
    attempts: list[FakeAttempt] = field(default_factory=list)
    closed_at: str | None = None


class FakeVeriphoneState:
    """What the fake knows and how it misbehaves; tests and the sandbox set the attributes directly.

    Knobs (all off by default):
    - `fail_create` / `fail_result`: answer that endpoint with this HTTP status (e.g. 500, 400).
    - `fail_create_code`: the provider error code put in the body of a `fail_create` answer.
    - `result_http_status`: the success status of verification-result, 200 or 201 (both documented).
    - `numbers_as_strings`: send attempt `status` and `method` as strings, as some answers do.
    - `delay`: seconds every answer waits (a slow provider).
    - `hold`: when set to an `asyncio.Event`, every answer waits until the event is set.
    Records: `create_calls`, `result_calls` (every request, valid or not), `sessions` by uuid.
    """

    sessions: dict[str, FakeSession]
    create_calls: list[Call]
    result_calls: list[Call]
    fail_create: int | None
    fail_create_code: int | None
    fail_result: int | None
    result_http_status: int
    numbers_as_strings: bool
    delay: float
    hold: asyncio.Event | None

    def __init__(self, api_key: str, api_secret: str, public_url: str) -> None:
        self.api_key = api_key
        self.api_secret = api_secret
        self.public_url = public_url.rstrip("/")
        self._calls_changed = asyncio.Condition()
        self.hold = None
        self.reset()

    def reset(self) -> None:
        """Forget every session and request, and turn every knob off (credentials stay)."""
        if self.hold is not None:
            self.hold.set()  # release requests still waiting on the old hold
        self.sessions = {}
        self.create_calls = []
        self.result_calls = []
        self.fail_create = None
        self.fail_create_code = None
        self.fail_result = None
        self.result_http_status = 200
        self.numbers_as_strings = False
        self.delay = 0.0
        self.hold = None

    def complete(
        self, session_uuid: str, *, status: int = STATUS_SUCCESS, method: int = METHOD_OTP_SMS, phone: str | None = None
    ) -> FakeAttempt:
        """Record an attempt as if the user went through the flow; `phone` defaults to the prefilled one."""
        session = self.sessions[session_uuid]
        if phone is None:
            country_code, national = session.prefilled or _split(DEFAULT_PHONE)
        else:
            country_code, national = _split(phone)
        attempt = FakeAttempt(str(uuidlib.uuid4()), country_code, national, method, status, _now())
        session.attempts.append(attempt)
        if status != 0:
            session.closed_at = attempt.created_at
        return attempt

    def result_count(self, session_uuid: str | None = None) -> int:
        """How many verification-result requests arrived (for one uuid, or in all)."""
        return sum(1 for c in self.result_calls if session_uuid is None or c.query.get("sessionUuid") == session_uuid)

    async def wait_result_calls(self, count: int, timeout: float = 5.0) -> None:
        """Wait until at least `count` verification-result requests arrived; TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout), self._calls_changed:
            await self._calls_changed.wait_for(lambda: len(self.result_calls) >= count)

    def result_body(self, session: FakeSession) -> dict[str, Any]:
        """The verification-result v1.0.0 body; optional fields are left out when they have no value."""
        attempts = [self._attempt_json(a) for a in session.attempts]
        first = next((j for a, j in zip(session.attempts, attempts, strict=True) if a.status & STATUS_SUCCESS), None)
        body: dict[str, Any] = {"createdAt": session.created_at, "userId": session.metadata.get("userId")}
        if session.prefilled is not None:
            body["prefilledCountryCode"], body["prefilledPhoneNumber"] = session.prefilled
        if session.closed_at is not None:
            body["closedAt"] = session.closed_at
        body["firstSuccessfulAttempt"] = first
        body["attempts"] = attempts
        return body

    def _attempt_json(self, attempt: FakeAttempt) -> dict[str, Any]:
        number: type[str] | type[int] = str if self.numbers_as_strings else int
        return {
            "uuid": attempt.uuid,
            "countryCodeInput": attempt.country_code,
            "phoneNumberInput": attempt.phone_number,
            "method": number(attempt.method),
            "status": number(attempt.status),
            "createdAt": attempt.created_at,
        }

    async def _record(self, calls: list[Call], request: Request) -> Call:
        raw = await request.body()
        try:
            body: object = json.loads(raw) if raw else None
        except ValueError:
            body = None
        call = Call(request.method, request.url.path, dict(request.headers), dict(request.query_params), body)
        async with self._calls_changed:
            calls.append(call)
            self._calls_changed.notify_all()
        # The knobs tests turn to make the provider stall or lag, for every endpoint alike.
        if self.hold is not None:
            await self.hold.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        return call


def _split(phone: str) -> tuple[str, str]:
    number = phonenumbers.parse(phone, None)
    return str(number.country_code), phonenumbers.national_significant_number(number)


def _error(status: int, code: int | None, message: str) -> JSONResponse:
    body: dict[str, Any] = {"message": message}
    if code is not None:
        body["code"] = code
    return JSONResponse(body, status_code=status)


def _metadata_ok(value: object) -> bool:
    if not isinstance(value, dict):
        return False
    return all(isinstance(value.get(k), str) for k in ("userId", "userAgent", "ipAddress")) and bool(value["userId"])


def _prefilled_error(value: object) -> JSONResponse | None:
    if not isinstance(value, dict):
        return _error(400, CODE_INVALID_PHONE_NUMBER, "prefilledPhoneNumber must be an object")
    country_code = value.get("countryCode")
    if (
        not isinstance(country_code, str)
        or not country_code.isdigit()
        or not 1 <= len(country_code) <= 3
        or phonenumbers.region_code_for_country_code(int(country_code)) == "ZZ"
    ):
        return _error(400, CODE_INVALID_COUNTRY_CODE, "invalid country code")
    national = value.get("cellphoneNumber")
    if not isinstance(national, str) or not national.isdigit() or not 4 <= len(national) <= 14:
        return _error(400, CODE_INVALID_PHONE_NUMBER, "invalid phone number")
    return None


def create_fake_veriphone(api_key: str, api_secret: str, *, public_url: str) -> Starlette:
    """A fresh fake with its own state (reach it with `fake_state(app)`)."""
    state = FakeVeriphoneState(api_key, api_secret, public_url)

    async def create_session(request: Request) -> Response:
        call = await state._record(state.create_calls, request)
        if state.fail_create is not None:
            return _error(state.fail_create, state.fail_create_code, "failure set on the fake")
        if call.headers.get("x-api-key") != state.api_key:
            return _error(400, None, "invalid API key")
        body = call.body
        if not isinstance(body, dict):
            return _error(400, None, "the body must be a JSON object")
        if not _metadata_ok(body.get("metadata")):
            return _error(400, CODE_METADATA_MISSING, "metadata is required")
        prefilled: tuple[str, str] | None = None
        if "prefilledPhoneNumber" in body:
            problem = _prefilled_error(body["prefilledPhoneNumber"])
            if problem is not None:
                return problem
            prefilled = (body["prefilledPhoneNumber"]["countryCode"], body["prefilledPhoneNumber"]["cellphoneNumber"])
        configuration = body.get("configuration")
        session = FakeSession(
            uuid=str(uuidlib.uuid4()),
            created_at=_now(),
            metadata=dict(body["metadata"]),
            configuration=dict(configuration) if isinstance(configuration, dict) else {},
            prefilled=prefilled,
        )
        state.sessions[session.uuid] = session
        return JSONResponse(
            {
                "uuid": session.uuid,
                "createdAt": session.created_at,
                "redirectionUrl": state.public_url + VERIFY_PATH_PREFIX + session.uuid,
            }
        )

    async def verification_result(request: Request) -> Response:
        call = await state._record(state.result_calls, request)
        if state.fail_result is not None:
            return _error(state.fail_result, None, "failure set on the fake")
        # The secret goes raw after "Basic ", not base64(user:pass): that is what the docs say.
        if (
            call.headers.get("x-api-key") != state.api_key
            or call.headers.get("authorization") != f"Basic {state.api_secret}"
        ):
            return _error(401, None, "Unauthorized")
        session = state.sessions.get(call.query.get("sessionUuid", ""))
        if session is None:
            return _error(404, None, "session not found")
        return JSONResponse(state.result_body(session), status_code=state.result_http_status)

    app = Starlette(
        routes=[
            Route(CREATE_SESSION_PATH, create_session, methods=["POST"]),
            Route(RESULT_PATH, verification_result, methods=["GET"]),
        ]
    )
    app.state.fake = state
    return app


def fake_state(app: Starlette) -> FakeVeriphoneState:
    """The state of an app made by `create_fake_veriphone`."""
    state = app.state.fake
    assert isinstance(state, FakeVeriphoneState)
    return state
