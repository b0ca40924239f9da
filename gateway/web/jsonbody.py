"""Reading JSON request bodies strictly: size cap, content type, object shape, known fields."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection
from typing import Any

from starlette.requests import Request

from gateway.errors import BadRequest, PayloadTooLarge, RequestTimeout, UnsupportedMedia
from gateway.web.context import Gateway

MAX_BODY = 16 * 1024


async def read_body(request: Request, max_bytes: int = MAX_BODY) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not (declared.isascii() and declared.isdigit()) or int(declared) > max_bytes):
        raise PayloadTooLarge("body_too_large", f"the request body must be at most {max_bytes} bytes")
    body = bytearray()
    timeout = _body_timeout(request)
    try:
        # A body trickled in a byte at a time (slowloris) would hold the request forever.
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise PayloadTooLarge("body_too_large", f"the request body must be at most {max_bytes} bytes")
    except TimeoutError:
        gw = _gateway(request)
        if gw is not None:
            gw.metrics.limited("body_timeout")
        # The rest of the body may still come: close the connection instead of reading it.
        raise RequestTimeout(
            "body_timeout", f"the request body did not arrive within {timeout:g} s", {"connection": "close"}
        ) from None
    return bytes(body)


def _gateway(request: Request) -> Gateway | None:
    gw = getattr(request.app.state, "gateway", None)
    return gw if isinstance(gw, Gateway) else None


def _body_timeout(request: Request) -> float | None:
    """`limits.body_timeout` of the gateway serving the request; None (no deadline) with limits off."""
    gw = _gateway(request)
    if gw is None or not gw.admission.enabled:
        return None
    return gw.settings.limits.body_timeout


async def read_json_object(
    request: Request, *, fields: Collection[str], max_bytes: int = MAX_BODY, strict: bool = True
) -> dict[str, Any]:
    """The body as a JSON object whose keys are all in `fields`; 4xx ApiError otherwise.

    With `strict=False` unknown keys are dropped instead (a provider may add fields).
    """
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMedia("unsupported_media_type", "send the body as Content-Type: application/json")
    raw = await read_body(request, max_bytes)
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise BadRequest("invalid_json", "the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadRequest("invalid_body", "the request body must be a JSON object")
    unknown = sorted(k for k in value if k not in fields)
    if unknown and not strict:
        return {k: v for k, v in value.items() if k in fields}
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise BadRequest("unknown_field", f"unknown field(s): {shown}; allowed: {', '.join(sorted(fields))}")
    return value
