"""Sessions and their state machine: pending → verified | rejected | failed | expired.

Every transition goes through `Sessions.finish`, one conditional UPDATE (`WHERE status =
'pending'`), so however many writers race, exactly one outcome is stored and published.
Events are published only after their transaction committed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from gateway import sse
from gateway.auth import Admitted
from gateway.broker import Broker, Event
from gateway.errors import Unauthorized
from gateway.outcome import EXPIRED, PENDING, Outcome
from gateway.records import Idempotency, Session, StoredEvent, TokenClaim, WebhookEvent
from gateway.storage.base import Finished, Progressed, RefProgressed, Store

log = logging.getLogger("gateway.sessions")

PROVIDERS = ("truecaller", "veriphone")


def new_session_id() -> str:
    """192 bits from the OS CSPRNG, URL-safe."""
    return secrets.token_urlsafe(24)


def public_ref(session_id: str) -> str:
    """A stable, non-reversible tag for a session: safe for logs and for provider metadata."""
    return hashlib.sha256(b"gateway-session\x00" + session_id.encode()).hexdigest()[:16]


def _event(row_id: int, kind: str, data: dict[str, Any]) -> Event:
    return Event(id=row_id, kind=kind, frame=sse.event(kind, data, id=str(row_id)), data=data)


def stored_event(event: StoredEvent) -> Event:
    """A stored event, framed for streams."""
    return _event(event.id, event.kind, event.data)


class Sessions:
    """The only code that changes sessions: every write goes through the store, then the broker."""

    def __init__(self, store: Store, broker: Broker, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.broker = broker
        self.clock = clock
        # Set when a session with an earlier deadline than the expiry task knows appears.
        self.expiry_wakeup = asyncio.Event()
        self._next_expiry_pass = 0.0
        # Told (provider, status, reason) of every stored outcome, e.g. for metrics.
        self.on_outcome: Callable[[str, str, str | None], None] | None = None
        # With webhooks on: makes the outbox event stored with each outcome, and is told
        # (after the commit) that one is waiting, so the delivery worker wakes at once.
        self.webhook_event: WebhookEvent | None = None
        # Told the provider when a session's first progress event is stored: its user reached it.
        self.on_reached: Callable[[str], None] | None = None
        self.on_webhook: Callable[[], None] | None = None
        self._reading: set[asyncio.Task[None]] = set()
        store.watch(self._on_feed, self._on_feed_reset)

    # -- a shared store's feed: events other processes committed -----------------------------
    def _publish(self, session_id: str, event: Event) -> None:
        """Publish an event this process committed (a shared store's feed leaves these out)."""
        self.broker.publish(session_id, event)

    def _on_feed(self, session_id: str, event_id: int) -> None:
        """Another process committed an event: read it if a stream here waits for it."""
        if not self.broker.has(session_id):
            return
        task = asyncio.get_running_loop().create_task(self._read_feed(session_id, event_id))
        self._reading.add(task)
        task.add_done_callback(self._reading.discard)

    async def _read_feed(self, session_id: str, event_id: int) -> None:
        try:
            event = await self.store.event(session_id, event_id)
        except Exception:
            # The streams of this session miss it: end them, they reconnect and catch up.
            log.warning("could not read an event another instance committed", exc_info=True)
            for sub in self.broker.subscribers(session_id):
                sub.close("feed")
            return
        if event is not None:
            self.broker.publish(session_id, stored_event(event))

    def _on_feed_reset(self) -> None:
        """The feed was lost and is back: what it missed is in the database, so every stream
        here ends and its browser reconnects with Last-Event-ID and catches up."""
        log.warning("event feed reconnected: closing open streams so they catch up")
        self.broker.close_current("feed")

    async def create(
        self,
        *,
        session_id: str,
        provider: str,
        ttl: float,
        phone: str | None = None,
        user_ref: str | None = None,
        provider_ref: str | None = None,
        provider_data: dict[str, Any] | None = None,
        idempotency: Callable[[Session], Idempotency] | None = None,
        ticket: Admitted | None = None,
    ) -> Session:
        """Store a new pending session; `idempotency` makes the key record stored with it.

        With a start `ticket`, its hash is stored in the same transaction; a ticket that has
        started a session already is a 401 and nothing is stored.
        """
        now = self.clock()
        session = Session(
            id=session_id,
            provider=provider,
            status=PENDING,
            reason=None,
            provider_ref=provider_ref,
            phone=phone,
            user_ref=user_ref,
            provider_data=provider_data or {},
            outcome=None,
            created_at=now,
            updated_at=now,
            expires_at=now + ttl,
            completed_at=None,
        )
        if not await self.store.create(session, idempotency(session) if idempotency else None, ticket):
            raise Unauthorized("unauthorized", "this start ticket has been used already")
        if session.expires_at < self._next_expiry_pass:
            self.expiry_wakeup.set()
        return session

    async def get(self, session_id: str) -> Session | None:
        return await self.store.get(session_id)

    async def get_by_ref(self, provider: str, provider_ref: str) -> Session | None:
        return await self.store.get_by_ref(provider, provider_ref)

    async def get_with_events(self, session_id: str, after_id: int) -> tuple[Session | None, list[Event]]:
        """The session and its events after `after_id`, in one read (a stream opens with this)."""
        session, events = await self.store.get_with_events(session_id, after_id)
        return session, [stored_event(e) for e in events]

    async def outcome_event(self, session_id: str) -> Event | None:
        event = await self.store.outcome_event(session_id)
        return stored_event(event) if event else None

    async def update_provider_data(
        self, session_id: str, changes: dict[str, Any], *, expires_at: float | None = None
    ) -> bool:
        """Merge `changes` into a pending session's provider data (and move its deadline)."""
        return await self.store.update_provider_data(session_id, changes, now=self.clock(), expires_at=expires_at)

    async def progress(
        self,
        session_id: str,
        stage: str,
        *,
        claim: TokenClaim | None = None,
        expires_at: float | None = None,
        durable: bool = True,
    ) -> Progressed:
        """Record and publish a progress stage; nothing is written once the session is terminal.

        A `claim` (a Truecaller token) is stored first in the same transaction and the event
        is written only if it was "stored": one durable commit instead of two on a hot path.
        `expires_at` moves the deadline with it. Runs to completion even if the caller is
        cancelled.
        """
        return await asyncio.shield(self._progress(session_id, stage, claim, expires_at, durable))

    async def _progress(
        self, session_id: str, stage: str, claim: TokenClaim | None, expires_at: float | None, durable: bool
    ) -> Progressed:
        data = {"stage": stage}
        done = await self.store.progress(
            session_id, data, now=self.clock(), expires_at=expires_at, claim=claim, durable=durable
        )
        self._progressed(session_id, data, done)
        return done

    async def progress_by_ref(
        self,
        provider: str,
        provider_ref: str,
        stage: str,
        *,
        claim: TokenClaim,
        expires_at: float | None = None,
        durable: bool = True,
    ) -> RefProgressed:
        """`progress` with a claim, on the pending session `provider_ref` names, found in the same
        call (one round trip on a shared database). Runs to completion even if the caller is cancelled."""
        return await asyncio.shield(self._progress_by_ref(provider, provider_ref, stage, claim, expires_at, durable))

    async def _progress_by_ref(
        self,
        provider: str,
        provider_ref: str,
        stage: str,
        claim: TokenClaim,
        expires_at: float | None,
        durable: bool,
    ) -> RefProgressed:
        data = {"stage": stage}
        found = await self.store.progress_by_ref(
            provider, provider_ref, data, now=self.clock(), claim=claim, expires_at=expires_at, durable=durable
        )
        if found.session_id is not None:
            self._progressed(found.session_id, data, found.progressed)
        return found

    def _progressed(self, session_id: str, data: dict[str, Any], done: Progressed) -> None:
        """After the commit: publish the progress event the write stored, if it stored one."""
        if done.event_id is not None:
            self._publish(session_id, _event(done.event_id, "progress", data))
            self._reached(done)

    def _reached(self, done: Progressed) -> None:
        if done.first and done.provider is not None and self.on_reached is not None:
            self.on_reached(done.provider)

    async def finish(
        self, session_id: str, outcome: Outcome, *, release_claim: bool = False, unless_claimed: bool = False
    ) -> bool:
        """Move a pending session to its terminal outcome; False if another writer got there first.

        `release_claim` drops the session's stored Truecaller token in the same commit,
        whoever wins; `unless_claimed` stores nothing if a token is stored (its fetch decides,
        whichever process runs it). Runs to completion (write and publish) even if the caller
        is cancelled.
        """
        return await asyncio.shield(self._finish(session_id, outcome, release_claim, unless_claimed))

    async def _finish(self, session_id: str, outcome: Outcome, release_claim: bool, unless_claimed: bool) -> bool:
        finished = await self.store.finish(
            session_id,
            outcome,
            now=self.clock(),
            release_claim=release_claim,
            webhook=self.webhook_event,
            unless_claimed=unless_claimed,
        )
        return self._finished(session_id, outcome, finished)

    async def progress_and_finish(
        self,
        session_id: str,
        stage: str,
        outcome: Outcome,
        *,
        claim: TokenClaim | None = None,
        release_claim: bool = False,
    ) -> Progressed:
        """`progress` and then `finish` in one durable commit; nothing if the claim is refused.

        The events are the same two as with two commits, published in the same order, so a
        stream cannot tell; it saves one fsync when the outcome is known soon enough.
        """
        return await asyncio.shield(self._progress_and_finish(session_id, stage, outcome, claim, release_claim))

    async def _progress_and_finish(
        self, session_id: str, stage: str, outcome: Outcome, claim: TokenClaim | None, release_claim: bool
    ) -> Progressed:
        data = {"stage": stage}
        progressed, finished = await self.store.progress_and_finish(
            session_id,
            data,
            outcome,
            now=self.clock(),
            claim=claim,
            release_claim=release_claim,
            webhook=self.webhook_event,
        )
        self._progressed(session_id, data, progressed)
        if progressed.event_id is not None:
            self._finished(session_id, outcome, finished)
        return progressed

    def _finished(self, session_id: str, outcome: Outcome, finished: Finished | None) -> bool:
        """After the commit: publish the outcome the write stored, if it stored one."""
        if finished is None:
            return False
        body = finished.body
        self._publish(session_id, _event(finished.event_id, "outcome", body))
        if self.on_outcome is not None:
            self.on_outcome(body["provider"], outcome.status, outcome.reason)
        if self.webhook_event is not None and self.on_webhook is not None:
            self.on_webhook()
        log.info(
            "session finished",
            extra={"session": public_ref(session_id), "status": outcome.status, "reason": outcome.reason},
        )
        return True

    async def expire_due(self) -> int:
        """Expire every pending session whose deadline has passed; returns how many."""
        done = 0
        for session_id in await self.store.due_for_expiry(self.clock(), 1000):
            if await self.finish(session_id, Outcome(EXPIRED, "timeout")):
                done += 1
        return done

    async def next_deadline(self) -> float | None:
        return await self.store.next_deadline()

    async def run_expiry(self, max_sleep: float = 1.0) -> None:
        """Background task: turn overdue pending sessions into `expired` / `timeout`."""
        while True:
            try:
                await self.expire_due()
                deadline = await self.next_deadline()
            except Exception:
                log.exception("expiry pass failed")
                deadline = None
            delay = max_sleep if deadline is None else min(max_sleep, max(deadline - self.clock(), 0.0))
            self.expiry_wakeup.clear()
            self._next_expiry_pass = self.clock() + delay
            if delay > 0:
                try:
                    await asyncio.wait_for(self.expiry_wakeup.wait(), delay)
                except TimeoutError:
                    pass
