"""`POST /v1/callbacks/truecaller`: Truecaller's server reports a token or a status."""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.clientip import parse_networks
from gateway.metrics import Metrics
from gateway.providers.base import Deps
from gateway.providers.truecaller.decode import FIELDS, parse_callback
from gateway.providers.truecaller.profile_client import ProfileClient
from gateway.providers.truecaller.service import Truecaller
from gateway.web.client import callback_guard
from gateway.web.jsonbody import read_json_object

CALLBACK_PATH = "/v1/callbacks/truecaller"


def routes(truecaller: Truecaller, metrics: Metrics, admit: Callable[[Request], None] | None = None) -> list[BaseRoute]:
    async def callback(request: Request) -> Response:
        started = time.monotonic()
        try:
            if admit is not None:
                admit(request)  # callbacks per source address, before the body is read
            # Not strict: a field Truecaller adds one day must not fail every verification.
            body = await read_json_object(request, fields=FIELDS, strict=False)
            status = await truecaller.on_callback(parse_callback(body))
        finally:
            metrics.callback_handled(truecaller.name, time.monotonic() - started)
        return JSONResponse({"status": status}, headers={"cache-control": "no-store"})

    return [Route(CALLBACK_PATH, callback, methods=["POST"])]


def mount(deps: Deps, profile_client: ProfileClient) -> tuple[Truecaller, list[BaseRoute]]:
    """The provider for the session service, and its routes: what the app factory calls."""
    provider = Truecaller(deps, profile_client)
    admit = callback_guard(deps.admission, parse_networks(deps.settings.server.trusted_proxies))
    return provider, routes(provider, deps.metrics, admit)
