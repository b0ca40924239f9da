"""The application's HTTP API: create, read and stream sessions; health checks."""

from __future__ import annotations

import re
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.broker import CLOSED
from gateway.errors import BadRequest, NotFound
from gateway.records import Session
from gateway.starter import created_answer
from gateway.web.client import client_of
from gateway.web.context import Gateway, gateway_of
from gateway.web.jsonbody import read_json_object
from gateway.web.stream import PATH_TEMPLATE, EventStreamEndpoint

_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
CREATE_FIELDS = ("provider", "phone", "user_ref")


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
        await gw.store.ping()
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
