"""Truecaller mobile web: the deep link, the server callback, the profile fetch from a checked host.

`mount` is what the app factory calls: the provider for the session service and its routes.
"""

from __future__ import annotations

from starlette.routing import BaseRoute

from gateway.providers.base import Deps
from gateway.providers.truecaller.profile_client import ProfileClient
from gateway.providers.truecaller.routes import routes
from gateway.providers.truecaller.service import Truecaller


def mount(deps: Deps, profile_client: ProfileClient) -> tuple[Truecaller, list[BaseRoute]]:
    provider = Truecaller(deps, profile_client)
    return provider, routes(provider, deps.metrics)
