"""Truecaller server callback bodies → typed values; pure, no I/O.

Two shapes exist: a token callback `{"requestId", "accessToken", "endpoint"}` and a status
callback `{"requestId", "status"}`. Anything else is a 400 with a stable code. The endpoint
is only type-checked here; `endpoint_guard.check_endpoint` decides whether it may be used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import BadRequest
from gateway.providers.truecaller.client import MAX_TOKEN_LENGTH

FIELDS = ("requestId", "accessToken", "endpoint", "status")
FLOW_INVOKED = "flow_invoked"
USER_REJECTED = "user_rejected"
USE_ANOTHER_NUMBER = "use_another_number"
REJECTIONS = (USER_REJECTED, USE_ANOTHER_NUMBER)

MAX_REQUEST_ID_LENGTH = 128
MAX_STATUS_LENGTH = 64
# Visible ASCII: our nonces are URL-safe, Truecaller's own examples are base64 (with `=`).
_VISIBLE = re.compile(r"[\x21-\x7e]+")
_LOGGABLE_STATUS = re.compile(r"[a-z_]{1,32}")


@dataclass(frozen=True)
class TokenCallback:
    request_id: str
    access_token: str
    endpoint: str


@dataclass(frozen=True)
class StatusCallback:
    request_id: str
    status: str


Callback = TokenCallback | StatusCallback


def parse_callback(body: Mapping[str, object]) -> Callback:
    """Validate a callback body already limited to `FIELDS`; BadRequest with a stable code otherwise."""
    request_id = body.get("requestId")
    if request_id is None:
        raise BadRequest("missing_request_id", "requestId is required")
    if not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID_LENGTH or not _VISIBLE.fullmatch(request_id):
        raise BadRequest("invalid_request_id", "requestId must be a string of 1 to 128 visible ASCII characters")
    has_token = "accessToken" in body
    has_status = "status" in body
    if has_token == has_status:
        raise BadRequest("invalid_callback", "send exactly one of accessToken (with endpoint) and status")
    if has_status:
        if "endpoint" in body:
            raise BadRequest("invalid_callback", "a status callback carries no endpoint")
        status = body["status"]
        if not isinstance(status, str) or not 0 < len(status) <= MAX_STATUS_LENGTH:
            raise BadRequest("invalid_status", "status must be a string of 1 to 64 characters")
        return StatusCallback(request_id, status)
    token = body["accessToken"]
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not _VISIBLE.fullmatch(token):
        raise BadRequest("invalid_access_token", "accessToken must be a string of visible ASCII characters")
    endpoint = body.get("endpoint")
    if endpoint is None:
        raise BadRequest("missing_endpoint", "a token callback needs an endpoint")
    if not isinstance(endpoint, str):
        raise BadRequest("invalid_endpoint", "The profile endpoint was refused: it is not a string.")
    return TokenCallback(request_id, token, endpoint)


def loggable_status(status: str) -> str:
    """The status itself when it is a short snake_case word, else a placeholder (it may carry anything)."""
    return status if _LOGGABLE_STATUS.fullmatch(status) else "<other>"
