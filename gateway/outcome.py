"""The outcome object: the one terminal result of a session, as the contract spells it."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any

PENDING = "pending"
VERIFIED = "verified"
REJECTED = "rejected"
FAILED = "failed"
EXPIRED = "expired"
TERMINAL_STATUSES = frozenset({VERIFIED, REJECTED, FAILED, EXPIRED})
STATUSES = frozenset({PENDING}) | TERMINAL_STATUSES

REASONS = frozenset(
    {
        "user_rejected",
        "use_another_number",
        "user_cancelled",
        "access_denied",
        "phone_mismatch",
        "provider_error",
        "timeout",
        "not_completed",
        "destination_mismatch",
        "origin_mismatch",
        "invalidated",
        "expired",
        "client_disabled",
        "method_tampering",
        "too_many_submissions",
        "exceeded_attempt_quota",
    }
)


@functools.lru_cache(maxsize=4096)
def _rfc3339(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


def rfc3339(ts: float) -> str:
    """Unix seconds → `2026-11-22T10:00:00Z` (UTC, whole seconds); cached per second."""
    return _rfc3339(int(ts))


@dataclass(frozen=True)
class Outcome:
    """What a provider decoder returns; the session adds provider, user_ref and completed_at."""

    status: str
    reason: str | None = None
    phone: str | None = None
    profile: dict[str, str | None] | None = None
    veriphone: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in TERMINAL_STATUSES:
            raise ValueError(f"not a terminal status: {self.status!r}")
        if self.reason is not None and self.reason not in REASONS:
            raise ValueError(f"unknown reason: {self.reason!r}")
        if self.status == VERIFIED and self.reason is not None:
            raise ValueError("a verified outcome has no reason")

    def to_json(self, *, provider: str, user_ref: str | None, completed_at: float | None = None) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "provider": provider,
            "phone": self.phone,
            "user_ref": user_ref,
            "profile": self.profile,
            "veriphone": self.veriphone,
            "completed_at": rfc3339(time.time() if completed_at is None else completed_at),
        }


# The outcome's personal fields, nulled by retention (the rest stays for operations).
SCRUBBED_OUTCOME_KEYS = ("phone", "user_ref", "profile")


def scrub_outcome(text: str | None) -> str | None:
    """The outcome JSON with its personal fields set to null (other fields untouched)."""
    if not text:
        return text
    body = json.loads(text)
    for key in SCRUBBED_OUTCOME_KEYS:
        if key in body:
            body[key] = None
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)
