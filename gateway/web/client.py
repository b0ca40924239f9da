"""Who is asking: the client a request comes from, as `server.trusted_proxies` decides it."""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.types import Scope

from gateway.admission import Admission
from gateway.clientip import IPNetwork, client_ip
from gateway.providers.base import Client

MAX_USER_AGENT = 512


def request_client_ip(request: Request, trusted: tuple[IPNetwork, ...]) -> str | None:
    """The client address of a request; X-Forwarded-For lines (there may be several) joined in order."""
    peer = request.client.host if request.client else None
    xff = ",".join(request.headers.getlist("x-forwarded-for")) or None
    return client_ip(peer, xff, trusted)


def scope_client_ip(scope: Scope, trusted: tuple[IPNetwork, ...]) -> str | None:
    """`request_client_ip` for a raw ASGI scope (the stream route has no Request); headers read only if needed."""
    client = scope.get("client")
    peer = client[0] if client else None
    if not trusted:
        return client_ip(peer, None, trusted)
    xff = b",".join(v for k, v in scope["headers"] if k == b"x-forwarded-for").decode("latin-1") or None
    return client_ip(peer, xff, trusted)


def client_of(request: Request, trusted: tuple[IPNetwork, ...]) -> Client:
    return Client(request.headers.get("user-agent", "")[:MAX_USER_AGENT], request_client_ip(request, trusted))


def callback_guard(admission: Admission | None, trusted: tuple[IPNetwork, ...]) -> Callable[[Request], None]:
    """What a provider callback route calls first: raises 429 rate_limited beyond `callbacks_per_ip`."""

    def admit(request: Request) -> None:
        if admission is not None and admission.enabled:
            admission.admit_callback(request_client_ip(request, trusted))

    return admit
