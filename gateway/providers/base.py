"""What the core asks of a provider integration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request
from starlette.routing import BaseRoute


@dataclass(frozen=True)
class Prepared:
    """A provider's part of a new session, ready to be stored."""

    ttl: float  # seconds the session may stay pending
    public: dict[str, Any]  # the provider block of the 201 answer
    provider_ref: str | None = None  # Truecaller request nonce / Veriph.One session uuid
    data: dict[str, Any] = field(default_factory=dict)  # kept in sessions.provider_data


class Provider(Protocol):
    name: str

    async def prepare(
        self, *, session_id: str, phone: str | None, user_ref: str | None, request: Request
    ) -> Prepared: ...

    def routes(self) -> list[BaseRoute]: ...

    async def startup(self) -> None:
        """Called once the database is open (e.g. resume work a restart interrupted)."""
