"""The application's HTTP API: create, read and stream sessions; health checks."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

import phonenumbers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.broker import CLOSED
from gateway.errors import BadRequest, Conflict, NotFound
from gateway.jsonbody import read_json_object
from gateway.providers.base import Prepared
from gateway.sessions import PROVIDERS, Session, new_session_id
from gateway.stream import PATH_TEMPLATE, EventStreamEndpoint

if TYPE_CHECKING:
    from gateway.app import Gateway

_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
CREATE_FIELDS = ("provider", "phone", "user_ref")


def gateway_of(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


def parse_phone(value: object) -> str | None:
    """An optional E.164 number: `+` and 7–15 digits that libphonenumber finds possible."""
    if value is None:
        return None
    if not isinstance(value, str) or not _E164.fullmatch(value):
        raise BadRequest("invalid_phone", "phone must be an E.164 number such as +15551234567")
    try:
        possible = phonenumbers.is_possible_number(phonenumbers.parse(value, None))
    except phonenumbers.NumberParseException:
        possible = False
    if not possible:
        raise BadRequest("invalid_phone", "phone is not a possible number for its country code")
    return value


def parse_user_ref(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 128 or not value.isprintable():
        raise BadRequest("invalid_user_ref", "user_ref must be a printable string of 1 to 128 characters")
    return value


async def start_session(
    gw: Gateway, provider_name: object, phone: object, user_ref: object, request: Request
) -> tuple[Session, Prepared]:
    """Validate, let the provider prepare, then store: the one way a session comes to exist."""
    if provider_name not in PROVIDERS:
        raise BadRequest("invalid_provider", 'provider must be "truecaller" or "veriphone"')
    checked_phone = parse_phone(phone)
    checked_user_ref = parse_user_ref(user_ref)
    provider = gw.providers.get(str(provider_name))
    if provider is None:
        raise Conflict("provider_disabled", f"the {provider_name} provider is disabled in this gateway's config")
    session_id = new_session_id()
    # The provider is called before the insert, so a provider failure leaves nothing stored.
    prepared = await provider.prepare(
        session_id=session_id, phone=checked_phone, user_ref=checked_user_ref, request=request
    )
    session = await gw.sessions.create(
        session_id=session_id,
        provider=provider.name,
        ttl=prepared.ttl,
        phone=checked_phone,
        user_ref=checked_user_ref,
        provider_ref=prepared.provider_ref,
        provider_data=prepared.data,
    )
    gw.metrics.session_created(provider.name)
    return session, prepared


async def create_session(request: Request) -> Response:
    gw = gateway_of(request)
    body = await read_json_object(request, fields=CREATE_FIELDS)
    session, prepared = await start_session(gw, body.get("provider"), body.get("phone"), body.get("user_ref"), request)
    answer: dict[str, Any] = session.snapshot()
    del answer["outcome"], answer["updated_at"]
    answer["stream_url"] = f"/v1/sessions/{session.id}/events"
    answer["status_url"] = f"/v1/sessions/{session.id}"
    answer[session.provider] = prepared.public
    return JSONResponse(answer, status_code=201, headers={"cache-control": "no-store"})


async def _load(gw: Gateway, request: Request) -> Session:
    session_id = request.path_params["session_id"]
    session = await gw.sessions.get(session_id) if _SESSION_ID.fullmatch(session_id) else None
    if session is None:
        raise NotFound("session_not_found", "no session with this id")
    return session


async def read_session(request: Request) -> Response:
    gw = gateway_of(request)
    wait = _parse_wait(request.query_params.get("wait"), gw.settings.polling.max_wait)
    if wait <= 0:
        session = await _load(gw, request)
        return JSONResponse(session.snapshot(), headers={"cache-control": "no-store"})
    # Subscribe before reading, so an outcome written in between is not missed.
    sub = gw.broker.subscribe(request.path_params["session_id"])
    try:
        session = await _load(gw, request)
        deadline = time.monotonic() + wait
        while not session.terminal:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            why = await sub.wait(left)
            if why == CLOSED:
                break
            if any(e.kind == "outcome" for e in sub.drain()):
                session = await _load(gw, request)
    finally:
        sub.close("done")
    return JSONResponse(session.snapshot(), headers={"cache-control": "no-store"})


def _parse_wait(raw: str | None, cap: float) -> float:
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait < float("inf"):
        raise BadRequest("invalid_wait", "wait must be a number of seconds >= 0")
    return min(wait, cap)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    gw = gateway_of(request)
    try:
        await gw.db.fetchone("SELECT 1")
    except Exception:
        return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)
    if gw.shutting_down:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    return JSONResponse({"status": "ready"})


def routes(gw: Gateway) -> list[BaseRoute]:
    return [
        Route("/v1/sessions", create_session, methods=["POST"]),
        Route("/v1/sessions/{session_id}", read_session, methods=["GET"]),
        Route(PATH_TEMPLATE, EventStreamEndpoint(gw), methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
