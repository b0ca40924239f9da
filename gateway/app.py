"""The app factory: the lifespan owns every resource and hands it to routes via app.state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import api, demo  # issue 5: demo
from gateway.accesslog import AccessLog, route_template
from gateway.broker import Broker
from gateway.config import Settings
from gateway.errors import ApiError, StorageError
from gateway.memory import MemoryReleaser
from gateway.metrics import Metrics
from gateway.providers.base import Provider
from gateway.providers.profile_client import ProfileClient
from gateway.providers.truecaller import Truecaller
from gateway.providers.veriphone import Veriphone
from gateway.retention import Retention
from gateway.sessions import Sessions
from gateway.storage import Database
from gateway.stream import PATH_TEMPLATE, is_stream_request

log = logging.getLogger("gateway")


class Gateway:
    """Everything a request handler may need, created and closed by the lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db = Database(settings.database.path, settings.database.busy_timeout)
        self.broker = Broker(settings.stream.buffer)
        self.sessions = Sessions(self.db, self.broker)
        self.metrics = Metrics()
        self.sessions.on_outcome = self.metrics.outcome
        self.db.on_write_seconds = self.metrics.db_write_seconds.observe  # issue 7: metrics
        self.retention = Retention(self.db, settings.sessions.retention, clock=self.sessions.clock)  # issue 7
        self.memory = MemoryReleaser(self.broker)
        self.http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        self.profile_http = ProfileClient()  # the Truecaller profile fetch: leaner than httpx on the hot path
        self.providers: dict[str, Provider] = {}
        if settings.providers.truecaller.enabled:
            self.providers["truecaller"] = Truecaller(self)
        if settings.providers.veriphone.enabled:
            self.providers["veriphone"] = Veriphone(self)
        self.shutting_down = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run background work that shutdown waits for (callback follow-ups, fetches)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    def begin_shutdown(self) -> None:
        """Stop taking long waits: close every stream so browsers reconnect elsewhere."""
        self.shutting_down = True
        self.broker.close_all("shutdown")

    async def start(self) -> None:
        await self.db.open()
        # Providers first: work a restart interrupted (a stored Truecaller token) decides its
        # session's outcome before the expiry task may call it a timeout.
        for provider in self.providers.values():
            await provider.startup()
        self._expiry = asyncio.create_task(self.sessions.run_expiry(), name="expiry")
        self._retention = asyncio.create_task(self.retention.run(), name="retention")  # issue 7
        self._memory = asyncio.create_task(self.memory.run(), name="memory")

    async def stop(self) -> None:
        self.begin_shutdown()
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=self.settings.server.shutdown_timeout)
            for task in late:
                task.cancel()
            if late:
                log.warning("shutdown: %d background tasks did not finish in time", len(late))
        for periodic in (self._expiry, self._retention, self._memory):  # issue 7: retention joins expiry
            periodic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await periodic
        await self.http.aclose()
        await self.profile_http.aclose()
        await self.db.close()


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.to_json(), status_code=exc.status_code)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return JSONResponse(
        {"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code, headers=exc.headers
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, StorageError):
        # Not a bug of the request: the disk or the file failed. Nothing was committed.
        log.error("database failure on %s", route_template(request.scope), exc_info=exc)
        return JSONResponse(
            {"error": {"code": "database_unavailable", "message": "the database could not be written or read; retry"}},
            status_code=503,
        )
    # The route template, never the path: it holds the session id (issue 7).
    log.error("unhandled error on %s", route_template(request.scope), exc_info=exc)
    return JSONResponse(
        {"error": {"code": "internal_error", "message": "the gateway hit a bug; it has been logged"}},
        status_code=500,
    )


async def _metrics(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    gw.metrics.open_streams.set(gw.broker.count())
    return Response(gw.metrics.render(), media_type=gw.metrics.content_type)


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
            response = await _api_error(request, exc)
        except HTTPException as exc:
            response = await _http_error(request, exc)
        except Exception as exc:
            response = await _internal_error(request, exc)
        response.raw_headers.append((b"vary", b"Origin"))  # as CORSMiddleware adds to every answer
        await response(scope, receive, send)


# The routes of a verification's hot path that take an EndpointDoor (issue 6).
HOT_PATHS = {("POST", "/v1/sessions"), ("POST", "/v1/callbacks/truecaller")}


def _has_origin(scope: Scope) -> bool:
    return any(name == b"origin" for name, _ in scope["headers"])


class GatewayApp(Starlette):
    """Starlette, except that the hot routes skip the error, CORS and router layers.

    Thousands of streams wait at once; each layer they pass keeps a suspended frame alive
    for the stream's whole life and costs CPU when it opens (issue 6). The stream endpoint
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


def create_app(settings: Settings) -> Starlette:
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    routes: list[BaseRoute] = api.routes(gateway)
    stream_route = next(r for r in routes if isinstance(r, Route) and r.path == PATH_TEMPLATE)
    for provider in gateway.providers.values():
        routes += provider.routes()
    # issue 5: /demo only when enabled (ahead of /static, which must not serve the raw page);
    # the fake providers only with --sandbox, imported lazily so production never loads them.
    routes += demo.routes(settings)
    if settings.sandbox:
        from gateway.sandbox import sandbox_routes

        routes += sandbox_routes(gateway)
    # end issue 5
    routes += [
        Route("/metrics", _metrics, methods=["GET"]),
        Mount("/static", StaticFiles(packages=[("gateway", "static")]), name="static"),
    ]
    middleware = [
        Middleware(AccessLog),  # issue 7: outermost, so it also logs CORS preflights
        Middleware(
            CORSMiddleware,
            allow_origins=list(settings.server.cors_allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["content-type", "last-event-id"],
            max_age=600,
        ),
    ]
    doors: dict[str, ASGIApp] = {
        r.path: AccessLog(EndpointDoor(r))
        for r in routes
        if isinstance(r, Route) and any((m, r.path) in HOT_PATHS for m in r.methods or ())
    }
    app = GatewayApp(
        AccessLog(StreamDoor(stream_route)),
        doors,
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.gateway = gateway
    return app
