"""The container the routes read from: every service, store and client of one running gateway.

The app factory (`gateway.app`) builds it and its lifespan starts and stops it; a route
reaches it as `request.app.state.gateway` (`gateway_of`) or is handed the parts it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from starlette.requests import Request

from gateway.admission import Admission
from gateway.broker import Broker
from gateway.clientip import IPNetwork
from gateway.config import Settings
from gateway.memory import MemoryReleaser
from gateway.metrics import Metrics
from gateway.providers.base import Provider
from gateway.retention import Retention
from gateway.sessions import Sessions
from gateway.starter import Starter
from gateway.storage.base import Store
from gateway.tasks import Background
from gateway.webhooks.delivery import WebhookSender


class Closable(Protocol):
    async def aclose(self) -> None: ...


@dataclass(eq=False)
class Gateway:
    settings: Settings
    store: Store
    broker: Broker
    sessions: Sessions
    metrics: Metrics
    background: Background
    starter: Starter
    retention: Retention
    memory: MemoryReleaser
    http: httpx.AsyncClient  # provider API calls
    admission: Admission  # the abuse limits ([limits]); its `limits` also cap streams and long polls
    trusted_proxies: tuple[IPNetwork, ...] = ()
    webhooks: WebhookSender | None = None  # with [webhooks] url set
    providers: dict[str, Provider] = field(default_factory=dict)
    # Closed last, after background work has ended (e.g. the Truecaller profile client).
    closers: list[Closable] = field(default_factory=list)
    shutting_down: bool = False
    periodic: dict[str, asyncio.Task[None]] = field(default_factory=dict)  # expiry, retention, memory

    def begin_shutdown(self) -> None:
        """Stop taking long waits: close every stream, spread over `server.shutdown_spread`, so
        browsers reconnect elsewhere without all coming back in the same instant."""
        self.shutting_down = True
        server = self.settings.server
        # Half the graceful timeout at most: every stream must still end before it runs out.
        self.broker.close_all("shutdown", spread=min(server.shutdown_spread, server.shutdown_timeout / 2))

    async def start(self) -> None:
        await self.store.open()
        # Providers first: work a restart interrupted (a stored Truecaller token) decides its
        # session's outcome before the expiry task may call it a timeout.
        for provider in self.providers.values():
            await provider.startup()
        for name, loop in (
            ("expiry", self.sessions.run_expiry()),
            ("retention", self.retention.run()),
            ("memory", self.memory.run()),
            *([("webhooks", self.webhooks.run())] if self.webhooks else []),
            *((f"provider-{name}", provider.run()) for name, provider in self.providers.items()),
        ):
            self.periodic[name] = asyncio.create_task(loop, name=name)

    async def stop(self) -> None:
        self.shutting_down = True
        self.broker.close_all("shutdown")  # whatever the spread has not closed yet: now
        await self.background.drain(self.settings.server.shutdown_timeout)
        for periodic in self.periodic.values():
            periodic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await periodic
        if self.webhooks is not None:
            await self.webhooks.drain(self.settings.server.shutdown_timeout)
        await self.http.aclose()
        for closer in self.closers:
            await closer.aclose()
        await self.store.close()


def gateway_of(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw
