"""Veriph.One web and mobile verification: create-session, the result endpoint, decoding."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.routing import BaseRoute

from gateway.errors import ProviderFailure
from gateway.providers.base import Prepared

if TYPE_CHECKING:
    from gateway.app import Gateway


class Veriphone:
    name = "veriphone"

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.cfg = gw.settings.providers.veriphone

    async def prepare(
        self, *, session_id: str, phone: str | None, user_ref: str | None, request: Request
    ) -> Prepared:
        raise ProviderFailure("provider_unavailable", "the Veriph.One integration is not available yet")

    def routes(self) -> list[BaseRoute]:
        return []

    async def startup(self) -> None:
        return None
