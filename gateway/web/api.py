"""The application's HTTP API: create, read and stream sessions; health checks."""

from __future__ import annotations

import asyncio
import re
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.admission import BUSY_RETRY_AFTER
from gateway.broker import CLOSED
from gateway.errors import BadRequest, NotFound, TooManyRequests, Unavailable
from gateway.limits import Slots
from gateway.records import Session
from gateway.starter import created_answer
from gateway.web.client import client_of, request_client_ip
from gateway.web.context import Gateway, gateway_of
from gateway.web.jsonbody import read_json_object
from gateway.web.stream import PATH_TEMPLATE, EventStreamEndpoint

_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
CREATE_FIELDS = ("provider", "phone", "user_ref")
_RETRY_AFTER = {"retry-after": str(BUSY_RETRY_AFTER)}


async def create_session(request: Request) -> Response:
    gw = gateway_of(request)
    # Before the body is read: a caller without the credential learns nothing else.
    credential = gw.starter.auth.identify(request.headers.get("authorization"))
    body = await read_json_object(request, fields=CREATE_FIELDS)
    client = client_of(request, gw.trusted_proxies)
    fields = body.get("provider"), body.get("phone"), body.get("user_ref")
    key = request.headers.get("idempotency-key")
    if key is None:
        session, prepared = await gw.starter.start(*fields, client, credential=credential)
        return JSONResponse(created_answer(session, prepared), status_code=201, headers={"cache-control": "no-store"})
    answer, replayed = await gw.starter.start_once(key, *fields, client, credential)
    headers = {"cache-control": "no-store"}
    if replayed:
        headers["idempotent-replayed"] = "true"
    return JSONResponse(answer, status_code=201, headers=headers)


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
    if not gw.admission.enabled:
        return await _long_poll(gw, request, wait)
    polls = gw.admission.limits.long_polls
    key = gw.admission.limits.ip_key(request_client_ip(request, gw.trusted_proxies))
    refused = polls.acquire(key)
    if refused == Slots.PER_KEY:
        gw.metrics.limited("long_polls_per_ip")
        raise TooManyRequests("rate_limited", "too many waiting requests from this address", _RETRY_AFTER)
    if refused is not None:
        gw.metrics.limited("long_polls_total")
        raise Unavailable("server_busy", "the gateway has too many waiting requests; retry shortly", _RETRY_AFTER)
    try:
        return await _long_poll(gw, request, wait)
    finally:
        polls.release(key)


async def _long_poll(gw: Gateway, request: Request, wait: float) -> Response:
    # Subscribe before reading, so an outcome written in between is not missed.
    sub = gw.broker.subscribe(request.path_params["session_id"])
    # A client that goes away ends its wait at once (and so frees its long-poll slot).
    gone = asyncio.ensure_future(_disconnected(request))
    gone.add_done_callback(lambda _: sub.close("gone"))
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
        gone.cancel()
    return JSONResponse(session.snapshot(), headers={"cache-control": "no-store"})


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


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
        await gw.store.ping()
    except Exception:
        return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)
    # On a shared database, a process whose event feed is down cannot push what others commit.
    listener = gw.store.listener_ok()
    feed = {} if listener is None else {"listener": "up" if listener else "down"}
    if listener is False:
        return JSONResponse({"status": "unavailable", "database": "ok", **feed}, status_code=503)
    if gw.shutting_down:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    return JSONResponse({"status": "ready", "database": "ok", **feed})


def routes(gw: Gateway) -> list[BaseRoute]:
    return [
        Route("/v1/sessions", create_session, methods=["POST"]),
        Route("/v1/sessions/{session_id}", read_session, methods=["GET"]),
        Route(PATH_TEMPLATE, EventStreamEndpoint(gw), methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
