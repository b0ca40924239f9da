"""What the session service asks of a provider integration, and what an integration is given."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from gateway.admission import Admission
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.sessions import Sessions
from gateway.storage.base import Store
from gateway.tasks import Background


@dataclass(frozen=True)
class Prepared:
    """A provider's part of a new session, ready to be stored."""

    ttl: float  # seconds the session may stay pending
    public: dict[str, Any]  # the provider block of the 201 answer
    provider_ref: str | None = None  # Truecaller request nonce / Veriph.One session uuid
    data: dict[str, Any] = field(default_factory=dict)  # kept in sessions.provider_data


@dataclass(frozen=True, slots=True)
class Client:
    """Who asked for a session, as far as a provider needs to know (Veriph.One's fraud checks)."""

    user_agent: str = ""
    ip: str | None = None  # decided by `server.trusted_proxies`, never a raw X-Forwarded-For


class Provider(Protocol):
    name: str

    async def prepare(self, *, session_id: str, phone: str | None, user_ref: str | None, client: Client) -> Prepared:
        """Make the provider's part of a new session; raise ProviderFailure if it cannot."""

    async def startup(self) -> None:
        """Called once the database is open (e.g. resume work a restart interrupted)."""

    async def run(self) -> None:
        """Background work for as long as the gateway runs (cancelled at stop); may return at once."""


@dataclass(frozen=True)
class Deps:
    """The services and clients an integration may use; built once by the app factory."""

    settings: Settings
    sessions: Sessions
    store: Store
    metrics: Metrics
    background: Background
    http: httpx.AsyncClient  # outgoing provider API calls: no redirects, no proxy from the environment
    admission: Admission | None = None  # the abuse limits: callbacks per source address
