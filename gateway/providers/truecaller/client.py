"""GET the Truecaller profile from a checked endpoint, pinned to the checked addresses."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.providers.truecaller.decode import MAX_TOKEN_LENGTH
from gateway.providers.truecaller.endpoint_guard import CheckedEndpoint
from gateway.providers.truecaller.profile_client import ProfileClientError, RawResponse, ResponseTooLarge, Timeout

logger = logging.getLogger("gateway.truecaller")

# Visible ASCII only: no header injection, and no encoding error that could quote the token.
_TOKEN = re.compile(r"[\x21-\x7e]+")


class ProfileGetter(Protocol):
    """What the fetch needs of a client: `profile_client.ProfileClient` in the gateway, a fake in tests."""

    async def get(
        self,
        endpoint: CheckedEndpoint,
        address: str,
        headers: list[tuple[str, str]],
        *,
        timeout: float,
        max_bytes: int,
    ) -> RawResponse: ...


@dataclass(frozen=True)
class FetchOk:
    profile: object
    attempts: int


@dataclass(frozen=True)
class FetchDenied:
    """401/403: the token is bad or expired; retrying cannot help."""

    status_code: int
    attempts: int


@dataclass(frozen=True)
class FetchFailed:
    """`detail` is a short fixed word safe for logs and metrics, e.g. `redirect`, `timeout`."""

    detail: str
    attempts: int
    status_code: int | None = None


FetchResult = FetchOk | FetchDenied | FetchFailed


class _Retryable(Exception):
    def __init__(self, detail: str, status_code: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status_code = status_code


async def fetch_profile(
    http: ProfileGetter,
    endpoint: CheckedEndpoint,
    access_token: str,
    *,
    timeout: float,  # per attempt; the whole call is bounded by `deadline`
    deadline: float,
    max_bytes: int = 65536,
    attempts: int = 4,
    backoff: float = 0.2,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> FetchResult:
    """Fetch and JSON-parse the profile; retries 5xx, timeouts and transport errors until `deadline`."""
    if not isinstance(access_token, str) or len(access_token) > MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(access_token):
        return FetchFailed("bad_token", attempts=0)
    if not endpoint.addresses:
        return FetchFailed("no_address", attempts=0)
    last = FetchFailed("deadline", attempts=0)
    for attempt in range(1, attempts + 1):
        remaining = deadline - clock()
        if remaining <= 0:
            break
        # Rotate through the checked addresses so one dead address does not burn every attempt.
        address = endpoint.addresses[(attempt - 1) % len(endpoint.addresses)]
        limit = min(timeout, remaining)
        try:
            return await _attempt(http, endpoint, address, access_token, limit, max_bytes, attempt)
        except _Retryable as exc:
            last = FetchFailed(exc.detail, attempts=attempt, status_code=exc.status_code)
            logger.info("truecaller profile fetch attempt %d failed: %s", attempt, exc.detail)
        if attempt == attempts:
            break
        delay = backoff * 2 ** (attempt - 1)
        if clock() + delay >= deadline:
            break
        await sleep(delay)
    return last


def _headers(access_token: str) -> list[tuple[str, str]]:
    """The request headers; the client adds Host and Accept-Encoding itself."""
    return [
        ("Authorization", f"Bearer {access_token}"),
        ("Cache-Control", "no-cache"),
        ("Accept", "application/json"),
    ]


async def _attempt(
    http: ProfileGetter,
    endpoint: CheckedEndpoint,
    address: str,
    access_token: str,
    limit: float,
    max_bytes: int,
    attempt: int,
) -> FetchResult:
    # ProfileClient sets Host to endpoint.host_header, Accept-Encoding to identity, and uses
    # endpoint.host for SNI and certificate verification while connecting to `address`.
    try:
        response = await http.get(endpoint, address, _headers(access_token), timeout=limit, max_bytes=max_bytes)
    except ResponseTooLarge as exc:
        # The status still decides first (a huge 503 is retried, a huge 401 is a denial).
        return _judge(exc.status, attempt) or FetchFailed("too_large", attempts=attempt, status_code=exc.status)
    except Timeout:
        raise _Retryable("timeout") from None
    except ProfileClientError:
        raise _Retryable("transport") from None
    return _judge(response.status, attempt) or _decode(response.body, response.status, attempt)


def _judge(status: int, attempt: int) -> FetchResult | None:
    """The result a non-2xx status decides (5xx raises _Retryable); None: a 2xx, read the body."""
    if status in (401, 403):
        return FetchDenied(status, attempts=attempt)
    if status >= 500:
        raise _Retryable("server_error", status)
    if 300 <= status < 400:
        return FetchFailed("redirect", attempts=attempt, status_code=status)
    if not 200 <= status < 300:
        return FetchFailed("status", attempts=attempt, status_code=status)
    return None


def _decode(body: bytes, status: int, attempt: int) -> FetchResult:
    """A 2xx body within the limit → the parsed profile, or bad_json."""
    try:
        profile = json.loads(body)
    except (ValueError, RecursionError):
        return FetchFailed("bad_json", attempts=attempt, status_code=status)
    return FetchOk(profile, attempts=attempt)
