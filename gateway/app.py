"""The app factory: builds every part of a gateway, wires the routes, and hands the lifespan the container.

Composition only: no request handling lives here. The order of construction is the
dependency order (store and broker, then services, then providers, then routes).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from gateway.admission import Admission
from gateway.auth import Auth
from gateway.broker import Broker
from gateway.clientip import parse_networks
from gateway.config import DatabaseConfig, Settings
from gateway.disk import DiskCap
from gateway.errors import ApiError
from gateway.limits import Limits
from gateway.memory import MemoryReleaser
from gateway.metrics import Metrics
from gateway.providers.base import Deps
from gateway.providers.truecaller.profile_client import ProfileClient
from gateway.providers.truecaller.routes import mount as mount_truecaller
from gateway.providers.veriphone.routes import mount as mount_veriphone
from gateway.retention import Retention
from gateway.sessions import Sessions
from gateway.starter import Starter
from gateway.storage.base import Store
from gateway.storage.sqlite import SqliteStore
from gateway.tasks import Background
from gateway.web import api, demo, openapi
from gateway.web.accesslog import AccessLog
from gateway.web.context import Gateway, gateway_of
from gateway.web.doors import HOT_PATHS, EndpointDoor, GatewayApp, StreamDoor, api_error, http_error, internal_error
from gateway.web.stream import PATH_TEMPLATE
from gateway.webhooks.delivery import WebhookSender
from gateway.webhooks.signing import SESSION_COMPLETED, completed_event


def make_store(db: DatabaseConfig, on_write_seconds: Callable[[float], None] | None = None) -> Store:
    """PostgreSQL when `database.url` is set, else the SQLite file at `database.path`."""
    if db.url:
        # Imported only here: a gateway on its SQLite default never loads the PostgreSQL driver.
        from gateway.storage.postgres import PgStore

        return PgStore(db.url, min_size=db.pool_min, max_size=db.pool_max, on_write_seconds=on_write_seconds)
    return SqliteStore(db.path, db.busy_timeout, on_write_seconds=on_write_seconds)


def build_gateway(settings: Settings) -> tuple[Gateway, list[BaseRoute]]:
    """Every part of one gateway, and the routes of its providers."""
    metrics = Metrics()
    store = make_store(settings.database, on_write_seconds=metrics.db_write_seconds.observe)
    broker = Broker(settings.stream.buffer)
    sessions = Sessions(store, broker)
    sessions.on_outcome = metrics.outcome
    sessions.on_reached = metrics.reached_provider
    background = Background()
    auth = settings.auth
    starter = Starter(
        sessions,
        metrics,
        Auth(
            require=auth.require,
            api_keys=auth.api_keys,
            ticket_secrets=auth.ticket_secrets,
            ticket_max_age=auth.ticket_max_age,
        ),
        DiskCap(store, settings.database.max_size_mb * 2**20, metrics),
    )
    starter.admission = admission = Admission(Limits(settings.limits), store, metrics)
    http = httpx.AsyncClient(follow_redirects=False, trust_env=False)
    gw = Gateway(
        settings=settings,
        store=store,
        broker=broker,
        sessions=sessions,
        metrics=metrics,
        background=background,
        starter=starter,
        retention=Retention(store, settings.sessions.retention, clock=sessions.clock, keep=settings.sessions.keep),
        memory=MemoryReleaser(broker),
        http=http,
        admission=admission,
        trusted_proxies=parse_networks(settings.server.trusted_proxies),
    )
    if settings.webhooks.url and SESSION_COMPLETED in settings.webhooks.events:
        gw.webhooks = WebhookSender(store, settings.webhooks, metrics)
        sessions.webhook_event = completed_event
        sessions.on_webhook = gw.webhooks.wake
    deps = Deps(settings, sessions, store, metrics, background, http, admission=admission)
    routes: list[BaseRoute] = []
    if settings.providers.truecaller.enabled:
        # The profile fetch has a client of its own: leaner than httpx on the hot path.
        profile_client = ProfileClient()
        gw.closers.append(profile_client)
        provider, provider_routes = mount_truecaller(deps, profile_client)
        gw.providers[provider.name] = provider
        routes += provider_routes
    if settings.providers.veriphone.enabled:
        vp, vp_routes = mount_veriphone(deps, starter)
        gw.providers[vp.name] = vp
        routes += vp_routes
    starter.providers.update(gw.providers)
    return gw, routes


async def _openapi(request: Request) -> Response:
    return Response(_OPENAPI, media_type="application/json")


_OPENAPI = openapi.encoded()


async def _metrics(request: Request) -> Response:
    gw = gateway_of(request)
    gw.metrics.open_streams.set(gw.broker.count())
    listener = gw.store.listener_ok()
    if listener is not None:
        gw.metrics.listener_up.set(1 if listener else 0)
    if gw.starter.disk is not None:
        await gw.starter.disk.measure()  # sets gateway_database_bytes
    return Response(gw.metrics.render(), media_type=gw.metrics.content_type)


def create_app(settings: Settings) -> Starlette:
    gateway, provider_routes = build_gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    routes: list[BaseRoute] = api.routes(gateway)
    stream_route = next(r for r in routes if isinstance(r, Route) and r.path == PATH_TEMPLATE)
    routes += provider_routes
    # /demo only when enabled, ahead of /static (which must not serve the raw page).
    routes += demo.routes(settings)
    if settings.sandbox:
        # Imported here so that a production gateway never loads the fake providers.
        from gateway.sandbox import sandbox_routes

        routes += sandbox_routes(gateway)
    routes += [
        Route("/metrics", _metrics, methods=["GET"]),
        Route("/openapi.json", _openapi, methods=["GET"]),
        Mount("/static", StaticFiles(packages=[("gateway", "static")]), name="static"),
    ]
    middleware = [
        Middleware(AccessLog),  # outermost, so it also logs CORS preflights
        Middleware(
            CORSMiddleware,
            allow_origins=list(settings.server.cors_allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["content-type", "last-event-id", "idempotency-key", "authorization"],
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
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: internal_error},
    )
    app.state.gateway = gateway
    return app
