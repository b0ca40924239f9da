"""A fake Truecaller profile host (`GET /v1/default`) and a stand-in for Truecaller's server.

Written from the provider's documentation (see PROVIDERS.md), not from the gateway's client:
profiles come in the inconsistent real shapes (phone numbers as int or string, `isActive`
as "True", optional fields absent), and unknown tokens get the documented 401 body.

    app, fake = create_fake_truecaller()
    token = fake.issue_token("+919999999999", "Asha", "Rao", "asha@example.in", "IN")
    await post_callback(http, gateway_url + "/v1/callbacks/truecaller", nonce, token, fake_url + PROFILE_PATH)
    fake.fail_times = 2          # the next two profile requests answer 500
    fake.hold = asyncio.Event()  # profile requests wait until it is set
    assert fake.request_count == 1

Every knob is a plain attribute of `FakeTruecallerState`; nothing is global, so each app has
its own state. The sandbox mounts the same app and plays Truecaller's server with
`post_callback` / `post_status`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

PROFILE_PATH = "/v1/default"
UNAUTHORIZED = {"status": 40101, "message": "Unauthorized"}


@dataclass(frozen=True)
class FakeUser:
    phone: str  # E.164
    first: str | None
    last: str | None
    email: str | None
    country: str | None  # ISO 3166 alpha-2
    odd_types: bool  # string phone numbers, "True" for isActive, string userId


@dataclass(frozen=True)
class ProfileRequest:
    """One profile request the fake received, recorded before anything else."""

    path: str
    headers: dict[str, str]  # lower-case names


class FakeTruecallerState:
    """Users by token, how the fake misbehaves, and what it saw; tests set the attributes directly.

    Knobs (all off by default):
    - `fail_times`: the next N profile requests answer `fail_status` (500); counts down.
    - `fail_status`: the status of those failures.
    - `delay`: seconds every profile answer waits (a slow host).
    - `hold`: when set to an `asyncio.Event`, profile requests wait until it is set.
    Records: `requests` (every profile request, authorised or not), `served` (200 answers).
    """

    def __init__(self) -> None:
        self.users: dict[str, FakeUser] = {}
        self.requests: list[ProfileRequest] = []
        self.served = 0
        self.fail_times = 0
        self.fail_status = 500
        self.delay = 0.0
        self.hold: asyncio.Event | None = None
        self._changed = asyncio.Condition()

    def issue_token(
        self,
        phone: str,
        first: str | None = "Asha",
        last: str | None = "Rao",
        email: str | None = None,
        country: str | None = None,
        odd_types: bool = True,
    ) -> str:
        """A new access token that reads the profile of this user (as if the user tapped Continue)."""
        token = "a1a" + secrets.token_urlsafe(24)
        self.users[token] = FakeUser(phone, first, last, email, country, odd_types)
        return token

    def revoke(self, token: str) -> None:
        """Make the token unknown: the next fetch with it gets 401 (an expired token)."""
        self.users.pop(token, None)

    @property
    def request_count(self) -> int:
        return len(self.requests)

    async def wait_requests(self, count: int, timeout: float = 5.0) -> None:
        """Wait until at least `count` profile requests arrived; TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.requests) >= count)

    def profile(self, user: FakeUser) -> dict[str, Any]:
        """The profile JSON in the documented (inconsistent) shape; absent values are left out."""
        digits = user.phone.removeprefix("+")
        body: dict[str, Any] = {
            "id": secrets.token_urlsafe(12),
            "userId": str(secrets.randbelow(10**12)) if user.odd_types else secrets.randbelow(10**12),
            "phoneNumbers": [digits] if user.odd_types else [int(digits)],
            "isActive": "True" if user.odd_types else True,
            "badges": [],
            "createdTime": int(time.time()),
        }
        name = {k: v for k, v in (("first", user.first), ("last", user.last)) if v is not None}
        if name:
            body["name"] = name
        if user.email is not None:
            body["onlineIdentities"] = {"email": user.email}
        if user.country is not None:
            body["addresses"] = [{"countryCode": user.country.lower(), "city": "Bengaluru"}]
        return body

    async def _record(self, request: Request) -> None:
        async with self._changed:
            self.requests.append(ProfileRequest(request.url.path, dict(request.headers)))
            self._changed.notify_all()


def create_fake_truecaller() -> tuple[Starlette, FakeTruecallerState]:
    """A fresh fake profile host and its state."""
    state = FakeTruecallerState()

    async def profile(request: Request) -> Response:
        await state._record(request)
        if state.hold is not None:
            await state.hold.wait()
        if state.delay:
            await asyncio.sleep(state.delay)
        if state.fail_times > 0:
            state.fail_times -= 1
            failure = {"status": state.fail_status * 100, "message": "failure set on the fake"}
            return JSONResponse(failure, status_code=state.fail_status)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        user = state.users.get(token) if scheme == "Bearer" else None
        if user is None:
            return JSONResponse(UNAUTHORIZED, status_code=401)
        state.served += 1
        return JSONResponse(state.profile(user))

    app = Starlette(routes=[Route(PROFILE_PATH, profile, methods=["GET"])])
    app.state.fake = state
    return app, state


async def post_callback(
    http: httpx.AsyncClient, gateway_callback_url: str, request_id: str, token: str, endpoint: str
) -> httpx.Response:
    """Play Truecaller's server after the user tapped Continue: POST the token callback."""
    body = {"requestId": request_id, "accessToken": token, "endpoint": endpoint}
    return await http.post(gateway_callback_url, json=body)


async def post_status(
    http: httpx.AsyncClient, gateway_callback_url: str, request_id: str, status: str
) -> httpx.Response:
    """Play Truecaller's server reporting a status (`flow_invoked`, `user_rejected`, `use_another_number`)."""
    return await http.post(gateway_callback_url, json={"requestId": request_id, "status": status})
