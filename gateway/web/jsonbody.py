"""Reading JSON request bodies strictly: size cap, content type, object shape, known fields."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from starlette.requests import Request

from gateway.errors import BadRequest, PayloadTooLarge, UnsupportedMedia

MAX_BODY = 16 * 1024


async def read_body(request: Request, max_bytes: int = MAX_BODY) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not (declared.isascii() and declared.isdigit()) or int(declared) > max_bytes):
        raise PayloadTooLarge("body_too_large", f"the request body must be at most {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge("body_too_large", f"the request body must be at most {max_bytes} bytes")
    return bytes(body)


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
