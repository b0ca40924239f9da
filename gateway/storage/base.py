"""The storage seam: everything the services ask of a database, with no SQL and no driver types.

Every write is durable before its method returns, and every write that decides a session's
fate is conditional on the session still being pending, so racing writers settle on exactly
one outcome. A backend raises `StorageError` when the database cannot be read or written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.auth import Admitted
from gateway.outcome import Outcome
from gateway.records import (
    CLAIM_LEASE,
    ClaimResult,
    Idempotency,
    OutboxEntry,
    OutboxItem,
    OutboxResult,
    PendingClaim,
    Session,
    StoredEvent,
    TokenClaim,
    WebhookEvent,
)


@dataclass(frozen=True, slots=True)
class Progressed:
    """What `Store.progress` wrote: the event's id (None: nothing written) and the claim's result.

    `first`: this is the session's first event, the moment its user reached the provider
    (conversion numbers); `provider` is then the session's provider.
    """

    event_id: int | None
    claim: ClaimResult | None = None
    first: bool = False
    provider: str | None = None


@dataclass(frozen=True, slots=True)
class RefProgressed:
    """What `Store.progress_by_ref` found and wrote.

    `session_id` is None when no pending session has the reference (the claim is then
    "gone" and nothing is written); `phone` and `user_ref` are the pending session's.
    """

    session_id: str | None
    phone: str | None
    user_ref: str | None
    progressed: Progressed


@dataclass(frozen=True, slots=True)
class Finished:
    """The outcome `Store.finish` stored: its event id and the outcome object as stored."""

    event_id: int
    body: dict[str, Any]


class Store(Protocol):
    # True when several gateway processes may share this database: in-process coordination
    # (one broker, one process deciding a Truecaller callback) no longer covers them all.
    shared: bool

    async def open(self) -> None:
        """Apply pending migrations and get ready to serve."""

    def watch(self, on_event: Callable[[str, int], None], on_reset: Callable[[], None]) -> None:
        """Before `open`: be told (session id, event id) of every event any process commits.

        A shared store calls `on_event` for the events other processes commit (this process
        publishes its own right after each commit), and `on_reset` after it lost and regained
        its feed (events may have been missed: streams should reconnect and catch up from the
        database). A store only one process uses
        never calls either.
        """

    def listener_ok(self) -> bool | None:
        """Whether the event feed of `watch` is up; None for a store without one."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StorageError unless the database answers a trivial read."""

    # -- sessions ------------------------------------------------------------------------
    async def create(
        self, session: Session, idempotency: Idempotency | None = None, ticket: Admitted | None = None
    ) -> bool:
        """Insert a new session, and its Idempotency-Key and start ticket in the same transaction.

        Raises IdempotencyKeyTaken, with nothing stored, if the key is stored already (another
        process's start with the same key won).

        False, with nothing stored, if the ticket's hash is stored already (a ticket starts one session).
        """

    async def ticket_used(self, ticket_hash: str) -> bool:
        """Whether a start ticket with this hash has started a session (before calling a provider)."""

    async def prune_tickets(self, now: float) -> int:
        """Delete the hashes of start tickets expired at `now`; returns how many."""

    async def database_bytes(self) -> int:
        """How much the database holds, for the `database.max_size_mb` cap: cheap enough once a second.

        SQLite: pages in use plus the WAL file (free pages are reused before the file grows);
        PostgreSQL: pg_database_size(current_database()).
        """

    async def idempotent(self, key_hash: str, now: float) -> Idempotency | None:
        """The unexpired start stored under this key, if any."""

    async def prune_idempotency(self, now: float) -> int:
        """Delete expired Idempotency-Keys; returns how many."""

    async def get(self, session_id: str) -> Session | None: ...

    async def get_by_ref(self, provider: str, provider_ref: str) -> Session | None: ...

    async def get_with_events(self, session_id: str, after_id: int) -> tuple[Session | None, list[StoredEvent]]:
        """The session and its events with an id above `after_id`, in id order (one read)."""

    async def outcome_event(self, session_id: str) -> StoredEvent | None: ...

    async def event(self, session_id: str, event_id: int) -> StoredEvent | None:
        """One stored event of the session (a shared store's feed names it by id)."""

    async def update_provider_data(
        self, session_id: str, changes: dict[str, Any], *, now: float, expires_at: float | None
    ) -> bool:
        """Merge `changes` into a pending session's provider data (and move its deadline)."""

    async def progress(
        self,
        session_id: str,
        data: dict[str, Any],
        *,
        now: float,
        expires_at: float | None = None,
        claim: TokenClaim | None = None,
        durable: bool = True,
    ) -> Progressed:
        """Append a progress event to a pending session (and move its deadline).

        With a `claim`, the claim is stored first in the same transaction, and the event is
        written only if the claim was "stored". `durable=False`: the commit may return before
        the write is on disk (visible to every process at once, atomic all the same); the next
        durable write, or `flush`, makes it durable too.
        """

    async def progress_by_ref(
        self,
        provider: str,
        provider_ref: str,
        data: dict[str, Any],
        *,
        now: float,
        claim: TokenClaim,
        expires_at: float | None = None,
        durable: bool = True,
    ) -> RefProgressed:
        """`progress` with a claim on the pending session of `provider_ref`, found in the same call.

        The claim's own `session_id` is not read: the session is the one the reference names.
        A Truecaller token callback names its session by requestId; on a shared database this
        saves the separate read.
        """

    async def flush(self) -> None:
        """Make every write committed so far durable (after `progress(durable=False)`)."""

    async def finish(
        self,
        session_id: str,
        outcome: Outcome,
        *,
        now: float,
        release_claim: bool = False,
        webhook: WebhookEvent | None = None,
        unless_claimed: bool = False,
    ) -> Finished | None:
        """Store the terminal outcome of a pending session; None if it was not pending.

        `release_claim` deletes the session's stored token in the same transaction, whether
        or not this outcome wins. `webhook` makes the outbox event that is stored in the same
        transaction as a winning outcome: never one without the other. `unless_claimed`: no
        outcome if a Truecaller token is stored for the session (its fetch decides).
        """

    async def progress_and_finish(
        self,
        session_id: str,
        data: dict[str, Any],
        outcome: Outcome,
        *,
        now: float,
        claim: TokenClaim | None = None,
        release_claim: bool = False,
        webhook: WebhookEvent | None = None,
    ) -> tuple[Progressed, Finished | None]:
        """`progress` then `finish` in one durable transaction; neither if the claim is refused."""

    async def conversion(self, since: float) -> list[tuple[str, str, str | None, int, int]]:
        """Sessions created since `since`: (provider, status, reason, how many, how many reached the provider)."""

    async def due_for_expiry(self, now: float, limit: int) -> list[str]:
        """Ids of pending sessions whose deadline has passed, earliest first."""

    async def next_deadline(self) -> float | None: ...

    async def count_pending(self) -> int:
        """How many sessions are pending now (the limits read it at most once a second)."""

    async def purge_personal_data(self, *, cutoff: float, now: float, limit: int) -> int:
        """Scrub at most `limit` sessions completed at or before `cutoff`; returns how many."""

    async def delete_finished(self, *, cutoff: float, limit: int) -> int:
        """Delete at most `limit` purged sessions completed at or before `cutoff`, with their events
        (and idempotency keys, delivered or failed webhooks); a session with a pending webhook stays."""

    # -- Truecaller token claims ---------------------------------------------------------
    async def token_owner(self, token_hash: str) -> str | None:
        """The session a token is bound to, if it is bound to one."""

    async def has_claim(self, session_id: str) -> bool: ...

    async def pending_claims(self, now: float, lease: float = CLAIM_LEASE) -> list[PendingClaim]:
        """Drop the stored tokens of finished sessions; take over those of pending ones whose
        lease has passed (their fetch's process died), each for `lease` seconds from `now`.

        Of several processes asking at once, each claim goes to exactly one. A store only one
        process uses voids every lease when it opens: whatever is stored then was interrupted.
        """

    # -- the webhook outbox --------------------------------------------------------------
    async def outbox_due(self, now: float, limit: int) -> list[OutboxItem]:
        """Pending webhooks whose next attempt is due, oldest first.

        A shared store leases them (`OUTBOX_LEASE`): no other process gets them meanwhile.
        """

    async def outbox_next_due(self) -> float | None:
        """When the next pending webhook is due."""

    async def outbox_oldest_pending(self) -> float | None:
        """When the oldest pending webhook was enqueued."""

    async def outbox_record(self, results: list[OutboxResult]) -> None:
        """What attempts did, in one transaction (rows no longer pending are left alone)."""

    async def outbox_list(self, *, failed_only: bool, limit: int) -> list[OutboxEntry]: ...

    async def outbox_retry(self, webhook_id: str | None, *, now: float) -> int:
        """Send a failed webhook (or every failed one, with None) again from now; how many."""

    async def outbox_prune(self, *, cutoff: float, limit: int) -> int:
        """Delete at most `limit` delivered or failed webhooks finished at or before `cutoff`."""
