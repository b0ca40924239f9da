"""Who is asking: the client a request comes from, as `server.trusted_proxies` decides it."""

from __future__ import annotations

from starlette.requests import Request

from gateway.clientip import IPNetwork, client_ip
from gateway.providers.base import Client

MAX_USER_AGENT = 512


def request_client_ip(request: Request, trusted: tuple[IPNetwork, ...]) -> str | None:
    """The client address of a request; X-Forwarded-For lines (there may be several) joined in order."""
    peer = request.client.host if request.client else None
    xff = ",".join(request.headers.getlist("x-forwarded-for")) or None
    return client_ip(peer, xff, trusted)


def client_of(request: Request, trusted: tuple[IPNetwork, ...]) -> Client:
    return Client(request.headers.get("user-agent", "")[:MAX_USER_AGENT], request_client_ip(request, trusted))
