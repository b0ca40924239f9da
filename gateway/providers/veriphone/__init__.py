"""Veriph.One: create the provider session, send the user there, pull the result when they come back.

`mount` is what the app factory calls: the provider for the session service and its routes.
"""

from __future__ import annotations

from starlette.routing import BaseRoute

from gateway.providers.base import Deps
from gateway.providers.veriphone.routes import routes
from gateway.providers.veriphone.service import Veriphone
from gateway.starter import Starter


def mount(deps: Deps, starter: Starter) -> tuple[Veriphone, list[BaseRoute]]:
    provider = Veriphone(deps)
    return provider, routes(provider, starter)
