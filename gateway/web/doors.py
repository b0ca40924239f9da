"""How a request reaches its endpoint: errors as JSON, and the doors that let the hot routes skip layers.

Thousands of streams wait at once, and every layer a request passes keeps a suspended frame
alive for the stream's whole life and costs CPU when it opens. So `GatewayApp` sends a
stream straight to its endpoint, and the two other requests of every verification (a new
session, a Truecaller callback) through an `EndpointDoor` when they carry no `Origin`.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import ApiError, StorageError
from gateway.web.accesslog import route_template
from gateway.web.stream import is_stream_request

log = logging.getLogger("gateway")


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.to_json(), status_code=exc.status_code, headers=exc.headers or None)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse(
        {"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code, headers=exc.headers
    )


async def internal_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, StorageError):
        # Not a bug of the request: the disk or the file failed. Nothing was committed.
        log.error("database failure on %s", route_template(request.scope), exc_info=exc)
        return JSONResponse(
            {"error": {"code": "database_unavailable", "message": "the database could not be written or read; retry"}},
            status_code=503,
        )
    # The route template, never the path: the path holds the session id, personal data.
    log.error("unhandled error on %s", route_template(request.scope), exc_info=exc)
    return JSONResponse(
        {"error": {"code": "internal_error", "message": "the gateway hit a bug; it has been logged"}},
        status_code=500,
    )


class StreamDoor:
    """Hands a stream request to its endpoint with the route set, as the router would."""

    def __init__(self, route: Route) -> None:
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route  # the access log names the route template, never the path
        await self.route.app(scope, receive, send)


class EndpointDoor:
    """Runs one request/response route without Starlette's error, CORS and router layers.

    Used for the requests every verification makes, only when they carry no `Origin` header
    (the site's backend creating a session, the provider's server calling back); a browser's
    request takes the full stack with its CORS handling. It does what those layers do for
    such a request: the route for the access log, errors as JSON, `Vary: Origin`.
    """

    def __init__(self, route: Route) -> None:
        self.route = route
        self.endpoint = route.endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route
        request = Request(scope, receive)
        try:
            response = await self.endpoint(request)
        except ApiError as exc:
            response = await api_error(request, exc)
        except HTTPException as exc:
            response = await http_error(request, exc)
        except Exception as exc:
            response = await internal_error(request, exc)
        response.raw_headers.append((b"vary", b"Origin"))  # as CORSMiddleware adds to every answer
        await response(scope, receive, send)


# The routes every verification calls, besides its stream: they take an EndpointDoor.
HOT_PATHS = {("POST", "/v1/sessions"), ("POST", "/v1/callbacks/truecaller")}


def _has_origin(scope: Scope) -> bool:
    return any(name == b"origin" for name, _ in scope["headers"])


class GatewayApp(Starlette):
    """Starlette, except that the hot routes skip the error, CORS and router layers.

    Thousands of streams wait at once; each layer they pass keeps a suspended frame alive
    for the stream's whole life and costs CPU when it opens. The stream endpoint
    answers its own errors, CORS and 404s. The other hot routes go through an EndpointDoor.
    """

    def __init__(self, stream_app: ASGIApp, doors: dict[str, ASGIApp], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stream_app = stream_app
        self.doors = doors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if is_stream_request(scope):
            scope["app"] = self
            await self.stream_app(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "POST":
            door = self.doors.get(scope["path"])
            if door is not None and not _has_origin(scope):
                scope["app"] = self
                await door(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
