"""Retention: a finished session's personal data is removed `sessions.retention` seconds later.

What stays is what operations need: provider, status, reason, timestamps and the Veriph.One
status flags. What goes: the phone number, user_ref and provider data of the session row,
and the outcome's phone, profile and user_ref, both in the row and in the stored `outcome`
event a reconnecting stream would replay. `purged_at` records when. Webhooks that were
delivered or failed are deleted after the same delay (pending ones wait for `max_age`).

`sessions.keep` seconds after completion the scrubbed row itself goes, with its events, so a
flood of abandoned sessions cannot grow the database forever: the space is reused. Used
start tickets are forgotten when they expire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from gateway.storage.base import Store

log = logging.getLogger("gateway.retention")

# Sessions per transaction: a pass never holds the single writer for long.
BATCH = 200


def purge_interval(retention: float) -> float:
    """Seconds between passes: min(60, retention / 2), but at least 1 so retention = 0 does not spin."""
    return max(1.0, min(60.0, retention / 2))


class Retention:
    """Purges personal data of sessions completed more than `retention` seconds ago."""

    def __init__(
        self,
        store: Store,
        retention: float,
        clock: Callable[[], float] = time.time,
        batch: int = BATCH,
        keep: float = 0,
    ) -> None:
        self.store = store
        self.retention = retention
        self.keep = keep  # seconds after completion before a session is deleted; 0: never
        self.clock = clock
        self.batch = batch
        self.interval = purge_interval(retention)

    async def purge_once(self) -> int:
        """One pass, in batches of `batch` sessions per transaction; returns how many were purged."""
        total = 0
        while True:
            now = self.clock()
            done = await self.store.purge_personal_data(cutoff=now - self.retention, now=now, limit=self.batch)
            total += done
            if done < self.batch:
                break
        # Delivered and failed webhooks hold the outcome too: gone after the same delay.
        while await self.store.outbox_prune(cutoff=self.clock() - self.retention, limit=self.batch) == self.batch:
            pass
        await self.store.prune_idempotency(self.clock())  # a key lives as long as its session may be pending
        await self.store.prune_tickets(self.clock())  # an expired ticket is refused anyway
        if self.keep > 0:
            deleted = 0
            while True:
                done = await self.store.delete_finished(cutoff=self.clock() - self.keep, limit=self.batch)
                deleted += done
                if done < self.batch:
                    break
            if deleted:
                log.info("deleted old finished sessions", extra={"sessions": deleted})
        if total:
            log.info("purged personal data of finished sessions", extra={"sessions": total})
        return total

    async def run(self, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        """Background task: a pass every `interval` seconds until cancelled."""
        while True:
            try:
                await self.purge_once()
            except Exception:
                log.exception("retention pass failed")
            await sleep(self.interval)
