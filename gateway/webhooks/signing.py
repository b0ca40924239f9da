"""Standard Webhooks (standardwebhooks.com): the event body, the headers and the v1 signature; pure.

A message is signed as HMAC-SHA256 over `"{webhook-id}.{webhook-timestamp}.{body}"` with the
bytes behind `whsec_`; `webhook-signature` carries `v1,<base64>` for every current secret,
separated by spaces, so a receiver that knows any of them verifies it during a rotation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Any

from gateway.outcome import rfc3339

SESSION_COMPLETED = "session.completed"
PREFIX = "whsec_"
# A receiver refuses a timestamp further than this from its clock (the spec's default).
TOLERANCE = 300


def parse_secret(text: str) -> bytes:
    """The key behind `whsec_<base64>`; ValueError if it is not one."""
    if not text.startswith(PREFIX):
        raise ValueError("a webhook secret starts with whsec_")
    return base64.b64decode(text[len(PREFIX) :], validate=True)


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def new_message_id() -> str:
    return "msg_" + secrets.token_urlsafe(18)


def completed_event(session_id: str, outcome: dict[str, Any], now: float) -> tuple[str, str, str]:
    """(webhook-id, type, body) of a session's terminal outcome: the outcome object plus the session id."""
    body = {
        "type": SESSION_COMPLETED,
        "timestamp": rfc3339(now),
        "data": {"session_id": session_id, **outcome},
    }
    return new_message_id(), SESSION_COMPLETED, json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def signature(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys
    )


def headers(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(keys, msg_id, timestamp, body),
    }


def verify(keys: list[bytes], found: dict[str, str], body: bytes, now: float, tolerance: float = TOLERANCE) -> bool:
    """A receiver's check (the sandbox's fake receiver uses it): any v1 signature of any key, a fresh timestamp."""
    msg_id, stamp, sigs = found.get("webhook-id"), found.get("webhook-timestamp", ""), found.get("webhook-signature")
    if not msg_id or not sigs or not stamp.isdigit() or abs(now - int(stamp)) > tolerance:
        return False
    wanted = set(signature(keys, msg_id, int(stamp), body).split())
    return any(hmac.compare_digest(given, want) for given in sigs.split() for want in wanted)
