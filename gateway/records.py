"""The records the storage layer hands to the services: a session, a stored event, a Truecaller token claim."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.outcome import PENDING, rfc3339


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    provider: str
    status: str
    reason: str | None
    provider_ref: str | None
    phone: str | None
    user_ref: str | None
    provider_data: dict[str, Any]
    outcome: dict[str, Any] | None
    created_at: float
    updated_at: float
    expires_at: float
    completed_at: float | None

    @property
    def terminal(self) -> bool:
        return self.status != PENDING

    def snapshot(self) -> dict[str, Any]:
        """The public JSON of `GET /v1/sessions/{id}` and of the `status` event."""
        return {
            "id": self.id,
            "provider": self.provider,
            "status": self.status,
            "expires_at": rfc3339(self.expires_at),
            "updated_at": rfc3339(self.updated_at),
            "outcome": self.outcome,
        }


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """A row of a session's event log: what a reconnecting stream replays."""

    id: int
    kind: str  # "progress" | "outcome"
    data: dict[str, Any]


TOKEN_LIFETIME = 600.0  # Truecaller access tokens live 10 minutes
# Token hashes are remembered this long: the token's own life and a margin.
TOKEN_MEMORY = TOKEN_LIFETIME + 300
# A stored token's profile fetch belongs to the process that stored (or last took) it for this
# many seconds, longer than a fetch can last with the default timeouts (4 attempts of 2.5 s
# and their backoff). Once it passes with the session still pending, that process is presumed
# dead and another one takes the fetch over (`Store.pending_claims`).
CLAIM_LEASE = 30.0
# A webhook the delivery worker took is its own for this long: on a shared database, no other
# instance sends it meanwhile; the attempt's result sets the real next attempt.
OUTBOX_LEASE = 60.0

# What storing a Truecaller token callback decided: the first token of a pending session is
# "stored"; the same session again is a "repeat"; a finished or unknown session is "gone"; a
# token already bound to another session is "reused" (one token proves one consent).
ClaimResult = Literal["stored", "repeat", "gone", "reused"]


@dataclass(frozen=True, slots=True)
class TokenClaim:
    """A Truecaller token callback to store with the session's `profile_fetching` event."""

    session_id: str
    endpoint: str  # the checked, normalised profile URL
    access_token: str  # a bearer secret: stored for a restart to resume the fetch, never logged
    token_hash: str
    received_at: float
    token_expires_at: float
    # Until when the storing process owns the fetch; 0: received_at + CLAIM_LEASE.
    lease_until: float = 0.0

    @property
    def lease(self) -> float:
        return self.lease_until or self.received_at + CLAIM_LEASE


@dataclass(frozen=True, slots=True)
class PendingClaim:
    """A stored token whose profile fetch a stop or crash interrupted."""

    session_id: str
    phone: str | None
    endpoint: str
    access_token: str
    token_expires_at: float


# Makes an outbox event from a stored outcome: (session id, outcome object, now) →
# (webhook-id, type, body). The store calls it inside the outcome's transaction.
WebhookEvent = Callable[[str, dict[str, Any], float], tuple[str, str, str]]


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A pending webhook, as the delivery worker sends it."""

    id: str
    session_id: str
    type: str
    payload: str
    attempts: int
    enqueued_at: float


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A webhook as the operator lists it: no payload (it holds personal data)."""

    id: str
    type: str
    status: str  # pending | delivered | failed
    attempts: int
    enqueued_at: float
    next_attempt_at: float
    finished_at: float | None
    last_status: int | None
    last_error: str | None


class IdempotencyKeyTaken(Exception):
    """`Store.create`: another start stored this Idempotency-Key first (another process, on a
    shared database); nothing was stored, and the caller answers as that start did."""


@dataclass(frozen=True, slots=True)
class Idempotency:
    """An Idempotency-Key of a session start: stored with the session, answered again on a repeat."""

    key_hash: str
    body_hash: str
    answer: dict[str, Any]  # the 201 body
    expires_at: float


@dataclass(frozen=True, slots=True)
class OutboxResult:
    """What one delivery attempt did to its row: still pending (retry at `next_attempt_at`), delivered or failed."""

    id: str
    status: str
    attempts: int
    next_attempt_at: float
    finished_at: float | None
    last_status: int | None
    last_error: str | None
